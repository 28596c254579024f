"""fastgrpo.advantages: group_advantages and the group-level tensor pieces (CARE bonus, COPO pieces)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgrpo.advantages import (
    ESTIMATORS,
    SCALES,
    care_bonus,
    care_eligible,
    copo_blend_weight,
    copo_gate,
    copo_global_advantages,
    copo_global_reward,
    group_advantages,
    group_index,
    group_label_entropy,
    group_stats,
)

FAST = settings(max_examples=40, deadline=None)


def naive_advantages(r: torch.Tensor, ids: list[int], scale: str, estimator: str, eps: float) -> torch.Tensor:
    """Per-group Python loop in fp64 with torch.std: an independent spelling of the spec."""
    r = r.double()
    out = torch.zeros_like(r)
    cent = torch.zeros_like(r)
    gstd = torch.zeros_like(r)
    for g in set(ids):
        m = torch.tensor([i == g for i in ids])
        x = r[m]
        n = x.numel()
        c = x - x.mean()
        if estimator == "rloo":
            c = c * n / (n - 1) if n > 1 else torch.zeros_like(c)
        if n == 1:
            c = torch.zeros_like(c)
        cent[m] = c
        gstd[m] = x.std() if n > 1 else 0.0
    if estimator == "reinforce_pp":
        return cent if scale == "none" else cent / (cent.std() + eps if r.numel() > 1 else eps)
    if scale == "group":
        out = cent / (gstd + eps)
    elif scale == "batch":
        out = cent / ((r.std() if r.numel() > 1 else 0.0) + eps)
    else:
        out = cent
    return out


# ------------------------------------------------------------------------------------------------ hand cases


def test_grpo_hand_computed():
    # r = [1, 0, 0, 0]: mean 0.25; unbiased var = (0.75^2 + 3 * 0.25^2) / 3 = 0.75 / 3 = 0.25, std 0.5
    # A = (r - 0.25) / (0.5 + 1e-4) = [0.75, -0.25, -0.25, -0.25] / 0.5001
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    torch.testing.assert_close(a, torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001)


def test_dr_grpo_and_batch_scale_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # scale="none" (Dr. GRPO): r - group mean
    torch.testing.assert_close(
        group_advantages(r, 4, scale="none"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    )
    # scale="batch": batch mean 5/8; sum of squares 5 * (3/8)^2 + 3 * (5/8)^2 = 120/64; /7 -> std 0.5175492
    std_b = math.sqrt(120 / 64 / 7)
    torch.testing.assert_close(
        group_advantages(r, 4, scale="batch"),
        torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / (std_b + 1e-4),
    )


def test_rloo_and_reinforce_pp_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # RLOO: r_i - mean of the others: 1 - 0 = 1; 0 - 1/3 = -1/3; the all-ones group gives 0
    torch.testing.assert_close(
        group_advantages(r, 4, estimator="rloo", scale="none"),
        torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0]),
    )
    # REINFORCE++: c = r - group mean = [.75, -.25, -.25, -.25, 0 x4]; batch mean of c is 0;
    # unbiased std of c = sqrt((0.5625 + 3 * 0.0625) / 7) = sqrt(0.75 / 7) = 0.3273268
    s = math.sqrt(0.75 / 7)
    torch.testing.assert_close(
        group_advantages(r, 4, estimator="reinforce_pp"),
        torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / (s + 1e-4),
    )


def test_ragged_group_ids_unsorted():
    r = torch.tensor([3.0, 1.0, 2.0, 5.0, 6.0, 4.0])
    ids = torch.tensor([7, 2, 7, 2, 2, 9])
    # group 7: [3, 2] mean 2.5 std sqrt(0.5) = 0.7071068 -> +-0.5 / (0.7071068 + 1e-4)
    # group 2: [1, 5, 6] mean 4, unbiased var (9 + 1 + 4) / 2 = 7 -> std 2.6457513
    # group 9: [4] size 1 -> 0
    s7, s2 = math.sqrt(0.5) + 1e-4, math.sqrt(7) + 1e-4
    want = torch.tensor([0.5 / s7, -3 / s2, -0.5 / s7, 1 / s2, 2 / s2, 0.0])
    torch.testing.assert_close(group_advantages(r, group_ids=ids), want)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_size_one_and_zero_spread_groups_are_exactly_zero(scale, estimator):
    a = group_advantages(torch.tensor([0.3, -2.0, 5.0]), group_size=1, scale=scale, estimator=estimator)
    assert torch.equal(a, torch.zeros(3))
    # 0.1 * 3 / 3 != 0.1 in floating point; the shifted statistics still give exact zeros
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 0.2])
    a = group_advantages(r, 3, scale=scale, estimator=estimator)
    assert torch.equal(a[:6], torch.zeros(6))
    assert bool((a[6:] != 0).all())


def test_matches_naive_random():
    g = torch.Generator().manual_seed(0)
    for scale in SCALES:
        for est in ESTIMATORS:
            r = torch.randn(24, generator=g, dtype=torch.float64)
            ids = torch.randint(0, 6, (24,), generator=g)
            got = group_advantages(r, group_ids=ids, scale=scale, estimator=est)
            assert got.dtype == torch.float64
            torch.testing.assert_close(
                got, naive_advantages(r, ids.tolist(), scale, est, 1e-4), atol=1e-10, rtol=1e-10
            )


def test_fp32_within_error_budget_of_fp64():
    g = torch.Generator().manual_seed(1)
    r64 = torch.randn(64, generator=g, dtype=torch.float64) * 10
    gt = group_advantages(r64, 8)
    got = group_advantages(r64.float(), 8)
    naive32 = naive_advantages(r64.float(), (torch.arange(64) // 8).tolist(), "group", "grpo", 1e-4).float()
    err_ref = (naive32.double() - gt).abs().max().item()
    assert (got.double() - gt).abs().max().item() <= 2 * err_ref + 1e-5


def test_two_d_input_and_dtypes():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    a2 = group_advantages(r)
    assert a2.shape == (2, 4)
    torch.testing.assert_close(a2.reshape(-1), group_advantages(r.reshape(-1), 4))
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([True, False]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0]), group_size=2), r"rewards.*finite.*\[4\]"),
        (dict(rewards=torch.tensor([1.0, float("inf")]), group_size=2), r"rewards.*\[2\]"),
        (dict(rewards=torch.tensor([]), group_size=2), "empty batch"),
        (dict(rewards=torch.zeros(4), group_size=3), "multiple of group_size=3"),
        (dict(rewards=torch.zeros(4)), "exactly one of group_size and group_ids"),
        (
            dict(rewards=torch.zeros(4), group_size=2, group_ids=torch.zeros(4, dtype=torch.long)),
            "exactly one",
        ),
        (
            dict(rewards=torch.zeros(4), group_ids=torch.zeros(3, dtype=torch.long)),
            r"group_ids.*\[4\].*\[3\]",
        ),
        (dict(rewards=torch.zeros(4), group_ids=torch.zeros(4)), "integer"),
        (dict(rewards=torch.zeros(4), group_size=2, scale="std"), "scale"),
        (dict(rewards=torch.zeros(4), group_size=2, estimator="ppo"), "estimator"),
        (dict(rewards=torch.zeros(4), group_size=2, eps=-1.0), "eps"),
        (dict(rewards=torch.zeros(2, 2, 2), group_size=2), r"rewards.*\[2, 2, 2\]"),
        (dict(rewards=torch.zeros(2, 2), group_size=2), "already grouped"),
        (dict(rewards=[1.0, 0.0], group_size=2), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)


# ------------------------------------------------------------------------------------------------ properties


@st.composite
def grouped_rewards(draw, max_groups=5, max_size=6):
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_groups))
    vals = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-100, 100, allow_nan=False, width=32))
    rewards = [draw(vals) for _ in range(sum(sizes))]
    ids = [g for g, n in enumerate(sizes) for _ in range(n)]
    perm = draw(st.permutations(range(len(ids))))
    return torch.tensor([rewards[i] for i in perm]), torch.tensor([ids[i] for i in perm]) * 3 + 11


@FAST
@given(
    data=grouped_rewards(),
    scale=st.sampled_from(SCALES),
    est=st.sampled_from(ESTIMATORS),
    seed=st.integers(0, 99),
)
def test_property_permutation_equivariance(data, scale, est, seed):
    r, ids = data
    a = group_advantages(r, group_ids=ids, scale=scale, estimator=est)
    perm = torch.randperm(r.numel(), generator=torch.Generator().manual_seed(seed))
    b = group_advantages(r[perm], group_ids=ids[perm], scale=scale, estimator=est)
    torch.testing.assert_close(b, a[perm], atol=1e-4, rtol=1e-4)
    # renaming the groups changes nothing
    c = group_advantages(r, group_ids=1000 - 7 * ids, scale=scale, estimator=est)
    torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)


@FAST
@given(data=grouped_rewards(), scale=st.sampled_from(SCALES), est=st.sampled_from(ESTIMATORS))
def test_property_finite_shapes_zero_groups(data, scale, est):
    r, ids = data
    a = group_advantages(r, group_ids=ids, scale=scale, estimator=est)
    assert a.shape == r.shape and a.dtype == torch.float32
    assert bool(torch.isfinite(a).all())
    a64 = group_advantages(r.double(), group_ids=ids, scale=scale, estimator=est)
    assert a64.dtype == torch.float64
    for g in ids.unique():
        m = ids == g
        if m.sum() == 1 or bool((r[m] == r[m][0]).all()):
            assert bool((a[m] == 0).all()), "size-1 and zero-spread groups get exactly 0"
        elif est == "grpo":
            # the centred rewards of a group sum to zero
            assert abs(float(a64[m].sum())) <= 1e-6 * (1 + float(a64[m].abs().sum()))


@FAST
@given(data=grouped_rewards())
def test_property_matches_naive(data):
    r, ids = data
    for scale in SCALES:
        for est in ESTIMATORS:
            got = group_advantages(r.double(), group_ids=ids, scale=scale, estimator=est)
            want = naive_advantages(r, ids.tolist(), scale, est, 1e-4)
            torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)


# ------------------------------------------------------------------------------------------------ pieces


def test_group_index_and_stats():
    idx, P = group_index(6, group_size=3)
    assert P == 2 and idx.tolist() == [0, 0, 0, 1, 1, 1]
    idx, P = group_index(4, group_ids=torch.tensor([5, -1, 5, 9]))
    assert P == 3 and idx.tolist() == [1, 0, 1, 2]  # numbered by sorted id
    mean, std, count = group_stats(torch.tensor([1.0, 2.0, 4.0, 3.0]), torch.tensor([0, 0, 0, 1]), 2)
    # group 0: mean 7/3; deviations -4/3, -1/3, 5/3; sum sq 42/9; /2 -> std sqrt(7/3) = 1.5275252; group 1: size 1
    torch.testing.assert_close(mean, torch.tensor([7 / 3, 3.0]))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(7 / 3), 0.0]))
    assert count.tolist() == [3.0, 1.0]


def test_care_bonus_hand_computed():
    # group 0: acc [1, 1, 1, 0], mean .75 -> eligible [T, T, T, F];
    #   mu = (0.9 + 0.6 + 0.8) / 3 = 0.7667; c >= mu: 0.9 yes, 0.6 no, 0.8 yes; 0.95 is not eligible
    #   bonus = 0.5 * acc * [1, 0, 1, 0] = [.5, 0, .5, 0]
    # group 1: acc all 0 -> nobody is eligible (acc <= 0.1) -> no bonus even at high confidence
    # group 2: acc [.05, .05, .05, .05] equal but under the 0.1 threshold -> no bonus
    acc = torch.tensor([1.0, 1.0, 1.0, 0.0, 0, 0, 0, 0, 0.05, 0.05, 0.05, 0.05])
    conf = torch.tensor([0.9, 0.6, 0.8, 0.95, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    idx, G = group_index(12, 4)
    bonus = care_bonus(acc, conf, idx, G)
    assert bonus.tolist() == [0.5, 0.0, 0.5, 0.0] + [0.0] * 8
    assert care_eligible(acc, idx, G).tolist()[:4] == [True, True, True, False]
    # margin 0.2: mu - 0.2 = 0.5667 -> all three eligible samples get it; coefficient 1.0 doubles it
    bonus = care_bonus(acc, conf, idx, G, coefficient=1.0, margin=0.2)
    assert bonus.tolist()[:4] == [1.0, 1.0, 1.0, 0.0]


def test_label_entropy_and_copo_weight_hand_computed():
    idx, G = group_index(12, 6)
    labels = torch.tensor([1, 1, 1, 1, 2, 2, 0, 1, 2, 3, 4, 5])
    h = group_label_entropy(labels, idx, G)
    # group 0: p = (4/6, 2/6) -> H = -(2/3 log2 2/3 + 1/3 log2 1/3) = 0.9182958; group 1: 6 distinct -> log2 6
    torch.testing.assert_close(h, torch.tensor([0.9182958, math.log2(6)]))
    # w = sigmoid(5 (H - 1)): H = 0 -> 1 / (1 + e^5) = 0.0066929; H = 1 -> 0.5; H = log2 6 -> sigmoid(7.925) = 0.99964
    w = copo_blend_weight(torch.tensor([0.0, 1.0, math.log2(6)]))
    torch.testing.assert_close(w, torch.tensor([0.0066929, 0.5, 0.9996383]), atol=1e-6, rtol=0)


def test_copo_global_pieces_hand_computed():
    idx, G = group_index(12, 6)
    r = torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    h = torch.tensor([0.0, math.log2(6)])
    # plain: R_g = group accuracy = [5/6, 0]
    torch.testing.assert_close(copo_global_reward(r, idx, G), torch.tensor([5 / 6, 0.0]))
    # with the entropy coefficient: lambda = (1 - 1/6) / log2 6; H = log2 6 -> c = 1/6; H = 0 -> c = 1
    torch.testing.assert_close(
        copo_global_reward(torch.ones(12), idx, G, h, use_entropy_coef=True), torch.tensor([1.0, 1 / 6])
    )
    # standardised over prompts: mean 5/12, unbiased std (5/12) sqrt(2) -> +-1/sqrt(2)
    torch.testing.assert_close(
        copo_global_advantages(torch.tensor([5 / 6, 0.0])), torch.tensor([0.7071, -0.7071]), atol=1e-4, rtol=0
    )
    assert copo_global_advantages(torch.tensor([0.3])).tolist() == [0.0]
    w = torch.full((4,), 0.8)
    rr = torch.tensor([1.0, 0.0, 1.0, 0.0])
    aloc = torch.tensor([0.5, -0.5, 0.0, 0.0])
    assert copo_gate(w, rr, aloc, gating="soft-with-zero").tolist() == pytest.approx([0.8, 0, 0.8, 0])
    assert copo_gate(w, rr, aloc, gating="soft-with-forced").tolist() == pytest.approx([0.8, 0.8, 0, 0])
    assert copo_gate(w, rr, aloc, gating="only-global").tolist() == [0, 0, 0, 0]
    assert copo_gate(w, rr, aloc, gating="no-global").tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="gating"):
        copo_gate(w, rr, aloc, gating="soft")


def test_backend_dispatch_matches_torch_and_never_falls_back():
    from fastgrpo import available_backends

    r = torch.tensor([1.0, 0.0, 2.0, 2.0, 5.0, 1.0, 0.5])
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    ref = group_advantages(r, group_ids=gid, backend="torch")
    if "cpp" in available_backends("cpu"):
        torch.testing.assert_close(group_advantages(r, group_ids=gid, backend="cpp"), ref)
    from fastgrpo._backends import BackendUnavailable

    with pytest.raises(BackendUnavailable):
        group_advantages(r, group_ids=gid, backend="cuda")  # CPU tensors
    with pytest.raises(ValueError, match="backend"):
        group_advantages(r, group_ids=gid, backend="triton")


def test_one_dispatcher_for_the_advantages(monkeypatch):
    """The log-prob ops' dispatch rules: FASTGRPO_BACKEND overrides auto (it used to be ignored here) when the op
    has that backend, and raises when that backend cannot run; auto takes a backend that supports the dtype."""
    from fastgrpo import _backends
    from fastgrpo._backends import BackendUnavailable

    if not _backends.HAS_CUDA_EXT:
        pytest.skip("fastgrpo._C is not built")
    from fastgrpo.ops import _cpp

    r = torch.tensor([1.0, 0.0, 2.0, 2.0, 5.0, 1.0, 0.5, 0.5])
    ref = group_advantages(r, 2, backend="torch")
    calls, real = [], _cpp.group_advantages
    monkeypatch.setattr(_cpp, "group_advantages", lambda *a, **k: calls.append(a) or real(*a, **k))
    torch.testing.assert_close(group_advantages(r, 2), ref)  # auto on CPU: torch (microseconds)
    assert not calls
    monkeypatch.setenv("FASTGRPO_BACKEND", "cpp")
    torch.testing.assert_close(group_advantages(r, 2), ref)
    torch.testing.assert_close(group_advantages(r.double(), 2), ref.double())  # the extension takes fp64
    assert len(calls) == 2
    monkeypatch.setenv("FASTGRPO_BACKEND", "triton")  # no Triton backend for the advantages: auto's choice
    torch.testing.assert_close(group_advantages(r, 2), ref)
    assert len(calls) == 2
    monkeypatch.setenv("FASTGRPO_BACKEND", "cuda")  # forced, and it cannot run on CPU tensors: the reason
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        group_advantages(r, 2)
    monkeypatch.setenv("FASTGRPO_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FASTGRPO_BACKEND must be one of"):
        group_advantages(r, 2)

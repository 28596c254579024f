"""The C++ extension fastgrpo._C on CPU: epilogue ops and the group-advantage op against fp64 references.

Accuracy by the STYLE.md error budget: ``err(ext) <= 2 * err(torch ref in the test dtype) + atol`` with the fp64
result as ground truth (max abs error; NaN never passes). Fresh random inputs per case. Skipped, with the reason,
when the extension is not built (FASTGRPO_NO_EXT=1, or no compiler at install time).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_budget, max_err

from fastgrpo._backends import BackendUnavailable

try:
    from fastgrpo.ops import _cpp

    BUILD = _cpp.build_info()
except BackendUnavailable as e:  # pragma: no cover - depends on the build
    pytest.skip(f"fastgrpo._C is not built: {e}", allow_module_level=True)

from fastgrpo import advantages as adv_ref
from fastgrpo.ops.epilogue import get_epilogue, torch_logits_grad_, torch_lse_logp_entropy

KERNELS = ["avx2", "default"] if BUILD["avx2_built"] else ["default"]


def _avx2_runs() -> bool:
    try:
        _cpp.set_cpu_kernel("avx2")
    except ValueError:
        return False
    finally:
        _cpp.set_cpu_kernel("auto")
    return True


@pytest.fixture(params=KERNELS)
def kernel(request):
    if request.param == "avx2" and not _avx2_runs():
        pytest.skip("this CPU lacks AVX2/FMA/F16C")
    _cpp.set_cpu_kernel(request.param)
    yield request.param
    _cpp.set_cpu_kernel("auto")


def _fp64_forward(z: torch.Tensor, targets: torch.Tensor, inv_temp: float):
    """Ground truth in fp64, safe with -inf logits (p x := 0 where p == 0)."""
    x = z.double() * inv_temp
    lse = torch.logsumexp(x, dim=-1)
    p = torch.exp(x - lse[:, None])
    px = torch.where(p > 0, p * x, torch.zeros_like(p))
    logp = x.gather(1, targets[:, None]).squeeze(1) - lse
    return lse, logp, lse - px.sum(-1)


def _fp64_grad_autograd(z, targets, c_logp, c_ent, inv_temp):
    """dL/dz of L = sum(c_logp * logp + c_ent * entropy) by fp64 autograd: the math the epilogue contract states."""
    z64 = z.detach().double().requires_grad_(True)
    x = z64 * inv_temp
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    p = logp_all.exp()
    ent = -(p * logp_all).sum(-1)
    loss = (c_logp.double() * logp).sum()
    if c_ent is not None:
        loss = loss + (c_ent.double() * ent).sum()
    (g,) = torch.autograd.grad(loss, z64)
    return g


def _block(C: int, V: int, dtype, scale: float = 4.0):
    z = (torch.randn(C, V, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, V, (C,))
    return z, targets


SHAPES = [(1, 1001), (63, 130), (63, 1001), (5, 1), (3, 7), (17, 4099)]


# ----------------------------------------------------------------------------------------------------------
# epilogue
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,V", SHAPES)
@pytest.mark.parametrize("inv_temp", [1.0, 1 / 0.7])
def test_forward_matches_fp64(kernel, dtype, C, V, inv_temp):
    z, t = _block(C, V, dtype)
    z_before = z.clone()
    ext = _cpp.lse_logp_entropy(z, t, inv_temp)
    gt = _fp64_forward(z, t, inv_temp)
    ref = torch_lse_logp_entropy(z, t, inv_temp)
    for name, e, r, g in zip(("lse", "logp", "entropy"), ext, ref, gt):
        assert e.dtype == torch.float32 and e.shape == (C,)
        assert_budget(e, g, r, dtype, name, relative_atol=False)
    assert torch.equal(z, z_before), "lse_logp_entropy wrote into its input"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,V", SHAPES)
@pytest.mark.parametrize("with_ent", [True, False])
def test_gradient_matches_fp64_autograd(kernel, dtype, C, V, with_ent):
    inv_temp = 1 / 0.7
    z, t = _block(C, V, dtype)
    c_logp = torch.randn(C)
    c_ent = torch.randn(C) if with_ent else None
    gt = _fp64_grad_autograd(z, t, c_logp, c_ent, inv_temp)

    # each backend feeds its own forward outputs to its gradient, as the engine does
    lse, _, ent = _cpp.lse_logp_entropy(z, t, inv_temp)
    lse_r, _, ent_r = torch_lse_logp_entropy(z, t, inv_temp)
    stats_before = (lse.clone(), ent.clone(), c_logp.clone())
    zb = z.clone()
    out = _cpp.logits_grad_(zb, t, lse, ent, c_logp, c_ent, inv_temp)
    ref = torch_logits_grad_(z.clone(), t, lse_r, ent_r, c_logp, c_ent, inv_temp)

    assert out is zb and out.dtype == dtype, "logits_grad_ must return its (overwritten) input"
    assert_budget(out, gt, ref, dtype, "dz", relative_atol=False)
    for before, after in zip(stats_before, (lse, ent, c_logp)):
        assert torch.equal(before, after), "logits_grad_ wrote into an input other than z"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(kernel, dtype):
    C, V = 63, 1001
    z, t = _block(C, V, dtype, scale=1e4)
    z[0, 5] = 1e4  # a near-tie at the top
    z[0, 6] = 1e4
    t[0] = 5
    ext = _cpp.lse_logp_entropy(z, t, 1.0)
    gt = _fp64_forward(z, t, 1.0)
    ref = torch_lse_logp_entropy(z, t, 1.0)
    for name, e, r, g in zip(("lse", "logp", "entropy"), ext, ref, gt):
        assert torch.isfinite(e).all(), f"{name} not finite at |z| ~ 1e4"
        assert_budget(e, g, r, dtype, name, relative_atol=False)
    c_logp, c_ent = torch.randn(C), torch.randn(C)
    out = _cpp.logits_grad_(z.clone(), t, ext[0], ext[2], c_logp, c_ent, 1.0)
    ref_g = torch_logits_grad_(z.clone(), t, ref[0], ref[2], c_logp, c_ent, 1.0)
    gt_g = _fp64_grad_autograd(z, t, c_logp, c_ent, 1.0)
    assert torch.isfinite(out).all()
    assert_budget(out, gt_g, ref_g, dtype, "dz", relative_atol=False)


def test_minus_inf_logits_are_exact_zeros(kernel):
    # a -inf bias (banned tokens) must not turn the entropy or the gradient into 0 * inf = NaN
    C, V = 4, 300
    z, t = _block(C, V, torch.float32)
    z[:, 100:140] = -math.inf
    ext = _cpp.lse_logp_entropy(z, t.clamp(max=99), 1.0)
    gt = _fp64_forward(z, t.clamp(max=99), 1.0)
    for name, e, g in zip(("lse", "logp", "entropy"), ext, gt):
        assert max_err(e, g) <= 1e-5, name
    c_logp, c_ent = torch.randn(C), torch.randn(C)
    out = _cpp.logits_grad_(z.clone(), t.clamp(max=99), ext[0], ext[2], c_logp, c_ent, 1.0)
    assert torch.isfinite(out).all()
    assert (out[:, 100:140] == 0).all()


def test_nan_propagates(kernel):
    z, t = _block(3, 257, torch.float32)
    z[1, 200] = math.nan
    lse, logp, ent = _cpp.lse_logp_entropy(z, t, 1.0)
    assert torch.isnan(lse[1]) and torch.isnan(ent[1])
    assert torch.isfinite(lse[[0, 2]]).all()


def test_kernels_agree():
    if "avx2" not in KERNELS or not _avx2_runs():
        pytest.skip("needs the AVX2 kernels and an AVX2 CPU")
    z, t = _block(33, 5003, torch.bfloat16)
    outs = {}
    for k in ("avx2", "default"):
        _cpp.set_cpu_kernel(k)
        outs[k] = _cpp.lse_logp_entropy(z, t, 1.3)
    _cpp.set_cpu_kernel("auto")
    for a, b in zip(outs["avx2"], outs["default"]):
        assert max_err(a, b) <= 1e-5


def test_empty_block():
    z = torch.empty(0, 50)
    t = torch.empty(0, dtype=torch.int64)
    lse, logp, ent = _cpp.lse_logp_entropy(z, t, 1.0)
    assert lse.shape == logp.shape == ent.shape == (0,)
    e = torch.empty(0)
    assert _cpp.logits_grad_(z, t, e, e, e, None, 1.0).shape == (0, 50)


def test_get_epilogue():
    ep = get_epilogue("cpp")
    assert ep.name == "cpp"
    z, t = _block(2, 10, torch.float32)
    assert ep.lse_logp_entropy(z, t, 1.0)[0].shape == (2,)
    if not BUILD["cuda"]:
        with pytest.raises(BackendUnavailable, match="CUDA kernels"):
            _cpp.get_epilogue("cuda")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(z=a["z"].t()), "contiguous"),
        (lambda a: a.update(z=a["z"].double()), "float32, bfloat16 or float16"),
        (lambda a: a.update(z=a["z"][0]), "2-D"),
        (lambda a: a.update(targets=a["targets"].int()), "int64"),
        (lambda a: a.update(targets=a["targets"][:2]), "targets must have shape"),
        (lambda a: a["targets"].__setitem__(1, 10), r"targets\[1\] = 10 is outside"),
        (lambda a: a.update(inv_temp=0.0), "inv_temp"),
        (lambda a: a.update(lse=a["lse"][:2]), "lse must have shape"),
        (lambda a: a.update(c_ent=a["c_ent"].double()), "c_ent must be float32"),
    ],
)
def test_readable_errors(mutate, match):
    z, t = _block(3, 10, torch.float32)
    args = dict(z=z, targets=t, lse=torch.zeros(3), entropy=torch.zeros(3), c_logp=torch.ones(3),
                c_ent=torch.ones(3), inv_temp=1.0)  # fmt: skip
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastgrpo.logits_grad_(**args)


def test_opcheck_epilogue():
    z, t = _block(5, 37, torch.float32)
    torch.library.opcheck(torch.ops.fastgrpo.lse_logp_entropy.default, (z, t, 1.25))
    lse, _, ent = _cpp.lse_logp_entropy(z, t, 1.25)
    c = torch.randn(5)
    torch.library.opcheck(
        torch.ops.fastgrpo.logits_grad_.default, (z.clone(), t, lse, ent, c, c.clone(), 1.25)
    )
    torch.library.opcheck(torch.ops.fastgrpo.logits_grad_.default, (z.clone(), t, lse, ent, c, None, 1.25))


# ----------------------------------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------------------------------


def _ragged_ids(B: int) -> torch.Tensor:
    """Unsorted, non-contiguous ids: several ragged groups and at least two size-1 groups."""
    ids = torch.randint(0, max(B // 3, 1), (B,)) * 7 + 3
    ids[0], ids[-1] = 1000, 2000
    return ids[torch.randperm(B)]


def _reference(rewards, index, P, *, scale, estimator, eps, care=None, copo=None):
    """The spec composed from fastgrpo.advantages, in the dtype of ``rewards``."""
    out = {}
    r = rewards
    if care is not None:
        acc, conf, kw = care
        out["bonus"] = adv_ref.care_bonus(acc, conf, index, P, **kw)
        r = r + out["bonus"]
    out["advantages"] = adv_ref.group_advantages_ref(r, index, P, scale=scale, estimator=estimator, eps=eps)
    out["mean"], out["std"], _ = adv_ref.group_stats(r, index, P)
    if copo is not None:
        ent, kw = copo
        reward_g = adv_ref.copo_global_reward(r, index, P, ent, use_entropy_coef=kw["entropy_coef"])
        out["global_advantages"] = adv_ref.copo_global_advantages(reward_g, eps=kw["eps"])
        out["blend_weight"] = adv_ref.copo_blend_weight(ent, k=kw["k"], b=kw["b"])
    return out


def _ext(rewards, index, P, *, scale, estimator, eps, care=None, copo=None):
    kw = {}
    if care is not None:
        acc, conf, ckw = care
        kw.update(care_acc=acc, care_confidence=conf, care_coefficient=ckw["coefficient"],
                  care_margin=ckw["margin"], care_acc_threshold=ckw["acc_threshold"])  # fmt: skip
    if copo is not None:
        ent, pkw = copo
        kw.update(copo_entropy=ent, copo_k=pkw["k"], copo_b=pkw["b"], copo_eps=pkw["eps"],
                  copo_entropy_coef=pkw["entropy_coef"])  # fmt: skip
    return _cpp.group_advantages(rewards, index, P, scale=scale, estimator=estimator, eps=eps, **kw)._asdict()


def _care_inputs(B: int, levels: bool):
    acc = torch.randint(0, 5, (B,)).double() / 4 if levels else torch.rand(B, dtype=torch.float64)
    conf = torch.rand(B, dtype=torch.float64).clamp(max=0.95)
    return acc, conf


@pytest.mark.parametrize("estimator", adv_ref.ESTIMATORS)
@pytest.mark.parametrize("scale", adv_ref.SCALES)
@pytest.mark.parametrize("B", [1, 2, 37, 600])
def test_group_advantages_ragged(estimator, scale, B):
    ids = _ragged_ids(B)
    index, P = adv_ref.group_index(B, group_ids=ids)
    r64 = torch.randn(B, dtype=torch.float64)
    kw = dict(scale=scale, estimator=estimator, eps=1e-4)
    gt = _reference(r64, index, P, **kw)
    ref32 = _reference(r64.float(), index, P, **kw)
    ext32 = _ext(r64.float(), index, P, **kw)
    ext64 = _ext(r64, index, P, **kw)
    for k in gt:
        assert ext32[k].dtype == torch.float32 and ext64[k].dtype == torch.float64
        assert_budget(ext32[k], gt[k], ref32[k], torch.float32, k, relative_atol=False)
        assert max_err(ext64[k], gt[k]) <= 1e-12, k


@pytest.mark.parametrize("scale", adv_ref.SCALES)
def test_group_advantages_zero_spread_and_singletons_are_exact_zeros(scale):
    # 3 groups of 4 equal non-representable rewards, 2 singletons, one ordinary group of 3
    r = torch.tensor([0.1] * 4 + [0.7] * 4 + [1 / 3] * 4 + [5.0, -2.0] + [0.0, 1.0, 0.5])
    ids = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3, 4] + [5] * 3)
    index, P = adv_ref.group_index(r.numel(), group_ids=ids)
    for est in adv_ref.ESTIMATORS:
        a = _cpp.group_advantages(r, index, P, scale=scale, estimator=est).advantages
        assert (a[:14] == 0).all(), (est, a)
        assert (a[14:] != 0).any()
        ref = adv_ref.group_advantages_ref(r, index, P, scale=scale, estimator=est)
        # same operations in the same order as the reference, except the batch std (fp64 sums here)
        assert torch.equal(a, ref) if scale != "batch" else max_err(a, ref) <= 1e-6


def test_group_advantages_hand_computed():
    # rewards [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5,
    # A = (r - 0.25) / (0.5 + 1e-4) = [0.75, -0.25, -0.25, -0.25] / 0.5001
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    out = _cpp.group_advantages(r, torch.zeros(4, dtype=torch.int64), 1)
    expect = torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64) / 0.5001
    assert torch.allclose(out.advantages, expect, rtol=0, atol=1e-15)
    assert out.mean.item() == 0.25 and abs(out.std.item() - 0.5) < 1e-15
    # rloo on the same group: c * n / (n - 1) = [1, -1/3, -1/3, -1/3], scale none
    rloo = _cpp.group_advantages(r, torch.zeros(4, dtype=torch.int64), 1, estimator="rloo", scale="none")
    assert torch.allclose(rloo.advantages, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3], dtype=torch.float64))


@pytest.mark.parametrize("levels", [True, False])
@pytest.mark.parametrize("margin", [0.0, 0.01, None])
def test_care_bonus(levels, margin):
    B = 200
    index, P = adv_ref.group_index(B, group_ids=_ragged_ids(B))
    acc, conf = _care_inputs(B, levels)
    acc[index == 0] = 0.05  # a group whose accuracies are all <= 0.1: empty eligible set
    fmt = torch.randint(0, 2, (B,)).double()
    ckw = dict(coefficient=0.5, margin=margin, acc_threshold=0.1)
    kw = dict(scale="group", estimator="grpo", eps=1e-4)
    gt = _reference(acc + fmt, index, P, care=(acc, conf, ckw), **kw)
    ref32 = _reference((acc + fmt).float(), index, P, care=(acc.float(), conf.float(), ckw), **kw)
    ext32 = _ext((acc + fmt).float(), index, P, care=(acc.float(), conf.float(), ckw), **kw)
    ext64 = _ext(acc + fmt, index, P, care=(acc, conf, ckw), **kw)
    # the eligibility decisions are discrete: the op mirrors the reference bit for bit
    assert torch.equal(ext32["bonus"], ref32["bonus"]) and torch.equal(ext64["bonus"], gt["bonus"])
    assert (ext64["bonus"][index == 0] == 0).all()
    assert (ext64["bonus"] > 0).any()
    for k in gt:
        assert_budget(ext32[k], gt[k], ref32[k], torch.float32, k, relative_atol=False)
        assert max_err(ext64[k], gt[k]) <= 1e-12, k


def test_care_all_groups_ineligible():
    B = 12
    index, P = adv_ref.group_index(B, group_size=4)
    acc = torch.full((B,), 0.1)  # not > 0.1 anywhere
    out = _cpp.group_advantages(acc, index, P, care_acc=acc, care_confidence=torch.rand(B))
    assert (out.bonus == 0).all() and (out.advantages == 0).all()


@pytest.mark.parametrize("entropy_coef", [False, True])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_copo(entropy_coef, scale):
    B = 96
    index, P = adv_ref.group_index(B, group_ids=_ragged_ids(B))
    r = torch.randint(0, 2, (B,)).double()
    labels = torch.randint(0, 3, (B,))
    ent = adv_ref.group_label_entropy(labels, index, P, dtype=torch.float64)
    pkw = dict(k=5.0, b=1.0, eps=1e-6, entropy_coef=entropy_coef)
    kw = dict(scale=scale, estimator="grpo", eps=1e-6)
    gt = _reference(r, index, P, copo=(ent, pkw), **kw)
    ref32 = _reference(r.float(), index, P, copo=(ent.float(), pkw), **kw)
    ext32 = _ext(r.float(), index, P, copo=(ent.float(), pkw), **kw)
    ext64 = _ext(r, index, P, copo=(ent, pkw), **kw)
    for k in gt:
        assert_budget(ext32[k], gt[k], ref32[k], torch.float32, k, relative_atol=False)
        assert max_err(ext64[k], gt[k]) <= 1e-12, k


def test_copo_all_equal_global_rewards_give_zero():
    index, P = adv_ref.group_index(12, group_size=3)
    r = torch.tensor([1.0, 0.0, 0.0] * 4)  # every group has mean 1/3
    out = _cpp.group_advantages(r, index, P, copo_entropy=torch.ones(P))
    assert (out.global_advantages == 0).all()
    assert torch.allclose(out.blend_weight, torch.full((P,), 0.5))  # sigmoid(5 * (1 - 1))


def test_group_advantages_errors():
    r = torch.randn(6)
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(RuntimeError, match=r"index\[5\] = 3 is outside"):
        _cpp.group_advantages(r, torch.tensor([0, 0, 1, 1, 2, 3]), 3)
    with pytest.raises(RuntimeError, match="group 1 of num_groups = 3 has no member"):
        _cpp.group_advantages(r, torch.tensor([0, 0, 0, 2, 2, 2]), 3)
    bad = r.clone()
    bad[2] = math.nan
    with pytest.raises(RuntimeError, match="rewards must be finite"):
        _cpp.group_advantages(bad, index, 3)
    with pytest.raises(RuntimeError, match="copo_entropy must have shape"):
        _cpp.group_advantages(r, index, 3, copo_entropy=torch.ones(2))
    with pytest.raises(ValueError, match="estimator"):
        _cpp.group_advantages(r, index, 3, estimator="ppo")


def test_group_advantages_cpp_backend_is_the_torch_one():
    B = 64
    r = torch.randint(0, 2, (B,)).float()
    for est in adv_ref.ESTIMATORS:
        for scale in adv_ref.SCALES:
            a = adv_ref.group_advantages(r, 8, scale=scale, estimator=est, backend="cpp")
            b = adv_ref.group_advantages(r, 8, scale=scale, estimator=est, backend="torch")
            assert max_err(a, b) <= 1e-6


def test_opcheck_group_advantages():
    B = 10
    index, P = adv_ref.group_index(B, group_ids=torch.tensor([3, 1, 3, 3, 7, 1, 7, 7, 9, 3]))
    r = torch.randn(B)
    args = (r, index, P, "grpo", "group", 1e-4, None, None, 0.5, 0.0, 0.1, None, 5.0, 1.0, 1e-6, False)
    torch.library.opcheck(torch.ops.fastgrpo.group_advantages.default, args)
    acc, conf = torch.rand(B), torch.rand(B)
    args = (r, index, P, "rloo", "batch", 1e-4, acc, conf, 0.5, 0.0, 0.1, torch.rand(P), 5.0, 1.0, 1e-6, True)
    torch.library.opcheck(torch.ops.fastgrpo.group_advantages.default, args)

"""fastgrpo.sampling: curricula, performance gating, variance-aware sampling, DAPO dynamic filtering."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgrpo.sampling import (
    REWARDMAP_STAGES,
    CurriculumSampler,
    DynamicSamplingBuffer,
    PerformanceGatedCurriculumSampler,
    VarianceAwareSampler,
    dynamic_group_filter,
    stages_from_labels,
)

LABELS = ["planning", "TorF1", "Counting1", "TorF2", "Counting3", "planning", "Counting2", "TorF1"]


# ------------------------------------------------------------------------------------------------ curriculum


def test_stages_from_labels_rewardmap_order():
    # stage 1: TorF1 + TorF2 = {1, 3, 7}; 2: Counting2/3 = {4, 6}; 3: Counting1 = {2}; 4: planning = {0, 5}
    assert stages_from_labels(LABELS, REWARDMAP_STAGES) == [[1, 3, 7], [4, 6], [2], [0, 5]]
    with pytest.raises(ValueError, match="sample 1 has label 'Other'"):
        stages_from_labels(["TorF1", "Other"], REWARDMAP_STAGES)
    with pytest.raises(ValueError, match="in stages 0 and 1"):
        stages_from_labels(["a"], [["a"], ["a"]])


def test_curriculum_fixed_stage_order_shuffled_within():
    s = CurriculumSampler.from_labels(LABELS, seed=3)
    order = list(s)
    assert len(order) == len(s) == 8
    assert (
        set(order[:3]) == {1, 3, 7}
        and set(order[3:5]) == {4, 6}
        and order[5] == 2
        and set(order[6:]) == {0, 5}
    )
    # shuffled within stages: some seed changes the order inside stage 1, never across stages
    orders = {tuple(CurriculumSampler.from_labels(LABELS, seed=k))[:3] for k in range(8)}
    assert len(orders) > 1
    assert list(CurriculumSampler([[5, 6, 7], [1, 2]], shuffle_within=False)) == [5, 6, 7, 1, 2]
    # iterating twice in one epoch gives the same order; set_epoch reshuffles within stages
    assert list(s) == order
    s.set_epoch(1)
    assert {*list(s)[:3]} == {1, 3, 7}


def test_curriculum_resume():
    s = CurriculumSampler([[0, 1, 2, 3], [4, 5, 6]], seed=1)
    full = list(s)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    s2 = CurriculumSampler([[0, 1, 2, 3], [4, 5, 6]], seed=99)
    s2.load_state_dict(state)
    assert head + list(s2) == full


def test_gated_curriculum_advances_on_stage_reward():
    s = PerformanceGatedCurriculumSampler(
        [[0, 1], [2, 3], [4]], num_samples=12, threshold=0.5, window=2, seed=0
    )
    it = iter(s)
    first = [next(it), next(it)]
    assert set(first) == {0, 1}
    # rewards of other stages' samples do not count; one reward is under min_samples (= window = 2)
    assert not s.update([2, 3], [1.0, 1.0])
    assert not s.update([0], [1.0])
    # mean of [1.0, 0.0] = 0.5 >= 0.5 -> next stage
    assert s.update([1], [0.0]) and s.stage == 1
    nxt = [next(it), next(it)]
    assert set(nxt) == {2, 3}
    # failing stage keeps reshuffling the same stage
    s.update([2, 3], [0.0, 0.0])
    assert {next(it), next(it)} == {2, 3} and s.stage == 1
    # resume: the state reproduces the rest of the stream
    state = s.state_dict()
    rest = list(it)
    s2 = PerformanceGatedCurriculumSampler([[0, 1], [2, 3], [4]], num_samples=12, threshold=0.5, window=2)
    s2.load_state_dict(state)
    assert list(s2) == rest and len(first + nxt) + 2 + len(rest) == 12


def test_gated_curriculum_max_passes():
    s = PerformanceGatedCurriculumSampler([[0, 1], [2]], num_samples=6, threshold=2.0, max_passes=2)
    # stage 0 twice (4 draws), then stage 1 until 6 draws in total
    out = list(s)
    assert sorted(out[:4]) == [0, 0, 1, 1] and out[4:] == [2, 2]
    with pytest.raises(ValueError, match="finite"):
        s.update([0], [float("nan")])


# ------------------------------------------------------------------------------------------------ VAS


def test_vas_batch_composition_lambda_half():
    # lambda = 0.5, B = 8: floor(4) weighted draws (even positions) + 4 uniform (odd positions)
    # all weight on prompt 3 -> every weighted draw is 3; the uniform part walks one fixed permutation
    w = torch.zeros(10)
    w[3] = 1.0
    s = VarianceAwareSampler(10, 8, mix_ratio=0.5, weights=w, num_batches=3, seed=0)
    perm = s.state_dict()["perm"].tolist()
    batches = list(s)
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)
    assert all(b[0::2] == [3, 3, 3, 3] for b in batches)
    uniform = [i for b in batches for i in b[1::2]]
    # 12 sequential draws over a 10-prompt permutation: wraps around without reshuffling
    assert uniform == perm + perm[:2]
    # B = 7: floor(3.5) = 3 weighted + 4 uniform: w, r, w, r, w, r, r
    s7 = VarianceAwareSampler(10, 7, weights=w, num_batches=1)
    perm7 = s7.state_dict()["perm"].tolist()
    (b7,) = list(s7)
    assert [b7[i] for i in (0, 2, 4)] == [3, 3, 3] and [b7[i] for i in (1, 3, 5, 6)] == perm7[:4]
    assert s7.weighted_per_batch == 3


def test_vas_refresh_schedule_and_normalisation():
    calls = []

    def refresh():
        calls.append(len(calls))
        v = torch.zeros(6)
        v[len(calls)] = 5.0  # raw VPS; min-max puts weight 1 on prompt 1, then 2, then 3
        if len(calls) == 3:
            v[0] = 1.0  # min-max: (1 - 0) / (5 - 0 + 1e-8) = 0.2
        return v

    s = VarianceAwareSampler(6, 4, mix_ratio=1.0, update_every=3, refresh_fn=refresh, num_batches=7)
    batches = list(s)
    # refreshed before batches 0, 3 and 6
    assert len(calls) == 3
    assert set(batches[0]) == set(batches[2]) == {1} and set(batches[3]) == {2} and set(batches[6]) <= {0, 3}
    torch.testing.assert_close(
        s.weights, torch.tensor([0.2, 0, 0, 1, 0, 0], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_vas_uniform_fallback_and_validation():
    s = VarianceAwareSampler(5, 4, weights=torch.zeros(5), num_batches=2)
    assert all(len(b) == 4 for b in s)
    with pytest.raises(ValueError, match=r"weights must have shape \[5\]"):
        VarianceAwareSampler(5, 4, weights=torch.ones(4))
    with pytest.raises(ValueError, match="mix_ratio"):
        VarianceAwareSampler(5, 4, mix_ratio=1.5)
    with pytest.raises(ValueError, match=r"refresh_fn\(\) must return shape \[5\]"):
        next(iter(VarianceAwareSampler(5, 4, refresh_fn=lambda: torch.ones(3))))


def test_vas_resume_is_exact():
    def make():
        return VarianceAwareSampler(
            20, 6, update_every=2, refresh_fn=lambda: torch.arange(20.0) % 7, num_batches=8, seed=5
        )

    ref = list(make())
    s = make()
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    s2 = make()
    s2.load_state_dict(state)
    assert head + list(s2) == ref


# ------------------------------------------------------------------------------------------------ DAPO


def test_dynamic_group_filter_all_equal_groups():
    # groups: [1,1,1,1] all equal -> dropped; [1,0,1,0] kept; [0,0,0,0] dropped
    r = torch.tensor([1.0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    res = dynamic_group_filter(r, 4)
    assert res.kept_groups.tolist() == [False, True, False]
    assert res.keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert (res.num_kept, res.num_dropped) == (1, 2)
    # 0.1 + 0.2 style floats that are equal still count as equal; size-1 groups carry no signal
    res = dynamic_group_filter(torch.tensor([0.1, 0.1, 0.1, 0.3]), group_ids=torch.tensor([0, 0, 0, 1]))
    assert res.kept_groups.tolist() == [False, False]


def test_dynamic_sampling_buffer_oversample_and_truncate():
    buf = DynamicSamplingBuffer(target_groups=3, max_num_gen_batches=4)
    batches = [
        torch.tensor([1.0, 1, 0, 1, 0, 0]),  # groups of 2: [1,1] drop, [0,1] keep, [0,0] drop
        torch.tensor([1.0, 0, 1, 1, 0, 0]),  # keep, drop, drop
        torch.tensor([0.0, 1, 1, 0, 0, 1]),  # three more kept; only one is needed
    ]
    n = 0
    while buf.need_more:
        r = batches[n]
        buf.add(r, 2, fields={"ids": torch.arange(6) + 10 * n, "text": [f"{n}-{i}" for i in range(6)]})
        n += 1
    assert n == 3 and buf.num_dropped == 4 and buf.num_groups == 5
    out = buf.take()
    # kept in arrival order: batch 0 group 1, batch 1 group 0, batch 2 group 0; truncated to 3 groups x 2
    assert out["ids"].tolist() == [2, 3, 10, 11, 20, 21]
    assert out["text"] == ["0-2", "0-3", "1-0", "1-1", "2-0", "2-1"]
    assert out["rewards"].tolist() == [0.0, 1, 1, 0, 0, 1]
    assert buf.num_groups == 0  # reset after take


def test_dynamic_sampling_buffer_gives_up():
    buf = DynamicSamplingBuffer(target_groups=2, max_num_gen_batches=2)
    for _ in range(2):
        buf.add(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert (
        buf.num_groups == 2 and not buf.need_more and buf.take()["rewards"].tolist() == [0.0, 1.0, 0.0, 1.0]
    )
    buf = DynamicSamplingBuffer(target_groups=5, max_num_gen_batches=2)
    buf.add(torch.ones(4), 2)
    buf.add(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    assert not buf.need_more
    with pytest.raises(RuntimeError, match="kept 1 of 5 groups after 2 generation batches"):
        buf.take()
    assert buf.take(allow_partial=True)["rewards"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="field 'x' has length 3"):
        DynamicSamplingBuffer(1).add(torch.ones(4), 2, fields={"x": [1, 2, 3]})


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 5), g=st.integers(1, 5), data=st.data())
def test_property_filter_permutation(k, g, data):
    n = k * g
    r = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n)))
    res = dynamic_group_filter(r, k)
    perm = torch.cat([torch.randperm(k) + i * k for i in range(g)])
    res2 = dynamic_group_filter(r[perm], k)
    assert torch.equal(res2.keep, res.keep[perm]) and res.num_kept + res.num_dropped == g
    for i in range(g):
        grp = r[i * k : (i + 1) * k]
        assert bool(res.kept_groups[i]) == bool((grp != grp[0]).any())

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
    PromptStream,
    StepFeedback,
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


def _ovs(acc):
    p = acc.double().mean(1)
    return p * (1 - p)


def test_vas_batch_composition_lambda_half():
    # lambda = 0.5, B = 8: floor(4) weighted draws (even positions) + 4 uniform (odd positions)
    # all weight on prompt 3 -> every weighted draw is 3; the uniform part walks one fixed permutation
    s = VarianceAwareSampler(10, 8, mix_ratio=0.5, num_batches=3, seed=0)
    s.set_scores(list(range(10)), torch.tensor([0.0] * 3 + [1.0] + [0.0] * 6))
    perm = s.state_dict()["perm"].tolist()
    batches = list(s)
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)
    assert all(b[0::2] == [3, 3, 3, 3] for b in batches)
    uniform = [i for b in batches for i in b[1::2]]
    # 12 sequential draws over a 10-prompt permutation: wraps around without reshuffling
    assert uniform == perm + perm[:2]
    # B = 7: floor(3.5) = 3 weighted + 4 uniform: w, r, w, r, w, r, r
    s7 = VarianceAwareSampler(10, 7, num_batches=1)
    s7.set_scores(list(range(10)), torch.tensor([0.0] * 3 + [1.0] + [0.0] * 6))
    perm7 = s7.state_dict()["perm"].tolist()
    (b7,) = list(s7)
    assert [b7[i] for i in (0, 2, 4)] == [3, 3, 3] and [b7[i] for i in (1, 3, 5, 6)] == perm7[:4]
    assert s7.weighted_per_batch == 3


def test_vas_weights_minmax_unknown_and_momentum():
    s = VarianceAwareSampler(5, 2, unknown_weight=0.5, momentum=0.5)
    torch.testing.assert_close(s.weights, torch.ones(5, dtype=torch.float64))  # nothing known: uniform
    s.set_scores([0, 1, 2], torch.tensor([0.1, 0.25, 0.2]))
    # min-max over the known: (v - 0.1) / (0.15 + 1e-8) -> 0, 1, 0.6667; unknown prompts weigh 0.5
    want = torch.tensor([0.0, 0.15 / (0.15 + 1e-8), 0.1 / (0.15 + 1e-8), 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(s.weights, want)
    # momentum 0.5 on a known prompt: 0.5 * 0.1 + 0.5 * 0.3 = 0.2; a first estimate is taken as is
    s.set_scores([0, 3], torch.tensor([0.3, 0.05]))
    torch.testing.assert_close(s.estimates[[0, 3]], torch.tensor([0.2, 0.05], dtype=torch.float64))
    assert torch.isnan(s.estimates[4])


def test_vas_learns_from_the_training_rollouts():
    """Each observed group is a fresh estimate of its prompt: the outcome variance p(1 - p) of the accuracies."""
    s = VarianceAwareSampler(6, 2, update_every=100)
    acc = torch.tensor([[1.0, 0, 1, 0], [1.0, 1, 1, 1]])
    assert s.metrics() == {}  # nothing observed yet
    PromptStream(s).observe([4, 1], torch.zeros(2), accuracy=acc, completion_ids=[[[1]] * 4] * 2)
    metrics = s.metrics()
    # p = 0.5 -> 0.25; p = 1 -> 0; the second group has no variance
    torch.testing.assert_close(s.estimates[[4, 1]], torch.tensor([0.25, 0.0], dtype=torch.float64))
    assert metrics["vas/zero_var_groups"] == 0.5 and metrics["vas/known"] == pytest.approx(2 / 6)
    assert metrics["vas/rescored"] == 0 and metrics["time/vas_rescore"] == 0.0
    # a score function of the accuracies and the completions (MMR1's VPS) gets both
    seen = []
    s2 = VarianceAwareSampler(6, 2, score_fn=lambda a, r: seen.append(r) or a.sum(1).double())
    s2.observe(StepFeedback([0, 2], torch.zeros(2), acc, [["x"], ["y"]]))
    assert seen == [[["x"], ["y"]]] and s2.estimates[[0, 2]].tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match=r"needs the accuracy"):
        s.observe(StepFeedback([0], torch.zeros(1)))
    with pytest.raises(ValueError, match=r"one row per prompt"):
        s.observe(StepFeedback([0], torch.zeros(1), torch.ones(2, 4)))


def test_vas_rescores_only_missing_or_stale_prompts_on_a_budget():
    calls = []

    def rescore(indices):
        calls.append(list(indices))
        return torch.tensor([[1.0, 0.0]] * len(indices)), None  # p = 0.5 -> 0.25 each

    n = 10
    s = VarianceAwareSampler(
        n, 2, update_every=3, rescore_fn=rescore, rescore_budget=4, stale_after=5, seed=1
    )
    perm = s.state_dict()["perm"].tolist()
    s.next_batch()  # batch 0: nothing known -> the 4 prompts the uniform part reaches last
    assert calls == [perm[::-1][:4]]
    s.observe(StepFeedback([perm[0]], torch.zeros(1), torch.tensor([[1.0, 1.0]])))
    assert s.metrics()["vas/rescored"] == 4 and s.metrics()["time/vas_rescore"] > 0
    s.observe(StepFeedback([perm[0]], torch.zeros(1), torch.ones(1, 2)))
    assert s.metrics()["vas/rescored"] == 0
    # batches 1, 2: no refresh; the training rollouts keep estimating what they sample
    seen = set(calls[0]) | {perm[0]}
    for _ in range(2):
        batch = s.next_batch()
        s.observe(StepFeedback(batch, torch.zeros(2), torch.tensor([[1.0, 0.0]] * 2)))
        seen |= set(batch)
    assert len(calls) == 1
    s.next_batch()  # batch 3: the missing prompts first, never one already estimated
    missing = [i for i in perm[::-1] if i not in seen]
    assert calls[1] == missing[:4] and not set(calls[1]) & seen
    # batch 6: stale now means made at batch <= 1 (6 - 5): the oldest first (batch 0, then 1), then missing ones
    for _ in range(2):
        s.next_batch()
    s.next_batch()
    made = s.state_dict()["made"]
    assert all(int(made[i]) == 6 for i in calls[2])
    # without a budget, the first refresh scores the whole dataset (the paper's start)
    calls.clear()
    full = VarianceAwareSampler(n, 2, rescore_fn=rescore)
    full.next_batch()
    assert sorted(calls[0]) == list(range(n)) and not torch.isnan(full.estimates).any()


def test_vas_rescoring_order_by_age():
    s = VarianceAwareSampler(4, 1, update_every=1, stale_after=2)
    s.set_scores([2], torch.tensor([0.1]))  # made at batch 0
    s.next_batch()
    s.set_scores([0], torch.tensor([0.1]))  # made at batch 1
    s.next_batch()
    s.set_scores([3], torch.tensor([0.1]))  # made at batch 2
    s.next_batch()
    s.next_batch()
    # at batch 4: prompt 1 missing first, then stale (age >= 2) oldest first: 2 (made 0), 0 (made 1), 3 (made 2)
    assert s.due_for_rescoring() == [1, 2, 0, 3]


def test_vas_validation():
    with pytest.raises(ValueError, match="mix_ratio"):
        VarianceAwareSampler(5, 4, mix_ratio=1.5)
    with pytest.raises(ValueError, match="rescore_budget"):
        VarianceAwareSampler(5, 4, rescore_budget=-1)
    with pytest.raises(ValueError, match="unknown_weight"):
        VarianceAwareSampler(5, 4, unknown_weight=2.0)
    with pytest.raises(ValueError, match=r"scores must have shape \[2\]"):
        VarianceAwareSampler(5, 4).set_scores([0, 1], torch.ones(3))
    with pytest.raises(ValueError, match="outside the dataset"):
        VarianceAwareSampler(5, 4).set_scores([7], torch.ones(1))
    with pytest.raises(ValueError, match="scores.*finite"):
        VarianceAwareSampler(5, 4).set_scores([1], torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="predates online estimates"):
        VarianceAwareSampler(5, 4).load_state_dict({"weights": None})


def test_vas_resume_is_exact():
    def make():
        def rescore(idx):
            return torch.tensor([[float(i % 2), float(i % 3 == 0)] for i in idx]), None

        return VarianceAwareSampler(20, 6, update_every=2, rescore_fn=rescore, rescore_budget=3, num_batches=8,
                                    seed=5)  # fmt: skip

    def run(s, k):
        out = []
        for _ in range(k):
            b = s.next_batch()
            s.observe(StepFeedback(b, torch.zeros(6), torch.tensor([[float(i % 4 == 0), 1.0] for i in b])))
            out.append(b)
        return out

    ref_s = make()
    ref = run(ref_s, 8)
    s = make()
    head = run(s, 3)
    state = s.state_dict()
    s2 = make()
    s2.load_state_dict(state)
    assert head + run(s2, 5) == ref
    assert torch.equal(s2.estimates.nan_to_num(-1), ref_s.estimates.nan_to_num(-1))


def test_prompt_stream_feedback_to_each_kind_of_sampler():
    gated = PerformanceGatedCurriculumSampler([[0, 1], [2, 3]], 100, threshold=0.5, window=2, min_samples=2)
    stream = PromptStream(gated)
    stream.observe(
        [0, 1], torch.tensor([1.0, 1.0]), accuracy=torch.ones(2, 2)
    )  # update(indices, rewards) only
    assert gated.stage == 1
    PromptStream(CurriculumSampler([[0, 1]])).observe(
        [0], torch.zeros(1), accuracy=torch.ones(1, 2)
    )  # no hook


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

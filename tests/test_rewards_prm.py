"""fastgrpo.rewards.prm: hybrid reward, backprop, step advantages, verifier, PRM score, greedy search."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgrpo.rewards.prm import (
    ArithmeticStepVerifier,
    PRMNode,
    StepVerifier,
    backpropagate,
    generative_prm_scorer,
    hf_step_proposer,
    hybrid_rollout_reward,
    hybrid_rollout_weights,
    prm_greedy_search,
    prm_score_from_top_logprobs,
    split_steps,
    step_index,
    step_token_advantages,
    uct_score,
)


def test_hybrid_rollout_weights_and_reward_hand_computed():
    # N = 4: (N - i) / N^2 = 4/16, 3/16, 2/16, 1/16 = .25, .1875, .125, .0625; F weight 1/N = .25
    w, wf = hybrid_rollout_weights(4)
    assert w == [0.25, 0.1875, 0.125, 0.0625] and wf == 0.25
    # v = [+1, +1, -1, +1], F = +1: .25 + .1875 - .125 + .0625 + .25 = 0.625
    assert hybrid_rollout_reward([1, 1, -1, 1], 1) == pytest.approx(0.625)
    # all checks and the outcome negative: -(.25 + .1875 + .125 + .0625 + .25) = -0.875
    assert hybrid_rollout_reward(torch.tensor([-1.0, -1.0, -1.0, -1.0]), -1) == pytest.approx(-0.875)
    assert hybrid_rollout_reward([], -1) == -1.0  # N = 0 -> u = F
    # N = 1: weights [1], F 1 -> u = v0 + F
    assert hybrid_rollout_reward([1], -1) == 0.0
    with pytest.raises(ValueError, match="finite"):
        hybrid_rollout_reward([float("nan")], 1)


def test_backpropagate_and_uct():
    root = PRMNode()
    a = root.add_child()
    b = a.add_child()
    backpropagate(b, 1.0)
    # b += 1; a += 0.9 (d = 1), visits +1; root += 0.81 (d = 2), visits +1
    assert (b.value, b.visits) == (1.0, 0)
    assert a.value == pytest.approx(0.9) and a.visits == 1
    assert root.value == pytest.approx(0.81) and root.visits == 1
    backpropagate(a, -0.5, gamma=0.5)
    assert a.value == pytest.approx(0.4) and root.value == pytest.approx(0.81 - 0.25)
    # UCT: +value + c sqrt(ln(N_parent + 1) / (N_child + 1)) = 0.4 + 1.8 sqrt(ln 3 / 2)
    assert uct_score(a, 2) == pytest.approx(0.4 + 1.8 * math.sqrt(math.log(3) / 2))
    assert uct_score(a, 2, positive=False) == pytest.approx(-0.4 + 1.8 * math.sqrt(math.log(3) / 2))


def test_split_steps_and_step_index():
    assert split_steps("a\n\nb\n\n\n\nc\n") == ["a", "b", "c"]
    S = 99
    ids = torch.tensor([[1, S, 2, 3, S, 4, 0], [5, 6, 7, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    # a separator closes its step: [0, 0 | 1, 1, 1 | 2], padding -1
    assert step_index(ids, [S], mask=mask).tolist() == [[0, 0, 1, 1, 1, 2, -1], [0, 0, 0, -1, -1, -1, -1]]
    # a two-token separator
    ids2 = torch.tensor([[1, 8, 9, 2, 8, 3]])
    assert step_index(ids2, [8, 9]).tolist() == [[0, 0, 0, 1, 1, 1]]


def test_step_token_advantages_hand_computed():
    token_step = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 0, -1, -1]])
    # one group of two completions; step scores [[1, 0], [1]] -> pooled [1, 0, 1]:
    # mean 2/3, unbiased std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3) = 0.5773503
    s = math.sqrt(1 / 3) + 1e-4
    hi, lo = (1 / 3) / s, -(2 / 3) / s  # 0.5773, -1.1545
    a = step_token_advantages([[1.0, 0.0], [1.0]], token_step, group_size=2)
    torch.testing.assert_close(a, torch.tensor([[hi, hi, lo, lo, 0.0], [hi, hi, hi, 0.0, 0.0]]))
    # to_go: step 0 of completion 0 gets hi + lo
    a = step_token_advantages([[1.0, 0.0], [1.0]], token_step, group_size=2, mode="to_go")
    torch.testing.assert_close(a, torch.tensor([[hi + lo, hi + lo, lo, lo, 0.0], [hi, hi, hi, 0.0, 0.0]]))
    # combined with the outcome advantage: A = 1.0 * A_out + 0.5 * A_proc on valid tokens only
    a = step_token_advantages(
        torch.tensor([[1.0, 0.0], [1.0, float("nan")]]),
        token_step,
        group_size=2,
        outcome_advantages=torch.tensor([0.7, -0.7]),
        process_weight=0.5,
    )
    want = torch.tensor([[0.7 + hi / 2] * 2 + [0.7 + lo / 2] * 2 + [0.0], [-0.7 + hi / 2] * 3 + [0.0, 0.0]])
    torch.testing.assert_close(a, want)


def test_step_token_advantages_bad_inputs():
    ts = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="step 2 but step_rewards gives it 2 scores"):
        step_token_advantages([[1.0, 0.0]], ts, group_size=1)
    with pytest.raises(ValueError, match="mode"):
        step_token_advantages([[1.0, 0.0, 1.0]], ts, group_size=1, mode="sum")
    with pytest.raises(ValueError, match="step_rewards.*finite"):
        step_token_advantages([[1.0, float("inf"), 1.0]], ts, group_size=1)
    with pytest.raises(ValueError, match="one per completion"):
        step_token_advantages([[1.0]], torch.zeros(2, 3, dtype=torch.long), group_size=1)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 4), data=st.data())
def test_property_step_advantages_permutation(k, data):
    steps = [data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=1, max_size=3)) for _ in range(k)]
    T = 6
    token_step = torch.full((k, T), -1)
    for b, sc in enumerate(steps):
        n = len(sc)
        token_step[b, : 2 * n] = torch.arange(n).repeat_interleave(2)
    a = step_token_advantages(steps, token_step, group_size=k)
    assert a.shape == (k, T) and a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    assert bool((a[token_step < 0] == 0).all())
    perm = torch.randperm(k)
    b = step_token_advantages([steps[i] for i in perm.tolist()], token_step[perm], group_size=k)
    torch.testing.assert_close(b, a[perm])
    if all(x == steps[0][0] for sc in steps for x in sc):  # no spread -> no process signal
        assert bool((a == 0).all())


@pytest.mark.parametrize(
    "step, verdict",
    [
        ("So 3 + 4 × 2 = 11.", 1),
        ("Then 2*3 = 7", -1),
        ("We get 1/3 = 0.33 approximately", 1),  # rounding to the written decimals
        ("1/3 = 0.3", 1),
        ("1/3 = 0.31", -1),
        ("$\\frac{1}{2} + 1 = 1.5$", 1),
        ("2+2 = 4 = 5", -1),  # every link of a chain is checked
        ("(2 + 3) \\times 4 = 20 and 10 / 4 = 2.5", 1),
        ("Let x be the unknown.", 0),
        ("__import__('os').system('x') = 1", 0),  # nothing outside the arithmetic whitelist is evaluated
        ("1,000 + 1 = 1,001", 1),
        ("2^10 = 1024", 1),
    ],
)
def test_arithmetic_step_verifier(step, verdict):
    pytest.importorskip("sympy")
    v = ArithmeticStepVerifier()
    assert isinstance(v, StepVerifier)
    assert v(step) == verdict


def test_prm_score_from_top_logprobs():
    L = math.log
    pos = [{"Right": L(0.9), "x": L(0.1)}, {" Right": L(0.6), "Wrong": L(0.2), "y": L(0.2)}, {"z": L(1.0)}]
    # the last position holding a label is the second: 0.6 / (0.6 + 0.2) = 0.75
    assert prm_score_from_top_logprobs(pos) == pytest.approx(0.75)
    # a missing label takes the smallest top-k probability: Right 0.9, Wrong -> 0.1 -> 0.9
    assert prm_score_from_top_logprobs(pos[:1]) == pytest.approx(0.9)
    assert prm_score_from_top_logprobs([{"z": 0.0}]) == 0.5
    assert prm_score_from_top_logprobs([{"+": L(0.3), "-": L(0.6)}], right="+", wrong="-") == pytest.approx(
        1 / 3
    )


def test_greedy_search_picks_best_and_stops():
    calls = []

    def propose(q, steps, n):
        calls.append((q, list(steps), n))
        i = len(steps)
        if i < 2:
            return [f"step{i}-bad", f"step{i}-good", f"step{i}-good", ""]
        return ["final \\boxed{4}<eos>", "final \\boxed{5}"]

    def score(q, steps, cand):
        return 0.9 if ("good" in cand or "4" in cand) else 0.1

    res = prm_greedy_search("q", propose, score, eos="<eos>")
    assert res.steps == ["step0-good", "step1-good", "final \\boxed{4}<eos>"]
    assert res.scores == [0.9, 0.9, 0.9] and res.finished
    assert calls[1] == ("q", ["step0-good"], 8)
    # max_iter reached without a final step
    res = prm_greedy_search("q", lambda q, s, n: ["again"], score, max_iter=3)
    assert res.steps == ["again"] * 3 and not res.finished
    # a StepVerifier as the scorer; random tie-break is reproducible with an rng
    res = prm_greedy_search(
        "q",
        lambda q, s, n: ["1 + 1 = 3", "1 + 1 = 2 so \\boxed{2}"],
        ArithmeticStepVerifier(),
        rng=random.Random(1),
    )
    assert res.steps == ["1 + 1 = 2 so \\boxed{2}"] and res.finished


class _Tok:
    """Character-level fake tokenizer: id = ord(char)."""

    eos_token, pad_token = "$", "#"

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def batch_decode(self, seqs, skip_special_tokens=False):
        return [self.decode(s.tolist()) for s in seqs]


class _Model:
    device = torch.device("cpu")

    def __init__(self, continuations, scores=None):
        self.continuations, self._scores, self.kwargs = continuations, scores, None

    def generate(self, input_ids, **kwargs):
        self.kwargs = kwargs
        n = kwargs.get("num_return_sequences", 1)
        conts = self.continuations[:n]
        width = max(len(c) for c in conts)
        rows = [input_ids[0].tolist() + [ord(ch) for ch in c.ljust(width, "#")] for c in conts]
        return SimpleNamespace(sequences=torch.tensor(rows), scores=self._scores)


def test_hf_step_proposer_and_generative_scorer_with_fakes():
    tok = _Tok()
    model = _Model(["first step\n\nmore", "done \\boxed{1}$##", "no stop"])
    propose = hf_step_proposer(model, tok, lambda q, s: q + "".join(s))
    assert propose("Q:", [], 3) == ["first step\n\n", "done \\boxed{1}$", "no stop"]
    assert model.kwargs["temperature"] == 0.7 and model.kwargs["max_new_tokens"] == 512
    # generative PRM: vocabulary of ords; put Right ("R") and Wrong ("W") logits at the second position
    V = 128
    s0 = torch.full((1, V), -30.0)
    s0[0, ord("x")] = 0.0
    s1 = torch.full((1, V), -30.0)
    s1[0, ord("R")] = math.log(3.0)
    s1[0, ord("W")] = 0.0
    scorer = generative_prm_scorer(
        _Model(["xR"], scores=[s0, s1]), tok, lambda q, s, c: q + c, right="R", wrong="W"
    )
    # p(R) / (p(R) + p(W)) = 3 / (3 + 1)
    assert scorer("Q", [], "step") == pytest.approx(0.75, abs=1e-6)

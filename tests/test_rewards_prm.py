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
    SEARCH_STATUSES,
    ArithmeticStepVerifier,
    PRMNode,
    StepCandidate,
    StepVerifier,
    backpropagate,
    build_step_verifier,
    generative_prm_scorer,
    grounded_hybrid_reward,
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
from fastgrpo.tasks import ArithmeticTask
from fastgrpo.tiny import tiny_model_and_tokenizer


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
    assert split_steps("a\n\nb\n\n\n\nc\n") == ["a", "b", "c"]  # one step per line (the tasks' format)
    assert split_steps("a\nb\n\nc", sep="\n\n") == ["a\nb", "c"]
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


# ------------------------------------------------------------------------------------------ step checks


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
        ("__import__('os').system('x') = 1", 0),  # nothing outside the arithmetic whitelist is read
        ("1,000 + 1 = 1,001", 1),
        ("2^10 = 1024", 1),
        ("9^9^9 = 1", 0),  # an exponent beyond 64 is not computed (exact arithmetic would not finish)
        ("1/0 = 1", 0),
        ("0.1 + 0.2 = 0.3", 1),  # literals are exact rationals, not floats
        ("<answer>7</answer>", 0),  # truth only: an answer has nothing to check
    ],
)
def test_arithmetic_truth_only(step, verdict):
    v = ArithmeticStepVerifier(grounded=False)
    assert isinstance(v, StepVerifier)
    assert v(step) == verdict


Q3 = "Compute (3 + 4) * 5 - 6. Solve it step by step."


@pytest.mark.parametrize(
    "question, steps, checks",
    [
        # the example: a true line that computes nothing the question asks earns nothing
        ("Compute 8 + 1 + 1.", ["8 + 1 = 9", "9 * 1 = 9", "9 + 1 = 10", "<answer>10</answer>"], [1, 0, 1, 1]),
        # operands of + in any order and grouping; a whole chain in one line
        ("Compute 8 + 1 + 1.", ["1 + 1 = 2", "2 + 8 = 10", "<answer>10</answer>"], [1, 1, 1]),
        ("Compute 8 + 1 + 1.", ["8 + 1 + 1 = 10", "<answer>10</answer>"], [1, 1]),
        # precedence: 4 * 5 is not a sub-expression of (3 + 4) * 5 - 6; a repeated step computes nothing new
        (
            Q3,
            ["4 * 5 = 20", "3 + 4 = 7", "3 + 4 = 7", "7 * 5 = 35", "35 - 6 = 29", "<answer>29</answer>"],
            [0, 1, 0, 1, 1, 1],
        ),  # fmt: skip
        # a premature answer is not rewarded; a contradicting one is wrong
        (Q3, ["3 + 4 = 7", "<answer>7</answer>"], [1, 0]),
        (Q3, ["3 + 4 = 7", "7 * 5 = 35", "35 - 6 = 29", "<answer>30</answer>"], [1, 1, 1, -1]),
        (Q3, ["3 + 4 = 7", "7 * 5 = 35", "35 - 6 = 29", "So the answer is \\boxed{29}."], [1, 1, 1, 1]),
        # a wrong result is never established: the later step is checked against the true value
        (Q3, ["3 + 4 = 8", "8 * 5 = 40", "7 * 5 = 35"], [-1, 0, 1]),
        # minus is not commutative; a negative intermediate result is a number like any other
        (
            "Compute 2 - 5 - 6.",
            ["5 - 2 = 3", "2 - 5 = -3", "-3 - 6 = -9", "<answer>-9</answer>"],
            [0, 1, 1, 1],
        ),
        # an answer and the last equation on one line; prose is neutral
        (
            Q3,
            ["First add: 3 + 4 = 7", "Then 7 * 5 = 35", "Finally 35 - 6 = 29, so <answer>29</answer>"],
            [1, 1, 1],
        ),
        (Q3, ["Let me think."], [0]),
        # a word problem (no expression): operands must be the question's quantities or earlier results
        (
            "Tom has 3 apples and buys 4 more. How many now?",
            ["3 + 4 = 7", "7 * 2 = 14", "The answer is 7"],
            [1, 0, 1],
        ),  # fmt: skip
        ("Tom has 3 apples and buys 4 more. How many now?", ["3 + 4 = 7", "<answer>8</answer>"], [1, -1]),
        ("Tom has 3 apples and buys 4 more. How many now?", ["<answer>7</answer>"], [0]),
    ],
)
def test_grounded_checks(question, steps, checks):
    v = ArithmeticStepVerifier()
    assert v.check_path(question, steps) == checks
    # one step at a time, each given the question and the steps before it, agrees with the one-pass walk
    assert [v(s, question=question, previous_steps=steps[:j]) for j, s in enumerate(steps)] == checks


def test_grounded_checks_need_the_question():
    with pytest.raises(ValueError, match="pass question="):
        ArithmeticStepVerifier()("1 + 1 = 2")
    assert build_step_verifier("arithmetic", grounded=False)("1 + 1 = 2") == 1
    with pytest.raises(ValueError, match="unknown step verifier"):
        build_step_verifier("wolfram")


def test_finishing_is_never_worse_than_stalling():
    """On every prefix of the gold solution of a task question, the correct answer line scores at least as well as
    any other line once the expression is computed, and a true line that computes nothing scores below it."""
    task = ArithmeticTask(num_ops=3)
    rng = random.Random(0)
    v = ArithmeticStepVerifier()
    for _ in range(25):
        ex = task.make(rng)
        gold = ex.meta["steps"]
        answer = f"<answer>{ex.answer}</answer>"
        assert v.check_path(ex.question, [*gold, answer]) == [1] * (len(gold) + 1)
        stall = f"{ex.answer} * 1 = {ex.answer}"  # true, and its operands are known numbers
        assert v(answer, question=ex.question, previous_steps=gold) == 1
        assert v(stall, question=ex.question, previous_steps=gold) == 0


def test_grounded_hybrid_reward_hand_computed():
    # checks [1, 1, 1, x]: the last (answer) check is replaced by F; N = 3 -> 3/9 + 2/9 + 1/9 + F/3
    steps = ["3 + 4 = 7", "7 * 5 = 35", "35 - 6 = 29", "<answer>29</answer>"]
    assert grounded_hybrid_reward(Q3, steps, 1.0) == pytest.approx(6 / 9 + 1 / 3)
    # an ungrounded line inserted: checks [1, 0, 1, 1, x], N = 4 -> 4/16 + 0 + 2/16 + 1/16 - 1/4 = 3/16
    steps.insert(1, "2 * 2 = 4")
    assert grounded_hybrid_reward(Q3, steps, -1.0) == pytest.approx(3 / 16)
    with pytest.raises(ValueError, match="steps is empty"):
        grounded_hybrid_reward(Q3, [], 1.0)


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


# ------------------------------------------------------------------------------------------------ search

Q2 = "Compute 8 + 1 + 1. Solve it step by step."


def _scripted(script):
    """A proposer that returns ``script[len(steps)]`` and records its calls."""
    calls = []

    def propose(q, steps, n):
        calls.append((q, list(steps), n))
        return list(script[min(len(steps), len(script) - 1)])

    return propose, calls


def test_search_prefers_grounded_steps_and_finishes():
    # the ungrounded true line is proposed more often (the model's favourite) at every step
    script = [
        ["9 * 1 = 9", "9 * 1 = 9", "9 * 1 = 9", "8 + 1 = 9", "8 + 1 = 10"],
        ["9 * 1 = 9", "9 * 1 = 9", "9 + 1 = 10", "<answer>9</answer>"],
        ["10 * 1 = 10", "10 * 1 = 10", "10 + 0 = 10", StepCandidate("<answer>10</answer>", ended=True)],
    ]
    propose, calls = _scripted(script)
    res = prm_greedy_search(Q2, propose, ArithmeticStepVerifier())
    assert res.steps == ["8 + 1 = 9", "9 + 1 = 10", "<answer>10</answer>"]
    assert res.checks == [1, 1, 1] and res.status == "answered" and res.finished and res.answer == "10"
    assert res.model_calls == 3 and calls[1] == (Q2, ["8 + 1 = 9"], 8)
    # checking truth only, the favourite true-but-irrelevant line wins and the search never finishes
    res = prm_greedy_search(Q2, _scripted(script)[0], ArithmeticStepVerifier(grounded=False), max_iter=5)
    assert res.steps[0] == "9 * 1 = 9" and not res.finished


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_property_search_never_prefers_ungrounded_true_steps(data):
    """Scripted proposals drawn from the gold line, true-but-ungrounded lines, wrong lines and the answer (at any
    multiplicity): a grounded line is always chosen over ungrounded and wrong ones, and
    the search finishes with the right answer."""
    task = ArithmeticTask(num_ops=data.draw(st.integers(1, 3)))
    ex = task.make(random.Random(data.draw(st.integers(0, 10_000))))
    gold, v = ex.meta["steps"], ArithmeticStepVerifier()
    answer = f"<answer>{ex.answer}</answer>"
    value = int(ex.answer)

    def propose(q, steps, n):
        k = len(steps)
        noise = [f"{value} * 1 = {value}", f"{value + 1} - 1 = {value}", f"{k} + {k} = {2 * k + 1}", "ok"]
        pool = data.draw(st.lists(st.sampled_from(noise), max_size=6))
        right = gold[k] if k < len(gold) else answer
        return data.draw(st.permutations([*pool, right, answer]))

    res = prm_greedy_search(ex.question, propose, v, num_candidates=4, max_iter=len(gold) + 2)
    # a grounded line (+1) was proposed at every step, so no ungrounded (0) or wrong (-1) line was chosen
    assert res.checks == [1] * (len(gold) + 1) and len(res.steps) == len(gold) + 1
    assert res.status == "answered" and res.answer == ex.answer


def test_search_statuses_budget_and_blank_candidates():
    v = ArithmeticStepVerifier()
    # nothing usable: every candidate blank or filtered out -> a clear result, not a silent stop
    res = prm_greedy_search(Q2, lambda q, s, n: ["", "  ", "\n"], v)
    assert res.status == "no_candidates" and res.steps == [] and not res.finished and res.model_calls == 1
    res = prm_greedy_search(Q2, lambda q, s, n: ["8 + 1 = 9"], v, candidate_filter=lambda c: "+" not in c)
    assert res.status == "no_candidates"
    # token budget: 3 candidates of 10 tokens per call -> 30 per call; 50 allows two calls
    tok = lambda q, s, n: [StepCandidate(f"8 + {i} = {8 + i}", tokens=10) for i in range(3)]  # noqa: E731
    res = prm_greedy_search(Q2, tok, v, token_budget=50)
    assert res.status == "token_budget" and res.model_calls == 2 and res.tokens == 60
    # a step after which the model ended its turn without an answer does not stop the search
    script = [[StepCandidate("8 + 1 + 1 = 10", ended=True)], ["<answer>10</answer>"]]
    res = prm_greedy_search(Q2, _scripted(script)[0], v)
    assert (
        res.status == "answered" and res.finished and res.steps == ["8 + 1 + 1 = 10", "<answer>10</answer>"]
    )
    # max_iter: unfinished
    res = prm_greedy_search(Q2, lambda q, s, n: ["Hmm."], v, max_iter=3)
    assert res.status == "max_iter" and res.steps == ["Hmm."] * 3 and res.text() == "Hmm.\nHmm.\nHmm."
    assert SEARCH_STATUSES == ("answered", "max_iter", "token_budget", "no_candidates") and not res.finished
    with pytest.raises(ValueError, match="num_candidates"):
        prm_greedy_search(Q2, tok, v, num_candidates=0)


def test_search_hybrid_score_with_an_outcome():
    """A value/outcome estimate is fused as GroundedPRM's hybrid reward: a final candidate's check is replaced by
    the outcome F, a partial one keeps its check and adds the estimate V."""
    v = ArithmeticStepVerifier()
    q = "Tom has 3 apples, buys 4 more, then 2 more. How many now?"
    script = [["3 + 4 = 7"], ["7 + 2 = 9"], ["<answer>7</answer>", "<answer>9</answer>"]]
    # both answers state an established value (+1 each): only the outcome tells them apart
    assert [v(a, question=q, previous_steps=["3 + 4 = 7", "7 + 2 = 9"]) for a in script[2]] == [1, 1]

    def outcome(qq, steps):
        return (1.0 if "9<" in steps[-1] else -1.0) if "<answer>" in steps[-1] else None

    for seed in range(4):
        res = prm_greedy_search(q, _scripted(script)[0], v, value=outcome, rng=random.Random(seed))
        assert res.steps == ["3 + 4 = 7", "7 + 2 = 9", "<answer>9</answer>"] and res.answer == "9"
        # no estimate for partial paths: u = hybrid(prev, v): 1, then 1 * 1 + 1 / 1 = 2;
        # the final step's check replaced by F = +1: hybrid([1, 1], 1) = 2/4 + 1/4 + 1/2 = 1.25
        assert res.scores == [1.0, 2.0, 1.25] and res.checks == [1, 1, 1]
    # a value estimate of a partial path breaks the tie between two +1 steps: hybrid([v], V) = v + V
    propose2 = lambda qq, s, n: ["3 + 4 = 7", "4 + 3 = 7"]  # noqa: E731
    res = prm_greedy_search(q, propose2, v, value=lambda qq, st_: 0.5 if st_[-1].startswith("4") else -0.5,
                            max_iter=1)  # fmt: skip
    assert res.steps == ["4 + 3 = 7"] and res.scores == [pytest.approx(1.5)]
    # a generative-PRM-style scorer (question, steps, step) -> float is called with the context too
    seen = []
    res = prm_greedy_search(q, propose2, lambda qq, s, c: seen.append((qq, list(s), c)) or len(c), max_iter=1)
    assert seen == [(q, [], "3 + 4 = 7"), (q, [], "4 + 3 = 7")]


# ------------------------------------------------------------------------------------------------ models


class _Tok:
    """Character-level fake tokenizer: id = ord(char)."""

    eos_token, pad_token = "$", "#"

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class _Model:
    device = torch.device("cpu")

    def __init__(self, scores):
        self._scores = scores

    def generate(self, input_ids, **kwargs):
        return SimpleNamespace(sequences=input_ids, scores=self._scores)


def test_generative_scorer_with_fakes():
    # vocabulary of ords; Right ("R") and Wrong ("W") logits at the second position
    V = 128
    s0 = torch.full((1, V), -30.0)
    s0[0, ord("x")] = 0.0
    s1 = torch.full((1, V), -30.0)
    s1[0, ord("R")] = math.log(3.0)
    s1[0, ord("W")] = 0.0
    scorer = generative_prm_scorer(_Model([s0, s1]), _Tok(), lambda q, s, c: q + c, right="R", wrong="W")
    # p(R) / (p(R) + p(W)) = 3 / (3 + 1)
    assert scorer("Q", [], "step") == pytest.approx(0.75, abs=1e-6)


def test_hf_step_proposer_stops_at_the_separator():
    """Generation stops at the step separator (a stop string), not after max_step_tokens: the token that writes the
    separator is the last one generated, and the candidate's text ends before it."""
    from fastgrpo.rollout import generate_rollouts

    model, tok = tiny_model_and_tokenizer(seed=0)
    prompt = lambda q, steps: q + "".join(s + sep for s in steps)  # noqa: E731
    free = generate_rollouts(
        model, tok, ["What is 3+4?"], num_generations=1, max_new_tokens=12, do_sample=False
    )
    ids = free.completions()[0]
    # a token whose text is a clean separator that does not occur earlier in the completion
    k = next(
        k
        for k in range(2, len(ids))
        if (t := tok.decode(ids[k])).strip().isalnum() and t not in tok.decode(ids[:k])
    )
    sep = tok.decode(ids[k])
    propose = hf_step_proposer(model, tok, prompt, step_sep=sep, temperature=1e-4, max_step_tokens=12)
    cands = propose("What is 3+4?", [], 3)
    assert len(cands) == 3 and all(isinstance(c, StepCandidate) for c in cands)
    for c in cands:
        assert c.tokens == k + 1 and not c.ended and c.text == tok.decode(ids[:k]) and sep not in c.text
        assert c.logprob is not None and c.logprob <= 0
    with pytest.raises(ValueError, match="step_sep"):
        hf_step_proposer(model, tok, step_sep="")


def test_hf_step_proposer_stops_at_the_end_of_the_turn():
    model, tok = tiny_model_and_tokenizer(seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 6.0  # EOS likely at every position
    model.lm_head = head
    propose = hf_step_proposer(model, tok, step_sep="\u2603", max_step_tokens=16, seed=1)
    cands = propose("What is 3+4?", ["1 + 1 = 2"], 6)
    ended = [c for c in cands if c.ended]
    assert ended and all(c.tokens < 16 for c in ended)  # stopped at EOS, not at the length limit
    assert all(c.ended or c.tokens == 16 for c in cands)  # the separator never appears: EOS or length


@pytest.mark.slow
def test_search_on_smollm2_arithmetic_finishes():
    """SmolLM2-135M-Instruct on three 2-operation problems: the search answers every one, each step checked."""
    pytest.importorskip("gguf")
    from fastgrpo.models import load_smollm2
    from fastgrpo.tasks import render_prompt

    model, tok = load_smollm2()
    _, eval_set = ArithmeticTask(num_ops=2).split(0, 3, 1234)
    v = ArithmeticStepVerifier()
    for e in eval_set:
        head = render_prompt(e.messages, tok)
        propose = hf_step_proposer(
            model, tok, lambda q, s, h=head: h + "".join(x + "\n" for x in s), max_step_tokens=24
        )
        res = prm_greedy_search(e.question, propose, v, max_iter=6)
        assert res.status == "answered" and res.tokens <= res.model_calls * 8 * 24, res

"""GroundedPRM (arXiv 2510.14942): tool-grounded step rewards, step-level advantages and PRM-guided search.

**Hybrid rollout reward** (MCTS simulation, :func:`hybrid_rollout_reward`): with ``N`` intermediate step
checks ``v_0..v_{N-1}`` in {+1, -1} (the last simulated step's check is replaced by the outcome) and the
final outcome ``F`` in {+1, -1}::

    u = sum_{i=0}^{N-1} v_i (N - i) / N^2  +  F / N            (u = F when N = 0)

Earlier steps weigh more; for N = 4 the step weights are .25, .1875, .125, .0625 and F weighs .25.
**Backpropagation** (:func:`backpropagate`): the expanded node gets ``value += u``; its ancestor at
distance ``d`` gets ``value += gamma^d u`` and ``visits += 1`` (gamma = 0.9).

**Step rewards as token advantages** (:func:`step_token_advantages`; not in the paper, which trains a
PRM only). A completion is cut into steps (``"\\n\\n"`` in text, :func:`split_steps`; a separator token
sequence in ids, :func:`step_index`). Step scores ``s_{b,j}`` (PRM probabilities or ±1 checks) are
standardised over all steps of all completions of the group (process supervision in DeepSeekMath)::

    s~_{b,j}   = (s_{b,j} - mean_group s) / (std_u,group s + eps)
    mode="step":   A_proc[b, t] = s~_{b, step(t)}                     each step's tokens get its advantage
    mode="to_go":  A_proc[b, t] = sum_{j >= step(t)} s~_{b, j}         DeepSeekMath's return-to-go
    A[b, t] = outcome_weight * A_out[b] + process_weight * A_proc[b, t]

**Inference**: a :class:`StepVerifier` checks one step; :class:`ArithmeticStepVerifier` is the built-in
"external tool" (sympy exact arithmetic on the equations a step writes). A generative PRM's score is
``p(Right) / (p(Right) + p(Wrong))`` read from the last position whose top-k log-probs hold either label
(:func:`prm_score_from_top_logprobs`, :func:`generative_prm_scorer`). :func:`prm_greedy_search` samples
candidate next steps from a policy, keeps the best-scored one, and stops at a final step.

Differences from the official code (``pipeline/MCTS``, ``evaluation/reward_guided_search``):

- **Selection [code quirk]**: the official ``select()`` picks a random child, leaving the UCT score unused;
  the paper describes UCT. MCTS itself (which needs an LLM judge and Wolfram Alpha) is not part of this
  module; :func:`uct_score` gives the paper's selection rule for callers that build the tree.
- The official eval scorer looks for "Right"/"Wrong" while the training targets use ``\\boxed{±}``; the
  label strings are parameters here (``right``, ``wrong``).
- The built-in verifier checks arithmetic locally with sympy instead of querying Wolfram Alpha through an
  LLM; it returns 0 (unknown) for steps without a checkable equation, as the official code does when the
  verifier's answer cannot be parsed.
"""

from __future__ import annotations

import math
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastgrpo.advantages import (
    _check_real,
    _check_same_len,
    _check_tensor,
    _shape,
    group_index,
    group_stats,
)
from fastgrpo.rewards.outcome import require_sympy

__all__ = [
    "hybrid_rollout_weights",
    "hybrid_rollout_reward",
    "PRMNode",
    "backpropagate",
    "uct_score",
    "split_steps",
    "step_index",
    "step_token_advantages",
    "StepVerifier",
    "ArithmeticStepVerifier",
    "prm_score_from_top_logprobs",
    "generative_prm_scorer",
    "hf_step_proposer",
    "GreedySearchResult",
    "prm_greedy_search",
]

STEP_MODES = ("step", "to_go")


# ----------------------------------------------------------------------------------------------------------
# MCTS pieces
# ----------------------------------------------------------------------------------------------------------


def hybrid_rollout_weights(n: int) -> tuple[list[float], float]:
    """Weights of the hybrid reward: ``([(N - i)/N^2 for i < N], 1/N)``; ``([], 1.0)`` for ``N = 0``."""
    if n < 0:
        raise ValueError(f"number of steps must be >= 0, got {n}")
    if n == 0:
        return [], 1.0
    return [(n - i) / n**2 for i in range(n)], 1.0 / n


def hybrid_rollout_reward(step_checks: Sequence[float] | Tensor, final: float) -> float:
    """``u = sum_i v_i (N - i)/N^2 + F/N`` (``u = F`` for no intermediate step). See the module docstring."""
    v = [float(x) for x in (step_checks.tolist() if isinstance(step_checks, Tensor) else step_checks)]
    if not all(math.isfinite(x) for x in v) or not math.isfinite(final):
        raise ValueError(f"step_checks and final must be finite, got {v} and {final}")
    weights, wf = hybrid_rollout_weights(len(v))
    return sum(w * x for w, x in zip(weights, v)) + wf * float(final)


@dataclass(eq=False)
class PRMNode:
    """A search-tree node: accumulated ``value``, ``visits`` count, ``parent`` link, ``children``."""

    value: float = 0.0
    visits: int = 0
    parent: PRMNode | None = None
    children: list[PRMNode] = field(default_factory=list)

    def add_child(self) -> PRMNode:
        child = PRMNode(parent=self)
        self.children.append(child)
        return child


def backpropagate(node: PRMNode, u: float, *, gamma: float = 0.9) -> None:
    """``node.value += u``; ancestor at distance ``d``: ``value += gamma^d u``, ``visits += 1``."""
    node.value += u
    d = 1
    cur = node.parent
    while cur is not None:
        cur.value += gamma**d * u
        cur.visits += 1
        cur = cur.parent
        d += 1


def uct_score(
    child: PRMNode, parent_visits: int, *, exploration: float = 1.8, positive: bool = True
) -> float:
    """Paper UCT: ``±value + c sqrt(ln(N_parent + 1) / (N_child + 1))`` (+ when collecting positive paths)."""
    sign = 1.0 if positive else -1.0
    return sign * child.value + exploration * math.sqrt(math.log(parent_visits + 1) / (child.visits + 1))


# ----------------------------------------------------------------------------------------------------------
# steps and token advantages
# ----------------------------------------------------------------------------------------------------------


def split_steps(text: str, *, sep: str = "\n\n") -> list[str]:
    """Reasoning steps of a completion: split at ``sep``, stripped, empty pieces dropped."""
    return [s.strip() for s in text.split(sep) if s.strip()]


def step_index(token_ids: Tensor, sep_ids: Sequence[int], *, mask: Tensor | None = None) -> Tensor:
    """Step number of every token, int64 ``[B, T]``; -1 outside ``mask``.

    A step ends with (and includes) each occurrence of the separator token sequence ``sep_ids`` (e.g. the
    id of ``"\\n\\n"``); the tokens after the last separator form the last step. Consecutive separators make
    steps of separator tokens only (the caller's step scores must then cover them).
    """
    _check_tensor("token_ids", token_ids, ndim=2)
    if len(sep_ids) == 0:
        raise ValueError("sep_ids must be a non-empty token-id sequence")
    B, T = token_ids.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=token_ids.device) if mask is None else mask.bool()
    if valid.shape != token_ids.shape:
        raise ValueError(f"mask must have shape {_shape(token_ids)} like token_ids, got {_shape(valid)}")
    L = len(sep_ids)
    ends = torch.zeros(B, T, dtype=torch.int64, device=token_ids.device)
    if L <= T:
        pat = torch.as_tensor(list(sep_ids), dtype=token_ids.dtype, device=token_ids.device)
        hit = (token_ids.unfold(1, L, 1) == pat).all(-1) & valid.unfold(1, L, 1).all(-1)  # [B, T-L+1]
        ends[:, L - 1 :] = hit.to(torch.int64)  # the separator's last token closes the step
    # step of token t = number of separators that ended strictly before t
    idx = torch.cumsum(ends, 1) - ends
    return torch.where(valid, idx, torch.full_like(idx, -1))


def step_token_advantages(
    step_rewards: Tensor | Sequence[Sequence[float]],
    token_step: Tensor,
    group_size: int | None = None,
    *,
    group_ids: Tensor | None = None,
    outcome_advantages: Tensor | None = None,
    mode: str = "step",
    process_weight: float = 1.0,
    outcome_weight: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """Token-level advantages from per-step scores (module docstring), fp32 ``[B, T]``.

    Args:
        step_rewards: per completion, the score of each of its steps: a list of ``B`` lists (ragged) or a
            padded ``[B, S]`` tensor with NaN marking absent steps.
        token_step: int ``[B, T]`` step number of each token, -1 for padding (:func:`step_index`).
        group_size / group_ids: the prompt groups (steps are standardised per group).
        outcome_advantages: ``[B]`` sequence-level advantages (e.g. :func:`~fastgrpo.advantages.group_advantages`
            of the outcome rewards); None means 0.
        mode: ``"step"`` (each step's tokens get its own advantage) or ``"to_go"`` (sum over the step and the
            later ones).
        process_weight, outcome_weight: the combination weights. eps: std epsilon.

    Padding tokens get 0. Every step referenced by ``token_step`` must have a score.
    """
    if mode not in STEP_MODES:
        raise ValueError(f"mode must be one of {STEP_MODES}, got {mode!r}")
    _check_tensor("token_step", token_step, ndim=2)
    B, T = token_step.shape
    if B == 0:
        raise ValueError(f"empty batch: token_step has shape {_shape(token_step)}")
    if isinstance(step_rewards, Tensor):
        _check_tensor("step_rewards", step_rewards, ndim=2)
        if step_rewards.shape[0] != B:
            raise ValueError(
                f"step_rewards {_shape(step_rewards)} must have {B} rows like token_step {_shape(token_step)}"
            )
        rows = [[x for x in row if not math.isnan(x)] for row in step_rewards.double().tolist()]
    else:
        if len(step_rewards) != B:
            raise ValueError(
                f"step_rewards must hold {B} lists (one per completion), got {len(step_rewards)}"
            )
        rows = [[float(x) for x in row] for row in step_rewards]
    n_steps = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    flat = torch.tensor([x for r in rows for x in r], dtype=torch.float32)
    flat = _check_real("step_rewards", flat)
    max_step = token_step.max(1).values.cpu()
    if bool((max_step >= n_steps).any()):
        b = int((max_step >= n_steps).nonzero()[0])
        raise ValueError(
            f"completion {b} has tokens in step {int(max_step[b])} but step_rewards gives it {int(n_steps[b])} scores"
        )
    index, G = group_index(B, group_size, group_ids)
    step_group = index.repeat_interleave(n_steps)
    if flat.numel():
        mean, std, _ = group_stats(flat, step_group, G)
        norm = (flat - mean[step_group]) / (std[step_group] + eps)
    else:
        norm = flat
    offsets = torch.cumsum(n_steps, 0) - n_steps
    if mode == "to_go":  # reverse cumulative sum within each completion
        norm = torch.cat([seg.flip(0).cumsum(0).flip(0) for seg in torch.split(norm, n_steps.tolist())])
    ts = token_step.cpu().to(torch.int64)
    flat_pos = (offsets[:, None] + ts.clamp(min=0)).clamp(max=max(norm.numel() - 1, 0))
    proc = norm[flat_pos] if norm.numel() else torch.zeros(B, T)
    proc = torch.where(ts >= 0, proc, torch.zeros_like(proc))
    out = process_weight * proc
    if outcome_advantages is not None:
        _check_tensor("outcome_advantages", outcome_advantages)
        _check_same_len("outcome_advantages", outcome_advantages, "the batch", B)
        a = _check_real("outcome_advantages", outcome_advantages).to(torch.float32).cpu()
        out = out + torch.where(ts >= 0, outcome_weight * a[:, None], torch.zeros_like(out))
    return out.to(token_step.device)


# ----------------------------------------------------------------------------------------------------------
# step verifiers and scorers
# ----------------------------------------------------------------------------------------------------------


class StepVerifier(ABC):
    """Checks one reasoning step: +1 correct, -1 incorrect, 0 cannot tell. Subclass and implement ``__call__``."""

    @abstractmethod
    def __call__(self, step: str, *, question: str = "", previous_steps: Sequence[str] = ()) -> int:
        """Verdict on ``step`` given the question and the steps before it."""


_EQ_CHARS = r"0-9\.\s\+\-\*/×÷·\^\(\)"
_EQUATION = re.compile(rf"[{_EQ_CHARS}]*\d[{_EQ_CHARS}]*(?:=[{_EQ_CHARS}]*\d[{_EQ_CHARS}]*)+")


class ArithmeticStepVerifier(StepVerifier):
    """The built-in "external tool": checks the arithmetic equations a step writes, exactly, with sympy.

    Finds chains like ``3 + 4 × 2 = 11`` (digits, ``+ - * / × ÷ · ^``, parentheses, ``\\frac{a}{b}``,
    ``\\times``, ``\\cdot``), and checks each ``=`` pair with exact rational arithmetic. A right-hand side
    written with ``d`` decimals is accepted within rounding (``|lhs - rhs| <= 0.5 * 10^-d``), so
    ``1/3 = 0.33`` holds. Returns +1 when at least one equation is found and all hold, -1 when one fails,
    0 when the step has none. Only whitelisted characters reach sympy (model output is never evaluated as
    Python). Needs sympy (imported on first call).
    """

    def __init__(self, *, rounding_tolerance: bool = True) -> None:
        self.rounding_tolerance = rounding_tolerance

    @staticmethod
    def _prepare(text: str) -> str:
        t = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", text)
        t = t.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
        t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # thousands separators
        return t.replace("$", " ")

    def equations(self, step: str) -> list[list[str]]:
        """The ``=``-chains found in a step, each as its list of sides (whitelisted text)."""
        chains = []
        for m in _EQUATION.finditer(self._prepare(step)):
            sides = [s.strip() for s in m.group(0).split("=")]
            if len(sides) >= 2 and all(re.search(r"\d", s) for s in sides):
                chains.append(sides)
        return chains

    def _value(self, expr: str):
        sympy = require_sympy()
        e = expr.replace("×", "*").replace("÷", "/").replace("·", "*").replace("^", "**")
        if not re.fullmatch(r"[0-9\.\s\+\-\*/\(\)]+", e):
            return None
        try:
            v = sympy.sympify(e, rational=True)
        except (sympy.SympifyError, SyntaxError, TypeError, ZeroDivisionError):
            return None
        return v if v.is_number and v.is_finite else None

    def _holds(self, lhs: str, rhs: str) -> bool | None:
        a, b = self._value(lhs), self._value(rhs)
        if a is None or b is None:
            return None
        if a == b:
            return True
        dec = re.fullmatch(r"\s*-?\d*\.(\d+)\s*", rhs)
        if self.rounding_tolerance and dec:
            return abs(float(a - b)) <= 0.5 * 10 ** (-len(dec.group(1))) + 1e-12
        return False

    def __call__(self, step: str, *, question: str = "", previous_steps: Sequence[str] = ()) -> int:
        checked = False
        for sides in self.equations(step):
            for lhs, rhs in zip(sides, sides[1:]):
                ok = self._holds(lhs, rhs)
                if ok is None:
                    continue
                if not ok:
                    return -1
                checked = True
        return 1 if checked else 0


def prm_score_from_top_logprobs(
    top_logprobs: Sequence[Mapping[str, float]],
    *,
    right: str = "Right",
    wrong: str = "Wrong",
    fallback: float = 0.5,
) -> float:
    """``p(Right) / (p(Right) + p(Wrong))`` at the last generated position whose top-k holds either label.

    ``top_logprobs``: per generated position, token string -> log-prob of the top-k tokens (the official
    scorer uses k = 10; token strings are compared after ``strip()``). A label missing from that position's
    top-k gets the smallest top-k probability. No position with a label: ``fallback`` (0.5).
    """
    for pos in reversed(top_logprobs):
        probs: dict[str, float] = {}
        for tok, lp in pos.items():
            key = tok.strip()
            probs[key] = probs.get(key, 0.0) + math.exp(lp)
        if right in probs or wrong in probs:
            floor = min(math.exp(lp) for lp in pos.values())
            pr, pw = probs.get(right, floor), probs.get(wrong, floor)
            return pr / (pr + pw) if pr + pw > 0 else fallback
    return fallback


StepScorer = Callable[[str, Sequence[str], str], float]
StepProposer = Callable[[str, Sequence[str], int], Sequence[str]]


def generative_prm_scorer(
    model,
    tokenizer,
    prompt_fn: Callable[[str, Sequence[str], str], str],
    *,
    temperature: float = 0.6,
    max_new_tokens: int = 4096,
    top_k: int = 10,
    right: str = "Right",
    wrong: str = "Wrong",
    fallback: float = 0.5,
) -> StepScorer:
    """A step scorer ``(question, previous_steps, step) -> p(Right)/(p(Right)+p(Wrong))`` from a generative PRM.

    ``model`` is a Hugging Face causal LM (anything with ``generate(..., output_scores=True,
    return_dict_in_generate=True)``), ``tokenizer`` its tokenizer; ``prompt_fn`` builds the judge prompt.
    The judgement is sampled (temperature 0.6 as the official scorer) and scored by
    :func:`prm_score_from_top_logprobs` over the top-``top_k`` tokens of each generated position.
    """

    @torch.no_grad()
    def score(question: str, previous_steps: Sequence[str], step: str) -> float:
        enc = tokenizer(prompt_fn(question, previous_steps, step), return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(
            **enc,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            max_new_tokens=max_new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
        )
        positions = []
        for logits in out.scores:
            lp = torch.log_softmax(logits[0].float(), -1)
            vals, ids = lp.topk(min(top_k, lp.numel()))
            positions.append({tokenizer.decode([int(i)]): float(v) for v, i in zip(vals, ids)})
        return prm_score_from_top_logprobs(positions, right=right, wrong=wrong, fallback=fallback)

    return score


def hf_step_proposer(
    model,
    tokenizer,
    prompt_fn: Callable[[str, Sequence[str]], str],
    *,
    temperature: float = 0.7,
    max_new_tokens: int = 512,
    stop: str = "\n\n",
) -> StepProposer:
    """A proposer ``(question, previous_steps, n) -> n candidate next steps`` sampled from a causal LM.

    Sampling as the official greedy search (temperature 0.7, at most 512 tokens); each candidate is cut at
    the first ``stop`` (kept, so a caller can tell a step from a truncation) and keeps the EOS token text
    when generation ended there, which :func:`prm_greedy_search`'s default stop rule reads.
    """

    @torch.no_grad()
    def propose(question: str, previous_steps: Sequence[str], n: int) -> list[str]:
        enc = tokenizer(prompt_fn(question, previous_steps), return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
        )
        seqs = out.sequences if hasattr(out, "sequences") else out
        texts = tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=False)
        pad = getattr(tokenizer, "pad_token", None)
        eos = getattr(tokenizer, "eos_token", None)
        cands = []
        for t in texts:
            if pad and pad != eos:
                t = t.replace(pad, "")
            cut = t.find(stop)
            if cut >= 0:
                t = t[: cut + len(stop)]
            elif eos and eos in t:
                t = t[: t.index(eos) + len(eos)]
            cands.append(t)
        return cands

    return propose


# ----------------------------------------------------------------------------------------------------------
# greedy search
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GreedySearchResult:
    """The chosen steps, their scores, and whether the last one was final (else ``max_iter`` ran out)."""

    steps: list[str]
    scores: list[float]
    finished: bool


def _default_is_final(step: str, eos: str | None) -> bool:
    ended = True if eos is None else step.rstrip().endswith(eos)
    return ended and step.count("\\boxed{") == 1


def prm_greedy_search(
    question: str,
    propose: StepProposer,
    score: StepScorer | StepVerifier,
    *,
    num_candidates: int = 8,
    max_iter: int = 30,
    eos: str | None = None,
    is_final: Callable[[str], bool] | None = None,
    candidate_filter: Callable[[str], bool] | None = None,
    rng: random.Random | None = None,
) -> GreedySearchResult:
    """PRM-guided greedy search: each iteration samples ``num_candidates`` next steps, keeps the best-scored.

    Args:
        question: the problem.
        propose: ``(question, previous_steps, n) -> candidates`` (e.g. :func:`hf_step_proposer`).
        score: ``(question, previous_steps, step) -> float`` (e.g. :func:`generative_prm_scorer`), or a
            :class:`StepVerifier` (called as ``verifier(step, question=..., previous_steps=...)``).
        num_candidates, max_iter: 8 and 30 as the official search.
        eos: the EOS token text; the default stop rule is "the step ends with ``eos`` (when given) and holds
            exactly one ``\\boxed{``" (official). ``is_final`` replaces the rule.
        candidate_filter: keep a candidate only when it returns True (the official code drops candidates
            with illegal characters). Candidates are deduplicated; ties are broken at random with ``rng``.
    """
    rng = rng or random.Random(0)
    final = is_final or (lambda s: _default_is_final(s, eos))
    call = (
        (lambda steps, c: float(score(c, question=question, previous_steps=steps)))
        if isinstance(score, StepVerifier)
        else (lambda steps, c: float(score(question, steps, c)))
    )
    steps: list[str] = []
    scores: list[float] = []
    for _ in range(max_iter):
        cands = list(dict.fromkeys(propose(question, list(steps), num_candidates)))
        if candidate_filter is not None:
            cands = [c for c in cands if candidate_filter(c)]
        cands = [c for c in cands if c.strip()]
        if not cands:
            break
        vals = [call(list(steps), c) for c in cands]
        best = max(vals)
        choice = rng.choice([i for i, v in enumerate(vals) if v == best])
        steps.append(cands[choice])
        scores.append(vals[choice])
        if final(cands[choice]):
            return GreedySearchResult(steps, scores, True)
    return GreedySearchResult(steps, scores, False)

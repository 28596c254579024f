"""GroundedPRM (arXiv 2510.14942): tool-grounded step rewards, step-level advantages and PRM-guided search.

**Hybrid rollout reward** (MCTS simulation, :func:`hybrid_rollout_reward`): with ``N`` intermediate step
checks ``v_0..v_{N-1}`` in {+1, -1} (the last simulated step's check is replaced by the outcome) and the
final outcome ``F`` in {+1, -1}::

    u = sum_{i=0}^{N-1} v_i (N - i) / N^2  +  F / N            (u = F when N = 0)

Earlier steps weigh more; for N = 4 the step weights are .25, .1875, .125, .0625 and F weighs .25.
**Backpropagation** (:func:`backpropagate`): the expanded node gets ``value += u``; its ancestor at
distance ``d`` gets ``value += gamma^d u`` and ``visits += 1`` (gamma = 0.9).

**Step rewards as token advantages** (:func:`step_token_advantages`; not in the paper, which trains a
PRM only). A completion is cut into steps (``"\\n"`` in text, :func:`split_steps`: the library's tasks write one
step per line; a separator token sequence in ids, :func:`step_index`). Step scores ``s_{b,j}`` (PRM
probabilities or ±1 checks) are standardised over all steps of all completions of the group (process
supervision in DeepSeekMath)::

    s~_{b,j}   = (s_{b,j} - mean_group s) / (std_u,group s + eps)
    mode="step":   A_proc[b, t] = s~_{b, step(t)}                     each step's tokens get its advantage
    mode="to_go":  A_proc[b, t] = sum_{j >= step(t)} s~_{b, j}         DeepSeekMath's return-to-go
    A[b, t] = outcome_weight * A_out[b] + process_weight * A_proc[b, t]

**Step checks**: a :class:`StepVerifier` judges one step given the question and the steps before it;
:class:`ArithmeticStepVerifier` is the built-in "external tool": exact arithmetic, and *grounding* (a true step
earns +1 only when it computes something the question asks from the question's quantities and earlier
results; the answer step is checked against what the steps established). Its docstring says how it stands in
for the paper's Wolfram Alpha checks and MCTS labels. :func:`grounded_hybrid_reward` fuses a path's checks
with its outcome. A generative PRM's score is ``p(Right) / (p(Right) + p(Wrong))`` read from the last
position whose top-k log-probs hold either label (:func:`prm_score_from_top_logprobs`,
:func:`generative_prm_scorer`).

**Search**: :func:`prm_greedy_search` proposes candidate next steps (:func:`hf_step_proposer`: generation stops
at the step separator and at the end of the assistant turn), ranks them by the hybrid score (the step check
fused with an outcome or value estimate when one is given), keeps the best, and stops at an answer, at the
end of the turn, or at a limit (steps, token budget), saying which.

Differences from the official code (``pipeline/MCTS``, ``evaluation/reward_guided_search``):

- **Selection [code quirk]**: the official ``select()`` picks a random child, leaving the UCT score unused;
  the paper describes UCT. MCTS itself (which needs an LLM judge and Wolfram Alpha) is not part of this
  module; :func:`uct_score` gives the paper's selection rule for callers that build the tree.
- The official eval scorer looks for "Right"/"Wrong" while the training targets use ``\\boxed{±}``; the
  label strings are parameters here (``right``, ``wrong``).
- The built-in verifier checks arithmetic locally (exact rationals) instead of querying Wolfram Alpha through
  an LLM; it returns 0 (unknown) for steps without a checkable equation, as the official code does when the
  verifier's answer cannot be parsed.
- Search defaults fit the library's tasks: steps end at a newline (official: a blank line), the answer is an
  ``<answer>`` tag or one ``\\boxed{}`` (official: ``\\boxed{}`` only), at most 64 tokens per step (official 512).
"""

from __future__ import annotations

import ast
import itertools
import math
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

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
from fastgrpo.rewards.outcome import extract_answer, extract_answer_tag

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
    "GroundingState",
    "ArithmeticStepVerifier",
    "build_step_verifier",
    "grounded_hybrid_reward",
    "prm_score_from_top_logprobs",
    "generative_prm_scorer",
    "StepCandidate",
    "hf_step_proposer",
    "SEARCH_STATUSES",
    "GreedySearchResult",
    "default_is_final",
    "prm_greedy_search",
    "STEP_SEP",
]

STEP_MODES = ("step", "to_go")
STEP_SEP = "\n"  # the library's tasks write one step per line


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


def split_steps(text: str, *, sep: str = STEP_SEP) -> list[str]:
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
# grounded step checks
# ----------------------------------------------------------------------------------------------------------


class StepVerifier(ABC):
    """Checks one reasoning step in its context: +1 correct, -1 incorrect, 0 cannot tell (or not rewarded).

    Subclass and implement ``__call__``; :meth:`check_path` scores every step of a solution, each given the
    question and the steps before it (override it when a checker can walk a path in one pass).
    """

    @abstractmethod
    def __call__(self, step: str, *, question: str = "", previous_steps: Sequence[str] = ()) -> int:
        """Verdict on ``step`` given the question and the steps before it."""

    def check_path(self, question: str, steps: Sequence[str]) -> list[int]:
        """The verdict of each step of ``steps``, each given ``question`` and the steps before it."""
        return [self(s, question=question, previous_steps=list(steps[:j])) for j, s in enumerate(steps)]


_EQ_CHARS = r"0-9\.\s\+\-\*/×÷·\^\(\)"
_EQUATION = re.compile(rf"[{_EQ_CHARS}]*\d[{_EQ_CHARS}]*(?:=[{_EQ_CHARS}]*\d[{_EQ_CHARS}]*)+")
_EXPRESSION = re.compile(rf"[{_EQ_CHARS}]*\d[{_EQ_CHARS}]*")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_MAX_EXPR_CHARS = 400  # longer runs are not arithmetic a step writes; bounds the parser's work
_MAX_EXPONENT = 64  # 2^64 is fine, 9^(9^9) would hang exact arithmetic


class _Unsupported(Exception):
    """An expression outside the checked arithmetic (names, calls, huge powers)."""


@dataclass(frozen=True)
class _Expr:
    """An arithmetic expression tree with its exact value. ``op``: ``"num"``, ``"+"`` / ``"*"`` (n-ary: chains
    of one operator are flattened, so ``a + b + c`` is one node), ``"-"``, ``"/"``, ``"**"`` (binary) or
    ``"neg"``."""

    op: str
    value: Fraction
    args: tuple[_Expr, ...] = ()

    def key(self) -> tuple:
        """Structural identity up to the order of the operands of ``+`` and ``*``; numbers by value."""
        if self.op == "num":
            return ("num", self.value)
        keys = tuple(a.key() for a in self.args)
        return (self.op, tuple(sorted(keys, key=repr)) if self.op in "+*" else keys)

    def leaves(self) -> list[Fraction]:
        return [self.value] if self.op == "num" else [v for a in self.args for v in a.leaves()]


def _num(v: Fraction) -> _Expr:
    return _Expr("num", v)


def _from_ast(node: ast.AST, src: str) -> _Expr:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # the literal's own text, so 0.1 is exactly 1/10 (not the float nearest to it)
        return _num(Fraction(ast.get_source_segment(src, node) or repr(node.value)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _from_ast(node.operand, src)
        if isinstance(node.op, ast.UAdd):
            return inner
        return _num(-inner.value) if inner.op == "num" else _Expr("neg", -inner.value, (inner,))
    if isinstance(node, ast.BinOp):
        a, b = _from_ast(node.left, src), _from_ast(node.right, src)
        if isinstance(node.op, (ast.Add, ast.Mult)):
            op = "+" if isinstance(node.op, ast.Add) else "*"
            args = (a.args if a.op == op else (a,)) + (b.args if b.op == op else (b,))
            return _Expr(op, a.value + b.value if op == "+" else a.value * b.value, args)
        if isinstance(node.op, ast.Sub):
            return _Expr("-", a.value - b.value, (a, b))
        if isinstance(node.op, ast.Div):
            return _Expr("/", a.value / b.value, (a, b))  # ZeroDivisionError: the caller's "cannot check"
        if isinstance(node.op, ast.Pow):
            if b.value.denominator != 1 or abs(b.value) > _MAX_EXPONENT:
                raise _Unsupported("exponent")
            return _Expr("**", a.value ** int(b.value), (a, b))
    raise _Unsupported(type(node).__name__)


def _prepare(text: str) -> str:
    """LaTeX and typographic arithmetic as plain operators: ``\\frac{a}{b}``, ``\\times``, ``\\cdot``, ``\\div``,
    thousands separators, ``$``."""
    t = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", text)
    t = t.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)  # thousands separators
    return t.replace("$", " ")


def _parse(text: str) -> _Expr | None:
    """The expression tree of whitelisted arithmetic text, or None (nothing here is ever evaluated as Python:
    the text is parsed into a syntax tree and only number literals and + - * / ** nodes are read)."""
    t = text.replace("×", "*").replace("÷", "/").replace("·", "*").replace("^", "**").strip()
    if not t or len(t) > _MAX_EXPR_CHARS or not re.fullmatch(r"[0-9\.\s\+\-\*/\(\)]+", t):
        return None
    try:
        return _from_ast(ast.parse(t, mode="eval").body, t)
    except (
        SyntaxError,
        ValueError,
        ZeroDivisionError,
        OverflowError,
        RecursionError,
        MemoryError,
        _Unsupported,
    ):
        return None


def _reduce(node: _Expr, lhs: _Expr) -> _Expr | None:
    """``node`` with the sub-expression ``lhs`` computes replaced by its value, or None when ``lhs`` is not a
    sub-expression of ``node``: a node equal to ``lhs`` (up to operand order of ``+`` / ``*``), or some operands
    of an n-ary ``+`` / ``*`` node (``8 + 1`` in ``8 + 1 + 1``)."""
    if node.op == "num":
        return None
    if node.key() == lhs.key():
        return _num(node.value)
    if node.op == lhs.op and node.op in "+*" and len(lhs.args) < len(node.args):
        rest, first = list(node.args), None
        for a in lhs.args:
            k = a.key()
            hit = next((i for i, b in enumerate(rest) if b is not None and b.key() == k), None)
            if hit is None:
                break
            first = hit if first is None else min(first, hit)
            rest[hit] = None
        else:
            rest[first] = _num(lhs.value)
            return _Expr(node.op, node.value, tuple(b for b in rest if b is not None))
    for i, child in enumerate(node.args):
        new = _reduce(child, lhs)
        if new is not None:
            return _Expr(node.op, node.value, node.args[:i] + (new,) + node.args[i + 1 :])
    return None


@dataclass(frozen=True)
class GroundingState:
    """What the checker knows before a step.

    Attributes:
        remaining: the question's expression with what the steps computed so far replaced by its value (a number
            once it is all computed); None when the question writes no arithmetic expression.
        quantities: the numbers the question states.
        results: the values the steps have established so far, in order (true, grounded computations).
    """

    remaining: _Expr | None
    quantities: tuple[Fraction, ...]
    results: tuple[Fraction, ...] = ()

    @property
    def solved(self) -> bool:
        """The question's expression is computed to one number."""
        return self.remaining is not None and self.remaining.op == "num"


class ArithmeticStepVerifier(StepVerifier):
    """The built-in "external tool": checks the arithmetic a step writes exactly, and that it is grounded.

    **Truth.** Finds chains like ``3 + 4 × 2 = 11`` (digits, ``+ - * / × ÷ · ^``, parentheses,
    ``\\frac{a}{b}``, ``\\times``, ``\\cdot``) and checks each ``=`` link with exact rational arithmetic. A side
    written with ``d`` decimals is accepted within rounding (``|lhs - rhs| <= 0.5 * 10^-d``), so ``1/3 = 0.33``
    holds. Text is parsed into a syntax tree (:mod:`ast`) of which only number literals and ``+ - * / **``
    (integer exponents up to 64) are read: model output is never evaluated.

    **Grounding** (``grounded=True``). A true equation earns +1 only when it computes something the question asks
    for from what is known. When the question writes an arithmetic expression (``Compute (3 + 4) * 5 - 6.``) the
    checker tracks what is left to compute: a step must compute a sub-expression of it (``3 + 4``; operands of
    ``+`` and ``*`` in any order and grouping, so ``8 + 1`` and ``1 + 1`` both count in ``8 + 1 + 1``), which
    is then replaced by its value; ``9 * 1 = 9`` after ``8 + 1 = 9`` in ``8 + 1 + 1`` is true but computes
    nothing the question asks, and a repeated step computes nothing new. Otherwise (a word problem) every
    operand must be a quantity of the question or a result an earlier step established. A wrong step's
    sub-expression still counts as computed, with its true value (a wrong result is never established).

    **Answer step.** A step holding an answer (``<answer>...</answer>``, ``\\boxed{}``, "the answer is ...") is
    checked like any step: +1 when it states the value the steps established (the computed expression; for a
    word problem the last result or another established one), -1 when it contradicts them, 0 when nothing is
    established yet (a premature answer). So a finished, grounded solution scores as well as its best step,
    and finishing is never worse than stalling.

    **Verdict** of a step: -1 when an equation is false or the answer contradicts the steps; else 0 when a
    true equation is ungrounded or an answer premature; else +1 when something was checked; 0 for a step
    with nothing checkable (prose, a blank line).

    **How this stands in for the paper's tool and labels.** GroundedPRM asks Wolfram Alpha (through an LLM that
    writes the query and an LLM judge that reads the result against the step objective and the conditions
    gathered so far) whether each step is right, and labels steps from MCTS values fused with the outcome.
    Here exact arithmetic replaces Wolfram Alpha, and the tracked expression / established results replace the
    step objective and conditions, so no LLM judge is needed and the verdict is deterministic; the outcome
    fusion is :func:`hybrid_rollout_reward` (:func:`grounded_hybrid_reward` for a checked path), the MCTS
    statistics are replaced by checking every step of every rollout directly (the trainer's process
    advantages) or every candidate of the search (:func:`prm_greedy_search`).

    ``grounded=False`` checks truth only (no question needed; answers score 0): the checker before grounding.
    """

    def __init__(self, *, grounded: bool = True, rounding_tolerance: bool = True) -> None:
        self.grounded = grounded
        self.rounding_tolerance = rounding_tolerance

    # -- parsing ------------------------------------------------------------------------------------------

    def equations(self, step: str) -> list[list[str]]:
        """The ``=``-chains found in a step, each as its list of sides (whitelisted text)."""
        chains = []
        for m in _EQUATION.finditer(_prepare(step)):
            sides = [s.strip() for s in m.group(0).split("=")]
            if len(sides) >= 2 and all(re.search(r"\d", s) for s in sides):
                chains.append(sides)
        return chains

    def _equal(self, value: Fraction, written: str, written_value: Fraction) -> bool:
        if value == written_value:
            return True
        dec = re.fullmatch(r"\s*-?\d*\.(\d+)\s*", written)
        return bool(self.rounding_tolerance and dec) and abs(value - written_value) <= Fraction(
            5, 10 ** (len(dec.group(1)) + 1)
        )

    # -- context ------------------------------------------------------------------------------------------

    def context(self, question: str, previous_steps: Sequence[str] = ()) -> GroundingState:
        """The state before the next step: the question's expression and quantities, then each earlier step."""
        if self.grounded and not question.strip():
            raise ValueError(
                "ArithmeticStepVerifier(grounded=True) checks a step against its question: pass question=... "
                "(or build ArithmeticStepVerifier(grounded=False) to check the arithmetic only)"
            )
        text = _prepare(question)
        best: _Expr | None = None
        best_len = 0
        for m in _EXPRESSION.finditer(text):
            s = m.group(0).strip().rstrip(".").strip()
            e = _parse(s)
            if e is not None and e.op != "num" and len(s) > best_len:
                best, best_len = e, len(s)
        state = GroundingState(best, tuple(Fraction(x) for x in _NUMBER.findall(text)))
        for s in previous_steps:
            _, state = self.check(s, state)
        return state

    def _ground(self, lhs: _Expr | None, state: GroundingState) -> tuple[bool, GroundingState]:
        """Whether computing ``lhs`` is grounded in ``state``, and the state after it."""
        if lhs is None or lhs.op == "num":  # restating a number computes nothing
            return False, state
        if state.remaining is not None:
            new = _reduce(state.remaining, lhs)
            if new is None:
                return False, state
            return True, GroundingState(new, state.quantities, state.results + (lhs.value,))
        known = {abs(v) for v in state.quantities + state.results}
        if all(abs(v) in known for v in lhs.leaves()):
            return True, GroundingState(None, state.quantities, state.results + (lhs.value,))
        return False, state

    def _answer(self, answer: str, state: GroundingState) -> int:
        text = _prepare(answer).strip().rstrip(".")
        e = _parse(text)
        if e is None:
            return 0  # not a number we can check
        if state.remaining is not None:
            if not state.solved:
                return 0  # premature: the question's expression is not computed yet
            return 1 if self._equal(state.remaining.value, text, e.value) else -1
        if not state.results:
            return 0
        return 1 if any(self._equal(r, text, e.value) for r in state.results) else -1

    # -- checking -----------------------------------------------------------------------------------------

    def check(self, step: str, state: GroundingState) -> tuple[int, GroundingState]:
        """``(verdict, state after the step)`` of one step in the context ``state`` (:meth:`context`)."""
        verdicts = []
        for sides in self.equations(step):
            exprs = [_parse(s) for s in sides]
            truth = None
            for (a, b), rhs in zip(zip(exprs, exprs[1:]), sides[1:]):
                if a is None or b is None:
                    continue
                ok = self._equal(a.value, rhs, b.value)
                truth = ok if truth is None else truth and ok
            if truth is None:
                continue
            if not self.grounded:
                verdicts.append(1 if truth else -1)
                continue
            grounded, state = self._ground(exprs[0], state)
            verdicts.append(-1 if not truth else 1 if grounded else 0)
        if self.grounded:
            answer = extract_answer(step)
            if answer is not None:
                verdicts.append(self._answer(answer, state))
        if not verdicts:
            return 0, state
        if -1 in verdicts:
            return -1, state
        return (0 if 0 in verdicts else 1), state

    def __call__(self, step: str, *, question: str = "", previous_steps: Sequence[str] = ()) -> int:
        if not self.grounded:
            return self.check(step, GroundingState(None, ()))[0]
        return self.check(step, self.context(question, previous_steps))[0]

    def check_path(self, question: str, steps: Sequence[str]) -> list[int]:
        """Every step's verdict in one pass over the path."""
        state = self.context(question) if self.grounded else GroundingState(None, ())
        out = []
        for s in steps:
            v, state = self.check(s, state)
            out.append(v)
        return out


def build_step_verifier(name: str = "arithmetic", *, grounded: bool = True) -> StepVerifier:
    """The step checker a config names (``advantage.prm.verifier``): ``"arithmetic"``."""
    if name != "arithmetic":
        raise ValueError(f"unknown step verifier {name!r}; the built-in one is 'arithmetic'")
    return ArithmeticStepVerifier(grounded=grounded)


def grounded_hybrid_reward(
    question: str, steps: Sequence[str], final: float, verifier: StepVerifier | None = None
) -> float:
    """GroundedPRM's hybrid rollout reward of a solution path: its steps checked in context, the last step's check
    replaced by the outcome ``final`` (±1), ``u = sum_i v_i (N - i)/N^2 + F/N`` over the ``N = len(steps) - 1``
    earlier checks (:func:`hybrid_rollout_reward`)."""
    if not steps:
        raise ValueError("steps is empty: a path needs at least its final step")
    checks = (verifier or ArithmeticStepVerifier()).check_path(question, steps)
    return hybrid_rollout_reward(checks[:-1], final)


# ----------------------------------------------------------------------------------------------------------
# generative PRM scores
# ----------------------------------------------------------------------------------------------------------


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
StepProposer = Callable[[str, Sequence[str], int], Sequence[Any]]  # strings or StepCandidate


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


# ----------------------------------------------------------------------------------------------------------
# step proposals and greedy search
# ----------------------------------------------------------------------------------------------------------


@dataclass
class StepCandidate:
    """A proposed next step.

    Attributes:
        text: the step, without the step separator.
        ended: generation ended the assistant turn (EOS) right after it, rather than at the step separator.
        tokens: tokens generated for it (what a search's token budget counts).
        logprob: mean log-prob of its tokens under the sampling distribution (a tie-break), or None.
    """

    text: str
    ended: bool = False
    tokens: int = 0
    logprob: float | None = None


def hf_step_proposer(
    model,
    tokenizer,
    prompt_fn: Callable[[str, Sequence[str]], str] | None = None,
    *,
    step_sep: str = STEP_SEP,
    temperature: float = 0.7,
    max_step_tokens: int = 64,
    seed: int = 0,
) -> StepProposer:
    """A proposer ``(question, previous_steps, n) -> n`` :class:`StepCandidate` sampled from a causal LM.

    Generation runs through :func:`fastgrpo.rollout.generate_rollouts` and **stops** at the step separator (a stop
    string) or at the end of the assistant turn (the EOS ids of the tokenizer and the model's generation
    config), at most ``max_step_tokens`` tokens per step; nothing is generated past a step. A candidate's text
    ends before the separator (a token that carries characters past it is trimmed there). Sampling at
    temperature 0.7 as the official search; call ``k`` uses the sampling seed ``seed + k``.

    ``prompt_fn(question, previous_steps)``: the text the model continues. Default: the tokenizer's chat template
    with ``question`` as the user turn and the assistant turn opened (:func:`fastgrpo.tasks.render_prompt`),
    followed by each previous step and ``step_sep``. The library's tasks put worked examples in their chat
    messages: pass ``lambda q, s: render_prompt(example.messages, tokenizer) + "".join(x + sep for x in s)``.
    """
    # rollout and tasks sit beside the rewards layer; imported when a proposer is built, not with the rewards
    from fastgrpo.rollout import SamplingParams, generate_rollouts
    from fastgrpo.tasks import render_prompt

    if not step_sep:
        raise ValueError(
            "step_sep must be a non-empty string (the arithmetic task writes one step per line: '\\n')"
        )
    if max_step_tokens < 1:
        raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
    calls = itertools.count()

    def default_prompt(question: str, previous_steps: Sequence[str]) -> str:
        head = render_prompt([{"role": "user", "content": question}], tokenizer)
        return head + "".join(s + step_sep for s in previous_steps)

    build = prompt_fn or default_prompt

    def propose(question: str, previous_steps: Sequence[str], n: int) -> list[StepCandidate]:
        params = SamplingParams(num_generations=n, max_new_tokens=max_step_tokens, temperature=temperature,
                                stop=(step_sep,), return_logprobs=True, seed=seed + next(calls))  # fmt: skip
        ro = generate_rollouts(model, tokenizer, [build(question, previous_steps)], params)
        lens = ro.completion_lens.tolist()
        logp = ro.logprobs.sum(1).tolist() if ro.logprobs is not None else [None] * len(lens)
        out = []
        for text, trunc, k, lp in zip(ro.texts, ro.truncated.tolist(), lens, logp):
            cut = text.find(step_sep)
            ended = cut < 0 and not trunc  # stopped neither at the separator nor at the length limit: EOS
            out.append(StepCandidate(text[:cut] if cut >= 0 else text, ended, int(k),
                                     None if lp is None else lp / max(k, 1)))  # fmt: skip
        return out

    return propose


SEARCH_STATUSES = ("answered", "max_iter", "token_budget", "no_candidates")


@dataclass
class GreedySearchResult:
    """What a search produced.

    Attributes:
        steps: the chosen steps (without separators); ``text(sep)`` joins them.
        checks: the step check of each chosen step; ``scores``: its hybrid score (the ranking key).
        status: ``"answered"`` (the last step holds an answer), ``"max_iter"``, ``"token_budget"`` (stopped
            unfinished), or ``"no_candidates"`` (the proposer gave nothing usable: every candidate blank or
            filtered out; ``steps`` holds what came before).
        answer: the answer the last step states (``<answer>``, ``\\boxed{}``, "the answer is"), or None.
        model_calls: proposer calls; tokens: generated tokens over every candidate.
    """

    steps: list[str]
    scores: list[float]
    checks: list[float]
    status: str
    answer: str | None = None
    model_calls: int = 0
    tokens: int = 0

    @property
    def finished(self) -> bool:
        """The search reached an answer (rather than a limit or an empty proposal)."""
        return self.status == "answered"

    def text(self, sep: str = STEP_SEP) -> str:
        return sep.join(self.steps)


def default_is_final(step: str) -> bool:
    """The library's answer formats: the step holds ``<answer>...</answer>`` or exactly one ``\\boxed{``."""
    return extract_answer_tag(step) is not None or step.count("\\boxed{") == 1


def prm_greedy_search(
    question: str,
    propose: StepProposer,
    score: StepScorer | StepVerifier,
    *,
    num_candidates: int = 8,
    max_iter: int = 30,
    token_budget: int | None = None,
    value: Callable[[str, Sequence[str]], float | None] | None = None,
    is_final: Callable[[str], bool] | None = None,
    candidate_filter: Callable[[str], bool] | None = None,
    rng: random.Random | None = None,
) -> GreedySearchResult:
    """PRM-guided greedy search: each iteration proposes ``num_candidates`` next steps and keeps the best.

    **Ranking.** Each candidate ``c`` gets a step check ``v_c`` (a :class:`StepVerifier` sees the question and
    the chosen steps; a scorer ``(question, steps, step) -> float`` such as :func:`generative_prm_scorer` likewise)
    and a hybrid score fused as GroundedPRM's rollout reward over the path (:func:`hybrid_rollout_reward`, with
    ``v_0..`` the checks of the chosen steps)::

        u_c = hybrid(v_0..v_{k-1}, F)            c final and value(...) = F  (its check replaced by the outcome)
        u_c = hybrid(v_0..v_{k-1}, v_c, V)       c not final and value(...) = V  (a value estimate of the rest)
        u_c = hybrid(v_0..v_{k-1}, v_c)          no estimate: the check itself ends the path

    Without ``value`` this ranks by ``v_c`` (with :class:`ArithmeticStepVerifier` a correct, grounded answer line
    scores +1 like the best step, so finishing is never worse than stalling). Ties go to the candidate proposed
    most often (the policy's preference), then to the higher mean log-prob, then at random (``rng``).

    **Stopping.** A candidate is final when ``is_final(text)`` holds (default :func:`default_is_final`: an
    ``<answer>`` tag or one ``\\boxed{}``). A chosen step after which the model ended its turn without an answer
    does not stop the search: the next proposal starts a new line after it, so the model can still state the
    answer (stopping there would finish without one). The search stops at a final step, after ``max_iter`` steps, when ``token_budget``
    generated tokens are spent (checked before each proposal), or when no usable candidate was proposed
    (:class:`GreedySearchResult` ``status`` says which).

    Args:
        question: the problem (given to the proposer, the checker and ``value``).
        propose: ``(question, previous_steps, n) -> candidates`` (strings or :class:`StepCandidate`;
            :func:`hf_step_proposer`).
        score: a :class:`StepVerifier` (e.g. :class:`ArithmeticStepVerifier`) or a step scorer.
        num_candidates, max_iter: 8 and 30 as the official search.
        token_budget: stop once this many tokens were generated (None: no budget).
        value: ``(question, steps) -> float | None``: an outcome check of a finished path (e.g. against a
            reference answer when labelling) or a value estimate of a partial one; None when it has none.
        candidate_filter: keep a candidate only when it returns True (the official code drops candidates with
            illegal characters). Blank candidates are dropped; duplicates are merged (counted).
    """
    if num_candidates < 1 or max_iter < 1:
        raise ValueError(f"num_candidates and max_iter must be >= 1, got {num_candidates} and {max_iter}")
    rng = rng or random.Random(0)
    final_rule = is_final or default_is_final
    steps: list[str] = []
    scores: list[float] = []
    checks: list[float] = []
    calls = tokens = 0

    def as_candidate(c: str | StepCandidate) -> StepCandidate:
        if isinstance(c, StepCandidate):
            return c
        return StepCandidate(c)

    def result(status: str) -> GreedySearchResult:
        answer = extract_answer(steps[-1]) if steps else None
        return GreedySearchResult(steps, scores, checks, status, answer, calls, tokens)

    for _ in range(max_iter):
        if token_budget is not None and tokens >= token_budget:
            return result("token_budget")
        raw = [as_candidate(c) for c in propose(question, list(steps), num_candidates)]
        calls += 1
        tokens += sum(c.tokens for c in raw)
        merged: dict[str, list] = {}  # stripped text -> [candidate, count]
        for c in raw:
            if not c.text.strip() or (candidate_filter is not None and not candidate_filter(c.text)):
                continue
            key = c.text.strip()
            if key in merged:
                merged[key][1] += 1
                kept = merged[key][0]
                if c.logprob is not None and (kept.logprob is None or c.logprob > kept.logprob):
                    merged[key][0] = c
            else:
                merged[key] = [c, 1]
        if not merged:
            return result("no_candidates")
        cands = [c for c, _ in merged.values()]
        verdicts = _check_candidates(score, question, steps, [c.text for c in cands])
        keys = []
        for (c, count), v in zip(merged.values(), verdicts):
            final = final_rule(c.text)
            est = value(question, [*steps, c.text]) if value is not None else None
            if est is None:
                u = hybrid_rollout_reward(checks, v)
            elif final:
                u = hybrid_rollout_reward(checks, est)
            else:
                u = hybrid_rollout_reward([*checks, v], est)
            lp = c.logprob if c.logprob is not None else -math.inf
            keys.append((u, count, lp, v, final))
        best = max(k[:3] for k in keys)
        pick = rng.choice([i for i, k in enumerate(keys) if k[:3] == best])
        steps.append(cands[pick].text)
        scores.append(keys[pick][0])
        checks.append(keys[pick][3])
        if keys[pick][4]:
            return result("answered")
    return result("max_iter")


def _check_candidates(
    score: StepScorer | StepVerifier, question: str, steps: list[str], cands: list[str]
) -> list[float]:
    """Each candidate's check given the question and the chosen steps (the context is built once)."""
    if isinstance(score, ArithmeticStepVerifier):
        state = score.context(question, steps) if score.grounded else GroundingState(None, ())
        return [float(score.check(c, state)[0]) for c in cands]
    if isinstance(score, StepVerifier):
        return [float(score(c, question=question, previous_steps=list(steps))) for c in cands]
    return [float(score(question, list(steps), c)) for c in cands]

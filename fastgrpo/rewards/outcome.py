"""Verifiable outcome rewards: answer extraction, answer equivalence, format reward, DAPO overlong shaping.

Everything here works on strings and Python numbers (plus tensors for the length penalty), so it runs in
any trainer. The pieces:

- **Extraction** (:func:`extract_answer`): the content of the last ``<answer>…</answer>`` (and, inside it,
  the last ``\\boxed{…}`` when there is one), else the last ``\\boxed{…}`` / ``\\fbox{…}`` with balanced
  braces, else the text after the last "the (final) answer is" up to the end of its line or sentence.
- **Equivalence** (:func:`answers_equivalent`): ``exact`` (after :func:`normalize_answer`), ``numeric``
  (integers, decimals, ``1,000``, ``3/4``, ``\\frac{3}{4}``, ``50%`` -> 0.5, relative tolerance),
  ``choice`` (option letters: ``(B)``, ``B.``, ``Option B``, ``b``), ``symbolic`` (sympy, imported lazily;
  a clear error when missing) and ``auto`` (exact, then numeric, then symbolic when sympy is installed).
- **Format** (:func:`format_reward`): 1 when the completion fully matches
  ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL), as R1-V / GRPO-CARE.
- **DAPO** (:func:`dapo_overlong_penalty`, :func:`dapo_reward`): the soft overlong punishment
  ``R_len(L) = min(-(L - (L_max - L_c)) / L_c * factor, 0)`` added to a +1 / -1 correctness reward
  (verl ``math_dapo``); paper setting ``L_max = 20480``, ``L_c = 4096``, ``factor = 1``. The dynamic-sampling
  group filter is :func:`fastgrpo.sampling.dynamic_group_filter`.

Differences from the official code: answer extraction and numeric parsing are our own (math-verify and
the verl graders each use their own heuristics), so rare edge cases (units, intervals, matrices) may be
judged differently; ``symbolic`` uses ``sympy.parse_expr`` on a light LaTeX-to-Python rewrite, not
``latex2sympy``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

__all__ = [
    "THINK_ANSWER_PATTERN",
    "extract_boxed",
    "extract_answer_tag",
    "extract_answer",
    "normalize_answer",
    "parse_number",
    "parse_choice",
    "numeric_equal",
    "symbolic_equal",
    "answers_equivalent",
    "accuracy_reward",
    "OutcomeScores",
    "outcome_rewards",
    "format_reward",
    "dapo_overlong_penalty",
    "dapo_reward",
    "require_sympy",
]

THINK_ANSWER_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
EQUIVALENCE_MODES = ("auto", "exact", "numeric", "choice", "symbolic")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_IS = re.compile(r"the\s+(?:final\s+|correct\s+)?answer\s+(?:is|should\s+be)\s*:?\s*", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------------------------------------


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) with balanced braces, or None."""
    best: str | None = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, m.end()
        for j in range(start, len(text)):
            ch = text[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    best = text[start:j]
                    break
    return None if best is None else best.strip()


def extract_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>…</answer>``, stripped, or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n")[0]
    rest = re.split(r"\.\s", rest)[0].strip()
    return rest.rstrip(".").strip() or None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: ``<answer>`` tag, else ``\\boxed{}``, else "the answer is …".

    Inside an ``<answer>`` tag a ``\\boxed{}`` wins. Returns None when nothing is found.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    tag = extract_answer_tag(text)
    if tag is not None:
        boxed = extract_boxed(tag)
        return boxed if boxed is not None else tag
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    return _after_answer_is(text)


# ----------------------------------------------------------------------------------------------------------
# normalisation and equivalence
# ----------------------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Canonical string form: strip ``$``, ``\\text{}``, ``\\left/\\right``, spaces, a trailing period; lower."""
    s = s.strip()
    s = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = (
        s.replace("\\left", "")
        .replace("\\right", "")
        .replace("\\!", "")
        .replace("\\,", "")
        .replace("\\;", "")
    )
    s = s.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return s.lower()


def _to_fraction(s: str) -> Fraction | None:
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(s: str) -> float | None:
    """A number written as ``12``, ``-3.5``, ``1,000``, ``1e-3``, ``3/4``, ``\\frac{3}{4}``, ``50%``; else None."""
    t = normalize_answer(s)
    percent = t.endswith("\\%") or t.endswith("%")
    t = t.removesuffix("\\%").removesuffix("%")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    m = re.fullmatch(r"([-+]?)\\frac\{([^{}]+)\}\{([^{}]+)\}", t) or re.fullmatch(r"([-+]?)\\frac(\d)(\d)", t)
    if m:
        num, den = _to_fraction(m.group(2)), _to_fraction(m.group(3))
        if num is None or den is None or den == 0:
            return None
        val = float(num / den) * (-1 if m.group(1) == "-" else 1)
    else:
        if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?(/\d+(\.\d*)?)?", t):
            return None
        frac = _to_fraction(t)
        if frac is None:
            return None
        val = float(frac)
    return val / 100.0 if percent else val


def numeric_equal(a: str, b: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Both parse as numbers (:func:`parse_number`) and agree within ``rel_tol`` / ``abs_tol``."""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)


def parse_choice(s: str, *, letters: str = "ABCDEFGHIJ") -> str | None:
    """The option letter of a multiple-choice answer (``(B)``, ``B.``, ``B) text``, ``Option B``), upper case."""
    t = s.strip()
    t = re.sub(r"^(?:option|choice|answer)\s*:?\s*", "", t, flags=re.IGNORECASE)
    m = re.match(r"^[\(\[]?([A-Za-z])(?:[\)\]\.:]|\s|$)", t)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


def require_sympy():
    """Import sympy or raise an ImportError that says how to install it."""
    try:
        import sympy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sympy is needed for symbolic answer checking and the arithmetic step verifier: "
            "pip install 'fastgrpo[math]' (or pip install sympy)"
        ) from e
    return sympy


def _latex_to_python(s: str) -> str:
    t = s.strip().replace("$", "")
    t = re.sub(r"\\(?:text|mathrm)\s*\{([^{}]*)\}", r"\1", t)
    t = (
        t.replace("\\left", "")
        .replace("\\right", "")
        .replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
    )
    for _ in range(8):  # nested fractions / roots, innermost first
        t2 = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", t)
        t2 = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", t2)
        if t2 == t:
            break
        t = t2
    t = t.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("^", "**")
    t = t.replace("{", "(").replace("}", ")").replace("\\", "")
    return t


def symbolic_equal(a: str, b: str) -> bool:
    """``a - b`` simplifies to 0 under sympy (LaTeX lightly rewritten to Python syntax). Needs sympy."""
    sympy = require_sympy()
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = (*standard_transformations, implicit_multiplication_application)
    try:
        x = parse_expr(_latex_to_python(a), transformations=transformations, evaluate=True)
        y = parse_expr(_latex_to_python(b), transformations=transformations, evaluate=True)
        return bool(sympy.simplify(x - y) == 0)
    except Exception:  # sympy raises many exception types on malformed input; not equal then
        return False


def _has_sympy() -> bool:
    try:
        require_sympy()
    except ImportError:
        return False
    return True


def answers_equivalent(pred: str | None, gold: str | float | int, *, mode: str = "auto") -> bool:
    """Whether a predicted answer string matches the gold answer under ``mode`` (see module docstring)."""
    if mode not in EQUIVALENCE_MODES:
        raise ValueError(f"mode must be one of {EQUIVALENCE_MODES}, got {mode!r}")
    if pred is None:
        return False
    gold_s = str(gold)
    if mode == "choice":
        p = parse_choice(pred)
        return p is not None and p == parse_choice(gold_s)
    if mode == "exact":
        return normalize_answer(pred) == normalize_answer(gold_s)
    if mode == "numeric":
        return numeric_equal(pred, gold_s)
    if mode == "symbolic":
        return symbolic_equal(pred, gold_s)
    if normalize_answer(pred) == normalize_answer(gold_s):
        return True
    x, y = parse_number(pred), parse_number(gold_s)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    return _has_sympy() and symbolic_equal(pred, gold_s)


def accuracy_reward(completion: str, gold: str | float | int, *, mode: str = "auto") -> float:
    """1.0 when the answer extracted from ``completion`` is equivalent to ``gold``, else 0.0."""
    return float(answers_equivalent(extract_answer(completion), gold, mode=mode))


@dataclass
class OutcomeScores:
    """Output of :func:`outcome_rewards`: fp32 ``accuracy`` and ``format`` ``[B]``, extracted ``answers``."""

    accuracy: Tensor
    format: Tensor
    answers: list[str | None]


def outcome_rewards(
    completions: Sequence[str],
    golds: Sequence[str | float | int],
    *,
    mode: str = "auto",
    pattern: str = THINK_ANSWER_PATTERN,
    strip: bool = False,
) -> OutcomeScores:
    """Accuracy and format rewards of a batch plus the extracted answers (COPO needs them), ``[B]`` each."""
    if len(completions) != len(golds):
        raise ValueError(
            f"completions and golds must have one length, got {len(completions)} and {len(golds)}"
        )
    answers = [extract_answer(c) for c in completions]
    acc = [float(answers_equivalent(a, g, mode=mode)) for a, g in zip(answers, golds)]
    fmt = [format_reward(c, pattern=pattern, strip=strip) for c in completions]
    return OutcomeScores(
        torch.tensor(acc, dtype=torch.float32), torch.tensor(fmt, dtype=torch.float32), answers
    )


def format_reward(completion: str, *, pattern: str = THINK_ANSWER_PATTERN, strip: bool = False) -> float:
    """1.0 when ``completion`` fully matches ``pattern`` (DOTALL), else 0.0.

    ``strip=False`` as the official code (a trailing newline fails the match); ``strip=True`` forgives
    surrounding whitespace.
    """
    text = completion.strip() if strip else completion
    return 1.0 if re.fullmatch(pattern, text, re.DOTALL) else 0.0


# ----------------------------------------------------------------------------------------------------------
# DAPO
# ----------------------------------------------------------------------------------------------------------


def dapo_overlong_penalty(
    lengths: Tensor | Sequence[int] | int,
    *,
    max_length: int = 20480,
    cache_length: int = 4096,
    factor: float = 1.0,
) -> Tensor:
    """DAPO soft overlong punishment ``min(-(L - (max_length - cache_length)) / cache_length * factor, 0)``.

    ``lengths``: completion lengths in tokens, ``[B]`` (or a scalar); returns fp32 (fp64 for fp64 input)
    with the same shape: 0 up to ``max_length - cache_length``, then linear down to ``-factor`` at
    ``max_length`` (and further below past it, as verl).
    """
    if not (isinstance(cache_length, int) and 0 < cache_length <= max_length):
        raise ValueError(
            f"need 0 < cache_length <= max_length, got cache_length={cache_length!r}, max_length={max_length!r}"
        )
    x = torch.as_tensor(lengths)
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"lengths must be real numbers, got dtype {x.dtype} with shape {list(x.shape)}")
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        raise ValueError(f"lengths must be finite and >= 0, got shape {list(x.shape)}")
    exceed = x - (max_length - cache_length)
    return torch.clamp(-exceed / cache_length * factor, max=0.0)


def dapo_reward(
    correct: Tensor | Sequence[bool] | bool,
    lengths: Tensor | Sequence[int] | int,
    *,
    max_length: int = 20480,
    cache_length: int = 4096,
    factor: float = 1.0,
    overlong_shaping: bool = True,
) -> Tensor:
    """DAPO reward: +1 if correct else -1, plus :func:`dapo_overlong_penalty` when ``overlong_shaping``.

    ``correct`` and ``lengths`` ``[B]`` (or scalars); returns fp32 ``[B]``.
    """
    c = torch.as_tensor(correct)
    base = torch.where(c.bool(), 1.0, -1.0).to(torch.float32)
    if not overlong_shaping:
        return base
    pen = dapo_overlong_penalty(lengths, max_length=max_length, cache_length=cache_length, factor=factor)
    if pen.shape != base.shape:
        raise ValueError(
            f"correct and lengths must have the same shape, got {list(base.shape)} and {list(pen.shape)}"
        )
    return base + pen.to(torch.float32)

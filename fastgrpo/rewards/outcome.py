"""Verifiable outcome rewards: answer extraction, answer equivalence, format reward, DAPO overlong shaping.

Everything here works on strings and Python numbers (plus tensors for the length penalty), so it runs in
any trainer. The pieces:

- **Gold answers** (:func:`gold_answer`): a dataset's answer field as users have it: the text after GSM8K's
  ``####``, the last ``\\boxed{…}`` of a worked solution (MATH), else the whole string.
- **Extraction** (:func:`extract_answer`): the content of the last ``<answer>…</answer>`` (and, inside it,
  the last ``\\boxed{…}`` when there is one), else the last ``\\boxed{…}`` / ``\\fbox{…}`` with balanced
  braces, else the text after the last GSM8K ``####``, else the text after the last "the (final) answer is" or
  a line-initial "Answer:" up to the end of its line, sentence or clause.
- **Two checkers** (``backend`` of :func:`accuracy_reward`): ``math_verify`` (:mod:`fastgrpo.rewards.mathverify`,
  the library TRL and open-r1 use; the default, ``auto``, when installed) and ``builtin``, fastgrpo's own,
  below. ``docs/answers.md`` measures the two against hand-judged pairs (``bench/answer_agreement.py``).
- **Builtin equivalence** (:func:`answers_equivalent`): ``exact`` (after :func:`normalize_answer`), ``numeric``
  (integers, decimals, ``1,000``, ``3/4``, ``\\frac{3}{4}``, mixed numbers ``1 1/2``, ``50%`` as 0.5 or 50;
  currency signs, degrees, trailing units and a leading ``x =`` dropped; relative tolerance), ``choice``
  (option letters: ``(B)``, ``B.``, ``Option B``, ``b``), ``symbolic`` (sympy, imported lazily; a clear error
  when missing) and ``auto`` (exact, numeric, unordered sets ``{1, 2}`` / ``1, 2`` / ``x = 1 or x = 2`` /
  ``\\pm 2``, then symbolic when sympy is installed). ``exact`` and ``choice`` are string comparisons and
  run the same under both backends.
- **Format** (:func:`format_reward`): 1 when the completion fully matches
  ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL), as R1-V / GRPO-CARE.
- **DAPO** (:func:`dapo_overlong_penalty`, :func:`dapo_reward`): the soft overlong punishment
  ``R_len(L) = min(-(L - (L_max - L_c)) / L_c * factor, 0)`` added to a +1 / -1 correctness reward
  (verl ``math_dapo``); paper setting ``L_max = 20480``, ``L_c = 4096``, ``factor = 1``. The dynamic-sampling
  group filter is :func:`fastgrpo.sampling.dynamic_group_filter`.

Differences from the official code: the builtin checker's extraction and numeric parsing are our own
(math-verify and the verl graders each use their own heuristics), so rare edge cases (units written as single
letters, matrices) may be judged differently; ``symbolic`` uses ``sympy.parse_expr`` on a light
LaTeX-to-Python rewrite, not ``latex2sympy``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from fastgrpo.rewards.mathverify import has_math_verify, math_verify_correct, require_math_verify

__all__ = [
    "THINK_ANSWER_PATTERN",
    "ANSWER_BACKENDS",
    "ANSWER_REWARDS",
    "gold_answer",
    "answer_span",
    "resolve_answer_backend",
    "extract_boxed",
    "extract_answer_tag",
    "extract_answer",
    "normalize_answer",
    "answer_core",
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
ANSWER_BACKENDS = ("auto", "math_verify", "builtin")
# Modes whose answers are maths, judged by the chosen backend; "exact" and "choice" compare strings.
_MATH_MODES = ("auto", "numeric", "symbolic")
# Reward schemes that compare against the example's gold answer (a task without answers cannot feed them).
ANSWER_REWARDS = ("accuracy", "dapo")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_IS = re.compile(
    r"the\s+(?:final\s+|correct\s+)?answer\s+(?:is|should\s+be)\s*:?\s*|^[ \t]*(?:final\s+)?answer\s*:\s*",
    re.IGNORECASE | re.MULTILINE,
)
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
# Where a prose answer ends: a sentence end, or a clause that explains it ("100, since ...").
_CLAUSE_END = re.compile(r"\.\s|,\s+(?!and\b|or\b)(?=[A-Za-z]{2,})")


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
    rest = _CLAUSE_END.split(rest)[0].strip()
    return rest.rstrip(".").strip() or None


def _after_hashes(text: str) -> str | None:
    found = _GSM8K.findall(text)
    if not found:
        return None
    return found[-1].strip() or None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: ``<answer>`` tag, else ``\\boxed{}``, else GSM8K's ``#### …``,
    else "the answer is …" / "Answer: …".

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
    hashes = _after_hashes(text)
    if hashes is not None:
        return hashes
    return _after_answer_is(text)


def answer_span(text: str) -> str | None:
    """The answer marked by an ``<answer>`` tag or a GSM8K ``####`` line (markers math-verify does not know),
    else None."""
    tag = extract_answer_tag(text)
    return tag if tag is not None else _after_hashes(text)


def gold_answer(gold: str | float | int) -> str:
    """The final answer in a dataset's gold field: after the last ``####`` (GSM8K), else the last
    ``\\boxed{}`` (a worked MATH solution), else the whole value as a stripped string."""
    text = str(gold)
    hashes = _after_hashes(text)
    if hashes is not None:
        return hashes
    boxed = extract_boxed(text)
    return boxed if boxed is not None else text.strip()


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
    s = s.replace("\\$", "").replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\varnothing", "\\emptyset").replace("\\{\\}", "\\emptyset")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return s.lower()


_CURRENCY = re.compile(r"^\\?\$\s*(?=[-+]?\.?\d)")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_TRAILING_TEXT = re.compile(r"(?<=[\d}%])\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}\s*$")
_TRAILING_WORDS = re.compile(r"(?<=[\d.%])\s+[A-Za-z]{2,}(?:[/\s]+[A-Za-z]+)*\.?\s*$")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*(?=\S)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")


def _unwrap_dollars(s: str) -> str:
    s = s.strip()
    if len(s) > 1 and s.startswith("$") and s.endswith("$") and not s.endswith("\\$"):
        return s.strip("$").strip()
    return s


def answer_core(s: str) -> str:
    """The value of an answer without its decorations: ``$…$`` math delimiters, a leading currency sign,
    degrees, a trailing unit (``\\text{cm}``, ``12 km/h``, ``7 apples``) and a leading ``x =``.

    ``"\\$1,234.50"`` -> ``"1,234.50"``, ``"90^\\circ"`` -> ``"90"``, ``"x = 5"`` -> ``"5"``. Units written
    as one letter (``5 m``) stay: they cannot be told from a variable.
    """
    t = _unwrap_dollars(s)
    t = _CURRENCY.sub("", t)
    t = _DEGREES.sub("", t)
    t = _TRAILING_TEXT.sub("", t)
    t = _TRAILING_WORDS.sub("", t)
    t = _ASSIGNMENT.sub("", t.strip())
    return t.strip()


def _to_fraction(s: str) -> Fraction | None:
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _mixed_number(s: str) -> float | None:
    # "1 1/2" and "1\frac{1}{2}" are 3/2 (read before spaces are dropped: "11/2" is 5.5)
    m = re.fullmatch(r"([-+]?)(\d+)\s+(\d+)\s*/\s*(\d+)", s.strip()) or re.fullmatch(
        r"([-+]?)(\d+)\s*\\d?frac\s*\{(\d+)\}\s*\{(\d+)\}", s.strip()
    )
    if not m or int(m.group(4)) == 0:
        return None
    val = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
    return float(-val if m.group(1) == "-" else val)


def parse_number(s: str) -> float | None:
    """A number written as ``12``, ``-3.5``, ``1,000``, ``1e-3``, ``3/4``, ``\\frac{3}{4}``, ``1 1/2``, ``50%``
    (0.5); else None."""
    mixed = _mixed_number(_unwrap_dollars(s))
    if mixed is not None:
        return mixed
    t = normalize_answer(s)
    percent = t.endswith("\\%") or t.endswith("%")
    t = t.removesuffix("\\%").removesuffix("%")
    if _THOUSANDS.fullmatch(t):
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


def _number_readings(s: str) -> list[float]:
    """The values an answer may mean: ``[]`` (not a number), ``[x]``, or for a percentage ``[x/100, x]``
    (``50%`` answers "what percent" with gold ``50`` as well as a gold ``0.5``)."""
    x = parse_number(s)
    if x is None:
        return []
    return [x, x * 100.0] if normalize_answer(s).endswith("%") else [x]


def numeric_equal(a: str, b: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Both parse as numbers (:func:`parse_number`, after :func:`answer_core`) and agree within ``rel_tol`` /
    ``abs_tol``; a percentage matches its value or its value / 100."""
    xs, ys = _number_readings(answer_core(a)), _number_readings(answer_core(b))
    return any(math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol) for x in xs for y in ys)


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
            "sympy is needed for symbolic answer checking: "
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
    t = t.replace("\\infty", "oo")
    t = t.replace("{", "(").replace("}", ")").replace("\\", "")
    return t


# Names sympy reads as maths in the rewritten text; any other run of letters is prose or an unknown command
# (implicit multiplication would read "pmatrix" or "Paris" as a product of letters, equal to its anagrams).
_SYMPY_NAMES = frozenset({"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "oo"})


def _words_are_maths(python_expr: str) -> bool:
    return all(w in _SYMPY_NAMES for w in re.findall(r"[A-Za-z]{2,}", python_expr))


def symbolic_equal(a: str, b: str) -> bool:
    """``a - b`` simplifies to 0 under sympy (LaTeX lightly rewritten to Python syntax). Needs sympy.

    False when either side holds a word sympy would read as a product of letters (text, ``\\begin{pmatrix}``).
    """
    sympy = require_sympy()
    from sympy.parsing.sympy_parser import (
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = (*standard_transformations, implicit_multiplication_application)
    pa, pb = _latex_to_python(a), _latex_to_python(b)
    if not (_words_are_maths(pa) and _words_are_maths(pb)):
        return False
    try:
        # a model's "9^9^9^9" or "99999!" would take sympy hours to evaluate: factorials are checked in the text
        # (sympy computes an integer's factorial even unevaluated), powers on the unevaluated expression
        if any(_COSTLY_FACTORIAL.search(p) for p in (pa, pb)) or any(
            _too_costly(parse_expr(p, transformations=transformations, evaluate=False), sympy)
            for p in (pa, pb)
        ):
            return False
        x = parse_expr(pa, transformations=transformations, evaluate=True)
        y = parse_expr(pb, transformations=transformations, evaluate=True)
        return bool(sympy.simplify(x - y) == 0)
    except Exception:  # sympy raises many exception types on malformed input; not equal then
        return False


_MAX_EXPONENT = 1000  # the largest |exponent| of a power with a numeric exponent, and factorial argument


#: a factorial of a number over _MAX_EXPONENT or of a bracketed expression ("(99!)!")
_COSTLY_FACTORIAL = re.compile(r"(\d{4,}|\))\s*!")


def _too_costly(expr: Any, sympy: Any) -> bool:
    """An unevaluated expression whose evaluation could run away: a power tower, or a power whose numeric
    exponent exceeds :data:`_MAX_EXPONENT` in magnitude."""
    for p in expr.atoms(sympy.Pow):
        exp = p.exp
        # a power inside an exponent (other than the x**-1 of a quotient) makes a tower
        if any(not q.exp.is_Number or abs(q.exp) > 1 for q in exp.atoms(sympy.Pow)):
            return True
        if not exp.free_symbols and abs(complex(sympy.N(exp))) > _MAX_EXPONENT:
            return True
    return False


def _has_sympy() -> bool:
    try:
        require_sympy()
    except ImportError:
        return False
    return True


def _split_top_level(s: str) -> list[str]:
    """``s`` split at commas outside brackets and at the words "or" / "and"."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [
        p.strip()
        for part in parts
        for p in re.split(r"\s+(?:or|and)\s+|\\text\{\s*(?:or|and)\s*\}", part)
        if p.strip()
    ]


def _set_elements(s: str) -> list[str] | None:
    """The elements of an unordered answer (``\\{1, 2\\}``, ``1, 2``, ``x = 1 or x = -3``, ``\\pm 2``), or None
    for a single value, a thousands number (``1,000``) and a bracketed tuple or interval (ordered)."""
    t = _unwrap_dollars(s).replace("\\left", "").replace("\\right", "").strip()
    braced = re.fullmatch(r"\\\{(.*)\\\}", t, re.DOTALL)
    if braced:
        t = braced.group(1)
    elif _THOUSANDS.fullmatch(t) or (t[:1] in "([" and t[-1:] in ")]"):
        return None
    items = []
    for item in _split_top_level(t):
        item = _ASSIGNMENT.sub("", item)
        pm = re.fullmatch(r"(?:\\pm|±)\s*(.+)", item)
        items += [f"-{pm.group(1)}", pm.group(1)] if pm else [item]
    return items if braced or len(items) > 1 else None


def _scalar_equivalent(pred: str, gold: str) -> bool:
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    p, g = answer_core(pred), answer_core(gold)
    if normalize_answer(p) == normalize_answer(g):
        return True
    xs, ys = _number_readings(p), _number_readings(g)
    if xs and ys:
        return any(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x in xs for y in ys)
    return _has_sympy() and symbolic_equal(p, g)


def answers_equivalent(pred: str | None, gold: str | float | int, *, mode: str = "auto") -> bool:
    """Whether a predicted answer string matches the gold answer under ``mode`` (fastgrpo's own checker, the
    ``builtin`` backend; see the module docstring)."""
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
    if _scalar_equivalent(pred, gold_s):
        return True
    ps, gs = _set_elements(pred), _set_elements(gold_s)
    if ps is None and gs is None:
        return False
    ps, gs = ps or [pred], gs or [gold_s]
    # unordered and duplicates ignored: every element has an equal one on the other side
    return all(any(_scalar_equivalent(a, b) for b in gs) for a in ps) and all(
        any(_scalar_equivalent(a, b) for a in ps) for b in gs
    )


def resolve_answer_backend(backend: str) -> str:
    """``"math_verify"`` or ``"builtin"`` for ``backend`` (``"auto"``: math-verify when installed).

    An explicit ``"math_verify"`` without the package raises ImportError (never a silent fallback).
    """
    if backend not in ANSWER_BACKENDS:
        raise ValueError(f"backend must be one of {ANSWER_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "math_verify" if has_math_verify() else "builtin"
    if backend == "math_verify":
        require_math_verify()
    return backend


def accuracy_reward(
    completion: str, gold: str | float | int, *, mode: str = "auto", backend: str = "auto"
) -> float:
    """1.0 when ``completion`` answers ``gold`` correctly, else 0.0.

    ``gold`` goes through :func:`gold_answer` (GSM8K ``####``, a worked solution's ``\\boxed{}``). ``mode``
    ``auto`` / ``numeric`` / ``symbolic`` answers are judged by ``backend``: ``math_verify``
    (:func:`fastgrpo.rewards.mathverify.math_verify_correct`), ``builtin`` (:func:`extract_answer` then
    :func:`answers_equivalent`) or ``auto`` (math-verify when installed); ``exact`` and ``choice`` are string
    comparisons, the same under both. An empty gold answer raises ``ValueError`` (a task without answers).
    """
    if mode not in EQUIVALENCE_MODES:
        raise ValueError(f"mode must be one of {EQUIVALENCE_MODES}, got {mode!r}")
    gold_s = gold_answer(gold)
    if not gold_s:
        raise ValueError(
            "reward 'accuracy': the gold answer is empty; the task has no answers (a dataset without its "
            "answer column, task.answer_field) or this example's answer is blank"
        )
    if mode in _MATH_MODES and resolve_answer_backend(backend) == "math_verify":
        return float(math_verify_correct(completion, gold_s, answer_span(completion)))
    return float(answers_equivalent(extract_answer(completion), gold_s, mode=mode))


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
    backend: str = "auto",
    pattern: str = THINK_ANSWER_PATTERN,
    strip: bool = False,
) -> OutcomeScores:
    """Accuracy (:func:`accuracy_reward`) and format rewards of a batch plus the extracted answers (COPO
    needs them), ``[B]`` each."""
    if len(completions) != len(golds):
        raise ValueError(
            f"completions and golds must have one length, got {len(completions)} and {len(golds)}"
        )
    answers = [extract_answer(c) for c in completions]
    acc = [accuracy_reward(c, g, mode=mode, backend=backend) for c, g in zip(completions, golds)]
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

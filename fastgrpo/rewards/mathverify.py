"""The math-verify backend of the accuracy reward (``backend="math_verify"``; ``"auto"`` when installed).

`math-verify <https://github.com/huggingface/Math-Verify>`_ is the answer checker TRL's ``accuracy_reward`` and
open-r1 use: it extracts LaTeX / expressions from text, parses them to sympy through ``latex2sympy2_extended``
(units, percentages, sets, intervals, matrices, equations) and compares gold and prediction numerically and
symbolically. It is imported lazily, only here; ``pip install 'fastgrpo[math-verify]'`` installs it.

How a (completion, gold) pair is judged (:func:`math_verify_correct`):

1. **Gold**: :func:`fastgrpo.rewards.outcome.gold_answer` (the text after GSM8K's ``####``, the last
   ``\\boxed{}`` of a worked solution, else the whole string), read as LaTeX (:func:`as_latex`).
2. **Prediction**: when the completion marks its answer in a way math-verify does not know (an
   ``<answer>…</answer>`` tag, a GSM8K ``#### N`` line), that span is read as LaTeX like the gold. Otherwise
   math-verify's own extraction runs on the whole completion with TRL's settings: ``\\boxed{}`` first, then
   the anchored patterns ("final answer is", "answer:", LaTeX environments); a completion with no anchored
   answer scores 0, as in TRL (it never grabs the last number of free text).
3. ``verify(gold, prediction)`` (gold first: math-verify's comparison is asymmetric for equations).

"Read as LaTeX" (:func:`as_latex`) wraps a bare span in ``$…$`` so math-verify parses it as one expression
(bare, ``1, 2, 3`` parses as the decimal ``1.2`` and ``2\\pi`` as ``2``) and turns plain words into
``\\text{…}`` so units are dropped (bare in ``$…$``, ``18 dollars`` would be the product of the letters).

Timeouts: math-verify bounds parsing and comparison with ``signal.alarm``, which works in the main thread
only; elsewhere (a reward thread pool) they run without a timeout, as TRL does.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sys
import threading
from typing import Any

__all__ = ["has_math_verify", "require_math_verify", "as_latex", "math_verify_correct"]

logger = logging.getLogger(__name__)

_TIMEOUT_S = 5
_INSTALL_HINT = "pip install 'fastgrpo[math-verify]' (or pip install math-verify)"

# A plain word (a unit such as "km/h" included): two or more letters not preceded by a backslash (a LaTeX
# command); \text{} spans are skipped by the caller.
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}(?:/[A-Za-z]+)*(?![A-Za-z])")
# Function names that are maths, not units, when written without a backslash.
_MATH_WORDS = frozenset({"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi", "inf"})
# Spans whose letters are not maths or units: text, operator names, environment names.
_PROTECTED = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname|begin|end)\s*\{[^{}]*\}")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def has_math_verify() -> bool:
    """Whether math-verify is installed (looked up without importing it; a dict lookup once imported)."""
    try:
        return importlib.util.find_spec("math_verify") is not None
    except ValueError:  # a module object without a spec (e.g. a test stub)
        return "math_verify" in sys.modules and sys.modules["math_verify"] is not None


def require_math_verify() -> Any:
    """Import and return the ``math_verify`` module, or raise an ImportError that says how to install it."""
    try:
        import math_verify
    except ImportError as e:
        raise ImportError(
            f"the accuracy reward's backend 'math_verify' needs math-verify: {_INSTALL_HINT}"
        ) from e
    return math_verify


def _words_to_text(s: str) -> str:
    # protected spans (\text{...}, \begin{pmatrix}) are left as they are; words elsewhere become \text{word}
    out, last = [], 0
    for m in _PROTECTED.finditer(s):
        out.append(_WORD.sub(_text_word, s[last : m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(_WORD.sub(_text_word, s[last:]))
    return "".join(out)


def _text_word(m: re.Match) -> str:
    word = m.group(0)
    return word if word.lower() in _MATH_WORDS else f"\\text{{{word}}}"


def as_latex(span: str) -> str:
    """A bare answer span as math-verify's LaTeX input: unchanged when it already holds ``$…$`` (an unescaped
    dollar) or ``\\boxed``, else plain words wrapped in ``\\text{}`` and the whole in ``$…$``.

    ``"18 dollars"`` -> ``"$18 \\text{dollars}$"``; ``"\\frac{1}{2}"`` -> ``"$\\frac{1}{2}$"``.
    """
    span = span.strip()
    if _UNESCAPED_DOLLAR.search(span) or "\\boxed" in span:
        return span
    return f"${_words_to_text(span)}$"


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return _TIMEOUT_S, _TIMEOUT_S
    for name in ("math_verify.parser", "math_verify.grader"):  # their "timeout is disabled" warning, per call
        logging.getLogger(name).setLevel(logging.ERROR)
    return None, None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold_latex: str, timeout: int | None) -> tuple:
    # One gold is scored against G completions: parse it once. Tuples: the cache hands out shared objects.
    mv = require_math_verify()
    parsed = tuple(mv.parse(gold_latex, parsing_timeout=timeout))
    if not parsed:  # logged once per gold (cached)
        logger.warning(
            "math-verify cannot parse the gold answer %r: every completion scores 0 on it", gold_latex
        )
    return parsed


def _parse_span(span_latex: str, timeout: int | None) -> list:
    mv = require_math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return mv.parse(
        span_latex, extraction_config=config, extraction_mode="first_match", parsing_timeout=timeout
    )


def _parse_completion(text: str, timeout: int | None) -> list:
    # TRL's accuracy_reward settings: boxed first, and never an unanchored number from the reasoning
    mv = require_math_verify()
    config = [
        mv.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
        mv.ExprExtractionConfig(try_extract_without_anchor=False),
    ]
    return mv.parse(text, extraction_config=config, extraction_mode="first_match", parsing_timeout=timeout)


def math_verify_correct(completion: str, gold: str, span: str | None) -> bool:
    """Whether ``completion`` answers ``gold`` under math-verify (module docstring: the three steps).

    ``gold``: the gold answer (already through :func:`~fastgrpo.rewards.outcome.gold_answer`); ``span``: the
    answer span fastgrpo found in a marker math-verify does not know (``<answer>`` tag, ``####`` line), or
    None to let math-verify extract from the whole completion.
    """
    mv = require_math_verify()
    parse_timeout, verify_timeout = _timeouts()
    gold_parsed = list(_parse_gold(as_latex(gold), parse_timeout))
    if not gold_parsed:
        return False
    if span is not None:
        pred = _parse_span(as_latex(span), parse_timeout)
    else:
        pred = _parse_completion(completion, parse_timeout)
    if not pred:
        return False
    return bool(mv.verify(gold_parsed, pred, timeout_seconds=verify_timeout))

"""The accuracy reward's math-verify backend, backend selection, and the agreement table of docs/answers.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastgrpo.config import ConfigError, load_config
from fastgrpo.rewards import build_scheme
from fastgrpo.rewards.mathverify import as_latex, has_math_verify
from fastgrpo.rewards.outcome import accuracy_reward, gold_answer, outcome_rewards, resolve_answer_backend

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(REPO))

from bench import answer_agreement as agreement  # noqa: E402
from bench.answer_pairs import ANSWER_PAIRS, CATEGORIES  # noqa: E402

needs_math_verify = pytest.mark.skipif(not has_math_verify(), reason="math-verify is not installed")


@pytest.fixture
def no_math_verify(monkeypatch):
    """math-verify made unimportable (a None entry in sys.modules makes `import` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    assert not has_math_verify()


# -- backend selection -------------------------------------------------------------------------------------


@needs_math_verify
def test_auto_is_math_verify_when_installed():
    assert resolve_answer_backend("auto") == "math_verify"
    assert resolve_answer_backend("builtin") == "builtin"


def test_auto_falls_back_to_builtin_without_the_package(no_math_verify):
    assert resolve_answer_backend("auto") == "builtin"
    assert accuracy_reward("<answer>3/4</answer>", "0.75") == 1.0  # auto still works


def test_explicit_math_verify_without_the_package_is_an_error(no_math_verify):
    with pytest.raises(ImportError, match="pip install"):
        accuracy_reward("<answer>1</answer>", "1", backend="math_verify")
    # at config time, naming the reward term and the parameter
    with pytest.raises(ConfigError, match=r"rewards\.0\.params.*backend.*math-verify is not installed"):
        load_config(None, ["rewards=[{name: accuracy, params: {backend: math_verify}}]"])
    with pytest.raises(ValueError, match="math-verify is not installed"):
        build_scheme({"name": "accuracy", "params": {"backend": "math_verify"}})


def test_backend_is_validated():
    with pytest.raises(ValueError, match="backend must be one of"):
        accuracy_reward("<answer>1</answer>", "1", backend="sympy")
    with pytest.raises(ConfigError, match=r"rewards\.0\.params.*backend"):
        load_config(None, ["rewards=[{name: accuracy, params: {backend: nope}}]"])


@needs_math_verify
def test_scheme_passes_the_backend_through():
    # math-verify reads \log_2 8 as 3; the builtin checker has no LaTeX parser for it
    text, gold = "The value is $\\boxed{\\log_2 8}$.", "3"
    assert build_scheme({"name": "accuracy", "params": {"backend": "math_verify"}})(text, gold) == 1.0
    assert build_scheme({"name": "accuracy", "params": {"backend": "builtin"}})(text, gold) == 0.0
    cfg = load_config(None, ["rewards=[{name: accuracy, params: {backend: builtin}}]"])
    assert cfg.rewards[0].params == {"backend": "builtin"}


# -- the math-verify backend -------------------------------------------------------------------------------


def test_as_latex():
    assert as_latex("18 dollars") == "$18 \\text{dollars}$"
    assert as_latex("12 km/h") == "$12 \\text{km/h}$"
    assert as_latex("5\\text{ cm}") == "$5\\text{ cm}$"  # already text: unchanged
    assert (
        as_latex("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}") == "$\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}$"
    )
    assert as_latex("\\sin x") == "$\\sin x$"
    assert as_latex("$\\frac{1}{2}$") == "$\\frac{1}{2}$"  # already LaTeX
    assert as_latex("\\boxed{3}") == "\\boxed{3}"
    assert as_latex("\\$18") == "$\\$18$"  # an escaped dollar is a currency sign, not a delimiter


@needs_math_verify
@pytest.mark.parametrize(
    "completion, gold, want",
    [
        ("<answer>1, 2, 3</answer>", "\\{3,2,1\\}", 1.0),  # bare, math-verify reads "1, 2, 3" as 1.2
        ("<answer>2\\pi</answer>", "2\\pi", 1.0),  # bare, math-verify reads it as 2
        ("<answer>18 dollars</answer>", "18", 1.0),
        ("Weng earned 10.\n#### 10", "She earns $<<0.2*50=10>>10.\n#### 10", 1.0),  # GSM8K gold and answer
        ("The area is \\boxed{2\\sqrt{3}}.", "\\sqrt{12}", 1.0),
        ("Clearly 7 is right, so 7.", "7", 0.0),  # no anchored answer: never the last number of free text
        ("<answer>8</answer>", "7", 0.0),
    ],
)
def test_math_verify_backend(completion, gold, want):
    assert accuracy_reward(completion, gold, backend="math_verify") == want


@needs_math_verify
def test_exact_and_choice_modes_are_the_same_under_both_backends():
    for backend in ("math_verify", "builtin"):
        assert accuracy_reward("<answer>(B)</answer>", "B", mode="choice", backend=backend) == 1.0
        assert accuracy_reward("<answer>Yes</answer>", "yes", mode="exact", backend=backend) == 1.0
        assert accuracy_reward("<answer>no</answer>", "yes", mode="exact", backend=backend) == 0.0


@needs_math_verify
def test_outcome_rewards_backend():
    scores = outcome_rewards(
        ["<answer>1 1/2</answer>", "<answer>x \\in [1, 3]</answer>"], ["3/2", "[1,3]"], backend="math_verify"
    )
    assert scores.accuracy.tolist() == [0.0, 1.0]  # the two backends differ on both (docs/answers.md)
    scores = outcome_rewards(
        ["<answer>1 1/2</answer>", "<answer>x \\in [1, 3]</answer>"], ["3/2", "[1,3]"], backend="builtin"
    )
    assert scores.accuracy.tolist() == [1.0, 0.0]


def test_empty_gold_is_refused_naming_the_reward():
    for backend in ("builtin", "auto"):
        with pytest.raises(ValueError, match="reward 'accuracy'.*gold answer is empty"):
            accuracy_reward("<answer>1</answer>", "", backend=backend)
    with pytest.raises(ValueError, match="reward 'accuracy'"):
        accuracy_reward("<answer>1</answer>", "  ")


def test_gold_answer():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gold_answer("So the sum is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert gold_answer(" 42 ") == "42"
    assert gold_answer(7) == "7"


# -- the agreement table -------------------------------------------------------------------------------------


def test_the_pair_set():
    assert len(ANSWER_PAIRS) >= 100
    for cat in CATEGORIES:
        pairs = [p for p in ANSWER_PAIRS if p.category == cat]
        assert len(pairs) >= 15, cat
        assert any(p.expected for p in pairs) and not all(p.expected for p in pairs), cat
    assert {p.category for p in ANSWER_PAIRS} == set(CATEGORIES)
    assert sum(p.held_out for p in ANSWER_PAIRS) >= 40
    assert len({(p.completion, p.gold) for p in ANSWER_PAIRS}) == len(ANSWER_PAIRS)  # no duplicates


@needs_math_verify
def test_agreement_table_matches_docs():
    judged = agreement.judge()
    counts = agreement.agreement_counts(judged)
    assert sum(counts["all"].values()) == len(ANSWER_PAIRS)
    assert sum(sum(counts[c].values()) for c in CATEGORIES) == len(ANSWER_PAIRS)
    assert agreement.agreement_table(judged) == agreement.documented_table(), (
        "docs/answers.md is stale: run `python -m bench.answer_agreement --write`"
    )


def test_agreement_table_is_computed(monkeypatch):
    # A checker that accepts everything is right exactly on the pairs expected True: the table must say so.
    monkeypatch.setattr(agreement, "accuracy_reward", lambda completion, gold, backend: 1.0)
    judged = agreement.judge()
    counts = agreement.agreement_counts(judged)
    expected_true = sum(p.expected for p in ANSWER_PAIRS)
    assert counts["all"]["both right"] == expected_true
    assert counts["all"]["both wrong"] == len(ANSWER_PAIRS) - expected_true
    assert agreement.agreement_table(judged) != agreement.documented_table()

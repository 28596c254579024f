"""Agreement of the accuracy reward's two answer checkers (math-verify, fastgrpo's builtin) with hand verdicts.

Runs both backends of :func:`fastgrpo.rewards.outcome.accuracy_reward` on every pair of
``bench/answer_pairs.py`` and counts, per category, the pairs where both checkers give the expected verdict,
only math-verify does, only the builtin does, or neither does. ``docs/answers.md`` holds the table between
two markers; ``tests/test_math_verify.py`` recomputes it and checks it matches.

    python -m bench.answer_agreement            # print the table and the pairs either checker gets wrong
    python -m bench.answer_agreement --write    # also rewrite the table in docs/answers.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.answer_pairs import ANSWER_PAIRS, CATEGORIES, AnswerPair
from fastgrpo.rewards.outcome import accuracy_reward

DOC = Path(__file__).resolve().parents[1] / "docs" / "answers.md"
START, END = "<!-- agreement-table:start -->", "<!-- agreement-table:end -->"
COLUMNS = ("both right", "only math-verify right", "only builtin right", "both wrong")


@dataclass(frozen=True)
class Judged:
    pair: AnswerPair
    math_verify: bool
    builtin: bool

    @property
    def outcome(self) -> str:
        mv_ok, bi_ok = self.math_verify == self.pair.expected, self.builtin == self.pair.expected
        return COLUMNS[(not mv_ok) * 2 + (not bi_ok)] if mv_ok == bi_ok else COLUMNS[1 if mv_ok else 2]


def judge(pairs: list[AnswerPair] = ANSWER_PAIRS) -> list[Judged]:
    """Both checkers' verdicts on every pair (math-verify must be installed)."""
    out = []
    for p in pairs:
        mv = accuracy_reward(p.completion, p.gold, backend="math_verify") > 0
        bi = accuracy_reward(p.completion, p.gold, backend="builtin") > 0
        out.append(Judged(p, mv, bi))
    return out


def agreement_counts(judged: list[Judged]) -> dict[str, dict[str, int]]:
    """``{row: {column: count}}`` over :data:`COLUMNS`: the categories in :data:`CATEGORIES` order, ``"all"``
    and ``"held-out"`` (the pairs no code was tuned on, all categories)."""
    counts = {c: dict.fromkeys(COLUMNS, 0) for c in (*CATEGORIES, "all", "held-out")}
    for j in judged:
        counts[j.pair.category][j.outcome] += 1
        counts["all"][j.outcome] += 1
        if j.pair.held_out:
            counts["held-out"][j.outcome] += 1
    return counts


def agreement_table(judged: list[Judged]) -> str:
    """The Markdown table of :func:`agreement_counts` (what ``docs/answers.md`` holds between its markers)."""
    counts = agreement_counts(judged)
    lines = [
        "| category | pairs | " + " | ".join(COLUMNS) + " | math-verify accuracy | builtin accuracy |",
        "|---|" + "---:|" * (len(COLUMNS) + 3),
    ]
    for cat, row in counts.items():
        n = sum(row.values())
        mv = row[COLUMNS[0]] + row[COLUMNS[1]]
        bi = row[COLUMNS[0]] + row[COLUMNS[2]]
        name = f"**{cat}**" if cat in ("all", "held-out") else cat
        cells = " | ".join(str(row[c]) for c in COLUMNS)
        lines.append(f"| {name} | {n} | {cells} | {mv / n:.2f} | {bi / n:.2f} |")
    return "\n".join(lines)


def disagreements(judged: list[Judged]) -> str:
    """The pairs at least one checker gets wrong, one per line."""
    rows = []
    for j in judged:
        if j.outcome != COLUMNS[0]:
            gold = j.pair.gold if "####" not in j.pair.gold else "…" + j.pair.gold.rsplit("\n", 1)[-1]
            rows.append(
                f"- [{j.pair.category}] {j.outcome}: completion {j.pair.completion!r}, gold {gold!r}, "
                f"expected {j.pair.expected}, math-verify {j.math_verify}, builtin {j.builtin}"
            )
    return "\n".join(rows)


def documented_table(doc: Path = DOC) -> str:
    """The table committed in ``docs/answers.md`` (between the markers)."""
    text = doc.read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip()


def write_table(table: str, doc: Path = DOC) -> None:
    text = doc.read_text()
    head, tail = text[: text.index(START) + len(START)], text[text.index(END) :]
    doc.write_text(f"{head}\n{table}\n{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the table in {DOC}")
    args = parser.parse_args(argv)
    judged = judge()
    table = agreement_table(judged)
    print(table)
    print()
    print(disagreements(judged))
    if args.write:
        write_table(table)
        print(f"\nwrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

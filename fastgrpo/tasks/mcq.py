"""Multiple-choice questions generated in code, for answer-consistency schemes (GRPO-CARE, COPO).

Each question has four options ``A``-``D`` and one correct letter; ``meta["choices"]`` lists the option
texts and ``meta["correct_index"]`` the right one. Kinds: the sum of two numbers, the largest of four
numbers, the even number among odd ones, and the next term of an arithmetic sequence.
"""

from __future__ import annotations

import random

from .base import Example, Task, one_shot

__all__ = ["MultipleChoiceTask"]

LETTERS = "ABCD"
_INSTRUCTION = "Answer with the letter of the correct option in <answer></answer>."
_EXAMPLE_Q = f"What is 7+1? A) 9 B) 8 C) 6 D) 71. {_INSTRUCTION}"
_EXAMPLE_A = "<answer>B</answer>"
KINDS = ("sum", "largest", "even", "sequence")


class MultipleChoiceTask(Task):
    name = "mcq"

    def __init__(self, kinds: list[str] | tuple[str, ...] = KINDS, hi: int = 50, one_shot: bool = True):
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"mcq task: kinds must be a non-empty subset of {KINDS}, got {kinds}")
        self.kinds, self.hi, self.one_shot = tuple(kinds), hi, one_shot

    def make(self, rng: random.Random) -> Example:
        kind = rng.choice(self.kinds)
        if kind == "sum":
            a, b = rng.randint(1, self.hi), rng.randint(1, self.hi)
            right = a + b
            wrong = rng.sample(sorted({right + d for d in (-10, -2, -1, 1, 2, 10)} - {right}), 3)
            stem = f"What is {a}+{b}?"
        elif kind == "largest":
            nums = rng.sample(range(1, self.hi + 1), 4)
            right, wrong = max(nums), [n for n in nums if n != max(nums)]
            stem = "Which number is the largest?"
        elif kind == "even":
            right = 2 * rng.randint(1, self.hi // 2)
            wrong = [2 * n + 1 for n in rng.sample(range(self.hi // 2), 3)]
            stem = "Which number is even?"
        else:
            start, step = rng.randint(1, 9), rng.randint(2, 6)
            seq = [start + i * step for i in range(4)]
            right = start + 4 * step
            wrong = rng.sample([right + d for d in (-step, -1, 1, step)], 3)
            stem = f"What comes next: {', '.join(map(str, seq))}, ...?"
        options = [right, *wrong]
        rng.shuffle(options)
        idx = options.index(right)
        text = " ".join(f"{LETTERS[i]}) {v}" for i, v in enumerate(options))
        question = f"{stem} {text}. {_INSTRUCTION}"
        messages = (
            one_shot(question, _EXAMPLE_Q, _EXAMPLE_A)
            if self.one_shot
            else [{"role": "user", "content": question}]
        )
        meta = {
            "answer_type": "choice",
            "kind": kind,
            "choices": [str(o) for o in options],
            "correct_index": idx,
        }
        return Example(messages, LETTERS[idx], meta)

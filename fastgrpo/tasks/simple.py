"""The tuned demo tasks: short one-shot questions SmolLM2-135M-Instruct learns within a CPU run.

Both use the worked example measured in ENVIRONMENT.md ("What is 7+1? ..." -> "<answer>8</answer>"):

- ``compare``: "Which number is larger, x or y?" with distinct ``x, y`` in ``[lo, hi]``; accuracy 0.33 ->
  0.61-0.89 in ~65 steps (TRL, 3 seeds).
- ``addition``: single-digit ``a+b``; mean reward 0.49 -> 1.23 over 70 steps, the most reliable.
"""

from __future__ import annotations

import random

from .base import ANSWER_INSTRUCTION, Example, Task, one_shot

__all__ = ["CompareTask", "AdditionTask", "EXAMPLE_QUESTION", "EXAMPLE_ANSWER"]

EXAMPLE_QUESTION = f"What is 7+1? {ANSWER_INSTRUCTION}"
EXAMPLE_ANSWER = "<answer>8</answer>"


class CompareTask(Task):
    """Which of two distinct integers in ``[lo, hi]`` is larger; answer the number."""

    name = "compare"

    def __init__(self, lo: int = 0, hi: int = 99, one_shot: bool = True):
        if hi - lo < 1:
            raise ValueError(f"compare task: need hi > lo, got lo={lo}, hi={hi}")
        self.lo, self.hi, self.one_shot = lo, hi, one_shot

    def make(self, rng: random.Random) -> Example:
        x, y = rng.sample(range(self.lo, self.hi + 1), 2)
        question = f"Which number is larger, {x} or {y}? {ANSWER_INSTRUCTION}"
        messages = (
            one_shot(question, EXAMPLE_QUESTION, EXAMPLE_ANSWER)
            if self.one_shot
            else [{"role": "user", "content": question}]
        )
        return Example(messages, str(max(x, y)), {"answer_type": "numeric", "x": x, "y": y})


class AdditionTask(Task):
    """``a+b`` with ``a, b`` in ``[lo, hi]`` (single digits by default); answer the sum."""

    name = "addition"

    def __init__(self, lo: int = 0, hi: int = 9, one_shot: bool = True):
        if hi < lo:
            raise ValueError(f"addition task: need hi >= lo, got lo={lo}, hi={hi}")
        self.lo, self.hi, self.one_shot = lo, hi, one_shot

    def make(self, rng: random.Random) -> Example:
        a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
        question = f"What is {a}+{b}? {ANSWER_INSTRUCTION}"
        messages = (
            one_shot(question, EXAMPLE_QUESTION, EXAMPLE_ANSWER)
            if self.one_shot
            else [{"role": "user", "content": question}]
        )
        return Example(messages, str(a + b), {"answer_type": "numeric", "a": a, "b": b})

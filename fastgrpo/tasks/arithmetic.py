"""Multi-step arithmetic with step-by-step answers, for process (step-level) rewards.

A question is a left-nested expression of ``num_ops`` operations on small integers, e.g.
``(3 + 4) * 5 - 6``. The expected answer writes one step per line as ``expression = value`` and ends with
``<answer>29</answer>``; a step verifier (``fastgrpo.rewards``' sympy checker) can score each line on its
own. ``meta["steps"]`` holds the gold steps (``["3 + 4 = 7", "7 * 5 = 35", "35 - 6 = 29"]``) and
``meta["expression"]`` the question's expression.
"""

from __future__ import annotations

import random

from .base import Example, Task, one_shot

__all__ = ["ArithmeticTask"]

_INSTRUCTION = (
    "Solve it step by step: write one step per line as 'expression = value', "
    "then put the final answer in <answer></answer>."
)
_EXAMPLE_Q = f"Compute (2 + 3) * 4. {_INSTRUCTION}"
_EXAMPLE_A = "2 + 3 = 5\n5 * 4 = 20\n<answer>20</answer>"


class ArithmeticTask(Task):
    """``num_ops`` operations (``+ - *``) on integers in ``[lo, hi]``, solved left to right."""

    name = "arithmetic"

    def __init__(self, num_ops: int = 2, lo: int = 1, hi: int = 9, ops: str = "+-*", one_shot: bool = True):
        if num_ops < 1:
            raise ValueError(f"arithmetic task: num_ops must be >= 1, got {num_ops}")
        if not ops or any(o not in "+-*" for o in ops):
            raise ValueError(f"arithmetic task: ops must be drawn from '+-*', got {ops!r}")
        self.num_ops, self.lo, self.hi, self.ops, self.one_shot = num_ops, lo, hi, ops, one_shot

    def make(self, rng: random.Random) -> Example:
        value = rng.randint(self.lo, self.hi)
        expr, steps = str(value), []
        for k in range(self.num_ops):
            op, b = rng.choice(self.ops), rng.randint(self.lo, self.hi)
            new = {"+": value + b, "-": value - b, "*": value * b}[op]
            steps.append(f"{value} {op} {b} = {new}")
            # parenthesise so that the written expression evaluates left to right
            expr = (
                f"({expr}) {op} {b}"
                if k and op == "*" and any(o in expr for o in "+-")
                else f"{expr} {op} {b}"
            )
            value = new
        question = f"Compute {expr}. {_INSTRUCTION}"
        messages = (
            one_shot(question, _EXAMPLE_Q, _EXAMPLE_A)
            if self.one_shot
            else [{"role": "user", "content": question}]
        )
        return Example(messages, str(value), {"answer_type": "numeric", "expression": expr, "steps": steps})

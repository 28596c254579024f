"""A planned kernel launch: the kernel, its grid, runtime arguments, constexprs and compile options.

Launchers build a list of :class:`Launch` and run it; the ahead-of-time compile check (``kernels/aot.py``)
builds the same plans from ``meta`` tensors of real model shapes and compiles them for a chosen GPU, so the
configurations checked there are exactly those the launchers use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Launch:
    kernel: Any  # triton JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments by name, in any order
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 1
    after: list = field(default_factory=list)  # host-side callbacks run after the launch (buffer casts)

    def __call__(self) -> None:
        if all(g > 0 for g in self.grid):
            self.kernel[self.grid](
                **self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
            )
        for fn in self.after:
            fn()


def run(plan: list[Launch]) -> None:
    for launch in plan:
        launch()

"""Built-in verifiable tasks, generated in code, and the ``datasets`` plug-in.

``build_task(name, **options)`` returns a :class:`Task`; ``task.split(num_train, num_eval, seed)`` gives
deterministic, disjoint train and eval lists of :class:`Example`.

================  ========================================================================================
name              what
================  ========================================================================================
``compare``       "Which number is larger, x or y?" one-shot (the demo task)
``addition``      single-digit ``a+b`` one-shot
``transit``       text transit maps, RewardMap's question types and difficulty levels
``arithmetic``    multi-step arithmetic with step-by-step answers (process rewards)
``mcq``           four-option multiple choice (GRPO-CARE, COPO)
``transit_map``   transit maps drawn as images, the ``transit`` questions (RewardMap on a VLM)
``video_shapes``  clips of moving shapes, four-option questions with reasoning (GRPO-CARE on a VLM)
``visual_math``   charts and plane figures with integer answers, three difficulties (MMR1 on a VLM)
``dataset``       any ``datasets`` dataset (``source=...``)
================  ========================================================================================

The visual tasks (``transit_map``, ``video_shapes``, ``visual_math``) draw their images with Pillow, imported
only when they run; ``fastgrpo tasks show NAME --n 4 --out DIR`` writes a few examples to look at.
"""

from __future__ import annotations

import inspect
from typing import Any

from .arithmetic import ArithmeticTask
from .base import ANSWER_INSTRUCTION, Example, Task, check_subset, one_shot, render_prompt
from .dataset import DatasetTask
from .mcq import MultipleChoiceTask
from .simple import AdditionTask, CompareTask
from .transit import STAGES, TransitTask
from .video import VideoShapesTask
from .visual_math import VisualMathTask
from .visual_transit import TransitMapTask

__all__ = [
    "ANSWER_INSTRUCTION",
    "Example",
    "Task",
    "TASKS",
    "STAGES",
    "build_task",
    "one_shot",
    "render_prompt",
    "CompareTask",
    "AdditionTask",
    "TransitTask",
    "ArithmeticTask",
    "MultipleChoiceTask",
    "DatasetTask",
    "TransitMapTask",
    "VideoShapesTask",
    "VisualMathTask",
    "check_subset",
]

TASKS: dict[str, type[Task]] = {
    "compare": CompareTask,
    "addition": AdditionTask,
    "transit": TransitTask,
    "arithmetic": ArithmeticTask,
    "mcq": MultipleChoiceTask,
    "transit_map": TransitMapTask,
    "video_shapes": VideoShapesTask,
    "visual_math": VisualMathTask,
    "dataset": DatasetTask,
}


def build_task(name: str, **options: Any) -> Task:
    """The task ``name`` built with ``options``; unknown names or options raise ``ValueError`` naming them."""
    if name not in TASKS:
        raise ValueError(f"task.name: unknown task {name!r} (built-in: {', '.join(TASKS)})")
    cls = TASKS[name]
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in options if k not in params or k == "self"]
    if unknown:
        valid = [p for p in params if p != "self"]
        raise ValueError(
            f"task.options.{unknown[0]}: unknown option for task {name!r} (valid: {', '.join(valid)})"
        )
    return cls(**options)

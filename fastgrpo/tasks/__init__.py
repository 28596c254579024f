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
    "build_splits",
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


def build_splits(tc: Any, reward_names: list[str]) -> tuple[list[Example], list[Example]]:
    """The train and held-out examples of a ``task`` config section (:class:`fastgrpo.config.TaskConfig`;
    ``num_train`` unset: the task's default, all rows of a dataset), checked against the run's reward terms;
    a bad option or dataset raises :class:`~fastgrpo._schema.ConfigError` before any model work."""
    from fastgrpo._schema import ConfigError

    opts = dict(tc.options)
    if tc.name == "dataset":
        if not tc.dataset:
            raise ConfigError("task.dataset: the 'dataset' task needs task.dataset (a path or dataset name)")
        opts.update(source=tc.dataset, split=tc.dataset_split, prompt_field=tc.prompt_field,
                    answer_field=tc.answer_field)  # fmt: skip
        opts.update({k: v for k in ("eval_split", "eval_source") if (v := getattr(tc, k)) is not None})
    try:
        task = build_task(tc.name, **opts)
        num_train = tc.num_train if tc.num_train is not None else task.default_num_train
        train, held_out = task.split(num_train, tc.num_eval, tc.seed)
        if callable(getattr(task, "check_rewards", None)):
            task.check_rewards(reward_names)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return train, held_out

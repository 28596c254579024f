"""``fastgrpo tasks list`` / ``fastgrpo tasks show``: what the built-in tasks are and what a model sees.

:func:`show_task` writes ``n`` examples of a task to a folder: each image as ``example_<i>.png`` (with
``_<j>`` for a second image), each video as an animated ``example_<i>.gif`` plus a strip of all its frames
(``example_<i>_frames.png``), and ``examples.json`` with every example's messages (media parts kept as
placeholders), answer, the files written and ``meta``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from .base import Example, Task

__all__ = ["task_summaries", "parse_options", "show_task", "write_examples"]

logger = logging.getLogger(__name__)


def task_summaries() -> list[tuple[str, str]]:
    """``(name, first line of the task class's docstring, else of its module's)`` of every built-in task."""
    from . import TASKS

    out = []
    for name, cls in TASKS.items():
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        out.append((name, doc[0] if doc else ""))
    return out


def parse_options(items: list[str]) -> dict[str, Any]:
    """Task options from ``KEY=VALUE`` strings, each value read as YAML (``image_size=112``, ``kinds=[bar]``)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"--set {key.strip()}: cannot read {raw!r} as a value: {e}") from None
    return options


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _frame_strip(frames: list[Any]) -> Any:
    from .render import pil

    Image, _, _ = pil()
    w, h = frames[0].size
    strip = Image.new("RGB", (len(frames) * (w + 2) - 2, h), (0, 0, 0))
    for i, f in enumerate(frames):
        strip.paste(f, (i * (w + 2), 0))
    return strip


def write_examples(examples: list[Example], out: str | Path) -> Path:
    """Write ``examples`` to the folder ``out`` (created); returns the path of ``examples.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, ex in enumerate(examples):
        files = []
        for j, image in enumerate(ex.images):
            name = f"example_{i}.png" if j == 0 else f"example_{i}_{j}.png"
            image.save(out / name)
            files.append(name)
        for j, frames in enumerate(ex.videos):
            stem = f"example_{i}" if j == 0 else f"example_{i}_{j}"
            fps = float(ex.meta.get("fps", 2.0))
            frames[0].save(
                out / f"{stem}.gif",
                save_all=True,
                append_images=frames[1:],
                duration=round(1000 / fps),
                loop=0,
            )
            _frame_strip(frames).save(out / f"{stem}_frames.png")
            files += [f"{stem}.gif", f"{stem}_frames.png"]
        records.append(
            {
                "messages": _json_safe(ex.messages),
                "answer": ex.answer,
                "files": files,
                "meta": _json_safe(ex.meta),
            }
        )
    path = out / "examples.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def show_task(task: Task, n: int, out: str | Path, seed: int = 0) -> Path:
    """Draw ``n`` training examples of ``task`` with ``seed`` and write them (:func:`write_examples`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    examples, _ = task.split(n, 0, seed)
    path = write_examples(examples, out)
    logger.info("wrote %d examples of %s to %s", n, task.name, path.parent)
    return path

"""Plug a ``datasets`` dataset in as a task.

``DatasetTask(source, split="train", prompt_field="prompt", answer_field="answer")`` reads any dataset the
``datasets`` library loads offline: a local data file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``), a
directory written by ``Dataset.save_to_disk``, a dataset already in the local Hugging Face cache, or an
in-memory ``datasets.Dataset`` / list of dicts. The prompt field is either a string (one user turn) or a
list of chat messages; every other column is passed to reward functions through ``meta``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .base import Example, Task

__all__ = ["DatasetTask"]

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _load(source: Any, split: str) -> Any:
    if not isinstance(source, (str, Path)):
        return source
    import datasets

    path = Path(source)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"dataset task: unsupported data file {path} (use one of {sorted(_FILE_BUILDERS)})"
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir() and (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))[split]
    return datasets.load_dataset(str(source), split=split)


class DatasetTask(Task):
    name = "dataset"

    def __init__(self, source: Any, split: str = "train", prompt_field: str = "prompt",
                 answer_field: str = "answer", system_prompt: str | None = None):  # fmt: skip
        self.rows = [dict(r) for r in _load(source, split)]
        if not self.rows:
            raise ValueError(f"dataset task: {source!r} split {split!r} is empty")
        for key in (prompt_field, answer_field):
            if key not in self.rows[0]:
                raise ValueError(
                    f"dataset task: no column {key!r} in {source!r} (columns: {sorted(self.rows[0])})"
                )
        self.prompt_field, self.answer_field, self.system_prompt = prompt_field, answer_field, system_prompt

    def example(self, row: dict) -> Example:
        prompt = row[self.prompt_field]
        messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        )
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        meta = {k: v for k, v in row.items() if k not in (self.prompt_field, self.answer_field)}
        meta.setdefault("answer_type", "auto")
        return Example(messages, str(row[self.answer_field]), meta)

    def make(self, rng: random.Random) -> Example:
        return self.example(rng.choice(self.rows))

    def split(self, num_train: int, num_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
        """A seeded permutation: the first ``num_eval`` rows for eval, the next ``num_train`` (or all) for training."""
        order = list(range(len(self.rows)))
        random.Random(seed).shuffle(order)
        num_eval = min(num_eval, len(order) // 2)
        eval_rows, train_rows = order[:num_eval], order[num_eval:]
        if num_train > 0:
            train_rows = train_rows[:num_train]
        return [self.example(self.rows[i]) for i in train_rows], [
            self.example(self.rows[i]) for i in eval_rows
        ]

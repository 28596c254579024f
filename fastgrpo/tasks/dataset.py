"""Plug a ``datasets`` dataset in as a task, in the shapes users have it.

``DatasetTask(source, split="train", prompt_field="prompt", answer_field="answer", eval_split=None,
eval_source=None, system_prompt=None)``. ``source`` (and ``eval_source``) may be:

- an in-memory ``datasets.Dataset`` or ``DatasetDict`` (``split`` picks the split), or a list of dicts;
- a directory written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
- a local data file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``; one split, ``"train"``) or a directory of
  data files (``datasets`` names the splits from the file names: ``train.jsonl``, ``test.jsonl``);
- a dataset name already in the local Hugging Face cache (nothing is downloaded when offline).

Columns, as TRL's GRPO datasets have them:

- ``prompt_field`` (default ``prompt``): a string (one user turn; TRL's *standard* format) or a list of chat
  messages ``{"role", "content"}`` (TRL's *conversational* format, earlier turns and a system turn included;
  content strings or multimodal part lists).
- ``answer_field`` (default ``answer``): the gold answer, a string or number (a GSM8K solution ending in
  ``#### N`` is fine: the accuracy reward reads the part after ``####``). Optional: with ``answer_field=None``,
  or when the default ``answer`` column is absent, every ``Example.answer`` is ``""``, :attr:`has_answers` is
  False and the rewards that compare with a gold answer refuse to run (:meth:`check_rewards`). A column named
  explicitly must exist.
- ``images`` / ``videos``: passed through to ``Example.images`` / ``Example.videos`` as they are (a single
  value becomes a one-item list; how they reach the model is the vision-language pipeline's business).
- Every other column goes to ``Example.meta``, where reward functions read it (``answer_type`` defaults to
  ``auto``).

Splits (:meth:`DatasetTask.split`): with ``eval_split`` or ``eval_source`` the eval examples come from there
and the whole training split is trained on; otherwise ``num_eval`` rows are held out of the training split (a
seeded permutation, at most half of it). ``num_train <= 0`` means every training row: there is no silent cap.
Both counts are logged. The examples are built from the dataset rows on access (the returned sequences are
lazy), so a large dataset or one with images is not decoded up front.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from ..rewards.outcome import ANSWER_REWARDS
from .base import Example, Task

__all__ = ["DatasetTask", "ExampleList", "load_rows"]

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_MEDIA_FIELDS = ("images", "videos")
_DEFAULT_ANSWER_FIELD = "answer"


def _describe(source: Any) -> str:
    return repr(str(source)) if isinstance(source, (str, Path)) else type(source).__name__


def _pick_split(data: Any, split: str, source: Any, what: str) -> Any:
    """``data[split]`` for a ``DatasetDict`` (a dict of splits), ``data`` itself otherwise."""
    if isinstance(data, Mapping):
        if split not in data:
            raise ValueError(
                f"dataset task: {what} {_describe(source)} has no split {split!r} (splits: {list(data)})"
            )
        data = data[split]
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise ValueError(
            f"dataset task: {what} {_describe(source)} is a {type(data).__name__}; streaming datasets are not "
            "supported (load it without streaming=True)"
        )
    return data


def load_rows(source: Any, split: str, *, what: str = "source") -> Any:
    """The rows of ``split`` of ``source`` (module docstring: the accepted kinds): a ``datasets.Dataset`` or a
    list of dicts. ``what`` names the argument in errors (``source`` / ``eval_source``)."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(r, dict) for r in source):
            raise ValueError(f"dataset task: {what} given as a list must hold dicts (one per row)")
        return list(source)
    if not isinstance(source, (str, Path)):
        return _pick_split(source, split, source, what)
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"dataset task: {what} {str(path)!r} is not a supported data file (use one of "
                f"{sorted(_FILE_BUILDERS)}, a save_to_disk directory or a directory of data files)"
            )
        if split != "train":
            raise ValueError(
                f"dataset task: {what} {str(path)!r} is one data file, its only split is 'train' (got "
                f"{split!r}); give a separate eval file as eval_source"
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return _pick_split(datasets.load_from_disk(str(path)), split, source, what)
    try:  # a directory of data files, or a name in the local cache
        return datasets.load_dataset(str(source), split=split)
    except ValueError as e:  # datasets' message for an unknown split names the ones there are
        raise ValueError(f"dataset task: {what} {_describe(source)}: {e}") from None


def _columns(rows: Any) -> list[str]:
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    return list(rows[0]) if len(rows) else []


class ExampleList(Sequence):
    """A lazy sequence of :class:`Example`: ``task.example(rows[i])`` for the chosen row indices."""

    def __init__(self, task: DatasetTask, rows: Any, indices: Sequence[int]):
        self._task, self._rows, self._indices = task, rows, list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self._indices[i]
        return self._task.example(self._rows[row], index=row)

    def __repr__(self) -> str:
        return f"ExampleList({len(self)} examples)"


class DatasetTask(Task):
    """A ``datasets`` dataset as a task (module docstring: sources, columns, splits)."""

    name = "dataset"
    default_num_train = 0  # every row: a user's dataset is used whole unless task.num_train limits it

    def __init__(
        self,
        source: Any,
        split: str = "train",
        prompt_field: str = "prompt",
        answer_field: str | None = _DEFAULT_ANSWER_FIELD,
        system_prompt: str | None = None,
        eval_split: str | None = None,
        eval_source: Any = None,
    ):
        self.source, self.split_name, self.eval_split, self.eval_source = (
            source,
            split,
            eval_split,
            eval_source,
        )
        if eval_source is None and eval_split is not None and eval_split == split:
            raise ValueError(
                f"dataset task: eval_split {eval_split!r} is the training split; name another split, or leave "
                "it unset to hold num_eval rows out of the training split"
            )
        self.rows = load_rows(source, split)
        self.eval_rows = None
        if eval_source is not None or eval_split is not None:
            self.eval_rows = load_rows(
                eval_source if eval_source is not None else source,
                eval_split or split,
                what="eval_source" if eval_source is not None else "source",
            )
        if len(self.rows) == 0:
            raise ValueError(f"dataset task: {_describe(source)} split {split!r} is empty")
        columns = _columns(self.rows)
        if prompt_field not in columns:
            raise ValueError(
                f"dataset task: no column {prompt_field!r} for the prompts in {_describe(source)} (columns: {sorted(columns)}); "
                "set prompt_field"
            )
        if answer_field is not None and answer_field not in columns:
            if answer_field != _DEFAULT_ANSWER_FIELD:
                raise ValueError(
                    f"dataset task: no column {answer_field!r} for the answers in {_describe(source)} (columns: "
                    f"{sorted(columns)}); set answer_field, or answer_field=None for a dataset without answers"
                )
            logger.info(
                "dataset task: %s has no 'answer' column: examples have no gold answer", _describe(source)
            )
            answer_field = None
        if self.eval_rows is not None:
            eval_columns = _columns(self.eval_rows)
            for kind, field in (("prompt", prompt_field), ("answer", answer_field)):
                if field is not None and field not in eval_columns:
                    raise ValueError(
                        f"dataset task: the eval data has no {kind} column {field!r} (columns: "
                        f"{sorted(eval_columns)})"
                    )
        self.prompt_field, self.answer_field, self.system_prompt = prompt_field, answer_field, system_prompt

    @property
    def has_answers(self) -> bool:
        """Whether examples carry a gold answer (an answer column is read)."""
        return self.answer_field is not None

    def check_rewards(self, reward_names: Iterable[str]) -> None:
        """Raise ``ValueError`` naming the first reward of ``reward_names`` that needs a gold answer when this
        dataset has none (call it before any model work)."""
        if self.has_answers:
            return
        for name in reward_names:
            if name in ANSWER_REWARDS:
                raise ValueError(
                    f"reward {name!r} compares completions with the gold answer, but the dataset "
                    f"{_describe(self.source)} has no answer column (columns: {sorted(_columns(self.rows))}); "
                    "set the answer column (task.answer_field) or drop the reward"
                )

    def example(self, row: dict, *, index: int | None = None) -> Example:
        """The :class:`Example` of one dataset row (``index``: its row number, for error messages)."""
        where = f"row {index}" if index is not None else "a row"
        if self.prompt_field not in row:
            raise ValueError(
                f"dataset task: {where} has no prompt column {self.prompt_field!r} ({sorted(row)})"
            )
        prompt = row[self.prompt_field]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif (
            isinstance(prompt, (list, tuple))
            and prompt
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
        ):
            messages = [dict(m) for m in prompt]
        else:
            raise ValueError(
                f"dataset task: {where}, column {self.prompt_field!r}: a prompt is a string or a non-empty list "
                f"of chat messages with 'role' and 'content', got {type(prompt).__name__}: {str(prompt)[:80]!r}"
            )
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        answer = ""
        if self.answer_field is not None and row.get(self.answer_field) is not None:
            answer = str(row[self.answer_field]).strip()
        skip = {self.prompt_field, self.answer_field, *_MEDIA_FIELDS}
        meta = {k: v for k, v in row.items() if k not in skip}
        meta.setdefault("answer_type", "auto")
        media = {k: _as_list(row.get(k)) for k in _MEDIA_FIELDS}
        # TRL-style rewards get the row as TRL hands it over: every column but the prompt, unchanged
        skip_trl = (self.prompt_field, "completion", "completion_ids")
        columns = {k: v for k, v in row.items() if k not in skip_trl}
        return Example(messages, answer, meta, images=media["images"], videos=media["videos"], raw_prompt=prompt,
                       columns=columns)  # fmt: skip

    def make(self, rng: random.Random) -> Example:
        i = rng.randrange(len(self.rows))
        return self.example(self.rows[i], index=i)

    def split(self, num_train: int, num_eval: int, seed: int) -> tuple[ExampleList, ExampleList]:
        """Train and eval examples (lazy sequences).

        With ``eval_split`` / ``eval_source``: the first ``num_eval`` rows of a seeded permutation of the eval
        data (all of them when ``num_eval <= 0``) and the training split. Otherwise the first ``num_eval`` rows
        of a seeded permutation of the training split (at most half of it) are held out for eval. Training
        uses the next ``num_train`` rows, or every remaining row when ``num_train <= 0``.
        """
        order = list(range(len(self.rows)))
        random.Random(seed).shuffle(order)
        if self.eval_rows is not None:
            eval_order = list(range(len(self.eval_rows)))
            random.Random(seed + 1).shuffle(eval_order)
            eval_idx = eval_order[:num_eval] if num_eval > 0 else eval_order
            train_idx = order
            eval_from = "the eval source" if self.eval_source is not None else f"split {self.eval_split!r}"
        else:
            held = min(max(num_eval, 0), len(order) // 2)
            if held < num_eval:
                logger.warning(
                    "dataset task: num_eval=%d is more than half of the %d training rows; holding out %d",
                    num_eval, len(order), held,
                )  # fmt: skip
            eval_idx, train_idx = order[:held], order[held:]
            eval_from = f"held out of split {self.split_name!r}"
        available = len(train_idx)
        if num_train > 0:
            train_idx = train_idx[:num_train]
        logger.info(
            "dataset task %s: training on %d of %d rows of split %r%s; evaluating on %d rows (%s)",
            _describe(self.source), len(train_idx), available, self.split_name,
            " (task.num_train limit)" if len(train_idx) < available else "",
            len(eval_idx), eval_from,
        )  # fmt: skip
        eval_data = self.eval_rows if self.eval_rows is not None else self.rows
        return ExampleList(self, self.rows, train_idx), ExampleList(self, eval_data, eval_idx)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]

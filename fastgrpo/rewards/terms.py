"""The reward terms of a run: the weighted rewards a config lists, built once, scored one batch at a time.

A config's ``rewards`` is a list of terms ``{name, weight, params}``; the reward of a completion is
``sum_k weight_k * term_k(completion)`` over the terms that apply to it. A term's ``name`` is one of

- a per-completion reward scheme of the registry (:data:`BUILTIN_TERMS`: ``accuracy``, ``format``, ``dapo``,
  ``rewardmap``), built with its typed ``params``;
- a function registered in code with :func:`register_reward`, or ``python:package.module:function`` (imported
  when the terms are built), of either signature:

  - fastgrpo's per-completion ``fn(completion_text, example) -> float | None``: ``example`` is the
    :class:`fastgrpo.tasks.Example` (``example.answer``, ``example.meta``);
  - TRL's batched ``fn(prompts, completions, **columns) -> list[float | None]``, called as TRL 1.16's
    ``GRPOTrainer`` calls it: once per batch with keyword arguments ``prompts``, ``completions``,
    ``completion_ids`` (token ids per completion), ``trainer_state`` (a ``transformers.TrainerState``),
    ``log_metric(name, value)`` and ``log_extra(column, values)`` (accepted, not recorded), and every dataset
    column as a list (:func:`trl_columns`: a dataset row's columns but the prompt; for a built-in task
    ``answer`` and the ``meta`` fields). A conversational prompt (a list of chat messages) comes with
    conversational completions ``[{"role": "assistant", "content": text}]``, a plain-text prompt with plain
    strings. A function without ``**kwargs`` receives only the arguments it names.

  The signature is read when the terms are built (:func:`reward_signature`): a function of neither shape, or a
  TRL-style one that requires an argument neither TRL nor the dataset provides, raises
  :class:`~fastgrpo._schema.ConfigError` then, before any model is loaded.

``None`` means "this reward does not apply to this completion" (TRL's semantics): the term's value is NaN, the
total is the weighted sum over the terms that apply (TRL's ``nansum``) and a completion no term applies to gets
0, with a warning. NaN, infinity, a non-number or a list of the wrong length raise ``ValueError`` naming the
reward.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from fastgrpo._schema import ConfigError

from .registry import build_scheme
from .rewardmap import RewardMapSample, answer_accuracy

__all__ = [
    "BUILTIN_TERMS",
    "TRL_REWARD_ARGS",
    "RewardFn",
    "RewardTerms",
    "register_reward",
    "resolve_term",
    "reward_signature",
    "trl_columns",
    "trl_prompt",
]

logger = logging.getLogger(__name__)

#: the registry's per-completion reward schemes a config can name as a term
BUILTIN_TERMS = ("accuracy", "format", "dapo", "rewardmap")
#: the keyword arguments besides the dataset columns a TRL-style reward function receives
TRL_REWARD_ARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")

# fn(text, example) -> float | None, or TRL's fn(prompts, completions, **columns) -> list[float | None]
RewardFn = Callable[..., Any]
TermFn = Callable[[str, Any, int], Any]  # (completion text, example, completion length in tokens) -> value
_USER_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make ``fn`` usable as a reward term ``name`` in configs: fastgrpo's ``fn(completion_text, example) ->
    float | None`` or TRL's ``fn(prompts, completions, **columns) -> list[float | None]`` (module docstring)."""
    if name in BUILTIN_TERMS:
        raise ValueError(f"reward name {name!r} is a built-in scheme; pick another name")
    if not callable(fn):
        raise ValueError(f"reward {name!r}: expected a function, got {type(fn).__name__}")
    _USER_REWARDS[name] = fn


@dataclasses.dataclass(frozen=True)
class RewardSignature:
    """How a user reward function is called: ``kind`` ``"completion"`` (``fn(text, example)``) or ``"batch"``
    (TRL's); for a batched one, the keyword names it accepts (``None``: it takes ``**kwargs``) and those it
    requires."""

    kind: Literal["completion", "batch"]
    accepts: frozenset[str] | None = None
    required: tuple[str, ...] = ()


def reward_signature(fn: Callable[..., Any], name: str) -> RewardSignature:
    """Which of the two signatures (module docstring) ``fn`` has.

    A parameter named like one of TRL's arguments (:data:`TRL_REWARD_ARGS`: ``prompts``, ``completions``, ...)
    makes it TRL's batched kind; else a function callable with two positional arguments is fastgrpo's
    per-completion kind; else one taking ``**kwargs`` is TRL's. Raises
    :class:`~fastgrpo._schema.ConfigError` naming ``rewards`` and the reward otherwise.
    """
    shapes = (
        "fastgrpo calls fn(completion_text, example) -> float | None, or TRL-style "
        "fn(prompts, completions, **columns) -> list[float | None]"
    )
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ConfigError(f"rewards: cannot read the signature of reward {name!r} ({shapes})") from None
    params = sig.parameters.values()
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    if not set(named) & set(TRL_REWARD_ARGS):
        try:
            sig.bind("text", "example")
            return RewardSignature("completion")
        except TypeError:
            if not var_kw:
                raise ConfigError(f"rewards: reward {name!r} has the signature {sig}; {shapes}") from None
    positional_only = [p.name for p in params if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
    if positional_only:
        raise ConfigError(
            f"rewards: reward {name!r} {sig} has positional-only parameters {positional_only}; a TRL-style reward "
            "is called with keyword arguments only"
        )
    required = tuple(n for n, p in named.items() if p.default is p.empty)
    return RewardSignature("batch", None if var_kw else frozenset(named), required)


def _accuracy_mode(mode: str, example: Any) -> str:
    # "auto" follows the task's answer type, so "B." matches "B" and "68.0" matches "68"
    if mode != "auto":
        return mode
    return {"numeric": "numeric", "choice": "choice", "yesno": "exact"}.get(
        example.meta.get("answer_type"), "auto"
    )


_RM_FIELDS = {f.name for f in dataclasses.fields(RewardMapSample)}


def _rewardmap_sample(example: Any) -> RewardMapSample:
    return RewardMapSample(**{k: v for k, v in example.meta.items() if k in _RM_FIELDS})


def _user_function(name: str) -> RewardFn | None:
    if name in _USER_REWARDS:
        return _USER_REWARDS[name]
    if name.startswith("python:"):
        module, _, attr = name[len("python:") :].rpartition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"rewards: cannot import reward function {name!r}: {e}") from None
        if not callable(fn):
            raise ConfigError(f"rewards: {name!r} is a {type(fn).__name__}, not a function")
        return fn
    return None


def resolve_term(name: str, params: Mapping[str, Any]) -> TermFn:
    """``term(text, example, completion_len) -> float`` for the per-completion term ``name`` (a registry scheme
    or a user function of fastgrpo's signature).

    Raises :class:`~fastgrpo._schema.ConfigError` naming ``rewards`` for an unknown name, bad params or a
    TRL-style batched function (score those with :class:`RewardTerms`).
    """
    fn = _user_function(name)
    if fn is not None:
        if reward_signature(fn, name).kind != "completion":
            raise ConfigError(f"rewards: {name!r} is a batched TRL-style reward; score it with RewardTerms")
        return lambda text, ex, n: fn(text, ex)
    if name not in BUILTIN_TERMS:
        raise ConfigError(
            f"rewards: unknown reward {name!r}; use {', '.join(BUILTIN_TERMS)}, a function registered with "
            "fastgrpo.rewards.register_reward, or python:package.module:function"
        )
    scheme = build_scheme({"name": name, "params": dict(params)})
    if name == "accuracy":
        mode = scheme.params.mode

        def accuracy(text: str, ex: Any, n: int) -> float:
            if ex.meta.get("answer_type") == "route":  # a route plan is judged leg by leg, not as maths
                return float(answer_accuracy(text, _rewardmap_sample(ex)))
            return scheme(text, ex.answer, mode=_accuracy_mode(mode, ex))

        return accuracy
    if name == "format":
        return lambda text, ex, n: scheme(text)
    if name == "dapo":
        acc = build_scheme("accuracy")
        return lambda text, ex, n: float(scheme(acc(text, ex.answer, mode=_accuracy_mode("auto", ex)) > 0, n))

    def rewardmap(text: str, ex: Any, n: int) -> float:
        return scheme(text, _rewardmap_sample(ex))

    return rewardmap


def trl_prompt(example: Any) -> Any:
    """The prompt as TRL hands it to reward functions: the dataset's prompt value (a string or chat messages)
    when the example keeps it (``example.raw_prompt``), else the example's chat messages."""
    raw = getattr(example, "raw_prompt", None)
    return raw if raw is not None else example.messages


def trl_columns(example: Any) -> dict[str, Any]:
    """The dataset columns TRL passes to reward functions for ``example``: its row's columns other than the
    prompt (``example.columns``) when it keeps them, else ``answer`` and every ``meta`` field."""
    cols = getattr(example, "columns", None)
    if cols is not None:
        return dict(cols)
    return {"answer": example.answer, **example.meta}


class _Term:
    """One term: its weight and how it is called (per completion, or once per batch)."""

    def __init__(self, name: str, weight: float, params: Mapping[str, Any], columns: Sequence[str] | None):
        self.name, self.weight = name, float(weight)
        fn = _user_function(name)
        self.sig = reward_signature(fn, name) if fn is not None else RewardSignature("completion")
        if self.sig.kind == "completion":
            self.fn: Callable[..., Any] = resolve_term(name, params)
            return
        if params:
            raise ConfigError(
                f"rewards: reward {name!r} is a function; its params {sorted(params)} would be ignored (a "
                "TRL-style reward reads dataset columns instead)"
            )
        self.fn = fn
        known = set(TRL_REWARD_ARGS) | set(columns or ())
        missing = [a for a in self.sig.required if a not in known]
        if columns is not None and missing:
            raise ConfigError(
                f"rewards: reward {name!r} requires the argument(s) {missing}, which are neither TRL's "
                f"{list(TRL_REWARD_ARGS)} nor dataset columns ({sorted(columns)})"
            )


class RewardTerms:
    """The terms of a run, ``[(name, weight, params), ...]``, built once (unknown names and functions of the
    wrong shape fail here, :class:`~fastgrpo._schema.ConfigError`).

    ``columns``: the dataset columns TRL-style rewards may ask for (:func:`trl_columns` of an example); when
    given, a function that requires an argument that is not one of them nor TRL's fails here too.
    """

    def __init__(self, terms: Sequence[tuple[str, float, Mapping[str, Any]]], *,
                 columns: Sequence[str] | None = None):  # fmt: skip
        if not terms:
            raise ConfigError("rewards: at least one reward term is needed")
        self.terms = {name: _Term(name, weight, params, columns) for name, weight, params in terms}
        self.weights = {name: t.weight for name, t in self.terms.items()}
        self._logged: dict[str, list[float]] = defaultdict(list)
        self._warned_extra = False

    @property
    def names(self) -> list[str]:
        return list(self.terms)

    @property
    def accuracy_term(self) -> str:
        """The term that measures correctness: ``accuracy`` when listed, else the first term."""
        return "accuracy" if "accuracy" in self.terms else self.names[0]

    @property
    def has_batched(self) -> bool:
        """Whether a term is a TRL-style batched function (they take ``trainer_state``)."""
        return any(t.sig.kind == "batch" for t in self.terms.values())

    # -- scoring -------------------------------------------------------------------------------------------

    def score_lists(self, texts: Sequence[str], examples: Sequence[Any], completion_ids: Sequence[Sequence[int] | int],
                    *, trainer_state: Any = None, names: Sequence[str] | None = None) -> dict[str, list[float]]:  # fmt: skip
        """Every term's unweighted value for ``B`` completions, ``{name: [B] floats}`` (NaN: the term returned
        None). ``examples[b]``: the example of completion ``b``; ``completion_ids[b]``: its token ids, or only
        their count (TRL-style terms then get ``None`` as its ids). ``names``: only these terms."""
        B = len(texts)
        if len(examples) != B or len(completion_ids) != B:
            raise ValueError(
                f"score: {B} texts but {len(examples)} examples and {len(completion_ids)} completion_ids"
            )
        lengths = [c if isinstance(c, int) else len(c) for c in completion_ids]
        ids = [None if isinstance(c, int) else list(c) for c in completion_ids]
        out: dict[str, list[float]] = {}
        for name in self.names if names is None else names:
            term = self.terms[name]
            if term.sig.kind == "completion":
                raw = [term.fn(t, e, n) for t, e, n in zip(texts, examples, lengths)]
            else:
                raw = self._call_batched(term, texts, examples, ids, trainer_state)
            out[name] = [_check_value(name, v, b) for b, v in enumerate(raw)]
        if names is None and B:
            self._warn_unscorable(out, texts, examples)
        return out

    def score_batch(self, texts: Sequence[str], examples: Sequence[Any], completion_ids: Sequence[Sequence[int] | int],
                    *, trainer_state: Any = None) -> dict[str, Tensor]:  # fmt: skip
        """:meth:`score_lists` as one fp32 ``[B]`` tensor per term."""
        rows = self.score_lists(texts, examples, completion_ids, trainer_state=trainer_state)
        return {name: torch.tensor(v, dtype=torch.float32) for name, v in rows.items()}

    def score(self, text: str, example: Any, completion: Sequence[int] | int) -> dict[str, float]:
        """Every term's unweighted value for one completion (its token ids, or only their count), NaN where a
        term does not apply. Prefer the batched :meth:`score_lists`: a TRL-style term is called once per call."""
        return {k: v[0] for k, v in self.score_lists([text], [example], [completion]).items()}

    @property
    def fns(self) -> dict[str, Callable[[str, Any, Sequence[int] | int], float]]:
        """Each term as a per-completion ``fn(text, example, completion)`` -> float (NaN: not applicable), with
        ``completion`` its token ids or their count; prefer the batched :meth:`score_lists`."""
        return {
            name: (lambda text, ex, c, name=name: self.score_lists([text], [ex], [c], names=[name])[name][0])
            for name in self.terms
        }

    def _call_batched(self, term: _Term, texts: Sequence[str], examples: Sequence[Any],
                      completion_ids: Sequence[list[int] | None], trainer_state: Any) -> list[Any]:  # fmt: skip
        prompts = [trl_prompt(e) for e in examples]
        completions = [
            [{"role": "assistant", "content": t}] if isinstance(p, (list, tuple)) else t
            for p, t in zip(prompts, texts)
        ]
        columns = [trl_columns(e) for e in examples]
        kwargs: dict[str, Any] = {k: [c.get(k) for c in columns] for k in columns[0]} if columns else {}
        kwargs.update(prompts=prompts, completions=completions, completion_ids=list(completion_ids),
                      trainer_state=trainer_state, log_metric=self._log_metric, log_extra=self._log_extra)  # fmt: skip
        if term.sig.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in term.sig.accepts}
        out = term.fn(**kwargs)
        if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__"):
            raise ValueError(
                f"reward {term.name!r} returned {type(out).__name__}; a TRL-style reward returns a list of "
                f"{len(texts)} floats or None (one per completion)"
            )
        out = list(out)
        if len(out) != len(texts):
            raise ValueError(
                f"reward {term.name!r} returned {len(out)} rewards for {len(texts)} completions (one per "
                "completion is needed)"
            )
        return out

    def _log_metric(self, name: str, value: float) -> None:
        self._logged[name].append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        if not self._warned_extra:
            logger.warning(
                "a reward called log_extra(%r, ...): fastgrpo does not record extra completion columns "
                "(completions.jsonl has every reward term); log_metric works",
                column,
            )
            self._warned_extra = True

    def pop_metrics(self) -> dict[str, float]:
        """The mean of every ``log_metric(name, value)`` reward functions made since the last call."""
        out = {k: sum(v) / len(v) for k, v in self._logged.items() if v}
        self._logged.clear()
        return out

    def _warn_unscorable(self, values: Mapping[str, list[float]], texts: Sequence[str],
                         examples: Sequence[Any]) -> None:  # fmt: skip
        none = [b for b in range(len(texts)) if all(math.isnan(v[b]) for v in values.values())]
        if none:
            b = none[0]
            logger.warning(
                "every reward returned None for %d of %d completions (they get reward 0); make sure at least one "
                "reward applies to each sample. First: prompt %r, completion %r",
                len(none), len(texts), str(trl_prompt(examples[b]))[-200:], texts[b][:200],
            )  # fmt: skip

    # -- totals --------------------------------------------------------------------------------------------

    def total(self, values: Mapping[str, Any]) -> Any:
        """``sum_k weight_k * values[k]`` over the terms that apply (NaN values count 0: TRL's ``nansum``);
        ``values``: a ``[B]`` tensor or a float per term."""
        out: Any = 0
        for name, w in self.weights.items():
            v = values[name]
            if isinstance(v, Tensor):
                wv = torch.where(v.isnan(), 0.0, w * v)
            else:
                wv = 0.0 if math.isnan(v) else w * v
            out = out + wv
        return out

    def means(self, values: Mapping[str, Tensor]) -> dict[str, float | None]:
        """Each term's mean over the completions it applies to (TRL's ``nanmean``; None when it applies to
        none), from ``[B]`` tensors."""
        out: dict[str, float | None] = {}
        for name, v in values.items():
            nan = v.isnan()
            if not bool(nan.any()):
                out[name] = float(v.mean())
            else:
                out[name] = None if bool(nan.all()) else float(v.nanmean())
        return out

    def as_tensors(self, rows: Sequence[Mapping[str, float]]) -> dict[str, Tensor]:
        """Per-completion score dicts to one fp32 ``[B]`` tensor per term."""
        return {name: torch.tensor([r[name] for r in rows], dtype=torch.float32) for name in self.terms}


def _check_value(name: str, value: Any, index: int) -> float:
    """One reward value as a float (None -> NaN); anything else but a finite number raises naming the reward."""
    if value is None:
        return math.nan
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(
            f"reward {name!r} returned {value!r} ({type(value).__name__}) for completion {index}; a reward is a "
            "number, or None when it does not apply"
        )
    try:
        f = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward {name!r} returned {value!r} for completion {index}: {e}") from None
    if not math.isfinite(f):
        raise ValueError(
            f"reward {name!r} returned {f} for completion {index}; rewards must be finite (return None when the "
            "reward does not apply)"
        )
    return f

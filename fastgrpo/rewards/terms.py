"""The reward terms of a run: the weighted per-completion rewards a config lists, built once, scored per batch.

A config's ``rewards`` is a list of terms ``{name, weight, params}``; the reward of a completion is
``sum_k weight_k * term_k(completion)``. A term's ``name`` is one of

- a per-completion reward scheme of the registry (:data:`BUILTIN_TERMS`: ``accuracy``, ``format``, ``dapo``,
  ``rewardmap``), built with its typed ``params``;
- a function registered in code with :func:`register_reward` (``fn(completion_text, example) -> float``);
- ``python:package.module:function``, imported when the terms are built (same signature).

Examples are duck-typed: a term reads ``example.answer`` and ``example.meta`` (:class:`fastgrpo.tasks.Example`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastgrpo._schema import ConfigError

from .registry import build_scheme
from .rewardmap import RewardMapSample

__all__ = ["BUILTIN_TERMS", "RewardFn", "RewardTerms", "register_reward", "resolve_term"]

#: the registry's per-completion reward schemes a config can name as a term
BUILTIN_TERMS = ("accuracy", "format", "dapo", "rewardmap")

RewardFn = Callable[[str, Any], float]
TermFn = Callable[[str, Any, int], float]  # (completion text, example, completion length in tokens) -> value
_USER_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make ``fn(completion_text, example) -> float`` usable as a reward term ``name`` in configs."""
    if name in BUILTIN_TERMS:
        raise ValueError(f"reward name {name!r} is a built-in scheme; pick another name")
    _USER_REWARDS[name] = fn


def _accuracy_mode(mode: str, example: Any) -> str:
    # "auto" follows the task's answer type, so "B." matches "B" and "68.0" matches "68"
    if mode != "auto":
        return mode
    return {"numeric": "numeric", "choice": "choice", "yesno": "exact"}.get(
        example.meta.get("answer_type"), "auto"
    )


_RM_FIELDS = {f.name for f in dataclasses.fields(RewardMapSample)}


def resolve_term(name: str, params: Mapping[str, Any]) -> TermFn:
    """``term(text, example, completion_len) -> float`` for the term ``name`` (module docstring).

    Raises :class:`~fastgrpo._schema.ConfigError` naming ``rewards`` for an unknown name or bad params.
    """
    if name in _USER_REWARDS:
        fn = _USER_REWARDS[name]
        return lambda text, ex, n: float(fn(text, ex))
    if name.startswith("python:"):
        module, _, attr = name[len("python:") :].rpartition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"rewards: cannot import reward function {name!r}: {e}") from None
        return lambda text, ex, n: float(fn(text, ex))
    if name not in BUILTIN_TERMS:
        raise ConfigError(
            f"rewards: unknown reward {name!r}; use {', '.join(BUILTIN_TERMS)}, a function registered with "
            "fastgrpo.rewards.register_reward, or python:package.module:function"
        )
    scheme = build_scheme({"name": name, "params": dict(params)})
    if name == "accuracy":
        mode = scheme.params.mode
        return lambda text, ex, n: scheme(text, ex.answer, mode=_accuracy_mode(mode, ex))
    if name == "format":
        return lambda text, ex, n: scheme(text)
    if name == "dapo":
        acc = build_scheme("accuracy")
        return lambda text, ex, n: float(scheme(acc(text, ex.answer, mode=_accuracy_mode("auto", ex)) > 0, n))

    def rewardmap(text: str, ex: Any, n: int) -> float:
        sample = RewardMapSample(**{k: v for k, v in ex.meta.items() if k in _RM_FIELDS})
        return scheme(text, sample)

    return rewardmap


class RewardTerms:
    """The terms of a run, ``[(name, weight, params), ...]``, built once (unknown names fail here)."""

    def __init__(self, terms: Sequence[tuple[str, float, Mapping[str, Any]]]):
        if not terms:
            raise ConfigError("rewards: at least one reward term is needed")
        self.weights = {name: float(weight) for name, weight, _ in terms}
        self.fns = {name: resolve_term(name, params) for name, _, params in terms}

    @property
    def names(self) -> list[str]:
        return list(self.fns)

    @property
    def accuracy_term(self) -> str:
        """The term that measures correctness: ``accuracy`` when listed, else the first term."""
        return "accuracy" if "accuracy" in self.fns else self.names[0]

    def score(self, text: str, example: Any, completion_len: int) -> dict[str, float]:
        """Every term's unweighted value for one completion."""
        return {name: float(fn(text, example, completion_len)) for name, fn in self.fns.items()}

    def total(self, values: Mapping[str, Tensor]) -> Tensor:
        """``sum_k weight_k * values[k]`` (``[B]`` per term, or floats)."""
        return sum(w * values[name] for name, w in self.weights.items())

    def as_tensors(self, rows: Sequence[Mapping[str, float]]) -> dict[str, Tensor]:
        """Per-completion score dicts to one fp32 ``[B]`` tensor per term."""
        return {name: torch.tensor([r[name] for r in rows], dtype=torch.float32) for name in self.fns}

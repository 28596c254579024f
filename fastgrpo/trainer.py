"""The lean GRPO-family trainer: one loop a reader can hold in their head.

One step (:meth:`Trainer.train_step`)::

    prompts   <- sampler (uniform / curriculum / MMR1 variance-aware), the same on every rank
    rollouts  <- G completions per prompt, each rank generating its share      (fastgrpo.rollout)
    rewards   <- sum_k weight_k * term_k(completion, example)                  (fastgrpo.rewards.terms)
    [DAPO]       drop groups with equal rewards, generate more prompts, keep exactly P groups
    pack      <- token-budget micro-batches, balanced over ranks                (fastgrpo.packing)
    ref / old <- reference log-probs (KL, schemes that need them), behaviour log-probs (num_iterations > 1)
    advantage <- the advantage pipeline: reward shaping (CARE bonus), group-relative estimator, advantage
                 shaping (COPO pair + blend, PRM token advantages)             (fastgrpo.rewards.shaping)
    update    <- num_iterations x (grpo_loss over the micro-batches, gradient accumulation, optimizer step)
    after     <- EMA reference step, sampler feedback, metrics, checkpoint

Every rank holds the whole rollout batch after generation (completions are gathered), so advantages and
group statistics are computed identically everywhere and only the micro-batches differ; the ``dapo``
normaliser is the global count of loss tokens. All math is in the library (``grpo_loss``, the advantage and
reward schemes); this file only moves data between them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from . import distributed as dist
from .checkpoint import (
    Checkpoint,
    apply_checkpoint,
    capture_rng,
    find_resumable,
    restore_rng,
    save_checkpoint,
)
from .config import Config, ConfigError, config_to_dict, resume_changes, resume_config
from .distributed import Runtime, make_accelerator, resolve_mixed_precision
from .models import build_policy
from .observability import (
    LearningSignalGuard,
    MetricsLogger,
    PhaseTimer,
    completion_record,
    peak_memory_mb,
    plot_run,
    progress_fields,
    read_metrics,
    reward_summary,
    start_trackers,
)
from .ops import accumulation_weight
from .packing import MicroBatch, lm_head_of, pack_micro_batches, packed_logprobs
from .rewards.outcome import extract_answer
from .rewards.prm import build_step_verifier, hf_step_proposer
from .rewards.registry import build_sampler, build_scheme
from .rewards.shaping import AdvantagePipeline, RolloutGroups
from .rewards.terms import RewardTerms, register_reward, trl_columns
from .rollout import SamplingParams, generate_rollouts
from .sampling import DynamicSamplingBuffer, PromptStream
from .tasks import Example, build_splits, render_prompt
from .vlm import check_example, is_processor, rollout_prompts

logger = logging.getLogger(__name__)

__all__ = [
    "Trainer",
    "RunResult",
    "train",
    "evaluate_run",
    "register_reward",
    "make_accelerator",
    "resolve_mixed_precision",
]

# ----------------------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Update:
    """What one optimizer step trains on, on this rank: its micro-batches (advantages, masks and log-probs
    filled in) and the two global counts the loss normalisers need."""

    micro_batches: list[MicroBatch]
    num_items: int  # loss tokens of the global batch: the dapo / cispo normaliser
    num_seqs: int  # completions of the global batch


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, float]
    plot: Path | None = None
    stopped_early: str | None = None  # "signal" or "time budget"
    wall_s: float = 0.0
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out greedy accuracy)
    is_main: bool = True  # False on the other processes of a multi-process run (they keep no metrics)

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

    ``resume``: a run directory (its newest intact checkpoint), a checkpoint directory or a
    :class:`~fastgrpo.checkpoint.Checkpoint` to continue exactly; ``cfg`` must then equal the run's saved
    configuration except for :data:`~fastgrpo.config.RESUMABLE_KEYS` (:func:`fastgrpo.config.resume_config`
    builds it). ``callbacks``: ``fn(trainer, metrics)`` called after every step (tests use them to interrupt a
    run). ``write_run=False``: nothing is written (evaluation of a run).
    """

    def __init__(self, cfg: Config, *, resume: str | Path | Checkpoint | None = None,
                 callbacks: Sequence[Callable[[Trainer, dict], None]] = (), write_run: bool = True):  # fmt: skip
        cfg.validate()
        self.cfg = cfg
        self.callbacks = list(callbacks)
        # a broken checkpoint or a changed configuration is reported before any model work
        ckpt = find_resumable(resume) if isinstance(resume, (str, Path)) else resume
        changes = {}
        if ckpt is not None and write_run and ckpt.config_text is not None:
            changes = resume_changes(resume_config(ckpt.config_text, source=f"{ckpt.path}/config.yaml"), cfg)
        self.accel = accel = make_accelerator(cfg)
        self.rank, self.world, self.device = accel.process_index, accel.num_processes, accel.device
        if cfg.rollout.prompts_per_step < self.world:  # each rank generates its share of the step's prompts
            raise ConfigError(
                f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} prompts cannot be shared by {self.world} "
                f"processes; use at least {self.world} (one per process)"
            )
        if cfg.rollout.engine == "vllm" and not dist.vllm_can_run(self.device):
            raise ConfigError(
                "rollout.engine: vllm runs on CUDA GPUs with the vllm package (pip install 'fastgrpo[vllm]'); "
                "use rollout.engine=transformers here"
            )

        # -- data and rewards: a bad dataset or reward fails here, before any model is loaded -----------------
        self.train_set, self.eval_set = build_splits(cfg.task, [t.name for t in cfg.rewards])
        columns = list(trl_columns(self.train_set[0])) if len(self.train_set) else None
        self.rewards = RewardTerms([(t.name, t.weight, t.params) for t in cfg.rewards], columns=columns)
        if cfg.advantage.care.enabled and cfg.advantage.care.accuracy_term not in self.rewards.names:
            raise ConfigError(
                f"advantage.care.accuracy_term: no reward term named {cfg.advantage.care.accuracy_term!r}"
            )
        if cfg.filter.enabled and cfg.filter.metric not in ("reward", *self.rewards.names):
            raise ConfigError(
                f"filter.metric: {cfg.filter.metric!r} is neither 'reward' nor one of the reward terms "
                f"{self.rewards.names}; add an accuracy term (weight 0 logs it without changing the reward) or "
                "set filter.metric"
            )

        # -- model (LoRA, speed switches), reference, data checked against the model, sampler, advantages ------
        torch.manual_seed(cfg.train.seed)  # LoRA init: identical on every rank
        self.model, self.processor, self.reference = build_policy(cfg, self.device)
        # a vision-language model comes with a processor (its tokenizer inside), a text model with a tokenizer
        self.tokenizer = self.processor.tokenizer if is_processor(self.processor) else self.processor
        self.head = lm_head_of(self.model)
        for split, examples in (("train", self.train_set), ("eval", self.eval_set)):
            for i, ex in enumerate(examples):  # messages against the model (media decoded when encoded)
                try:
                    check_example(ex, i, self.processor, decode=False)
                except ValueError as e:
                    raise ConfigError(f"task {cfg.task.name!r}, {split} split: {e}") from None
        labels = [str(e.meta.get(cfg.sampler.stage_key)) for e in self.train_set]
        self.stream = PromptStream(build_sampler(cfg, labels, rescore_fn=self._vas_rescore))
        self.advantages = AdvantagePipeline.from_config(cfg.advantage, self.tokenizer)

        # -- the engine: wrapped policy, optimizer, schedule; vLLM rollouts ---------------------------------
        self.rt = rt = Runtime(cfg, accel, self.model, self._build_optimizer)
        # the runtime's objects under the trainer's public names (callbacks and tests read them); not copies
        self.policy, self.optimizer, self.scheduler, self.params = (
            rt.policy,
            rt.optimizer,
            rt.scheduler,
            rt.params,
        )
        self.engine = None
        if cfg.rollout.engine == "vllm":
            if is_processor(self.processor):
                raise ConfigError("rollout.engine: vllm is wired for text models; vision-language rollouts use "
                                  "rollout.engine=transformers")  # fmt: skip
            self.engine = dist.build_vllm_engine(cfg, rt, self.tokenizer)
        self._engine_stale = True  # the engine holds the checkpoint's weights until the first push

        # -- run directory, logging, resume ------------------------------------------------------------------
        self.step = self.saved_step = 0
        self.skipped_in_a_row = 0
        if ckpt is not None:
            self.run_dir = ckpt.path.parent.parent
            self._load(ckpt, training=write_run)
        else:
            name = (
                cfg.train.run_name or f"{cfg.task.name}-{cfg.loss.loss_type}-{time.strftime('%Y%m%d-%H%M%S')}"
            )
            self.run_dir = Path(cfg.train.output_dir) / name
        self.run_dir = Path(rt.broadcast(str(self.run_dir)))
        self.is_main = accel.is_main_process
        self.metrics_log = None
        if self.is_main and write_run:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if ckpt is None or changes:
                for key, (old, new) in changes.items():
                    logger.warning("resume: %s changed from %r to %r (config.yaml updated)", key, old, new)
                if "train.steps" in changes and "constant" not in cfg.optim.scheduler:
                    logger.warning("resume: the %s learning-rate schedule now spans %d steps; its next values differ "
                                   "from the interrupted run's", cfg.optim.scheduler, cfg.train.steps)  # fmt: skip
                (self.run_dir / "config.yaml").write_text(self._config_text())
            resume_step = self.step if ckpt is not None else None
            self.metrics_log = MetricsLogger(self.run_dir, resume_step=resume_step)
            if accel.log_with:
                start_trackers(accel, self.run_dir, project=cfg.train.project, config=config_to_dict(cfg))
                self.metrics_log.accelerator = accel
        self._stop_requested = False
        self.stop_reason: str | None = None
        self.signal_guard = LearningSignalGuard(cfg.train.signal_check_steps)

    # -- building blocks ----------------------------------------------------------------------------------

    @property
    def _engine_behaviour_logp(self) -> bool:
        """Behaviour log-probs from the vLLM engine replace the recomputed ones (rollout.vllm.behaviour_logprobs)."""
        r = self.cfg.rollout
        return r.engine == "vllm" and r.vllm.behaviour_logprobs

    def _build_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        kw = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        if o.name == "adamw8bit":
            from ._backends import load_bnb

            return load_bnb().optim.AdamW8bit(params, **kw)
        return torch.optim.AdamW(params, **kw)

    def _config_text(self) -> str:
        return yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)

    def _prompt(self, ex: Example) -> Any:
        if self.cfg.rollout.chat_template:
            return ex.messages  # rendered by the tokenizer's chat template in fastgrpo.rollout
        return render_prompt(ex.messages, self.tokenizer, chat_template=False)

    def _rollouts(self, examples: Sequence[Example], params: SamplingParams) -> tuple[Any, list | None]:
        """``params.num_generations`` completions of each example's prompt, and, for a vision-language model,
        each prompt's vision inputs (:class:`fastgrpo.vlm.VisionInputs`, None for a text-only prompt; they go
        with the prompt ids into packing). A VLM's prompts are rendered with its processor's chat template and
        its images / video reach generation as extra model inputs."""
        prompts, model_inputs, vision = rollout_prompts(self.processor, examples, model=self.model,
                                                        text_prompt=self._prompt)  # fmt: skip
        if self.engine is not None:  # text prompts only (a VLM is refused at start)
            if self._engine_stale:  # push the policy's weights after an update
                logger.debug("pushed %d tensors to the vLLM engine", self.rt.push_weights(self.engine))
                self._engine_stale = False
            return generate_rollouts(self.engine, self.tokenizer, prompts, params), None
        with self.accel.autocast():
            ro = self.rt.gathered(generate_rollouts, self.model, self.tokenizer, prompts, params,
                                  model_inputs=model_inputs)  # fmt: skip
        return ro, vision

    def _sampling(self, seed: int, **overrides: Any) -> SamplingParams:
        r = self.cfg.rollout
        kw = dict(num_generations=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                  top_p=r.top_p, top_k=r.top_k, max_prompt_length=r.max_prompt_tokens,
                  return_logprobs=self._engine_behaviour_logp, seed=seed, prefill_once=r.prefill_once,
                  prompt_cache=r.prompt_cache, compile_decode=r.compile_decode)  # fmt: skip
        kw.update(overrides)
        return SamplingParams(**kw)

    def _trainer_state(self) -> Any:
        """What TRL-style reward functions get as ``trainer_state``: a ``transformers.TrainerState`` counting
        optimizer steps as TRL does (``num_iterations`` per training step); None when no term takes it."""
        if not self.rewards.has_batched:
            return None
        from transformers import TrainerState

        n = self.cfg.train.num_iterations
        return TrainerState(global_step=self.step * n, max_steps=self.cfg.train.steps * n)

    def _seed(self, *parts: int) -> int:
        # explicit per-(step, round, rank) sampling seeds: generation does not depend on global RNG history
        h = self.cfg.train.seed
        for p in parts:
            h = (h * 1_000_003 + p) % (2**31 - 1)
        return h

    # -- rollouts ------------------------------------------------------------------------------------------

    def _generate_and_score(self, indices: list[int], seed: int) -> RolloutGroups:
        """This rank generates its share of ``indices``; the scored completions of all ranks are gathered."""
        mine = indices[self.rank :: self.world]
        chosen = [self.train_set[i] for i in mine]
        ro, vision = self._rollouts(chosen, self._sampling(seed))
        prompts, completions, g = ro.prompts(), ro.completions(), ro.num_generations
        examples = [chosen[j // g] for j in range(len(completions))]
        scores = self.rewards.score_lists(
            ro.texts, examples, completions, trainer_state=self._trainer_state()
        )
        rows = []
        for j, (p, c, text, trunc) in enumerate(zip(prompts, completions, ro.texts, ro.truncated.tolist())):
            score = {name: v[j] for name, v in scores.items()}
            vis = None if vision is None else vision[j // g]
            behaviour = None if ro.logprobs is None else ro.logprobs[j, : len(c)].cpu()
            rows.append((mine[j // g], p, c, text, bool(trunc), score, vis, behaviour))
        rows = self.rt.gather(rows)
        return RolloutGroups(
            example=[r[0] for r in rows],
            examples=[self.train_set[r[0]] for r in rows],
            prompt_ids=[r[1] for r in rows],
            completion_ids=[r[2] for r in rows],
            texts=[r[3] for r in rows],
            truncated=torch.tensor([r[4] for r in rows], dtype=torch.bool),
            terms=self.rewards.as_tensors([r[5] for r in rows]),
            group_size=g,
            vision=None if vision is None else [r[6] for r in rows],
            behaviour_logp=None if ro.logprobs is None else [r[7] for r in rows],
        )

    def _rollout(self) -> tuple[RolloutGroups, dict[str, float]]:
        """Prompts -> scored completions, with DAPO dynamic sampling when enabled."""
        self.rt.hold()  # FSDP: until the training forward (rollouts and reference passes)
        P, G = self.cfg.rollout.prompts_per_step, self.cfg.rollout.group_size
        if not self.cfg.filter.enabled:
            return self._generate_and_score(self.stream.next(P), self._seed(self.step, 0, self.rank)), {}
        buf = DynamicSamplingBuffer(P, max_num_gen_batches=self.cfg.filter.max_gen_batches)
        last = None
        while buf.need_more:
            last = self._generate_and_score(
                self.stream.next(P), self._seed(self.step, buf.num_gen_batches, self.rank)
            )
            metric = self.cfg.filter.metric
            values = self.rewards.total(last.terms) if metric == "reward" else last.terms[metric]
            if bool(values.isnan().any()):
                raise ValueError(
                    f"filter.metric: the reward {metric!r} returned None for some completions, so their groups' "
                    "spread is undefined; filter on filter.metric=reward (the total) instead"
                )
            buf.add(values, G, fields=last.columns())
        rounds, dropped = buf.num_gen_batches, buf.num_dropped
        if buf.num_groups == 0:  # nothing with spread: train on the last batch (zero advantages)
            logger.warning("dynamic sampling kept no group in %d rounds; using the last batch", rounds)
            groups = last
        else:
            if buf.num_groups < P:
                logger.warning(
                    "dynamic sampling kept %d of %d groups in %d rounds", buf.num_groups, P, rounds
                )
            cols = buf.take(allow_partial=True)
            cols.pop("rewards", None)
            groups = RolloutGroups.from_columns(cols, G)
        return groups, {"filter/gen_rounds": rounds, "filter/dropped_groups": dropped}

    def _micro_batches(self, groups: RolloutGroups) -> list[MicroBatch]:
        """This rank's token-budget micro-batches (whole groups behind one prompt copy with
        ``train.shared_prompt``), with their loss masks: every completion token, or, with
        ``loss.mask_truncated``, only those of completions that ended."""
        cfg = self.cfg
        mbs = pack_micro_batches(groups.prompt_ids, groups.completion_ids, cfg.train.token_budget,
                                 shared_prompt=cfg.train.shared_prompt, group_size=groups.group_size,
                                 vision=groups.vision,
                                 rank=self.rank, num_ranks=self.world, pad_id=self.tokenizer.pad_token_id or 0,
                                 device=self.device)  # fmt: skip
        keep = ~groups.truncated if cfg.loss.mask_truncated else torch.ones(groups.size, dtype=torch.bool)
        for mb in mbs:
            if not mb.is_padding:
                mb.loss_mask = torch.repeat_interleave(keep[mb.index], mb.rows.completion_lens.cpu())
        return mbs

    def _reference_per_sequence(self, groups: RolloutGroups, mbs: list[MicroBatch]) -> list[Tensor]:
        """The reference log-probs ``[L_b]`` of every completion of the global batch (gathered over ranks)."""
        mine = []
        for mb in mbs:
            if not mb.is_padding:
                lens = mb.rows.completion_lens.tolist()
                mine += list(zip(mb.index, mb.ref_logp.detach().cpu().split(lens)))
        out: list[Tensor] = [torch.empty(0)] * groups.size
        for i, lp in self.rt.gather(mine):
            out[i] = lp
        return out

    # -- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        cfg, timer = self.cfg, PhaseTimer(sync_cuda=self.device.type == "cuda")
        t0 = time.perf_counter()
        G = cfg.rollout.group_size

        # 1. rollouts and rewards (DAPO dynamic sampling inside)
        with timer("generation"):
            groups, extra = self._rollout()
            reward = self.rewards.total(groups.terms)

        # 2. this rank's token-budget micro-batches; reference and behaviour log-probs
        mbs = self._micro_batches(groups)
        need_ref = cfg.loss.beta > 0 or self.advantages.needs_reference
        need_old = cfg.train.num_iterations > 1  # on-policy otherwise: ratio 1 with the gradient of logp
        with timer("reference"), torch.no_grad():
            t = cfg.rollout.temperature
            for mb in mbs:
                if not mb.is_padding:
                    mb.ref_logp = (
                        self.rt.gathered(self.reference.logprobs, mb.rows, temperature=t)
                        if need_ref
                        else None
                    )
                    if groups.behaviour_logp is not None:  # the engine's (rollout.vllm.behaviour_logprobs)
                        mb.old_logp = torch.cat([groups.behaviour_logp[i] for i in mb.index]).to(self.device)
                    elif need_old:
                        mb.old_logp = self.rt.gathered(packed_logprobs, self.model, mb.rows, temperature=t)
                    else:
                        mb.old_logp = None

        # 3. advantages (the pipeline: reward shaping, group-relative estimator, advantage shaping)
        ref_seq = self._reference_per_sequence(groups, mbs) if self.advantages.needs_reference else None
        adv = self.advantages(groups, reward, ref_logp=ref_seq)
        reward = adv.rewards
        extra.update(adv.metrics)
        for mb in mbs:
            if not mb.is_padding:
                mb.advantages, mb.blend = adv.select(mb.index)

        # 4. policy updates: num_iterations optimizer steps over the micro-batches
        lengths = torch.tensor([len(c) for c in groups.completion_ids])
        keep = ~groups.truncated if cfg.loss.mask_truncated else torch.ones(groups.size, dtype=torch.bool)
        update = _Update(mbs, num_items=int((lengths * keep).sum()), num_seqs=groups.size)
        stats: dict[str, float] = {}
        skipped = 0
        for _ in range(cfg.train.num_iterations):
            with timer("policy"):
                stats = self._accumulate(update)
            with timer("optimizer"):
                grad_norm, stepped = self.rt.optimizer_step()
                if stepped:
                    self.reference.step(self.model)  # the EMA reference counts optimizer steps
                else:
                    skipped += 1
        self._count_skipped(skipped)
        self._engine_stale = True  # the next generation pushes the updated weights first

        # 5. after the update: sampler feedback; a sampler's own statistics join the step's metrics
        accuracy = (groups.terms[self.rewards.accuracy_term] > 0).float().view(-1, G)  # correct; NaN: not
        per_group = [groups.completion_ids[i : i + G] for i in range(0, groups.size, G)]
        self.stream.observe(groups.example[::G], reward.view(-1, G).mean(1), accuracy=accuracy,
                            completion_ids=per_group)  # fmt: skip
        if callable(sampler_metrics := getattr(self.stream.sampler, "metrics", None)):
            extra.update(sampler_metrics())
        self.step += 1

        # 6. metrics
        times = timer.pop()
        wall = time.perf_counter() - t0
        total_tokens = sum(len(p) + len(c) for p, c in zip(groups.prompt_ids, groups.completion_ids))
        std_zero = float((reward.view(-1, G).std(1) == 0).float().mean()) if G > 1 else 1.0
        metrics = {
            "step": self.step,
            "reward": float(reward.mean()),
            "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,
            **{f"reward/{k}": v for k, v in self.rewards.means(groups.terms).items()},
            "zero_std_groups": std_zero,
            "answer_rate": sum(extract_answer(t) is not None for t in groups.texts) / groups.size,
            **stats,
            "grad_norm": grad_norm,
            "skipped_steps": skipped,
            "lr": self.scheduler.get_last_lr()[0],
            "completion_len": float(lengths.float().mean()),
            "truncated": float(groups.truncated.float().mean()),
            "tokens": total_tokens,
            "num_items_in_batch": update.num_items,
            "tokens_per_s": total_tokens / wall,
            **times,
            "time/step": wall,
            "peak_mem_mb": peak_memory_mb(self.device),
            **extra,
            **self.rewards.pop_metrics(),  # what reward functions logged (TRL's log_metric)
        }
        self._last_batch, self._last_adv = groups, adv
        return metrics

    def _count_skipped(self, skipped: int) -> None:
        """A non-finite gradient skips its optimizer step (parameters, optimizer state, schedule and EMA stay as
        they were); ``train.max_skipped_steps`` training steps in a row with a skip stop the run."""
        if not skipped:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_skipped_steps
        logger.warning("step %d: non-finite gradient, %d optimizer step(s) skipped (%d steps in a row, limit %d)",
                       self.step + 1, skipped, self.skipped_in_a_row, limit)  # fmt: skip
        if self.skipped_in_a_row >= limit:
            raise FloatingPointError(
                f"{self.skipped_in_a_row} steps in a row had a non-finite gradient (train.max_skipped_steps="
                f"{limit}); the run stops. Lower optim.lr, check the rewards and the model's dtype "
                "(model.dtype=float32), or resume from an earlier checkpoint"
            )

    def _accumulate(self, update: _Update) -> dict[str, Any]:
        """Forward + backward of every micro-batch of this rank, weighted so the accumulated gradient is the
        gradient of the loss over the whole global batch (DDP then averages over ranks).

        A padding micro-batch, or one whose tokens are all masked out, runs with weight 0 (every rank makes
        the same forward/backward calls). The step's metrics are summed on the device and fetched once.
        """
        cfg = self.cfg
        self.rt.release()  # FSDP: the training forward gathers and reshards unit by unit
        zero_weight_loss = dataclasses.replace(cfg.loss, beta=0.0)  # a step that trains nothing needs no KL
        mbs = update.micro_batches
        local_items = sum(mb.num_loss_tokens for mb in mbs)
        temperature = self.head.logit_temperature(cfg.rollout.temperature)
        keys = ("kl", "entropy", "clip_frac_low", "clip_frac_high", "ratio")
        # metric sums in fp64 on the device, in the order of the per-micro-batch float sums they replace
        sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=self.device)
        n_tok = 0
        for k, mb in enumerate(mbs):
            m = mb.num_loss_tokens
            trains = m > 0
            if trains:
                a, blend = mb.advantages, mb.blend
                a = tuple(x.to(self.device) for x in a) if isinstance(a, tuple) else a.to(self.device)
                blend = blend.to(self.device) if blend is not None else None
                mask, old, ref, loss_cfg = mb.loss_mask.to(self.device), mb.old_logp, mb.ref_logp, cfg.loss
            else:  # nothing to learn here: a zero-weight step keeps the ranks' collectives matched
                a, blend, mask, old, ref, loss_cfg = (torch.zeros(mb.rows.num_sequences, device=self.device), None,
                                                      None, None, None, zero_weight_loss)  # fmt: skip
            last = k == len(mbs) - 1
            with self.rt.sync(last):
                # decoder and fused loss in the engine's forward (the LM head's weight is read there, gathered
                # under FSDP / ZeRO-3); the logits are never built
                out = self.policy(mb.rows, dict(
                    advantages=a, mask=mask, cu_seqlens=mb.rows.completion_cu_seqlens, old_logp=old,
                    ref_logp=ref if loss_cfg.beta > 0 else None, temperature=temperature,
                    max_completion_length=cfg.rollout.max_new_tokens, num_items_in_batch=max(update.num_items, 1),
                    blend=blend, config=loss_cfg,
                ))  # fmt: skip
                scale = (
                    accumulation_weight(cfg.loss.loss_type, num_seqs=len(mb.index), total_seqs=update.num_seqs,
                                        num_tokens=m, local_tokens=local_items, world_size=self.world)
                    if trains
                    else 0.0
                )  # fmt: skip
                self.rt.backward(out.loss * scale, last)
            if trains:  # token-weighted metrics
                n_tok += m
                sums[1] += (out.entropy * mask).sum().double()
                for j, val in (
                    (0, out.kl),
                    (2, out.clip_frac_low),
                    (3, out.clip_frac_high),
                    (4, out.ratio_mean),
                ):
                    sums[j] += val.double() * m
                sums[len(keys)] += out.loss.detach().double() * scale / self.world
        totals = torch.cat([sums, torch.tensor([n_tok], dtype=torch.float64, device=self.device)])
        totals = self.rt.reduce_sum(
            totals
        ).tolist()  # the one device -> host transfer of the step's loss metrics
        n = max(totals[-1], 1.0)
        out = {key: totals[i] / n for i, key in enumerate(keys)}
        out["loss"] = totals[len(keys)]
        out["clip_frac"] = out["clip_frac_low"] + out["clip_frac_high"]
        if cfg.loss.beta == 0:
            out["kl"] = None  # no reference log-probs in the loss: nothing to report
        return out

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
                if self.is_main:
                    self.signal_guard.update(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(progress_fields(metrics))
                for cb in self.callbacks:
                    cb(self, metrics)
                periodic = cfg.train.save_every > 0 and self.step % cfg.train.save_every == 0
                over_budget = (
                    cfg.train.time_budget_s > 0 and time.perf_counter() - start > cfg.train.time_budget_s
                )
                signalled, over_budget = self.rt.any(self._stop_requested, over_budget)  # every rank agrees
                if signalled or over_budget or periodic:
                    self.save()
                if signalled or over_budget:
                    self._stop_requested = True
                    self.stop_reason = "signal" if signalled else "time budget"
                    logger.warning("stopping at step %d (%s); checkpoint saved", self.step, self.stop_reason)
                    break
            else:
                if self.saved_step != self.step:  # the last step may have been a periodic save already
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
        return RunResult(self.run_dir, rows, summary, plot, self.stop_reason, wall, evals, self.is_main)

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.metrics_log is not None:
            self.metrics_log.log(metrics)
        n = self.cfg.train.log_completions
        if n and self.is_main and getattr(self, "_last_batch", None) is not None and "reward" in metrics:
            with open(self.run_dir / "completions.jsonl", "a") as f:
                for i in range(min(n, self._last_batch.size)):
                    f.write(
                        json.dumps(completion_record(metrics["step"], self._last_batch, self._last_adv, i))
                        + "\n"
                    )

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
        self.rt.hold()  # FSDP: ranks generate different numbers of chunks
        mine = list(range(len(examples)))[self.rank :: self.world]
        rows = []
        for s in range(0, len(mine), 32):
            chunk = [examples[i] for i in mine[s : s + 32]]
            ro, _ = self._rollouts(chunk, self._sampling(0, num_generations=1, do_sample=False))
            state = self._trainer_state()
            scores = self.rewards.score_lists(ro.texts, chunk, ro.completions(), trainer_state=state)
            rows += [{name: v[j] for name, v in scores.items()} for j in range(len(chunk))]
        rows = self.rt.gather(rows)
        return self._held_out(rows)

    def _held_out(self, scores: list[dict[str, float]]) -> dict[str, Any]:
        """Held-out accuracy (the accuracy term; a completion it does not apply to, None, does not count) and mean
        total reward of every rank's scored completions, with what reward functions logged meanwhile."""
        accuracy = [a for r in scores if not math.isnan(a := r[self.rewards.accuracy_term])]
        return {
            "eval/accuracy": sum(accuracy) / len(accuracy) if accuracy else None,
            "eval/reward": sum(self.rewards.total(r) for r in scores) / len(scores),
            **{f"eval/{k}": v for k, v in self.rewards.pop_metrics().items()},
        }

    @torch.no_grad()
    def evaluate_search(self, num: int | None = None) -> dict[str, float]:
        """Held-out accuracy of GroundedPRM-guided greedy search (``advantage.prm``: the verifier, ``step_sep``,
        ``search``, ``search_temperature``, ``max_step_tokens``), with its cost per problem: proposer calls,
        generated tokens, seconds; and the share of problems it answered."""
        prm = self.cfg.advantage.prm
        if is_processor(self.processor):
            raise ConfigError(
                "--search prm: PRM-guided search proposes text steps; it runs on text models only"
            )
        examples = self.eval_set[: num or len(self.eval_set)]
        if not examples:
            return {}
        verifier = build_step_verifier(prm.verifier, grounded=prm.grounded)
        search = build_scheme({"name": "prm_greedy_search", "params": prm.search})
        sep, mine, results = prm.step_sep, list(range(len(examples)))[self.rank :: self.world], []
        for i in mine:
            e = examples[i]
            head = render_prompt(e.messages, self.tokenizer, chat_template=self.cfg.rollout.chat_template)
            prompt_fn = lambda q, steps, h=head: h + "".join(x + sep for x in steps)  # noqa: E731
            propose = hf_step_proposer(self.model, self.tokenizer, prompt_fn, step_sep=sep,
                                       temperature=prm.search_temperature, max_step_tokens=prm.max_step_tokens,
                                       seed=self._seed(7_000, i))  # fmt: skip
            t0 = time.perf_counter()
            with self.accel.autocast():
                res = search(e.question, propose, verifier)
            results.append((res, time.perf_counter() - t0))
        texts = [res.text(sep) for res, _ in results]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        scores = self.rewards.score_lists(
            texts, [examples[i] for i in mine], ids, trainer_state=self._trainer_state()
        )
        rows = [({k: v[j] for k, v in scores.items()}, res.status == "answered", res.model_calls, res.tokens, dt)
                for j, (res, dt) in enumerate(results)]  # fmt: skip
        rows = self.rt.gather(rows)
        n = len(rows)
        return {
            **self._held_out([r[0] for r in rows]),
            "eval/answered": sum(r[1] for r in rows) / n,
            "eval/model_calls": sum(r[2] for r in rows) / n,
            "eval/tokens": sum(r[3] for r in rows) / n,
            "eval/seconds": sum(r[4] for r in rows) / n,
        }

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        weights, optimizer_state = self.rt.checkpoint_state()  # FSDP: gathered on rank 0 (a collective)
        rng = self.rt.gather([capture_rng()])
        path = None
        if self.is_main:
            ref_state = self.reference.state_dict()
            ema = ref_state.get("ema")
            ema_shadow = ema.pop("shadow") if ema else None
            state = {"rng": rng, "sampler": self.stream.state_dict(), "reference": ref_state,
                     "world_size": self.world, "skipped_in_a_row": self.skipped_in_a_row,
                     "strategy": self.cfg.distributed.strategy}  # fmt: skip
            state["advantages"] = self.advantages.state_dict()  # e.g. COPO's running statistics
            path = save_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, ema_state=ema_shadow, state=state,
                                   config_text=self._config_text(), keep_last=self.cfg.train.keep_last,
                                   weights=weights, optimizer_state=optimizer_state)  # fmt: skip
        self.accel.wait_for_everyone()
        self.saved_step = self.step
        return path

    def _load(self, ckpt: Checkpoint, training: bool = True) -> None:
        """Continue from ``ckpt`` (``training=False``: evaluation, the weights matter). An FSDP checkpoint's
        optimizer state is FQN-keyed (torch's full state dict) and loads into an FSDP run only; a DeepSpeed
        checkpoint has no optimizer state (ZeRO partitions it over the ranks; :meth:`save`) and only evaluates."""
        optimizer, load = self.rt.checkpoint_loader(ckpt.path, ckpt.state.get("strategy", "ddp"), training)
        state = apply_checkpoint(ckpt, model=self.model, optimizer=optimizer, scheduler=self.scheduler,
                                 load=load)  # fmt: skip
        if state.get("world_size", 1) != self.world:
            raise RuntimeError(
                f"checkpoint {ckpt.path} was written by {state.get('world_size')} processes; resume with the same "
                f"number (this run has {self.world}) to continue exactly"
            )
        self.step = self.saved_step = int(state["step"])
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.stream.load_state_dict(state["sampler"])
        self.advantages.load_state_dict(state.get("advantages", {}))  # older checkpoints: stateless stages
        ref_state = state["reference"]
        if ref_state.get("ema") is not None:
            ref_state["ema"]["shadow"] = state["ema_state"]
        self.reference.load_state_dict(ref_state)
        restore_rng(state["rng"][self.rank])
        self._engine_stale = True
        logger.info("resumed from %s at step %d", ckpt.path, self.step)

    # -- MMR1 re-scoring -------------------------------------------------------------------------------------

    def _vas_rescore(self, indices: list[int]) -> tuple[Tensor, list[list[list[int]]]]:
        """Correctness ``[k, N]`` (the accuracy term > 0) and token ids of ``N = sampler.refresh_generations`` fresh
        rollouts of each prompt ``indices[k]``: each rank generates its share, the results are gathered, so every
        rank gets the same (the sampling seeds depend on the step and the rank only)."""
        n, acc = self.cfg.sampler.refresh_generations, self.rewards.accuracy_term
        mine = list(range(len(indices)))[self.rank :: self.world]
        rows = []
        for start in range(0, len(mine), 16):
            chunk = mine[start : start + 16]
            examples = [self.train_set[indices[k]] for k in chunk]
            ro, _ = self._rollouts(examples, self._sampling(self._seed(self.step, 10_000 + start, self.rank),
                                                            num_generations=n))  # fmt: skip
            comps = ro.completions()
            scores = self.rewards.score_lists(ro.texts, [e for e in examples for _ in range(n)], comps,
                                              trainer_state=self._trainer_state(), names=[acc])[acc]  # fmt: skip
            for j, k in enumerate(chunk):
                span = range(j * n, (j + 1) * n)
                rows.append((k, [float(scores[r] > 0) for r in span], [comps[r] for r in span]))
        rows = sorted(self.rt.gather(rows))
        return torch.tensor([r[1] for r in rows]), [r[2] for r in rows]


# ----------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------


def train(cfg: Config, *, resume: str | Path | None = None,
          callbacks: Sequence[Callable[[Trainer, dict], None]] = ()) -> RunResult:  # fmt: skip
    """Build a :class:`Trainer` from ``cfg`` (resuming from ``resume`` when given) and run it."""
    return Trainer(cfg, resume=resume, callbacks=callbacks).train()


def evaluate_run(cfg: Config, *, run_dir: str | Path | None = None, checkpoint: str | Path | None = None,
                 num: int | None = None, search: str | None = None) -> dict[str, float]:  # fmt: skip
    """Held-out accuracy of a model (``cfg.model``), or of a run's checkpoint: greedy decoding, or with
    ``search="prm"`` GroundedPRM-guided greedy search (:meth:`Trainer.evaluate_search`)."""
    if search not in (None, "greedy", "prm"):
        raise ConfigError(f"--search: {search!r} is not one of 'greedy', 'prm'")
    source = checkpoint or run_dir
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False, tensorboard=False,
                                                             report_to="none"))  # fmt: skip
    trainer = Trainer(cfg, resume=source, write_run=False)
    metrics = trainer.evaluate_search(num) if search == "prm" else trainer.evaluate(num)
    return {"step": trainer.step, **metrics}

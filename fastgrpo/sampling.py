"""Data samplers of the reward schemes: curricula (RewardMap), variance-aware sampling (MMR1), DAPO filtering.

- :class:`CurriculumSampler` — RewardMap's multi-stage schedule: stages in a fixed order, samples shuffled
  within each stage ("global easy -> hard, local random"); one pass, no reshuffle across stages.
  :data:`REWARDMAP_STAGES` is the released 4-stage order (``REWARDMAP_STAGES_FINE`` / ``_COARSE`` the two
  alternatives left commented out in the official ``rl_dataset.py``).
- :class:`PerformanceGatedCurriculumSampler` — **goes beyond the paper** (whose stages are purely
  sequential): stays on a stage, reshuffling it each pass, until the mean reward of that stage's recent
  samples reaches ``threshold``, then moves on.
- :class:`VarianceAwareSampler` — MMR1's ``MixedCurriculumSampler`` as a batch sampler: per batch of
  ``B``, ``floor(mix_ratio * B)`` indices drawn with replacement in proportion to the VPS weights and the
  rest from a fixed uniform permutation consumed sequentially (wrapping around without reshuffling), the two
  parts interleaved. Each prompt's score is estimated from the training rollouts themselves
  (:meth:`PromptStream.observe`), and every ``update_every`` batches only the prompts whose estimate is missing
  or stale are re-scored with fresh rollouts, on a budget (:func:`fastgrpo.rewards.mmr1.variance_promotion_score`).
- :func:`dynamic_group_filter` and :class:`DynamicSamplingBuffer` — DAPO's dynamic sampling: drop groups
  whose rewards are all equal (no GRPO signal), keep generating until enough groups remain, then truncate
  to exactly the target, giving up after ``max_num_gen_batches``.

Every sampler is deterministic given its ``seed`` and has ``state_dict`` / ``load_state_dict`` so a resumed
run draws exactly the indices an uninterrupted one would. A ``torch.utils.data.DataLoader`` with workers
prefetches indices, so a state saved mid-epoch is exact only when it is taken between batches the loop has
consumed (``prefetch`` does not advance these samplers: they are advanced as their iterators are read).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from fastgrpo.advantages import _check_real, _check_tensor, _shape, group_index, group_stats

logger = logging.getLogger(__name__)

__all__ = [
    "REWARDMAP_STAGES",
    "REWARDMAP_STAGES_FINE",
    "REWARDMAP_STAGES_COARSE",
    "stages_from_labels",
    "CurriculumSampler",
    "PerformanceGatedCurriculumSampler",
    "StepFeedback",
    "VarianceAwareSampler",
    "GroupFilterResult",
    "dynamic_group_filter",
    "DynamicSamplingBuffer",
    "PromptStream",
]

REWARDMAP_STAGES: tuple[tuple[str, ...], ...] = (
    ("TorF1", "TorF2"),
    ("Counting2", "Counting3"),
    ("Counting1",),
    ("planning",),
)
REWARDMAP_STAGES_FINE: tuple[tuple[str, ...], ...] = (
    ("TorF1",),
    ("TorF2",),
    ("Counting3",),
    ("Counting2",),
    ("Counting1",),
    ("planning",),
)
REWARDMAP_STAGES_COARSE: tuple[tuple[str, ...], ...] = (
    ("TorF1", "TorF2", "Counting1", "Counting2", "Counting3"),
    ("planning",),
)


def stages_from_labels(labels: Sequence[str], stage_order: Sequence[Sequence[str]]) -> list[list[int]]:
    """Dataset indices of each stage, from a per-sample label (e.g. the question type) and a stage order.

    Raises ``ValueError`` when a label belongs to no stage or to two.
    """
    where: dict[str, int] = {}
    for s, names in enumerate(stage_order):
        for n in names:
            if n in where:
                raise ValueError(f"label {n!r} is in stages {where[n]} and {s} of stage_order")
            where[n] = s
    stages: list[list[int]] = [[] for _ in stage_order]
    for i, lab in enumerate(labels):
        if lab not in where:
            raise ValueError(
                f"sample {i} has label {lab!r}, which is in no stage of {list(map(list, stage_order))}"
            )
        stages[where[lab]].append(i)
    return stages


def _perm(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def _check_stages(stages: Sequence[Sequence[int]]) -> list[list[int]]:
    out = [list(map(int, s)) for s in stages]
    if not out or not any(out):
        raise ValueError("stages must hold at least one non-empty stage of dataset indices")
    return out


class CurriculumSampler(Sampler[int]):
    """Fixed stage order, shuffled within each stage (RewardMap's multi-stage curriculum).

    Args:
        stages: dataset indices per stage, in training order (:func:`stages_from_labels` builds them).
        shuffle_within: shuffle inside each stage (True in RewardMap); False keeps the given order.
        seed: the shuffle seed; epoch ``e`` uses ``seed + e`` (:meth:`set_epoch`), so stages are reshuffled
            per epoch but never mixed with one another.

    ``len(sampler)`` is the total number of indices; iteration resumes from :meth:`state_dict`'s position.
    """

    def __init__(
        self, stages: Sequence[Sequence[int]], *, shuffle_within: bool = True, seed: int = 0
    ) -> None:
        self.stages = _check_stages(stages)
        self.shuffle_within = shuffle_within
        self.seed = int(seed)
        self.epoch = 0
        self._position = 0

    @classmethod
    def from_labels(
        cls, labels: Sequence[str], stage_order: Sequence[Sequence[str]] = REWARDMAP_STAGES, **kwargs: Any
    ) -> CurriculumSampler:
        """Build from one label per sample (e.g. RewardMap question types) and a stage order."""
        return cls(stages_from_labels(labels, stage_order), **kwargs)

    def order(self) -> list[int]:
        """The full index order of the current epoch."""
        out: list[int] = []
        for s, idx in enumerate(self.stages):
            if self.shuffle_within:
                p = _perm(len(idx), self.seed + 1_000_003 * self.epoch + s)
                out.extend(idx[j] for j in p)
            else:
                out.extend(idx)
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._position = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self.stages)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        while self._position < len(order):
            i = order[self._position]
            self._position += 1
            yield i
        self._position = 0

    def metrics(self) -> dict[str, float]:
        """For the step's log: ``curriculum/stage``, the stage (0-based) of the index drawn last (nothing for a
        single stage: a plain shuffle)."""
        if len(self.stages) < 2:
            return {}
        last, end = max(self._position - 1, 0), 0
        for s, idx in enumerate(self.stages):
            end += len(idx)
            if last < end:
                return {"curriculum/stage": float(s)}
        return {"curriculum/stage": float(len(self.stages) - 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed, self.epoch, self._position = (
            int(state["seed"]),
            int(state["epoch"]),
            int(state["position"]),
        )


class PerformanceGatedCurriculumSampler(Sampler[int]):
    """Curriculum that advances when the current stage is learned (beyond the paper; see module docstring).

    Draws from the current stage, reshuffled on each pass, and moves to the next stage once the mean of the
    last ``window`` rewards reported for this stage's samples (:meth:`update`) is at least ``threshold``
    (and at least ``min_samples`` were reported), or after ``max_passes`` passes over the stage when given.
    The last stage is drawn from until ``num_samples`` indices have been produced in total.

    Args:
        stages: dataset indices per stage, in order.
        num_samples: total indices to draw (``len(sampler)``), e.g. ``steps * prompts_per_step``.
        threshold: mean reward to pass a stage (in the reward's own units). window, min_samples: the
            moving window of rewards (64) and the minimum count before gating (default ``window``).
        max_passes: optional cap on passes per stage (None: stay until the threshold is met).
        seed: shuffle seed.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]],
        num_samples: int,
        *,
        threshold: float = 0.5,
        window: int = 64,
        min_samples: int | None = None,
        max_passes: int | None = None,
        seed: int = 0,
    ) -> None:
        self.stages = [s for s in _check_stages(stages) if s]
        if num_samples <= 0 or window <= 0:
            raise ValueError(f"num_samples and window must be > 0, got {num_samples} and {window}")
        if max_passes is not None and max_passes <= 0:
            raise ValueError(f"max_passes must be > 0 or None, got {max_passes}")
        self.num_samples = int(num_samples)
        self.threshold = float(threshold)
        self.window = int(window)
        self.min_samples = int(window if min_samples is None else min_samples)
        self.max_passes = max_passes
        self.seed = int(seed)
        self.stage = 0
        self._pass = 0
        self._pos = 0
        self._drawn = 0
        self._recent: deque[float] = deque(maxlen=self.window)
        self._members = [set(s) for s in self.stages]

    def __len__(self) -> int:
        return self.num_samples

    @property
    def stage_mean_reward(self) -> float | None:
        """Mean of the recent rewards of the current stage (None before any)."""
        return sum(self._recent) / len(self._recent) if self._recent else None

    def _advance(self) -> None:
        if self.stage + 1 < len(self.stages):
            logger.info(
                "curriculum: stage %d -> %d (mean reward %s)",
                self.stage,
                self.stage + 1,
                self.stage_mean_reward,
            )
            self.stage += 1
            self._pass = 0
            self._pos = 0
            self._recent.clear()

    def update(self, indices: Sequence[int] | Tensor, rewards: Sequence[float] | Tensor) -> bool:
        """Report rewards of drawn samples (one per index, e.g. a prompt's mean reward); True if the stage advanced.

        Only samples of the current stage count.
        """
        idx = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        rew = rewards.tolist() if isinstance(rewards, Tensor) else list(rewards)
        if len(idx) != len(rew):
            raise ValueError(f"indices and rewards must have one length, got {len(idx)} and {len(rew)}")
        if not all(math.isfinite(float(r)) for r in rew):
            raise ValueError(f"rewards must be finite, got {rew}")
        members = self._members[self.stage]
        self._recent.extend(float(r) for i, r in zip(idx, rew) if int(i) in members)
        if len(self._recent) >= self.min_samples and self.stage_mean_reward >= self.threshold:
            self._advance()
            return True
        return False

    def __iter__(self) -> Iterator[int]:
        while self._drawn < self.num_samples:
            idx = self.stages[self.stage]
            perm = _perm(len(idx), self.seed + 1_000_003 * self._pass + 7919 * self.stage)
            if self._pos >= len(idx):
                self._pass += 1
                self._pos = 0
                if self.max_passes is not None and self._pass >= self.max_passes:
                    self._advance()
                continue
            i = idx[perm[self._pos]]
            self._pos += 1
            self._drawn += 1
            yield i
        self._drawn = 0

    def metrics(self) -> dict[str, float | None]:
        """For the step's log: ``curriculum/stage`` (0-based) and ``curriculum/stage_mean_reward``, the mean of
        the recent rewards the gate compares with ``threshold``."""
        return {"curriculum/stage": float(self.stage), "curriculum/stage_mean_reward": self.stage_mean_reward}

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "stage": self.stage,
            "pass": self._pass,
            "pos": self._pos,
            "drawn": self._drawn,
            "recent": list(self._recent),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed, self.stage, self._pass = int(state["seed"]), int(state["stage"]), int(state["pass"])
        self._pos, self._drawn = int(state["pos"]), int(state["drawn"])
        self._recent = deque((float(x) for x in state["recent"]), maxlen=self.window)


RescoreFn = Callable[[list[int]], tuple[Tensor, Sequence[Any]]]
ScoreFn = Callable[[Tensor, Sequence[Any] | None], Tensor]


def _outcome_variance(acc: Tensor, responses: Sequence[Any] | None = None) -> Tensor:
    # rewards.mmr1 imports the samplers through the registry: imported at call time, not at module load
    from fastgrpo.rewards.mmr1 import outcome_variance

    return outcome_variance(acc)


@dataclass
class StepFeedback:
    """What a training step learned about the prompts it trained on, one row per prompt group.

    Attributes:
        indices: dataset index of each group's prompt ``[P]`` (a prompt drawn twice has two groups).
        group_rewards: mean total reward of each group ``[P]``.
        accuracy: correctness of each completion ``[P, G]`` (the accuracy reward term), or None.
        completion_ids: token ids of each completion, ``P`` lists of ``G`` lists, or None.
    """

    indices: list[int]
    group_rewards: Tensor
    accuracy: Tensor | None = None
    completion_ids: Sequence[Sequence[Sequence[int]]] | None = None


class VarianceAwareSampler(Sampler[list[int]]):
    """MMR1 Variance-Aware Sampling as a batch sampler, scoring prompts from the rollouts training already makes.

    **Batches** (MMR1's ``MixedCurriculumSampler``): ``B_w = floor(mix_ratio * batch_size)`` indices drawn with
    replacement with probability proportional to the weights, ``B_r = batch_size - B_w`` taken in order from one
    fixed random permutation of the dataset (wrapping around, never reshuffled), interleaved ``w0, r0, w1, r1,
    ...`` (the longer part's tail last). Pass it as ``DataLoader(batch_sampler=...)`` or call :meth:`next_batch`.

    **Estimates.** Each prompt carries an estimate of its raw variance promotion score, ``score_fn(acc [k, N],
    responses) -> [k]`` (:func:`fastgrpo.rewards.mmr1.variance_promotion_score`; default the outcome variance
    ``p(1 - p)`` alone), and the batch at which it was made. They come from

    - the training rollouts (:meth:`observe`): every group a step sampled is a fresh estimate of its prompt, at
      no cost (MMR1's Algorithm 1; the released code re-scores only);
    - re-scoring: before batch ``s`` with ``s % update_every == 0``, the prompts whose estimate is missing, or made
      ``stale_after`` or more batches ago, are re-scored by ``rescore_fn(indices) -> (acc [k, N], responses)``
      with fresh rollouts: missing ones first (those the uniform part reaches last first), then the oldest, at most
      ``rescore_budget`` prompts (None: all of them, which at batch 0 is the paper's full scoring of the dataset).

    A new estimate replaces the old one, ``vps <- m * old + (1 - m) * new`` with ``momentum`` m (0 = replace).

    **Weights**: min-max over the known estimates, ``w = (vps - min) / (max - min + 1e-8)``; a prompt without an
    estimate weighs ``unknown_weight`` (1.0: like the best known prompt, so the weighted half explores it and its
    training rollouts measure it). Without any estimate, or when every weight is 0, the weighted part draws
    uniformly.

    Args:
        dataset_size: number of prompts. batch_size: prompts per batch.
        mix_ratio: λ (0.5 in every MMR1 setting; 1.0 hurts in the paper's ablation).
        update_every: re-scoring period in batches (56, the paper's Table 6; the released yaml uses 4).
        rescore_fn: the re-scoring callback (None: estimates come from :meth:`observe` only).
        score_fn: raw score of prompts from their rollouts' accuracies ``[k, N]`` and token ids.
        rescore_budget: prompts re-scored per refresh (None: every missing or stale one).
        stale_after: age in batches from which an estimate is re-scored (None: ``update_every``).
        unknown_weight: weight of a prompt without an estimate, in [0, 1].
        num_batches: batches per epoch (``len(sampler)``), default ``ceil(dataset_size / batch_size)``.
        momentum: estimate momentum. seed: RNG seed.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        mix_ratio: float = 0.5,
        update_every: int = 56,
        rescore_fn: RescoreFn | None = None,
        score_fn: ScoreFn | None = None,
        rescore_budget: int | None = None,
        stale_after: int | None = None,
        unknown_weight: float = 1.0,
        num_batches: int | None = None,
        momentum: float = 0.0,
        seed: int = 0,
    ) -> None:
        if dataset_size <= 0 or batch_size <= 0:
            raise ValueError(f"dataset_size and batch_size must be > 0, got {dataset_size} and {batch_size}")
        if not 0.0 <= mix_ratio <= 1.0:
            raise ValueError(f"mix_ratio must be in [0, 1], got {mix_ratio}")
        if update_every <= 0:
            raise ValueError(f"update_every must be > 0, got {update_every}")
        if rescore_budget is not None and rescore_budget < 0:
            raise ValueError(f"rescore_budget must be >= 0 or None (no limit), got {rescore_budget}")
        if stale_after is not None and stale_after < 0:
            raise ValueError(f"stale_after must be >= 0 or None (= update_every), got {stale_after}")
        if not 0.0 <= unknown_weight <= 1.0:
            raise ValueError(f"unknown_weight must be in [0, 1], got {unknown_weight}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.dataset_size = int(dataset_size)
        self.batch_size = int(batch_size)
        self.mix_ratio = float(mix_ratio)
        self.update_every = int(update_every)
        self.rescore_fn = rescore_fn
        self.score_fn = score_fn or _outcome_variance
        self.rescore_budget = rescore_budget
        self.stale_after = self.update_every if stale_after is None else int(stale_after)
        self.unknown_weight = float(unknown_weight)
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.num_batches = (
            int(num_batches) if num_batches is not None else math.ceil(dataset_size / batch_size)
        )
        self._gen = torch.Generator().manual_seed(self.seed)
        self._perm = torch.randperm(self.dataset_size, generator=self._gen)
        self._perm_pos = 0
        self._step = 0
        self._epoch_pos = 0
        self._vps = torch.full((self.dataset_size,), math.nan, dtype=torch.float64)
        self._made = torch.full((self.dataset_size,), -1, dtype=torch.long)  # batch of each estimate
        self._weights: Tensor | None = None  # cache, rebuilt when an estimate changes
        self._rescored = 0  # since the last observe (metrics)
        self._rescore_s = 0.0
        self._step_metrics: dict[str, float] = {}

    @property
    def weighted_per_batch(self) -> int:
        return int(math.floor(self.mix_ratio * self.batch_size))

    @property
    def estimates(self) -> Tensor:
        """Raw score estimate of each prompt, fp64 ``[dataset_size]``; NaN where there is none yet."""
        return self._vps.clone()

    @property
    def weights(self) -> Tensor:
        """Current sampling weights, fp64 ``[dataset_size]`` (class docstring)."""
        if self._weights is None:
            known = ~torch.isnan(self._vps)
            w = torch.full((self.dataset_size,), self.unknown_weight, dtype=torch.float64)
            if bool(known.any()):
                v = self._vps[known]
                w[known] = (v - v.min()) / (v.max() - v.min() + 1e-8)
            else:
                w.fill_(1.0)
            self._weights = w
        return self._weights

    def set_scores(self, indices: Sequence[int], scores: Tensor) -> None:
        """Record fresh raw scores ``[k]`` of the prompts ``indices`` (applied in order, with momentum)."""
        _check_tensor("scores", scores, ndim=1)
        if scores.shape[0] != len(indices):
            raise ValueError(f"scores must have shape [{len(indices)}] (one per index), got {_shape(scores)}")
        s = _check_real("scores", scores).to(torch.float64).cpu().tolist()
        for i, v in zip(indices, s):
            i = int(i)
            if not 0 <= i < self.dataset_size:
                raise ValueError(f"prompt index {i} is outside the dataset [0, {self.dataset_size})")
            old = float(self._vps[i])
            self._vps[i] = (
                v if math.isnan(old) or not self.momentum else self.momentum * old + (1 - self.momentum) * v
            )
            self._made[i] = self._step
        self._weights = None

    def _score(self, indices: Sequence[int], acc: Tensor, responses: Sequence[Any] | None) -> None:
        _check_tensor("accuracy", acc, ndim=2)
        if acc.shape[0] != len(indices):
            raise ValueError(
                f"accuracy must have one row per prompt, shape [{len(indices)}, N], got {_shape(acc)}"
            )
        self.set_scores(indices, self.score_fn(acc.float().cpu(), responses))

    def due_for_rescoring(self) -> list[int]:
        """The prompts a refresh now would re-score, in order (class docstring), before the budget."""
        missing = torch.isnan(self._vps)
        pos = torch.empty(self.dataset_size, dtype=torch.long)
        pos[self._perm] = torch.arange(self.dataset_size)
        ahead = (pos - self._perm_pos) % self.dataset_size  # how far the uniform part is from each prompt
        first = sorted(missing.nonzero().flatten().tolist(), key=lambda i: (-int(ahead[i]), i))
        stale = (~missing) & (self._step - self._made >= self.stale_after)
        then = sorted(stale.nonzero().flatten().tolist(), key=lambda i: (int(self._made[i]), i))
        return first + then

    def refresh(self) -> list[int]:
        """Re-score the due prompts (within the budget) through ``rescore_fn``; returns their indices."""
        if self.rescore_fn is None:
            return []
        due = self.due_for_rescoring()
        if self.rescore_budget is not None:
            due = due[: self.rescore_budget]
        if not due:
            return []
        t0 = time.perf_counter()
        acc, responses = self.rescore_fn(due)
        self._score(due, acc, responses)
        self._rescore_s += time.perf_counter() - t0
        self._rescored += len(due)
        logger.info("VAS: re-scored %d prompts before batch %d (%.1fs)", len(due), self._step,
                    time.perf_counter() - t0)  # fmt: skip
        return due

    def observe(self, feedback: StepFeedback) -> None:
        """Fresh estimates of the prompts a training step sampled, from its groups' accuracies ``[P, G]`` (and
        completions, when ``score_fn`` reads them)."""
        if feedback.accuracy is None:
            raise ValueError(
                "VarianceAwareSampler.observe needs the accuracy of each completion (feedback.accuracy [P, G])"
            )
        acc = feedback.accuracy
        self._score(feedback.indices, acc, feedback.completion_ids)
        flat = acc.float()
        zero = (
            (flat.max(1).values == flat.min(1).values).double().mean() if acc.shape[1] > 1 else torch.ones(())
        )
        self._step_metrics = {
            "vas/zero_var_groups": float(zero),
            "vas/known": float((~torch.isnan(self._vps)).double().mean()),
            "vas/rescored": float(self._rescored),
            "time/vas_rescore": self._rescore_s,
        }
        self._rescored, self._rescore_s = 0, 0.0

    def metrics(self) -> dict[str, float]:
        """For the step's log, about the step observed last: ``vas/zero_var_groups`` (share of its groups whose
        accuracy is equal across the group), ``vas/known`` (share of prompts with an estimate), ``vas/rescored``
        (prompts re-scored before it) and ``time/vas_rescore`` (seconds spent re-scoring them)."""
        return dict(self._step_metrics)

    def _uniform(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            out.append(int(self._perm[self._perm_pos]))
            self._perm_pos = (self._perm_pos + 1) % self.dataset_size
        return out

    def next_batch(self) -> list[int]:
        """Draw one batch (re-scoring first when due) and advance the state."""
        if self._step % self.update_every == 0:
            self.refresh()
        bw = self.weighted_per_batch
        w = self.weights
        if float(w.sum()) <= 0:
            w = torch.ones(self.dataset_size, dtype=torch.float64)
        weighted = torch.multinomial(w, bw, replacement=True, generator=self._gen).tolist() if bw else []
        uniform = self._uniform(self.batch_size - bw)
        batch: list[int] = []
        for a, b in zip(weighted, uniform):
            batch += [a, b]
        n = min(len(weighted), len(uniform))
        batch += weighted[n:] + uniform[n:]
        self._step += 1
        return batch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        while self._epoch_pos < self.num_batches:
            batch = self.next_batch()
            self._epoch_pos += 1
            yield batch
        self._epoch_pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "step": self._step,
            "epoch_pos": self._epoch_pos,
            "perm": self._perm.clone(),
            "perm_pos": self._perm_pos,
            "estimates": self._vps.clone(),
            "made": self._made.clone(),
            "generator": self._gen.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "estimates" not in state:
            raise ValueError(
                "this VarianceAwareSampler state predates online estimates (it holds 'weights', not 'estimates'); "
                "start a new run"
            )
        self.seed, self._step, self._epoch_pos = (
            int(state["seed"]),
            int(state["step"]),
            int(state["epoch_pos"]),
        )
        self._perm, self._perm_pos = state["perm"].clone(), int(state["perm_pos"])
        self._vps, self._made = state["estimates"].clone(), state["made"].clone()
        self._weights = None
        self._gen.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------------
# DAPO dynamic sampling
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GroupFilterResult:
    """Output of :func:`dynamic_group_filter`: ``keep`` bool ``[B]``, ``kept_groups`` bool ``[G]``, counts."""

    keep: Tensor
    kept_groups: Tensor
    num_kept: int
    num_dropped: int


def dynamic_group_filter(
    rewards: Tensor, group_size: int | None = None, *, group_ids: Tensor | None = None
) -> GroupFilterResult:
    """DAPO dynamic sampling filter: drop every group whose metric is identical across its completions.

    ``rewards`` ``[B]``: the metric (DAPO uses accuracy; any reward works). A group of size 1 has no spread
    and is dropped too. Equality is exact (the group std of :func:`fastgrpo.advantages.group_stats` is 0).
    """
    _check_tensor("rewards", rewards, ndim=1)
    if rewards.numel() == 0:
        raise ValueError("empty batch: rewards has shape [0]")
    r = _check_real("rewards", rewards)
    index, G = group_index(r.numel(), group_size, group_ids, device=r.device)
    _, std, _ = group_stats(r, index, G)
    kept = std > 0
    n_kept = int(kept.sum())
    return GroupFilterResult(keep=kept[index], kept_groups=kept, num_kept=n_kept, num_dropped=G - n_kept)


class DynamicSamplingBuffer:
    """Accumulates rollout batches until ``target_groups`` groups with reward spread exist (DAPO).

    Usage::

        buf = DynamicSamplingBuffer(target_groups=512)
        while buf.need_more:
            batch = generate(...)                     # rewards [B] and any per-completion fields
            buf.add(batch["rewards"], group_size=16, fields=batch)
        train_batch = buf.take()                      # exactly 512 * 16 completions, fields included

    ``add`` filters with :func:`dynamic_group_filter` and keeps whole groups; ``take`` truncates to exactly
    ``target_groups`` groups (in arrival order) and resets the buffer. After ``max_num_gen_batches`` batches
    (10; 0 or None = unlimited) ``need_more`` turns False; ``take`` then raises unless ``allow_partial``.
    Fields: tensors with first dimension ``B`` or lists of length ``B``.
    """

    def __init__(self, target_groups: int, *, max_num_gen_batches: int | None = 10) -> None:
        if target_groups <= 0:
            raise ValueError(f"target_groups must be > 0, got {target_groups}")
        self.target_groups = int(target_groups)
        self.max_num_gen_batches = max_num_gen_batches or None
        self.reset()

    def reset(self) -> None:
        self._groups: list[dict[str, Any]] = []
        self.num_gen_batches = 0
        self.num_dropped = 0

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    @property
    def exhausted(self) -> bool:
        return self.max_num_gen_batches is not None and self.num_gen_batches >= self.max_num_gen_batches

    @property
    def need_more(self) -> bool:
        """True while fewer than ``target_groups`` groups are kept and the batch budget is not spent."""
        return self.num_groups < self.target_groups and not self.exhausted

    def add(
        self,
        rewards: Tensor,
        group_size: int | None = None,
        *,
        group_ids: Tensor | None = None,
        fields: Mapping[str, Tensor | Sequence[Any]] | None = None,
    ) -> GroupFilterResult:
        """Filter one generated batch and keep its groups with reward spread."""
        res = dynamic_group_filter(rewards, group_size, group_ids=group_ids)
        B = rewards.shape[0]
        fields = dict(fields or {})
        fields.setdefault("rewards", rewards)
        for k, v in fields.items():
            if len(v) != B:
                raise ValueError(f"field {k!r} has length {len(v)}, expected {B} like rewards")
        index, G = group_index(B, group_size, group_ids)
        for g in range(G):
            if not bool(res.kept_groups[g]):
                continue
            members = (index == g).nonzero().flatten()
            self._groups.append(
                {
                    k: (
                        v[members.to(v.device)] if isinstance(v, Tensor) else [v[i] for i in members.tolist()]
                    )
                    for k, v in fields.items()
                }
            )
        self.num_gen_batches += 1
        self.num_dropped += res.num_dropped
        logger.info(
            "dynamic sampling: batch %d kept %d groups, dropped %d (total kept %d / %d)",
            self.num_gen_batches,
            res.num_kept,
            res.num_dropped,
            self.num_groups,
            self.target_groups,
        )
        return res

    def take(self, *, allow_partial: bool = False) -> dict[str, Any]:
        """The first ``target_groups`` kept groups, concatenated per field (tensors ``cat``, lists joined)."""
        if self.num_groups < self.target_groups and not allow_partial:
            raise RuntimeError(
                f"dynamic sampling kept {self.num_groups} of {self.target_groups} groups after "
                f"{self.num_gen_batches} generation batches (max_num_gen_batches={self.max_num_gen_batches}); "
                "raise max_num_gen_batches, generate larger batches, or take(allow_partial=True)"
            )
        if not self._groups:
            raise RuntimeError("dynamic sampling buffer holds no group")
        groups = self._groups[: self.target_groups]
        out: dict[str, Any] = {}
        for k in groups[0]:
            vals = [g[k] for g in groups]
            out[k] = torch.cat(vals) if isinstance(vals[0], Tensor) else [x for v in vals for x in v]
        self.reset()
        return out


class PromptStream:
    """The training loop's view of a sampler: :meth:`next` draws prompt indices across epochs, :meth:`observe`
    reports each step's groups to samplers that learn from them; the state lives in the sampler.

    Samplers: a :class:`CurriculumSampler` is restarted with a new epoch (a reshuffle within stages) when it
    runs out; a batch sampler (:class:`VarianceAwareSampler`) gives whole batches. After every step, a sampler
    with an ``update(indices, rewards)`` method (:class:`PerformanceGatedCurriculumSampler`) is fed the mean
    reward of each prompt's group, and one with an ``observe(feedback)`` method (:class:`VarianceAwareSampler`)
    the whole :class:`StepFeedback` (accuracies and completions too). A sampler's ``metrics()`` join the step's
    log (the trainer reads them).
    """

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

    def observe(
        self,
        indices: Sequence[int],
        group_rewards: Tensor,
        *,
        accuracy: Tensor | None = None,
        completion_ids: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> None:
        """After a step: ``indices`` of the prompts trained on (one per group), their groups' mean rewards
        ``[P]``, and optionally each completion's accuracy ``[P, G]`` and token ids."""
        update = getattr(self.sampler, "update", None)
        if callable(update):
            update(indices, group_rewards)
        observe = getattr(self.sampler, "observe", None)
        if callable(observe):
            observe(StepFeedback(list(indices), group_rewards, accuracy, completion_ids))

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

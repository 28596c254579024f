"""COPO (arXiv 2508.04138): global (prompt-level) advantage blended with the local one by answer entropy.

For a batch of ``G`` prompt groups with binary rewards ``r`` and extracted answer strings::

    H_g     = -sum_a p_a log2 p_a       over the group's (canonicalised) answers, in [0, log2 K]
    A_loc   = (r - mean_g r) / (std_u,g r + eps)                               eps = 1e-6 (verl)
    R_g     = mean_g r * c_g,   c_g = 1 - lambda H_g, lambda = (1 - 1/K)/log2 K   (c_g = 1 by default)
    A_glob  = (R_g - mean_G R) / (std_u,G R + eps)                              standardised over prompts
              (with ``history``: mean and std over the earlier prompts' R and this batch's together)
    w_g     = sigmoid(k (H_g - b))                                              k = 5, b = 1 (released)
    w       = gating(w_g)        soft-with-zero: w_g * 1[r != 0]   (see fastgrpo.advantages.copo_gate)
    loss    = (1 - w) L(A_glob) + w L(A_loc)       one ratio; pass advantages=(A_glob, A_loc), blend=w

Low entropy (a consistent group, often zero local signal) puts the weight on the global loss; high entropy
on the local one. ``A_glob`` needs batch statistics: compute it on the full rollout batch before splitting
into mini-batches.

Differences from the official code (``verl/trainer/ppo/core_algos.py``, ``dp_actor.py``):

- **Canonicalisation [code quirk]**: the official entropy counts *raw* answer strings (the sympy
  canonicalisation is commented out), so ``1/2`` and ``0.5`` are two answers. The default here,
  ``canonicalize="normalize"``, compares :func:`fastgrpo.rewards.outcome.normalize_answer` forms with numbers
  reduced to one canonical value; ``"sympy"`` also merges symbolically equal answers (needs sympy);
  ``"none"`` reproduces the official raw-string entropy. Missing answers (None) form one class.
- ``only-soft-with-coef`` (official: the global loss term times ``global_loss_coef``) is produced by scaling
  ``A_glob`` by the coefficient; this is the same loss because the clipped (and dual-clipped) PPO loss is
  positively homogeneous in the advantage. ``global_loss_coef`` must be >= 0.

Two reward inputs. The official code has a single binary reward ``r``. When a run also has format terms,
``R_g`` and the ``soft-with-zero`` gate read the *correctness* reward (``accuracy``: the paper defines the
prompt-level reward as the success rate and gates on "answer wrong"; a weighted total would count a
well-formatted wrong answer as correct and leave it the local weight), while ``A_loc`` reads ``rewards``,
the run's full reward: the local term is GRPO's group-relative advantage, which trains on every configured
term, and with a single binary accuracy term both inputs are the same, as in the paper. Under the released
gating a wrong answer is trained on ``A_glob`` alone, so format terms reach the loss only through correct
completions and through the gatings that keep the local weight for wrong answers.

Running statistics [beyond the paper]. The paper standardises ``R_g`` over the prompts of one rollout batch
(512). Over a few prompts that statistic is noise: the z-scores of 4 values lie within ``+-1.5`` however
little the rewards differ (a success rate of 0.17 among three 0s gets +1.5), a batch whose prompts all
scored the same gets no global signal at all, and under the released gating each wrong answer of an
above-average prompt is pushed up. With ``history`` (the ``R`` of recent prompts, kept by
:class:`PromptRewardWindow`) the mean and std are taken over those prompts *and* this batch's: including
the batch makes the first step (empty history) equal to the paper's formula, and its share of a window of
tens of prompts keeps the self-reference small (GRPO's group mean includes the sample too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastgrpo.advantages import (
    COPO_GATINGS,
    _check_real,
    _check_same_len,
    _check_tensor,
    _shape,
    copo_blend_weight,
    copo_gate,
    copo_global_advantages,
    copo_global_reward,
    group_advantages_ref,
    group_index,
    group_label_entropy,
)
from fastgrpo.rewards.outcome import normalize_answer, parse_number, symbolic_equal

__all__ = [
    "CANONICALIZE_MODES",
    "CopoAdvantages",
    "PromptRewardWindow",
    "canonicalize_answer",
    "answer_labels",
    "answer_entropy_bits",
    "copo_advantages",
]

CANONICALIZE_MODES = ("none", "normalize", "sympy")


def canonicalize_answer(answer: str | None, *, mode: str = "normalize") -> str | None:
    """Canonical string of an answer: ``none`` raw; ``normalize`` normalised text, numbers as ``repr(float)``."""
    if mode not in CANONICALIZE_MODES:
        raise ValueError(f"canonicalize must be one of {CANONICALIZE_MODES}, got {mode!r}")
    if answer is None or mode == "none":
        return answer
    num = parse_number(answer)
    if num is not None:
        return repr(float(num))
    return normalize_answer(answer)


def answer_labels(answers: Sequence[str | None], *, canonicalize: str = "normalize") -> Tensor:
    """Integer class label per answer (equal labels = equivalent answers), int64 ``[B]``.

    ``canonicalize="sympy"`` merges, after normalisation, answers that sympy proves equal (pairwise within
    the distinct forms, so quadratic in their number; fine for a group-sized list).
    """
    keys = [
        canonicalize_answer(a, mode="normalize" if canonicalize == "sympy" else canonicalize) for a in answers
    ]
    classes: list[str | None] = []
    labels = []
    for k in keys:
        found = -1
        for j, c in enumerate(classes):
            if k == c or (
                canonicalize == "sympy" and k is not None and c is not None and symbolic_equal(k, c)
            ):
                found = j
                break
        if found < 0:
            classes.append(k)
            found = len(classes) - 1
        labels.append(found)
    return torch.tensor(labels, dtype=torch.int64)


def _labels_and_index(
    answers: Sequence[str | None] | Tensor,
    B: int,
    group_size: int | None,
    group_ids: Tensor | None,
    canonicalize: str,
) -> tuple[Tensor, Tensor, int]:
    index, G = group_index(B, group_size, group_ids)
    if isinstance(answers, Tensor):
        if answers.dim() != 1 or answers.shape[0] != B or answers.dtype.is_floating_point:
            raise ValueError(
                f"answers as a tensor must be int labels of shape [{B}], got {_shape(answers)} {answers.dtype}"
            )
        return answers.to(torch.int64), index, G
    if len(answers) != B:
        raise ValueError(f"answers must hold one answer per completion ({B}), got {len(answers)}")
    labels = torch.empty(B, dtype=torch.int64)
    for g in range(G):  # canonicalise within each group: labels only need to be comparable inside a group
        members = (index == g).nonzero().flatten().tolist()
        labels[members] = answer_labels([answers[i] for i in members], canonicalize=canonicalize)
    return labels, index, G


def answer_entropy_bits(
    answers: Sequence[str | None] | Tensor,
    group_size: int | None = None,
    *,
    group_ids: Tensor | None = None,
    canonicalize: str = "normalize",
) -> Tensor:
    """Answer entropy in bits of every group, fp32 ``[G]`` (groups numbered as ``group_index``).

    ``answers``: one extracted answer string (or None) per completion, or int class labels ``[B]``.
    """
    B = answers.shape[0] if isinstance(answers, Tensor) else len(answers)
    if B == 0:
        raise ValueError("empty batch: answers has no element")
    labels, index, G = _labels_and_index(answers, B, group_size, group_ids, canonicalize)
    return group_label_entropy(labels, index, G)


@dataclass
class CopoAdvantages:
    """Output of :func:`copo_advantages`. Per completion ``[B]``: ``global_advantages``,
    ``local_advantages``, ``blend`` (weight of the local loss). Per group ``[G]``: ``entropy`` (bits),
    ``global_reward``."""

    global_advantages: Tensor
    local_advantages: Tensor
    blend: Tensor
    entropy: Tensor
    global_reward: Tensor

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        """``(A_global, A_local)``, the ``advantages`` argument of ``grpo_loss(..., blend=self.blend)``."""
        return self.global_advantages, self.local_advantages


def copo_advantages(
    rewards: Tensor,
    answers: Sequence[str | None] | Tensor,
    group_size: int | None = None,
    *,
    group_ids: Tensor | None = None,
    accuracy: Tensor | None = None,
    history: Tensor | None = None,
    k: float = 5.0,
    b: float = 1.0,
    gating: str = "soft-with-zero",
    use_entropy_coef: bool = False,
    global_loss_coef: float = 1.0,
    eps: float = 1e-6,
    canonicalize: str = "normalize",
) -> CopoAdvantages:
    """COPO's advantage pair and blend weight for one rollout batch (module docstring).

    Args:
        rewards: ``[B]`` rewards of the local advantage (binary in COPO; the run's total reward in the trainer).
        answers: ``B`` extracted answer strings (None when missing) or int class labels ``[B]``.
        group_size / group_ids: the prompt groups, as :func:`fastgrpo.advantages.group_advantages`.
        accuracy: ``[B]`` correctness reward (binary) of the global reward ``R_g`` and the ``soft-with-zero``
            gate; None: ``rewards`` (the paper's single reward).
        history: ``[H]`` prompt-level rewards of earlier prompts; ``A_glob`` is standardised over them and this
            batch's ``G`` prompts together (beyond the paper, module docstring). None or empty: over the batch.
        k, b: blend sigmoid slope and centre (released 5, 1; official function defaults 1, 0.5).
        gating: one of ``soft-with-zero`` (released), ``soft-with-forced``, ``only-soft``,
            ``only-soft-with-coef``, ``only-global``, ``no-global``.
        use_entropy_coef: official ``reward_coef_flg`` (False in the released script).
        global_loss_coef: with ``only-soft-with-coef``, scales the global term.
        eps: std epsilon of both standardisations (verl 1e-6).
        canonicalize: ``normalize`` (default), ``sympy`` or ``none`` (official raw strings).
    """
    _check_tensor("rewards", rewards, ndim=1)
    B = rewards.shape[0]
    if B == 0:
        raise ValueError("empty batch: rewards has shape [0]")
    if gating not in COPO_GATINGS:
        raise ValueError(f"gating must be one of {COPO_GATINGS}, got {gating!r}")
    if global_loss_coef < 0:
        raise ValueError(f"global_loss_coef must be >= 0, got {global_loss_coef}")
    r = _check_real("rewards", rewards)
    acc = r
    if accuracy is not None:
        _check_same_len("accuracy", _check_tensor("accuracy", accuracy), "rewards", B)
        acc = _check_real("accuracy", accuracy).to(device=r.device, dtype=r.dtype)
    labels, index, G = _labels_and_index(answers, B, group_size, group_ids, canonicalize)
    labels, index = labels.to(r.device), index.to(r.device)
    entropy = group_label_entropy(labels, index, G, dtype=r.dtype)
    a_loc = group_advantages_ref(r, index, G, scale="group", estimator="grpo", eps=eps)
    r_glob = copo_global_reward(acc, index, G, entropy, use_entropy_coef=use_entropy_coef)
    if history is not None and history.numel():
        _check_tensor("history", history, ndim=1)
        past = _check_real("history", history).to(device=r.device, dtype=r.dtype)
        # standardised over the earlier prompts and this batch's together (module docstring: why both)
        a_glob = copo_global_advantages(torch.cat([past, r_glob]), eps=eps)[past.shape[0] :][index]
    else:
        a_glob = copo_global_advantages(r_glob, eps=eps)[index]
    if gating == "only-soft-with-coef":
        a_glob = a_glob * global_loss_coef
    w = copo_gate(copo_blend_weight(entropy, k=k, b=b)[index], acc, a_loc, gating=gating)
    return CopoAdvantages(a_glob, a_loc, w, entropy, r_glob)


class PromptRewardWindow:
    """The prompt-level rewards ``R_g`` of the last ``size`` prompts, oldest first (beyond the paper).

    COPO's running statistics: pass ``values`` as ``history`` to :func:`copo_advantages`, then :meth:`update`
    with the batch's ``global_reward`` once the step's advantages are computed. A window (rather than an
    exponential average of the mean and variance) needs no bias correction while it fills, forgets the rewards
    of an older policy completely after ``size`` prompts, and its statistics are a plain mean and std that a
    test can recompute. ``state_dict`` / ``load_state_dict`` carry it through checkpoints bit for bit.
    """

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1 (prompts), got {size!r}")
        self.size = size
        self.values = torch.empty(0)

    def update(self, global_reward: Tensor) -> None:
        """Append the batch's ``[G]`` prompt-level rewards, keep the newest ``size``."""
        _check_tensor("global_reward", global_reward, ndim=1)
        new = global_reward.detach().to("cpu")
        self.values = torch.cat([self.values.to(new.dtype), new])[-self.size :]

    def state_dict(self) -> dict[str, Tensor]:
        return {"values": self.values.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        values = state["values"]
        _check_tensor("values", values, ndim=1)
        self.values = values.clone()[-self.size :]

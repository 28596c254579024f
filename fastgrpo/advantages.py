"""Group-relative advantage estimators and the tensor pieces of the group-level reward schemes.

Every function here works on a flat batch of ``B`` completions split into ``P`` groups, the completions of one
prompt each (STYLE.md's vocabulary: ``G`` completions per prompt, so ``B = P * G`` when groups are full). Groups
are described by an ``index`` tensor (int64 ``[B]``, values ``0..P-1``, any order) and ``num_groups = P``;
:func:`group_index` builds it from either a fixed ``group_size = G`` (consecutive blocks of ``G`` completions,
TRL / verl layout) or arbitrary ``group_ids`` (ragged groups, need not be sorted or contiguous).

Group statistics (:func:`group_stats`), for group ``g`` with ``n_g`` members::

    mean_g = (1/n_g) sum_{i in g} r_i
    std_g  = sqrt( sum_{i in g} (r_i - mean_g)^2 / max(n_g - 1, 1) )      # unbiased (Bessel), as torch.std

Advantages (:func:`group_advantages`), ``c_i`` the centred reward and ``s_i`` the scale::

    estimator="grpo"          c_i = r_i - mean_g                                  (DeepSeekMath, TRL, verl)
    estimator="rloo"          c_i = r_i - mean_{j in g, j != i} r_j = n_g/(n_g-1) (r_i - mean_g)
    estimator="reinforce_pp"  c_i = r_i - mean_g, then whitened over the batch   (REINFORCE++ with baseline)

    scale="group"   A_i = c_i / (std_g + eps)                  (TRL scale_rewards="group", the default)
    scale="batch"   A_i = c_i / (std_batch(r) + eps)           (TRL scale_rewards="batch")
    scale="none"    A_i = c_i                                  (Dr. GRPO; TRL scale_rewards="none")

For ``reinforce_pp`` the scale is by definition a batch one: ``A_i = c_i / (std_batch(c) + eps)`` for
``scale="group"`` or ``"batch"``, and ``A_i = c_i`` for ``scale="none"``. verl whitens over *tokens*
(``masked_whiten``) and also subtracts the batch mean; over sequences the batch mean of ``c`` is exactly 0
(deviations sum to zero within each group), so it is not subtracted here, which keeps zero-spread groups
at exactly 0.

Conventions (decided here, every backend follows them):

- **Group of size 1: advantage 0**, for every estimator and scale. Its mean is its own reward and its std
  is 0 (the Bessel divisor ``n-1 = 0`` is replaced by 1 and the sum of squares is 0). A single completion
  carries no group-relative signal. This differs from verl, which gives a size-1 group mean 0 and std 1
  (so its advantage is the raw reward), and from ``torch.std``, which returns NaN.
- **Zero-spread group: advantage exactly 0.** Statistics use a shifted two-pass algorithm with the group
  maximum as pivot, so a group whose rewards are all equal has mean exactly equal to that reward and
  deviations exactly 0 (a naive ``sum / n`` of ``[0.1, 0.1, 0.1]`` is not exactly 0.1). ``eps`` (default
  1e-4, TRL; verl and the EasyR1-based methods use 1e-6) keeps the division finite.
- Computation and output are fp64 for fp64 rewards and fp32 otherwise (bool / int / half rewards).

The tensor pieces of the schemes whose group-level math a C++ op mirrors live here too, with the same
``(values, index, num_groups)`` calling convention and no validation (the public wrappers validate):
:func:`care_eligible` / :func:`care_bonus` (GRPO-CARE consistency bonus), :func:`group_label_entropy`,
:func:`copo_blend_weight`, :func:`copo_gate`, :func:`copo_global_reward` and
:func:`copo_global_advantages` (COPO). The string-level parts (answer extraction, canonicalisation) are in
:mod:`fastgrpo.rewards`.

Cost: a handful of ``index_add`` / ``scatter_reduce`` passes over ``B`` values; memory ``O(B + P)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastgrpo.ops._dispatch import ADVANTAGES, resolve_backend
from fastgrpo.ops._validate import ESTIMATORS, SCALES, check_choice, compute_dtype
from fastgrpo.ops._validate import shape as _shape  # the name fastgrpo.rewards and fastgrpo.sampling import

__all__ = [
    "SCALES",
    "ESTIMATORS",
    "COPO_GATINGS",
    "group_index",
    "group_stats",
    "group_advantages_ref",
    "group_advantages",
    "care_eligible",
    "care_group_confidence",
    "care_bonus",
    "group_label_entropy",
    "copo_blend_weight",
    "copo_gate",
    "copo_global_reward",
    "copo_global_advantages",
]

COPO_GATINGS = (
    "soft-with-zero",
    "soft-with-forced",
    "only-soft",
    "only-soft-with-coef",
    "only-global",
    "no-global",
)


# ----------------------------------------------------------------------------------------------------------
# validation helpers (shared with fastgrpo.rewards and fastgrpo.sampling)
# ----------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: object, *, ndim: int | tuple[int, ...] | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {_shape(t)}")
    return t


def _check_real(name: str, t: Tensor) -> Tensor:
    """Reject complex tensors and NaN/inf; return ``t`` in its compute dtype (fp32 or fp64)."""
    if t.is_complex():
        raise ValueError(f"{name} must be real, got dtype {t.dtype} with shape {_shape(t)}")
    x = t.to(compute_dtype(t))
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} must be finite, got {bad} NaN/inf value(s) in a tensor of shape {_shape(t)}"
        )
    return x


def _check_same_len(name: str, t: Tensor, other_name: str, n: int) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] like {other_name}, got shape {_shape(t)}")


# ----------------------------------------------------------------------------------------------------------
# groups
# ----------------------------------------------------------------------------------------------------------


def group_index(
    batch_size: int,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, int]:
    """Dense group index of a batch: returns ``(index [B] int64 in 0..P-1, P)``.

    Exactly one of ``group_size`` (consecutive blocks of that many completions; ``B`` must be a multiple)
    and ``group_ids`` (int ``[B]``, any values, any order; groups are numbered by sorted id) must be given.
    """
    if (group_size is None) == (group_ids is None):
        raise ValueError(
            f"give exactly one of group_size and group_ids, got group_size={group_size!r} and "
            f"group_ids={'None' if group_ids is None else 'a tensor'}"
        )
    if batch_size <= 0:
        raise ValueError(f"empty batch: rewards has {batch_size} elements, need at least 1")
    if group_ids is not None:
        _check_tensor("group_ids", group_ids)
        if group_ids.dtype.is_floating_point or group_ids.is_complex() or group_ids.dtype == torch.bool:
            raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
        if group_ids.dim() != 1 or group_ids.shape[0] != batch_size:
            raise ValueError(
                f"group_ids must have shape [{batch_size}] (one id per reward), got {_shape(group_ids)}"
            )
        uniq, inverse = torch.unique(group_ids, return_inverse=True)
        index = inverse.to(torch.int64)
        return (index if device is None else index.to(device)), int(uniq.numel())
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if batch_size % group_size:
        raise ValueError(f"batch of {batch_size} rewards is not a multiple of group_size={group_size}")
    index = torch.arange(batch_size, device=device) // group_size
    return index, batch_size // group_size


def group_stats(values: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, unbiased std and size of every group: ``(mean [P], std [P], count [P])``.

    ``values`` ``[B]`` floating (the result has its dtype), ``index`` int64 ``[B]`` in ``0..P-1`` with every
    group non-empty. Shifted two-pass: pivot ``p_g = max_{i in g} x_i``, ``mean = p + sum(x - p)/n``,
    ``std = sqrt(sum((x - p) - (mean - p))^2 / max(n-1, 1))``: exact for all-equal groups, 0 for size 1.
    """
    x = values
    count = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, torch.ones_like(x))
    pivot = torch.full((num_groups,), -math.inf, dtype=x.dtype, device=x.device)
    pivot = pivot.scatter_reduce(0, index, x, reduce="amax", include_self=True)
    shifted = x - pivot[index]
    mean_shift = torch.zeros_like(count).index_add_(0, index, shifted) / count
    dev = shifted - mean_shift[index]
    m2 = torch.zeros_like(count).index_add_(0, index, dev * dev)
    std = torch.sqrt(m2 / (count - 1).clamp(min=1))
    return pivot + mean_shift, std, count


# ----------------------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------------------


def _batch_std(c: Tensor) -> Tensor:
    n = c.numel()
    centred = c - c.mean()
    return torch.sqrt((centred * centred).sum() / max(n - 1, 1))


def group_advantages_ref(
    rewards: Tensor,
    index: Tensor,
    num_groups: int,
    *,
    scale: str = "group",
    estimator: str = "grpo",
    eps: float = 1e-4,
) -> Tensor:
    """The spec of :func:`group_advantages` in plain torch, no validation.

    ``rewards`` ``[B]`` fp32 or fp64 (result in the same dtype), ``index`` int64 ``[B]`` from
    :func:`group_index`. See the module docstring for the formulas and conventions.
    """
    mean, std, count = group_stats(rewards, index, num_groups)
    c = rewards - mean[index]
    if estimator == "rloo":
        n = count[index]
        c = torch.where(n > 1, c * n / (n - 1).clamp(min=1), torch.zeros_like(c))
    elif estimator == "reinforce_pp":
        return c if scale == "none" else c / (_batch_std(c) + eps)
    elif estimator != "grpo":
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if scale == "group":
        return c / (std[index] + eps)
    if scale == "batch":
        return c / (_batch_std(rewards) + eps)
    if scale == "none":
        return c
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def group_advantages(
    rewards: Tensor,
    group_size: int | None = None,
    *,
    group_ids: Tensor | None = None,
    scale: str = "group",
    estimator: str = "grpo",
    eps: float = 1e-4,
    backend: str = "auto",
) -> Tensor:
    """Group-relative advantages of a batch of scalar rewards, one value per completion.

    Args:
        rewards: ``[B]`` (with ``group_size`` or ``group_ids``) or ``[P, G]`` (rows are groups; give
            neither). Float, int or bool; NaN/inf raise.
        group_size: ``G``, completions per prompt, consecutive in ``rewards`` (``B % G == 0``).
        group_ids: int ``[B]``, the group of each completion; ragged, unsorted, non-contiguous ids allowed.
        scale: ``"group"`` | ``"batch"`` | ``"none"`` (Dr. GRPO), see the module docstring.
        estimator: ``"grpo"`` | ``"rloo"`` | ``"reinforce_pp"``.
        eps: added to the std before dividing (TRL 1e-4; verl-based recipes 1e-6).
        backend: ``"torch"``, ``"cpp"`` / ``"cuda"`` (one launch of ``fastgrpo::group_advantages``) or
            ``"auto"``: the extension for CUDA tensors when it is built with CUDA (it saves ~30 launches),
            torch otherwise (microseconds on CPU); ``FASTGRPO_BACKEND`` overrides it. An explicit backend that
            cannot run raises (the rules of ``fastgrpo.ops._dispatch``).

    Returns:
        Advantages with the shape of ``rewards``, fp64 for fp64 rewards, fp32 otherwise. Size-1 groups and
        groups whose rewards are all equal get exactly 0.

    Example::

        >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)   # ~ [1.5, -.5, -.5, -.5]
    """
    _check_tensor("rewards", rewards, ndim=(1, 2))
    if rewards.numel() == 0:
        raise ValueError(f"empty batch: rewards has shape {_shape(rewards)}, need at least one element")
    check_choice("scale", scale, SCALES)
    check_choice("estimator", estimator, ESTIMATORS)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    x = _check_real("rewards", rewards)
    shape = rewards.shape
    if rewards.dim() == 2:
        if group_size is not None or group_ids is not None:
            raise ValueError(
                f"rewards of shape {_shape(rewards)} is [P, G] and already grouped; pass neither group_size "
                "nor group_ids (or flatten it)"
            )
        group_size = int(shape[1])
        x = x.reshape(-1)
    index, num_groups = group_index(x.numel(), group_size, group_ids, device=x.device)
    impl = _group_advantages_impl(backend, x.device, x.dtype)
    out = impl(x, index, num_groups, scale=scale, estimator=estimator, eps=float(eps))
    return out.reshape(shape)


def _group_advantages_impl(backend: str, device: torch.device, dtype: torch.dtype):
    """The implementation :func:`group_advantages` runs (the one dispatcher's rules, ``fastgrpo.ops._dispatch``)."""
    if resolve_backend(backend, device, dtype, ADVANTAGES) == "torch":
        return group_advantages_ref
    from fastgrpo.ops import _cpp

    def extension(rewards, index, num_groups, **kw):
        return _cpp.group_advantages(rewards, index, num_groups, **kw).advantages

    return extension


# ----------------------------------------------------------------------------------------------------------
# GRPO-CARE: group-relative consistency bonus
# ----------------------------------------------------------------------------------------------------------


def care_eligible(acc: Tensor, index: Tensor, num_groups: int, *, acc_threshold: float = 0.1) -> Tensor:
    """GRPO-CARE high-accuracy set: ``E_i = (acc_i > acc_threshold) & (acc_i >= mean_g acc)``, bool ``[B]``."""
    mean, _, _ = group_stats(acc, index, num_groups)
    return (acc > acc_threshold) & (acc >= mean[index])


def care_group_confidence(
    confidence: Tensor, eligible: Tensor, index: Tensor, num_groups: int
) -> tuple[Tensor, Tensor]:
    """Mean confidence over each group's eligible samples: ``(mu [P], has_eligible bool [P])``.

    ``mu_g = sum_{i in g} c_i E_i / sum_{i in g} E_i``; a group with no eligible sample has
    ``has_eligible = False`` and ``mu_g = 0`` (the official code gets NaN there and gives no bonus).
    """
    e = eligible.to(confidence.dtype)
    n = torch.zeros(num_groups, dtype=confidence.dtype, device=confidence.device).index_add_(0, index, e)
    s = torch.zeros_like(n).index_add_(0, index, confidence * e)
    has = n > 0
    return torch.where(has, s / n.clamp(min=1), torch.zeros_like(s)), has


def care_bonus(
    acc: Tensor,
    confidence: Tensor,
    index: Tensor,
    num_groups: int,
    *,
    coefficient: float = 0.5,
    margin: float | None = 0.0,
    acc_threshold: float = 0.1,
) -> Tensor:
    """GRPO-CARE consistency bonus ``b_i = coefficient * acc_i * 1[E_i & (c_i >= mu_g - margin)]``, ``[B]``.

    ``acc``, ``confidence`` ``[B]`` in one floating dtype (result too); ``margin=None`` means 0 as in the
    official code. A group without eligible samples gets no bonus.
    """
    eligible = care_eligible(acc, index, num_groups, acc_threshold=acc_threshold)
    mu, _ = care_group_confidence(confidence, eligible, index, num_groups)
    m = 0.0 if margin is None else float(margin)
    gets = eligible & (confidence >= mu[index] - m)  # eligible implies its group has an eligible sample
    return coefficient * acc * gets.to(acc.dtype)


# ----------------------------------------------------------------------------------------------------------
# COPO: answer entropy, global advantage, blend weight
# ----------------------------------------------------------------------------------------------------------


def group_label_entropy(
    labels: Tensor, index: Tensor, num_groups: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Entropy in bits of the empirical label distribution of each group, ``[P]``.

    ``labels`` int64 ``[B]``: equal labels within a group mean equal (canonicalised) answers; label values
    are only compared inside a group. ``H_g = -sum_a p_a log2 p_a``, in ``[0, log2 n_g]``.
    """
    pairs, pair_count = torch.unique(
        torch.stack([index, labels.to(index.dtype)], dim=1), dim=0, return_counts=True
    )
    pair_group = pairs[:, 0]
    pair_count = pair_count.to(dtype)
    n = torch.zeros(num_groups, dtype=dtype, device=labels.device).index_add_(0, pair_group, pair_count)
    p = pair_count / n[pair_group]
    h = torch.zeros_like(n).index_add_(0, pair_group, -p * torch.log2(p))
    return h.clamp(min=0.0)


def copo_blend_weight(entropy: Tensor, *, k: float = 5.0, b: float = 1.0) -> Tensor:
    """COPO soft blend ``w = sigmoid(k * (H - b))`` (any shape; weight of the *local* loss).

    Released script constants ``k=5, b=1`` (the official function defaults are ``k=1, b=0.5``).
    """
    return torch.sigmoid(k * (entropy - b))


def copo_gate(
    weight: Tensor, rewards: Tensor, local_advantages: Tensor, *, gating: str = "soft-with-zero"
) -> Tensor:
    """Per-completion blend weight after COPO's gating variant, ``[B]`` (all inputs ``[B]``).

    - ``soft-with-zero`` (released): ``w * 1[r != 0]`` (wrong answers use the pure global loss);
    - ``soft-with-forced``: ``w * 1[A_loc != 0]`` (zero-spread groups are pure global);
    - ``only-soft`` and ``only-soft-with-coef``: ``w``;
    - ``only-global``: 0 (pure global loss); ``no-global``: 1 (pure local loss, plain GRPO).
    """
    if gating == "soft-with-zero":
        return weight * (rewards != 0).to(weight.dtype)
    if gating == "soft-with-forced":
        return weight * (local_advantages != 0).to(weight.dtype)
    if gating in ("only-soft", "only-soft-with-coef"):
        return weight
    if gating == "only-global":
        return torch.zeros_like(weight)
    if gating == "no-global":
        return torch.ones_like(weight)
    raise ValueError(f"gating must be one of {COPO_GATINGS}, got {gating!r}")


def copo_global_reward(
    rewards: Tensor,
    index: Tensor,
    num_groups: int,
    entropy: Tensor | None = None,
    *,
    use_entropy_coef: bool = False,
) -> Tensor:
    """COPO prompt-level reward ``R_g = mean_g r * c_g``, ``[P]``.

    ``c_g = 1`` unless ``use_entropy_coef`` (official ``reward_coef_flg``, off in the released script):
    then ``c_g = 1 - lambda_g H_g`` with ``lambda_g = (1 - 1/n_g) / log2 n_g`` (0 for ``n_g = 1``), so
    ``c = 1`` for full agreement and ``1/n_g`` when all answers differ. ``entropy`` ``[P]`` in bits.
    """
    mean, _, count = group_stats(rewards, index, num_groups)
    if not use_entropy_coef:
        return mean
    if entropy is None:
        raise ValueError("use_entropy_coef=True needs the per-group answer entropy [P]")
    lam = torch.where(count > 1, (1 - 1 / count) / torch.log2(count.clamp(min=2)), torch.zeros_like(count))
    return mean * (1 - lam * entropy.to(mean.dtype))


def copo_global_advantages(global_reward: Tensor, *, eps: float = 1e-6) -> Tensor:
    """COPO global advantage, standardised over the prompts of the batch: ``(R_g - mean R)/(std_u R + eps)``.

    ``global_reward`` ``[P]``; a single prompt (or all-equal ``R``) gets 0. Broadcast to the completions with
    ``A_glob[index]``. Compute it on the full rollout batch, before splitting into mini-batches.
    """
    index = torch.zeros(global_reward.shape[0], dtype=torch.int64, device=global_reward.device)
    mean, std, _ = group_stats(global_reward, index, 1)
    return (global_reward - mean) / (std + eps)

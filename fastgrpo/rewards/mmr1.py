"""MMR1 (arXiv 2509.21268): the Variance Promotion Score that drives Variance-Aware Sampling.

Per prompt ``x`` with ``N`` fresh rollouts ``y_1..y_N`` (accuracies ``acc_i`` in [0, 1], token ids)::

    P    = mean_i acc_i
    OVS  = P (1 - P)                                 outcome variance ("learnability"), max 0.25 at P = 0.5
    TDS  = 1 - selfBLEU_123(y)    or distinct_3(y)   trajectory diversity (on unpadded token ids)
    VPS  = alpha * OVS + beta * TDS                   alpha = 0.8, beta = 0.2 (paper §6.1, Table 6)
    w    = (VPS - min VPS) / (max VPS - min VPS + 1e-8)      min-max over the whole dataset
    w   <- m * w_old + (1 - m) * w                    momentum, m = 0 (replace)

``selfBLEU_123(y) = mean_i BLEU(y_i ; {y_j}_{j != i})`` with weights (1/3, 1/3, 1/3), clipped n-gram
precision, brevity penalty against the closest reference length and NLTK's smoothing ``method1``
(a zero precision becomes ``0.1 / count``); ``distinct_n`` = unique n-grams / all n-grams, pooled over the
N responses. The sampler that uses ``w`` is :class:`fastgrpo.sampling.VarianceAwareSampler`.

Differences from the official code (``verl/curriculum/metrics.py``):

- **Raw self-BLEU [code quirk]**: the official diversity term adds raw self-BLEU, a *similarity*, with a
  positive weight, which favours less diverse prompts. Here TDS is ``1 - selfBLEU`` (the paper's "inverse
  self-BLEU"); ``official_raw_self_bleu=True`` reproduces the released sign.
- **Padding [code quirk]**: the official metrics run on the right-padded response tensor, so pad tokens
  count as n-grams. Here padding is stripped first (:func:`strip_padding`); pass ``pad_id=None`` and
  unpadded sequences to skip that.
- ``alpha, beta`` default to the paper's 0.8 / 0.2; the released yaml uses learnability only
  (``alpha=1, beta=0``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from fastgrpo.advantages import _check_real, _check_tensor, _shape

__all__ = [
    "DIVERSITY_METHODS",
    "strip_padding",
    "outcome_variance",
    "distinct_n",
    "sentence_bleu",
    "self_bleu",
    "edit_distance",
    "mean_edit_distance",
    "trajectory_diversity",
    "variance_promotion_score",
    "minmax_normalize",
]

DIVERSITY_METHODS = ("self_bleu", "distinct_n", "edit_distance")

Seqs = Sequence[Sequence[int]]


def strip_padding(
    ids: Tensor | Seqs, *, pad_id: int | None = None, mask: Tensor | None = None
) -> list[list[int]]:
    """Token-id lists without padding: drop positions where ``mask == 0`` or, without a mask, trailing ``pad_id``.

    ``ids``: int ``[N, T]`` (right-padded) or a list of sequences. With neither ``pad_id`` nor ``mask`` the
    sequences are returned as lists unchanged.
    """
    if isinstance(ids, Tensor):
        _check_tensor("ids", ids, ndim=2)
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask must have shape {_shape(ids)} like ids, got {_shape(mask)}")
        rows = ids.tolist()
        masks = mask.bool().tolist() if mask is not None else None
    else:
        rows = [list(s) for s in ids]
        masks = None
        if mask is not None:
            raise ValueError("mask is only accepted with a [N, T] tensor of ids")
    out: list[list[int]] = []
    for i, row in enumerate(rows):
        if masks is not None:
            out.append([t for t, keep in zip(row, masks[i]) if keep])
        elif pad_id is not None:
            end = len(row)
            while end > 0 and row[end - 1] == pad_id:
                end -= 1
            out.append(list(row[:end]))
        else:
            out.append(list(row))
    return out


def outcome_variance(acc: Tensor) -> Tensor:
    """``OVS = P(1 - P)`` with ``P = mean over rollouts``: ``acc`` ``[P, N]`` -> ``[P]`` (or ``P`` ``[P]`` -> ``[P]``)."""
    _check_tensor("acc", acc, ndim=(1, 2))
    a = _check_real("acc", acc)
    p = a.mean(-1) if a.dim() == 2 else a
    return p * (1 - p)


def _ngrams(seq: Sequence[int], n: int) -> Counter:
    return Counter(tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def distinct_n(seqs: Seqs, n: int = 3) -> float:
    """Unique n-grams / total n-grams pooled over the sequences (0 when there are none)."""
    total: Counter = Counter()
    for s in seqs:
        total.update(_ngrams(s, n))
    count = sum(total.values())
    return len(total) / count if count else 0.0


def sentence_bleu(
    hypothesis: Sequence[int],
    references: Seqs,
    *,
    max_n: int = 3,
    smoothing_eps: float = 0.1,
) -> float:
    """BLEU of one token sequence against references, uniform weights ``1/max_n``, NLTK ``method1`` smoothing.

    Clipped n-gram precision ``p_n = sum min(c_h, max_ref c_r) / max(1, #hyp n-grams)``, a zero numerator
    replaced by ``smoothing_eps``; brevity penalty ``exp(1 - r/c)`` for ``c < r`` (``r`` the closest reference
    length); 0 when no unigram matches or the hypothesis is empty.
    """
    c = len(hypothesis)
    if c == 0 or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = _ngrams(hypothesis, n)
        max_ref: Counter = Counter()
        for ref in references:
            for g, k in _ngrams(ref, n).items():
                max_ref[g] = max(max_ref[g], k)
        num = sum(min(k, max_ref[g]) for g, k in hyp.items())
        den = max(1, sum(hyp.values()))
        if n == 1 and num == 0:
            return 0.0
        log_p += math.log((num if num > 0 else smoothing_eps) / den) / max_n
    r = min((len(ref) for ref in references), key=lambda ln: (abs(ln - c), ln))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


def self_bleu(seqs: Seqs, *, max_n: int = 3, smoothing_eps: float = 0.1) -> float:
    """Mean over ``i`` of BLEU(``y_i``; the other sequences); 0 for fewer than two sequences."""
    if len(seqs) < 2:
        return 0.0
    scores = [
        sentence_bleu(s, [o for j, o in enumerate(seqs) if j != i], max_n=max_n, smoothing_eps=smoothing_eps)
        for i, s in enumerate(seqs)
    ]
    return sum(scores) / len(scores)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (unit costs)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def mean_edit_distance(seqs: Seqs) -> float:
    """Mean pairwise Levenshtein distance (unnormalised, as the official ``edit_distance`` metric)."""
    pairs = [(i, j) for i in range(len(seqs)) for j in range(i + 1, len(seqs))]
    if not pairs:
        return 0.0
    return sum(edit_distance(seqs[i], seqs[j]) for i, j in pairs) / len(pairs)


def trajectory_diversity(
    seqs: Tensor | Seqs,
    *,
    method: str = "self_bleu",
    n: int = 3,
    pad_id: int | None = None,
    mask: Tensor | None = None,
    official_raw_self_bleu: bool = False,
) -> float:
    """TDS of the N responses of one prompt: ``1 - selfBLEU_123`` (default), ``distinct_n`` or mean edit distance.

    Padding is stripped first (``pad_id`` / ``mask``, :func:`strip_padding`).
    ``official_raw_self_bleu=True`` returns raw self-BLEU (the released code's sign; see module docstring).
    """
    if method not in DIVERSITY_METHODS:
        raise ValueError(f"method must be one of {DIVERSITY_METHODS}, got {method!r}")
    s = strip_padding(seqs, pad_id=pad_id, mask=mask)
    if method == "distinct_n":
        return distinct_n(s, n)
    if method == "edit_distance":
        return mean_edit_distance(s)
    sb = self_bleu(s, max_n=n)
    return sb if official_raw_self_bleu else 1.0 - sb


def variance_promotion_score(
    acc: Tensor,
    responses: Sequence[Tensor | Seqs] | None = None,
    *,
    alpha: float = 0.8,
    beta: float = 0.2,
    method: str = "self_bleu",
    n: int = 3,
    pad_id: int | None = None,
    official_raw_self_bleu: bool = False,
) -> Tensor:
    """``VPS = alpha * OVS + beta * TDS`` per prompt, fp32 ``[P]`` (not normalised; see :func:`minmax_normalize`).

    Args:
        acc: ``[P, N]`` accuracies of N rollouts per prompt.
        responses: per prompt, the N responses' token ids (``[N, T]`` padded tensor or lists); may be None
            when ``beta == 0``.
    """
    ovs = outcome_variance(acc)
    if beta == 0:
        return alpha * ovs
    if responses is None or len(responses) != acc.shape[0]:
        got = "None" if responses is None else str(len(responses))
        raise ValueError(f"responses must hold the rollouts of each of the {acc.shape[0]} prompts, got {got}")
    tds = torch.tensor(
        [
            trajectory_diversity(
                r, method=method, n=n, pad_id=pad_id, official_raw_self_bleu=official_raw_self_bleu
            )
            for r in responses
        ],
        dtype=ovs.dtype,
    )
    return alpha * ovs + beta * tds


def minmax_normalize(
    vps: Tensor,
    *,
    eps: float = 1e-8,
    previous: Tensor | None = None,
    momentum: float = 0.0,
) -> Tensor:
    """``w = (vps - min)/(max - min + eps)`` over the dataset, then ``w <- m * previous + (1 - m) * w``."""
    _check_tensor("vps", vps, ndim=1)
    if vps.numel() == 0:
        raise ValueError("vps is empty (shape [0])")
    v = _check_real("vps", vps)
    w = (v - v.min()) / (v.max() - v.min() + eps)
    if previous is not None and momentum:
        if previous.shape != vps.shape:
            raise ValueError(f"previous must have shape {_shape(vps)}, got {_shape(previous)}")
        w = momentum * previous.to(w.dtype) + (1 - momentum) * w
    return w

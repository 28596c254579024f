"""GRPO-CARE (arXiv 2506.16141): answer-consistency bonus judged by a slowly moving EMA reference.

Per completion ``i`` of a group, with accuracy ``acc_i`` in [0, 1], format ``fmt_i`` in {0, 1} and the
EMA reference's per-token log-probs ``ref_logp`` of the sampled tokens::

    m_ans  = answer-span mask (tokens between <answer> and </answer>)              answer_span_mask
    c_i    = min( exp( sum_t ref_logp * m_ans / (sum_t m_ans + 1e-6) ), 0.95 )     answer_confidence
    E_i    = (acc_i > 0.1) & (acc_i >= mean_g acc)                                  eligible
    mu_g   = mean_{i in E} c_i                     (no eligible sample -> no bonus in the group)
    b_i    = coefficient * acc_i * 1[E_i & (c_i >= mu_g - margin)]                  coefficient 0.5
    R_i    = acc_i + fmt_i + b_i                                                    care_rewards

then the usual GRPO advantage (``eps = 1e-4``), a sequence-mean loss with no KL (``beta = 0`` replaces the KL
penalty), and the reference updated as ``θ_ref <- 0.995 θ_ref + 0.005 θ`` every 10 optimizer steps
(:class:`fastgrpo.ema.EMAReference`). ``c_i`` is the geometric-mean probability of the answer tokens given
the question and the sampled reasoning: a high value means the reasoning leads to the answer.

Differences from the official code (``grpo_trainer_ref_ema.py``):

- **Answer span**: the official code finds the ``answer`` token of the last ``<answer>`` tag and cuts
  3 tokens before the first EOS (assuming ``</answer>`` is 3 tokens right before EOS). Here the span is
  located from character offsets of the decoded completion (:func:`answer_token_span`: the tokens whose text
  overlaps what lies between the last ``<answer>`` and the first ``</answer>`` after it), so it depends neither on
  how a BPE tokenizer splits the tags in context (``" <answer>"`` and ``".<answer>"`` are other ids than
  ``"<answer>"`` alone) nor on the tag being last. :func:`answer_span_mask` matches token-id sequences instead,
  for callers who know how the tags are tokenised inside completions.
- A group without eligible samples gets no bonus (the official code gets there through a NaN mean).
- ``coefficient`` defaults to 0.5 (the released scripts); the official argparse default is 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastgrpo.advantages import (
    _check_real,
    _check_same_len,
    _check_tensor,
    _shape,
    care_bonus,
    care_eligible,
    group_index,
)

__all__ = ["CareRewards", "answer_span_mask", "answer_token_span", "answer_confidence", "care_rewards"]


def _match_positions(ids: Tensor, pattern: Sequence[int], valid: Tensor) -> Tensor:
    """bool ``[B, T]``: True at ``t`` where ``ids[b, t : t+L] == pattern`` entirely inside ``valid``."""
    B, T = ids.shape
    L = len(pattern)
    out = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    if L > T:
        return out
    pat = torch.as_tensor(list(pattern), dtype=ids.dtype, device=ids.device)
    win = ids.unfold(1, L, 1)  # [B, T-L+1, L]
    ok = (win == pat).all(-1) & valid.unfold(1, L, 1).all(-1)
    out[:, : T - L + 1] = ok
    return out


def answer_span_mask(
    completion_ids: Tensor,
    open_ids: Sequence[int],
    close_ids: Sequence[int],
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Mask of the final-answer tokens of each completion, bool ``[B, T]``.

    The span starts right after the last occurrence of ``open_ids`` (e.g. the ids of ``<answer>``) and
    ends before the first following occurrence of ``close_ids`` (``</answer>``), or at the end of the
    valid tokens when the closing tag is missing (truncated). No opening tag: an empty row.

    Args:
        completion_ids: int ``[B, T]`` completion token ids (right-padded).
        open_ids, close_ids: non-empty token-id sequences of the tags.
        mask: ``[B, T]`` 1 on valid completion tokens (default: all valid).
    """
    _check_tensor("completion_ids", completion_ids, ndim=2)
    if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
        raise ValueError(f"completion_ids must be integer token ids, got dtype {completion_ids.dtype}")
    if len(open_ids) == 0 or len(close_ids) == 0:
        raise ValueError(
            f"open_ids and close_ids must be non-empty, got {list(open_ids)} and {list(close_ids)}"
        )
    B, T = completion_ids.shape
    if mask is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=completion_ids.device)
    else:
        _check_tensor("mask", mask, ndim=2)
        if mask.shape != completion_ids.shape:
            raise ValueError(
                f"mask must have shape {_shape(completion_ids)} like completion_ids, got {_shape(mask)}"
            )
        valid = mask.bool()
    pos = torch.arange(T, device=completion_ids.device).expand(B, T)
    opens = _match_positions(completion_ids, open_ids, valid)
    has_open = opens.any(1)
    last_open = torch.where(opens, pos, torch.full_like(pos, -1)).max(1).values
    start = torch.where(has_open, last_open + len(open_ids), torch.full_like(last_open, T))
    closes = _match_positions(completion_ids, close_ids, valid) & (pos >= start[:, None])
    first_close = torch.where(closes, pos, torch.full_like(pos, T)).min(1).values
    return (pos >= start[:, None]) & (pos < first_close[:, None]) & valid


def answer_token_span(
    pieces: Sequence[str], open_tag: str = "<answer>", close_tag: str = "</answer>"
) -> tuple[int, int] | None:
    """Token range ``[s, e)`` of a completion's final answer, from the text of its tokens.

    ``pieces[t]`` is the text of token ``t`` (each token decoded on its own; see
    :func:`fastgrpo.rewards.shaping.token_pieces`). The answer is the text between the last ``open_tag`` and the
    first ``close_tag`` after it (the end of the completion when it is missing: truncated); its tokens are
    those whose text overlaps it in more than whitespace, so a token such as ``">4"`` that holds the tag's end
    and the answer's start belongs to the span and ``" </"`` does not. Returns None when there is no
    ``open_tag``; an empty (or blank) answer gives an empty range.
    """
    if not open_tag or not close_tag:
        raise ValueError(f"open_tag and close_tag must be non-empty, got {open_tag!r} and {close_tag!r}")
    text = "".join(pieces)
    at = text.rfind(open_tag)
    if at < 0:
        return None
    start = at + len(open_tag)
    close = text.find(close_tag, start)
    end = len(text) if close < 0 else close
    first = last = None
    pos = 0
    for t, piece in enumerate(pieces):
        lo, pos = pos, pos + len(piece)
        if text[max(lo, start) : min(pos, end)].strip():
            first = t if first is None else first
            last = t
    return (0, 0) if first is None else (first, last + 1)


def answer_confidence(
    ref_logp: Tensor,
    answer_mask: Tensor,
    *,
    upper_bound: float = 0.95,
    eps: float = 1e-6,
) -> Tensor:
    """``c = min(exp(sum_t ref_logp * m / (sum_t m + eps)), upper_bound)``, fp32 ``[B]`` (fp64 for fp64).

    ``ref_logp`` ``[B, T]`` per-token log-probs of the sampled tokens under the (EMA) reference;
    ``answer_mask`` ``[B, T]`` from :func:`answer_span_mask`. An empty span gives ``exp(0) = 1``, capped.
    Positions outside the mask may hold anything finite (padding).
    """
    _check_tensor("ref_logp", ref_logp, ndim=2)
    _check_tensor("answer_mask", answer_mask, ndim=2)
    if ref_logp.shape != answer_mask.shape:
        raise ValueError(
            f"ref_logp {_shape(ref_logp)} and answer_mask {_shape(answer_mask)} must have one shape"
        )
    m = answer_mask.to(ref_logp.dtype if ref_logp.dtype == torch.float64 else torch.float32)
    lp = torch.where(answer_mask.bool(), ref_logp, torch.zeros_like(ref_logp))
    lp = _check_real("ref_logp (inside answer_mask)", lp)
    mean_lp = (lp * m).sum(-1) / (m.sum(-1) + eps)
    return torch.exp(mean_lp).clamp(max=upper_bound)


@dataclass
class CareRewards:
    """Output of :func:`care_rewards`, all ``[B]``: ``total = acc + fmt + bonus``."""

    total: Tensor
    bonus: Tensor
    eligible: Tensor


def care_rewards(
    acc: Tensor,
    fmt: Tensor,
    confidence: Tensor,
    group_size: int | None = None,
    *,
    group_ids: Tensor | None = None,
    coefficient: float = 0.5,
    margin: float | None = 0.0,
    acc_threshold: float = 0.1,
) -> CareRewards:
    """GRPO-CARE total reward with the consistency bonus (module docstring).

    Args:
        acc: accuracy reward ``[B]`` in [0, 1].
        fmt: format reward ``[B]`` (pass zeros to leave it out).
        confidence: ``c`` ``[B]`` from :func:`answer_confidence`.
        group_size / group_ids: the groups, as :func:`fastgrpo.advantages.group_advantages`.
        coefficient: bonus scale λ (0.5 released scripts). margin: 0 (SEED-Bench-R1) or 0.01 (general video);
            None means 0. acc_threshold: minimum accuracy to be eligible (0.1).

    Returns:
        :class:`CareRewards` with fp32 (fp64 for fp64 ``acc``) tensors.
    """
    _check_tensor("acc", acc, ndim=1)
    B = acc.shape[0]
    if B == 0:
        raise ValueError("empty batch: acc has shape [0]")
    for name, t in (("fmt", fmt), ("confidence", confidence)):
        _check_tensor(name, t)
        _check_same_len(name, t, "acc", B)
    a = _check_real("acc", acc)
    f = _check_real("fmt", fmt).to(a.dtype)
    c = _check_real("confidence", confidence).to(a.dtype)
    index, G = group_index(B, group_size, group_ids, device=a.device)
    bonus = care_bonus(a, c, index, G, coefficient=coefficient, margin=margin, acc_threshold=acc_threshold)
    eligible = care_eligible(a, index, G, acc_threshold=acc_threshold)
    return CareRewards(total=a + f + bonus, bonus=bonus, eligible=eligible)

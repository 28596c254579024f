"""The GRPO-family policy loss computed from hidden states, with its gradient fused into the log-prob pass.

Shapes: ``B`` sequences, ``T`` padded length, ``D`` hidden size, ``V`` vocabulary, and ``N`` the loss tokens: the
completion tokens the loss scores (the packed rows of ``hidden [N, D]``; the valid ones under ``mask``).

Per token ``t`` of sequence ``i`` (TRL's definitions; ALGORITHMS.md section 0)::

    log_w  = logp - old_logp                                   (importance_level="token")
           = sum_{t in i} (logp - old_logp) / |o_i|            (importance_level="sequence", GSPO)
    r      = exp(log_w)                  (old_logp=None: r == 1 with gradient d logp; an overflow to inf has
                                          gradient 0, so a finite l never has a NaN gradient)
    l      = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)   (r first clamped to <= delta when given;
                                                                 r A := 0 for A = 0, even for r = inf)
             dual_clip c (verl clip_ratio_c), A < 0:  l = min(l, -c A)
    cispo: l = -sg[min(r, eps_high)] A logp
    sapo:  l = -sigmoid(tau (r - 1)) 4 / tau A,   tau = tau_pos if A > 0 else tau_neg
    COPO blend w:  l = (1 - w) l(A_global) + w l(A_local)      (one shared ratio)
    KL (k3, beta > 0):  l += beta k,  k = exp(ref - logp) - (ref - logp) - 1
             kl_bias_correction: k *= r (the unclamped, differentiable ratio; TRL's use_bias_correction_kl,
             DeepSeek-V3.2: the unbiased reverse-KL gradient under off-policy samples)

Aggregation (``loss_type``), over the valid (mask) tokens of ``B`` sequences::

    grpo, sapo : (1/B) sum_i (1/|o_i|) sum_t l          (a fully masked sequence still counts in B)
    bnpo       : sum l / (valid tokens of this batch)
    dr_grpo    : sum l / (B * max_completion_length)
    dapo, cispo: sum l / num_items_in_batch            (default: valid tokens of this batch)
    entropy_coef: loss -= entropy_coef * mean_t entropy   (TRL's entropy bonus, independent of loss_type)

How it runs. The loss is a function of per-token ``logp`` and ``entropy`` only, so ``dL/dz`` of the logits is
``c_logp (onehot - p) - c_ent p (z - E_p z)`` with two per-token coefficients. For token-level ratios each token's
term is local: the chunked engine computes, chunk by chunk, the logits block, its log-probs, the token terms'
coefficients (a tiny autograd call on ``[chunk]`` vectors) and the gradient GEMMs, in one pass: 6·N·D·V FLOPs and
one logits block of memory. The gradients are stored and scaled by the incoming gradient in ``backward``.
Sequence-level ratios need every token of a sequence first, so they (and the fully fused Triton backend) use
``linear_logprobs`` (forward) and an autograd backward over the same token terms (8·N·D·V FLOPs).

Metrics (detached): ``logp`` and ``entropy`` per token in the input layout (0 on masked tokens), ``kl`` (token
mean of the k3 estimate, when ``ref_logp`` is given; times ``r`` with ``kl_bias_correction``, as TRL logs it),
``clip_frac_low`` / ``clip_frac_high`` (token fraction with ``r < 1 - eps_low and A < 0`` / ``r > 1 + eps_high and
A > 0``; ``cispo``: ``r > eps_high and A > 0`` in ``clip_frac_high``; with a blend, the local advantage decides),
``ratio_mean`` (token mean of ``r``).

Bad input raises ``ValueError`` naming the argument: shapes, a non-positive ``chunk_size``, NaN / inf in
``hidden``, ``weight``, ``bias`` or ``logits`` (found from the O(N) log-partition and entropy, not by scanning the
``[N, D]`` inputs; ``-inf`` in ``bias`` / ``logits`` bans a token), NaN / inf advantages, log-probs above 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ._dispatch import BACKENDS, resolve_backend
from ._engine import chunked_pass, default_chunk_size
from ._validate import (
    check_choice,
    check_chunk_size,
    check_finite,
    check_float,
    check_head_outputs,
    check_logprobs,
    check_targets,
    is_finite_real,
    shape,
)
from .epilogue import get_epilogue
from .linear_logprobs import prepare_linear_inputs, run_linear_logprobs

__all__ = [
    "IMPORTANCE_LEVELS",
    "LOSS_TYPES",
    "GRPOLossOutput",
    "LossConfig",
    "accumulation_weight",
    "grpo_loss",
    "grpo_loss_from_logits",
    "grpo_loss_ref",
]

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
ImportanceLevel = Literal["token", "sequence"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
IMPORTANCE_LEVELS: tuple[str, ...] = get_args(ImportanceLevel)


@dataclass
class GRPOLossOutput:
    """``loss`` is a differentiable scalar; everything else is detached."""

    loss: Tensor
    logp: Tensor  # [B, T] or [N] fp32, 0 on masked tokens
    entropy: Tensor  # same layout as logp
    kl: Tensor  # scalar; 0 when ref_logp is None
    clip_frac_low: Tensor  # scalar
    clip_frac_high: Tensor  # scalar
    ratio_mean: Tensor  # scalar


@dataclass(frozen=True)
class LossConfig:
    """Every hyper-parameter of the GRPO-family loss (the module docstring has the math); one object that
    :func:`grpo_loss`, :func:`grpo_loss_from_logits`, :class:`fastgrpo.GRPOLoss` and the trainer's ``loss:``
    config section share. Per-call data (mask, ``cu_seqlens``, old / reference log-probs, temperature,
    ``max_completion_length``, ``num_items_in_batch``, ``blend``, ``bias``) are not part of it.
    :meth:`validate` checks every field; its messages start with the field's name."""

    loss_type: LossType = "dapo"
    """Aggregation and surrogate: grpo, bnpo, dr_grpo, dapo (token mean over ``num_items_in_batch``), cispo, sapo."""
    importance_level: ImportanceLevel = "token"
    """``token``: per-token ratios; ``sequence``: one ratio per sequence, the mean log-ratio (GSPO)."""
    eps_low: float = 0.2
    """Lower clip: the ratio is clipped below at ``1 - eps_low``; >= 0."""
    eps_high: float | None = None
    """Upper clip ``1 + eps_high`` (None: ``eps_low``; clip-higher when larger); cispo's ratio cap itself; >= 0."""
    delta: float | None = None
    """Two-sided clip: the unclipped ratio is clamped to at most ``delta`` (> 1), None for off."""
    dual_clip: float | None = None
    """verl's ``clip_ratio_c`` (> 1, e.g. 3): for A < 0 the token loss is at most ``-dual_clip * A``."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference (>= 0; > 0 needs ``ref_logp``)."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss minus ``entropy_coef`` times the token-mean entropy."""
    kl_bias_correction: bool = False
    """The KL term times the importance ratio (TRL's ``use_bias_correction_kl``)."""
    sapo_tau_pos: float = 1.0
    """SAPO's gate temperature for A > 0 (> 0; TRL's ``sapo_temperature_pos``)."""
    sapo_tau_neg: float = 1.05
    """SAPO's gate temperature for A <= 0 (> 0; TRL's ``sapo_temperature_neg``)."""
    chunk_size: int | None = None
    """Tokens per logits block (a positive int; None: a ~64 MiB fp32 block)."""
    backend: str = "auto"
    """``auto`` or one of ``fastgrpo.ops._dispatch.BACKENDS`` (torch, cpp, cuda, triton, triton_chunked)."""

    @property
    def eps_hi(self) -> float:
        return self.eps_low if self.eps_high is None else self.eps_high

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> LossConfig:
        """The validated config of an entry point's arguments (its ``locals()``): ``args["config"]`` when it is
        given — a field keyword with a non-default value beside it is an error naming the field — else the
        fields found in ``args`` (defaults for the rest). One place maps the public keywords onto the config."""
        config = args.get("config")
        given = {f.name: args[f.name] for f in fields(cls) if f.name in args}
        if config is None:
            config = cls(**given)
        elif not isinstance(config, cls):
            raise ValueError(f"config must be a fastgrpo.LossConfig, got {type(config).__name__}")
        else:
            for f in fields(cls):
                if f.name in given and given[f.name] != f.default:
                    raise ValueError(
                        f"{f.name}={given[f.name]!r} is given beside config=LossConfig(...): set it in the config"
                    )
        config.validate()
        return config

    @classmethod
    def from_fields(cls, config: LossConfig | None = None, **values: Any) -> LossConfig:
        """:meth:`from_args` for callers that take the fields as ``**values``: an unknown name is a TypeError."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}: not fields of LossConfig")
        return cls.from_args({**values, "config": config})

    def validate(self) -> None:
        """Raise ``ValueError`` for the first invalid field; the message starts with the field's name."""

        def number(name: str, ok, rule: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if (v is None and optional) or (is_finite_real(v) and ok(v)):
                return
            rule = f"{'None or ' if optional else ''}a finite number{' ' + rule if rule else ''}"
            raise ValueError(f"{name} must be {rule}, got {v!r}")

        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("importance_level", self.importance_level, IMPORTANCE_LEVELS)
        number("eps_low", lambda v: v >= 0, ">= 0")
        number("eps_high", lambda v: v >= 0, ">= 0", optional=True)
        number("delta", lambda v: v > 1, "> 1 (an upper clamp on the ratio)", optional=True)
        number("dual_clip", lambda v: v > 1, "> 1 (verl clip_ratio_c, e.g. 3.0)", optional=True)
        number("beta", lambda v: v >= 0, ">= 0")
        number("entropy_coef", lambda v: True, "")
        if not isinstance(self.kl_bias_correction, bool):
            raise ValueError(f"kl_bias_correction must be a bool, got {self.kl_bias_correction!r}")
        number("sapo_tau_pos", lambda v: v > 0, "> 0")
        number("sapo_tau_neg", lambda v: v > 0, "> 0")
        check_chunk_size(self.chunk_size)
        check_choice("backend", self.backend, ("auto",) + BACKENDS)


def accumulation_weight(
    loss_type: str, *, num_seqs: int, total_seqs: int, num_tokens: int, local_tokens: int, world_size: int
) -> float:
    """The weight of one micro-batch's loss under gradient accumulation and data parallelism.

    A rank splits its share of the global batch (``total_seqs`` sequences over ``world_size`` ranks) into
    micro-batches; micro-batch ``k`` holds ``num_seqs`` sequences and ``num_tokens`` loss tokens, the rank
    ``local_tokens`` in all. Its :func:`grpo_loss` ``L_k`` is weighted by ``w_k``, the weighted gradients are
    summed over the rank's micro-batches, and DDP averages the ranks' sums: ``(1/W) sum_r sum_k w_k grad L_k``.
    ``w_k`` makes that the gradient of the loss of the whole batch, each loss type's normaliser (module
    docstring) undone per micro-batch and applied once globally (``S_k``: the micro-batch's sum of its
    per-sequence terms (grpo, sapo: token means; dr_grpo: token sums / max_completion_length) or of its token
    terms (bnpo, dapo, cispo)):

    - dapo, cispo: ``L_k = S_k / num_items_in_batch`` with the *global* token count already, so the sum over all
      micro-batches of all ranks is the loss; ``w_k = W`` undoes DDP's mean.
    - bnpo: the token mean over *this rank's* batch (TRL's definition, so the whole-batch loss is the mean over
      ranks of each rank's token mean): ``L_k = S_k / num_tokens``, ``w_k = num_tokens / local_tokens``.
    - grpo, sapo, dr_grpo: a mean over the global sequences, ``L = sum S_k / total_seqs``; ``L_k = S_k /
      num_seqs``, so ``w_k = num_seqs / total_seqs * W``.
    """
    if loss_type in ("dapo", "cispo"):
        return float(world_size)
    if loss_type == "bnpo":
        return num_tokens / max(local_tokens, 1)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    return num_seqs / total_seqs * world_size  # grpo, sapo, dr_grpo


@dataclass
class TokenBatch:
    """Per-valid-token inputs of the loss, packed ``[n]`` (``n`` valid tokens of ``B`` sequences)."""

    seq_id: Tensor  # [n] int64 in [0, B)
    seq_len: Tensor  # [B] fp32, valid tokens per sequence
    num_seqs: int
    adv: Tensor  # [n] fp32 (A_global when blending)
    adv_local: Tensor | None  # [n] fp32, COPO local advantage
    blend: Tensor | None  # [n] fp32, weight of the local loss
    old_logp: Tensor | None  # [n] fp32
    ref_logp: Tensor | None  # [n] fp32
    weight: Tensor  # [n] fp32, aggregation weight of each token's policy term
    ent_weight: float  # entropy_coef / n

    def slice(self, s: int, e: int) -> TokenBatch:
        cut = lambda t: None if t is None else t[s:e]
        return replace(
            self,
            seq_id=self.seq_id[s:e],
            adv=self.adv[s:e],
            adv_local=cut(self.adv_local),
            blend=cut(self.blend),
            old_logp=cut(self.old_logp),
            ref_logp=cut(self.ref_logp),
            weight=self.weight[s:e],
        )


# --------------------------------------------------------------------------------------------------------------
# The token terms: the one definition of the loss, shared by every backend and by the reference.
# --------------------------------------------------------------------------------------------------------------


def _log_importance(logp: Tensor, tb: TokenBatch, cfg: LossConfig) -> Tensor:
    old = logp.detach() if tb.old_logp is None else tb.old_logp
    log_ratio = logp - old
    if cfg.importance_level == "token":
        return log_ratio
    per_seq = torch.zeros(tb.num_seqs, dtype=log_ratio.dtype, device=log_ratio.device)
    per_seq = per_seq.index_add(0, tb.seq_id, log_ratio) / tb.seq_len.clamp(min=1.0).to(log_ratio.dtype)
    return per_seq[tb.seq_id]


def _ratio(log_w: Tensor) -> Tensor:
    """``exp(log_w)``, whose gradient is 0 where it overflows to inf (not ``0 * inf = NaN``).

    A log-ratio beyond the dtype's range (88.7 in fp32) gives ``r = inf``: the token's loss is then inf, or a
    constant where a clip branch is selected (A > 0, or the dual clip for A < 0). The constant branch's
    gradient must be 0, but autograd's ``d exp = exp * grad`` would give ``inf * 0``."""
    with torch.no_grad():
        over = torch.isinf(torch.exp(log_w))
    return torch.where(over, math.inf, torch.exp(torch.where(over, 0.0, log_w)))


def _surrogate(logp: Tensor, ratio: Tensor, adv: Tensor, cfg: LossConfig) -> Tensor:
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_hi
    if cfg.loss_type == "cispo":
        return -torch.clamp(ratio, max=cfg.eps_hi).detach() * adv * logp
    if cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_tau_pos, cfg.sapo_tau_neg).to(ratio.dtype)
        return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv
    clipped = torch.clamp(ratio, lo, hi)
    r1 = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    # r1 = inf (an overflowing ratio) times A = 0 is 0, the limit, not NaN
    loss = -torch.min(torch.where(adv == 0, 0.0, r1 * adv), clipped * adv)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -cfg.dual_clip * adv), loss)
    return loss


def token_terms(logp: Tensor, tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token loss ``l [n]`` (policy surrogate + beta * k3 KL), the ratio ``r [n]`` and the KL ``[n]``."""
    ratio = _ratio(_log_importance(logp, tb, cfg))
    if tb.blend is None:
        loss = _surrogate(logp, ratio, tb.adv, cfg)
    else:
        loss = (1.0 - tb.blend) * _surrogate(logp, ratio, tb.adv, cfg) + tb.blend * _surrogate(
            logp, ratio, tb.adv_local, cfg
        )
    kl = None
    if tb.ref_logp is not None:
        d = tb.ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        if cfg.kl_bias_correction:
            kl = kl * ratio
        if cfg.beta != 0.0:
            loss = loss + cfg.beta * kl
    return loss, ratio, kl


def aggregate(logp: Tensor, entropy: Tensor, tb: TokenBatch, cfg: LossConfig) -> Tensor:
    """The scalar loss of (a chunk of) tokens: ``sum_t weight_t l_t - entropy_coef * sum_t H_t / n``."""
    loss_t, _, _ = token_terms(logp, tb, cfg)
    total = (tb.weight * loss_t).sum()
    if cfg.entropy_coef != 0.0:
        total = total - tb.ent_weight * entropy.sum()
    return total


def _metrics(logp: Tensor, tb: TokenBatch, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.no_grad():
        _, ratio, kl = token_terms(logp, tb, cfg)
        adv = tb.adv if tb.adv_local is None else tb.adv_local
        if cfg.loss_type == "cispo":
            low = torch.zeros_like(ratio, dtype=torch.bool)
            high = (ratio > cfg.eps_hi) & (adv > 0)
        else:
            low = (ratio < 1.0 - cfg.eps_low) & (adv < 0)
            high = (ratio > 1.0 + cfg.eps_hi) & (adv > 0)
        kl_mean = kl.mean() if kl is not None else torch.zeros((), device=logp.device)
        return kl_mean, low.float().mean(), high.float().mean(), ratio.mean()


# --------------------------------------------------------------------------------------------------------------
# Layout handling and validation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    valid_idx: Tensor | None  # [n] flat indices of valid tokens (None: all tokens valid)
    lead_shape: tuple[int, ...]
    seq_id_full: Tensor  # [numel(lead)] int64 sequence of every position
    num_seqs: int
    max_len: int | None  # T for the padded layout


def _per_token(name: str, x, lay: _Layout, per_seq_ok: bool, dev, dtype=torch.float32) -> Tensor | None:
    """Expand a per-sequence ``[B]`` or per-token (lead shape) tensor to the valid tokens ``[n]`` (``dtype``)."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x, device=dev, dtype=torch.float64)
    if x.device != dev:
        raise ValueError(f"{name} is on {x.device}, expected {dev}")
    if tuple(x.shape) == lay.lead_shape:  # per token (also when N == B: a packed [N] is per token)
        full = x.reshape(-1)
    elif per_seq_ok and x.dim() == 1 and x.shape[0] == lay.num_seqs:
        full = x[lay.seq_id_full]
    else:
        want = f"[B={lay.num_seqs}] or {list(lay.lead_shape)}" if per_seq_ok else f"{list(lay.lead_shape)}"
        raise ValueError(f"{name} must be {want}, got {shape(x)}")
    out = full if lay.valid_idx is None else full[lay.valid_idx]
    out = out.to(dtype)
    check_finite(name + " (on valid tokens)", out)
    return out


def _layout(lead: tuple[int, ...], mask, cu_seqlens, dev) -> tuple[_Layout, Tensor]:
    if len(lead) == 2:  # padded [B, T]
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is for the packed layout; hidden is padded {list(lead)} + D")
        b, t = lead
        seq_id_full = torch.arange(b, device=dev).repeat_interleave(t)
        max_len = t
    else:  # packed [N]
        if cu_seqlens is None:
            raise ValueError(f"the packed layout (hidden [N={lead[0]}, D]) needs cu_seqlens [B+1]")
        cu = cu_seqlens
        if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
            raise ValueError(
                f"cu_seqlens must be an integer tensor [B+1] with B >= 1, got {shape(cu)} {cu.dtype}"
            )
        cu = cu.to(dev).long()
        if int(cu[0]) != 0 or int(cu[-1]) != lead[0] or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"cu_seqlens {shape(cu_seqlens)} must start at 0, be non-decreasing and end at N={lead[0]}; "
                f"got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}"
            )
        b = cu.numel() - 1
        seq_id_full = torch.repeat_interleave(torch.arange(b, device=dev), cu[1:] - cu[:-1])
        max_len = None
    if mask is None:
        valid = None
        seq_len = torch.bincount(seq_id_full, minlength=b).float()
    else:
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have the leading shape {list(lead)} of hidden, got {shape(mask)}")
        m = mask.reshape(-1).to(dev)
        m = m.bool() if m.dtype == torch.bool else m != 0
        valid = m.nonzero().squeeze(1)
        if valid.numel() == 0:
            raise ValueError(f"mask {shape(mask)} has no valid token")
        seq_len = torch.bincount(seq_id_full[valid], minlength=b).float()
        if valid.numel() == m.numel():
            valid = None
    return _Layout(valid, lead, seq_id_full, b, max_len), seq_len


def _token_weight(lay: _Layout, seq_len: Tensor, seq_id: Tensor, cfg: LossConfig, max_completion_length,
                  num_items_in_batch) -> Tensor:  # fmt: skip
    """fp64 ``[n]`` aggregation weight of each valid token's loss (the module docstring's normalisers; how
    micro-batches combine: :func:`accumulation_weight`)."""
    n, b, dev = seq_id.numel(), lay.num_seqs, seq_id.device
    if cfg.loss_type in ("grpo", "sapo"):
        return 1.0 / (seq_len.double().clamp(min=1.0)[seq_id] * b)
    if cfg.loss_type == "bnpo":
        return torch.full((n,), 1.0 / n, device=dev, dtype=torch.float64)
    if cfg.loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else lay.max_len
        if length is None:
            raise ValueError("loss_type='dr_grpo' with the packed layout needs max_completion_length")
        if length <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {length}")
        return torch.full((n,), 1.0 / (b * length), device=dev, dtype=torch.float64)
    items = n if num_items_in_batch is None else float(num_items_in_batch)  # dapo, cispo
    if not items > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    return torch.full((n,), 1.0 / items, device=dev, dtype=torch.float64)


def _prepare(lead, dev, cfg: LossConfig, advantages, mask, cu_seqlens, blend, old_logp, ref_logp,
             max_completion_length, num_items_in_batch, dtype=torch.float32) -> tuple[_Layout, TokenBatch]:  # fmt: skip
    """The layout of the valid tokens and their :class:`TokenBatch`, from a public function's per-call
    arguments."""
    lay, seq_len = _layout(lead, mask, cu_seqlens, dev)
    seq_id = lay.seq_id_full if lay.valid_idx is None else lay.seq_id_full[lay.valid_idx]
    if blend is not None:
        if not (isinstance(advantages, (tuple, list)) and len(advantages) == 2):
            raise ValueError("with blend (COPO), advantages must be a pair (A_global, A_local)")
        adv = _per_token("advantages[0] (A_global)", advantages[0], lay, True, dev, dtype)
        adv_local = _per_token("advantages[1] (A_local)", advantages[1], lay, True, dev, dtype)
        w = _per_token("blend", blend, lay, True, dev, dtype)
    else:
        if isinstance(advantages, (tuple, list)):
            raise ValueError(
                "advantages is a pair (A_global, A_local) but blend is None; pass blend=w (COPO)"
            )
        adv, adv_local, w = _per_token("advantages", advantages, lay, True, dev, dtype), None, None
    old = _per_token("old_logp", old_logp, lay, False, dev, dtype)
    ref = _per_token("ref_logp", ref_logp, lay, False, dev, dtype)
    check_logprobs("old_logp (on valid tokens)", old)
    check_logprobs("ref_logp (on valid tokens)", ref)
    if cfg.beta != 0.0 and ref is None:
        raise ValueError(
            f"beta={cfg.beta} needs ref_logp (per-token reference log-probs {list(lay.lead_shape)})"
        )
    weight = _token_weight(lay, seq_len, seq_id, cfg, max_completion_length, num_items_in_batch)
    tb = TokenBatch(
        seq_id=seq_id,
        seq_len=seq_len,
        num_seqs=lay.num_seqs,
        adv=adv,
        adv_local=adv_local,
        blend=w,
        old_logp=old,
        ref_logp=ref,
        weight=weight.to(dtype),
        ent_weight=cfg.entropy_coef / seq_id.numel(),
    )
    return lay, tb


def _scatter_back(x: Tensor, lay: _Layout) -> Tensor:
    if lay.valid_idx is None:
        return x.detach().reshape(lay.lead_shape)
    full = torch.zeros(math.prod(lay.lead_shape), dtype=x.dtype, device=x.device)
    full[lay.valid_idx] = x.detach()
    return full.view(lay.lead_shape)


def _output(loss: Tensor, logp: Tensor, entropy: Tensor, tb: TokenBatch, cfg: LossConfig, lay: _Layout):
    """The loss with its detached metrics, per-token values back in the caller's layout."""
    kl, low, high, ratio_mean = _metrics(logp.detach(), tb, cfg)
    return GRPOLossOutput(
        loss=loss,
        logp=_scatter_back(logp, lay),
        entropy=_scatter_back(entropy, lay),
        kl=kl,
        clip_frac_low=low,
        clip_frac_high=high,
        ratio_mean=ratio_mean,
    )


# --------------------------------------------------------------------------------------------------------------
# Execution: one-pass fused Function (token-level ratios, chunked backends) and the two-pass path
# --------------------------------------------------------------------------------------------------------------


class FusedLinearGRPOLossFunction(torch.autograd.Function):
    """One pass over the vocabulary: forward computes the loss and all gradients; backward scales them."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, tb: TokenBatch, cfg: LossConfig, inv_temp, chunk, backend, needs
    ):
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        use_ent = cfg.entropy_coef != 0.0

        def coef_fn(s: int, e: int, logp_c: Tensor, ent_c: Tensor):
            nonlocal total
            with torch.enable_grad():
                lp = logp_c.detach().requires_grad_(True)
                en = ent_c.detach().requires_grad_(use_ent)
                part = aggregate(lp, en, tb.slice(s, e), cfg)
                grads = torch.autograd.grad(part, [lp, en] if use_ent else [lp])
            total += part.detach().double()
            return grads[0], (grads[1] if use_ent else None)

        res = chunked_pass(
            hidden,
            weight,
            bias,
            targets,
            inv_temp,
            chunk,
            get_epilogue(backend),
            coef_fn=coef_fn,
            needs_grad=needs,
        )
        check_head_outputs(res.lse, res.logp, res.entropy, {"hidden": hidden, "weight": weight, "bias": bias})
        if not any(needs):  # no gradient wanted: the value still has to be computed
            total = aggregate(res.logp, res.entropy, tb, cfg).double()
        ctx.save_for_backward(res.d_hidden, res.d_weight, res.d_bias)
        ctx.mark_non_differentiable(res.logp, res.entropy)
        return total.float(), res.logp, res.entropy

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        d_h, d_w, d_b = ctx.saved_tensors
        scale = lambda t: None if t is None else t * g_loss.to(t.dtype)
        return scale(d_h), scale(d_w), scale(d_b), None, None, None, None, None, None, None


def grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages: Tensor | tuple[Tensor, Tensor],
    *,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    blend: Tensor | None = None,
    bias: Tensor | None = None,
    config: LossConfig | None = None,
    loss_type: LossType = "dapo",
    importance_level: ImportanceLevel = "token",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    delta: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    kl_bias_correction: bool = False,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> GRPOLossOutput:
    """GRPO-family policy loss from last hidden states and the LM head, without materialising logits.

    Layouts (identical results):
        padded: ``hidden [B, T, D]``, ``targets [B, T]``, optional ``mask [B, T]`` (1 on completion tokens);
        packed: ``hidden [N, D]``, ``targets [N]``, ``cu_seqlens [B+1]`` (int), optional ``mask [N]``.
    ``targets`` are already shifted (``targets[t]`` is scored from ``hidden[t]``); masked positions may hold
    any id (e.g. -100). ``advantages``: per sequence ``[B]`` or per token (the leading shape); with ``blend``
    (COPO) a pair ``(A_global, A_local)`` and ``blend`` the per-sequence (or per-token) weight of the local loss.
    ``old_logp`` / ``ref_logp``: per-token log-probs (<= 0) of the behaviour / reference policy
    (``old_logp=None``: on-policy, ratio 1 with the gradient of logp). ``num_items_in_batch``: the
    ``dapo``/``cispo`` normaliser (the global token count under gradient accumulation / data parallelism; how
    micro-batches then combine: :func:`accumulation_weight`).

    The hyper-parameters are :class:`LossConfig`'s fields: pass ``config=LossConfig(...)``, or the fields as
    keywords (not both: a field keyword with a non-default value beside ``config`` raises). See the module
    docstring for the math of every option. NaN / inf in ``hidden``, ``weight`` or ``bias`` (``-inf`` in
    ``bias`` bans a token) raise, naming the argument. Returns a :class:`GRPOLossOutput`.
    """
    cfg = LossConfig.from_args(locals())
    prepare_linear_inputs(hidden, weight, targets, bias, temperature)
    dev = hidden.device
    lay, tb = _prepare(tuple(targets.shape), dev, cfg, advantages, mask, cu_seqlens, blend, old_logp, ref_logp,
                       max_completion_length, num_items_in_batch)  # fmt: skip

    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    y = targets.reshape(-1)
    if lay.valid_idx is not None:
        h, y = h.index_select(0, lay.valid_idx), y.index_select(0, lay.valid_idx)
    check_targets(y, weight.shape[0])
    y = y.long().contiguous()

    name = resolve_backend(cfg.backend, dev, h.dtype)
    chunk = cfg.chunk_size or default_chunk_size(h.shape[0], weight.shape[0])
    if cfg.importance_level == "token" and name != "triton":
        grad_on = torch.is_grad_enabled()
        needs = (
            grad_on and h.requires_grad,
            grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad,
        )
        loss, logp, entropy = FusedLinearGRPOLossFunction.apply(
            h.contiguous(), weight.contiguous(), bias, y, tb, cfg, 1.0 / temperature, chunk, name, needs
        )
    else:
        logp, entropy = run_linear_logprobs(h, weight, bias, y, temperature, cfg.chunk_size, name)
        loss = aggregate(logp, entropy, tb, cfg)
    return _output(loss, logp, entropy, tb, cfg, lay)


# --------------------------------------------------------------------------------------------------------------
# From logits, and the reference
# --------------------------------------------------------------------------------------------------------------


class LogitsLogprobsFunction(torch.autograd.Function):
    """``logits [N, V] -> (logp, entropy)`` through the epilogue; gradient into a new buffer (or in place)."""

    @staticmethod
    def forward(ctx, logits, targets, inv_temp: float, chunk: int, backend: str, inplace: bool):
        n = logits.shape[0]
        ep = get_epilogue(backend)
        lse = torch.empty(n, device=logits.device, dtype=torch.float32)
        logp, entropy = torch.empty_like(lse), torch.empty_like(lse)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            lse[s:e], logp[s:e], entropy[s:e] = ep.lse_logp_entropy(logits[s:e], targets[s:e], inv_temp)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.cfg = (inv_temp, chunk, backend, inplace)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_lse):
        logits, targets, lse, entropy = ctx.saved_tensors
        inv_temp, chunk, backend, inplace = ctx.cfg
        ep = get_epilogue(backend)
        grad = logits if inplace else torch.empty_like(logits)
        c_logp = g_logp.float() if g_logp is not None else torch.zeros_like(lse)
        c_ent = g_ent.float() if g_ent is not None else None
        for s in range(0, logits.shape[0], chunk):
            e = min(s + chunk, logits.shape[0])
            if not inplace:
                grad[s:e].copy_(logits[s:e])
            ep.logits_grad_(
                grad[s:e],
                targets[s:e],
                lse[s:e],
                entropy[s:e],
                c_logp[s:e],
                None if c_ent is None else c_ent[s:e],
                inv_temp,
            )
        return grad, None, None, None, None, None


def grpo_loss_from_logits(
    logits: Tensor,
    targets: Tensor,
    advantages: Tensor | tuple[Tensor, Tensor],
    *,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    blend: Tensor | None = None,
    inplace: bool = False,
    config: LossConfig | None = None,
    loss_type: LossType = "dapo",
    importance_level: ImportanceLevel = "token",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    delta: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    kl_bias_correction: bool = False,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> GRPOLossOutput:
    """:func:`grpo_loss` for callers who already hold ``logits [B, T, V]`` (padded) or ``[N, V]`` (packed).

    Reads the logits once in the forward; the backward writes ``dL/dlogits`` into a new buffer, or into
    ``logits`` itself when ``inplace=True`` (the caller's logits are then destroyed by the backward). NaN / inf
    logits raise (``-inf`` bans a token); every row is checked, masked ones included (their gradient is 0).
    """
    cfg = LossConfig.from_args(locals())
    check_float("logits", logits)
    if logits.dim() not in (2, 3) or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"logits must be [B, T, V] or [N, V] with targets of its leading shape; "
            f"got logits {shape(logits)}, targets {shape(targets)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"logits {shape(logits)} is empty")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dev = logits.device
    lay, tb = _prepare(tuple(targets.shape), dev, cfg, advantages, mask, cu_seqlens, blend, old_logp, ref_logp,
                       max_completion_length, num_items_in_batch)  # fmt: skip
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    y = targets.reshape(-1).long()
    valid = lay.valid_idx
    check_targets(y if valid is None else y[valid], v)
    if valid is not None:  # rows of masked tokens are computed (no copy of the logits) but get zero gradient
        y = torch.where(torch.zeros_like(y, dtype=torch.bool).index_fill_(0, valid, True), y, 0)
    name = resolve_backend(cfg.backend, dev, flat.dtype)
    if name == "triton":
        name = "triton_chunked"  # the logits already exist: the fused backend is the epilogue itself
    chunk = cfg.chunk_size or default_chunk_size(flat.shape[0], v)
    logp_all, ent_all, lse = LogitsLogprobsFunction.apply(
        flat, y.contiguous(), 1.0 / temperature, chunk, name, inplace
    )
    # every row, masked ones included: their (zero-coefficient) gradient still flows back to the caller
    check_head_outputs(lse, logp_all, ent_all, {"logits": logits})
    logp = logp_all if valid is None else logp_all[valid]
    entropy = ent_all if valid is None else ent_all[valid]
    loss = aggregate(logp, entropy, tb, cfg)
    return _output(loss, logp, entropy, tb, cfg, lay)


def grpo_loss_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    advantages,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    **kwargs,
) -> GRPOLossOutput:
    """The plain-torch spec: materialised logits in the inputs' dtype (use fp64 inputs for ground truth), the
    same arguments as :func:`grpo_loss`. Memory ``O(N·V)``: for tests and small shapes."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return grpo_loss_from_logits_ref(logits, targets, advantages, temperature=temperature, **kwargs)


def grpo_loss_from_logits_ref(
    logits: Tensor,
    targets: Tensor,
    advantages,
    *,
    temperature: float = 1.0,
    mask=None,
    cu_seqlens=None,
    old_logp=None,
    ref_logp=None,
    blend=None,
    max_completion_length=None,
    num_items_in_batch=None,
    config: LossConfig | None = None,
    **fields,
) -> GRPOLossOutput:
    """The spec of :func:`grpo_loss_from_logits` (``log_softmax`` + ``gather`` in the logits' dtype)."""
    cfg = LossConfig.from_fields(config, **fields)
    dev = logits.device
    z = logits.reshape(-1, logits.shape[-1])
    z = (z.float() if z.dtype in (torch.bfloat16, torch.float16) else z) / temperature
    lay, tb = _prepare(tuple(targets.shape), dev, cfg, advantages, mask, cu_seqlens, blend, old_logp, ref_logp,
                       max_completion_length, num_items_in_batch, dtype=z.dtype)  # fmt: skip
    y = targets.reshape(-1).long()
    if lay.valid_idx is not None:
        z, y = z[lay.valid_idx], y[lay.valid_idx]
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(1, y[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    loss = aggregate(logp, entropy, tb, cfg)
    return _output(loss, logp, entropy, tb, cfg, lay)

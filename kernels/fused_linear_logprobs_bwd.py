"""Fused gradient of the linear head for any loss of per-token log-prob and entropy.

Given the forward's ``lse, entropy`` and per-token coefficients ``c_logp = dL/dlogp``, ``c_ent = dL/dentropy``
(``x = (hidden @ weight.T + bias) * inv_temp``, ``p = softmax(x)``, ``z = x - lse = log p``)::

    dL/dZ[i, v] = inv_temp * ( c_logp[i] (1[v = y_i] - p[i, v])  -  c_ent[i] p[i, v] (z[i, v] + entropy_i) )
    d_hidden    = dL/dZ @ weight          d_weight = dL/dZ^T @ hidden          d_bias = sum_i dL/dZ[i, :]

(``x - E_p[x] = z + entropy``, so no cancellation for large logits.)

Design (cut-cross-entropy's backward with the entropy term). ``_fused_linear_grad_kernel`` gives each program
one ``[BLOCK_N, BLOCK_V]`` tile: it recomputes the logits tile on tensor cores, forms ``dL/dZ`` on chip, and
spends it at once on both products, looping over the hidden size in ``BLOCK_D`` slices; each slice's
``[BLOCK_N, BLOCK_D]`` and ``[BLOCK_V, BLOCK_D]`` partial products are added with fp32 atomics into fp32
accumulators (the sums over the vocabulary and over tokens are split across programs). ``dL/dZ`` enters the
tensor-core products in the input dtype (as any bf16 autograd would); every accumulation is fp32 and the
result is cast to the input dtype once at the end. A tile whose gradient is exactly zero (tokens with zero
coefficients, e.g. padding) skips both products; ``filter_eps > 0`` (off by default: results change) also
skips tiles whose entries are all at most ``filter_eps`` in magnitude, cut-cross-entropy's gradient filter.

Memory beyond the gradients: an fp32 ``[N, D]`` accumulator for half-precision ``hidden`` and an fp32 slab of
``d_weight`` rows for half-precision ``weight``: the vocabulary is processed in slabs of at most
``dw_slab_bytes`` (one launch each; no extra FLOPs), each cast into ``d_weight`` after its launch. fp32 inputs
accumulate directly into the returned gradients.

Cost: ``6·N·D·V`` FLOPs (recompute + two products). Atomic traffic ``4·N·V·D·(1/BLOCK_N + 1/BLOCK_V)`` bytes
to L2. Results are deterministic only up to the order of fp32 atomic additions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import grouped_pid, tile_logits
from ._launch import Launch, run
from .configs import TileConfig
from .fused_linear_logprobs_fwd import dot_flags

__all__ = ["fused_linear_grad_triton", "fused_linear_grad_plan", "DEFAULT_DW_SLAB_BYTES"]

DEFAULT_DW_SLAB_BYTES = 256 * 2**20


@triton.jit(do_not_specialize=["N", "v_begin", "v_stop"])
def _fused_linear_grad_kernel(
    H,  # hidden [N, D]
    W,  # weight [V, D]
    B,  # bias [V] (unused unless HAS_BIAS)
    Y,  # targets [N] int64; outside [0, V) = no one-hot term
    Lse,  # [N] fp32 logsumexp of x from the forward
    Ent,  # [N] fp32 entropy from the forward (unused unless HAS_CENT)
    CLogp,  # [N] fp32 dL/dlogp
    CEnt,  # [N] fp32 dL/dentropy (unused unless HAS_CENT)
    DH,  # [N, D] fp32 accumulator of d_hidden (unused unless COMPUTE_DH)
    DW,  # [v_stop - v_begin, D] fp32 accumulator of this slab's d_weight rows (unused unless COMPUTE_DW)
    DB,  # [V] fp32 accumulator of d_bias (unused unless COMPUTE_DB)
    N,
    D,
    V,
    v_begin,  # this launch covers vocabulary rows [v_begin, v_stop)
    v_stop,
    stride_h_n,
    stride_h_d,
    stride_w_v,
    stride_w_d,
    stride_dh_n,
    stride_dh_d,
    stride_dw_v,
    stride_dw_d,
    inv_temp,
    filter_eps,  # skip the products of a tile whose |dL/dZ| are all <= filter_eps (0: only exact zeros)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CENT: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(v_stop - v_begin, BLOCK_V)
    pid_n, pid_v = grouped_pid(pid, num_pid_n, num_pid_v, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n_ld = tl.minimum(offs_n, N - 1)
    offs_v = v_begin + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_stop
    offs_v_ld = tl.minimum(offs_v, V - 1)

    x = tile_logits(
        H, W, B, offs_n_ld, offs_v_ld, D, stride_h_n, stride_h_d, stride_w_v, stride_w_d, inv_temp,
        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, EVEN_D, UPCAST_DOT, PRECISION,
    )  # fmt: skip

    lse = tl.load(Lse + offs_n_ld)  # padding rows repeat row N-1: their p stays finite (then zeroed)
    c_logp = tl.load(CLogp + offs_n, mask=mask_n, other=0.0)
    y = tl.load(Y + offs_n, mask=mask_n, other=-1)
    z = x - lse[:, None]
    p = tl.exp(z)
    if HAS_CENT:
        ent = tl.load(Ent + offs_n, mask=mask_n, other=0.0)
        c_ent = tl.load(CEnt + offs_n, mask=mask_n, other=0.0)
        # a banned token (x = -inf: p = 0, z = -inf) contributes 0, not 0 * inf = NaN, as in logits_epilogue
        g = -p * (c_logp[:, None] + c_ent[:, None] * (tl.where(p > 0.0, z, 0.0) + ent[:, None]))
    else:
        g = -p * c_logp[:, None]
    g += tl.where(offs_v[None, :] == y[:, None], c_logp[:, None], 0.0)
    # Padding rows / columns hold duplicated data (clamped loads): zero them, as well as anything exp() blew up.
    g = tl.where(mask_n[:, None] & mask_v[None, :], g * inv_temp, 0.0)

    if tl.max(tl.abs(g)) > filter_eps:
        if COMPUTE_DB:
            tl.atomic_add(DB + offs_v, tl.sum(g, 0), mask=mask_v, sem="relaxed")
        g_op = g.to(H.dtype.element_ty)  # the products run in the input dtype, accumulate in fp32
        if UPCAST_DOT:
            g_op = g_op.to(tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        w_ptrs = W + (offs_v_ld.to(tl.int64)[:, None] * stride_w_v + offs_d[None, :] * stride_w_d)
        h_ptrs = H + (offs_n_ld.to(tl.int64)[:, None] * stride_h_n + offs_d[None, :] * stride_h_d)
        dh_ptrs = DH + (offs_n.to(tl.int64)[:, None] * stride_dh_n + offs_d[None, :] * stride_dh_d)
        dw_ptrs = DW + (
            (offs_v - v_begin).to(tl.int64)[:, None] * stride_dw_v + offs_d[None, :] * stride_dw_d
        )
        for k in range(0, tl.cdiv(D, BLOCK_D)):
            mask_d = offs_d < D - k * BLOCK_D
            if COMPUTE_DH:
                if EVEN_D:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=mask_d[None, :], other=0.0)
                if UPCAST_DOT:
                    w = w.to(tl.float32)
                dh = tl.dot(g_op, w, input_precision=PRECISION)
                if EVEN_D:
                    tl.atomic_add(dh_ptrs, dh, mask=mask_n[:, None], sem="relaxed")
                else:
                    tl.atomic_add(dh_ptrs, dh, mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
            if COMPUTE_DW:
                if EVEN_D:
                    h = tl.load(h_ptrs)
                else:
                    h = tl.load(h_ptrs, mask=mask_d[None, :], other=0.0)
                if UPCAST_DOT:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(g_op), h, input_precision=PRECISION)
                if EVEN_D:
                    tl.atomic_add(dw_ptrs, dw, mask=mask_v[:, None], sem="relaxed")
                else:
                    tl.atomic_add(dw_ptrs, dw, mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")
            w_ptrs += BLOCK_D * stride_w_d
            h_ptrs += BLOCK_D * stride_h_d
            dh_ptrs += BLOCK_D * stride_dh_d
            dw_ptrs += BLOCK_D * stride_dw_d


def fused_linear_grad_plan(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    c_logp: torch.Tensor,
    c_ent: torch.Tensor | None,
    inv_temp: float,
    needs: tuple[bool, bool, bool],
    cfg: TileConfig,
    interpret: bool,
    dw_slab_bytes: int = DEFAULT_DW_SLAB_BYTES,
    filter_eps: float = 0.0,
) -> tuple[list[Launch], tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """The launches of the fused gradient and the ``(d_hidden, d_weight, d_bias)`` they fill (``None`` where
    ``needs`` is False). fp32 accumulators are allocated here and cast by the launches' ``after`` hooks."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    need_dh, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    f32 = torch.float32

    d_hidden = d_weight = d_bias = None
    dh_acc = dw_acc = db_acc = None
    if need_dh:
        d_hidden = (
            torch.zeros(n, d, device=dev, dtype=f32) if hidden.dtype == f32 else torch.empty_like(hidden)
        )
        dh_acc = d_hidden if hidden.dtype == f32 else torch.zeros(n, d, device=dev, dtype=f32)
    if need_db:
        db_acc = torch.zeros(v, device=dev, dtype=f32)
        d_bias = db_acc if bias.dtype == f32 else torch.empty_like(bias)

    # Vocabulary slabs: one launch for fp32 weight (accumulate in place) or when d_weight is not needed.
    slab = v
    if need_dw:
        if weight.dtype == f32:
            d_weight = dw_acc = torch.zeros(v, d, device=dev, dtype=f32)
        else:
            d_weight = torch.empty_like(weight)
            rows = max(cfg.BLOCK_V, (dw_slab_bytes // (4 * d)) // cfg.BLOCK_V * cfg.BLOCK_V)
            slab = min(v, rows)
            dw_acc = torch.zeros(slab, d, device=dev, dtype=f32)

    dummy = lse  # any fp32 tensor for pointer arguments a constexpr flag disables
    plan = []
    for v_begin in range(0, v, slab):
        v_stop = min(v, v_begin + slab)
        after = []
        if need_dw and weight.dtype != f32:
            rows = v_stop - v_begin

            def _flush(dst=d_weight[v_begin:v_stop], src=dw_acc[:rows], last=v_stop == v):
                dst.copy_(src)
                if not last:
                    src.zero_()

            after.append(_flush)
        plan.append(
            Launch(
                kernel=_fused_linear_grad_kernel,
                grid=(triton.cdiv(n, cfg.BLOCK_N) * triton.cdiv(v_stop - v_begin, cfg.BLOCK_V),),
                args=dict(
                    H=hidden,
                    W=weight,
                    B=bias if bias is not None else dummy,
                    Y=targets,
                    Lse=lse,
                    Ent=entropy if c_ent is not None else dummy,
                    CLogp=c_logp,
                    CEnt=c_ent if c_ent is not None else dummy,
                    DH=dh_acc if dh_acc is not None else dummy,
                    DW=dw_acc if dw_acc is not None else dummy,
                    DB=db_acc if db_acc is not None else dummy,
                    N=n,
                    D=d,
                    V=v,
                    v_begin=v_begin,
                    v_stop=v_stop,
                    stride_h_n=hidden.stride(0),
                    stride_h_d=hidden.stride(1),
                    stride_w_v=weight.stride(0),
                    stride_w_d=weight.stride(1),
                    stride_dh_n=dh_acc.stride(0) if dh_acc is not None else 0,
                    stride_dh_d=dh_acc.stride(1) if dh_acc is not None else 0,
                    stride_dw_v=dw_acc.stride(0) if dw_acc is not None else 0,
                    stride_dw_d=dw_acc.stride(1) if dw_acc is not None else 0,
                    inv_temp=float(inv_temp),
                    filter_eps=float(filter_eps),
                ),
                constexprs=dict(
                    BLOCK_N=cfg.BLOCK_N,
                    BLOCK_V=cfg.BLOCK_V,
                    BLOCK_D=cfg.BLOCK_D,
                    GROUP_N=cfg.GROUP_N,
                    HAS_BIAS=bias is not None,
                    HAS_CENT=c_ent is not None,
                    COMPUTE_DH=need_dh,
                    COMPUTE_DW=need_dw,
                    COMPUTE_DB=need_db,
                    EVEN_D=d % cfg.BLOCK_D == 0,
                    **dot_flags(hidden.dtype, interpret),
                ),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                after=after,
            )
        )
    if need_dh and hidden.dtype != f32:
        plan[-1].after.append(lambda: d_hidden.copy_(dh_acc))
    if need_db and bias.dtype != f32:
        plan[-1].after.append(lambda: d_bias.copy_(db_acc))
    return plan, (d_hidden, d_weight, d_bias)


def fused_linear_grad_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    c_logp: torch.Tensor,
    c_ent: torch.Tensor | None,
    inv_temp: float,
    needs: tuple[bool, bool, bool],
    cfg: TileConfig,
    interpret: bool = False,
    dw_slab_bytes: int = DEFAULT_DW_SLAB_BYTES,
    filter_eps: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run the fused gradient on validated inputs; returns ``(d_hidden, d_weight, d_bias)`` in the inputs'
    dtypes, ``None`` where not requested (``d_bias`` also ``None`` without a bias)."""
    plan, out = fused_linear_grad_plan(
        hidden, weight, bias, targets, lse, entropy, c_logp, c_ent, inv_temp, needs, cfg, interpret, dw_slab_bytes,
        filter_eps,
    )  # fmt: skip
    run(plan)
    return out

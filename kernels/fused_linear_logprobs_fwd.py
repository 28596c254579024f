"""Fused forward of the linear head: per-token ``lse``, ``logp``, ``entropy`` without materialising logits.

For ``x = (hidden @ weight.T + bias) * inv_temp`` (``hidden [N, D]``, ``weight [V, D]``)::

    lse_i     = logsumexp_v x[i, v]
    logp_i    = x[i, y_i] - lse_i
    entropy_i = lse_i - sum_v softmax(x_i)_v x[i, v]

Design. ``_fused_lse_fwd_kernel`` gives each program ``BLOCK_N`` tokens and one contiguous slice of the
vocabulary (``num_groups`` slices in all, enough programs to fill the GPU when ``N`` is small). For each
``[BLOCK_N, BLOCK_V]`` tile it runs the K loop on tensor cores (``tile_logits``) and folds the fp32 tile into
streaming statistics ``(m, s, t)`` (see ``_common.py``); the program whose slice holds ``y_i`` also records the
target logit. Only ``3·num_groups + 1`` fp32 values per token reach global memory; ``_lse_combine_kernel``
merges the slices into ``lse, logp, entropy``.

Cost: ``2·N·D·V`` FLOPs; reads ``hidden`` once per vocabulary tile from L2 and ``weight`` once per token block
(programs are ordered slice-fastest so those running together share ``hidden`` blocks and ``weight`` tiles);
writes O(N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import finalize_stats, merge_stats, online_update, tile_logits
from ._launch import Launch, run
from .configs import TileConfig

__all__ = ["fused_lse_logp_entropy_triton", "fused_lse_fwd_plan"]


@triton.jit(do_not_specialize=["N", "v_per_group", "num_groups", "stride_part_g"])
def _fused_lse_fwd_kernel(
    H,  # hidden [N, D], fp32 / bf16 / fp16
    W,  # weight [V, D], same dtype
    B,  # bias [V] (unused unless HAS_BIAS)
    Y,  # targets [N] int64; outside [0, V) means "no target" (the logit is left at 0)
    PartM,  # [num_groups, N] fp32 out: running max of each slice
    PartS,  # [num_groups, N] fp32 out: sum exp(x - m) over the slice
    PartT,  # [num_groups, N] fp32 out: sum exp(x - m) (x - m) over the slice
    TgtX,  # [N] fp32 out: x[i, y_i], written by the program whose slice holds y_i
    N,
    D,
    V,
    v_per_group,  # vocabulary columns per slice, a multiple of BLOCK_V
    num_groups,
    stride_h_n,
    stride_h_d,
    stride_w_v,
    stride_w_d,
    stride_part_g,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_g = pid % num_groups  # slice-fastest: neighbouring programs share the same hidden block
    pid_n = pid // num_groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n_ld = tl.minimum(offs_n, N - 1)
    y = tl.load(Y + offs_n, mask=mask_n, other=-1)

    v_start = pid_g * v_per_group
    v_end = tl.minimum(v_start + v_per_group, V)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        offs_v_ld = tl.minimum(offs_v, V - 1)
        x = tile_logits(
            H, W, B, offs_n_ld, offs_v_ld, D, stride_h_n, stride_h_d, stride_w_v, stride_w_d, inv_temp,
            BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, EVEN_D, UPCAST_DOT, PRECISION,
        )  # fmt: skip
        x = tl.where(mask_v[None, :], x, float("-inf"))
        tx += tl.sum(tl.where(offs_v[None, :] == y[:, None], x, 0.0), 1)
        m, s, t = online_update(m, s, t, x, 1)

    part = pid_g.to(tl.int64) * stride_part_g + offs_n
    tl.store(PartM + part, m, mask=mask_n)
    tl.store(PartS + part, s, mask=mask_n)
    tl.store(PartT + part, t, mask=mask_n)
    owner = (y >= v_start) & (y < v_end)
    tl.store(TgtX + offs_n, tx, mask=mask_n & owner)


@triton.jit(do_not_specialize=["N", "num_groups", "stride_part_g"])
def _lse_combine_kernel(
    PartM,  # [num_groups, N] fp32 slice statistics from _fused_lse_fwd_kernel
    PartS,
    PartT,
    TgtX,  # [N] fp32 target logit
    Lse,  # [N] fp32 out
    Logp,  # [N] fp32 out
    Ent,  # [N] fp32 out
    N,
    num_groups,
    stride_part_g,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    pm = PartM + offs
    ps = PartS + offs
    pt = PartT + offs
    for _ in range(0, num_groups):
        m2 = tl.load(pm, mask=mask, other=float("-inf"))
        s2 = tl.load(ps, mask=mask, other=0.0)
        t2 = tl.load(pt, mask=mask, other=0.0)
        m, s, t = merge_stats(m, s, t, m2, s2, t2)
        pm += stride_part_g
        ps += stride_part_g
        pt += stride_part_g
    s = tl.where(mask, s, 1.0)
    m = tl.where(mask, m, 0.0)
    lse, ent = finalize_stats(m, s, t)
    tx = tl.load(TgtX + offs, mask=mask, other=0.0)
    tl.store(Lse + offs, lse, mask=mask)
    tl.store(Logp + offs, tx - lse, mask=mask)
    tl.store(Ent + offs, ent, mask=mask)


COMBINE_BLOCK = 256


def dot_flags(dtype: torch.dtype, interpret: bool) -> dict:
    """``UPCAST_DOT`` / ``PRECISION`` constexprs: fp32 operands use IEEE fp32 unless torch allows TF32."""
    half = dtype in (torch.bfloat16, torch.float16)
    tf32 = (not interpret) and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST_DOT": interpret and half, "PRECISION": "tf32" if (tf32 and not half) else "ieee"}


def fused_lse_fwd_plan(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: float,
    cfg: TileConfig,
    num_groups: int,
    interpret: bool,
) -> tuple[list[Launch], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The two launches of the fused forward and the ``(lse, logp, entropy)`` tensors they fill."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    v_tiles = triton.cdiv(v, cfg.BLOCK_V)
    v_per_group = triton.cdiv(v_tiles, max(1, num_groups)) * cfg.BLOCK_V
    groups = triton.cdiv(v, v_per_group)
    part_m = torch.empty(groups, n, device=dev, dtype=torch.float32)
    part_s = torch.empty(groups, n, device=dev, dtype=torch.float32)
    part_t = torch.empty(groups, n, device=dev, dtype=torch.float32)
    tgt_x = torch.zeros(n, device=dev, dtype=torch.float32)
    lse = torch.empty(n, device=dev, dtype=torch.float32)
    logp = torch.empty(n, device=dev, dtype=torch.float32)
    ent = torch.empty(n, device=dev, dtype=torch.float32)
    fwd = Launch(
        kernel=_fused_lse_fwd_kernel,
        grid=(triton.cdiv(n, cfg.BLOCK_N) * groups,),
        args=dict(
            H=hidden,
            W=weight,
            B=bias if bias is not None else hidden,
            Y=targets,
            PartM=part_m,
            PartS=part_s,
            PartT=part_t,
            TgtX=tgt_x,
            N=n,
            D=d,
            V=v,
            v_per_group=v_per_group,
            num_groups=groups,
            stride_h_n=hidden.stride(0),
            stride_h_d=hidden.stride(1),
            stride_w_v=weight.stride(0),
            stride_w_d=weight.stride(1),
            stride_part_g=part_m.stride(0),
            inv_temp=float(inv_temp),
        ),
        constexprs=dict(
            BLOCK_N=cfg.BLOCK_N,
            BLOCK_V=cfg.BLOCK_V,
            BLOCK_D=cfg.BLOCK_D,
            HAS_BIAS=bias is not None,
            EVEN_D=d % cfg.BLOCK_D == 0,
            **dot_flags(hidden.dtype, interpret),
        ),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    combine = Launch(
        kernel=_lse_combine_kernel,
        grid=(triton.cdiv(n, COMBINE_BLOCK),),
        args=dict(
            PartM=part_m,
            PartS=part_s,
            PartT=part_t,
            TgtX=tgt_x,
            Lse=lse,
            Logp=logp,
            Ent=ent,
            N=n,
            num_groups=groups,
            stride_part_g=part_m.stride(0),
        ),
        constexprs=dict(BLOCK=COMBINE_BLOCK),
        num_warps=4,
    )
    return [fwd, combine], (lse, logp, ent)


def fused_lse_logp_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: float,
    cfg: TileConfig,
    num_groups: int,
    interpret: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused forward; inputs already validated (``hidden [N, D]``, ``weight [V, D]``, unit inner
    strides, ``targets [N]`` int64). Returns fp32 ``(lse, logp, entropy)`` of shape ``[N]``."""
    plan, out = fused_lse_fwd_plan(hidden, weight, bias, targets, inv_temp, cfg, num_groups, interpret)
    run(plan)
    return out

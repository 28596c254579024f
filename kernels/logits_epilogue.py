"""Row kernels over a ``[C, V]`` block of logits: the Triton epilogue of the chunked engine and of
``grpo_loss_from_logits``.

With ``x = Z * inv_temp`` (fp32, ``Z`` fp32 / bf16 / fp16, unit column stride, any row stride):

* ``_logits_lse_fwd_kernel`` (one read of the block): ``lse = logsumexp x``, ``logp = x[y] - lse``,
  ``entropy = lse - sum softmax(x) x``. Each lane of a program keeps its own streaming statistics
  ``(m, s, t)`` (``_common.py``) over the row; they are merged once at the end, so the loop has no
  cross-lane reductions.
* ``_logits_grad_kernel`` (one more read, one write): ``Out = inv_temp * (c_logp (onehot - p) - c_ent p (z +
  entropy))`` with ``z = x - lse``, written in ``Out``'s dtype. ``Out`` may be ``Z`` itself (in place, the
  engine's own block) or a separate tensor (callers' logits are never modified unless they opt in).

One program per row, ``BLOCK_V`` columns per step: memory-bound, ``C·V·bytes`` read per pass.
Entries equal to ``-inf`` (masked vocabulary) get probability 0 and gradient 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import finalize_stats, lane_update
from ._launch import Launch, run
from .configs import RowConfig

__all__ = ["logits_lse_logp_entropy_triton", "logits_grad_triton", "logits_fwd_plan", "logits_grad_plan"]


@triton.jit
def _logits_lse_fwd_kernel(
    Z,  # [C, V] logits
    Y,  # [C] int64 targets; outside [0, V) = no target (logp = -lse)
    Lse,  # [C] fp32 out
    Logp,  # [C] fp32 out
    Ent,  # [C] fp32 out
    V,
    stride_z_n,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z_n
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    t = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask = offs < V - v0
        x = tl.load(z_row + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m, s, t = lane_update(m, s, t, x)
    # merge the lanes: reduce (m, s, t) across BLOCK_V with the same rescaling
    m_row = tl.max(m, 0)
    m_ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    a = tl.exp(m - m_ref)
    s_row = tl.sum(a * s, 0)
    t_row = tl.sum(a * (t + (tl.where(s > 0.0, m, m_ref) - m_ref) * s), 0)
    lse, ent = finalize_stats(m_ref, s_row, t_row)
    y = tl.load(Y + row)
    has_y = (y >= 0) & (y < V)
    x_y = tl.load(z_row + tl.where(has_y, y, 0)).to(tl.float32) * inv_temp
    x_y = tl.where(has_y, x_y, 0.0)
    tl.store(Lse + row, lse)
    tl.store(Logp + row, x_y - lse)
    tl.store(Ent + row, ent)


@triton.jit
def _logits_grad_kernel(
    Z,  # [C, V] logits (read)
    Y,  # [C] int64 targets; outside [0, V) = no one-hot term
    Lse,  # [C] fp32
    Ent,  # [C] fp32 (unused unless HAS_CENT)
    CLogp,  # [C] fp32 dL/dlogp
    CEnt,  # [C] fp32 dL/dentropy (unused unless HAS_CENT)
    Out,  # [C, V] out: dL/dZ in Out's dtype; may be Z (in place)
    V,
    stride_z_n,
    stride_out_n,
    inv_temp,
    BLOCK_V: tl.constexpr,
    HAS_CENT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z_n
    out_row = Out + row * stride_out_n
    lse = tl.load(Lse + row)
    c_logp = tl.load(CLogp + row)
    y = tl.load(Y + row)
    if HAS_CENT:
        # -p (c_logp + c_ent (z + ent)) = -p (c_ent z + k), k = c_logp + c_ent ent
        c_ent = tl.load(CEnt + row)
        k = c_logp + c_ent * tl.load(Ent + row)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp - lse
        p = tl.exp(z)
        if HAS_CENT:
            g = -p * (c_ent * tl.where(p > 0.0, z, 0.0) + k)
        else:
            g = -p * c_logp
        g = tl.where(cols == y, g + c_logp, g) * inv_temp
        tl.store(out_row + cols, g.to(Out.dtype.element_ty), mask=mask)


def _check_rows(z: torch.Tensor) -> None:
    if z.dim() != 2 or (z.shape[1] > 1 and z.stride(1) != 1):
        raise ValueError(
            f"logits must be a [C, V] tensor with unit column stride, got {tuple(z.shape)} strides {z.stride()}"
        )


def logits_fwd_plan(z: torch.Tensor, targets: torch.Tensor, inv_temp: float, cfg: RowConfig):
    _check_rows(z)
    c, v = z.shape
    dev = z.device
    lse = torch.empty(c, device=dev, dtype=torch.float32)
    logp = torch.empty(c, device=dev, dtype=torch.float32)
    ent = torch.empty(c, device=dev, dtype=torch.float32)
    launch = Launch(
        kernel=_logits_lse_fwd_kernel,
        grid=(c,),
        args=dict(
            Z=z, Y=targets, Lse=lse, Logp=logp, Ent=ent, V=v, stride_z_n=z.stride(0), inv_temp=float(inv_temp)
        ),
        constexprs=dict(BLOCK_V=cfg.BLOCK_V),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return [launch], (lse, logp, ent)


def logits_grad_plan(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    c_logp: torch.Tensor,
    c_ent: torch.Tensor | None,
    inv_temp: float,
    out: torch.Tensor,
    cfg: RowConfig,
):
    _check_rows(z)
    _check_rows(out)
    c, v = z.shape
    launch = Launch(
        kernel=_logits_grad_kernel,
        grid=(c,),
        args=dict(
            Z=z,
            Y=targets,
            Lse=lse,
            Ent=entropy if c_ent is not None else lse,
            CLogp=c_logp,
            CEnt=c_ent if c_ent is not None else c_logp,
            Out=out,
            V=v,
            stride_z_n=z.stride(0),
            stride_out_n=out.stride(0),
            inv_temp=float(inv_temp),
        ),
        constexprs=dict(BLOCK_V=cfg.BLOCK_V, HAS_CENT=c_ent is not None),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return [launch], out


def logits_lse_logp_entropy_triton(
    z: torch.Tensor, targets: torch.Tensor, inv_temp: float, cfg: RowConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(lse, logp, entropy)`` ``[C]`` of the logits block ``z [C, V]`` (validated inputs)."""
    plan, out = logits_fwd_plan(z, targets, inv_temp, cfg)
    run(plan)
    return out


def logits_grad_triton(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    c_logp: torch.Tensor,
    c_ent: torch.Tensor | None,
    inv_temp: float,
    out: torch.Tensor,
    cfg: RowConfig,
) -> torch.Tensor:
    """Write ``dL/dZ`` of the block ``z`` into ``out`` (which may be ``z``) and return ``out``."""
    plan, _ = logits_grad_plan(z, targets, lse, entropy, c_logp, c_ent, inv_temp, out, cfg)
    run(plan)
    return out

"""Shared ``@triton.jit`` helpers of the fastgrpo kernels.

* :func:`tile_logits` — one ``[BLOCK_N, BLOCK_V]`` tile of ``x = (H @ W.T + b) * inv_temp`` in fp32, the K loop
  over the hidden size on tensor cores (operands in the input dtype, fp32 accumulator).
* :func:`online_update` / :func:`merge_stats` — the streaming softmax statistics used by every forward:
  for a row ``x`` seen in pieces we keep ``m = max x``, ``s = sum exp(x - m)`` and ``t = sum exp(x - m) (x - m)``.
  Then ``lse = m + log s`` and ``entropy = lse - E_p[x] = log s - t / s``. Keeping ``t`` relative to the running
  max avoids the cancellation of ``lse - E_p[x]`` when ``|x| ~ 1e4`` (both ~1e4, difference ~1). Rescaling to a
  new max ``m'``: ``s' = a s``, ``t' = a (t + (m - m') s)`` with ``a = exp(m - m')``.
* :func:`grouped_pid` — the GEMM "grouped ordering" of a 1-D grid so programs running together share operand
  tiles in L2.

Positions holding ``-inf`` (masked vocabulary entries, padding columns) contribute nothing and never produce NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_logits(
    H,  # hidden [N, D]
    W,  # weight [V, D]
    B,  # bias [V] (read only when HAS_BIAS)
    offs_n,  # [BLOCK_N] int32 token indices, already clamped to [0, N)
    offs_v,  # [BLOCK_V] int32 vocabulary indices, already clamped to [0, V)
    D,
    stride_h_n,
    stride_h_d,
    stride_w_v,
    stride_w_d,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_D: tl.constexpr,  # D % BLOCK_D == 0: no mask in the K loop
    UPCAST_DOT: tl.constexpr,  # interpreter: its bf16/fp16 tl.dot is wrong, multiply in fp32
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands ("ieee" or "tf32")
):
    """``(H[offs_n] @ W[offs_v].T + b[offs_v]) * inv_temp`` as an fp32 ``[BLOCK_N, BLOCK_V]`` tile.

    Row and column indices are clamped by the caller (duplicated valid rows instead of masks), so the K loop
    loads without masks when ``EVEN_D``; the caller masks the padding rows/columns of the result.
    """
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = H + (offs_n.to(tl.int64)[:, None] * stride_h_n + offs_d[None, :] * stride_h_d)
    w_ptrs = W + (offs_v.to(tl.int64)[:, None] * stride_w_v + offs_d[None, :] * stride_w_d)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_D)):
        if EVEN_D:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            mask_d = offs_d < D - k * BLOCK_D
            h = tl.load(h_ptrs, mask=mask_d[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_d[None, :], other=0.0)
        if UPCAST_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D * stride_h_d
        w_ptrs += BLOCK_D * stride_w_d
    if HAS_BIAS:
        b = tl.load(B + offs_v).to(tl.float32)
        acc += b[None, :]
    return acc * inv_temp


@triton.jit
def online_update(m, s, t, x, AXIS: tl.constexpr):
    """Fold the values ``x`` (reduced along ``AXIS``; ``-inf`` = absent) into the statistics ``(m, s, t)``."""
    m_new = tl.maximum(m, tl.max(x, AXIS))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all absent so far: any finite reference works
    alpha = tl.exp(m - m_ref)
    shift = (tl.where(s > 0.0, m, m_ref) - m_ref) * s  # s == 0 <=> m == -inf: avoid -inf * 0
    if AXIS == 1:
        d = x - m_ref[:, None]
    else:
        d = x - m_ref
    e = tl.exp(d)
    ed = e * tl.where(e > 0.0, d, 0.0)  # exp(-inf) * -inf would be NaN
    s_new = alpha * s + tl.sum(e, AXIS)
    t_new = alpha * (t + shift) + tl.sum(ed, AXIS)
    return m_new, s_new, t_new


@triton.jit
def lane_update(m, s, t, x):
    """Per-lane version of ``online_update``: every lane of ``x`` is its own stream."""
    m_new = tl.maximum(m, x)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    d = x - m_ref
    e = tl.exp(d)
    shift = (tl.where(s > 0.0, m, m_ref) - m_ref) * s
    t_new = alpha * (t + shift) + e * tl.where(e > 0.0, d, 0.0)
    s_new = alpha * s + e
    return m_new, s_new, t_new


@triton.jit
def merge_stats(m, s, t, m2, s2, t2):
    """Merge two sets of statistics elementwise (``s == 0`` marks an empty set)."""
    m_new = tl.maximum(m, m2)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp(m - m_ref)
    a2 = tl.exp(m2 - m_ref)
    shift = (tl.where(s > 0.0, m, m_ref) - m_ref) * s
    shift2 = (tl.where(s2 > 0.0, m2, m_ref) - m_ref) * s2
    t_new = a * (t + shift) + a2 * (t2 + shift2)
    s_new = a * s + a2 * s2
    return m_new, s_new, t_new


@triton.jit
def finalize_stats(m, s, t):
    """``(lse, entropy)`` from the statistics: ``lse = m + log s``, ``entropy = log s - t / s``."""
    log_s = tl.log(s)
    return m + log_s, log_s - t / s


@triton.jit
def grouped_pid(pid, num_pid_n, num_pid_v, GROUP_N: tl.constexpr):
    """Map a 1-D program id to ``(pid_n, pid_v)``: ``GROUP_N`` row blocks sweep the vocabulary together."""
    num_pid_in_group = GROUP_N * num_pid_v
    group_id = pid // num_pid_in_group
    first_pid_n = group_id * GROUP_N
    group_size = tl.minimum(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + (pid % num_pid_in_group) % group_size
    pid_v = (pid % num_pid_in_group) // group_size
    return pid_n, pid_v

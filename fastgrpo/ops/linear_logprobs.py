"""Per-token log-probabilities and entropies of a linear head, without storing the ``[N, V]`` logits.

Math (``z = hidden @ weight.T + bias`` scaled by ``1 / temperature``; ``p = softmax(z)``)::

    logp[i]    = z[i, y_i] - logsumexp_v z[i, v]
    entropy[i] = logsumexp_v z[i, v] - sum_v p[i, v] z[i, v]

Gradient, for upstream ``g_logp[i]``, ``g_ent[i]`` (``E_p z = sum_v p z``)::

    dL/dz[i, v] = g_logp[i] (1[v = y_i] - p[i, v]) - g_ent[i] p[i, v] (z[i, v] - E_p z[i])
    d hidden = dL/dz @ weight / T,   d weight = dL/dz^T @ hidden / T,   d bias = sum_i dL/dz / T

Cost: forward one GEMM (2·N·D·V FLOPs), backward recomputes the logits block by block (2·N·D·V) plus the two
gradient GEMMs (4·N·D·V). Memory: one ``[chunk, V]`` block at a time (forward and backward); saved for backward
are only the inputs and two fp32 ``[N]`` vectors (``lse``, ``entropy``). The naive implementation keeps the fp32
``[N, V]`` logits and their softmax alive (two ``N·V`` buffers, 1 GiB at N=4096, V=32000).

Backends: ``torch`` / ``cpp`` / ``cuda`` / ``triton_chunked`` share the chunked engine (``_engine.py``) and differ
in the epilogue; ``triton`` is the fully fused kernel (logits never leave on-chip memory).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dispatch import resolve_backend
from ._engine import chunked_pass, default_chunk_size
from ._validate import check_chunk_size, check_float, check_head_outputs, check_targets, shape
from .epilogue import get_epilogue

__all__ = ["linear_logprobs", "linear_logprobs_ref"]


def linear_logprobs_ref(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The spec: materialised logits, ``log_softmax`` and ``gather``, in the dtype of the inputs' promotion
    (cast inputs to fp64 for ground truth). Returns ``(logp, entropy)`` with the leading shape of ``targets``."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def _run_forward(hidden, weight, bias, targets, inv_temp, chunk, backend):
    if backend == "triton":
        from fastgrpo.ops import _triton

        lse, logp, entropy = _triton.fused_lse_logp_entropy(hidden, weight, bias, targets, inv_temp)
    else:
        res = chunked_pass(hidden, weight, bias, targets, inv_temp, chunk, get_epilogue(backend))
        lse, logp, entropy = res.lse, res.logp, res.entropy
    check_head_outputs(lse, logp, entropy, {"hidden": hidden, "weight": weight, "bias": bias})
    return lse, logp, entropy


def _run_backward(
    hidden, weight, bias, targets, lse, entropy, c_logp, c_ent, inv_temp, chunk, backend, needs
):
    if backend == "triton":
        from fastgrpo.ops import _triton

        return _triton.fused_linear_grad(
            hidden, weight, bias, targets, lse, entropy, c_logp, c_ent, inv_temp, needs_input_grad=needs
        )
    res = chunked_pass(
        hidden,
        weight,
        bias,
        targets,
        inv_temp,
        chunk,
        get_epilogue(backend),
        coefs=(c_logp, c_ent),
        saved_stats=(lse, entropy),
        needs_grad=needs,
    )
    return res.d_hidden, res.d_weight, res.d_bias


class LinearLogprobsFunction(torch.autograd.Function):
    """``(hidden [N, D], weight [V, D], bias [V] | None, targets [N]) -> (logp [N], entropy [N])``, fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp: float, chunk: int, backend: str):
        lse, logp, entropy = _run_forward(hidden, weight, bias, targets, inv_temp, chunk, backend)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.cfg = (inv_temp, chunk, backend)
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_lse):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        inv_temp, chunk, backend = ctx.cfg
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        if not any(needs):
            return None, None, None, None, None, None, None
        c_logp = g_logp.float().contiguous() if g_logp is not None else torch.zeros_like(lse)
        c_ent = g_ent.float().contiguous() if g_ent is not None else None
        d_h, d_w, d_b = _run_backward(
            hidden, weight, bias, targets, lse, entropy, c_logp, c_ent, inv_temp, chunk, backend, needs
        )
        return d_h, d_w, d_b, None, None, None, None


def prepare_linear_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature):
    """Validate the head inputs shared by every linear op; returns ``hidden [N, D]``, ``targets [N]``."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, D] or [B, T, D], got {shape(hidden)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, D] with D = hidden.shape[-1]; got weight {shape(weight)}, hidden {shape(hidden)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {shape(targets)} must have the leading shape of hidden {shape(hidden)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {shape(bias)}")
    if hidden.numel() == 0:
        raise ValueError(f"hidden {shape(hidden)} is empty")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"hidden, weight and targets must be on one device; got {hidden.device}, {weight.device}, {targets.device}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")


def run_linear_logprobs(hidden2d, weight, bias, targets1d, temperature, chunk_size, backend):
    """Dispatch on already flattened and validated inputs; returns ``(logp, entropy)`` fp32 ``[N]``."""
    name = resolve_backend(backend, hidden2d.device, hidden2d.dtype)
    chunk = chunk_size or default_chunk_size(hidden2d.shape[0], weight.shape[0])
    logp, entropy, _ = LinearLogprobsFunction.apply(
        hidden2d.contiguous(),
        weight.contiguous(),
        bias,
        targets1d.long().contiguous(),
        1.0 / temperature,
        chunk,
        name,
    )
    return logp, entropy


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, D]`` or ``[B, T, D]`` last hidden states (fp32 / bf16 / fp16).
        weight: ``[V, D]`` output embedding (``lm_head.weight``), same dtype as ``hidden``.
        targets: ``[N]`` or ``[B, T]`` token ids, already shifted (``targets[i]`` is scored from ``hidden[i]``).
        bias: optional ``[V]``.
        temperature: divides the logits (as TRL and verl sample).
        return_entropy: also return the per-token entropy of the distribution.
        chunk_size: tokens per logits block, a positive int (default: a block of ~64 MiB fp32).
        backend: ``auto``, ``torch``, ``cpp``, ``cuda``, ``triton`` or ``triton_chunked``.

    Returns:
        fp32 ``logp`` with the leading shape of ``targets`` (and fp32 ``entropy``). Differentiable in
        ``hidden``, ``weight`` and ``bias``.

    Raises ``ValueError`` naming the argument for bad shapes or values, including NaN / inf in ``hidden``,
    ``weight`` or ``bias`` (found from the O(N) log-partition and entropy; ``-inf`` in ``bias`` bans a token).
    """
    prepare_linear_inputs(hidden, weight, targets, bias, temperature)
    check_chunk_size(chunk_size)
    check_targets(targets, weight.shape[0])
    lead = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    logp, entropy = run_linear_logprobs(
        h2, weight, bias, targets.reshape(-1), temperature, chunk_size, backend
    )
    logp, entropy = logp.view(lead), entropy.view(lead)
    return (logp, entropy) if return_entropy else logp

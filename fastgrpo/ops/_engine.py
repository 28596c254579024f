"""The chunked engine: one pass over token chunks of ``hidden @ weight.T``, never more than one block of logits.

For a chunk of ``C`` tokens the engine computes ``Z = H_c @ W.T (+ b)`` with the library GEMM (cuBLAS, MKL or
oneDNN), hands the ``[C, V]`` block to an epilogue (``fastgrpo.ops.epilogue``) for ``lse, logp, entropy``, and —
when per-token loss coefficients are available — lets the epilogue overwrite the block with ``dL/dZ`` and
immediately spends it on the two gradient GEMMs::

    d_hidden[c] = dZ @ W                 (written once per token)
    d_weight   += dZ^T @ H_c             (accumulated over chunks in fp32)
    d_bias     += sum_rows dZ            (fp32)

Two ways to obtain the coefficients ``c_logp = dL/dlogp_i`` and ``c_ent = dL/dentropy_i``:

* **one pass** (``coef_fn``): the loss is a sum of token-local terms, so ``coef_fn(start, end, logp, entropy)``
  returns the coefficients of the chunk right after its epilogue forward. Forward and gradient then cost three
  GEMMs (``6·N·D·V`` FLOPs) and the logits are read twice while still hot. Used by the fused GRPO loss for
  token-level importance ratios.
* **recompute** (``coefs`` + ``saved_stats``): the coefficients come from an autograd backward (sequence-level
  ratios, or any function of the log-probs); the engine recomputes each block (``8·N·D·V`` in all).

Memory beyond inputs and gradients: one ``[C, V]`` block plus the epilogue's temporaries (one block), an fp32
``d_weight`` accumulator when the inputs are half precision, and O(N) vectors.

Half precision on a CPU without native half GEMMs (no AVX512-BF16 / AMX for bf16, no AVX512-FP16 / AMX-FP16 for
fp16: ``gemm_dtype``) runs the chunk GEMMs in fp32: torch's fallback bf16 GEMMs there are 5-150x slower than
fp32 (2-core AVX2 EPYC, [256, 1024] x [1024, 32000]: 1.75 s forward and 65 s for ``dZ @ W`` against 0.37 s and
0.40 s in fp32). The weight (and bias) are upcast once per call (``V·D·4`` more bytes), each hidden chunk on the
fly; the logits block is then fp32, and ``d_hidden`` / ``d_weight`` are returned in the input dtype as always.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .epilogue import Epilogue

CoefFn = Callable[[int, int, Tensor, Tensor], tuple[Tensor, Tensor | None]]

# Target bytes of one fp32 logits block: large enough for efficient GEMMs (C >= 128 rows at V = 150k),
# small enough to stay far below the materialised [N, V] logits. Measured on CPU: bench/README.md.
DEFAULT_BLOCK_BYTES = 64 * 2**20
MIN_CHUNK, MAX_CHUNK = 16, 4096


def default_chunk_size(n: int, vocab: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per chunk so that one fp32 ``[C, V]`` block takes about ``block_bytes``; a power of two."""
    rows = max(MIN_CHUNK, min(MAX_CHUNK, block_bytes // (4 * max(vocab, 1))))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n))


@functools.cache
def cpu_native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` GEMMs natively (oneDNN with AVX512-BF16/AMX, or AVX512-FP16/AMX-FP16)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def gemm_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine's GEMMs run in for inputs of ``dtype`` on ``device``: fp32 for half precision on a
    CPU without native half GEMMs, else ``dtype`` (see the module docstring)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_native_half_gemm(dtype):
        return torch.float32
    return dtype


@dataclass
class EngineResult:
    lse: Tensor  # [N] fp32
    logp: Tensor  # [N] fp32
    entropy: Tensor  # [N] fp32
    d_hidden: Tensor | None = None  # [N, D] hidden.dtype
    d_weight: Tensor | None = None  # [V, D] weight.dtype
    d_bias: Tensor | None = None  # [V] bias.dtype


def chunked_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    inv_temp: float,
    chunk_size: int,
    epilogue: Epilogue,
    *,
    coef_fn: CoefFn | None = None,
    coefs: tuple[Tensor, Tensor | None] | None = None,
    saved_stats: tuple[Tensor, Tensor] | None = None,
    needs_grad: tuple[bool, bool, bool] = (False, False, False),
) -> EngineResult:
    """Run the chunked pass; see the module docstring. ``hidden [N, D]``, ``weight [V, D]``, ``targets [N]``.

    ``coef_fn`` (one pass) or ``coefs`` + ``saved_stats = (lse, entropy)`` (recompute) enable the gradient;
    ``needs_grad`` says which of ``(hidden, weight, bias)`` gradients to produce.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    want_grad = (coef_fn is not None or coefs is not None) and any(needs_grad)
    recompute = coefs is not None

    if recompute:
        assert saved_stats is not None
        lse, entropy = saved_stats
        logp = None
    else:
        lse = torch.empty(n, device=dev, dtype=torch.float32)
        logp = torch.empty(n, device=dev, dtype=torch.float32)
        entropy = torch.empty(n, device=dev, dtype=torch.float32)

    d_hidden = torch.empty_like(hidden) if want_grad and needs_grad[0] else None
    d_weight32 = torch.zeros(v, d, device=dev, dtype=torch.float32) if want_grad and needs_grad[1] else None
    d_bias32 = torch.zeros(v, device=dev, dtype=torch.float32) if want_grad and needs_grad[2] else None
    cdt = gemm_dtype(dev, hidden.dtype)
    w = weight.to(cdt)  # no copy unless upcasting
    b = None if bias is None else bias.to(cdt)
    w_t = w.t()

    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h_c = hidden[start:end].to(cdt)
        y_c = targets[start:end]
        z = torch.addmm(b, h_c, w_t) if b is not None else torch.mm(h_c, w_t)

        if recompute:
            c_logp, c_ent = coefs[0][start:end], (None if coefs[1] is None else coefs[1][start:end])
            lse_c, ent_c = lse[start:end], entropy[start:end]
        else:
            lse_c, logp_c, ent_c = epilogue.lse_logp_entropy(z, y_c, inv_temp)
            lse[start:end], logp[start:end], entropy[start:end] = lse_c, logp_c, ent_c
            if not want_grad:
                continue
            c_logp, c_ent = coef_fn(start, end, logp_c, ent_c)

        if not want_grad:
            continue
        dz = epilogue.logits_grad_(z, y_c, lse_c, ent_c, c_logp, c_ent, inv_temp)
        if d_hidden is not None:
            if dz.dtype == d_hidden.dtype:
                torch.mm(dz, w, out=d_hidden[start:end])
            else:  # upcast GEMMs: fp32 product, rounded once into the input dtype
                d_hidden[start:end] = torch.mm(dz, w)
        if d_weight32 is not None:
            if dz.dtype == torch.float32:
                d_weight32.addmm_(dz.t(), h_c)
            else:  # half-precision GEMM, accumulated across chunks in fp32
                d_weight32.add_(torch.mm(dz.t(), h_c))
        if d_bias32 is not None:
            d_bias32.add_(dz.sum(0, dtype=torch.float32))

    return EngineResult(
        lse=lse,
        logp=logp,
        entropy=entropy,
        d_hidden=d_hidden,
        d_weight=None if d_weight32 is None else d_weight32.to(weight.dtype),
        d_bias=None if d_bias32 is None else d_bias32.to(bias.dtype),
    )

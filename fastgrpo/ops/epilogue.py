"""Epilogues: the per-row work on one ``[C, V]`` block of logits, the piece every chunked backend shares.

The chunked engine (``fastgrpo.ops._engine``) computes ``Z = H_c @ W.T (+ b)`` for a chunk of ``C`` tokens
with a library GEMM, then hands the raw block to an epilogue. With ``x = Z * inv_temp`` (fp32):

Forward (one read of the block)::

    lse_i     = logsumexp_v x[i, v]
    logp_i    = x[i, y_i] - lse_i
    entropy_i = lse_i - sum_v p[i, v] x[i, v],      p = softmax(x)

Gradient (one more read, one write, in place into the block — the block belongs to the engine)::

    dL/dZ[i, v] = inv_temp * ( c_logp[i] * (1[v == y_i] - p[i, v])  +  c_ent[i] * (-p[i, v] (x[i, v] - Ex_i)) )
    Ex_i        = lse_i - entropy_i = sum_v p[i, v] x[i, v]

``c_logp = dL/dlogp`` and ``c_ent = dL/dentropy`` are per-token coefficients computed by the caller from the
forward outputs (the loss is a function of per-token log-prob and entropy only), so every loss of the GRPO
family reuses the same two epilogue calls. The derivative of the entropy follows from
``dH/dx_v = -p_v (x_v - E_p[x])``.

Backends implement the same two functions (``torch`` here; ``cpp``/``cuda`` in ``fastgrpo._C``; Triton in
``fastgrpo.kernels``) and are registered in :data:`EPILOGUES` under their backend name.

Contract (all backends):
- ``Z``: ``[C, V]`` contiguous, fp32 / bf16 / fp16; ``targets``: ``[C]`` int64 in ``[0, V)`` (the engine
  replaces ignored targets by 0 and gives them zero coefficients).
- Outputs and coefficients are fp32 ``[C]``; ``logits_grad_`` writes the gradient in ``Z``'s dtype and
  returns ``Z``.
- Stable for ``|x|`` up to ~1e4 (max-subtracted exponentials, fp32 accumulation).
- ``-inf`` logits (banned tokens, e.g. a ``-inf`` bias) have probability 0: they add 0 to the entropy and get
  gradient 0, never ``0 * inf = NaN``. A NaN logit makes its row's ``lse`` NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Epilogue", "EPILOGUES", "get_epilogue", "torch_lse_logp_entropy", "torch_logits_grad_"]

# Floor of ``x - E_p x`` in the gradient: times any coefficient below ~1e8 it stays finite in fp32.
_FLOOR = -1e30


def torch_lse_logp_entropy(z: Tensor, targets: Tensor, inv_temp: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reference epilogue forward in plain torch.

    ``entropy = -sum_v p_v (x_v - lse)``: every term has one sign, so there is no cancellation between two
    numbers near ``|x| ~ 1e4`` (``lse - E_p[x]`` loses ~1e-3 there in fp32). ``nansum``: the ``0 * -inf``
    terms of banned tokens count 0 (as fast as ``sum``; a NaN input still shows in ``lse``)."""
    x = z if z.dtype == torch.float32 else z.float()
    if inv_temp != 1.0:
        x = x * inv_temp
    lse = torch.logsumexp(x, dim=-1)
    ls = x - lse[:, None]
    logp = ls.gather(1, targets[:, None]).squeeze(1)
    p = torch.exp(ls)
    entropy = -(p * ls if ls.requires_grad else p.mul_(ls)).nansum(-1)  # in place unless differentiated
    return lse, logp, entropy


def torch_logits_grad_(
    z: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    c_logp: Tensor,
    c_ent: Tensor | None,
    inv_temp: float,
) -> Tensor:
    """Reference epilogue gradient in plain torch; overwrites ``z`` with ``dL/dz`` and returns it.

    ``g = -p (c_logp + c_ent (x - E_p x)) + c_logp 1[v = y]``, built in place in the (engine-owned) block with
    one temporary (``p``). ``x - E_p x`` is floored at ``_FLOOR`` so that a banned token (``x = -inf``, ``p = 0``)
    gets ``0 * finite = 0``, not NaN; no finite logit comes near it."""
    x = z if z.dtype == torch.float32 else z.float()
    if inv_temp != 1.0:
        x = x.mul_(inv_temp)  # x is the engine-owned block or our own fp32 copy
    p = torch.softmax(x, dim=-1)
    if c_ent is not None:
        ex = lse - entropy
        x.sub_(ex[:, None]).clamp_(min=_FLOOR).mul_(c_ent[:, None]).add_(c_logp[:, None])
        g = torch.mul(p, x, out=x).neg_()
    else:
        g = p.mul_(-c_logp[:, None])
    g.scatter_add_(1, targets[:, None], c_logp[:, None])
    if inv_temp != 1.0:
        g.mul_(inv_temp)
    if g is not z:
        z.copy_(g)
    return z


@dataclass(frozen=True)
class Epilogue:
    """A backend's pair of epilogue functions (see the module docstring for the contract)."""

    name: str
    lse_logp_entropy: Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]]
    logits_grad_: Callable[..., Tensor]


EPILOGUES: dict[str, Epilogue] = {
    "torch": Epilogue("torch", torch_lse_logp_entropy, torch_logits_grad_),
}


def get_epilogue(name: str) -> Epilogue:
    """The epilogue of backend ``name``; optional backends are imported on first use.

    ``cpp`` / ``cuda`` live in ``fastgrpo.ops._cpp`` (``EPILOGUE``, wrapping ``torch.ops.fastgrpo``), the Triton
    one in ``fastgrpo.ops._triton`` (``get_chunked_epilogue``). Each raises ``BackendUnavailable`` when it cannot run.
    """
    if name not in EPILOGUES:
        if name in ("cpp", "cuda"):
            from fastgrpo._backends import load_ext

            load_ext()  # raises BackendUnavailable with the reason when the extension is not built
            from fastgrpo.ops import _cpp

            EPILOGUES[name] = _cpp.get_epilogue(name)
        elif name == "triton_chunked":
            from fastgrpo.ops import _triton

            EPILOGUES[name] = _triton.get_chunked_epilogue()
        else:
            raise ValueError(f"unknown epilogue backend {name!r}")
    return EPILOGUES[name]

"""Triton kernels of fastgrpo, importable as ``fastgrpo.kernels`` (package-dir mapping in pyproject.toml).

One kernel family and its launcher per module; no autograd here (``fastgrpo.ops._triton`` wraps these into
``torch.library`` ops and the autograd Functions live in ``fastgrpo.ops``):

* ``fused_linear_logprobs_fwd`` — ``hidden, weight -> lse, logp, entropy`` with the logits kept on chip.
* ``fused_linear_logprobs_bwd`` — ``d_hidden, d_weight, d_bias`` for per-token coefficients of logp / entropy.
* ``logits_epilogue`` — the same forward and gradient over a ``[C, V]`` block of logits already in memory.
* ``configs`` — the launch configurations (fixed tables by architecture, dtype and bucketed sizes).
* ``aot`` — ahead-of-time compilation for a GPU that is not present, with resource usage from ``cuobjdump``.

Importing this package imports triton; under ``TRITON_INTERPRET=1`` (set before the import) the kernels run on
CPU tensors in Triton's interpreter.
"""

from . import configs, fused_linear_logprobs_bwd, fused_linear_logprobs_fwd, logits_epilogue
from .configs import RowConfig, TileConfig
from .fused_linear_logprobs_bwd import fused_linear_grad_triton
from .fused_linear_logprobs_fwd import fused_lse_logp_entropy_triton
from .logits_epilogue import logits_grad_triton, logits_lse_logp_entropy_triton

__all__ = [
    "configs",
    "fused_linear_logprobs_fwd",
    "fused_linear_logprobs_bwd",
    "logits_epilogue",
    "TileConfig",
    "RowConfig",
    "fused_lse_logp_entropy_triton",
    "fused_linear_grad_triton",
    "logits_lse_logp_entropy_triton",
    "logits_grad_triton",
]

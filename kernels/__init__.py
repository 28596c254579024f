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

Imported as a top-level ``kernels`` (the repository root on ``sys.path``: ``python -m`` from the checkout,
pytest's ``pythonpath``), this folder would shadow the PyPI package ``kernels`` (Hugging Face's kernel hub
client, which transformers and bitsandbytes import). It then hands over: it loads that package from the rest of
``sys.path`` in its place; without one, it becomes an empty namespace package, what Python makes of a folder
without ``__init__.py``, which transformers' and bitsandbytes' availability checks treat as absent
(``ModuleNotFoundError`` would not do: transformers imports any ``kernels`` that ``find_spec`` finds, unguarded).
"""

if __name__ != "fastgrpo.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    def _hand_over() -> None:
        root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, path)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
        else:
            module = types.ModuleType(__name__)
            module.__spec__ = importlib.machinery.ModuleSpec(__name__, None, is_package=True)
            module.__path__, module.__file__ = [], None
        sys.modules[__name__] = module  # the import statement returns what sys.modules holds after this
        if module.__spec__.loader is not None:
            module.__spec__.loader.exec_module(module)

    _hand_over()
else:
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

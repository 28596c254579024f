"""The Triton backends of the linear log-prob / GRPO ops: the only op-layer module that imports ``fastgrpo.kernels``.

Two backends share this module:

* ``triton`` — fully fused: :func:`fused_lse_logp_entropy` (forward, ``2·N·D·V`` FLOPs, writes O(N)) and
  :func:`fused_linear_grad` (recompute + both gradient products, ``6·N·D·V`` FLOPs, fp32 accumulation). The
  ``[N, V]`` logits never reach global memory.
* ``triton_chunked`` — the chunked engine's library GEMM with Triton epilogues over each ``[C, V]`` block
  (:func:`get_chunked_epilogue`); :func:`logits_lse_logp_entropy` / :func:`logits_grad` also serve callers
  that already hold logits (``grpo_loss_from_logits``), writing the gradient into a separate tensor unless
  asked to work in place.

Every entry point is a ``torch.library`` custom op (namespace ``fastgrpo_triton``) with a fake implementation,
so ``torch.compile`` traces through them as opaque nodes. Launch configurations come from fixed tables in
``fastgrpo.kernels.configs`` keyed on the architecture, dtype and bucketed sizes; token counts, temperature
and coefficients are runtime arguments, so a new completion length never recompiles a kernel.

Triton is imported only through :func:`fastgrpo._backends.load_triton`, and only when a kernel first runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from fastgrpo import _backends
from fastgrpo._backends import BackendUnavailable

from ._validate import shape
from .epilogue import Epilogue

__all__ = [
    "check_available",
    "get_chunked_epilogue",
    "fused_lse_logp_entropy",
    "fused_linear_grad",
    "logits_lse_logp_entropy",
    "logits_grad",
    "logits_grad_",
    "override_configs",
]

_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# Availability and kernel loading


def check_available(device: torch.device | str) -> None:
    """Raise :class:`BackendUnavailable` unless the Triton kernels can run on ``device``.

    They run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for tests:
    slow). ``backend="auto"`` never picks them on CPU.
    """
    dev = torch.device(device)
    _backends.load_triton()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                "the Triton backends need a working CUDA device; torch.cuda.is_available() is False"
            )
        return
    if dev.type == "cpu":
        if not _backends.triton_interpret():
            raise BackendUnavailable(
                "the Triton backends run on CUDA tensors; got CPU tensors. Use backend='torch' or 'cpp' on CPU, "
                "or set TRITON_INTERPRET=1 (before triton is imported) to run the kernels in Triton's CPU "
                "interpreter (for testing; slow)"
            )
        return
    raise BackendUnavailable(
        f"the Triton backends run on CUDA tensors (or CPU under TRITON_INTERPRET=1); got {dev.type}"
    )


def _import_kernels() -> ModuleType:
    try:
        return importlib.import_module("fastgrpo.kernels")
    except ModuleNotFoundError as e:
        if e.name not in ("fastgrpo.kernels",):
            raise
    # A source checkout used without installing (``PYTHONPATH=.``): ``kernels/`` sits next to ``fastgrpo/``
    # and the package-dir mapping of pyproject.toml is not in effect. Load it under its package name.
    root = Path(__file__).resolve().parents[2] / "kernels"
    if not (root / "__init__.py").is_file():
        raise BackendUnavailable(
            "fastgrpo.kernels is not importable: reinstall fastgrpo (`pip install -e .`) so the kernels/ "
            "package is mapped to fastgrpo.kernels"
        )
    spec = importlib.util.spec_from_file_location(
        "fastgrpo.kernels", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastgrpo.kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop("fastgrpo.kernels", None)
        raise
    return mod


@functools.cache
def _kernels() -> ModuleType:
    """``fastgrpo.kernels``, imported on first use (this imports triton)."""
    triton = _backends.load_triton()
    # Triton decides between compiled and interpreted functions when a @triton.jit decorator runs: its own
    # standard library (tl.sum, tl.max, ...) at `import triton`, ours at the first import of the kernels.
    # Both must agree with TRITON_INTERPRET now, or kernels fail obscurely at launch.
    importlib.import_module("triton.language.standard")
    std_interpreted = type(triton.language.standard.sum).__name__ == "InterpretedFunction"
    if std_interpreted != _backends.triton_interpret():
        raise BackendUnavailable(
            "TRITON_INTERPRET must be set before triton is first imported (it was "
            f"{'set' if std_interpreted else 'unset'} then, {'set' if not std_interpreted else 'unset'} now): "
            "export TRITON_INTERPRET=1 in the environment to run the Triton kernels on CPU"
        )
    mod = _import_kernels()
    interpreted = type(mod.fused_linear_logprobs_fwd._fused_lse_fwd_kernel).__name__ == "InterpretedFunction"
    if interpreted != _backends.triton_interpret():
        raise BackendUnavailable(
            "TRITON_INTERPRET changed after fastgrpo.kernels was imported; set it before the first Triton call"
        )
    return mod


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations (fixed tables; tests may pin them)

_OVERRIDES: dict[str, object] = {}


@contextlib.contextmanager
def override_configs(*, fwd=None, bwd=None, epilogue=None, num_groups=None, dw_slab_bytes=None):
    """Pin the launch configurations (``TileConfig`` / ``RowConfig`` from ``fastgrpo.kernels.configs``), the
    number of vocabulary slices of the fused forward and the fp32 ``d_weight`` slab size, e.g. to test blocks
    of 64 on small shapes. Not thread-safe; for tests and benchmarks."""
    saved = dict(_OVERRIDES)
    new = dict(fwd=fwd, bwd=bwd, epilogue=epilogue, num_groups=num_groups, dw_slab_bytes=dw_slab_bytes)
    _OVERRIDES.update({k: v for k, v in new.items() if v is not None})
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _arch(dev: torch.device) -> int | None:
    if _backends.triton_interpret():
        return None
    return _kernels().configs.device_arch(dev)


@functools.cache
def _num_sms(dev: torch.device) -> int:
    if dev.type != "cuda" or _backends.triton_interpret():
        return 1
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _device_ctx(dev: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' device.
    if dev.type == "cuda" and not _backends.triton_interpret():
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Validation (errors name the argument and the shapes)


def _check_device(device: torch.device) -> None:
    # Under torch.compile the check ran when the op was first traced (it imports modules, which dynamo refuses
    # to trace); the custom ops themselves are opaque nodes of the graph.
    if not torch.compiler.is_compiling():
        check_available(device)


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or hidden.shape[1] == 0:
        raise ValueError(
            f"expected hidden [N, D] and weight [V, D] with D > 0, got hidden {shape(hidden)}, weight {shape(weight)}"
        )
    if hidden.dtype not in _HALF_OR_FLOAT or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must share one dtype among fp32/bf16/fp16, got {hidden.dtype} and {weight.dtype}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {shape(bias)}")
    if targets.shape != hidden.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"targets must be an integer tensor [N] = [{hidden.shape[0]}], got {shape(targets)} {targets.dtype}"
        )
    devs = {t.device for t in (hidden, weight, bias, targets) if t is not None}
    if len(devs) != 1:
        raise ValueError(
            f"hidden, weight, bias and targets must be on one device, got {sorted(map(str, devs))}"
        )


def _check_vec(name: str, t: Tensor | None, n: int, dev: torch.device) -> Tensor | None:
    if t is None:
        return None
    if t.shape != (n,):
        raise ValueError(f"{name} must be [N] = [{n}], got {shape(t)}")
    if t.device != dev:
        raise ValueError(f"{name} is on {t.device}, the inputs on {dev}")
    return t.to(torch.float32).contiguous()


def _rows(t: Tensor) -> Tensor:
    """Unit inner stride (any row stride) as the kernels need; copies only when it must."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _none_if_empty(t: Tensor, needed: bool) -> Tensor | None:
    return t if needed else None


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("fastgrpo_triton::fused_lse_fwd", mutates_args=())
def _fused_lse_fwd_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temp: float
) -> tuple[Tensor, Tensor, Tensor]:
    k = _kernels()
    dev = hidden.device
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = _OVERRIDES.get("fwd") or k.configs.fused_fwd_config(n, d, v, hidden.dtype, _arch(dev))
    groups = _OVERRIDES.get("num_groups") or k.configs.num_vocab_groups(n, v, cfg, _num_sms(dev))
    with _device_ctx(dev):
        return k.fused_lse_logp_entropy_triton(
            hidden, weight, bias, targets, inv_temp, cfg, groups, interpret=_backends.triton_interpret()
        )


@_fused_lse_fwd_op.register_fake
def _(hidden, weight, bias, targets, inv_temp):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastgrpo_triton::fused_linear_grad", mutates_args=())
def _fused_linear_grad_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    c_logp: Tensor,
    c_ent: Tensor | None,
    inv_temp: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    k = _kernels()
    dev = hidden.device
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = _OVERRIDES.get("bwd") or k.configs.fused_bwd_config(n, d, v, hidden.dtype, _arch(dev))
    slab = _OVERRIDES.get("dw_slab_bytes") or k.fused_linear_logprobs_bwd.DEFAULT_DW_SLAB_BYTES
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    with _device_ctx(dev):
        d_h, d_w, d_b = k.fused_linear_grad_triton(
            hidden, weight, bias, targets, lse, entropy, c_logp, c_ent, inv_temp, needs, cfg,
            interpret=_backends.triton_interpret(), dw_slab_bytes=slab,
        )  # fmt: skip
    empty = hidden.new_empty(0)
    return (
        d_h if d_h is not None else empty,
        d_w if d_w is not None else empty.clone(),
        d_b if d_b is not None else empty.clone(),
    )


@_fused_linear_grad_op.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    c_logp,
    c_ent,
    inv_temp,
    need_hidden,
    need_weight,
    need_bias,
):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0),
    )


@torch.library.custom_op("fastgrpo_triton::logits_lse_fwd", mutates_args=())
def _logits_lse_fwd_op(logits: Tensor, targets: Tensor, inv_temp: float) -> tuple[Tensor, Tensor, Tensor]:
    k = _kernels()
    dev = logits.device
    cfg = _OVERRIDES.get("epilogue") or k.configs.epilogue_config(logits.shape[1], logits.dtype, _arch(dev))
    with _device_ctx(dev):
        return k.logits_lse_logp_entropy_triton(logits, targets, inv_temp, cfg)


@_logits_lse_fwd_op.register_fake
def _(logits, targets, inv_temp):
    c = logits.shape[0]
    return tuple(logits.new_empty(c, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastgrpo_triton::logits_grad_out", mutates_args=("out",))
def _logits_grad_out_op(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    c_logp: Tensor,
    c_ent: Tensor | None,
    inv_temp: float,
    out: Tensor,
) -> None:
    k = _kernels()
    dev = logits.device
    cfg = _OVERRIDES.get("epilogue") or k.configs.epilogue_config(logits.shape[1], logits.dtype, _arch(dev))
    with _device_ctx(dev):
        k.logits_grad_triton(logits, targets, lse, entropy, c_logp, c_ent, inv_temp, out, cfg)


@_logits_grad_out_op.register_fake
def _(logits, targets, lse, entropy, c_logp, c_ent, inv_temp, out):
    return None


# ----------------------------------------------------------------------------------------------------------------
# Public functions (validate, then call the ops)


def fused_lse_logp_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temp: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused forward: fp32 ``(lse, logp, entropy)`` ``[N]`` of ``x = (hidden @ weight.T + bias) * inv_temp``.

    ``hidden [N, D]``, ``weight [V, D]`` (same dtype, fp32/bf16/fp16), ``bias [V]`` or None, ``targets [N]``
    integer in ``[0, V)`` (an id outside it yields ``logp = -lse``). No ``[N, V]`` tensor is allocated.
    """
    _check_head(hidden, weight, bias, targets)
    _check_device(hidden.device)
    return _fused_lse_fwd_op(
        _rows(hidden),
        _rows(weight),
        None if bias is None else bias.contiguous(),
        targets.long().contiguous(),
        float(inv_temp),
    )


def fused_linear_grad(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    c_logp: Tensor,
    c_ent: Tensor | None,
    inv_temp: float,
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Fused gradient: ``(d_hidden, d_weight, d_bias)`` for ``dL/dlogp = c_logp`` and ``dL/dentropy = c_ent``.

    ``lse``, ``entropy``: the forward's fp32 ``[N]``; ``c_logp``, ``c_ent`` (None = no entropy term): ``[N]``.
    Gradients are accumulated in fp32 and returned in the dtype of ``hidden`` / ``weight`` / ``bias``; ``None``
    where ``needs_input_grad`` is False (and ``d_bias`` when ``bias`` is None).
    Accumulation uses fp32 atomics: results vary at fp32 rounding level between runs.
    """
    _check_head(hidden, weight, bias, targets)
    _check_device(hidden.device)
    n, dev = hidden.shape[0], hidden.device
    lse = _check_vec("lse", lse, n, dev)
    entropy = _check_vec("entropy", entropy, n, dev)
    c_logp = _check_vec("c_logp", c_logp, n, dev)
    c_ent = _check_vec("c_ent", c_ent, n, dev)
    need_h, need_w, need_b = (bool(x) for x in needs_input_grad)
    need_b = need_b and bias is not None
    if not (need_h or need_w or need_b):
        return None, None, None
    d_h, d_w, d_b = _fused_linear_grad_op(
        _rows(hidden), _rows(weight), None if bias is None else bias.contiguous(), targets.long().contiguous(),
        lse, entropy, c_logp, c_ent, float(inv_temp), need_h, need_w, need_b,
    )  # fmt: skip
    return _none_if_empty(d_h, need_h), _none_if_empty(d_w, need_w), _none_if_empty(d_b, need_b)


def _check_logits(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [C, V] with V > 0, got {shape(logits)}")
    if logits.dtype not in _HALF_OR_FLOAT:
        raise ValueError(f"logits must be fp32/bf16/fp16, got {logits.dtype}")
    if targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"targets must be an integer tensor [C] = [{logits.shape[0]}], got {shape(targets)} {targets.dtype}"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device}, logits on {logits.device}")


def logits_lse_logp_entropy(
    logits: Tensor, targets: Tensor, inv_temp: float
) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 ``(lse, logp, entropy)`` ``[C]`` of ``x = logits * inv_temp`` (``logits [C, V]``); reads once."""
    _check_logits(logits, targets)
    _check_device(logits.device)
    return _logits_lse_fwd_op(_rows(logits), targets.long().contiguous(), float(inv_temp))


def logits_grad(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    c_logp: Tensor,
    c_ent: Tensor | None,
    inv_temp: float,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """``dL/dlogits`` (``[C, V]``) for the coefficients ``c_logp`` / ``c_ent``, written into ``out`` (a new
    tensor of ``logits``' dtype when None; ``out`` may be ``logits`` itself to work in place). Returns ``out``."""
    _check_logits(logits, targets)
    _check_device(logits.device)
    c, dev = logits.shape[0], logits.device
    lse = _check_vec("lse", lse, c, dev)
    entropy = _check_vec("entropy", entropy, c, dev)
    c_logp = _check_vec("c_logp", c_logp, c, dev)
    c_ent = _check_vec("c_ent", c_ent, c, dev)
    if out is None:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    elif out.shape != logits.shape or out.device != dev or out.dtype not in _HALF_OR_FLOAT:
        raise ValueError(
            f"out must be a float tensor of logits' shape {shape(logits)} on {dev}, got {shape(out)} {out.dtype}"
        )
    elif out.stride(-1) != 1 and out.shape[-1] != 1:
        raise ValueError(f"out must have a unit column stride, got strides {out.stride()}")
    _logits_grad_out_op(
        _rows(logits), targets.long().contiguous(), lse, entropy, c_logp, c_ent, float(inv_temp), out
    )
    return out


def logits_grad_(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    c_logp: Tensor,
    c_ent: Tensor | None,
    inv_temp: float,
) -> Tensor:
    """In-place :func:`logits_grad`: overwrites ``logits`` with ``dL/dlogits`` (the epilogue contract)."""
    if logits.dim() == 2 and logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"in-place logits_grad_ needs a unit column stride, got strides {logits.stride()}")
    return logits_grad(logits, targets, lse, entropy, c_logp, c_ent, inv_temp, out=logits)


def get_chunked_epilogue() -> Epilogue:
    """The ``triton_chunked`` epilogue (contract in :mod:`fastgrpo.ops.epilogue`); raises
    :class:`BackendUnavailable` when triton is missing."""
    _backends.load_triton()
    return Epilogue(
        name="triton_chunked", lse_logp_entropy=logits_lse_logp_entropy, logits_grad_=logits_grad_
    )

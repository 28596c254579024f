"""Backend choice for every op with more than one implementation (the log-prob / loss ops and the advantages).

``backend="auto"`` picks, in a fixed order per op and device (fastest first), the first backend that runs on the
inputs' device and supports their dtype: on CUDA the fused Triton kernels when triton is importable, else the
CUDA extension, else torch; on CPU the C++ extension when it is built, else torch (torch for the advantages: a
few microseconds, the extension saves launches only on CUDA). ``FASTGRPO_BACKEND`` overrides ``auto`` only, for
the ops that have that backend (the advantages have no Triton one). An explicit backend that cannot run raises
``BackendUnavailable`` with the reason — never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrpo import _backends

from ._validate import check_choice

BACKENDS = ("torch", "cpp", "cuda", "triton", "triton_chunked")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class OpBackends:
    """The backends of one op: ``auto``'s order per device type and the input dtypes each supports."""

    names: tuple[str, ...]
    order: dict[str, tuple[str, ...]]  # device type -> auto's preference, fastest first
    dtypes: dict[str, tuple[torch.dtype, ...]]  # backend -> supported input dtypes (absent: any)


# linear_logprobs, grpo_loss, grpo_loss_from_logits (which runs "triton" as its epilogue, "triton_chunked")
LINEAR = OpBackends(
    names=BACKENDS,
    order={"cuda": ("triton", "cuda", "triton_chunked", "torch"), "cpu": ("cpp", "torch")},
    dtypes={name: _KERNEL_DTYPES for name in ("cpp", "cuda", "triton", "triton_chunked")},
)
# group_advantages: the extension converts any rewards to fp32 / fp64 itself
ADVANTAGES = OpBackends(names=("torch", "cpp", "cuda"), order={"cuda": ("cuda", "torch")}, dtypes={})


def available_backends(
    device: str | torch.device = "cpu", dtype: torch.dtype | None = None, op: OpBackends = LINEAR
) -> list[str]:
    """Backends of ``op`` that can run on ``device`` (and ``dtype``) in this process; ``auto`` picks the first."""
    dev = torch.device(device)
    return [name for name in op.order.get(dev.type, ("torch",)) if _why_not(name, dev, dtype, op) is None]


def _why_not(name: str, dev: torch.device, dtype: torch.dtype | None, op: OpBackends) -> str | None:
    """Why backend ``name`` of ``op`` cannot run on ``dev`` / ``dtype`` (None: it can)."""
    supported = op.dtypes.get(name)
    if dtype is not None and supported is not None and dtype not in supported:
        return (
            f"backend={name!r} supports {', '.join(str(d).removeprefix('torch.') for d in supported)} "
            f"inputs, got {str(dtype).removeprefix('torch.')} (use backend='torch')"
        )
    try:
        check_backend(name, dev)
    except (_backends.BackendUnavailable, ImportError) as e:
        return str(e)
    return None


def check_backend(name: str, dev: torch.device) -> None:
    """Raise ``BackendUnavailable`` (or ``ValueError`` for an unknown name) unless ``name`` runs on ``dev``."""
    check_choice("backend", name, ("auto",) + BACKENDS)
    if name == "torch":
        return
    if name in ("triton", "triton_chunked"):
        from fastgrpo.ops import _triton

        _triton.check_available(dev)
        return
    if name == "cpp" and dev.type != "cpu":
        raise _backends.BackendUnavailable(
            f"backend='cpp' runs on CPU tensors; got {dev.type} tensors (use 'cuda')"
        )
    if name == "cuda" and dev.type != "cuda":
        raise _backends.BackendUnavailable(
            f"backend='cuda' needs CUDA tensors; got {dev.type} tensors (use 'cpp')"
        )
    from fastgrpo.ops.epilogue import get_epilogue

    get_epilogue(name)  # raises with the reason when the extension is missing


def _require(name: str, dev: torch.device, dtype: torch.dtype | None, op: OpBackends) -> str:
    check_choice("backend", name, ("auto",) + op.names)
    why = _why_not(name, dev, dtype, op)
    if why is not None:
        raise _backends.BackendUnavailable(why)
    return name


def resolve_backend(
    backend: str, dev: torch.device, dtype: torch.dtype | None = None, op: OpBackends = LINEAR
) -> str:
    """The backend of ``op`` to run on ``dev`` / ``dtype`` inputs: an explicit one is checked (and raises);
    ``auto`` takes ``FASTGRPO_BACKEND`` when ``op`` has that backend (checked likewise), else the first that
    runs."""
    if backend != "auto":
        return _require(backend, dev, dtype, op)
    forced = _backends.env_backend()
    if forced is not None:
        check_choice("FASTGRPO_BACKEND", forced, BACKENDS)
        if forced in op.names:
            return _require(forced, dev, dtype, op)
    return available_backends(dev, dtype, op)[0]

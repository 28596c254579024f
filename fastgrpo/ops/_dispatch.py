"""Backend choice for the log-prob / loss ops.

``backend="auto"`` picks the fastest backend that runs on the inputs' device: on CUDA the fused Triton kernels
when triton is importable, else the CUDA extension, else torch; on CPU the C++ extension when it is built, else
torch. ``FASTGRPO_BACKEND`` overrides ``auto`` only. An explicit backend that cannot run raises
``BackendUnavailable`` with the reason — never a silent fallback.
"""

from __future__ import annotations

import torch

from fastgrpo import _backends

BACKENDS = ("torch", "cpp", "cuda", "triton", "triton_chunked")
CHUNKED = ("torch", "cpp", "cuda", "triton_chunked")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process (``auto`` picks the first)."""
    dev = torch.device(device)
    out = []
    for name in _preference(dev):
        try:
            check_backend(name, dev)
        except (_backends.BackendUnavailable, ImportError):
            continue
        out.append(name)
    return out


def _preference(dev: torch.device) -> tuple[str, ...]:
    if dev.type == "cuda":
        return ("triton", "cuda", "triton_chunked", "torch")
    return ("cpp", "torch")


def check_backend(name: str, dev: torch.device) -> None:
    """Raise ``BackendUnavailable`` (or ``ValueError`` for an unknown name) unless ``name`` runs on ``dev``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
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


def resolve_backend(backend: str, dev: torch.device) -> str:
    """The backend to run: an explicit one is checked (and raises); ``auto`` takes the first that runs."""
    if backend != "auto":
        check_backend(backend, dev)
        return backend
    forced = _backends.env_backend()
    if forced is not None:
        check_backend(forced, dev)
        return forced
    for name in _preference(dev):
        try:
            check_backend(name, dev)
        except (_backends.BackendUnavailable, ImportError):
            continue
        return name
    return "torch"

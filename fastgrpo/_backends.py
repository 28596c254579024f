"""The one place that imports optional dependencies (triton, flash_attn, bitsandbytes, fastgrpo._C).

Everything else asks this module: ``HAS_TRITON``, ``HAS_CUDA_EXT``, ``HAS_FLASH_ATTN``, ``HAS_BNB`` and the
``require_*`` helpers that raise an error saying what to install. Imports are lazy (first use), so
``import fastgrpo`` stays cheap and never fails because an optional package is missing or broken.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import warnings
from types import ModuleType

logger = logging.getLogger(__name__)

# HAS_CUDA_EXT (module __getattr__ below) is resolved on first access: importing the extension loads torch.
__all__ = [
    "HAS_TRITON",
    "HAS_FLASH_ATTN",
    "HAS_BNB",
    "BackendUnavailable",
    "triton_interpret",
    "load_triton",
    "load_ext",
    "load_flash_attn",
    "load_bnb",
    "env_backend",
]


class _KnownNoise(logging.Filter):
    """Drops the log records of third-party packages that every run would print and that need no action."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.prefixes))


# bitsandbytes (>= 0.49) logs this warning at import on CPUs with AVX512-BF16 unless the hub client `kernels`
# is installed (it fetches a 4-bit CPU GEMM from the Hugging Face hub; fastgrpo never uses it): ENVIRONMENT.md.
# The filter sits on that module's logger only and matches that one message; it must exist before bitsandbytes
# is first imported (peft imports it), which importing fastgrpo ensures.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _KnownNoise("Failed to load CPU gemm_4bit_forward from kernels-community")
)
# transformers 5 renamed `is_gradient_checkpointing`; peft (0.21) still reads the old name whenever it wraps a model
# in LoRA, which every LoRA run would print once. This message from that module only.
warnings.filterwarnings(
    "ignore",
    message="`is_gradient_checkpointing` is deprecated",
    category=FutureWarning,
    module=r"transformers\.modeling_utils",
)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to install."""


def _spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAS_TRITON: bool = _spec("triton")
HAS_FLASH_ATTN: bool = _spec("flash_attn")
HAS_BNB: bool = _spec("bitsandbytes")


@functools.cache
def _ext() -> tuple[ModuleType | None, str]:
    if os.environ.get("FASTGRPO_NO_EXT") == "1":
        return None, "FASTGRPO_NO_EXT=1 is set"
    try:
        return importlib.import_module("fastgrpo._C"), ""
    except ImportError as e:  # not built, or built against another torch
        return None, f"fastgrpo._C could not be imported ({e})"


def _has_ext() -> bool:
    return _ext()[0] is not None


def __getattr__(name: str):
    # HAS_CUDA_EXT is resolved on first access: importing the extension loads torch's C++ libraries.
    if name == "HAS_CUDA_EXT":
        return _has_ext()
    raise AttributeError(name)


def triton_interpret() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def load_triton() -> ModuleType:
    """Import triton or raise :class:`BackendUnavailable` with the install hint."""
    if not HAS_TRITON:
        raise BackendUnavailable("the Triton backends need triton: pip install 'fastgrpo[triton]'")
    return importlib.import_module("triton")


def load_ext() -> ModuleType:
    """Import the compiled extension ``fastgrpo._C`` or raise with the reason."""
    mod, why = _ext()
    if mod is None:
        raise BackendUnavailable(
            f"the C++/CUDA extension is not available: {why}. Build it with "
            "`pip install --no-build-isolation -e .` (unset FASTGRPO_NO_EXT), or use backend='torch'."
        )
    return mod


@functools.cache
def load_flash_attn() -> ModuleType:
    if not HAS_FLASH_ATTN:
        raise BackendUnavailable("flash-attn is not installed: pip install flash-attn (needs a CUDA torch)")
    return importlib.import_module("flash_attn")


@functools.cache
def load_bnb() -> ModuleType:
    if not HAS_BNB:
        raise BackendUnavailable("bitsandbytes is not installed: pip install 'fastgrpo[gpu]'")
    return importlib.import_module("bitsandbytes")


def env_backend() -> str | None:
    """``FASTGRPO_BACKEND`` overrides what ``backend="auto"`` picks (never an explicit choice)."""
    value = os.environ.get("FASTGRPO_BACKEND", "").strip()
    return value or None

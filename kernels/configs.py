"""Launch configurations: fixed tables keyed on the GPU architecture, the dtype and bucketed sizes.

One place decides the block sizes of every kernel, so the launchers, the ahead-of-time compile test
(``tests/test_triton_aot.py``) and the resource table in ``kernels/README.md`` see the same configurations.
Sizes are bucketed (small problems get smaller tiles) and nothing here depends on the token count beyond
"fewer than one full tile", so a new completion length never triggers a recompile.

``arch`` is the compute capability as an integer (``90`` for sm_90, ``80`` for sm_80); ``None`` means the CPU
interpreter, where only correctness matters and small tiles keep it fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = [
    "TileConfig",
    "RowConfig",
    "fused_fwd_config",
    "fused_bwd_config",
    "epilogue_config",
    "num_vocab_groups",
    "device_arch",
]


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the fused GEMM kernels (``BLOCK_N`` tokens x ``BLOCK_V`` vocabulary x ``BLOCK_D`` hidden)."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    GROUP_N: int = 8

    def replace(self, **kw) -> TileConfig:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class RowConfig:
    """Row-wise epilogue kernels: one program per row, ``BLOCK_V`` columns per step."""

    BLOCK_V: int
    num_warps: int
    num_stages: int = 1

    def replace(self, **kw) -> RowConfig:
        return dataclasses.replace(self, **kw)


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, 1 << max(0, (int(x) - 1).bit_length()))


def device_arch(device: torch.device) -> int | None:
    """Compute capability as ``major * 10 + minor`` for a CUDA device, ``None`` otherwise (interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _clip(cfg: TileConfig, n: int, d: int, v: int) -> TileConfig:
    # Problems smaller than a tile get the smallest tile that covers them (tl.dot needs >= 16 per dim;
    # wgmma wants 64 rows, which the sm_90 tables keep).
    lo_n = 64 if cfg.BLOCK_N >= 64 else 16
    return cfg.replace(
        BLOCK_N=min(cfg.BLOCK_N, _pow2_at_least(n, lo_n)),
        BLOCK_V=min(cfg.BLOCK_V, _pow2_at_least(v, 16)),
        BLOCK_D=min(cfg.BLOCK_D, _pow2_at_least(d, 16)),
    )


# Tables: (arch bucket, half precision) -> config. Shared memory per stage = (BLOCK_N + BLOCK_V) * BLOCK_D * bytes.
# sm_80 configs stay under ~99 KB so that sm_86 / sm_89 (99 KB per block) run them too. fp32 operands use IEEE
# fp32 FMA (no tensor cores); with 4 warps the backward tile spills, 8 warps do not (kernels/README.md).
_FWD = {
    ("sm90", True): TileConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4),
    ("sm90", False): TileConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=3),
    ("sm80", True): TileConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=4),
    ("sm80", False): TileConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=3),
    ("interp", True): TileConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1),
    ("interp", False): TileConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1),
}
_BWD = {
    ("sm90", True): TileConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    ("sm90", False): TileConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2),
    ("sm80", True): TileConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
    ("sm80", False): TileConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2),
    ("interp", True): TileConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1),
    ("interp", False): TileConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1),
}


def _bucket(arch: int | None) -> str:
    if arch is None:
        return "interp"
    return "sm90" if arch >= 90 else "sm80"


def fused_fwd_config(n: int, d: int, v: int, dtype: torch.dtype, arch: int | None) -> TileConfig:
    """Tiles of ``_fused_lse_fwd_kernel`` for ``hidden [n, d]``, ``weight [v, d]`` of ``dtype``."""
    return _clip(_FWD[(_bucket(arch), _half(dtype))], n, d, v)


def fused_bwd_config(n: int, d: int, v: int, dtype: torch.dtype, arch: int | None) -> TileConfig:
    """Tiles of ``_fused_linear_grad_kernel``."""
    return _clip(_BWD[(_bucket(arch), _half(dtype))], n, d, v)


def epilogue_config(v: int, dtype: torch.dtype, arch: int | None) -> RowConfig:
    """Row kernels over a ``[C, V]`` logits block: up to 4096 columns a step, 16 elements per thread."""
    if arch is None:
        return RowConfig(BLOCK_V=min(1024, _pow2_at_least(v, 16)), num_warps=4)
    block = min(4096, _pow2_at_least(v, 128))
    return RowConfig(BLOCK_V=block, num_warps=max(1, min(8, block // 512)))


def num_vocab_groups(n: int, v: int, cfg: TileConfig, num_sms: int) -> int:
    """Vocabulary slices of the fused forward: enough programs for ~4 waves, at least one tile per slice."""
    row_blocks = -(-n // cfg.BLOCK_N)
    v_tiles = -(-v // cfg.BLOCK_V)
    want = -(-4 * num_sms // row_blocks)
    return max(1, min(v_tiles, want))

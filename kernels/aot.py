"""Ahead-of-time compilation of the kernels for a GPU that is not present, and their resource usage.

The launch plans are built exactly as the launchers build them, from ``meta`` tensors of real model shapes, so
the configurations compiled here are the dispatcher's. Each launch is compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` with the same argument specialisation a real launch would get (16-byte aligned
pointers, divisibility of integers, unit strides as constants, ``do_not_specialize`` honoured), and the cubin is
inspected with the ``cuobjdump`` bundled in triton's wheel:

* registers per thread, ``STACK`` and ``LOCAL`` bytes (spills) from ``--dump-resource-usage``;
* shared memory: Triton's dynamic shared memory (``metadata.shared``) plus any static shared memory;
* tensor-core instructions in the SASS: ``HGMMA`` (sm_90 warpgroup MMA) and ``HMMA`` (sm_80 MMA).

Run ``python -m fastgrpo.kernels.aot [--shapes ...] [--dtypes ...]`` (without ``TRITON_INTERPRET``) to print the
table of ``kernels/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import native_specialize_impl

from . import configs
from ._launch import Launch
from .fused_linear_logprobs_bwd import fused_linear_grad_plan
from .fused_linear_logprobs_fwd import fused_lse_fwd_plan
from .logits_epilogue import logits_fwd_plan, logits_grad_plan

__all__ = ["Resources", "SHAPES", "KERNELS", "SMEM_LIMIT", "plans", "compile_launch", "resources", "report"]

# Usable shared memory per block (opt-in maximum).
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

# Real model shapes: (name, N tokens, D hidden, V vocabulary).
SHAPES = {
    "qwen2.5-7b": (16384, 3584, 152064),
    "qwen3-8b": (16384, 4096, 151936),
    "llama3-8b": (16384, 4096, 128256),
    "qwen2.5-1.5b": (16384, 1536, 151936),
}

KERNELS = ("fused_fwd", "fused_combine", "fused_bwd", "epilogue_fwd", "epilogue_grad")


def _bin(tool: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def plans(
    n: int, d: int, v: int, dtype: torch.dtype, arch: int, *, bias: bool = False, entropy: bool = True
) -> dict[str, Launch]:
    """The launches of every kernel for ``hidden [n, d]``, ``weight [v, d]`` of ``dtype`` on ``arch``, keyed by
    :data:`KERNELS`; built from meta tensors (nothing is allocated)."""
    meta = torch.device("meta")
    h = torch.empty(n, d, dtype=dtype, device=meta)
    w = torch.empty(v, d, dtype=dtype, device=meta)
    b = torch.empty(v, dtype=dtype, device=meta) if bias else None
    y = torch.empty(n, dtype=torch.int64, device=meta)
    vec = torch.empty(n, dtype=torch.float32, device=meta)
    fcfg = configs.fused_fwd_config(n, d, v, dtype, arch)
    groups = configs.num_vocab_groups(n, v, fcfg, 132 if arch >= 90 else 108)
    fwd, _ = fused_lse_fwd_plan(h, w, b, y, 1.0, fcfg, groups, interpret=False)
    bcfg = configs.fused_bwd_config(n, d, v, dtype, arch)
    bwd, _ = fused_linear_grad_plan(
        h, w, b, y, vec, vec, vec, vec if entropy else None, 1.0, (True, True, bias), bcfg, interpret=False
    )
    # The chunked engine's block: 4096 rows at most (fastgrpo.ops._engine.MAX_CHUNK).
    c = min(n, 4096)
    z = torch.empty(c, v, dtype=dtype, device=meta)
    yc, vc = y[:c], vec[:c]
    ecfg = configs.epilogue_config(v, dtype, arch)
    efwd, _ = logits_fwd_plan(z, yc, 1.0, ecfg)
    egrad, _ = logits_grad_plan(z, yc, vc, vc, vc, vc if entropy else None, 1.0, z, ecfg)
    return {
        "fused_fwd": fwd[0],
        "fused_combine": fwd[1],
        "fused_bwd": bwd[0],
        "epilogue_fwd": efwd[0],
        "epilogue_grad": egrad[0],
    }


def compile_launch(launch: Launch, arch: int):
    """``triton.compile`` the launch for ``sm_<arch>`` with the specialisation a real launch would get."""
    kernel = launch.kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError(
            "AOT compilation needs JIT kernels: unset TRITON_INTERPRET before importing fastgrpo.kernels"
        )
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs = {}, {}, {}
    for kp in kernel.params:
        name = kp.name
        if kp.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = launch.constexprs[name]
            continue
        val = launch.args[name]
        ty, attr = native_specialize_impl(
            type(backend), val, kp.is_const, not kp.do_not_specialize, not kp.do_not_specialize_on_alignment
        )
        if isinstance(val, float):
            ty, attr = "fp32", None
        if ty == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = attr
        else:
            signature[name] = ty
            if attr:
                attrs[(kp.num,)] = backend.parse_attr(attr)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src, target=target, options={"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    )


@dataclass
class Resources:
    kernel: str
    arch: int
    config: str
    registers: int
    stack: int
    local: int
    shared: int  # bytes per block (dynamic + static)
    hgmma: int  # count of HGMMA instructions in the SASS
    hmma: int  # count of HMMA instructions

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def resources(name: str, launch: Launch, arch: int) -> Resources:
    """Compile ``launch`` for ``arch`` and read its resource usage from the cubin."""
    compiled = compile_launch(launch, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [_bin("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_bin("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True, check=True
        ).stdout

    def field(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    cfg = ", ".join(
        f"{k}={v}" for k, v in launch.constexprs.items() if k.startswith("BLOCK") or k == "GROUP_N"
    )
    cfg += f", warps={launch.num_warps}, stages={launch.num_stages}"
    return Resources(
        kernel=name,
        arch=arch,
        config=cfg,
        registers=field("REG"),
        stack=field("STACK"),
        local=field("LOCAL"),
        shared=int(compiled.metadata.shared) + field("SHARED"),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
    )


def report(cases: list[tuple[str, str, int, bool, bool]], kernels=KERNELS) -> list[dict]:
    """Resources of ``kernels`` for each ``(shape, dtype, arch, bias, entropy)`` case, as plain dicts."""
    out = []
    for shape, dtype, arch, bias, entropy in cases:
        n, d, v = SHAPES[shape]
        ps = plans(n, d, v, getattr(torch, dtype), arch, bias=bias, entropy=entropy)
        for name in kernels:
            r = resources(name, ps[name], arch)
            out.append(dict(vars(r), shape=shape, dtype=dtype, bias=bias, entropy=entropy))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3-8b"], choices=sorted(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    p.add_argument("--bias", action="store_true", help="compile the variants with a bias")
    p.add_argument("--no-entropy", action="store_true", help="compile the variants without the entropy term")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the markdown table")
    args = p.parse_args(argv)
    cases = [
        (s, dt, a, args.bias, not args.no_entropy)
        for s in args.shapes
        for dt in args.dtypes
        for a in args.arch
    ]
    rows = report(cases, args.kernels)
    if args.json:
        print(json.dumps(rows))  # noqa: T201
        return
    print("| shape | dtype | kernel | arch | config | regs | shared (KB) | stack | local | HGMMA | HMMA |")  # noqa: T201
    print("|---|---|---|---|---|---|---|---|---|---|---|")  # noqa: T201
    for r in rows:
        print(  # noqa: T201
            f"| {r['shape']} | {r['dtype']} | {r['kernel']} | sm_{r['arch']} | {r['config']} | {r['registers']} | "
            f"{r['shared'] / 1024:.1f} | {r['stack']} | {r['local']} | {r['hgmma']} | {r['hmma']} |"
        )


if __name__ == "__main__":
    main()

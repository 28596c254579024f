"""Ahead-of-time compilation of every Triton kernel for sm_90 and sm_80 at the dispatcher's launch configs.

No GPU needed: ``fastgrpo.kernels.aot`` builds the launchers' own plans from meta tensors of real model shapes,
compiles them with ``triton.compile`` for the target and reads the cubin with the ``cuobjdump`` bundled in
triton's wheel. Checked: no spills (``STACK`` / ``LOCAL`` bytes), shared memory within the chip's per-block
limit, and tensor-core instructions in the GEMM kernels (``HGMMA`` on sm_90, ``HMMA`` on sm_80).

The compile runs in a subprocess without ``TRITON_INTERPRET`` (the interpreted tests import the kernels in
interpreter mode). The default run compiles one representative configuration per kernel and architecture
(Qwen3-8B head, bf16); ``-m slow`` covers the other shapes, dtypes and feature variants. Triton's cache makes
reruns fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if (
    importlib.util.find_spec("triton") is None
):  # not importorskip: importing triton fixes its interpreter mode
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
GEMM_KERNELS = ("fused_fwd", "fused_bwd")
KERNELS = ("fused_fwd", "fused_combine", "fused_bwd", "epilogue_fwd", "epilogue_grad")

_SCRIPT = (
    "import sys; from fastgrpo.ops._triton import _import_kernels; _import_kernels(); "
    "from fastgrpo.kernels.aot import main; main(sys.argv[1:])"
)


def _compile(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "--json", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_report() -> dict[tuple[str, int], dict]:
    rows = _compile("--shapes", "qwen3-8b", "--dtypes", "bfloat16", "--arch", "90", "80")
    return {(r["kernel"], r["arch"]): r for r in rows}


def check(r: dict) -> None:
    what = f"{r['kernel']} sm_{r['arch']} {r['shape']} {r['dtype']} [{r['config']}]"
    assert r["stack"] == 0 and r["local"] == 0, f"{what}: spills (stack {r['stack']} B, local {r['local']} B)"
    assert 0 < r["registers"] <= 255, f"{what}: {r['registers']} registers"
    assert r["shared"] <= SMEM_LIMIT[r["arch"]], (
        f"{what}: {r['shared']} B shared memory > {SMEM_LIMIT[r['arch']]}"
    )
    if r["kernel"] in GEMM_KERNELS and r["dtype"] != "float32":
        if r["arch"] >= 90:
            assert r["hgmma"] > 0, f"{what}: no HGMMA (warpgroup MMA) in the SASS"
        else:
            assert r["hmma"] > 0, f"{what}: no HMMA (tensor-core MMA) in the SASS"


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", KERNELS)
def test_aot_resources(default_report, kernel, arch):
    check(default_report[(kernel, arch)])


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], ["--bias", "--no-entropy"]], ids=["plain", "bias-noent"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_aot_resources_full_matrix(dtype, variant):
    rows = _compile(
        "--shapes", "qwen2.5-7b", "qwen3-8b", "llama3-8b", "qwen2.5-1.5b", "--dtypes", dtype, *variant
    )
    assert len(rows) == 4 * 2 * len(KERNELS)
    for r in rows:
        check(r)

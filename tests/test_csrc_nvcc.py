"""Ahead-of-time checks of the CUDA sources in csrc/ on a machine without a GPU.

- every ``.cu`` file compiles on its own with ``nvcc`` for sm_80 and sm_90 (plain CUDA C++, no torch header), and
  ptxas reports no spills and no stack frame for any kernel (``-Xptxas -v``);
- the epilogue kernels use 16-byte global loads/stores and warp-shuffle reductions (read from the PTX);
- the ATen glue of the CUDA ops (``*_cuda.cpp`` and ``bindings.cpp`` with ``FASTGRPO_WITH_CUDA``, compiled only in
  CUDA builds) passes a host-compiler syntax check
  against the torch headers and the CUDA toolkit headers.

Skipped when ``nvcc`` is not on the PATH (or, for the glue, when the CUDA headers cannot be found).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
# the ATen glue of the CUDA ops, and the bindings that register it under FASTGRPO_WITH_CUDA
GLUE_FILES = sorted(CSRC.rglob("*_cuda.cpp")) + [CSRC / "bindings.cpp"]
NVCC = shutil.which("nvcc")
ARCHS = (80, 90)

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")

RESOURCE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_sources_found():
    assert [p.name for p in CU_FILES] == ["epilogue.cu", "group_advantages.cu"]
    assert [p.name for p in GLUE_FILES] == ["epilogue_cuda.cpp", "group_advantages_cuda.cpp", "bindings.cpp"]


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_without_spills(cu: Path, tmp_path: Path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-c", "-std=c++17", "-O3", *gencode, "-Xptxas", "-v", str(cu), "-o", str(tmp_path / "k.o")]
    res = _run(cmd)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"nvcc failed:\n{log[-4000:]}"
    assert "warning" not in log.lower(), f"nvcc warnings:\n{log[-4000:]}"

    # ptxas prints, per kernel and arch: "Compiling entry function '<k>' for 'sm_XX'", then the resource line
    entries = ENTRY.findall(log)
    resources = RESOURCE.findall(log)
    assert entries, f"no kernel compiled:\n{log[-2000:]}"
    assert {int(sm) for _, sm in entries} == set(ARCHS)
    assert len(resources) >= len(entries)
    bad = [(k, sm, r) for (k, sm), r in zip(entries, resources) if any(int(x) for x in r)]
    assert not bad, "stack frame or spills (bytes stack, spill stores, spill loads): " + "; ".join(
        f"{k} sm_{sm}: {r}" for k, sm, r in bad
    )


@needs_nvcc
def test_epilogue_ptx_uses_vector_loads_and_shuffles(tmp_path: Path):
    ptx = tmp_path / "epilogue.ptx"
    res = _run(
        [
            NVCC,
            "-ptx",
            "-std=c++17",
            "-O3",
            "-arch=sm_90",
            str(CSRC / "epilogue" / "epilogue.cu"),
            "-o",
            str(ptx),
        ]
    )
    assert res.returncode == 0, res.stderr[-4000:]
    text = ptx.read_text()
    assert re.search(r"ld\.global(\.nc)?\.v4\.(u32|b32|f32)", text), "no 16-byte global loads in the epilogue"
    assert re.search(r"st\.global\.v4\.(u32|b32|f32)", text), "no 16-byte global stores in the gradient"
    assert "shfl.sync.bfly" in text, "no warp-shuffle reduction in the epilogue"


def _cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c) / "include"
    if NVCC:  # nvcc --dryrun names its include directory
        res = _run([NVCC, "--dryrun", "-c", "x.cu"])
        m = re.search(r'INCLUDES="-I([^"\s]+)', res.stderr)
        if m and (Path(m.group(1)) / "cuda_runtime_api.h").exists():
            return Path(m.group(1))
    return None


@needs_nvcc
def test_cuda_glue_syntax(tmp_path: Path):
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("CUDA toolkit headers not found (CUDA_HOME)")
    from torch.utils import cpp_extension

    # a CPU torch wheel ships the c10/cuda headers but not the CMake-generated one they include
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    # one translation unit including every glue file: the torch and CUDA headers are parsed once
    unity = tmp_path / "glue_unity.cpp"
    unity.write_text("".join(f'#include "{p}"\n' for p in GLUE_FILES))
    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{cuda_inc}", f"-I{tmp_path / 'stub'}", f"-I{sysconfig.get_paths()['include']}"]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unknown-pragmas", "-DFASTGRPO_WITH_CUDA",
           *includes, str(unity)]  # fmt: skip
    res = _run(cmd)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

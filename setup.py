"""Build script: the package is described in pyproject.toml; this file only adds the optional C++/CUDA
extension ``fastgrpo._C`` (see csrc/README.md). ``FASTGRPO_NO_EXT=1`` skips it.

What gets built (``pip install --no-build-isolation --no-deps -e .``):

- always (when torch is importable): the CPU ops, ``-O3 -fopenmp``; the baseline epilogue kernels are compiled
  for the compiler's default target, so the extension runs on any CPU torch runs on;
- on x86-64 with GCC or Clang: the same epilogue kernels once more with ATen's AVX2 flags
  (``-mavx2 -mfma -mf16c -DCPU_CAPABILITY_AVX2``) into a static library linked after every other object; the
  extension calls them only when the running CPU has AVX2/FMA/F16C and ATen itself runs AVX2 or better
  (runtime dispatch, so a build never emits an instruction its machine cannot run). ``FASTGRPO_NO_AVX2=1`` skips;
- with a CUDA torch and a CUDA toolkit (``torch.version.cuda`` and ``CUDA_HOME``): the ``.cu`` kernels and their
  ATen glue, for sm_80 and sm_90 (``FASTGRPO_CUDA_ARCHS="80;90"`` overrides, ``FASTGRPO_NO_CUDA=1`` skips).
"""

from __future__ import annotations

import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"

CPU_SOURCES = [
    f"{CSRC}/bindings.cpp",
    f"{CSRC}/epilogue/epilogue.cpp",
    f"{CSRC}/epilogue/epilogue_cpu_default.cpp",
    f"{CSRC}/group_advantages/group_advantages.cpp",
]
AVX2_SOURCES = [f"{CSRC}/epilogue/epilogue_cpu_avx2.cpp"]
AVX2_DEPS = [f"{CSRC}/epilogue/epilogue_cpu_kernel.h", f"{CSRC}/epilogue/epilogue.h"]
CUDA_SOURCES = [
    f"{CSRC}/epilogue/epilogue.cu",
    f"{CSRC}/epilogue/epilogue_cuda.cpp",
    f"{CSRC}/group_advantages/group_advantages.cu",
    f"{CSRC}/group_advantages/group_advantages_cuda.cpp",
]

# -g0: Python's sysconfig adds -g, which doubles compile time and the .so size for torch-heavy sources.
# -ffp-contract=off: no implicit FMA; the kernels use explicit fmadd where they want one, and the group op must
# round like its torch reference (csrc/group_advantages/group_advantages.h).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


def _log(msg: str) -> None:
    print(f"[fastgrpo setup] {msg}", file=sys.stderr)  # noqa: T201 (build-time message)


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _avx2_library_wanted() -> bool:
    if _env_on("FASTGRPO_NO_AVX2"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return sys.platform.startswith("linux") or sys.platform == "darwin"


def _cuda_archs() -> list[str]:
    archs = os.environ.get("FASTGRPO_CUDA_ARCHS", "80;90").replace(",", ";")
    flags = []
    for arch in (a.strip() for a in archs.split(";") if a.strip()):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _extension_kwargs() -> dict:
    if _env_on("FASTGRPO_NO_EXT"):
        _log("FASTGRPO_NO_EXT=1: not building the C++/CUDA extension fastgrpo._C")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable (use --no-build-isolation): not building fastgrpo._C")
        return {}

    macros: list[tuple[str, str | None]] = []
    libraries = []
    if _avx2_library_wanted():
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        libraries.append(
            (
                "fastgrpo_cpu_avx2",
                {
                    "sources": AVX2_SOURCES,
                    "obj_deps": {"": AVX2_DEPS},
                    "include_dirs": cpp_extension.include_paths(),
                    "macros": [("CPU_CAPABILITY", "AVX2"), ("CPU_CAPABILITY_AVX2", None)],
                    "cflags": [
                        "-std=c++20",
                        "-fPIC",
                        "-fvisibility=hidden",
                        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                        "-O3",
                        "-g0",
                        "-ffp-contract=off",
                        "-Wno-unknown-pragmas",
                        *AVX2_FLAGS,
                    ],
                },
            )
        )
        macros.append(("FASTGRPO_HAVE_AVX2", None))

    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _env_on("FASTGRPO_NO_CUDA")
    )
    cxx = CXX_FLAGS + [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in macros]
    if use_cuda:
        cxx.append("-DFASTGRPO_WITH_CUDA")
        nvcc = ["-O3", "-DFASTGRPO_WITH_CUDA", "-Xptxas=-warn-spills", *_cuda_archs()]
        ext = cpp_extension.CUDAExtension(
            "fastgrpo._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
        _log(f"building fastgrpo._C with CUDA kernels (CUDA {torch.version.cuda}, {cpp_extension.CUDA_HOME})")
    else:
        ext = cpp_extension.CppExtension(
            "fastgrpo._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
        why = (
            "CPU torch" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME) or FASTGRPO_NO_CUDA=1"
        )
        _log(f"building fastgrpo._C for CPU only ({why})")

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), building the AVX2 static library first (editable installs skip
        the ``build`` command that would otherwise run build_clib)."""

        def run(self):
            if self.distribution.has_c_libraries():
                self.run_command("build_clib")
            super().run()

    kwargs: dict = {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}
    if libraries:
        kwargs["libraries"] = libraries
    return kwargs


setup(**_extension_kwargs())

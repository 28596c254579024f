"""Living beside third-party packages: the top-level ``kernels/`` folder must not shadow the PyPI package
``kernels`` when the repository root is on ``sys.path``, and known third-party noise stays out of the output.

Each check runs in a fresh interpreter whose working directory is the repository root (so ``python -c`` puts the
root first on ``sys.path``, as ``make demo`` and pytest's ``pythonpath`` do).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, *extra_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in extra_path))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_top_level_kernels_hands_over_to_the_installed_package(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(
        "def get_kernel(repo_id, version=None):\n    return repo_id\n"
    )
    (site / "kernels" / "utils.py").write_text("X = 1\n")
    r = _run(
        """
        import sys
        assert sys.path[0] == ""  # the repository root (the working directory) comes first
        import kernels
        from kernels import get_kernel
        from kernels.utils import X
        print(kernels.__file__, get_kernel("kernels-community/x"), X)
        """,
        site,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(site / "kernels" / "__init__.py"), "kernels-community/x", "1"]


def test_without_the_package_kernels_is_absent_for_transformers_and_bitsandbytes():
    r = _run(
        """
        import kernels
        assert kernels.__file__ is None and list(kernels.__path__) == [], kernels
        try:
            from kernels import get_kernel
        except ImportError:
            pass
        else:
            raise AssertionError("get_kernel came from the repository's kernels/ folder")
        from transformers.utils.import_utils import is_kernels_available
        print(is_kernels_available())
        from transformers.integrations import hub_kernels  # imports any `kernels` find_spec finds
        import fastgrpo.kernels as k  # the Triton kernels keep their own name
        print(k.fused_lse_logp_entropy_triton.__name__)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "fused_lse_logp_entropy_triton"]


def test_bitsandbytes_kernel_hub_warning_is_filtered_and_nothing_else():
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." on import on CPUs with
    AVX512-BF16 when the hub client is not installed; importing fastgrpo drops exactly that record."""
    r = _run(
        """
        import logging
        import fastgrpo
        log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        log.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'"
        )
        log.warning("another bitsandbytes warning")
        """
    )
    assert r.returncode == 0, r.stderr
    assert "gemm_4bit_forward" not in r.stderr
    assert "another bitsandbytes warning" in r.stderr

"""The benchmark suite's smoke run (what CI runs as `fastgrpo bench --smoke`) and its output check."""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(REPO))

from bench import _harness as H  # noqa: E402
from bench.run import main  # noqa: E402


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _checked(rows, backend: str) -> bool:
    return any(r["backend"] == backend and r["metric"] == "check" and float(r["p50"]) == 1.0 for r in rows)


def test_smoke_run_checks_peers_and_writes_csv(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    expected = {
        "logprobs": ["fastgrpo-torch", "naive", "trl"],
        "grpo_loss": ["fastgrpo-torch", "naive", "trl", "liger"],
        "advantages": ["fastgrpo", "naive"],
    }
    mem_rows = 0
    for op, peers in expected.items():
        path = tmp_path / f"{op}_cpu_smoke.csv"
        header, rows = _rows(path)
        assert header == H.COLUMNS
        assert rows and all(r["op"] == op and r["device"].startswith("cpu") and r["torch"] for r in rows)
        for peer in peers:
            if peer in ("trl", "liger") and not any(r["backend"] == peer for r in rows):
                pytest.importorskip({"trl": "trl.kernels", "liger": "liger_kernel.chunked_loss"}[peer])
            # every implementation's outputs (and gradients) were compared with fastgrpo's before timing
            assert _checked(rows, peer), f"{op}: no passing check row for {peer}"
        checks = [r for r in rows if r["metric"] == "check"]
        assert checks and all(float(r["p50"]) == 1.0 for r in checks)
        errs = [float(r["p50"]) for r in rows if r["metric"] == "max_err"]
        assert errs and max(errs) < 0.05
        timed = {r["backend"] for r in rows if r["metric"] == "time"}
        assert set(peers) <= timed and any(b.endswith("floor") for b in timed)
        assert {r["mode"] for r in rows if r["metric"] == "time"} >= (
            {"fwd"} if op == "advantages" else {"fwd", "bwd", "fwd_bwd"}
        )
        assert (tmp_path / f"{op}_cpu_smoke.png").stat().st_size > 0
        mem_rows += sum(r["metric"] == "peak_mem" for r in rows)
    assert mem_rows >= 1  # the separate-process memory probe ran


# A benchmark module with a wrong implementation: the harness must void it (no timing) and fail the run.
def _fake_module():
    mod = types.ModuleType("bench._fake_op")
    mod.OP, mod.MODES, mod.MEM_MODES, mod.FLOOR_NAME = "fake", ("fwd", "bwd", "fwd_bwd"), (), "floor"
    mod.cases = lambda device, smoke: [H.Case("c", {"N": 8, "D": 4}, "float32", device)]
    mod.work = lambda case, mode: (1.0, "TFLOP/s")

    def setup(case, only=None, upcast=False):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 4, generator=g).requires_grad_(True)
        good = H.Impl(lambda: (x * x).sum(), lambda o: o, lambda o: {"y": o})
        bad = H.Impl(lambda: (x * x).sum() * (1 + 1e-3), lambda o: o, lambda o: {"y": o})
        return H.Setup(
            {"x": x}, ["x"], {"ours": good, "wrong": bad}, {"absent": "not installed"}, None, "ours"
        )

    mod.setup = setup
    return mod


def test_mismatch_voids_the_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "bench._fake_op", _fake_module())
    opts = H.RunOptions(memory=False, timing=H.TimingOptions(warmup=0, reps=1, min_time=0.0))
    res = H.run_op("bench._fake_op", opts)
    assert any("wrong" in f and "does NOT match" in f for f in res.failures)
    assert not any(r["backend"] == "wrong" and r["metric"] == "time" for r in res.rows)
    assert any(r["backend"] == "ours" and r["metric"] == "time" for r in res.rows)
    assert [float(r["p50"]) for r in res.rows if r["metric"] == "check"] == [1.0, 0.0]
    assert any("absent" in n for n in res.notes)


def test_vlm_bench_smoke(tmp_path):
    """bench/bench_vlm.py --smoke: the three layouts agree (checked before timing) and the CSV is written."""
    from bench.bench_vlm import main as vlm_main

    assert vlm_main(["--smoke", "--no-memory", "--out", str(tmp_path)]) == 0
    header, rows = _rows(tmp_path / "vlm_cpu_smoke.csv")
    assert header == H.COLUMNS
    checks = [r for r in rows if r["metric"] == "check"]
    assert {r["backend"] for r in checks} == {"per-completion", "trl"} and all(
        float(r["p50"]) == 1.0 for r in checks
    )
    timed = {r["backend"] for r in rows if r["metric"] == "tokens_per_s"}
    assert timed == {"prompt-once", "per-completion", "trl"}

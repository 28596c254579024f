"""``bench/bench_rollout.py --smoke``: every implementation checked equal, timed, and written to the CSV."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(REPO))

from bench import _harness as H  # noqa: E402
from bench.bench_rollout import IMPLS, main  # noqa: E402


def test_bench_rollout_smoke(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "rollout_cpu_smoke.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    assert header == H.COLUMNS
    assert all(r["op"] == "rollout" and r["device"].startswith("cpu") for r in rows)
    checks = {(r["backend"], r["x_value"]): float(r["p50"]) for r in rows if r["metric"] == "check"}
    assert set(b for b, _ in checks) == set(IMPLS) and all(v == 1.0 for v in checks.values())
    cases = {r["x_value"] for r in rows if r["metric"] == "time"}
    assert cases == {"1x4x8x4", "1x4x32x4"}  # B x G x P x N
    for impl in IMPLS:
        for case in cases:
            got = {r["metric"]: float(r["p50"]) for r in rows if (r["backend"], r["x_value"]) == (impl, case)}
            assert got["time"] > 0 and got["tokens_per_s"] > 0 and got["speedup"] > 0, (impl, case, got)
            assert abs(got["tokens_per_s"] * got["time"] - 1 * 4 * 4) < 1e-3  # B·G·N tokens generated

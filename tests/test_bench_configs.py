"""bench/bench_configs.py --smoke on the tiny models: the table is computed from the runs' metrics, a rerun reuses
finished runs, and the generated block replaces only its own part of the doc (the measured table is in
docs/configs.md)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(REPO))

from bench.bench_configs import BEGIN, END, main, verdict  # noqa: E402
from fastgrpo.observability import read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_configs_smoke(tmp_path):
    doc = tmp_path / "configs.md"
    doc.write_text(f"# kept above\n\n{BEGIN}\nold table\n{END}\n\nkept below\n")
    args = [
        "--smoke",
        "--configs",
        "grpo,dapo,care_vl",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
        "--doc",
        str(doc),
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["config"] for r in rows) == ["care_vl", "dapo", "grpo"]
    for r in rows:
        metrics = read_metrics(tmp_path / "runs" / f"{r['config']}-seed0")
        steps = [m for m in metrics if "reward" in m]
        assert r["steps"] == len(steps) == 2
        # the row's numbers are the run's metrics, not typed in
        assert r["signal"] == pytest.approx(1 - statistics.fmean(m["zero_std_groups"] for m in steps))
        assert r["reward_first"] == pytest.approx(steps[0]["reward"])
        assert r["reward_last"] == pytest.approx(steps[1]["reward"])
        assert r["s_per_step"] == pytest.approx(statistics.median(m["time/step"] for m in steps))
        evals = [m["eval/accuracy"] for m in metrics if m.get("eval/accuracy") is not None]
        assert [r["acc_before"], r["acc_after"]] == evals
    text = doc.read_text()
    assert (
        text.startswith("# kept above") and text.rstrip().endswith("kept below") and "old table" not in text
    )
    by_name = {r["config"]: r for r in rows}
    grpo = by_name["grpo"]
    line = next(ln for ln in text.splitlines() if ln.startswith("| `grpo` |"))
    assert (
        f"{grpo['signal']:.2f}" in line and f"{grpo['reward_first']:.2f} → {grpo['reward_last']:.2f}" in line
    )
    assert "wiring only" in next(ln for ln in text.splitlines() if ln.startswith("| `care_vl` |"))
    # a rerun reads the finished runs back and only rewrites the table
    assert main(args) == 0
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3


def test_verdict():
    row = {"wiring_only": False, "reward_first": 0.2, "reward_last": 0.5, "acc_before": 0.1, "acc_after": 0.3}
    assert verdict([row, row]) == "learns (2/2 seeds)"
    flat = {**row, "acc_after": 0.1}
    assert verdict([row, flat]) == "reward up 2/2, accuracy up 1/2"
    assert verdict([{**row, "wiring_only": True}]) == "wiring only"
    # a curriculum's later stages are harder: its training reward may fall while it learns
    down = {**row, "reward_last": 0.1}
    assert verdict([down, down], staged=True) == "learns (2/2 seeds) (curriculum: held-out accuracy)"
    assert verdict([down, flat], staged=True).startswith("accuracy up 1/2")

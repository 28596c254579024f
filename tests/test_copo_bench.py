"""bench/copo_vs_grpo.py end to end on the tiny model: every mode trains through fastgrpo.trainer.train and lands in
the table (the measured SmolLM2 table is in docs/schemes.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a top-level folder of the repository, not part of the package
    sys.path.insert(0, str(REPO))

from bench.copo_vs_grpo import main  # noqa: E402


def test_copo_bench_tiny(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["--tiny", "--steps", "1", "--seeds", "0", "--eval-prompts", "2", "--out", str(tmp_path)]
        assert main([*args, "--modes", "grpo,copo-running"]) == 0
        rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
        assert [(r["mode"], r["steps"]) for r in rows] == [("grpo", 1), ("copo-running", 1)]
        for r in rows:
            assert 0 <= r["acc_after"] <= 1 and 0 <= r["nonzero"] <= 1 and 0 <= r["wrong_positive"] <= 1
        # a second call reuses the finished runs and only writes the table
        assert main([*args, "--modes", "grpo,copo-running"]) == 0
        assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
        table = (tmp_path / "table.md").read_text()
        assert "| grpo | 1 |" in table and "| copo-running | 1 |" in table and "copo-batch" not in table
    finally:
        torch.set_num_threads(before)

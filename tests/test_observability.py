"""Reading a run's metrics: a killed run's torn last line, a corrupt line, and ``fastgrpo plot`` errors."""

from __future__ import annotations

import json
import logging

import pytest

from fastgrpo.cli import main
from fastgrpo.observability import read_metrics


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    rows = [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.75}]
    _write(tmp_path / "metrics.jsonl", rows, tail='{"step": 3, "rew')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="fastgrpo.observability"):
        assert read_metrics(tmp_path) == rows
    assert "torn last line 3" in caplog.text
    _write(tmp_path / "metrics.jsonl", rows, tail='{"step": 3, "rew\n\n')  # and trailing blank lines
    assert read_metrics(tmp_path / "metrics.jsonl") == rows


def test_corrupt_line_before_the_last_names_its_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2,,}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(path)


def test_plot_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgrpo plot: error: no metrics file at") and err.count("\n") == 1
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,,}\n{"step": 3}\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
    _write(tmp_path / "metrics.jsonl", [{"step": 1, "reward": 0.5}], tail='{"st')
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000

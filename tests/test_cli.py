"""The fastgrpo command line: train / eval / plot / bench forwarding, clear errors, and the demo's --tiny mode."""

from __future__ import annotations

import json
import sys

import pytest

from fastgrpo import cli
from fastgrpo.cli import main

TINY_SETS = ["--set", "train.progress=false", "--set", "task.num_train=8", "--set", "task.num_eval=4",
             "--set", "rollout.max_new_tokens=6", "--set", "rollout.group_size=2"]  # fmt: skip


def test_train_eval_plot_round_trip(tmp_path, capsys):
    rc = main(["train", "--tiny", *TINY_SETS, "--set", "train.steps=2", "--set", f"train.output_dir={tmp_path}",
               "--set", "train.run_name=run"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "mean reward first" in out and str(tmp_path / "run") in out
    run = tmp_path / "run"
    assert (
        (run / "metrics.jsonl").is_file() and (run / "plot.png").is_file() and (run / "config.yaml").is_file()
    )

    lines_before = (run / "metrics.jsonl").read_text()
    assert main(["eval", "--run", str(run), "--num", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2 and 0.0 <= result["eval/accuracy"] <= 1.0
    assert (run / "metrics.jsonl").read_text() == lines_before  # evaluation never touches the run's files

    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000 and "reward: first" in capsys.readouterr().out


def test_bad_config_key_is_named(tmp_path, capsys):
    rc = main(["train", "--tiny", "--set", "loss.los_type=grpo", "--set", f"train.output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "loss.los_type: unknown key" in err and "did you mean 'loss_type'" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    assert main(["train", "--config", str(bad), "--tiny"]) == 2
    assert "optim.learning_rate: unknown key" in capsys.readouterr().err


def test_resume_dir_without_checkpoint_is_clear(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["train", "--tiny", "--resume", str(tmp_path / "empty")])
    assert rc == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_missing_resume_dir_message(tmp_path, capsys):
    assert main(["train", "--tiny", "--resume", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "does not exist" in err


def test_eval_needs_a_run_directory(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err


def test_bench_forwards_arguments(tmp_path, monkeypatch):
    pkg = tmp_path / "bench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "run.py").write_text("CALLS = []\ndef main(argv):\n    CALLS.append(list(argv))\n    return 0\n")
    monkeypatch.setattr(cli, "find_bench_dir", lambda: pkg)
    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["bench", "--op", "grpo_loss", "--smoke"]) == 0
    assert sys.modules["bench.run"].CALLS == [["--op", "grpo_loss", "--smoke"]]


def test_bench_without_source_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "fastgrpo" / "cli.py"))
    with pytest.raises(FileNotFoundError, match="source checkout"):
        cli.find_bench_dir()


def test_demo_tiny(tmp_path, capsys):
    from fastgrpo import demo

    rc = demo.main(["--tiny", "--steps", "2", "--output-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "plot:" in out and "metrics:" in out and "first" in out and "last" in out

"""Resume restores the run: its own configuration, the newest intact checkpoint, and the exact parameters of an
uninterrupted run after a SIGKILL (issue 13)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DIGIT_REWARD, TINY_TRAINING
from safetensors.torch import load_file

from fastgrpo.checkpoint import CheckpointError, find_resumable, read_checkpoint, save_checkpoint
from fastgrpo.cli import main as cli_main
from fastgrpo.config import ConfigError, load_config, resume_config
from fastgrpo.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TINY_TRAINING, DIGIT_REWARD]
pytestmark = pytest.mark.usefixtures("one_thread")


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _first_run(tmp_path, *extra: str, steps: int = 2) -> Path:
    rc = cli_main(["train", *_sets(*TINY, f"train.output_dir={tmp_path}", "train.run_name=r", f"train.steps={steps}",
                                   "loss.loss_type=grpo", *extra)])  # fmt: skip
    assert rc == 0
    return tmp_path / "r"


def test_bare_resume_restores_the_saved_config(tmp_path, capsys):
    run = _first_run(tmp_path, "train.save_every=1")
    saved_yaml = (run / "config.yaml").read_text()
    # a bare resume of a finished run: nothing to do, the saved config untouched
    assert cli_main(["train", "--resume", str(run)]) == 0
    assert (run / "config.yaml").read_text() == saved_yaml
    # more steps may be asked for; the loss type, group size, model and task stay the run's own
    assert cli_main(["train", "--resume", str(run), "--set", "train.steps=3"]) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg.train.steps == 3 and cfg.loss.loss_type == "grpo" and cfg.rollout.group_size == 4
    assert cfg.model.name == "tiny"
    assert (run / "checkpoints" / "step-000003").is_dir()
    capsys.readouterr()


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.loss_type=dapo", "loss.loss_type"),
        ("rollout.group_size=8", "rollout.group_size"),
        ("model.name=smollm2-135m-instruct", "model.name"),
        ("train.seed=3", "train.seed"),
    ],  # fmt: skip
)
def test_resume_refuses_changes_that_break_exact_continuation(tmp_path, capsys, override, key):
    run = _first_run(tmp_path)
    saved_yaml = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}: cannot change when resuming" in err
    assert (run / "config.yaml").read_text() == saved_yaml  # never overwritten
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):  # the Python API checks the same
        Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}", "loss.loss_type=grpo", "train.steps=2",
                                   override]), resume=run)  # fmt: skip


def test_resume_refuses_a_config_file(tmp_path, capsys):
    run = _first_run(tmp_path)
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run), "--config", str(ROOT / "configs" / "grpo.yaml")]) == 2
    assert "saved configuration" in capsys.readouterr().err


def test_resume_config_allows_only_resumable_keys():
    saved = yaml.safe_dump(_as_dict(["loss.beta=0.1"]), sort_keys=False)
    assert resume_config(saved, ["train.steps=99", "train.eval_every=5"]).train.steps == 99
    assert resume_config(saved, ["loss.beta=0.1"]).loss.beta == 0.1  # the same value is no change
    with pytest.raises(ConfigError, match=r"loss\.beta: cannot change"):
        resume_config(saved, ["loss.beta=0.2"])


def _as_dict(overrides):
    from fastgrpo.config import config_to_dict

    return config_to_dict(load_config(None, overrides))


# ----------------------------------------------------------------------------------------------------------
# broken checkpoints


def _save(tmp_path, step):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(tmp_path, step, model=model, optimizer=opt, state={"x": step}, config_text="a: 1\n",
                           keep_last=0)  # fmt: skip


@pytest.mark.parametrize("broken", ["model.safetensors", "optimizer.pt", "state.pt"])
@pytest.mark.parametrize("how", ["truncated", "missing", "garbage"])
def test_a_broken_latest_checkpoint_falls_back_to_the_newest_intact(tmp_path, caplog, broken, how):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    latest = _save(tmp_path, 3)
    f = latest / broken
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "missing":
        f.unlink()
    else:
        f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(
        CheckpointError, match=rf"step-000003: {broken.replace('.', r'.')} is (missing|unreadable)"
    ):
        read_checkpoint(latest)
    with caplog.at_level(logging.WARNING):
        ckpt = find_resumable(tmp_path)
    assert ckpt.step == 2 and ckpt.state["x"] == 2
    assert broken in caplog.text and "step-000002" in caplog.text
    with pytest.raises(CheckpointError, match=broken.replace(".", r".")):  # named explicitly: no fallback
        find_resumable(latest)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path, capsys):
    for step in (1, 2):
        (_save(tmp_path, step) / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        find_resumable(tmp_path)
    assert cli_main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors is unreadable" in err


def test_leftovers_of_interrupted_saves_are_removed(tmp_path):
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000002-999").mkdir()
    (root / ".tmp-step-000002-999" / "model.safetensors").write_bytes(b"half")
    (root / ".latest-999").write_text("step-000002")
    find_resumable(tmp_path)  # on resume
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
    (root / ".old-step-000001-5").mkdir()
    _save(tmp_path, 2)  # on save
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]


def test_the_final_checkpoint_is_written_once(tmp_path, monkeypatch):
    import fastgrpo.trainer as trainer_mod

    saved = []
    real = trainer_mod.save_checkpoint
    monkeypatch.setattr(
        trainer_mod, "save_checkpoint", lambda run, step, **kw: (saved.append(step), real(run, step, **kw))[1]
    )
    _first_run(tmp_path, "train.save_every=1")
    assert saved == [1, 2]


# ----------------------------------------------------------------------------------------------------------
# SIGKILL, then a bare `fastgrpo train --resume RUN_DIR`


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}  # fmt: skip


def _cmd(*args):
    return [sys.executable, "-m", "fastgrpo.cli", "train", *args]


def _final_params(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def _killed_run(tmp_path, name, sets, steps):
    proc = subprocess.Popen(_cmd(*_sets(*sets, f"train.run_name={name}")), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pointer = tmp_path / name / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pointer.is_file() and pointer.read_text().strip() >= "step-000003":
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    return tmp_path / name


@pytest.mark.parametrize("extra", [[], ["loss.beta=0.05"]], ids=["no-kl", "kl"])
def test_sigkill_then_bare_resume_equals_an_uninterrupted_run(tmp_path, extra):
    steps = 12
    sets = [*TINY, f"train.output_dir={tmp_path}", f"train.steps={steps}", "train.save_every=1", "train.keep_last=0",
            "loss.loss_type=grpo", *extra]  # fmt: skip
    straight = subprocess.run(_cmd(*_sets(*sets, "train.run_name=straight")), env=_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-2000:]
    want = _final_params(tmp_path / "straight", steps)

    run = _killed_run(tmp_path, "killed", sets, steps)
    truncated = tmp_path / "truncated"
    shutil.copytree(run, truncated)
    for target in (run, truncated):
        if target is truncated:  # the newest checkpoint cut in half: resume from the one before
            latest = target / "checkpoints" / (target / "checkpoints" / "latest").read_text().strip()
            f = latest / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        resumed = subprocess.run(_cmd("--resume", str(target)), env=_env(), cwd=tmp_path, capture_output=True,
                                 text=True, timeout=600)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        if target is truncated:
            assert "model.safetensors is unreadable" in resumed.stderr and "newest intact" in resumed.stderr
        got = _final_params(target, steps)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (target.name, name)

"""Checkpoints: atomic layout, latest pointer, pruning, exact round trip of weights / optimizer / RNG, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from fastgrpo.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)


def _model(seed=0, frozen_first=False):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    if frozen_first:
        m[0].requires_grad_(False)
    return m


def _train_one(model, opt):
    loss = model(torch.randn(3, 4)).square().sum()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_is_exact(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        _train_one(model, opt)
        sched.step()
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched,
                           ema_state={"w": torch.ones(2)}, state={"sampler": {"pos": 7}}, config_text="a: 1\n")  # fmt: skip
    assert path.name == "step-000003" and (tmp_path / "checkpoints" / "latest").read_text() == "step-000003"
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "optimizer.pt", "scheduler.pt", "ema.safetensors",
                                                "state.pt", "config.yaml"}  # fmt: skip

    other = _model(seed=1)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    state = load_checkpoint(tmp_path, model=other, optimizer=opt2, scheduler=sched2)
    assert (
        state["step"] == 3
        and state["sampler"] == {"pos": 7}
        and torch.equal(state["ema_state"]["w"], torch.ones(2))
    )
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == sched.get_last_lr()
    # continuing both gives identical parameters: the optimizer moments came back too
    torch.manual_seed(5)
    _train_one(model, opt)
    torch.manual_seed(5)
    _train_one(other, opt2)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_only_trainable_parameters_are_saved(tmp_path):
    model = _model(frozen_first=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    from safetensors.torch import load_file

    assert sorted(load_file(str(path / "model.safetensors"))) == ["2.bias", "2.weight"]


def test_rng_round_trip():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_latest_pruning_and_resave(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step-000003", "step-000004"]
    save_checkpoint(
        tmp_path, 4, model=model, optimizer=opt, keep_last=2
    )  # same step again (signal after save)
    assert latest_checkpoint(tmp_path).name == "step-000004"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_half_written_checkpoint_is_ignored(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    # a crash while writing step 3 leaves only a temporary directory behind
    tmp = tmp_path / "checkpoints" / ".tmp-step-000003-999"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"garbage")
    assert resolve_resume(tmp_path).name == "step-000002"
    (tmp_path / "checkpoints" / "latest").unlink()  # even without the pointer
    assert latest_checkpoint(tmp_path).name == "step-000002"


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        resolve_resume(tmp_path / "empty")


def test_mismatched_model_is_refused(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    wrong = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"trainable parameter '3\.bias' is missing \(2 in all\)"):
        load_checkpoint(tmp_path, model=wrong)
    smaller = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(ValueError, match="not in the model"):
        load_checkpoint(tmp_path, model=smaller)

"""What a run reports and how its learning rate moves: ``train.report_to`` trackers (each one installed here logs
a step), the ``transformers.get_scheduler`` schedules against the hand-written one they replaced (and across a
resume), the plot's scheme panels and the progress bar's fields."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from conftest import DIGIT_REWARD, TINY_RUN

from fastgrpo.config import SCHEDULERS, ConfigError, OptimConfig, load_config
from fastgrpo.observability import plot_panels, plot_run, read_metrics
from fastgrpo.observability import progress_fields as _progress_fields
from fastgrpo.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# -- trackers ----------------------------------------------------------------------------------------------


def _tensorboard(run: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard" / "fastgrpo"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(key)]


def _wandb(run: Path, key: str) -> list[tuple[int, float]]:
    """History records of the offline run file (a LevelDB-style log of ``wandb_internal_pb2.Record``s; wandb has no
    public offline reader)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data, off, partial, out = path.read_bytes(), 7, b"", []  # 7: the file header (":W&B", magic, version)
    while off + 7 <= len(data):
        if 32768 - off % 32768 < 7:  # records never straddle a 32 KiB block: the tail is padding
            off += 32768 - off % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[off : off + 7])
        chunk, off = data[off + 7 : off + 7 + length], off + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(partial)
            if rec.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                if key in items:
                    out.append((items["_step"], items[key]))
    return out


def _mlflow(run: Path, key: str) -> list[tuple[int, float]]:
    import mlflow

    client = mlflow.MlflowClient()
    (found,) = client.search_runs([client.get_experiment_by_name("fastgrpo").experiment_id])
    assert found.info.run_name == run.name
    return [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)]


def _trackio(run: Path, key: str) -> list[tuple[int, float]]:
    import os
    import sqlite3

    with sqlite3.connect(Path(os.environ["TRACKIO_DIR"]) / "fastgrpo.db") as db:
        rows = db.execute("select step, metrics from metrics where run_name = ?", (run.name,)).fetchall()
    return [(step, json.loads(m)[key]) for step, m in rows if key in json.loads(m)]


READERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}


@pytest.mark.parametrize("tracker", list(READERS))
def test_each_installed_tracker_logs_a_step(tmp_path, monkeypatch, tracker):
    if importlib.util.find_spec(tracker) is None:
        pytest.skip(
            f"{tracker} is not installed (pip install {tracker}; it installs on CPU and runs offline)"
        )
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    cfg = load_config(None, [*TINY_RUN, "train.steps=2", "rollout.group_size=2", f"train.report_to=[{tracker}]",
                             f"train.output_dir={tmp_path}", "train.run_name=tracked"])  # fmt: skip
    trainer = Trainer(cfg)
    assert [t.name for t in trainer.accel.trackers] == [tracker]
    trainer.train()
    run = tmp_path / "tracked"
    want = [(r["step"], r["entropy"]) for r in read_metrics(run) if "entropy" in r]
    got = READERS[tracker](run, "entropy")
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # TensorBoard stores fp32
    assert not trainer.accel.trackers  # finished at the end of the run


def test_report_to_as_transformers_spells_it():
    cfg = load_config(None, ["train.report_to=none"])
    assert cfg.train.trackers() == []
    installed = [t for t in READERS if importlib.util.find_spec(t) is not None]
    assert load_config(None, ["train.report_to=all"]).train.trackers() == installed
    if installed:
        assert load_config(None, [f"train.report_to={installed[0]}"]).train.trackers() == installed[:1]
        assert (
            load_config(None, [f"train.report_to=[{installed[0]}, {installed[0]}]"]).train.trackers()
            == installed[:1]
        )


# -- the learning-rate schedule ----------------------------------------------------------------------------


def _old_lambda(scheduler: str, warmup: int, total: int, step: int) -> float:
    """The hand-written schedule ``Trainer._lr_lambda`` had before ``transformers.get_scheduler`` replaced it."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    frac = (step - warmup) / max(1, total - warmup)
    if scheduler == "linear":
        return max(0.0, 1.0 - frac)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return 1.0


def _lrs(optim: OptimConfig, total: int, lr: float = 2e-4) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = optim.build_scheduler(opt, total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total", [1, 3, 60, 97])
def test_schedules_match_the_old_ones_without_warmup(name, total):
    got = _lrs(OptimConfig(scheduler=name), total)
    old = [2e-4 * _old_lambda(name, 0, total, s) for s in range(total)]
    if name == "linear":  # (T - s) / T against 1 - s / T: roundings of a number in [0, 1] apart
        assert got == pytest.approx(old, rel=0, abs=2e-4 * 1e-15)
    else:  # constant, and cosine: pi * 0.5 * 2.0 * p is pi * p exactly
        assert got == old


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_warmup_rises_from_zero_as_in_transformers(name):
    """Warmup is transformers' (and TRL's): lr * s / warmup for the first steps, then the schedule; ``constant``
    keeps its warmup (transformers' plain ``constant`` would skip it)."""
    got = _lrs(OptimConfig(scheduler=name, warmup_steps=4), 20, lr=1.0)
    assert got[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    decay = [1.0 - s / 16 for s in range(16)] if name == "linear" else None
    if name == "constant":
        assert got[4:] == [1.0] * 16
    elif name == "linear":
        assert got[4:] == pytest.approx(decay, rel=1e-15)
    else:
        assert got[4:] == pytest.approx(
            [0.5 * (1 + math.cos(math.pi * s / 16)) for s in range(16)], rel=1e-15
        )


def test_every_scheduler_name_builds_and_bad_kwargs_fail_at_load():
    kwargs = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
              "warmup_stable_decay": {"num_decay_steps": 3}}  # fmt: skip
    for name in SCHEDULERS:
        lrs = _lrs(OptimConfig(scheduler=name, warmup_steps=2, scheduler_kwargs=kwargs.get(name, {})), 10)
        assert len(lrs) == 10 and all(math.isfinite(x) and x >= 0 for x in lrs), name
    assert _lrs(OptimConfig(scheduler="cosine_with_min_lr", scheduler_kwargs={"min_lr_rate": 0.1}), 5)[-1] > 0
    with pytest.raises(ConfigError, match=r"optim\.scheduler_kwargs: 'cosine_with_min_lr' with \{\}"):
        load_config(None, ["optim.scheduler=cosine_with_min_lr"])
    with pytest.raises(ConfigError, match=r"'warmup_stable_decay' with \{\}: .* 'num_decay_steps'"):
        load_config(None, ["optim.scheduler=warmup_stable_decay"])
    with pytest.raises(ConfigError, match=r"optim\.scheduler_kwargs: 'linear' with \{'power': 2\}"):
        load_config(None, ["optim.scheduler=linear", "optim.scheduler_kwargs={power: 2}"])
    with pytest.raises(ConfigError, match=r"optim\.scheduler: 'reduce_lr_on_plateau' is not one of"):
        load_config(None, ["optim.scheduler=reduce_lr_on_plateau"])


def test_the_schedule_is_exact_across_resume(tmp_path):
    base = [*TINY_RUN, DIGIT_REWARD, "rollout.group_size=4", "train.steps=5", "train.num_iterations=2",
            "optim.scheduler=linear", "optim.warmup_steps=3", "optim.lr=5e-3", "train.save_every=2",
            "train.keep_last=0", f"train.output_dir={tmp_path}"]  # fmt: skip
    straight = Trainer(load_config(None, [*base, "train.run_name=straight"])).train()
    lrs = [r["lr"] for r in straight.metrics]
    # the lr after each training step: 2 optimizer steps each, 3 of warmup, 10 in all
    assert lrs == pytest.approx([5e-3 * x for x in (2 / 3, 6 / 7, 4 / 7, 2 / 7, 0.0)], rel=1e-12, abs=1e-18)
    resumed = Trainer(load_config(None, [*base, "train.run_name=straight"]),
                      resume=tmp_path / "straight" / "checkpoints" / "step-000002").train()  # fmt: skip
    assert [r["lr"] for r in resumed.metrics] == lrs
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in straight.metrics]


# -- what users look at ------------------------------------------------------------------------------------


def test_progress_bar_shows_kl_only_with_a_kl_term():
    m = {"reward": 0.5, "kl": None, "entropy": 1.0, "clip_frac": 0.0, "tokens_per_s": 100.0}
    assert list(_progress_fields(m)) == ["reward", "ent", "clip", "tok_s"]
    assert _progress_fields({**m, "kl": 0.01})["kl"] == "0.0100"


def test_plot_shows_the_scheme_metrics_present(tmp_path):
    rows = [
        {"step": s, "reward": 0.1 * s, "kl": None, "entropy": 1.0, "clip_frac": 0.0, "completion_len": 8.0,
         "reward/format": 0.5, "reward/accuracy": 0.1, "copo/blend": 0.3, "care/bonus": None, "lr": 1e-3}
        for s in range(1, 4)
    ]  # fmt: skip
    panels = plot_panels(rows)
    assert [title for title, _ in panels][5:] == [
        "reward terms",
        "copo/blend",
    ]  # care/bonus never had a value
    assert panels[5][1] == ("reward/format", "reward/accuracy")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_run(tmp_path).stat().st_size > 1000
    assert [t for t, _ in plot_panels([{"step": 1, "reward": 1.0, "reward/accuracy": 1.0}])][5:] == []


def test_completions_log_has_terms_reward_and_advantage(tmp_path):
    """COPO: the global and local advantages and the blend; the reward is the weighted sum of the terms."""
    cfg = load_config(None, [*TINY_RUN, "train.steps=1", "rollout.group_size=4", "train.log_completions=4",
                             "advantage.copo.enabled=true", "rewards=[{name: format, weight: 0.5, params: {pattern: "
                             "'.*[0-9].*'}}, {name: accuracy, weight: 2.0}]", f"train.output_dir={tmp_path}",
                             "train.run_name=c"])  # fmt: skip
    trainer = Trainer(cfg)
    trainer.stream.sampler.metrics = lambda: {
        "curriculum/stage": 1.0
    }  # a sampler's statistics join the step's
    res = trainer.train()
    assert res.metrics[0]["curriculum/stage"] == 1.0 and res.metrics[0]["copo/blend"] is not None
    lines = [json.loads(x) for x in (tmp_path / "c" / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    adv = trainer._last_adv
    for i, line in enumerate(lines):
        assert set(line["rewards"]) == {"format", "accuracy"}
        assert line["reward"] == pytest.approx(
            0.5 * line["rewards"]["format"] + 2.0 * line["rewards"]["accuracy"]
        )
        assert line["advantage"] == float(adv.values[i]) and line["advantage_local"] == float(adv.local[i])
        assert line["blend"] == float(adv.blend[i]) and line["example"] == trainer._last_batch.example[i]
        assert line["prompt"] == trainer.train_set[line["example"]].question and line["completion"]


def test_curriculum_samplers_report_their_stage():
    from fastgrpo.sampling import CurriculumSampler, PerformanceGatedCurriculumSampler, PromptStream

    fixed = CurriculumSampler([[0, 1], [2, 3, 4]], shuffle_within=False)
    stream = PromptStream(fixed)
    assert fixed.metrics() == {"curriculum/stage": 0.0}
    assert stream.next(2) == [0, 1] and fixed.metrics() == {"curriculum/stage": 0.0}
    assert stream.next(1) == [2] and fixed.metrics() == {"curriculum/stage": 1.0}
    assert stream.next(3) == [3, 4, 0] and fixed.metrics() == {"curriculum/stage": 0.0}  # a new epoch
    assert CurriculumSampler([[0, 1, 2]]).metrics() == {}  # one stage: a plain shuffle, nothing to report
    gated = PerformanceGatedCurriculumSampler([[0, 1], [2, 3]], 100, threshold=0.5, window=2)
    assert gated.metrics() == {"curriculum/stage": 0.0, "curriculum/stage_mean_reward": None}
    gated.update([0], [0.25])
    assert gated.metrics() == {"curriculum/stage": 0.0, "curriculum/stage_mean_reward": 0.25}
    gated.update([1], [1.0])  # mean 0.625 >= 0.5 over a full window: the next stage
    assert gated.metrics() == {"curriculum/stage": 1.0, "curriculum/stage_mean_reward": None}

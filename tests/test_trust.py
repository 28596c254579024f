"""Silent failures a new user hits, made loud (issue 13): validation at load, non-finite gradients, scheme inputs
as the papers define them, one summary per run."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from conftest import TINY_TRAINING

import fastgrpo.models
from fastgrpo.cli import main as cli_main
from fastgrpo.config import ConfigError, load_config
from fastgrpo.trainer import RunResult, Trainer

TINY = [
    *TINY_TRAINING,
    "rewards=[{name: format, weight: 1.0, params: {pattern: '.*[0-9].*'}}, {name: accuracy, weight: 0.5}]",
]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", r"optim\.lr: must be a finite number"),
        ("rollout.temperature=.nan", r"rollout\.temperature: must be a finite number"),
        ("rollout.temperature=inf", r"rollout\.temperature: must be a finite number"),
        ("rollout.top_p=0", r"rollout\.top_p: must lie in \(0\.0, 1\.0\]"),
        ("rollout.top_p=1.5", r"rollout\.top_p: must lie in \(0\.0, 1\.0\]"),
        ("rollout.top_k=-1", r"rollout\.top_k: must be >= 0"),
        ("train.token_budget=0", r"train\.token_budget: must be > 0"),
        ("train.token_budget=300", r"train\.token_budget: 300 tokens cannot hold a prompt and its group"),
        ("loss.beta=-0.1", r"loss\.beta: must be a finite number >= 0"),
        ("loss.chunk_size=0", r"loss\.chunk_size: must be a positive integer"),
        ("loss.backend=cuda9", r"loss\.backend: "),
        ("loss.dual_clip=0.5", r"loss\.dual_clip: must be None or a finite number > 1"),
        ("loss.eps_low=nan", r"loss\.eps_low: must be a finite number"),
        ("optim.betas=[0.9, 1.5]", r"optim\.betas: needs two values in \[0, 1\)"),
        ("rewards.0.weight=nan", r"rewards\.0\.weight: must be a finite number"),
        ("model.lora.dropout=1", r"model\.lora\.dropout: must lie in \[0\.0, 1\.0\)"),
        ("train.time_budget_s=-1", r"train\.time_budget_s: must be >= 0"),
        ("train.max_skipped_steps=0", r"train\.max_skipped_steps: must be > 0"),
    ],
)
def test_every_field_is_validated_at_load(override, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    assert cli_main(["train", "--tiny", "--set", override]) == 2  # one line, before any model work
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastgrpo train: error: ")


@pytest.mark.parametrize(
    "override, package",
    [
        ("train.report_to=tensorboard", "tensorboard"),
        ("train.report_to=[none, wandb]", "wandb"),
        ("train.report_to=mlflow", "mlflow"),
        ("train.report_to=trackio", "trackio"),
        ("train.tensorboard=true", "tensorboard"),  # the deprecated key
    ],
)
def test_a_tracker_without_its_package_is_a_config_error(monkeypatch, capsys, override, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    with pytest.raises(ConfigError, match=rf"train\.report_to: '{package}' needs the {package} package"):
        load_config(None, [override])
    assert cli_main(["train", "--tiny", "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install {package}" in err[0]


def test_an_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.report_to: 'tensorbord' is not one of"):
        load_config(None, ["train.report_to=tensorbord"])
    assert load_config(None, ["train.report_to=none"]).train.trackers() == []


def test_a_tokenizer_without_chat_template_is_refused(monkeypatch, tmp_path):

    real = fastgrpo.models.load_policy

    def no_template(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        tok.chat_template = None
        return model, tok

    monkeypatch.setattr(fastgrpo.models, "load_policy", no_template)
    with pytest.raises(
        ConfigError, match=r"rollout\.chat_template: the tokenizer of 'tiny' has no chat template"
    ):
        Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}"]))
    Trainer(
        load_config(None, [*TINY, f"train.output_dir={tmp_path}", "rollout.chat_template=false"])
    )  # plain prompts


# ----------------------------------------------------------------------------------------------------------
# non-finite gradients


def _poison_gradients(trainer, steps):
    """Make the gradient NaN during the given training steps (1-based)."""
    real = trainer._accumulate

    def accumulate(update):
        out = real(update)
        if trainer.step + 1 in steps:
            next(p for p in trainer.params if p.grad is not None).grad.fill_(float("nan"))
        return out

    trainer._accumulate = accumulate


def test_a_non_finite_gradient_skips_the_optimizer_step(tmp_path):
    trainer = Trainer(
        load_config(None, [*TINY, f"train.output_dir={tmp_path}", "train.steps=3", "train.run_name=s"])
    )
    _poison_gradients(trainer, {2})
    seen = {}
    trainer.callbacks.append(lambda t, m: seen.update({m["step"]: [p.detach().clone() for p in t.params]}))
    res = trainer.train()
    assert [r["skipped_steps"] for r in res.metrics] == [0, 1, 0]
    assert not math.isfinite(res.metrics[1]["grad_norm"] or float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 2 changed no parameter
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))  # step 3 trained again
    assert trainer.scheduler.last_epoch == 2  # the skipped step did not advance the schedule
    assert all(math.isfinite(float(p.detach().sum())) for p in trainer.params)


def test_consecutive_non_finite_gradients_stop_the_run(tmp_path, monkeypatch, capsys):
    trainer = Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}", "train.steps=5",
                                         "train.max_skipped_steps=2", "train.run_name=x"]))  # fmt: skip
    _poison_gradients(trainer, {2, 3, 4})
    with pytest.raises(FloatingPointError, match=r"2 steps in a row had a non-finite gradient"):
        trainer.train()
    assert trainer.step == 2  # step 3 raised before counting

    import fastgrpo.trainer as trainer_mod

    def diverging_train(cfg, resume=None):
        t = Trainer(cfg, resume=resume)
        _poison_gradients(t, {1, 2})
        return t.train()

    monkeypatch.setattr(trainer_mod, "train", diverging_train)
    assert cli_main(["train", *sum((["--set", s] for s in [*TINY, f"train.output_dir={tmp_path}",
                                                            "train.max_skipped_steps=2"]), [])]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite gradient" in err


# ----------------------------------------------------------------------------------------------------------
# scheme inputs as the papers define them


def test_the_ema_reference_counts_optimizer_steps(tmp_path):
    """GRPO-CARE's EMA update runs every ema_every *optimizer* steps: with 2 per training step, 2 training steps
    are 4 optimizer steps, hence 2 EMA updates at ema_every=2 (1 before the fix)."""
    trainer = Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}", "train.steps=2",
                                         "train.num_iterations=2", "model.reference=ema", "model.ema_every=2",
                                         "model.lora.enabled=true", "model.lora.r=4"]))  # fmt: skip
    trainer.train()
    assert trainer.reference.ema.num_updates == 2


def test_dynamic_sampling_filters_on_accuracy_by_default(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY, "filter.enabled=true"])
    assert cfg.filter.metric == "accuracy"
    trainer = Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}", "filter.enabled=true",
                                         "filter.max_gen_batches=2", "train.steps=1"]))  # fmt: skip
    added = []
    import fastgrpo.trainer as trainer_mod

    class Spy(trainer_mod.DynamicSamplingBuffer):
        def add(self, metric, group_size, **kw):
            added.append(metric.clone())
            return super().add(metric, group_size, **kw)

    monkeypatch.setattr(trainer_mod, "DynamicSamplingBuffer", Spy)
    trainer.train()
    assert added and all(set(m.tolist()) <= {0.0, 1.0} for m in added)  # accuracy, not format + 0.5 accuracy
    no_acc = [
        *TINY[:-1],
        "rewards=[{name: format, params: {pattern: '.*[0-9].*'}}]",
        f"train.output_dir={tmp_path}",
    ]
    with pytest.raises(ConfigError, match=r"filter\.metric: 'accuracy' is neither 'reward' nor one of"):
        Trainer(load_config(None, [*no_acc, "filter.enabled=true"]))


def test_only_the_main_process_prints_the_summary(monkeypatch, capsys, tmp_path):
    import fastgrpo.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "train", lambda cfg, resume=None: RunResult(
        tmp_path, [], {"first": float("nan"), "last": float("nan"), "gain": float("nan"), "window": 0},
        is_main=False))  # fmt: skip
    assert cli_main(["train", "--tiny"]) == 0
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------------------------
# the warm-up guard (issue 21): no learning signal is said once, with its cause


def test_learning_signal_guard_scripted(caplog):
    from fastgrpo.observability import LearningSignalGuard

    def run(rows):
        guard = LearningSignalGuard(3)
        return [guard.update(r) for r in rows]

    flat = [{"zero_std_groups": 1.0, "answer_rate": 0.5}] * 4
    out = run(flat)
    assert (
        out[:2] == [None, None]
        and "same reward" in out[2]
        and "rollout.group_size" in out[2]
        and out[3] is None
    )
    no_answers = [{"zero_std_groups": 1.0, "answer_rate": 0.01}] * 3
    assert "hold an answer" in run(no_answers)[2] and "worked example" in run(no_answers)[2]
    spread = [{"zero_std_groups": 0.5, "answer_rate": 0.6}] * 3
    assert run(spread) == [None, None, None]
    assert LearningSignalGuard(0).update(flat[0]) is None  # off


def test_learning_signal_guard_in_a_run(tmp_path, caplog):
    """A reward that is the same for every completion: the trainer warns after signal_check_steps steps."""
    import logging

    from fastgrpo.rewards import register_reward

    register_reward("constant_for_guard_test", lambda text, ex: 1.0)
    cfg = load_config(None, [*TINY[:-1], "rewards=[{name: constant_for_guard_test}]", f"train.output_dir={tmp_path}",
                             "train.steps=2", "train.signal_check_steps=2"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fastgrpo.observability"):
        res = Trainer(cfg).train()
    assert all(r["zero_std_groups"] == 1.0 for r in res.metrics)
    assert caplog.text.count("no learning signal") == 1

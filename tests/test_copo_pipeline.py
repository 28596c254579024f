"""COPO in the advantage pipeline: its inputs (the accuracy term), running statistics of the global reward, the
pipeline's per-step signal metrics, and the pipeline state across a checkpoint/resume."""

from __future__ import annotations

import logging
import math
import os
import signal
import statistics

import pytest
import torch

from fastgrpo.advantages import group_advantages_ref, group_index
from fastgrpo.config import ConfigError, load_config
from fastgrpo.rewards.copo import PromptRewardWindow, copo_advantages
from fastgrpo.rewards.shaping import AdvantagePipeline, Advantages, CopoBlend, RolloutGroups
from fastgrpo.trainer import Trainer

TWO_TERMS = "rewards=[{name: format, weight: 0.5}, {name: accuracy, weight: 1.0}]"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons need a fixed reduction order (tests/test_trainer.py)
    yield
    torch.set_num_threads(before)


def _groups(texts, terms, group_size):
    B = len(texts)
    return RolloutGroups(example=list(range(B)), examples=[None] * B, prompt_ids=[[1]] * B,
                         completion_ids=[[1, 2]] * B, texts=list(texts), truncated=torch.zeros(B, dtype=torch.bool),
                         terms={k: torch.tensor(v, dtype=torch.float32) for k, v in terms.items()},
                         group_size=group_size)  # fmt: skip


def _pipeline(*overrides):
    cfg = load_config(None, [TWO_TERMS, *overrides])
    return AdvantagePipeline.from_config(cfg.advantage, tokenizer=None)


def _total(terms):
    return 0.5 * torch.tensor(terms["format"]) + torch.tensor(terms["accuracy"])


# Two prompts, four completions each. Prompt 0: one right answer "4", one well-formatted wrong "5", two
# unformatted wrong; prompt 1: all wrong, one formatted.
TEXTS = ["<answer>4</answer>", "<answer>5</answer>", "5", "6"] + ["<answer>1</answer>", "2", "3", "3"]
TERMS = {"format": [1.0, 1, 0, 0, 1, 0, 0, 0], "accuracy": [1.0, 0, 0, 0, 0, 0, 0, 0]}


def test_copo_global_reward_and_gate_read_the_accuracy_term():
    """Issue 13.8: the global reward and the soft-with-zero gate are the paper's, on the binary accuracy term;
    the weighted total (format terms included) feeds only the local advantage."""
    groups = _groups(TEXTS, TERMS, 4)
    total = _total(TERMS)
    adv = _pipeline("advantage.copo.enabled=true", "advantage.params={eps: 1.0e-6}")(groups, total)
    # global: R = mean accuracy per prompt = [1/4, 0]; over 2 prompts (R - 1/8) / std_u = +-1/sqrt(2)
    s = 1 / 2**0.5
    torch.testing.assert_close(adv.values, torch.tensor([s] * 4 + [-s] * 4), atol=1e-5, rtol=0)
    # gate: only the right answer (accuracy 1) keeps a local weight; the formatted wrong answers (total 0.5,
    # which the weighted total would have counted as "not wrong") get 0
    assert adv.blend[0] > 0 and adv.blend[1:].tolist() == [0.0] * 7
    # local: GRPO on the total reward (format included), eps 1e-6
    index, G = group_index(8, 4)
    torch.testing.assert_close(adv.local, group_advantages_ref(total, index, G, eps=1e-6))
    assert adv.local[4] > 0  # prompt 1's formatted wrong answer is above its group's mean total reward
    # the same as the paper's formulas on the accuracy term alone, for the global side
    paper = copo_advantages(torch.tensor(TERMS["accuracy"]), [None] * 8, 4)
    torch.testing.assert_close(adv.values, paper.global_advantages)
    # a third prompt, all wrong and all formatted: R(accuracy) = [1/4, 0, 0] standardises to [2, -1, -1]/sqrt(3)
    # (R of the total, [1/2, 1/8, 1/2], would give prompt 2 a positive global advantage)
    terms3 = {k: v + [float(k == "format")] * 4 for k, v in TERMS.items()}
    adv3 = _pipeline("advantage.copo.enabled=true")(_groups(TEXTS + TEXTS[4:], terms3, 4), _total(terms3))
    want = torch.tensor([2.0] * 4 + [-1.0] * 8) / 3**0.5
    torch.testing.assert_close(adv3.values, want, atol=1e-5, rtol=0)


def test_copo_reward_term_is_configurable_and_checked():
    groups = _groups(TEXTS, TERMS, 4)
    adv = _pipeline("advantage.copo.enabled=true", "advantage.copo.reward_term=format")(groups, _total(TERMS))
    # R = mean format per prompt = [1/2, 1/4]: prompt 0 above, prompt 1 below
    assert adv.values[0] > 0 > adv.values[4]
    with pytest.raises(ConfigError, match="advantage.copo.reward_term.*'correct'"):
        load_config(None, [TWO_TERMS, "advantage.copo.enabled=true", "advantage.copo.reward_term=correct"])
    # built directly, without a config: the same error at the first call
    stage = CopoBlend(lambda *a, **k: None, reward_term="correct")
    with pytest.raises(ConfigError, match="advantage.copo.reward_term"):
        stage.shape_advantages(groups, Advantages(torch.zeros(8), torch.zeros(8)))
    with pytest.raises(ConfigError, match="advantage.copo.stats_window"):
        load_config(None, ["advantage.copo.stats_window=0"])
    with pytest.raises(ConfigError, match="advantage.copo.global_stats"):
        load_config(None, ["advantage.copo.global_stats=ema"])


def test_running_statistics_equal_a_hand_computation():
    """A scripted sequence of batches (2 prompts x 3 completions, window 5 prompts): each step's global advantage
    is (R_g - mean) / (std_u + eps) over the window's prompts and this step's, the window then takes this
    step's R and keeps the newest 5."""
    pipe = _pipeline("advantage.copo.enabled=true", "advantage.copo.global_stats=running",
                     "advantage.copo.stats_window=5")  # fmt: skip
    accuracy = [
        [1, 1, 1, 0, 0, 0],  # R = [1, 0]
        [1, 0, 0, 1, 1, 0],  # R = [1/3, 2/3]
        [0, 0, 0, 0, 0, 0],  # R = [0, 0]: zero spread in the batch, not in the window
        [1, 1, 0, 1, 1, 1],  # R = [2/3, 1]
        [0, 1, 0, 0, 0, 1],  # R = [1/3, 1/3]
    ]
    seen: list[float] = []
    for step, acc in enumerate(accuracy):
        terms = {"format": [0.0] * 6, "accuracy": [float(a) for a in acc]}
        adv = pipe(_groups(["<answer>1</answer>"] * 6, terms, 3), _total(terms))
        R = [sum(acc[:3]) / 3, sum(acc[3:]) / 3]
        pool = seen[-5:] + R
        mean, std = statistics.fmean(pool), statistics.stdev(pool)
        want = torch.tensor([(r - mean) / (std + 1e-6) for r in R for _ in range(3)], dtype=torch.float32)
        torch.testing.assert_close(adv.values, want, atol=2e-6, rtol=1e-6, msg=f"step {step}")
        assert adv.metrics["copo/stats_prompts"] == len(pool)
        if step == 2:  # no spread in the batch: the paper's statistics give 0, the window negative values
            assert bool((adv.values < 0).all())
        seen += R
        window = pipe.stages[0].window.values.double()
        torch.testing.assert_close(window, torch.tensor(seen[-5:], dtype=torch.float64), atol=1e-7, rtol=0)


def test_running_first_step_is_the_paper_formula_and_batch_mode_keeps_no_state():
    groups, total = _groups(TEXTS, TERMS, 4), _total(TERMS)
    batch = _pipeline("advantage.copo.enabled=true")
    running = _pipeline("advantage.copo.enabled=true", "advantage.copo.global_stats=running")
    a, b = batch(groups, total), running(groups, total)
    for x, y in ((a.values, b.values), (a.local, b.local), (a.blend, b.blend)):
        assert torch.equal(x, y)
    assert batch.state_dict() == {}
    assert list(running.state_dict()) == ["0.CopoBlend"]


def test_prompt_reward_window_state_and_bad_input():
    w = PromptRewardWindow(3)
    w.update(torch.tensor([0.25, 0.5]))
    w.update(torch.tensor([1.0, 0.0]))
    assert w.values.tolist() == [0.5, 1.0, 0.0]
    other = PromptRewardWindow(3)
    other.load_state_dict(w.state_dict())
    assert torch.equal(other.values, w.values)
    with pytest.raises(ValueError, match="size"):
        PromptRewardWindow(0)
    with pytest.raises(ValueError, match="history.*finite"):
        copo_advantages(torch.ones(4), ["1"] * 4, 2, history=torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="accuracy must have shape"):
        copo_advantages(torch.ones(4), ["1"] * 4, 2, accuracy=torch.ones(3))


def test_pipeline_state_must_match_its_stages():
    running = _pipeline("advantage.copo.enabled=true", "advantage.copo.global_stats=running")
    with pytest.raises(ValueError, match="stateful stages"):
        running.load_state_dict({})
    with pytest.raises(ValueError, match="stateful stages"):
        _pipeline().load_state_dict(running.state_dict())
    _pipeline().load_state_dict({})


def test_few_prompts_warning_once_in_batch_mode_only(caplog):
    groups, total = _groups(TEXTS, TERMS, 4), _total(TERMS)
    batch = _pipeline("advantage.copo.enabled=true")
    with caplog.at_level(logging.WARNING, logger="fastgrpo.rewards.shaping"):
        batch(groups, total)
        batch(groups, total)
    hits = [r.getMessage() for r in caplog.records if "COPO standardises" in r.getMessage()]
    assert len(hits) == 1 and "over the 2 prompts" in hits[0] and "global_stats=running" in hits[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastgrpo.rewards.shaping"):
        _pipeline("advantage.copo.enabled=true", "advantage.copo.global_stats=running")(groups, total)
    assert not [r for r in caplog.records if "COPO standardises" in r.getMessage()]


def test_signal_metrics_on_a_scripted_batch():
    groups, total = _groups(TEXTS, TERMS, 4), _total(TERMS)
    # GRPO on total = [1.5, .5, 0, 0 | .5, 0, 0, 0]: prompt 0 deviations [1, 0, -.5, -.5] (sample 1 gets 0),
    # prompt 1 [.375, -.125 x3]. Wrong: samples 1..7; positive among them: sample 4 only.
    m = _pipeline()(groups, total).metrics
    assert m["adv/nonzero"] == 7 / 8
    assert m["adv/wrong_positive"] == pytest.approx(1 / 7)
    # COPO (paper): every wrong answer of prompt 0 (R above the batch mean) is pushed up by the global term alone
    m = _pipeline("advantage.copo.enabled=true")(groups, total).metrics
    assert m["adv/nonzero"] == 1.0
    assert m["adv/wrong_positive"] == pytest.approx(3 / 7)
    # no wrong completion: 0
    right = {"format": [1.0] * 8, "accuracy": [1.0] * 8}
    assert _pipeline()(_groups(TEXTS, right, 4), _total(right)).metrics["adv/wrong_positive"] == 0.0


def test_per_sample_advantage_definitions():
    blend = Advantages(values=torch.tensor([1.0, -1.0, 0.0]), rewards=torch.zeros(3),
                       local=torch.tensor([-1.0, 2.0, 0.0]), blend=torch.tensor([0.25, 0.5, 1.0]))  # fmt: skip
    net, nonzero = blend.per_sample()
    torch.testing.assert_close(net, torch.tensor([0.5, 0.5, 0.0]))
    assert nonzero.tolist() == [True, True, False]
    tokens = Advantages(values=torch.zeros(3), rewards=torch.zeros(3),
                        per_token=[torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.5]), torch.zeros(0)])  # fmt: skip
    net, nonzero = tokens.per_sample()
    torch.testing.assert_close(net, torch.tensor([0.0, 0.25, 0.0]))
    assert nonzero.tolist() == [True, True, False]  # cancelling token advantages still train their tokens


def test_running_statistics_survive_checkpoint_resume(tmp_path):
    """Interrupted with SIGTERM after step 3 of 6 and resumed: the parameters, every metric and COPO's window
    equal an uninterrupted run's bit for bit."""
    base = ["model.name=tiny", "train.progress=false", "train.plot=false", "task.num_train=16", "task.num_eval=4",
            "rollout.max_new_tokens=8", "rollout.group_size=4", "rollout.prompts_per_step=2", "train.steps=6",
            "optim.lr=5e-3", "loss.loss_type=grpo", f"train.output_dir={tmp_path}",
            "rewards=[{name: format, weight: 1.0, params: {pattern: '.*[0-9].*'}}]",
            "advantage.copo.enabled=true", "advantage.copo.reward_term=format",
            "advantage.copo.global_stats=running", "advantage.copo.stats_window=5"]  # fmt: skip
    straight = Trainer(load_config(None, [*base, "train.run_name=straight"]))
    res_a = straight.train()

    def interrupt(trainer, metrics):
        if metrics["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler finishes the step, checkpoints, stops

    first = Trainer(load_config(None, [*base, "train.run_name=split"]), callbacks=[interrupt])
    assert first.train().stopped_early and first.step == 3
    second = Trainer(load_config(None, [*base, "train.run_name=ignored"]), resume=tmp_path / "split")
    assert second.step == 3
    assert torch.equal(second.advantages.stages[0].window.values, first.advantages.stages[0].window.values)
    res_b = second.train()

    for (name, a), (_, b) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name
    keep = lambda rows: [
        {k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "peak_mem"))} for r in rows
    ]
    assert keep(res_a.metrics) == keep(res_b.metrics)  # the resumed run's log holds steps 1-6
    wa, wb = straight.advantages.stages[0].window.values, second.advantages.stages[0].window.values
    assert torch.equal(wa, wb) and wa.numel() == 5
    assert float(wa.std()) > 0 and not math.isnan(float(wa.std()))  # the window really held varying rewards
    assert any(r["grad_norm"] > 0 for r in res_a.metrics)

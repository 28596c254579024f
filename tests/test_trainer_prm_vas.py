"""GroundedPRM and MMR1 in the trainer on the tiny model: grounded process advantages, PRM search evaluation, the
variance-aware sampler fed by the training rollouts (estimates, re-scoring budget, metrics, exact resume), and
switching ``sampler.kind`` from a config."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import DIGIT_REWARD, TINY_TRAINING

from fastgrpo.cli import main as cli_main
from fastgrpo.config import ConfigError, load_config
from fastgrpo.rewards.shaping import Advantages, ProcessAdvantages, RolloutGroups, token_pieces
from fastgrpo.trainer import Trainer, evaluate_run

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise-exact comparisons need a fixed reduction order
TINY = [*TINY_TRAINING, "task.num_train=8"]
# DIGIT_REWARD is the only term, so it is the accuracy term: on the untrained tiny model about half the samples hold
# a digit, so groups have outcome variance
VAS = ["sampler.kind=mmr1", "sampler.params={update_every: 2, rescore_budget: 3}", "sampler.refresh_generations=2",
       "sampler.vps={alpha: 1.0, beta: 0.0}", DIGIT_REWARD]  # fmt: skip


def _cfg(tmp_path, *overrides):
    return load_config(None, [*TINY, f"train.output_dir={tmp_path}", *overrides])


# ------------------------------------------------------------------------------------------------ config


def test_changing_sampler_kind_drops_the_old_kinds_params():
    mmr1 = ROOT / "configs" / "mmr1.yaml"
    assert load_config(mmr1).sampler.params  # the config's own VAS parameters
    cfg = load_config(mmr1, ["sampler.kind=random"])
    assert cfg.sampler.kind == "random" and cfg.sampler.params == {}
    cfg = load_config(mmr1, ["sampler.kind=random", "sampler.params={seed: 3}"])
    assert cfg.sampler.params == {"seed": 3}
    # a config written with the params of another kind says which kind they belong to
    with pytest.raises(
        ConfigError, match=r"sampler\.params: .*parameters of sampler\.kind=mmr1.*sampler\.params=\{\}"
    ):
        load_config(None, ["sampler.params={update_every: 3}"])


def test_prm_search_config_is_validated():
    with pytest.raises(ConfigError, match=r"advantage\.prm\.search: .*num_candidate"):
        load_config(None, ["advantage.prm.search={num_candidate: 4}"])
    with pytest.raises(ConfigError, match=r"advantage\.prm\.step_sep"):
        load_config(None, ["advantage.prm.step_sep="])
    with pytest.raises(ConfigError, match=r"advantage\.prm\.max_step_tokens"):
        load_config(None, ["advantage.prm.max_step_tokens=0"])


# ------------------------------------------------------------------------------------------------ PRM


def test_process_advantages_reward_grounded_steps_only(tmp_path):
    """Two answers that differ only in a true line: computing what the question asks (grounded) or not."""
    trainer = Trainer(_cfg(tmp_path, "task.name=arithmetic", "advantage.prm.enabled=true"), write_run=False)
    (stage,) = [s for s in trainer.advantages.stages if isinstance(s, ProcessAdvantages)]
    tok = trainer.tokenizer
    ex = dataclasses.replace(
        trainer.train_set[0], messages=[{"role": "user", "content": "Compute 8 + 1 + 1."}]
    )
    texts = ["8 + 1 = 9\n9 + 1 = 10\n<answer>10</answer>", "8 + 1 = 9\n9 * 1 = 9\n<answer>9</answer>"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    groups = RolloutGroups(example=[0, 0], examples=[ex, ex], prompt_ids=[[1], [1]], completion_ids=ids,
                           texts=texts, truncated=torch.zeros(2, dtype=torch.bool), terms={}, group_size=2)  # fmt: skip
    adv = stage.shape_advantages(groups, Advantages(torch.zeros(2), torch.zeros(2)))
    steps = [stage.token_steps(p) for p in token_pieces(tok, ids)]
    line = lambda b, j: [a for a, s in zip(adv.per_token[b].tolist(), steps[b]) if s == j]  # noqa: E731
    # checks [1, 1, 1] and [1, 0, 0]: the grounded line and the right answer beat the true-but-ungrounded ones
    assert min(line(0, 1)) > max(line(1, 1)) and min(line(0, 2)) > max(line(1, 2))
    assert line(0, 0) == line(1, 0)
    assert adv.metrics["prm/step_score"] == pytest.approx(4 / 6) and adv.metrics["prm/bad_steps"] == 0
    groups.examples = [ex, None]
    with pytest.raises(ValueError, match=r"groups\.examples\[1\]"):
        stage.shape_advantages(groups, Advantages(torch.zeros(2), torch.zeros(2)))


def test_eval_search_prm_cli(tmp_path, capsys):
    args = ["eval", "--tiny", "--config", str(ROOT / "configs" / "prm.yaml"), "--num", "2", "--search", "prm",
            "--set", "advantage.prm.search={max_iter: 3, num_candidates: 2}", "--set", "advantage.prm.max_step_tokens=6",
            "--set", "model.lora.enabled=false", "--set", "train.progress=false"]  # fmt: skip
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"eval/accuracy", "eval/answered", "eval/model_calls", "eval/tokens", "eval/seconds"} <= set(out)
    # at most 3 proposals of 2 candidates x 6 tokens per problem
    assert 1 <= out["eval/model_calls"] <= 3 and out["eval/tokens"] <= 3 * 2 * 6
    with pytest.raises(ConfigError, match="--search"):
        evaluate_run(load_config(None, TINY), search="beam")


# ------------------------------------------------------------------------------------------------ MMR1


def test_vas_learns_from_training_rollouts_on_a_budget(tmp_path):
    seen = []

    def record(trainer, metrics):
        b = trainer._last_batch
        seen.append(
            (b.example[::4], b.terms["format"].view(-1, 4).clone(), trainer.stream.sampler.estimates, metrics)
        )

    trainer = Trainer(_cfg(tmp_path, *VAS, "train.steps=4", "train.run_name=vas"), callbacks=[record])
    trainer.train()
    for step, (idx, acc, est, metrics) in enumerate(seen, 1):
        # each trained prompt's estimate is the outcome variance p(1 - p) of its group's accuracy (alpha 1, beta 0)
        p = acc.double().mean(1)
        last = {i: k for k, i in enumerate(idx)}  # a prompt drawn twice: its last group
        for i, k in last.items():
            assert float(est[i]) == pytest.approx(float(p[k] * (1 - p[k])))
        zero = float((acc.max(1).values == acc.min(1).values).double().mean())
        assert metrics["vas/zero_var_groups"] == zero
        # re-scoring before batches 0 and 2 (update_every 2), at most 3 prompts each
        assert metrics["vas/rescored"] == (3 if step in (1, 3) else 0)
        assert (metrics["time/vas_rescore"] > 0) == (step in (1, 3))
    assert 0 < seen[-1][3]["vas/known"] <= 1


def test_vas_resume_is_exact(tmp_path):
    base = [*VAS, "train.steps=4"]
    straight = Trainer(_cfg(tmp_path, *base, "train.run_name=straight"))
    res_a = straight.train()

    def interrupt(trainer, metrics):
        if metrics["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # finishes the step, checkpoints, stops

    first = Trainer(_cfg(tmp_path, *base, "train.run_name=split"), callbacks=[interrupt])
    first.train()
    assert first.step == 2
    second = Trainer(_cfg(tmp_path, *base, "train.run_name=ignored"), resume=tmp_path / "split")
    res_b = second.train()
    drop = ("time/", "tokens_per_s", "peak_mem_mb")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]  # noqa: E731
    assert second.step == 4 and strip(res_a.metrics) == strip(
        res_b.metrics
    )  # the run's log holds all 4 steps
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
    sa, sb = straight.stream.sampler.state_dict(), second.stream.sampler.state_dict()
    assert torch.equal(sa["estimates"].nan_to_num(-1), sb["estimates"].nan_to_num(-1))
    assert torch.equal(sa["made"], sb["made"]) and sa["step"] == sb["step"]

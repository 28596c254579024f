"""The trainer on the tiny model: every shipped config, exact resume, gradient accumulation weights, 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DIGIT_REWARD, TINY_RUN

from fastgrpo.cli import main as cli_main
from fastgrpo.config import load_config
from fastgrpo.observability import read_metrics
from fastgrpo.trainer import Trainer, register_reward, train

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# the compare task's prompts are ~70 tokens: with this limit, small token budgets still hold a whole group
SHORT_PROMPTS = "rollout.max_prompt_tokens=80"
TINY = TINY_RUN
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, *overrides):
    return load_config(None, [*TINY, f"train.output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs_two_steps_tiny(path, tmp_path):
    rc = cli_main(["train", "--config", str(path), "--tiny", *sum((["--set", s] for s in TINY[1:]), []),
                   "--set", "train.steps=2", "--set", f"train.output_dir={tmp_path}", "--set", "train.run_name=r",
                   "--set", "sampler.refresh_generations=2", "--set", "filter.max_gen_batches=2",
                   "--set", "rollout.group_size=4"])  # fmt: skip
    assert rc == 0
    rows = [r for r in read_metrics(tmp_path / "r") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in (
            "reward",
            "loss",
            "entropy",
            "clip_frac",
            "tokens_per_s",
            "time/generation",
            "time/policy",
        ):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
        assert (r["kl"] is None) == (
            load_config(path).loss.beta == 0
        )  # KL is reported when it is in the loss
    assert (tmp_path / "r" / "checkpoints" / "step-000002" / "model.safetensors").is_file()


def _non_time(rows):
    drop = ("time/", "tokens_per_s", "peak_mem_mb")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


@pytest.mark.parametrize(
    "extra",
    [
        # full fine-tuning, frozen reference with KL, two updates per batch (old log-probs), dapo normaliser
        ["loss.beta=0.05", "train.num_iterations=2", "loss.loss_type=dapo", "loss.eps_high=0.28"],
        # LoRA, GRPO-CARE with an EMA reference updated every 2 steps, cosine schedule, grpo aggregation
        [
            "model.lora.enabled=true",
            "model.lora.r=4",
            "advantage.care.enabled=true",
            "model.ema_every=2",
            "advantage.care.accuracy_term=format",
            "optim.scheduler=cosine",
            "loss.loss_type=grpo",
        ],
    ],
    ids=["full-kl-iter2", "lora-care-ema"],
)
def test_resume_is_exact(tmp_path, extra):
    base = [DIGIT_REWARD, "train.steps=6", "optim.lr=5e-3", "rollout.group_size=4", "rollout.prompts_per_step=2",
            *extra]  # fmt: skip
    straight = Trainer(_cfg(tmp_path, *base, "train.run_name=straight"))
    res_a = straight.train()

    def interrupt(trainer, metrics):
        if metrics["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler finishes the step, checkpoints, stops

    first = Trainer(_cfg(tmp_path, *base, "train.run_name=split"), callbacks=[interrupt])
    res_b1 = first.train()
    assert res_b1.stopped_early and first.step == 3
    run = tmp_path / "split"
    assert (run / "checkpoints" / "step-000003").is_dir()
    second = Trainer(_cfg(tmp_path, *base, "train.run_name=ignored"), resume=run)
    assert second.step == 3
    res_b2 = second.train()

    pa, pb = dict(straight.model.named_parameters()), dict(second.model.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), (
            name,
            (pa[name] - pb[name]).abs().max().item(),
            [n for n in pa if not torch.equal(pa[n], pb[n])],
        )
    assert _non_time(res_a.metrics) == _non_time(res_b2.metrics)
    assert any(r["grad_norm"] > 0 for r in res_a.metrics)  # the test exercises real updates
    if straight.reference.mode == "ema":
        assert straight.reference.ema.num_updates == 3
        for k, v in straight.reference.ema.shadow.items():
            assert torch.equal(v, second.reference.ema.shadow[k]), k


def _capture_grads(trainer):
    """Record the accumulated gradients right before each optimizer step."""
    grads = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return grads


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared-prompt"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(tmp_path, loss_type, shared):
    """Token-budget micro-batches (of unequal sizes; optionally shared-prompt rows) accumulate the gradient of
    one big plain micro-batch."""
    common = [DIGIT_REWARD, SHORT_PROMPTS, "train.steps=1", "optim.grad_clip=0", f"loss.loss_type={loss_type}",
              "rollout.group_size=4", "rollout.prompts_per_step=3", "loss.beta=0.1"]  # fmt: skip
    one = Trainer(
        _cfg(tmp_path, *common, "train.token_budget=4096", "train.shared_prompt=false", "train.run_name=one")
    )
    g_one = _capture_grads(one)
    one.train()
    budget = 140 if shared else 100  # a shared-prompt item is a whole group: P + 4 completions
    many = Trainer(_cfg(tmp_path, *common, f"train.token_budget={budget}", f"train.shared_prompt={shared}",
                        "train.run_name=many"))  # fmt: skip
    g_many = _capture_grads(many)
    many.train()
    assert one._last_batch.completion_ids == many._last_batch.completion_ids  # the same rollouts
    assert g_one.keys() == g_many.keys() and g_one
    for name, g in g_one.items():
        scale = float(g.abs().max()) + 1e-12
        torch.testing.assert_close(
            g_many[name], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}"
        )
    assert any(float(g.abs().max()) > 0 for g in g_one.values())
    ra, rb = read_metrics(tmp_path / "one")[-1], read_metrics(tmp_path / "many")[-1]
    assert ra["reward"] == rb["reward"]
    assert math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("shared, budget", [(False, 100), (True, 140)])
def test_micro_batches_are_really_split(tmp_path, shared, budget):
    trainer = Trainer(_cfg(tmp_path, SHORT_PROMPTS, "train.steps=1", "rollout.group_size=4", "rollout.prompts_per_step=3",
                           f"train.token_budget={budget}", f"train.shared_prompt={shared}", "train.run_name=split"))  # fmt: skip
    seen = []
    orig = trainer.policy.forward
    trainer.policy.forward = lambda batch, *loss: (seen.append(batch.num_sequences), orig(batch, *loss))[1]
    trainer.train()
    assert len(seen) > 1 and sum(seen) == 12


def test_dynamic_sampling_and_custom_reward(tmp_path):
    calls = []

    def first_char_is_digit(text, example):
        calls.append(example.answer)
        return float(text[:1].isdigit())

    register_reward("first_digit", first_char_is_digit)
    res = train(_cfg(tmp_path, "rewards=[{name: first_digit}]", "filter.enabled=true", "filter.metric=reward", "filter.max_gen_batches=3",
                     "rollout.prompts_per_step=2", "rollout.group_size=4", "train.steps=2", "train.run_name=f"))  # fmt: skip
    assert calls and all(r["filter/gen_rounds"] >= 1 for r in res.metrics)
    assert all(0 <= r["zero_std_groups"] <= 1 for r in res.metrics)


def test_eval_and_plot_and_summary(tmp_path):
    res = train(_cfg(tmp_path, "train.steps=2", "train.eval_prompts=4", "train.eval_every=2", "train.plot=true",
                     "train.run_name=e", "train.log_completions=2"))  # fmt: skip
    rows = read_metrics(tmp_path / "e")
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert res.plot is not None and res.plot.stat().st_size > 1000
    assert "mean reward first" in res.summary_line()
    assert len((tmp_path / "e" / "completions.jsonl").read_text().splitlines()) == 4
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["steps"] == 2


_DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from fastgrpo.config import load_config
    from fastgrpo.trainer import Trainer

    out = sys.argv[1]
    cfg = load_config(None, sys.argv[2:])
    seen = []
    orig = Trainer._accumulate

    def spy(self, update):
        mbs = update.micro_batches
        seen.append({"num_items": update.num_items, "local": sum(mb.num_loss_tokens for mb in mbs),
                     "n_mb": len(mbs), "empty": sum(mb.is_padding for mb in mbs)})
        return orig(self, update)

    Trainer._accumulate = spy
    t = Trainer(cfg)
    t.train()
    flat = torch.cat([p.detach().flatten() for p in t.model.parameters()])
    rec = {"rank": t.rank, "world": t.world, "sha": hashlib.sha1(flat.numpy().tobytes()).hexdigest(), "seen": seen}
    with open(os.path.join(out, f"rank{t.rank}.json"), "w") as f:
        json.dump(rec, f)
    """
)


def _accelerate() -> str:
    exe = Path(sys.executable).parent / "accelerate"
    return str(exe) if exe.is_file() else shutil.which("accelerate") or "accelerate"


def test_two_process_accelerate_cpu(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    overrides = [*TINY, DIGIT_REWARD, SHORT_PROMPTS, "train.steps=2", "rollout.group_size=4", "rollout.prompts_per_step=3",
                 "rollout.max_new_tokens=12", "loss.loss_type=dapo", "train.token_budget=160", "optim.lr=1e-2",
                 f"train.output_dir={tmp_path}", "train.run_name=ddp"]  # fmt: skip
    cmd = [_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path), *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["sha"] == r1["sha"]  # parameters identical across ranks after two steps
    for s0, s1 in zip(r0["seen"], r1["seen"]):
        # the dapo normaliser is the token count of the GLOBAL batch, the sum of both ranks' tokens
        assert s0["num_items"] == s1["num_items"] == s0["local"] + s1["local"]
        assert 0 < s0["local"] < s0["num_items"] and s0["n_mb"] == s1["n_mb"]
    # 3 prompt groups over 2 ranks, one group per micro-batch: a rank runs a zero-weight step for balance
    assert sum(s["empty"] for s in r0["seen"] + r1["seen"]) > 0
    rows = [r for r in read_metrics(tmp_path / "ddp") if "reward" in r]
    assert [r["num_items_in_batch"] for r in rows] == [s["num_items"] for s in r0["seen"]]


def test_world_size_guard(monkeypatch, tmp_path):
    import types

    import accelerate

    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher said 2 processes, but this one is alone
    # accelerate's own state would try to join a process group here: a stand-in that runs alone
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: types.SimpleNamespace(num_processes=1))
    with pytest.raises(RuntimeError, match="accelerate runs 1"):
        Trainer(_cfg(tmp_path, "train.steps=1"))


def test_fewer_prompts_than_processes_is_refused_before_model_work(monkeypatch, tmp_path):
    """Each process generates its share of a step's prompts: fewer prompts than processes is a config error."""
    import types

    import fastgrpo.models
    import fastgrpo.trainer as trainer_mod

    fake = types.SimpleNamespace(process_index=0, num_processes=2, device=torch.device("cpu"))
    monkeypatch.setattr(trainer_mod, "make_accelerator", lambda cfg: fake)
    monkeypatch.setattr(fastgrpo.models, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(
        ValueError, match=r"rollout.prompts_per_step: 1 prompts cannot be shared by 2 processes"
    ):
        Trainer(_cfg(tmp_path, "rollout.prompts_per_step=1"))


def test_speed_and_memory_switches(tmp_path):
    """Gradient checkpointing, bitsandbytes 8-bit AdamW and an int8 reference run together on CPU."""
    pytest.importorskip("bitsandbytes")
    res = train(_cfg(tmp_path, DIGIT_REWARD, "train.steps=2", "rollout.group_size=4", "model.gradient_checkpointing=true",
                     "optim.name=adamw8bit", "model.reference=int8", "loss.beta=0.1", "train.run_name=sw"))  # fmt: skip
    assert all(r["kl"] >= 0 and math.isfinite(r["loss"]) for r in res.metrics)
    assert any(r["grad_norm"] > 0 for r in res.metrics)


def test_lora_uses_adapter_off_reference(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "model.lora.enabled=true", "model.lora.r=4", "loss.beta=0.1", "train.steps=1",
                           "train.run_name=lora"))  # fmt: skip
    assert trainer.reference.mode == "adapter-off" and trainer.reference.memory_bytes() == 0
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "lora" / "checkpoints" / "step-000001" / "model.safetensors"))
    assert sorted(saved) == sorted(trainable)  # the checkpoint holds the adapter only


def test_prm_step_advantages_follow_the_checked_steps(tmp_path):
    """Each line of an arithmetic answer is checked against its question; a wrong step's tokens get a lower
    advantage."""
    import dataclasses

    from fastgrpo.rewards.shaping import Advantages, ProcessAdvantages, RolloutGroups, token_pieces

    trainer = Trainer(_cfg(tmp_path, "task.name=arithmetic", "advantage.prm.enabled=true", "train.steps=1",
                           "train.run_name=prm"), write_run=False)  # fmt: skip
    (stage,) = [s for s in trainer.advantages.stages if isinstance(s, ProcessAdvantages)]
    tok = trainer.tokenizer
    texts = ["2 + 3 = 5\n5 * 4 = 20\n<answer>20</answer>", "2 + 3 = 5\n5 * 4 = 21\n<answer>21</answer>"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ex = trainer.train_set[0]
    ex = dataclasses.replace(ex, messages=[{"role": "user", "content": "Compute (2 + 3) * 4."}])
    groups = RolloutGroups(example=[0, 0], examples=[ex, ex], prompt_ids=[[1], [1]], completion_ids=ids,
                           texts=texts, truncated=torch.zeros(2, dtype=torch.bool), terms={}, group_size=2)  # fmt: skip
    adv = stage.shape_advantages(groups, Advantages(torch.zeros(2), torch.zeros(2))).per_token
    steps = [stage.token_steps(p) for p in token_pieces(tok, ids)]
    assert [len(a) for a in adv] == [len(i) for i in ids]
    first_ok = [a for a, s in zip(adv[0].tolist(), steps[0]) if s == 1]  # "5 * 4 = 20": right
    first_bad = [a for a, s in zip(adv[1].tolist(), steps[1]) if s == 1]  # "5 * 4 = 21": wrong
    assert min(first_ok) > 0 > max(first_bad)
    same = [a for a, s in zip(adv[0].tolist(), steps[0]) if s == 0]  # "2 + 3 = 5" in both
    assert same == [a for a, s in zip(adv[1].tolist(), steps[1]) if s == 0]

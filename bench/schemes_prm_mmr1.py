"""Issue 18's measurements on SmolLM2-135M-Instruct (offline), CPU: GroundedPRM search and MMR1 sampling.

Part ``search``: on the built-in arithmetic task (2 operations, held-out problems of ``configs/prm.yaml``'s task
split), accuracy, proposer/model calls, generated tokens and seconds per problem of

- greedy decoding (one call per problem, 48 new tokens, stopping at the end of the turn);
- one sample at the search's temperature (0.7) and at the training temperature (1.0);
- PRM-guided greedy search with the grounded checker (``configs/prm.yaml``'s search settings);
- the same search with the truth-only checker (``grounded=False``: the checker before issue 18).

Part ``mmr1``: ``configs/mmr1.yaml`` against the same config with uniform sampling (``sampler.kind=random``) over
several seeds: wall time, share of zero-variance groups (on the accuracy term, for both samplers), gradient norm,
time spent re-scoring.

Every problem and run goes sequentially (one process, one thread): the machine is shared. Run with
``nice -n 10 python -m bench.schemes_prm_mmr1 [--part search|mmr1|all] [--problems 32] [--seeds 0 1 2]``;
results go to ``bench/results/schemes_prm_mmr1.json`` (``--out``), merged with earlier parts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import _harness as H

ROOT = Path(__file__).resolve().parent.parent


def _machine() -> dict:
    return {"cpu": H.cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip


def search_part(problems: int, log) -> dict:
    from fastgrpo.config import load_config
    from fastgrpo.rewards.prm import ArithmeticStepVerifier, hf_step_proposer
    from fastgrpo.rewards.registry import build_scheme
    from fastgrpo.rollout import SamplingParams, generate_rollouts
    from fastgrpo.tasks import render_prompt
    from fastgrpo.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "prm.yaml", ["model.lora.enabled=false", "train.progress=false",
                                                      f"task.num_eval={problems}", "task.num_train=1"])  # fmt: skip
    trainer = Trainer(cfg, write_run=False)
    model, tok, prm = trainer.model, trainer.tokenizer, cfg.advantage.prm
    acc_fn = trainer.rewards.fns["accuracy"]
    examples = trainer.eval_set[:problems]
    out: dict = {"problems": len(examples), "settings": {"search": prm.search, "temperature": prm.search_temperature,
                 "max_step_tokens": prm.max_step_tokens, "greedy_max_new_tokens": cfg.rollout.max_new_tokens}}  # fmt: skip

    def decode(name: str, **sampling) -> None:
        rows = []
        for i, e in enumerate(examples):
            t0 = time.perf_counter()
            ro = generate_rollouts(model, tok, [e.messages], SamplingParams(num_generations=1,
                                   max_new_tokens=cfg.rollout.max_new_tokens, return_logprobs=False, seed=1000 + i,
                                   **sampling))  # fmt: skip
            dt = time.perf_counter() - t0
            rows.append({"correct": acc_fn(ro.texts[0], e, 0), "calls": 1, "tokens": int(ro.completion_lens[0]),
                         "seconds": dt, "text": ro.texts[0]})  # fmt: skip
        out[name] = _summary(rows)
        log(name, out[name])

    def search(name: str, verifier) -> None:
        run = build_scheme({"name": "prm_greedy_search", "params": prm.search})
        rows = []
        for i, e in enumerate(examples):
            head = render_prompt(e.messages, tok)
            propose = hf_step_proposer(model, tok, lambda q, s, h=head: h + "".join(x + "\n" for x in s),
                                       temperature=prm.search_temperature, max_step_tokens=prm.max_step_tokens,
                                       seed=7000 + 100 * i)  # fmt: skip
            t0 = time.perf_counter()
            res = run(e.question, propose, verifier)
            dt = time.perf_counter() - t0
            text = res.text("\n")
            rows.append({"correct": acc_fn(text, e, 0), "calls": res.model_calls, "tokens": res.tokens,
                         "seconds": dt, "status": res.status, "text": text})  # fmt: skip
        out[name] = _summary(rows)
        out[name]["status"] = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
        log(name, out[name])

    torch.manual_seed(0)
    decode("greedy", do_sample=False)
    decode("sample_t0.7", temperature=0.7)
    decode("sample_t1.0", temperature=1.0)
    search("search_grounded", ArithmeticStepVerifier())
    search("search_truth_only", ArithmeticStepVerifier(grounded=False))
    return out


def _summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"accuracy": sum(r["correct"] for r in rows) / n, "calls": sum(r["calls"] for r in rows) / n,
            "tokens": sum(r["tokens"] for r in rows) / n, "seconds": sum(r["seconds"] for r in rows) / n,
            "examples": [r["text"] for r in rows[:3]], "correct": [r["correct"] for r in rows]}  # fmt: skip


def mmr1_part(seeds: list[int], steps: int | None, log) -> dict:
    from fastgrpo.config import load_config
    from fastgrpo.trainer import train

    out: dict = {"seeds": seeds, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for kind in ("mmr1", "uniform"):
                sets = ["train.progress=false", "train.plot=false", f"train.seed={seed}", f"train.output_dir={tmp}",
                        f"train.run_name={kind}-{seed}", "train.eval_prompts=0"]  # fmt: skip
                if steps:
                    sets.append(f"train.steps={steps}")
                if kind == "uniform":
                    sets.append("sampler.kind=random")
                zero = []

                def acc_zero_var(trainer, metrics, zero=zero):
                    acc = trainer._last_batch.terms[trainer.rewards.accuracy_term]
                    g = acc.view(-1, trainer.cfg.rollout.group_size)
                    zero.append(float((g.max(1).values == g.min(1).values).double().mean()))

                cfg = load_config(ROOT / "configs" / "mmr1.yaml", sets)
                res = train(cfg, callbacks=[acc_zero_var])
                m = res.metrics
                run = {"kind": kind, "seed": seed, "steps": len(m), "wall_s": res.wall_s,
                       "train_s": sum(r["time/step"] for r in m),
                       "zero_var_groups_accuracy": statistics.fmean(zero),
                       "zero_std_groups_reward": statistics.fmean(r["zero_std_groups"] for r in m),
                       "grad_norm": statistics.fmean(r["grad_norm"] for r in m),
                       "rescore_s": sum(r.get("time/vas_rescore", 0.0) for r in m),
                       "rescored_prompts": sum(r.get("vas/rescored", 0.0) for r in m),
                       "reward_last10": statistics.fmean(r["reward"] for r in m[-10:])}  # fmt: skip
                out["runs"].append(run)
                log(f"mmr1 {kind} seed {seed}", run)
    by = {k: [r for r in out["runs"] if r["kind"] == k] for k in ("mmr1", "uniform")}
    out["mean"] = {k: {key: statistics.fmean(r[key] for r in rs) for key in
                       ("wall_s", "train_s", "zero_var_groups_accuracy", "zero_std_groups_reward", "grad_norm",
                        "rescore_s")}
                   for k, rs in by.items()}  # fmt: skip
    out["wall_ratio"] = out["mean"]["mmr1"]["wall_s"] / out["mean"]["uniform"]["wall_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("search", "mmr1", "all"), default="all")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="override train.steps of configs/mmr1.yaml")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "schemes_prm_mmr1.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: the measurements run beside other work on a shared machine
    logging.basicConfig(level=logging.WARNING)
    path = Path(args.out)
    result = json.loads(path.read_text()) if path.is_file() else {}

    def log(name, row):
        brief = {k: v for k, v in row.items() if k not in ("examples", "correct", "evals")}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(brief, default=str)}", flush=True)

    machine = _machine()
    if args.part in ("search", "all"):
        t0 = time.perf_counter()
        result["search"] = {
            **search_part(args.problems, log),
            "machine": machine,
            "total_s": time.perf_counter() - t0,
        }
        result["search"]["machine"]["load_avg_end"] = os.getloadavg()
        path.write_text(json.dumps(result, indent=1, default=str))
    if args.part in ("mmr1", "all"):
        t0 = time.perf_counter()
        result["mmr1"] = {**mmr1_part(args.seeds, args.steps, log), "machine": machine,
                          "total_s": time.perf_counter() - t0}  # fmt: skip
        result["mmr1"]["machine"]["load_avg_end"] = os.getloadavg()
        path.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()

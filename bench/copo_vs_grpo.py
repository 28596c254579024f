"""COPO (paper-exact batch statistics and running statistics) against plain GRPO on the built-in addition task.

Every run is ``configs/copo.yaml`` (SmolLM2-135M-Instruct with LoRA, 4 prompts x 6 completions per step, binary
accuracy reward) with one change per mode, the same steps and seeds::

    grpo          advantage.copo.enabled=false                 (the local GRPO advantage alone)
    copo-batch    advantage.copo.global_stats=batch            (the paper: statistics over the step's prompts)
    copo-running  advantage.copo.global_stats=running          (beyond the paper: over the recent prompts too)
    copo-running-forced   running, and the paper's soft-with-forced gating instead of the released soft-with-zero

Per run: greedy held-out accuracy before training and after the last step (``train.eval_prompts`` prompts of the
task's held-out split), the mean reward of the last 5 steps, and over all steps the mean share of completions
with a non-zero advantage (``adv/nonzero``) and of wrong completions pushed up (``adv/wrong_positive``), and the
policy's mean token entropy and the share of completions with a scoreable answer over the last 5 steps. Runs go
one after another (a finished run is read back from ``--out``'s JSONL and not repeated), then the table (mean
and sample std over seeds, and every seed) is written as markdown (run it with ``OMP_NUM_THREADS=1`` on a shared
CPU: under contention one thread generated 5x faster than two)::

    python -m bench.copo_vs_grpo --steps 12 --seeds 0,1,2 --eval-prompts 32 \
        --modes grpo,copo-batch,copo-running,copo-running-forced --out /tmp/copo_bench   # the docs' table
    python -m bench.copo_vs_grpo --tiny --steps 2 --seeds 0 --out /tmp/copo   # seconds: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

from bench import _harness as H
from fastgrpo.config import load_config
from fastgrpo.trainer import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "copo.yaml"
MODES = {
    "grpo": ["advantage.copo.enabled=false"],
    "copo-batch": ["advantage.copo.enabled=true", "advantage.copo.global_stats=batch"],
    "copo-running": ["advantage.copo.enabled=true", "advantage.copo.global_stats=running"],
    # the paper's other gating: wrong answers of groups with spread keep their local (GRPO) weight
    "copo-running-forced": [
        "advantage.copo.enabled=true",
        "advantage.copo.global_stats=running",
        "advantage.copo.params.gating=soft-with-forced",
    ],
}
COLUMNS = [
    ("acc_before", "held-out acc. before"),
    ("acc_after", "held-out acc. after"),
    ("reward_last5", "reward, last 5 steps"),
    ("nonzero", "non-zero adv. share"),
    ("wrong_positive", "wrong answers pushed up"),
    ("entropy_last5", "policy entropy, last 5 steps"),
    ("answer_rate_last5", "answer rate, last 5 steps"),
]

logger = logging.getLogger("bench.copo_vs_grpo")


def run_one(mode: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one mode with one seed through :func:`fastgrpo.trainer.train`; its row of the table."""
    overrides = [
        *MODES[mode],
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"train.eval_prompts={args.eval_prompts}",
        f"train.eval_every={args.steps}",
        "train.progress=false",
        "train.plot=false",
        f"train.output_dir={args.out / 'runs'}",
        f"train.run_name={mode}-seed{seed}",
        *args.set,
    ]
    if args.tiny:
        overrides += [
            "model.name=tiny",
            "model.lora.enabled=false",
            "rollout.max_new_tokens=8",
            "task.num_eval=8",
        ]
    cfg = load_config(CONFIG, overrides)
    shutil.rmtree(args.out / "runs" / f"{mode}-seed{seed}", ignore_errors=True)  # an interrupted earlier try
    t0 = time.perf_counter()
    res = train(cfg)
    return {"mode": mode, "seed": seed, **summarise(res.metrics), "wall_s": time.perf_counter() - t0}


def summarise(metrics: list[dict]) -> dict:
    """A run's row from its per-step metrics (``RunResult.metrics`` / ``read_metrics(run_dir)``)."""
    evals = {r["step"]: r["eval/accuracy"] for r in metrics if r.get("eval/accuracy") is not None}
    steps = [r for r in metrics if "reward" in r]
    mean = lambda key, rows: statistics.fmean(r[key] for r in rows) if rows else float("nan")
    return {
        "steps": len(steps),
        "acc_before": evals.get(0, float("nan")),
        "acc_after": evals.get(len(steps), float("nan")),
        "reward_last5": mean("reward", steps[-5:]),
        "nonzero": mean("adv/nonzero", steps),
        "wrong_positive": mean("adv/wrong_positive", steps),
        "entropy_last5": mean("entropy", steps[-5:]),
        "answer_rate_last5": mean("answer_rate", steps[-5:]),
    }


def table(rows: list[dict], modes: list[str]) -> str:
    """Markdown: per mode the mean (± sample std) over seeds of every column, then the seeds' values."""
    head = "| mode | seeds | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for mode in modes:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["seed"])
        if not mine:
            continue
        cells = []
        for key, _ in COLUMNS:
            vals = [r[key] for r in mine]
            sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
            each = ", ".join(f"{v:.2f}" for v in vals)
            cells.append(f"{statistics.fmean(vals):.2f}{sd} ({each})")
        lines.append(f"| {mode} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    return f"{H.cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.copo_vs_grpo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/copo_vs_grpo"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model built in code (plumbing check)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: {unknown} not in {list(MODES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    done_file = args.out / "runs.jsonl"
    rows = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.is_file() else []
    done = {(r["mode"], r["seed"], r["steps"]) for r in rows}
    for seed in seeds:  # seed-major: an interrupted bench still has every mode for the seeds it finished
        for mode in modes:
            if (mode, seed, args.steps) in done:
                continue
            logger.info("run %s seed %d (%d steps)", mode, seed, args.steps)
            row = run_one(mode, seed, args)
            rows.append(row)
            with done_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
    mine = [r for r in rows if r["steps"] == args.steps and r["seed"] in seeds]
    text = (
        f"{args.steps} steps, seeds {seeds}, {args.eval_prompts} held-out prompts; "
        f"{time.strftime('%Y-%m-%d')}; {machine()}\n\n{table(mine, modes)}\n"
    )
    (args.out / "table.md").write_text(text)
    logger.info("table written to %s\n%s", args.out / "table.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

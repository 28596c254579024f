"""Every shipped config on the embedded model: does it learn? One table, written into ``docs/configs.md``.

Each text config in ``configs/`` trains for its own ``train.steps`` on the model it names (SmolLM2-135M-Instruct,
offline, on CPU) through :func:`fastgrpo.trainer.train`, once per seed, with greedy held-out accuracy measured
before the first step and after the last (``train.eval_prompts`` prompts of the task's held-out split,
``train.eval_every`` = the run's steps). Per config the table gives, as the mean over seeds and every seed:

* **signal**: the share of groups with a learning signal, ``1 - zero_std_groups`` (a group whose completions
  all score alike has advantage 0 and teaches nothing), averaged over the steps;
* **answer rate**: the share of completions holding a scoreable answer (``answer_rate``), first and last 10 steps;
* **reward**: the mean reward of the first 10 steps and of the last 10 (fewer for short runs);
* **held-out accuracy** before and after;
* **s/step**: the median wall time of a step (generation, reference, update), then a verdict computed from the
  rows: *learns* when on every seed the reward rose and the held-out accuracy rose.

Vision-language configs (a model this machine cannot run: Qwen2.5-VL-3B) run 2 steps with their tiny
counterpart built in code (``--tiny``) and appear as *wiring only* rows: the plumbing works, nothing is learned.

Runs go one after another; a finished run (same config file content, seed and settings) is read back from
``<out>/runs.jsonl`` and not repeated, so the bench can be stopped and rerun piecewise (``--configs``,
``--seeds``). The table covers every run of the chosen configs and seeds found there; the machine, the date and the
load average over the runs are written above it. Run it with one torch thread on a shared CPU::

    OMP_NUM_THREADS=1 nice -n 10 python -m bench.bench_configs --seeds 0,1        # the docs' table (~3 h)
    python -m bench.bench_configs --configs grpo,copo --seeds 0                   # a part of it
    python -m bench.bench_configs --smoke --out /tmp/cfg --doc /tmp/cfg/configs.md   # seconds: tiny models

``--smoke`` runs every config (text ones included) on the tiny models built in code for 2 steps: the plumbing and
the table, nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench import _harness as H
from fastgrpo.config import Config, config_to_dict, load_config
from fastgrpo.models import tiny_counterpart
from fastgrpo.observability import read_metrics, reward_summary
from fastgrpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOC = ROOT / "docs" / "configs.md"
#: the generated part of the doc lies between these two lines; the text around them is kept
BEGIN, END = "<!-- bench_configs: begin -->", "<!-- bench_configs: end -->"
WINDOW = 10
#: what --tiny runs (and --smoke for every config) set on top of the config: seconds per run
TINY = [
    "train.steps=2",
    "task.num_train=16",
    "task.num_eval=4",
    "rollout.max_new_tokens=8",
    "rollout.group_size=4",
    "sampler.refresh_generations=2",
    "filter.max_gen_batches=2",
]

logger = logging.getLogger("bench.bench_configs")


def is_wiring_only(cfg: Config) -> bool:
    """A config whose model is a vision-language model: on CPU only its tiny counterpart runs (wiring only)."""
    return tiny_counterpart(cfg.model.name) not in ("tiny", cfg.model.name)


def run_settings(path: Path, seed: int, args: argparse.Namespace) -> tuple[list[str], bool]:
    """The overrides of one run and whether it is a wiring-only (tiny model) run."""
    cfg = load_config(path)
    wiring = args.smoke or is_wiring_only(cfg)
    overrides = [f"train.seed={seed}"]
    if wiring:
        overrides += [f"model.name={tiny_counterpart(cfg.model.name)}", *TINY, "train.eval_prompts=2",
                      "train.eval_every=2"]  # fmt: skip
    else:
        overrides += [f"train.eval_prompts={args.eval_prompts}", f"train.eval_every={cfg.train.steps}"]
    return [
        *overrides,
        "train.progress=false",
        "train.plot=false",
        "train.time_budget_s=0",
        *args.set,
    ], wiring


def run_key(path: Path, overrides: list[str]) -> str:
    """What identifies a finished run: the resolved config (file content and overrides), output paths aside."""
    data = config_to_dict(load_config(path, overrides))
    data["train"].pop("output_dir"), data["train"].pop("run_name")
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def summarise(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's numbers from its ``metrics.jsonl`` rows (training steps and the evaluation rows)."""
    steps = [r for r in metrics if "reward" in r]
    evals = {r["step"]: r["eval/accuracy"] for r in metrics if r.get("eval/accuracy") is not None}
    reward = reward_summary(steps, WINDOW)
    answers = reward_summary(steps, WINDOW, key="answer_rate")
    nan = float("nan")
    return {
        "steps": len(steps),
        "signal": 1.0 - statistics.fmean(r["zero_std_groups"] for r in steps) if steps else nan,
        "answer_first": answers["first"],
        "answer_last": answers["last"],
        "reward_first": reward["first"],
        "reward_last": reward["last"],
        "window": reward["window"],
        "acc_before": evals.get(0, nan),
        "acc_after": evals.get(len(steps), nan),
        "s_per_step": statistics.median(r["time/step"] for r in steps) if steps else nan,
    }


def run_one(path: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``path`` with ``seed`` through :func:`fastgrpo.trainer.train`; its row."""
    overrides, wiring = run_settings(path, seed, args)
    name = f"{path.stem}-seed{seed}"
    runs = args.out / "runs"
    shutil.rmtree(runs / name, ignore_errors=True)  # an interrupted earlier try
    cfg = load_config(path, [*overrides, f"train.output_dir={runs}", f"train.run_name={name}"])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    row = {"config": path.stem, "seed": seed, "key": run_key(path, overrides), "wiring_only": wiring,
           "model": cfg.model.name, "task": cfg.task.name, **summarise(read_metrics(runs / name)),
           "wall_s": wall, "load": [load_before, os.getloadavg()[0]], "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    return row


def _cell(values: list[float], fmt: str = "{:.2f}") -> str:
    mean = fmt.format(statistics.fmean(values))
    return mean if len(values) == 1 else f"{mean} ({', '.join(fmt.format(v) for v in values)})"


def _arrow(before: list[float], after: list[float]) -> str:
    return f"{_cell(before)} → {_cell(after)}"


def verdict(rows: list[dict[str, Any]], staged: bool = False) -> str:
    """*learns* when on every seed the reward rose and the held-out accuracy rose; else what did and did not.
    ``staged``: a curriculum run, whose later steps draw harder question types, so its first and last training
    rewards are not comparable: the held-out accuracy alone decides."""
    if rows[0]["wiring_only"]:
        return "wiring only"
    n = len(rows)
    up = sum(r["reward_last"] > r["reward_first"] for r in rows)
    acc = sum(r["acc_after"] > r["acc_before"] for r in rows)
    if acc == n and (up == n or staged):
        return f"learns ({n}/{n} seeds)" + (" (curriculum: held-out accuracy)" if staged else "")
    if staged:
        return f"accuracy up {acc}/{n} (curriculum: rewards of later stages not comparable)"
    return f"reward up {up}/{n}, accuracy up {acc}/{n}"


COLUMNS = ("config", "task", "seeds", "steps", "groups with signal", "answer rate, first → last 10",
           "reward, first → last 10", "held-out acc., before → after", "s/step", "verdict")  # fmt: skip


def table(rows: list[dict[str, Any]], order: list[str], staged: frozenset[str] = frozenset()) -> str:
    """Markdown: one line per config, the mean over seeds then every seed in parentheses."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name in order:
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        get = lambda k, mine=mine: [r[k] for r in mine]  # noqa: E731
        steps = sorted(set(get("steps")))
        cells = [
            f"`{name}`",
            mine[0]["task"] + (f" ({mine[0]['model']})" if mine[0]["wiring_only"] else ""),
            ", ".join(str(s) for s in get("seed")),
            "/".join(map(str, steps)),
            _cell(get("signal")),
            _arrow(get("answer_first"), get("answer_last")),
            _arrow(get("reward_first"), get("reward_last")),
            _arrow(get("acc_before"), get("acc_after")),
            _cell(get("s_per_step"), "{:.1f}"),
            verdict(mine, staged=name in staged),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(rows: list[dict[str, Any]]) -> str:
    """CPU model, cores, bf16 support, torch threads and the load average seen at the start and end of the runs."""
    model, bf16 = H.cpu_model(), H.cpu_bf16()
    flags = f", {bf16}" if bf16 else ""
    loads = [x for r in rows for x in r["load"]]
    load = f"load average {min(loads):.1f}–{max(loads):.1f} during the runs" if loads else ""
    return f"{model}{flags}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s); {load}"


def write_doc(doc: Path, text: str) -> None:
    """Put ``text`` between the markers of ``doc`` (created with just the markers if missing)."""
    old = doc.read_text() if doc.is_file() else f"# Shipped configs on the embedded model\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        raise ValueError(f"{doc}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = old.split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_configs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--configs", default="", help="comma-separated config names (default: every one)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument(
        "--eval-prompts", type=int, default=64, help="held-out prompts evaluated before and after"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "configs")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file the table is written into")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="every config on the tiny models, 2 steps (seconds)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (one is fastest on a shared CPU)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    available = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    names = args.configs.split(",") if args.configs else available
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"--configs: {unknown} not in {available}")
    # text configs first, then the wiring-only ones
    paths = sorted(
        (CONFIGS / f"{n}.yaml" for n in names), key=lambda p: (is_wiring_only(load_config(p)), p.stem)
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    done_file = args.out / "runs.jsonl"
    rows = [json.loads(ln) for ln in done_file.read_text().splitlines()] if done_file.is_file() else []
    chosen = []
    for path in paths:
        for seed in seeds:
            overrides, wiring = run_settings(path, seed, args)
            if wiring and seed != seeds[0]:
                continue  # one wiring run per config is enough
            key = run_key(path, overrides)
            found = [r for r in rows if r["config"] == path.stem and r["seed"] == seed and r["key"] == key]
            if found:
                chosen.append(found[-1])
                continue
            logger.info("run %s seed %d", path.stem, seed)
            row = run_one(path, seed, args)
            with done_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            chosen.append(row)
    days = sorted({r["date"][:10] for r in chosen})
    staged = frozenset(p.stem for p in paths if load_config(p).sampler.kind.startswith("curriculum"))
    text = (
        f"Measured {' to '.join(dict.fromkeys([days[0], days[-1]]))} by `python -m bench.bench_configs"
        f"{' --smoke' if args.smoke else ''} --seeds {args.seeds} --eval-prompts {args.eval_prompts}` "
        f"({len(chosen)} runs, rows in `{_shown(done_file)}`); {machine(chosen)}.\n\n"
        f"{table(chosen, [p.stem for p in paths], staged)}"
    )
    write_doc(args.doc, text)
    logger.info("table written into %s\n%s", args.doc, text)
    return 0


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())

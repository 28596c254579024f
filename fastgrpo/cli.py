"""The ``fastgrpo`` command line.

.. code-block:: text

    fastgrpo train [--config F] [--set KEY=VALUE ...] [--resume DIR] [--tiny]
    fastgrpo eval  (--run DIR | --config F [--set ...]) [--checkpoint DIR] [--num N] [--search prm] [--tiny]
    fastgrpo bench ARGS...            forwards ARGS to bench/run.py (source checkout only)
    fastgrpo plot  RUN_DIR [--out FILE]
    fastgrpo tasks list | show NAME [--n N] [--out DIR] [--seed S] [--set KEY=VALUE ...]
    fastgrpo export RUN_DIR OUT [--merged | --adapter] [--checkpoint DIR] [--dtype D] [--force]

Several processes: ``accelerate launch --multi_gpu --num_processes 2 -m fastgrpo.cli train ...`` (on CPU
too: the trainer creates ``Accelerator(cpu=True)`` when no GPU is present and refuses a launch whose
world size does not match the environment's).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "find_bench_dir"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgrpo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy with GRPO-family RL")
    p.add_argument("--config", help="YAML config file (configs/*.yaml); defaults apply to what it omits")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set loss.beta=0.04 (repeatable)")  # fmt: skip
    p.add_argument("--resume", metavar="DIR", help="continue from a run directory or a checkpoint directory")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="replace the config's model by one built in code of its kind (tiny text model, or a tiny "
        "vision-language model of the same family): tests, smoke runs",
    )
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("eval", help="held-out accuracy of a model or a run's checkpoint (greedy or PRM search)")  # fmt: skip
    p.add_argument("--run", metavar="DIR", help="a run directory (its config.yaml and latest checkpoint)")
    p.add_argument("--config", help="YAML config (when not evaluating a run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", metavar="DIR", help="a checkpoint to load (default: the run's latest)")
    p.add_argument("--num", type=int, default=None, help="number of held-out prompts (default task.num_eval)")
    p.add_argument("--search", choices=("greedy", "prm"), default="greedy",
                   help="decoding: greedy (default), or prm: GroundedPRM-guided step search (advantage.prm)")  # fmt: skip
    p.add_argument("--tiny", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser(
        "bench", help="microbenchmarks (forwards its arguments to bench/run.py)", add_help=False
    )
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("plot", help="plot a run's metrics.jsonl to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output PNG (default RUN_DIR/plot.png)")

    p = sub.add_parser("tasks", help="list the built-in tasks, or write examples of one to look at")
    tasks = p.add_subparsers(dest="tasks_command", required=True)
    tasks.add_parser("list", help="the built-in tasks")
    p = tasks.add_parser("show", help="write N examples (PNG images, GIF videos, examples.json) to a folder")
    p.add_argument("name")
    p.add_argument("--n", type=int, default=4, help="number of examples (default 4)")
    p.add_argument("--out", help="output folder (default ./examples_NAME)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. --set image_size=224 (repeatable)")  # fmt: skip

    p = sub.add_parser(
        "export", help="write a run's model as a Hugging Face model or PEFT adapter (safetensors)"
    )
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("out", help="the directory to write")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--merged", dest="mode", action="store_const", const="merged",
                      help="the full model, LoRA merged in (default; full fine-tuning runs: the model)")  # fmt: skip
    kind.add_argument("--adapter", dest="mode", action="store_const", const="adapter",
                      help="the PEFT LoRA adapter (LoRA runs only)")  # fmt: skip
    p.add_argument(
        "--checkpoint", metavar="DIR|STEP", help="a checkpoint directory or step (default: the latest)"
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the run's)"
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true")
    return parser


def find_bench_dir() -> Path:
    """``bench/`` of the source checkout this package was installed from (editable install)."""
    candidate = Path(__file__).resolve().parent.parent / "bench"
    if (candidate / "run.py").is_file():
        return candidate
    raise FileNotFoundError(
        f"fastgrpo bench needs the source checkout's bench/ directory (looked for {candidate / 'run.py'}); "
        "the benchmarks are not part of the installed package: clone the repository and install it with "
        "`pip install -e .`, then run `fastgrpo bench` (or `python -m bench.run`) from there"
    )


def _bench(args: list[str]) -> int:
    bench_dir = find_bench_dir()
    root = str(bench_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module("bench.run")
    rc = module.main(args)
    return int(rc or 0)


def _echo(message: str, err: bool = False) -> None:
    """The command's own output (results, errors), as opposed to the library's logging."""
    stream = sys.stderr if err else sys.stdout
    stream.write(message + "\n")
    stream.flush()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _tasks(args: argparse.Namespace) -> int:
    from .tasks import build_task
    from .tasks.show import parse_options, show_task, task_summaries

    if args.tasks_command == "list":
        for name, summary in task_summaries():
            _echo(f"{name:14s} {summary}")
        return 0
    try:
        task = build_task(args.name, **parse_options(args.options))
        path = show_task(task, args.n, args.out or f"examples_{args.name}", seed=args.seed)
    except ValueError as e:
        _echo(f"fastgrpo tasks show: error: {e}", err=True)
        return 2
    _echo(f"wrote {args.n} examples of {args.name} to {path.parent} (questions and answers: {path})")
    return 0


def _tiny_model(cfg) -> str:
    """``--tiny``: the config's model replaced by the model built in code of its kind (a tiny vision-language
    model of the same family for a VLM config, else the tiny text model)."""
    from .models import tiny_counterpart

    return f"model.name={tiny_counterpart(cfg.model.name)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to bench/run.py, --help included
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "plot":
        from .observability import plot_run, read_metrics, reward_summary

        try:
            rows = read_metrics(args.run_dir)
            out = plot_run(args.run_dir, args.out, rows=rows)
        except (FileNotFoundError, ValueError, ImportError) as e:
            _echo(f"fastgrpo plot: error: {e}", err=True)
            return 2
        s = reward_summary(rows)
        _echo(f"plot: {out}")
        _echo(
            f"reward: first {s['window']} steps {s['first']:.3f} -> last {s['window']} steps {s['last']:.3f}"
        )
        return 0

    if args.command == "tasks":
        return _tasks(args)

    from .checkpoint import CheckpointError
    from .config import ConfigError, apply_overrides, load_config

    _setup_logging(args.verbose)
    if args.command == "export":
        from .export import export_run

        try:
            checkpoint = int(args.checkpoint) if (args.checkpoint or "").isdigit() else args.checkpoint
            out = export_run(args.run_dir, args.out, mode=args.mode or "merged", checkpoint=checkpoint,
                             dtype=args.dtype, overwrite=args.force)  # fmt: skip
        except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
            _echo(f"fastgrpo export: error: {e}", err=True)
            return 2
        _echo(f"export: {out}")
        return 0
    try:
        if args.command == "train":
            from .trainer import train

            overrides = list(args.overrides)
            resume = None
            if args.resume:
                from .checkpoint import find_resumable
                from .config import resume_config

                if args.config:
                    raise ConfigError(
                        "--config: a resumed run continues with its saved configuration (the checkpoint's "
                        "config.yaml); leave --config out and change what may change with --set"
                    )
                resume = find_resumable(args.resume)
                if resume.config_text is None:
                    raise ConfigError(f"--resume: {resume.path} holds no config.yaml to continue from")
                source = f"{resume.path}/config.yaml"
                if args.tiny:
                    overrides.insert(0, _tiny_model(resume_config(resume.config_text, source=source)))
                cfg = resume_config(resume.config_text, overrides, source=source)
            else:
                cfg = load_config(args.config, overrides)
                if args.tiny:
                    cfg = apply_overrides(cfg, [_tiny_model(cfg)])
            result = train(cfg, resume=resume)
            if result.is_main:
                _echo(result.summary_line())
            return 0
        if args.command == "eval":
            from .trainer import evaluate_run

            overrides = list(args.overrides)
            if args.run:
                config_path = Path(args.run) / "config.yaml"
                if not config_path.is_file():
                    raise FileNotFoundError(
                        f"--run: {config_path} not found (is {args.run} a fastgrpo run directory?)"
                    )
                cfg = load_config(config_path, overrides)
            else:
                cfg = load_config(args.config, overrides)
            if args.tiny:
                cfg = apply_overrides(cfg, [_tiny_model(cfg)])
            metrics = evaluate_run(cfg, run_dir=args.run, checkpoint=args.checkpoint, num=args.num,
                                   search=args.search)  # fmt: skip
            _echo(json.dumps(metrics, indent=2))
            return 0
    except (ConfigError, FileNotFoundError, CheckpointError, FloatingPointError, ImportError) as e:
        # the user's input, the files, a missing optional package or a diverged run: one line, no traceback
        _echo(f"fastgrpo {args.command}: error: {e}", err=True)
        return 2
    return 1  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

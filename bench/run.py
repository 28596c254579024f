"""Entry point of the benchmark suite: ``python -m bench.run`` (``fastgrpo bench`` forwards here).

    python -m bench.run --op all --device cpu            # the CPU tables (minutes; run on a quiet machine)
    python -m bench.run --smoke                          # seconds: tiny shapes, checks peers equal ours
    python -m bench.run --op grpo_loss --device cuda --out $OUT

Each op writes ``<out>/<op>_<device>[_smoke].csv`` (columns of STYLE.md), a markdown table (``.md``) and a plot
(``.png``). The exit status is 1 when any implementation's outputs did not match the reference (its timings
are void and not written) or raised, 0 otherwise.

Ops whose script follows the harness interface (``OP``, ``MODES``, ``cases``, ``setup``, ``work``: see
``bench/_harness.py``) run through :func:`bench._harness.run_op`. Other scripts (``bench_packing.py``,
``bench_rollout.py``, ``bench_step.py``) only need ``main(argv) -> int`` accepting ``--device {cpu,cuda}``, ``--smoke`` and
``--out DIR``; ``run.py`` calls them with those three and they write their own CSV with the same columns
(``bench._harness.write_csv``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

from bench import _harness as H

OPS = {
    "logprobs": "bench.bench_logprobs",
    "grpo_loss": "bench.bench_grpo_loss",
    "advantages": "bench.bench_advantages",
    "packing": "bench.bench_packing",
    "rollout": "bench.bench_rollout",
    "step": "bench.bench_step",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgrpo bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=[*OPS, "all"], default="all")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--smoke", action="store_true", help="seconds-long CPU run: tiny shapes, checks, few repeats"
    )
    p.add_argument(
        "--out", default=str(H.REPO / "bench" / "results"), help="directory of the CSV/MD/PNG files"
    )
    p.add_argument("--dtype", default=None, help="comma-separated dtypes to run (float32,bfloat16)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument(
        "--only", default=None, help="comma-separated implementations to run (the reference always runs)"
    )
    p.add_argument("--case", default=None, help="comma-separated case names to run (e.g. cpu,check0)")
    p.add_argument(
        "--modes", default=None, help="comma-separated modes to time (fwd,bwd,fwd_bwd); default all"
    )
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="minimum timed calls per measurement")
    p.add_argument("--min-time", type=float, default=None, help="keep timing until this many seconds")
    return p


def _is_harness_module(mod) -> bool:
    return all(hasattr(mod, a) for a in ("OP", "MODES", "cases", "setup", "work"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    threads = torch.get_num_threads()
    if args.smoke:
        # smoke timings mean nothing; one thread keeps a busy (shared) machine from stalling on thread barriers
        torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    if args.smoke and args.device != "cpu":
        print("--smoke runs on CPU; ignoring --device", file=sys.stderr)
        args.device = "cpu"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: torch sees no CUDA device", file=sys.stderr)
            return 2
    # smoke: the check already ran every implementation once, so no separate warm-up
    timing = H.TimingOptions(warmup=0, reps=2, min_time=0.0) if args.smoke else H.TimingOptions()
    if args.warmup is not None:
        timing.warmup = args.warmup
    if args.reps is not None:
        timing.reps = args.reps
    if args.min_time is not None:
        timing.min_time = args.min_time
    opts = H.RunOptions(
        device=args.device,
        smoke=args.smoke,
        memory=not args.no_memory,
        timing=timing,
        only=set(args.only.split(",")) if args.only else None,
        case_filter=args.case,
        modes=set(args.modes.split(",")) if args.modes else None,
        dtypes=set(args.dtype.split(",")) if args.dtype else None,
    )
    out_dir = Path(args.out)
    ops = list(OPS) if args.op == "all" else [args.op]
    failures: list[str] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    for op in ops:
        module = OPS[op]
        if importlib.util.find_spec(module) is None:
            msg = f"{op}: {module.replace('.', '/')}.py is not present; skipped"
            (notes if args.op == "all" else failures).append(msg)
            print(f"\n== {msg}")
            continue
        mod = importlib.import_module(module)
        if _is_harness_module(mod):
            # the files are rewritten after every timed case, so a long run that is stopped keeps what it measured
            opts.after_case = lambda partial, op=mod.OP: H.write_outputs(
                op, partial, out_dir, args.device, args.smoke
            )
            res = H.run_op(module, opts)
            paths = H.write_outputs(mod.OP, res, out_dir, args.device, args.smoke)
            failures += res.failures
            notes += res.notes
            print(f"\n-- {op}: wrote " + ", ".join(str(p) for p in paths.values()))
            table = H.markdown_table(res.rows)
            if table:
                print(table)
                for n in res.impl_notes:
                    print(f"  {n}")
        elif hasattr(mod, "main"):
            sub = ["--device", args.device, "--out", str(out_dir)] + (["--smoke"] if args.smoke else [])
            rc = mod.main(sub)
            if rc:
                failures.append(f"{op}: {module}.main({sub}) returned {rc}")
        else:
            failures.append(f"{op}: {module} has neither the harness interface nor main(argv)")
    print(f"\nbench finished in {time.perf_counter() - t0:.1f} s on {H.env_columns(args.device)['device']}")
    for n in notes:
        print(f"  note: {n}")
    if failures:
        print(f"\n{len(failures)} FAILURE(S):")
        for f in failures:
            print(f"  !! {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: rollouts with one prefill per prompt vs transformers' ``num_return_sequences``, side by side.

    python -m bench.bench_rollout                    # SmolLM2-135M-Instruct, G=8, P=64/512/2048, N=32/128
    python -m bench.bench_rollout --prompt-lens 512 --new-tokens 32 --reps 3
    python -m bench.bench_rollout --smoke            # seconds: the tiny model, small shapes, in one process

Implementations (``fastgrpo.rollout.generate_rollouts``, same prompts, settings and seed):

* ``num_return_sequences``: ``prefill_once=False``, transformers copies each prompt ``G`` times before its
  prefill;
* ``prompt-once``: ``prefill_once=True`` with the default ``prompt_cache="auto"`` (the shared-prefix cache);
* ``prompt-once-expanded``: ``prefill_once=True, prompt_cache="expanded"`` (transformers'
  ``batch_repeat_interleave``), to show what sharing the cache adds to the single prefill.

Each case is ``B`` random prompts of exactly ``P`` tokens and ``G`` completions of exactly ``N`` tokens (EOS
disabled, so every implementation generates ``B·G·N`` tokens), sampled at temperature 1 with the behaviour
log-probs on (the trainer's setting). Before timing, every implementation's completions are checked equal to
``num_return_sequences`` with greedy decoding (``top_k=1``) on the case's prompts (``N`` capped at 4).

Metrics per case and implementation: ``time`` (s, p50 / p20 / p80 over ``--reps`` calls after a warm-up call on
a short prompt), ``tokens_per_s`` (generated tokens / s), ``speedup`` (``num_return_sequences`` time / this time)
and ``peak_mem`` (MiB: extra peak RSS of the timed calls over the loaded model, in a fresh process per case and
implementation unless ``--in-process``; CUDA: ``max_memory_allocated`` over the allocated bytes before).
CSV: ``bench/results/rollout_<device>[_smoke].csv`` (STYLE.md columns, ``op=rollout``, ``mode=generate``,
``x_name=BxGxPxN``); a markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from bench import _harness as H

OP = "rollout"
IMPLS = {
    "num_return_sequences": {"prefill_once": False},
    "prompt-once": {"prefill_once": True, "prompt_cache": "auto"},
    "prompt-once-expanded": {"prefill_once": True, "prompt_cache": "expanded"},
}
BASELINE = "num_return_sequences"


def load(model_name: str, device: str) -> tuple[torch.nn.Module, Any]:
    """The model and a copy of its tokenizer without EOS (every completion runs ``max_new_tokens``)."""
    from fastgrpo.models import load_causal_lm

    model, tok = load_causal_lm(model_name, dtype=torch.float32, device=device)
    model.eval()
    tok = copy.deepcopy(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.eos_token = None
    model.generation_config.eos_token_id = None
    return model, tok


def prompts_for(vocab: int, b: int, p: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed + p)
    return torch.randint(100, vocab - 100, (b, p), generator=gen).tolist()


def rollout(model, tok, prompts, impl: str, g: int, n: int, **kw: Any):
    from fastgrpo.rollout import SamplingParams, generate_rollouts

    params = SamplingParams(num_generations=g, max_new_tokens=n, temperature=1.0, seed=0, **IMPLS[impl])
    return generate_rollouts(model, tok, prompts, params, **kw)


def check(model, tok, prompts, g: int) -> dict[str, bool]:
    """Greedy completions (``top_k=1``) of every implementation equal to the baseline's."""
    outs = {impl: rollout(model, tok, prompts, impl, g, 4, top_k=1).completion_ids for impl in IMPLS}
    return {impl: torch.equal(out, outs[BASELINE]) for impl, out in outs.items()}


def measure(
    model_name: str, device: str, b: int, g: int, p: int, n: int, impl: str, reps: int
) -> dict[str, Any]:
    """Warm-up, then ``reps`` timed rollouts: seconds per call and the extra peak memory (MiB)."""
    model, tok = load(model_name, device)
    vocab = model.config.vocab_size
    rollout(model, tok, prompts_for(vocab, b, 8), impl, g, 2)  # warm-up: one-off costs of the first call
    prompts = prompts_for(vocab, b, p)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = H._status_kb("VmRSS") or 0
        exact = H.reset_peak_rss()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rollout(model, tok, prompts, impl, g, n)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / H.MB
    else:
        peak_kb = H._status_kb("VmHWM") if exact else None
        peak_mb = (peak_kb - base) / 1024 if peak_kb is not None else float("nan")
    return {"times": times, "peak_mb": peak_mb}


def measure_in_child(
    model_name: str, device: str, case: dict[str, Any], impl: str, reps: int
) -> dict[str, Any]:
    """:func:`measure` in a fresh process, so that the peak memory is this implementation's alone."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(H.REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault(
        "MALLOC_MMAP_THRESHOLD_", str(128 * 1024)
    )  # freed large blocks leave RSS (bench/_child.py)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    spec = json.dumps({"model": model_name, "device": device, **case, "impl": impl, "reps": reps})
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_rollout", "--child", spec],
        cwd=H.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=7200,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}")


def _row(impl: str, metric: str, unit: str, case: dict[str, int], q, device: str) -> dict[str, Any]:
    p50, p20, p80 = q if isinstance(q, tuple) else (q, q, q)
    return {"op": OP, "backend": impl, "mode": "generate" if metric != "check" else "check", "metric": metric,
            "unit": unit, "x_name": "BxGxPxN", "x_value": "x".join(str(case[k]) for k in "BGPN"),
            "p50": f"{p50:.6g}", "p20": f"{p20:.6g}", "p80": f"{p80:.6g}", "dtype": "float32",
            **H.env_columns(device)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_rollout", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny model, small shapes, one process")
    p.add_argument("--out", default=str(H.REPO / "bench" / "results"))
    p.add_argument("--model", default=None, help="default: smollm2-135m-instruct (tiny with --smoke)")
    p.add_argument("--prompt-lens", default=None, help="comma-separated P (default 64,512,2048)")
    p.add_argument("--new-tokens", default=None, help="comma-separated N (default 32,128)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=1, help="B, prompts per rollout call")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 3; 1 with --smoke)")
    p.add_argument("--only", default=None, help="comma-separated implementations (the baseline always runs)")
    p.add_argument("--in-process", action="store_true", help="no fresh process per measurement")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default torch's; 1 on a busy shared machine)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    if args.smoke and args.threads is None:
        args.threads = 1  # smoke timings mean nothing; one thread never stalls on a busy machine
    if args.threads:
        # on an oversubscribed machine, threads wait at every op's barrier for a descheduled peer: one thread
        # gives steadier (if slower) numbers
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    if args.child:
        spec = json.loads(args.child)
        res = measure(spec["model"], spec["device"], spec["B"], spec["G"], spec["P"], spec["N"], spec["impl"],
                      spec["reps"])  # fmt: skip
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    model_name = args.model or ("tiny" if args.smoke else "smollm2-135m-instruct")
    lens = [int(x) for x in (args.prompt_lens or ("8,32" if args.smoke else "64,512,2048")).split(",")]
    news = [int(x) for x in (args.new_tokens or ("4" if args.smoke else "32,128")).split(",")]
    g = 4 if args.smoke and args.group_size == 8 else args.group_size
    reps = args.reps or (1 if args.smoke else 3)
    in_process = args.in_process or args.smoke
    impls = [i for i in IMPLS if args.only is None or i == BASELINE or i in args.only.split(",")]
    model, tok = load(model_name, args.device)
    env = H.env_columns(args.device)
    print(f"rollout bench on {env['device']}, torch {env['torch']}, fastgrpo @ {env['git_sha']}; model "
          f"{model_name}, G={g}, B={args.num_prompts}, load average {os.getloadavg()[0]:.1f}",
          flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    table: list[str] = []
    for plen in lens:
        prompts = prompts_for(model.config.vocab_size, args.num_prompts, plen)
        ok = check(model, tok, prompts, g)
        for impl in impls:
            case = {"B": args.num_prompts, "G": g, "P": plen, "N": 4}
            rows.append(_row(impl, "check", "pass", case, float(ok[impl]), args.device))
            if not ok[impl]:
                failures.append(f"{impl} at P={plen}: greedy completions differ from {BASELINE}; not timed")
                print(f"  !! {failures[-1]}", flush=True)
        for n in news:
            case = {"B": args.num_prompts, "G": g, "P": plen, "N": n}
            tokens = case["B"] * g * n
            results = {}
            for impl in impls:
                if not ok[impl]:
                    continue
                if in_process:
                    res = measure(model_name, args.device, case["B"], g, plen, n, impl, reps)
                else:
                    res = measure_in_child(model_name, args.device, case, impl, reps)
                q = tuple(float(x) for x in H._quantiles(res["times"]))
                results[impl] = (q, res["peak_mb"])
                rows.append(_row(impl, "time", "s", case, q, args.device))
                rate = (tokens / q[0], tokens / q[2], tokens / q[1])
                rows.append(_row(impl, "tokens_per_s", "tok/s", case, rate, args.device))
                rows.append(_row(impl, "peak_mem", "MB", case, res["peak_mb"], args.device))
                print(f"  P={plen:5d} N={n:4d} {impl:<22} {q[0]:8.2f} s [{q[1]:.2f}, {q[2]:.2f}] "
                      f"{tokens / q[0]:8.1f} tok/s  peak +{res['peak_mb']:.0f} MB  (load "
                      f"{os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
            base = results.get(BASELINE)
            for impl, (q, mb) in results.items():
                speedup = base[0][0] / q[0] if base else float("nan")
                rows.append(_row(impl, "speedup", "x", case, speedup, args.device))
                table.append(f"| {plen} | {n} | {impl} | {q[0]:.2f} | {tokens / q[0]:.1f} | {speedup:.2f}x | "
                             f"{mb:.0f} |")  # fmt: skip
    print("\n| P | N | implementation | time (s) | tokens/s | speedup | extra peak MB |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))
    return H.finish_script(OP, args.device, args.smoke, args.out, rows, failures)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: packed vs padded training throughput, shared-prompt packing, and reference-model modes.

    python -m bench.bench_packing                  # tiny model and SmolLM2-135M, CPU (minutes; quiet machine)
    python -m bench.bench_packing --smoke          # seconds: tiny model, small batch
    python -m bench.bench_packing --model smollm2 --device cuda

Three sections, one CSV ``bench/results/packing_<device>[_smoke].csv`` (columns of STYLE.md) and a table:

1. ``packing_<model>``: forward + backward of ``sum(logp)`` over the completion tokens of a mixed-length batch
   (prompts 16–64 tokens, completions long-tailed: log-normal, clipped to ``max_len``), three layouts:

   * ``packed``: one row, ``packed_forward`` + ``linear_logprobs`` on the ``M`` completion positions, with the
     default attention (flash-attn varlen on GPU when installed, else ``fastgrpo_varlen``: sdpa per sequence);
   * ``packed_mask``: the same row through transformers' ``sdpa`` with the block-diagonal mask it builds from
     the restarting ``position_ids`` (``N^2`` attention);
   * ``padded``: the same batch right-padded to ``[B, T]`` with an attention mask, the same decoder and the
     same ``linear_logprobs`` on the masked positions (isolates the cost of padding);
   * ``padded_logits``: the padded batch through the full model, ``[B, T, V]`` logits, ``log_softmax`` and
     ``gather`` (what a trainer without fastgrpo does).

   Metric ``tokens_per_s`` counts real (non-padding) tokens per second; ``speedup`` is packed over padded.
   Log-probs of all layouts are checked equal (fp32: 1e-4) before anything is timed.
2. ``shared_prompt_<model>``: ``G = 8`` completions of 32 tokens behind a 100-token prompt (4 prompts):
   shared-prompt packing (``pack_shared_prompt``: one prompt copy, 356 tokens per group) vs plain packing
   (8 copies, 1056 tokens per group); log-probs checked equal to 1e-5; ``tokens_saved`` and ``speedup``.
3. ``reference_<model>``: each ``ReferenceModel`` mode on a fixed set of completions (greedy rollouts of the
   policy on fixed prompts): ``memory`` (MB held beyond the policy), ``mean_abs_dlogp`` and exact ``mean_kl``
   (``KL(frozen || mode)`` per token from the full distributions) vs the frozen fp32 reference, and the time
   of one ``logprobs`` call.

Timing: ``p50`` / ``p20`` / ``p80`` of repeated calls after a warm-up (``bench._harness.time_call``:
``perf_counter`` on CPU, CUDA events on GPU).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Callable
from typing import Any

import torch

from bench import _harness as H

OP = "packing"


# ----------------------------------------------------------------------------------------------------------
# models and data


def load_model(name: str, device: str) -> tuple[torch.nn.Module, Any]:
    from fastgrpo.models import load_causal_lm

    # default attention: flash-attn varlen on GPU when installed, else fastgrpo_varlen (sdpa per sequence)
    model, tok = load_causal_lm(name, dtype=torch.float32, device=device)
    model.train()
    for m in model.modules():  # dropout off: timing and equality checks want a deterministic model
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, tok


def long_tailed_batch(
    batch: int, vocab: int, max_len: int, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompts uniform in [16, 64]; completions log-normal (median ~max_len/8), clipped to [1, max_len]."""
    gen = torch.Generator().manual_seed(seed)
    p_lens = torch.randint(16, 65, (batch,), generator=gen).tolist()
    median = max_len / 8
    c = torch.exp(math.log(median) + 1.0 * torch.randn(batch, generator=gen))
    c_lens = c.clamp(1, max_len).long().tolist()
    c_lens[0] = max_len  # the tail is what makes padding expensive: one sequence at the limit
    prompts = [torch.randint(4, vocab, (n,), generator=gen) for n in p_lens]
    completions = [torch.randint(4, vocab, (n,), generator=gen) for n in c_lens]
    return prompts, completions


def padded(prompts, completions, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``ids, attention_mask [B, T]``, the ``(row, col)`` of every completion-predicting position
    in packing order (``[M]`` each) and the targets ``[M]``."""
    seqs = [torch.cat([p, c]) for p, c in zip(prompts, completions)]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    rows, cols = [], []
    for i, (s, p, c) in enumerate(zip(seqs, prompts, completions)):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
        rows.append(torch.full((len(c),), i))
        cols.append(torch.arange(len(p) - 1, len(p) + len(c) - 1))
    targets = torch.cat(list(completions))
    return (
        ids.to(device),
        mask.to(device),
        torch.stack([torch.cat(rows), torch.cat(cols)]).to(device),
        targets.to(device),
    )


# ----------------------------------------------------------------------------------------------------------
# the layouts


def make_layouts(model, prompts, completions, device) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> callable returning per-completion-token log-probs ``[M]`` (differentiable)."""
    from fastgrpo import linear_logprobs
    from fastgrpo.packing import decoder_of, lm_head_of, pack, packed_logprobs

    batch = pack(prompts, completions, device=device)
    ids, mask, index, targets = padded(prompts, completions, device)
    head = lm_head_of(model)
    decoder = decoder_of(model)

    default_impl = model.config._attn_implementation

    def packed() -> torch.Tensor:
        model.set_attn_implementation(default_impl)
        return packed_logprobs(model, batch)

    def packed_mask() -> torch.Tensor:
        model.set_attn_implementation("sdpa")
        try:
            return packed_logprobs(model, batch)
        finally:
            model.set_attn_implementation(default_impl)

    def padded_same_head() -> torch.Tensor:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return linear_logprobs(hidden[index[0], index[1]], head.weight, targets, bias=head.bias)

    def padded_logits() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1)
        return logp[index[0], index[1], targets]

    return {
        "packed": packed,
        "packed_mask": packed_mask,
        "padded": padded_same_head,
        "padded_logits": padded_logits,
    }


def fwd_bwd_step(model, fn: Callable[[], torch.Tensor]) -> Callable[[Any], None]:
    def step(timer) -> None:
        model.zero_grad(set_to_none=True)
        with timer:
            fn().sum().backward()

    return step


# ----------------------------------------------------------------------------------------------------------
# rows


def row(op, backend, metric, unit, x_name, x_value, q, device) -> dict[str, Any]:
    p50, p20, p80 = q if isinstance(q, tuple) else (q, q, q)
    return {
        "op": op,
        "backend": backend,
        "mode": "fwd_bwd" if metric in ("time", "tokens_per_s", "speedup") else "check",
        "metric": metric,
        "unit": unit,
        "x_name": x_name,
        "x_value": x_value,
        "p50": f"{p50:.6g}",
        "p20": f"{p20:.6g}",
        "p80": f"{p80:.6g}",
        "dtype": "float32",
        **H.env_columns(device),
    }


def bench_padding(name, model, tok, device, smoke, timing, rows) -> bool:
    vocab = model.config.vocab_size
    b, max_len = (8, 64) if smoke else ((32, 512) if name == "tiny" else (16, 256))
    prompts, completions = long_tailed_batch(b, vocab, max_len, seed=0)
    real = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    t = max(len(p) + len(c) for p, c in zip(prompts, completions))
    pad_frac = 1 - real / (b * t)
    op, x_name, x_value = f"packing_{name}", "BxNxT", f"{b}x{real}x{t}"
    print(f"\n== {op}: B={b}, real tokens={real}, padded [B, T]=[{b}, {t}], padding {pad_frac:.0%}")
    rows.append(row(op, "padded", "padding_frac", "frac", x_name, x_value, pad_frac, device))
    layouts = make_layouts(model, prompts, completions, device)
    with torch.no_grad():
        outs = {k: fn() for k, fn in layouts.items()}
    ok = True
    for k, v in outs.items():
        err = (v - outs["padded_logits"]).abs().max().item()
        rows.append(row(op, k, "max_err", "abs", x_name, x_value, err, device))
        good = err <= 1e-4
        ok &= good
        print(f"  check {'ok  ' if good else 'FAIL'} {k:<14} max |Δ logp| vs padded_logits = {err:.2e}")
    if not ok:
        return False
    times = {}
    for k, fn in layouts.items():
        q = H.time_call(fwd_bwd_step(model, fn), device, timing)
        times[k] = q[0]
        tps = (real / q[0], real / q[2], real / q[1])
        rows.append(row(op, k, "time", "ms", x_name, x_value, tuple(x * 1e3 for x in q), device))
        rows.append(row(op, k, "tokens_per_s", "tok/s", x_name, x_value, tps, device))
        print(
            f"  time  {k:<14} {q[0] * 1e3:9.1f} ms [{q[1] * 1e3:.1f}, {q[2] * 1e3:.1f}]  {tps[0]:10.0f} tok/s"
        )
    for base in ("packed_mask", "padded", "padded_logits"):
        s = times[base] / times["packed"]
        rows.append(row(op, f"packed_vs_{base}", "speedup", "x", x_name, x_value, s, device))
        print(f"  speedup packed vs {base}: {s:.2f}x")
    model.zero_grad(set_to_none=True)
    return True


def bench_shared_prompt(name, model, tok, device, smoke, timing, rows) -> bool:
    from fastgrpo.packing import pack, pack_shared_prompt, packed_logprobs

    vocab = model.config.vocab_size
    n_prompts, g, p_len, c_len = (2, 8, 100, 32) if smoke else (4, 8, 100, 32)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, vocab, (p_len,), generator=gen) for _ in range(n_prompts)]
    groups = [[torch.randint(4, vocab, (c_len,), generator=gen) for _ in range(g)] for _ in range(n_prompts)]
    shared = pack_shared_prompt(prompts, groups, device=device)
    plain = pack([p for p in prompts for _ in range(g)], [c for grp in groups for c in grp], device=device)
    op, x_name = f"shared_prompt_{name}", "promptsxGxPxL"
    x_value = f"{n_prompts}x{g}x{p_len}x{c_len}"
    print(
        f"\n== {op}: {n_prompts} prompts x G={g} x {c_len} tokens behind {p_len}: rows of {shared.num_tokens} "
        f"(shared) vs {plain.num_tokens} (plain) tokens, {shared.tokens_saved} saved"
    )
    rows.append(row(op, "shared", "tokens_saved", "tokens", x_name, x_value, shared.tokens_saved, device))
    fns = {"shared": lambda: packed_logprobs(model, shared), "plain": lambda: packed_logprobs(model, plain)}
    with torch.no_grad():
        err = (fns["shared"]() - fns["plain"]()).abs().max().item()
    rows.append(row(op, "shared", "max_err", "abs", x_name, x_value, err, device))
    # tiny model: 1e-5. SmolLM2 (30 fp32 layers): any two attention layouts differ by ~3e-5 (packed vs padded
    # above), so it gets the padding check's 1e-4
    tol = 1e-5 if name == "tiny" else 1e-4
    print(
        f"  check {'ok  ' if err <= tol else 'FAIL'} shared vs plain max |Δ logp| = {err:.2e} (budget {tol:g})"
    )
    if err > tol:
        return False
    times = {}
    for k, fn in fns.items():
        q = H.time_call(fwd_bwd_step(model, fn), device, timing)
        times[k] = q[0]
        m = shared.num_targets
        rows.append(row(op, k, "time", "ms", x_name, x_value, tuple(x * 1e3 for x in q), device))
        rows.append(
            row(op, k, "tokens_per_s", "tok/s", x_name, x_value, (m / q[0], m / q[2], m / q[1]), device)
        )
        print(f"  time  {k:<8} {q[0] * 1e3:9.1f} ms  {m / q[0]:10.0f} completion tok/s")
    s = times["plain"] / times["shared"]
    rows.append(row(op, "shared_vs_plain", "speedup", "x", x_name, x_value, s, device))
    print(f"  speedup shared vs plain: {s:.2f}x")
    model.zero_grad(set_to_none=True)
    return True


def bench_references(name, model, tok, device, smoke, timing, rows) -> bool:
    import copy

    from fastgrpo import _backends
    from fastgrpo.models import ReferenceModel, smollm2_dir
    from fastgrpo.packing import lm_head_of, packed_forward
    from fastgrpo.rollout import generate_rollouts

    questions = [
        f"What is {a}+{b}? Put the final answer in <answer></answer>."
        for a, b in [(3, 4), (7, 1), (2, 6), (5, 5)]
    ]
    prompts = [[{"role": "user", "content": q}] for q in (questions[:2] if smoke else questions)]
    policy = model.eval()
    r = generate_rollouts(
        policy, tok, prompts, num_generations=2, max_new_tokens=8 if smoke else 32, seed=0, temperature=1.0
    )
    batch = r.pack(device=device)
    op, x_name, x_value = f"reference_{name}", "BxM", f"{r.prompt_ids.shape[0]}x{batch.num_targets}"
    print(f"\n== {op}: {r.prompt_ids.shape[0]} sampled completions, {batch.num_targets} tokens")

    def full_logp(module, adapter_off=False) -> torch.Tensor:
        head = lm_head_of(module)
        with torch.no_grad():
            h = packed_forward(module, batch)[batch.logit_index]
            z = (h @ head.weight.t() + (head.bias if head.bias is not None else 0)).float() * head.scale
            return torch.log_softmax(z, -1)

    frozen = ReferenceModel.from_policy(policy, "frozen")
    exact_lp = frozen.logprobs(batch)
    exact_full = full_logp(frozen.module())
    modes = ["frozen", "offload", "ema", "none"]
    if _backends.HAS_BNB:
        modes[1:1] = ["int8", "nf4"]
    try:
        import peft  # noqa: F401 - adapter-off needs a PEFT policy

        modes.append("adapter-off")
    except ImportError:
        pass
    ok = True
    for mode in modes:
        kwargs: dict[str, Any] = {}
        target = policy
        if mode in ("int8", "nf4") and name == "smollm2":
            kwargs["pretrained"] = smollm2_dir()
        if mode == "adapter-off":
            import peft

            target = peft.get_peft_model(
                copy.deepcopy(policy), peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"])
            )
        ref = ReferenceModel.from_policy(target, mode, **kwargs)
        q = H.time_call(lambda timer, ref=ref: _timed_logprobs(timer, ref, batch), device, timing)
        mb = ref.memory_bytes() / 2**20
        rows.append(row(op, mode, "memory", "MB", x_name, x_value, mb, device))
        rows.append(row(op, mode, "time", "ms", x_name, x_value, tuple(x * 1e3 for x in q), device))
        line = f"  {mode:<12} {mb:9.1f} MB  {q[0] * 1e3:8.1f} ms"
        if mode != "none":
            lp = ref.logprobs(batch)
            d = (lp - exact_lp).abs().mean().item()
            module = ref.module()
            if mode == "adapter-off":
                with module.disable_adapter():
                    full = full_logp(module)
            elif mode == "ema" and ref.ema.model is None:
                with ref.ema.swapped_in(module):
                    full = full_logp(module)
            else:
                full = full_logp(module)
            kl = (exact_full.exp() * (exact_full - full)).sum(-1).mean().item()
            rows.append(row(op, mode, "mean_abs_dlogp", "nats", x_name, x_value, d, device))
            rows.append(row(op, mode, "mean_kl", "nats", x_name, x_value, kl, device))
            line += f"  mean|Δlogp| {d:.2e}  mean KL {kl:.2e}"
            ok &= math.isfinite(d) and math.isfinite(kl)
        print(line)
        del ref
        gc.collect()
    policy.train()
    return ok


def _timed_logprobs(timer, ref, batch) -> None:
    with timer:
        ref.logprobs(batch)


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_packing", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny model, small batch, few repeats")
    p.add_argument(
        "--model", choices=["tiny", "smollm2", "all"], default=None, help="default: all (tiny if --smoke)"
    )
    p.add_argument("--section", choices=["padding", "shared", "reference", "all"], default="all")
    p.add_argument("--out", default=str(H.REPO / "bench" / "results"))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--min-time", type=float, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    timing = (
        H.TimingOptions(warmup=0, reps=1, min_time=0.0)
        if args.smoke
        else H.TimingOptions(warmup=1, reps=5, min_time=2.0)
    )
    if args.reps is not None:
        timing.reps = args.reps
    if args.min_time is not None:
        timing.min_time = args.min_time
    model_names = {"all": ["tiny", "smollm2"], None: ["tiny"] if args.smoke else ["tiny", "smollm2"]}.get(
        args.model, [args.model]
    )
    sections = {
        "padding": bench_padding,
        "shared": bench_shared_prompt,
        "reference": bench_references,
    }
    chosen = list(sections) if args.section == "all" else [args.section]
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for name in model_names:
        try:
            model, tok = load_model(name, args.device)
        except (FileNotFoundError, ImportError) as e:
            failures.append(f"{name}: cannot load ({e})")
            print(f"!! {name}: cannot load ({e})")
            continue
        for sec in chosen:
            if not sections[sec](name, model, tok, args.device, args.smoke, timing, rows):
                failures.append(f"{sec} on {name}: outputs did not match; timings not taken")
        del model
        gc.collect()
    return H.finish_script(OP, args.device, args.smoke, args.out, rows, failures)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: per-token log-probs (and entropies) of a linear head, ``fastgrpo.linear_logprobs``, against peers.

Implementations (``hidden [N, D]``, ``weight [V, D]``, ``targets [N]``; the backward is driven by
``(logp * g_logp).sum() + (entropy * g_ent).sum()`` with fixed random ``g``):

* ``fastgrpo-<backend>``: every backend ``fastgrpo`` can run on the device;
* ``naive``: materialised fp32 logits, ``log_softmax(...).gather`` and ``-(p * log p).sum()``;
* ``trl``: TRL 1.16's chunked log-prob/entropy function (``trl.kernels.ChunkedLogProbFunction``, what its
  ``GRPOTrainer`` runs through ``add_fused_lm_head``), vocabulary tiles of 32768;
* log-prob-only cases (``entropy=False``) on CUDA add ``liger`` (``LigerFusedLinearCrossEntropyLoss`` with
  ``reduction="none"``: ``-logp``; gradients computed in its forward) and ``cce`` (``cut_cross_entropy.
  linear_cross_entropy``, bf16/fp16 only).

Work formula (TFLOP/s): ``fwd`` one GEMM ``2·N·D·V``; ``bwd`` the two gradient GEMMs ``4·N·D·V``; ``fwd_bwd``
``6·N·D·V`` (an implementation that recomputes the logits in the backward does 8·N·D·V of work, credited 6).
``gemm_floor`` times those GEMMs alone on the same operands.
"""

from __future__ import annotations

import math
import sys

import torch

from bench._harness import (
    Case,
    Impl,
    Setup,
    gemm_floor,
    make_generator,
    our_backends,
    ours,
    peer_import,
    prepare_tensor,
)

OP = "logprobs"
MODES = ("fwd", "bwd", "fwd_bwd")
MEM_MODES = ("fwd", "fwd_bwd")
FLOOR_NAME = "gemm_floor"


def cases(device: str, smoke: bool) -> list[Case]:
    small = {"N": 257, "D": 64, "V": 1000}
    out = [
        Case(
            "check-entropy",
            dict(small),
            "float32",
            device,
            {"entropy": True, "temperature": 0.7},
            timed=False,
        ),
        Case("check-logp", dict(small), "float32", device, {"entropy": False}, seed=1, timed=False),
    ]
    if smoke:
        shape = {"N": 64, "D": 64, "V": 512}
        out += [
            Case("smoke", dict(shape), "float32", device, {"entropy": True}),
            Case("smoke", dict(shape), "bfloat16", device, {"entropy": True}),
        ]
    elif device == "cpu":
        out += [
            Case("cpu-small", {"N": 1024, "D": 512, "V": 16384}, "float32", device, {"entropy": True}),
            Case("cpu", {"N": 4096, "D": 1024, "V": 32000}, "float32", device, {"entropy": True}),
            # bf16 on CPU: N = 128 only (see bench_grpo_loss.py: bf16 GEMMs without native bf16 support)
            Case("cpu-bf16", {"N": 128, "D": 1024, "V": 32000}, "bfloat16", device, {"entropy": True}),
        ]
    else:
        out += [
            Case("cpu-size", {"N": 4096, "D": 1024, "V": 32000}, "bfloat16", device, {"entropy": True}),
            Case("llama3", {"N": 16384, "D": 4096, "V": 128256}, "bfloat16", device, {"entropy": True}),
            Case("qwen2.5", {"N": 16384, "D": 4096, "V": 151936}, "bfloat16", device, {"entropy": True}),
            Case("llama3-logp", {"N": 16384, "D": 4096, "V": 128256}, "bfloat16", device, {"entropy": False}),
        ]
    return out


def work(case: Case, mode: str) -> tuple[float, str]:
    gemms = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[mode]
    return 2.0 * gemms * case.shape["N"] * case.shape["D"] * case.shape["V"], "TFLOP/s"


def setup(case: Case, only: set[str] | None = None, upcast: bool = False) -> Setup:
    N, D, V = (case.shape[k] for k in ("N", "D", "V"))
    dev = torch.device(case.device)
    gen = make_generator(case)
    p = case.params
    temperature = p.get("temperature", 1.0)
    with_entropy = p.get("entropy", True)
    hidden = prepare_tensor(torch.randn(N, D, generator=gen, device=dev), case, upcast, requires_grad=True)
    w = torch.randn(V, D, generator=gen, device=dev) * (2.5 / math.sqrt(D))
    weight = prepare_tensor(w, case, upcast, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=gen, device=dev)
    g_logp = torch.randn(N, generator=gen, device=dev)
    g_ent = torch.randn(N, generator=gen, device=dev)
    inputs = {"hidden": hidden, "weight": weight, "targets": targets}
    impls: dict[str, Impl] = {}
    skipped: dict[str, str] = {}
    want = lambda name: only is None or name in only

    def loss_of(out):
        logp, entropy = out
        loss = (logp * g_logp).sum()
        return loss + (entropy * g_ent).sum() if entropy is not None else loss

    def named(out):
        logp, entropy = out
        return {"logp": logp} if entropy is None else {"logp": logp, "entropy": entropy}

    fg = ours()
    backends, unavailable = (
        our_backends(case.device) if fg is not None else ([], {"*": "fastgrpo not importable"})
    )
    for name, why in unavailable.items():
        skipped[f"fastgrpo-{name}"] = why
    for b in backends:
        if want(f"fastgrpo-{b}"):

            def run(b=b):
                out = fg.linear_logprobs(
                    hidden, weight, targets, temperature=temperature, return_entropy=with_entropy, backend=b
                )
                return out if with_entropy else (out, None)

            impls[f"fastgrpo-{b}"] = Impl(run, loss_of, named)
    reference = f"fastgrpo-{backends[0]}" if backends else "naive"

    if want("naive"):

        def naive():
            logits = (hidden @ weight.t()).float() / temperature
            logprobs = torch.log_softmax(logits, dim=-1)
            logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
            entropy = -(logprobs.exp() * logprobs).sum(-1) if with_entropy else None
            return logp, entropy

        impls["naive"] = Impl(naive, loss_of, named)

    if want("trl"):
        trl_kernels = peer_import("trl.kernels", skipped, "trl")
        fn = getattr(trl_kernels, "ChunkedLogProbFunction", None) if trl_kernels else None
        if trl_kernels is not None and fn is None:
            skipped["trl"] = "trl.kernels has no ChunkedLogProbFunction (TRL < 1.16?)"
        if fn is not None:
            outputs = ("entropy",) if with_entropy else ()

            def trl_run():
                logp, entropy, *_ = fn.apply(
                    hidden, weight, None, targets, temperature, 32768, None, 1.0, outputs
                )
                return logp, entropy

            impls["trl"] = Impl(trl_run, loss_of, named)

    log_prob_only_peers = {"liger": "liger_kernel.transformers", "cce": "cut_cross_entropy"}
    for name, module in log_prob_only_peers.items():
        if not want(name):
            continue
        if case.device != "cuda":
            skipped[name] = "Triton kernel: CUDA only"
            continue
        if with_entropy or temperature != 1.0:
            skipped[name] = (
                "log-prob only, temperature 1 (no entropy output): runs in the entropy=False cases"
            )
            continue
        if name == "cce" and case.dtype == "float32":
            skipped[name] = "cut-cross-entropy's kernel takes bf16/fp16 inputs only"
            continue
        m = peer_import(module, skipped, name)
        if m is None:
            continue
        if name == "liger":
            flce = m.LigerFusedLinearCrossEntropyLoss(reduction="none")
            impls[name] = Impl(
                lambda flce=flce: (-flce(weight, hidden, targets), None),
                loss_of,
                named,
                "computes the gradients during the forward: its fwd is credited with the fwd_bwd work and floor",
                grads_in_forward=True,
            )
        else:
            lce = m.linear_cross_entropy
            impls[name] = Impl(
                lambda lce=lce: (-lce(hidden, weight, targets, reduction="none"), None), loss_of, named
            )

    floor = None
    if case.timed and only is None:
        floor = gemm_floor(hidden, weight, gen)

    return Setup(inputs, ["hidden", "weight"], impls, skipped, floor, reference)


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--op", OP, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

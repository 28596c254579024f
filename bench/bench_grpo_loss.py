"""Benchmark: the fused GRPO loss from hidden states (``fastgrpo.grpo_loss``) against its peers.

Implementations (same inputs, padded layout ``hidden [B, T, D]``, ``mask [B, T]``, ``advantages [B]``):

* ``fastgrpo-<backend>``: every backend ``fastgrpo`` can run on the device (the others are listed as skipped);
* ``naive``: materialised fp32 logits, ``log_softmax(...).gather`` and TRL 1.16's ``GRPOTrainer`` loss formulas;
* ``trl``: what ``GRPOTrainer`` runs in TRL 1.16 — its chunked log-prob/entropy function
  (``trl.kernels.ChunkedLogProbFunction``, vocabulary tiles of 32768) followed by the same loss formulas;
* ``liger``: ``LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=beta > 0)`` (it computes the gradients
  during its forward, so its ``fwd`` time holds the backward too and its ``bwd`` is a scaling);
* ``liger-triton`` (CUDA): materialised logits + Liger's logits-level Triton GRPO loss (``triton_grpo_loss``).

Work formula (printed as TFLOP/s): the GEMMs of the op, ``2·N·D·V`` per GEMM with ``N = B·T`` —
``fwd`` 1 GEMM (logits), ``bwd`` 2 (grad-hidden ``dZ @ W`` and grad-weight ``dZ^T @ H``), ``fwd_bwd`` 3
(``6·N·D·V``, the one-pass floor; an implementation that recomputes the logits in its backward does 8·N·D·V of
real work but is credited 6). The floor (``gemm_floor``) times exactly those GEMMs alone on the same operands.
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

ONE_PASS_NOTE = (
    "computes the gradients during the forward: its fwd is credited with the fwd_bwd work and floor, "
    "its bwd only scales the stored gradients"
)
OP = "grpo_loss"
MODES = ("fwd", "bwd", "fwd_bwd")
MEM_MODES = ("fwd_bwd",)
FLOOR_NAME = "gemm_floor"

# The timed configuration: DAPO's token-level loss with clip-higher and a k3 KL term, off-policy ratios.
TIMED = {"loss_type": "dapo", "beta": 0.04, "eps_low": 0.2, "eps_high": 0.28, "off_policy": True}

# Check-only configurations (small, ragged masks incl. a length-1 and an empty sequence): every loss type the
# peers share, with and without KL, GSPO, the two-sided clip, temperature, on-policy.
CHECKS = [
    {"loss_type": lt, "beta": beta, "eps_low": 0.2, "eps_high": 0.28, "off_policy": True}
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
    for beta in (0.0, 0.04)
] + [
    {
        "loss_type": "grpo",
        "beta": 0.0,
        "importance_level": "sequence",
        "eps_low": 3e-4,
        "eps_high": 4e-4,
        "off_policy": True,
    },
    {"loss_type": "dapo", "beta": 0.0, "delta": 1.5, "eps_low": 0.2, "eps_high": 0.2, "off_policy": True},
    {"loss_type": "bnpo", "beta": 0.04, "temperature": 0.7, "off_policy": True},
    {"loss_type": "dapo", "beta": 0.0, "off_policy": False},
]


def cases(device: str, smoke: bool) -> list[Case]:
    out: list[Case] = []
    small = {"B": 4, "T": 33, "D": 64, "V": 1000}
    for i, p in enumerate(CHECKS):
        out.append(
            Case(f"check{i}", dict(small), "float32", device, {**p, "ragged": True}, seed=i, timed=False)
        )
    if smoke:
        shape = {"B": 2, "T": 32, "D": 64, "V": 512}
        out += [
            Case("smoke", dict(shape), "float32", device, dict(TIMED)),
            Case("smoke", dict(shape), "bfloat16", device, dict(TIMED)),
        ]
    elif device == "cpu":
        out += [
            Case("cpu-small", {"B": 8, "T": 128, "D": 512, "V": 16384}, "float32", device, dict(TIMED)),
            Case("cpu", {"B": 16, "T": 256, "D": 1024, "V": 32000}, "float32", device, dict(TIMED)),
            # bf16 on CPU: N = 128 only, because torch's bf16 GEMMs on a CPU without native bf16 (AVX2) take
            # ~0.3 s per token row here (naive and Liger run them; fastgrpo computes them in fp32: _engine.py)
            Case("cpu-bf16", {"B": 1, "T": 128, "D": 1024, "V": 32000}, "bfloat16", device, dict(TIMED)),
        ]
    else:
        out += [
            Case("cpu-size", {"B": 16, "T": 256, "D": 1024, "V": 32000}, "bfloat16", device, dict(TIMED)),
            Case("llama3", {"B": 16, "T": 256, "D": 4096, "V": 128256}, "float32", device, dict(TIMED)),
            Case("llama3", {"B": 64, "T": 256, "D": 4096, "V": 128256}, "bfloat16", device, dict(TIMED)),
            Case("qwen2.5", {"B": 64, "T": 256, "D": 4096, "V": 151936}, "bfloat16", device, dict(TIMED)),
        ]
    return out


def work(case: Case, mode: str) -> tuple[float, str]:
    n = case.shape["B"] * case.shape["T"]
    gemms = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[mode]
    return 2.0 * gemms * n * case.shape["D"] * case.shape["V"], "TFLOP/s"


# ----------------------------------------------------------------------------------------------------------
# TRL 1.16's GRPOTrainer loss formulas (one process, no gradient accumulation), written from its definitions
# ----------------------------------------------------------------------------------------------------------


def trl_formula_loss(logp, mask, adv, old_logp, ref_logp, p: dict, max_completion_length: int, num_items):
    m = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    log_ratio = logp - old
    if p.get("importance_level", "token") == "sequence":
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w)
    a = adv.unsqueeze(1)
    eps_low = p.get("eps_low", 0.2)
    eps_high = p.get("eps_high") if p.get("eps_high") is not None else eps_low
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    if p.get("delta") is not None:
        ratio = ratio.clamp(max=p["delta"])
    per_token = -torch.minimum(ratio * a, clipped * a)
    beta = p.get("beta", 0.0)
    if beta != 0.0:
        d = ref_logp - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    lt = p["loss_type"]
    if lt == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if lt == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if lt == "dr_grpo":
        return (per_token * m).sum() / (per_token.shape[0] * max_completion_length)
    if lt == "dapo":
        return (per_token * m).sum() / torch.as_tensor(num_items, dtype=logp.dtype).clamp(min=1.0)
    raise ValueError(f"no TRL formula for loss_type {lt!r} here")


def _logp_entropy_materialised(hidden, weight, targets, temperature):
    logits = (hidden @ weight.t()).float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


@torch.no_grad()
def _current_logp(hidden, weight, targets, temperature, rows: int = 1024):
    """Log-probs of the policy being optimised, in row chunks (small temporaries: the memory probe's baseline)."""
    b, t, d = hidden.shape
    h, y = hidden.reshape(-1, d), targets.reshape(-1)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
    w = weight.float()
    for s in range(0, h.shape[0], rows):
        z = (h[s : s + rows].float() @ w.t()) / temperature
        out[s : s + rows] = z.gather(1, y[s : s + rows, None]).squeeze(1) - torch.logsumexp(z, -1)
    return out.view(b, t)


# ----------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------


def setup(case: Case, only: set[str] | None = None, upcast: bool = False) -> Setup:
    p = case.params
    B, T, D, V = (case.shape[k] for k in ("B", "T", "D", "V"))
    dev = torch.device(case.device)
    gen = make_generator(case)
    temperature = p.get("temperature", 1.0)

    hidden = torch.randn(B, T, D, generator=gen, device=dev)
    weight = torch.randn(V, D, generator=gen, device=dev) * (2.5 / math.sqrt(D))  # logits std ~2.5
    targets = torch.randint(0, V, (B, T), generator=gen, device=dev)
    advantages = torch.randn(B, generator=gen, device=dev)
    if p.get("ragged"):
        lengths = torch.randint(1, T + 1, (B,), generator=gen, device=dev)
        lengths[0], lengths[-1] = 1, 0  # a one-token and an empty completion
        mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).float()
    else:
        mask = torch.ones(B, T, device=dev)
    hidden = prepare_tensor(hidden, case, upcast, requires_grad=True)
    weight = prepare_tensor(weight, case, upcast, requires_grad=True)
    logp_now = _current_logp(hidden.detach(), weight.detach(), targets, temperature)
    old_logp = logp_now + 0.15 * torch.randn(B, T, generator=gen, device=dev) if p.get("off_policy") else None
    beta = p.get("beta", 0.0)
    ref_logp = logp_now + 0.1 * torch.randn(B, T, generator=gen, device=dev) if beta > 0 else None
    del logp_now
    num_items = mask.sum()
    inputs = {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask, "advantages": advantages}
    eps_low = p.get("eps_low", 0.2)
    eps_high = p.get("eps_high", eps_low)
    imp = p.get("importance_level", "token")
    impls: dict[str, Impl] = {}
    skipped: dict[str, str] = {}
    want = lambda name: only is None or name in only

    def loss_of(out):
        return out.loss

    # --- ours --------------------------------------------------------------------------------------------
    fg = ours()
    backends, unavailable = (
        our_backends(case.device) if fg is not None else ([], {"*": "fastgrpo not importable"})
    )
    for name, why in unavailable.items():
        skipped[f"fastgrpo-{name}"] = why
    for b in backends:
        if not want(f"fastgrpo-{b}"):
            continue

        def run(b=b):
            return fg.grpo_loss(
                hidden,
                weight,
                targets,
                advantages,
                mask=mask,
                old_logp=old_logp,
                ref_logp=ref_logp,
                beta=beta,
                loss_type=p["loss_type"],
                importance_level=imp,
                eps_low=eps_low,
                eps_high=eps_high,
                delta=p.get("delta"),
                temperature=temperature,
                max_completion_length=T,
                num_items_in_batch=num_items,
                backend=b,
            )

        one_pass = imp == "token" and b != "triton"
        impls[f"fastgrpo-{b}"] = Impl(
            run,
            loss_of,
            lambda o: {"loss": o.loss, "logp": o.logp, "entropy": o.entropy},
            ONE_PASS_NOTE if one_pass else "",
            grads_in_forward=one_pass,
        )
    # the reference is fastgrpo's exact torch backend (first in its list); naive when fastgrpo is missing
    reference = f"fastgrpo-{backends[0]}" if backends else "naive"

    # --- naive -------------------------------------------------------------------------------------------
    if want("naive"):

        def naive():
            logp, entropy = _logp_entropy_materialised(hidden, weight, targets, temperature)
            loss = trl_formula_loss(logp, mask, advantages, old_logp, ref_logp, p, T, num_items)
            return loss, logp * mask, entropy * mask

        impls["naive"] = Impl(naive, lambda o: o[0], lambda o: {"loss": o[0], "logp": o[1], "entropy": o[2]})

    # --- TRL 1.16: chunked log-probs + the same formulas ---------------------------------------------------
    if want("trl"):
        trl_kernels = peer_import("trl.kernels", skipped, "trl")
        fn = getattr(trl_kernels, "ChunkedLogProbFunction", None) if trl_kernels else None
        if trl_kernels is not None and fn is None:
            skipped["trl"] = "trl.kernels has no ChunkedLogProbFunction (TRL < 1.16?)"
        if fn is not None:

            def trl_run():
                logp, entropy, *_ = fn.apply(
                    hidden.reshape(-1, D),
                    weight,
                    None,
                    targets.reshape(-1),
                    temperature,
                    32768,
                    None,
                    1.0,
                    ("entropy",),
                )
                logp, entropy = logp.view(B, T), entropy.view(B, T)
                loss = trl_formula_loss(logp, mask, advantages, old_logp, ref_logp, p, T, num_items)
                return loss, logp * mask, entropy * mask

            impls["trl"] = Impl(
                trl_run, lambda o: o[0], lambda o: {"loss": o[0], "logp": o[1], "entropy": o[2]}
            )

    # --- Liger: chunked fused linear GRPO loss (pure torch, compiled=False) ---------------------------------
    if want("liger"):
        lg = peer_import("liger_kernel.chunked_loss", skipped, "liger")
        if lg is not None:
            liger_loss = lg.LigerFusedLinearGRPOLoss(
                beta=beta,
                compiled=False,
                use_ref_model=beta > 0,
                epsilon_low=eps_low,
                epsilon_high=eps_high,
                loss_type=p["loss_type"],
                max_completion_length=T,
                importance_sampling_level=imp,
                temperature=temperature,
                delta=p.get("delta"),
            )

            def liger_run():
                return liger_loss(
                    hidden,
                    weight,
                    targets,
                    mask,
                    advantages,
                    ref_per_token_logps=ref_logp,
                    old_per_token_logps=old_logp,
                    num_items_in_batch=num_items,
                )

            impls["liger"] = Impl(
                liger_run, lambda o: o[0], lambda o: {"loss": o[0]}, ONE_PASS_NOTE, grads_in_forward=True
            )

    # --- Liger: logits-level Triton GRPO loss (CUDA only) -------------------------------------------------
    if want("liger-triton"):
        if case.device != "cuda":
            skipped["liger-triton"] = "Triton kernel: CUDA only"
        else:
            lt_mod = peer_import("liger_kernel.transformers.grpo_loss", skipped, "liger-triton")
            if lt_mod is not None:

                def liger_triton_run():
                    # Liger's kernel reads logits[:, :-1]: one extra (unused) position per row
                    h_ext = torch.cat([hidden, hidden[:, -1:]], dim=1)
                    logits = h_ext @ weight.t()
                    return lt_mod.triton_grpo_loss(
                        logits,
                        old_logp,
                        ref_logp,
                        targets,
                        advantages,
                        completion_mask=mask,
                        temperature=temperature,
                        beta=beta,
                        eps_low=eps_low,
                        eps_high=eps_high,
                        inplace=True,
                        loss_type=p["loss_type"],
                        max_completion_length=T,
                        importance_sampling_level=imp,
                        reduce=True,
                        delta=p.get("delta"),
                        num_items_in_batch=num_items,
                    )

                impls["liger-triton"] = Impl(liger_triton_run, lambda o: o[0], lambda o: {"loss": o[0]})

    # --- the GEMM floor: the three matrix products alone ---------------------------------------------------
    floor = None
    if case.timed and only is None:
        floor = gemm_floor(hidden.reshape(-1, D), weight, gen)

    return Setup(inputs, ["hidden", "weight"], impls, skipped, floor, reference)


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--op", OP, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

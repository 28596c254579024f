"""One GRPO step's model work on a vision-language policy: prompt-once packing vs one prompt copy per
completion vs TRL 1.16's GRPOTrainer loss computation, same model, same batch, one run.

    python -m bench.bench_vlm            # random Qwen2.5-VL, hidden 512, 4 layers, 448x448 images, G=8, 64-token completions
    python -m bench.bench_vlm --smoke    # seconds: tiny shapes, one timed repetition, checks all three run and agree

Measured per layout (policy forward + backward of the loss, plus the reference forward, in fp32 on the same
weights and inputs):

* ``prompt-once`` — fastgrpo's shared-prompt packing: each prompt and its image tokens once per group, the
  vision encoder once per unique image, completions attending to the prompt and themselves
  (``pack_shared_prompt`` + ``packed_forward`` + the fused ``grpo_loss``; reference: ``ReferenceModel`` frozen).
* ``per-completion`` — fastgrpo's plain varlen packing with one prompt copy per completion (``pack``).
* ``trl`` — TRL 1.16 ``GRPOTrainer``: padded rows (left-padded prompt + completion), ``pixel_values`` repeated
  per completion, the model patched with TRL's fused LM head (``add_fused_lm_head``), log-probs through
  ``GRPOTrainer._get_per_token_logps_and_entropies`` (called unbound on a minimal trainer stand-in: the method
  reads only ``self.accelerator``), and TRL's ``dapo`` loss formula with the k3 KL (``beta=0.04``).

Before timing, every layout's policy log-probs and loss are compared with prompt-once's (fp32: 1e-4).
Reported: step time (p50/p20/p80), tokens/s with the same token count for every layout (every sample's prompt
plus completion tokens: ``sum_b P_b + L_b``), and extra peak memory of one step (RSS high-water mark in a fresh
process, ``bench/_harness`` conventions). Outputs ``<out>/vlm_<device>[_smoke].csv`` (STYLE.md columns,
``op=vlm_step``) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import _harness as H

OP = "vlm_step"
LAYOUTS = ("prompt-once", "per-completion", "trl")
BETA = 0.04
EPS = 0.2


def shapes(smoke: bool) -> dict[str, int]:
    if smoke:
        return dict(hidden=64, layers=1, heads=4, kv_heads=2, inter=128, vis_hidden=32, vis_depth=1, vis_heads=2,
                    image=112, prompts=1, G=4, L=8, vocab=1024)  # fmt: skip
    return dict(hidden=512, layers=4, heads=8, kv_heads=2, inter=1408, vis_hidden=256, vis_depth=2, vis_heads=4,
                image=448, prompts=2, G=8, L=64, vocab=32768)  # fmt: skip


class Step:
    """The model, the batch and one callable per layout (each does one full step's model work)."""

    def __init__(self, s: dict[str, int], seed: int = 0):
        from fastgrpo.models import ReferenceModel
        from fastgrpo.tasks.base import Example
        from fastgrpo.tiny import tiny_vlm
        from fastgrpo.vlm import encode_prompts

        self.s = s
        model, proc = tiny_vlm("qwen2.5-vl", seed=seed, hidden_size=s["hidden"], num_layers=s["layers"],
                               num_heads=s["heads"], num_kv_heads=s["kv_heads"], intermediate_size=s["inter"],
                               vision_hidden_size=s["vis_hidden"], vision_depth=s["vis_depth"],
                               vision_heads=s["vis_heads"], init_std=0.02, max_pixels=s["image"] ** 2,
                               vocab_size=s["vocab"])  # fmt: skip
        model.train()
        for p in model.model.visual.parameters():  # the default: vision tower frozen
            p.requires_grad_(False)
        self.model, self.proc = model, proc
        rng = np.random.default_rng(seed)
        from PIL import Image

        examples = [
            Example([{"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": f"What is {k}+{k + 1}? Think step by step."}]}],
                    str(2 * k + 1),
                    images=[Image.fromarray(rng.integers(0, 256, (s["image"], s["image"], 3), dtype=np.uint8))])
            for k in range(s["prompts"])
        ]  # fmt: skip
        self.enc = encode_prompts(proc, examples)
        g = torch.Generator().manual_seed(seed)
        special = set(proc.tokenizer.all_special_ids)
        allowed = torch.tensor([i for i in range(len(proc.tokenizer)) if i not in special])
        self.comps = [[allowed[torch.randint(len(allowed), (s["L"],), generator=g)].tolist() for _ in range(s["G"])]
                      for _ in self.enc]  # fmt: skip
        self.adv = torch.randn(s["prompts"] * s["G"], generator=g)
        self.ref = ReferenceModel.from_policy(model, "frozen")
        self.tokens = sum((len(e.ids) + s["L"]) * s["G"] for e in self.enc)
        self.image_tokens = int(sum((e.vision.mm_token_type_ids == 1).sum() for e in self.enc))

    # -- fastgrpo ------------------------------------------------------------------------------------------
    def _ours(self, shared: bool) -> dict[str, torch.Tensor]:
        from fastgrpo.ops.grpo_loss import grpo_loss
        from fastgrpo.packing import lm_head_of, pack, pack_shared_prompt, packed_forward

        if shared:
            batch = pack_shared_prompt(
                [e.ids for e in self.enc], self.comps, vision=[e.vision for e in self.enc]
            )
        else:
            batch = pack([e.ids for e, cs in zip(self.enc, self.comps) for _ in cs],
                         [c for cs in self.comps for c in cs],
                         vision=[e.vision for e, cs in zip(self.enc, self.comps) for _ in cs])  # fmt: skip
        ref_logp = self.ref.logprobs(batch)
        hidden = packed_forward(self.model, batch)
        head = lm_head_of(self.model)
        out = grpo_loss(hidden.index_select(0, batch.logit_index), head.weight, batch.targets, self.adv,
                        cu_seqlens=batch.completion_cu_seqlens, ref_logp=ref_logp, beta=BETA, loss_type="dapo",
                        eps_low=EPS)  # fmt: skip
        out.loss.backward()
        return {"loss": out.loss.detach(), "logp": out.logp.detach()}

    # -- TRL 1.16 ------------------------------------------------------------------------------------------
    def trl_setup(self) -> None:
        from accelerate import Accelerator
        from trl.trainer.grpo_trainer import GRPOTrainer, add_fused_lm_head

        self._trl_fn = GRPOTrainer._get_per_token_logps_and_entropies
        self._trl_self = types.SimpleNamespace(accelerator=Accelerator(cpu=True))
        self.trl_policy = copy.deepcopy(self.model)
        self.trl_ref = copy.deepcopy(self.ref.model)
        add_fused_lm_head(self.trl_policy, temperature=1.0, outputs=("log_probs", "entropy"))
        add_fused_lm_head(self.trl_ref, temperature=1.0)
        from fastgrpo.vlm import generation_inputs

        rows = [e for e in self.enc for _ in range(self.s["G"])]
        kw = generation_inputs(
            rows, self.proc.tokenizer.pad_token_id, model=self.model
        )  # left-padded prompts
        comp = torch.tensor([c for cs in self.comps for c in cs])
        self.trl_inputs = dict(
            input_ids=torch.cat([kw["input_ids"], comp], 1),
            attention_mask=torch.cat([kw["attention_mask"], torch.ones_like(comp)], 1),
            logits_to_keep=comp.shape[1],
            pixel_values=kw[
                "pixel_values"
            ],  # one copy of each prompt's image per completion, as TRL batches them
            image_grid_thw=kw["image_grid_thw"],
            num_images=[1] * len(rows),
            mm_token_type_ids=torch.cat([kw["mm_token_type_ids"], torch.zeros_like(comp)], 1),
        )
        self.trl_mask = torch.ones_like(comp, dtype=torch.float32)

    def _trl(self) -> dict[str, torch.Tensor]:
        inp = dict(self.trl_inputs)
        ids, attn, keep = inp.pop("input_ids"), inp.pop("attention_mask"), inp.pop("logits_to_keep")
        with torch.no_grad():
            ref_logp, _, _ = self._trl_fn(self._trl_self, self.trl_ref, ids, attn, keep, **inp)
        logp, _, _ = self._trl_fn(
            self._trl_self, self.trl_policy, ids, attn, keep, compute_entropy=True, **inp
        )
        # GRPOTrainer._compute_loss, loss_type="dapo", on-policy (old = logp.detach()), k3 KL
        adv = self.adv[:, None]
        ratio = torch.exp(logp - logp.detach())
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - EPS, 1 + EPS) * adv)
        per_token = per_token + BETA * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
        loss = (per_token * self.trl_mask).sum() / self.trl_mask.sum()
        loss.backward()
        return {"loss": loss.detach(), "logp": logp.detach().reshape(-1)}

    def run(self, layout: str) -> dict[str, torch.Tensor]:
        model = self.trl_policy if layout == "trl" else self.model
        model.zero_grad(set_to_none=True)
        if layout == "trl":
            return self._trl()
        return self._ours(shared=layout == "prompt-once")


def _probe(layout: str, smoke: bool) -> None:
    """Child process: build, warm up, then print the extra peak RSS (MiB) of one step as JSON."""
    torch.manual_seed(0)
    step = Step(shapes(smoke))
    if layout == "trl":
        step.trl_setup()
    step.run(layout)  # warm-up: lazy allocations and gradients exist before the measured step
    gc.collect()
    base = H._status_kb("VmRSS")
    exact = H.reset_peak_rss()
    step.run(layout)
    peak = H._status_kb("VmHWM") if exact else None
    print(json.dumps({"mb": (peak - base) / 1024 if peak is not None and base is not None else None}))


def _peak_in_child(layout: str, smoke: bool) -> float | None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(H.REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # freed large blocks leave RSS (harness note)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    cmd = [sys.executable, "-m", "bench.bench_vlm", "--probe", layout] + (["--smoke"] if smoke else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=H.REPO, timeout=3600)
    if r.returncode != 0:
        print(f"memory probe of {layout} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])["mb"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=H.REPO / "bench" / "results")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--probe", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        _probe(args.probe, args.smoke)
        return 0
    s = shapes(args.smoke)
    step = Step(s)
    step.trl_setup()
    case = H.Case("qwen2.5-vl", {"B": s["prompts"] * s["G"], "P": len(step.enc[0].ids), "L": s["L"],
                                 "D": s["hidden"], "V": s["vocab"]})  # fmt: skip
    env = H.env_columns("cpu")
    rows: list[dict[str, Any]] = []
    ref = step.run("prompt-once")
    failures = []
    for layout in LAYOUTS[1:]:
        got = step.run(layout)
        err = max((got[k] - ref[k]).abs().max().item() for k in ("loss", "logp"))
        ok = err <= 1e-4
        rows.append(H._row(OP, case, layout, "train", "max_err", "abs", (err, err, err), env))
        rows.append(H._row(OP, case, layout, "train", "check", "pass", (float(ok),) * 3, env))
        if not ok:
            failures.append(f"{layout}: max abs error {err:.3g} against prompt-once")
    opts = H.TimingOptions(warmup=1, reps=args.reps or (1 if args.smoke else 3), min_time=0.0,
                           max_reps=args.reps or (1 if args.smoke else 3))  # fmt: skip
    table = []
    for layout in LAYOUTS:
        if any(f.startswith(layout) for f in failures):
            continue

        def one(timer, layout=layout):
            with timer:
                step.run(layout)

        q = H.time_call(one, "cpu", opts)
        mem = None if args.no_memory else _peak_in_child(layout, args.smoke)
        rows.append(H._row(OP, case, layout, "train", "time", "s", q, env))
        tps = tuple(step.tokens / t for t in (q[0], q[2], q[1]))
        rows.append(H._row(OP, case, layout, "train", "tokens_per_s", "tok/s", tps, env))
        if mem is not None:
            rows.append(H._row(OP, case, layout, "train", "peak_mem", "MB", (mem, mem, mem), env))
        table.append((layout, q[0], tps[0], mem))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"vlm_cpu{'_smoke' if args.smoke else ''}"
    H.write_csv(args.out / f"{stem}.csv", rows)
    base = {name: (t, tp, m) for name, t, tp, m in table}
    lines = [
        f"<!-- {OP} on {env['device']}; torch {env['torch']}, fastgrpo @ {env['git_sha']} -->",
        f"Qwen2.5-VL (random) D={s['hidden']} layers={s['layers']} V={s['vocab']}, {s['prompts']} prompt(s) x "
        f"G={s['G']}, {step.image_tokens // s['prompts']} image tokens / prompt, P={len(step.enc[0].ids)}, "
        f"L={s['L']}; {step.tokens} tokens per step (every sample's prompt + completion)",
        "",
        "| layout | step time (s, p50) | tokens/s | extra peak memory (MB) | tokens/s vs prompt-once | memory vs trl |",
        "|---|---|---|---|---|---|",
    ]
    for name, t, tp, m in table:
        ratio = base["prompt-once"][1] / tp if "prompt-once" in base else float("nan")
        mem_ratio = (
            (m / base["trl"][2]) if m is not None and "trl" in base and base["trl"][2] else float("nan")
        )
        mtxt = f"{m:.0f}" if m is not None else "n/a"
        lines.append(f"| {name} | {t:.3f} | {tp:.0f} | {mtxt} | 1/{ratio:.2f} | {mem_ratio:.2f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for f in failures:
        print("FAILED:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

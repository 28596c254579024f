"""Pinned metrics of short ``--tiny`` runs: refactors of the trainer's plumbing must not change a single bit.

Each case trains the tiny model for a few steps through one path of the loop (plain / shared-prompt packing,
several micro-batches, KL with behaviour log-probs, COPO, PRM, GRPO-CARE with LoRA and an EMA reference, DAPO
dynamic sampling with truncation masking, MMR1 re-scoring). The expected metrics (every per-step metric but the
timings) and a digest of the final parameters live in ``tests/data/pinned_runs.json``, recorded per machine
kind: float rounding of the GEMMs depends on the CPU's instruction set, so on the machine kind that recorded them
the comparison is exact (metrics and parameters bit for bit); elsewhere the discrete metrics must be equal and the
continuous ones equal to 1e-4 relative (a different GEMM kernel, not a different computation).

Re-record after an intended change of behaviour (and say why in the commit):
``PYTHONPATH=. python tests/test_trainer_pinned.py --record``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING

from fastgrpo.config import load_config
from fastgrpo.trainer import Trainer

DATA = Path(__file__).resolve().parent / "data" / "pinned_runs.json"

TINY = [
    *TINY_TRAINING,
    "train.steps=3",
    "rewards=[{name: format, weight: 1.0, params: {pattern: '.*[0-9].*'}}, {name: accuracy, weight: 0.5}]",
]

CASES: dict[str, list[str]] = {
    "shared-dapo": [],
    "plain-grpo-microbatches": [
        "train.shared_prompt=false",
        "train.token_budget=100",
        "rollout.max_prompt_tokens=80",
        "loss.loss_type=grpo",
    ],
    "shared-microbatches-bnpo": [
        "train.token_budget=140",
        "rollout.max_prompt_tokens=80",
        "loss.loss_type=bnpo",
        "rollout.prompts_per_step=3",
    ],
    "kl-iter2-drgrpo": [
        "loss.beta=0.05",
        "train.num_iterations=2",
        "loss.loss_type=dr_grpo",
        "loss.eps_high=0.28",
    ],  # fmt: skip
    "copo-dualclip": ["advantage.copo.enabled=true", "loss.loss_type=grpo", "loss.dual_clip=3.0"],
    "prm-arithmetic": ["task.name=arithmetic", "advantage.prm.enabled=true", "rollout.max_new_tokens=12"],
    "care-lora-ema": [
        "model.lora.enabled=true",
        "model.lora.r=4",
        "advantage.care.enabled=true",
        "model.ema_every=2",
        "advantage.care.accuracy_term=format",
        "optim.scheduler=cosine",
        "loss.loss_type=grpo",
    ],  # fmt: skip
    "dapo-filter-entropy": [
        "filter.enabled=true",
        "filter.max_gen_batches=2",
        "filter.metric=reward",
        "loss.loss_type=dapo",
        "loss.entropy_coef=0.01",
    ],  # fmt: skip
    "mmr1-vas": [
        "sampler.kind=mmr1",
        "sampler.params={update_every: 2}",
        "sampler.refresh_generations=2",
        "task.num_train=6",
    ],  # fmt: skip
}

_TIME_KEYS = ("time/", "tokens_per_s", "peak_mem_mb")
_DISCRETE = ("step", "tokens", "num_items_in_batch", "completion_len", "truncated", "zero_std_groups",
             "filter/gen_rounds", "filter/dropped_groups")  # fmt: skip


def machine_kind() -> str:
    """What decides the float rounding of a CPU run: the instruction set torch dispatches to, the CPU, torch."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{torch.backends.cpu.get_cpu_capability()} | {model} | torch {torch.__version__.split('+')[0]}"


def run_case(name: str, out_dir: Path) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order (see tests/test_trainer.py)
    try:
        cfg = load_config(
            None, [*TINY, *CASES[name], f"train.output_dir={out_dir}", f"train.run_name={name}"]
        )
        trainer = Trainer(cfg)
        result = trainer.train()
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    finally:
        torch.set_num_threads(before)
    rows = [{k: v for k, v in r.items() if not k.startswith(_TIME_KEYS)} for r in result.metrics]
    return {"metrics": rows, "params_sha1": hashlib.sha1(flat.numpy().tobytes()).hexdigest()}


def _close(a, b) -> bool:
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_pinned_run(name, tmp_path):
    if not DATA.is_file():
        pytest.fail(
            f"{DATA} is missing: record it with `PYTHONPATH=. python tests/{Path(__file__).name} --record`"
        )
    pinned = json.loads(DATA.read_text())
    got = run_case(name, tmp_path)
    kind = machine_kind()
    if kind in pinned:
        want = pinned[kind][name]
        assert got["metrics"] == want["metrics"], f"{name}: metrics changed on the recording machine ({kind})"
        assert got["params_sha1"] == want["params_sha1"], f"{name}: final parameters changed ({kind})"
        return
    want = next(iter(pinned.values()))[name]  # another machine kind: same computation, other GEMM rounding
    assert len(got["metrics"]) == len(want["metrics"])
    for g, w in zip(got["metrics"], want["metrics"]):
        assert g.keys() == w.keys(), (name, sorted(set(g) ^ set(w)))
        for key in w:
            if key.startswith(_DISCRETE) or key.startswith("reward"):
                assert g[key] == w[key], (name, key, g[key], w[key])
            else:
                assert _close(g[key], w[key]), (name, key, g[key], w[key])


if __name__ == "__main__":
    import tempfile

    if "--record" not in sys.argv:
        sys.exit(
            f"usage: PYTHONPATH=. python {sys.argv[0]} --record   (re-records {DATA} for this machine kind)"
        )
    recorded = json.loads(DATA.read_text()) if DATA.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        recorded[machine_kind()] = {name: run_case(name, Path(tmp)) for name in CASES}
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(recorded, indent=1) + "\n")
    print(f"recorded {len(CASES)} cases for {machine_kind()!r} in {DATA}")

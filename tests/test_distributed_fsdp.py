"""torch FSDP2 on CPU (gloo, 2 processes under torchrun): the trainer with ``distributed.strategy=fsdp`` against a
single-process run and a 2-process DDP run on the same rollouts, and a sharded checkpoint resumed exactly.

Rollouts normally depend on the rank (each rank samples its share with its own seed), so a 2-process run and a
1-process run would train on different completions. :func:`same_rollouts_everywhere` makes every rank generate
*all* the step's prompts with a rank-free seed (no gather): the batch is then identical for any world size, and
only the engines differ. Generation itself still runs through the FSDP root's gathered forward method.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DIGIT_REWARD, TINY_TRAINING

from fastgrpo import distributed as dist
from fastgrpo.checkpoint import trainable_state_dict
from fastgrpo.config import load_config
from fastgrpo.observability import read_metrics
from fastgrpo.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = [*TINY_TRAINING, DIGIT_REWARD, "rollout.max_new_tokens=10", "loss.loss_type=dapo", "train.token_budget=160",
             "rollout.max_prompt_tokens=100", "train.seed=3"]  # fmt: skip


LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.gradient_checkpointing=true", "optim.lr=2e-2"]


def same_rollouts_everywhere(trainer_cls) -> None:
    """Patch ``trainer_cls`` so that each rank generates every prompt of the step with a seed that depends on the
    step only (the scored batch is the same for any world size; nothing is gathered)."""
    orig = trainer_cls._generate_and_score

    def generate_all(self, indices, seed):
        rank, world = self.rank, self.world
        self.rank, self.world = 0, 1
        try:
            return orig(self, indices, self._seed(self.step, 7))
        finally:
            self.rank, self.world = rank, world

    trainer_cls._generate_and_score = generate_all


_SCRIPT = textwrap.dedent(
    """
    import os, shutil, sys
    import torch
    sys.path.insert(0, os.environ["FASTGRPO_TESTS"])
    import test_distributed_fsdp as h
    from fastgrpo import distributed as dist
    from fastgrpo.checkpoint import trainable_state_dict
    from fastgrpo.config import load_config
    from fastgrpo.trainer import Trainer

    out = sys.argv[1]
    own_rollouts = Trainer._generate_and_score
    h.same_rollouts_everywhere(Trainer)

    def run(name, strategy, extra=(), resume=None):
        cfg = load_config(None, [*sys.argv[2:], f"train.output_dir={out}", f"train.run_name={name}",
                                 f"distributed.strategy={strategy}", *extra])
        t = Trainer(cfg, resume=resume)
        t.train()
        if strategy == "fsdp":
            assert dist.is_fsdp(t.policy) and all(type(p).__name__ == "DTensor" for p in t.params)
            weights, _ = dist.full_state(t.policy, t.optimizer)
        else:
            weights = trainable_state_dict(t.model)
        if t.rank == 0:
            torch.save(weights, os.path.join(out, f"{name}.pt"))
        return t

    run("ddp", "ddp")
    t = run("fsdp", "fsdp", ["train.save_every=2"])
    if t.rank == 0:  # resume in a copy: a resumed run continues in its checkpoint's run directory
        shutil.copytree(os.path.join(out, "fsdp"), os.path.join(out, "fsdp-resumed"))
    torch.distributed.barrier()
    run("fsdp-resumed", "fsdp", resume=os.path.join(out, "fsdp-resumed", "checkpoints", "step-000002"))
    # LoRA, activation checkpointing and CPU offload together; the weights an inference engine would get
    t = run("fsdp-lora", "fsdp", [*h.LORA, "distributed.fsdp.cpu_offload=true"])
    pushed = {k: v.clone() for k, v in dist.named_weights_for_inference(t.model)}  # every rank: DTensor gathers
    if t.rank == 0:
        torch.save(pushed, os.path.join(out, "fsdp-lora-pushed.pt"))
    # blocks compute in bf16 (FSDP's mixed-precision policy), gradients reduced in fp32
    run("fsdp-bf16", "fsdp", ["distributed.fsdp.param_dtype=bfloat16", "train.steps=1"])
    # each rank its own prompts (3 over 2 ranks: different batch sizes and decoding lengths), a KL term, behaviour
    # log-probs and a held-out evaluation: every rank makes a different number of forward calls outside training
    Trainer._generate_and_score = own_rollouts
    run("fsdp-own", "fsdp", ["rollout.prompts_per_step=3", "loss.beta=0.05", "train.num_iterations=2",
                             "train.eval_prompts=3", "train.eval_every=2", "train.steps=2"])

    # a tensor-parallel vLLM group over both ranks (a recording stand-in of vllm.LLM): the same requests and seed
    # reach both engines, each rank gets its own prompts' completions back
    import json
    from fastgrpo.rollout import SamplingParams, VLLMEngine
    from fastgrpo.tiny import tiny_model_and_tokenizer
    from test_distributed import FakeLLM, _SamplingParams

    model, tok = tiny_model_and_tokenizer()
    llm = FakeLLM(model, tok)
    seen = []
    generate = llm.generate
    llm.generate = lambda prompts, sp, use_tqdm=True: (seen.append((prompts, sp.seed)), generate(prompts, sp))[1]
    engine = VLLMEngine(llm=llm, sampling_params_cls=_SamplingParams, tp_group=torch.distributed.group.WORLD)
    rank = torch.distributed.get_rank()
    prompts = [[5, 6, 7]] if rank == 0 else [[8, 9], [10, 11, 12, 13]]
    ro = engine.generate(tok, prompts, SamplingParams(num_generations=2, max_new_tokens=3, seed=100 + rank))
    with open(os.path.join(out, f"tp{rank}.json"), "w") as f:
        json.dump({"requests": seen[0][0], "seed": seen[0][1], "prompts": ro.prompts()}, f)

    # the GPU path's sharding (accelerate's own fsdp2_prepare_model with fastgrpo's plugin) against shard_policy
    from types import SimpleNamespace
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from fastgrpo.config import load_config as load
    from fastgrpo.packing import pack

    fcfg = load(None, ["distributed.strategy=fsdp"]).distributed.fsdp
    batch = pack([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]])
    kw = dict(advantages=torch.tensor([1.0, -0.5]), cu_seqlens=batch.completion_cu_seqlens)
    result = {}
    for how in ("accelerate", "shard_policy"):
        model, _ = tiny_model_and_tokenizer(seed=5)
        policy = dist.PolicyLoss(model)
        if how == "accelerate":
            plugin = dist.fsdp_plugin(fcfg, "no", torch.device("cpu"), dist.fsdp_block_names(model))
            acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                  is_main_process=rank == 0, device=torch.device("cpu"))
            policy = fsdp2_prepare_model(acc, policy)
            dist.register_gathered(policy)
        else:
            dist.shard_policy(policy, fcfg, "no", torch.device("cpu"))
        loss = policy(batch, kw).loss
        loss.backward()
        grads = {n: p.grad.full_tensor().tolist() for n, p in policy.named_parameters()}
        units = sorted(n for n, m in policy.named_modules() if dist.is_fsdp(m))
        result[how] = {"units": units, "loss": float(loss), "grads": grads}
    if rank == 0:
        with open(os.path.join(out, "accelerate-fsdp.json"), "w") as f:
            json.dump(result, f)

    # the TRL drop-in on a model sharded as accelerate's FSDP2 does it for TRL (blocks, embeddings, a [final norm,
    # LM head] unit, root): each rank its own batch; loss as unsharded, gradients = the ranks' mean
    from test_trl_integration import B, K, _make
    from fastgrpo.integrations import trl as fg_trl

    trainer = _make(os.path.join(out, "trl"))
    trainer.beta, trainer.loss_type = 0.04, "grpo"
    g = torch.Generator().manual_seed(rank)
    inputs = {"prompt_ids": torch.randint(4, 400, (B, 5), generator=g), "prompt_mask": torch.ones(B, 5, dtype=torch.long),
              "completion_ids": torch.randint(4, 400, (B, K), generator=g), "advantages": torch.randn(B, generator=g),
              "old_per_token_logps": -torch.rand(B, K, generator=g), "ref_per_token_logps": -torch.rand(B, K, generator=g)}
    inputs["completion_mask"] = (torch.arange(K)[None] < torch.randint(1, K + 1, (B, 1), generator=g)).long()
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    trainer.model.train()
    plain_loss = fg_trl.fastgrpo_compute_loss(trainer, trainer.model, inputs)
    plain_loss.backward()
    plain = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    for grad in plain.values():
        torch.distributed.all_reduce(grad)
        grad /= 2
    trainer.model.zero_grad(set_to_none=True)
    plugin = dist.fsdp_plugin(fcfg, "no", torch.device("cpu"), dist.fsdp_block_names(trainer.model))
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                          is_main_process=rank == 0, device=torch.device("cpu"))
    sharded = fsdp2_prepare_model(acc, trainer.model)
    loss = fg_trl.fastgrpo_compute_loss(trainer, sharded, inputs)
    loss.backward()
    err = max(float((p.grad.full_tensor() - plain[n]).abs().max()) for n, p in sharded.named_parameters())
    units = sorted(n for n, m in sharded.named_modules() if dist.is_fsdp(m))
    with open(os.path.join(out, f"trl-fsdp{rank}.json"), "w") as f:
        json.dump({"units": units, "loss": float(loss), "plain_loss": float(plain_loss), "grad_err": err,
                   "head_grad": float(plain["lm_head.weight"].abs().max())}, f)
    """
)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch (2 processes): DDP, FSDP (checkpoint at step 2), FSDP resumed from step 2; and a
    single-process run here, all on the same rollouts."""
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "fsdp_runs.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FASTGRPO_TESTS": str(ROOT / "tests")}  # fmt: skip
    with socket.socket() as sock:  # torchrun's --master_port 0 does not pick a free port: it hangs
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(tmp), *OVERRIDES, "train.steps=3"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    same_rollouts_everywhere_here = Trainer._generate_and_score
    try:
        same_rollouts_everywhere(Trainer)
        cfg = load_config(
            None, [*OVERRIDES, "train.steps=3", f"train.output_dir={tmp}", "train.run_name=single"]
        )
        single = Trainer(cfg)
        torch.save(trainable_state_dict(single.model), tmp / "init.pt")
        single.train()
        torch.save(trainable_state_dict(single.model), tmp / "single.pt")
        lora = Trainer(load_config(None, [*OVERRIDES, *LORA, "train.steps=3", f"train.output_dir={tmp}",
                                          "train.run_name=single-lora"]))  # fmt: skip
        lora.train()
        torch.save(trainable_state_dict(lora.model), tmp / "single-lora.pt")
        torch.save(dict(dist.named_weights_for_inference(lora.model)), tmp / "single-lora-pushed.pt")
    finally:
        Trainer._generate_and_score = same_rollouts_everywhere_here
    return tmp


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_fsdp_parameters_match_a_single_process_run(runs):
    """fp32 rounding after 3 AdamW steps (lr 5e-3): the FSDP run reduces in another order (reduce-scatter, the
    gradient norm summed over shards), typically 1e-7 on weights of size ~1. Adam divides each gradient by its
    running RMS, so a component whose gradient is near zero turns a rounding difference into a visible fraction
    of one step: a handful of such components may differ by up to 1e-5 (0.2% of a step)."""
    single, fsdp, init = (_weights(runs / f"{n}.pt") for n in ("single", "fsdp", "init"))
    assert fsdp.keys() == single.keys() and len(fsdp) > 10
    total = far = 0
    for name, w in single.items():
        diff = (fsdp[name] - w).abs()
        assert float(diff.max()) <= 1e-5, f"{name}: max |fsdp - single| = {float(diff.max()):.2e}"
        total, far = total + diff.numel(), far + int((diff > 1e-6).sum())
        assert float((w - init[name]).abs().max()) > 1e-3, (
            f"{name} did not train"
        )  # not a comparison of inits
    assert far <= 1e-4 * total, f"{far} of {total} components differ by more than 1e-6"


def test_fsdp_loss_equals_the_ddp_run(runs):
    ddp, fsdp = _losses(runs / "ddp"), _losses(runs / "fsdp")
    assert len(ddp) == len(fsdp) == 3 and any(abs(x) > 0 for x in ddp)
    assert fsdp[0] == ddp[0]  # same weights, same batch: the same loss to the bit before any update
    for a, b in zip(fsdp, ddp):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    rows_d = [r for r in read_metrics(runs / "ddp") if "reward" in r]
    rows_f = [r for r in read_metrics(runs / "fsdp") if "reward" in r]
    assert [r["reward"] for r in rows_d] == [r["reward"] for r in rows_f]  # same rollouts
    for a, b in zip(rows_d, rows_f):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]


def test_fsdp_checkpoint_resumes_exactly(runs):
    full, resumed = _weights(runs / "fsdp.pt"), _weights(runs / "fsdp-resumed.pt")
    assert full.keys() == resumed.keys()
    for name, w in full.items():
        assert torch.equal(resumed[name], w), name
    assert _losses(runs / "fsdp-resumed") == _losses(runs / "fsdp")


def test_fsdp_with_lora_checkpointing_and_offload_matches_a_single_process_run(runs):
    single, fsdp = _weights(runs / "single-lora.pt"), _weights(runs / "fsdp-lora.pt")
    assert fsdp.keys() == single.keys() and all("lora_" in k for k in fsdp)
    for name, w in single.items():
        assert float((fsdp[name] - w).abs().max()) <= 1e-5, name
    assert any(float(w.abs().max()) > 0 for k, w in single.items() if "lora_B" in k)  # the adapter trained
    # the merged weights an inference engine gets from the sharded policy: the single process's, to rounding
    pushed, want = _weights(runs / "fsdp-lora-pushed.pt"), _weights(runs / "single-lora-pushed.pt")
    assert pushed.keys() == want.keys() and not any("lora" in k for k in pushed)
    for name, w in want.items():
        assert float((pushed[name] - w).abs().max()) <= 1e-5, name


def test_fsdp_bf16_compute_trains(runs):
    rows = [r for r in read_metrics(runs / "fsdp-bf16") if "reward" in r]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and rows[0]["grad_norm"] > 0
    bf16, init = _weights(runs / "fsdp-bf16.pt"), _weights(runs / "init.pt")
    assert all(w.dtype == torch.float32 for w in bf16.values())  # fp32 master weights, bf16 compute
    assert sum(not torch.equal(bf16[k], init[k]) for k in init) == len(init)


def test_fsdp_with_rank_dependent_rollouts_kl_and_evaluation(runs):
    """No shared rollouts: the ranks generate different numbers of sequences and tokens, run their own reference
    and behaviour passes and a held-out evaluation of 2 and 1 prompts; nothing deadlocks and the run trains."""
    rows = read_metrics(runs / "fsdp-own")
    train = [r for r in rows if "reward" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in train)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]


def test_vllm_tensor_parallel_group_serves_the_same_requests(runs):
    r0, r1 = (json.loads((runs / f"tp{r}.json").read_text()) for r in (0, 1))
    assert (
        r0["requests"]
        == r1["requests"]
        == [{"prompt_token_ids": p} for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13])]
    )
    assert r0["seed"] == r1["seed"] == 100  # the group's first rank's seed
    assert r0["prompts"] == [[5, 6, 7]] * 2 and r1["prompts"] == [[8, 9]] * 2 + [[10, 11, 12, 13]] * 2


def test_accelerate_fsdp2_plugin_shards_like_the_cpu_path(runs):
    """What accelerate's FSDP plugin does on GPUs (its ``fsdp2_prepare_model``, run here on gloo with fastgrpo's
    plugin) builds the same units as :func:`fastgrpo.distributed.shard_policy`, and the fused loss and every
    gradient, the LM head's included, come out the same."""
    res = json.loads((runs / "accelerate-fsdp.json").read_text())
    a, b = res["accelerate"], res["shard_policy"]
    assert a["units"] == b["units"] == ["", "model.model.layers.0", "model.model.layers.1"]
    assert a["loss"] == b["loss"] and a["grads"].keys() == b["grads"].keys()
    for name, g in a["grads"].items():
        assert g == b["grads"][name], name
    assert any(v != 0 for row in a["grads"]["model.lm_head.weight"] for v in row)


def test_trl_dropin_under_accelerate_fsdp2(runs):
    """The TRL drop-in on a model sharded by accelerate's FSDP2 preparation (the LM head in a unit with the final
    norm): the loss reads the gathered head inside the forward; the loss equals the unsharded one and every
    gradient (LM head included) the mean of the ranks' unsharded gradients."""
    for r in (0, 1):
        res = json.loads((runs / f"trl-fsdp{r}.json").read_text())
        assert "lm_head" in res["units"] and "model.norm" in res["units"] and "model.layers.0" in res["units"]
        assert res["loss"] == res["plain_loss"]
        assert res["grad_err"] <= 1e-6 * max(1.0, res["head_grad"]) and res["head_grad"] > 0

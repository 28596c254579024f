"""One prefill per prompt (``SamplingParams.prefill_once``): the same rollouts as ``num_return_sequences``, with the
prompt computed once; the shared-prefix cache and its attention against plain references."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_logprobs

from fastgrpo.packing import packed_logprobs
from fastgrpo.rollout import SamplingParams, _generate_prefill_once, generate_rollouts, tokenize_prompts
from fastgrpo.tiny import tiny_model_and_tokenizer, tiny_tokenizer

# different lengths in one batch, a one-token prompt among them (its prefix is all padding)
PROMPTS = [
    [{"role": "user", "content": "What is 3+4?"}],
    "What is 1+1? <answer>",
    [5, 6, 7],
    [9],
]
MODES = ("shared", "expanded")


@pytest.fixture(scope="module")
def eos_heavy():
    """The tiny model with an lm_head bias that makes EOS likely: a group's completions end at many lengths."""
    model, tok = tiny_model_and_tokenizer(seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 3.0
    model.lm_head = head
    return model, tok


def _same_rollouts(a, b, logp_tol: float = 1e-5) -> None:
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated", "group_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.texts == b.texts
    if a.logprobs is not None:
        err = (a.logprobs - b.logprobs).abs().max().item()
        assert err <= logp_tol, f"behaviour log-probs differ by {err:.2e}"


@pytest.mark.parametrize("mode", MODES)
def test_greedy_equals_plain_path(eos_heavy, mode):
    model, tok = eos_heavy
    # top_k=1 sampling is greedy decoding with G > 1 (transformers refuses do_sample=False with G > 1)
    params = SamplingParams(num_generations=4, max_new_tokens=12, top_k=1, seed=0)
    plain = generate_rollouts(model, tok, PROMPTS, params, prefill_once=False)
    ours = generate_rollouts(model, tok, PROMPTS, params, prompt_cache=mode)
    _same_rollouts(plain, ours)
    lens = plain.completion_lens.view(len(PROMPTS), 4)[:, 0].tolist()
    assert len(set(lens)) > 1 and bool(plain.truncated.any()) and bool((~plain.truncated).any()), lens
    # G = 1 with do_sample=False (the held-out evaluation)
    greedy = SamplingParams(num_generations=1, max_new_tokens=12, do_sample=False)
    _same_rollouts(
        generate_rollouts(model, tok, PROMPTS, greedy, prefill_once=False),
        generate_rollouts(model, tok, PROMPTS, greedy, prompt_cache=mode),
    )
    assert model.config._attn_implementation == "sdpa"  # restored after the shared-prefix attention


@pytest.mark.parametrize("mode", MODES)
def test_sampled_logprobs_equal_teacher_forced_forward(eos_heavy, mode):
    model, tok = eos_heavy
    params = SamplingParams(num_generations=5, max_new_tokens=10, temperature=0.7, top_k=50, seed=3)
    r = generate_rollouts(model, tok, PROMPTS, params, prompt_cache=mode)
    lens = r.completion_lens.view(len(PROMPTS), 5)
    assert any(len(set(row.tolist())) > 1 for row in lens), "want a group whose completions end apart"
    with torch.no_grad():
        for batch in (r.pack(), r.pack_shared()):
            recomputed = r.unpack(batch, packed_logprobs(model, batch, temperature=0.7))
            err = (recomputed - r.logprobs)[r.completion_mask].abs().max().item()
            assert err <= 2e-5, f"{mode}: behaviour vs packed recompute differ by {err:.2e}"
    assert bool((r.logprobs[~r.completion_mask] == 0).all())
    # an independent reference at T = 1: a right-padded batch with full logits
    r1 = generate_rollouts(model, tok, PROMPTS, params, prompt_cache=mode, temperature=1.0)
    prompts = [torch.tensor(p) for p in r1.prompts()]
    completions = [torch.tensor(c) for c in r1.completions()]
    with torch.no_grad():
        ref = padded_logprobs(model, prompts, completions)
    err = (ref - r1.logprobs[r1.completion_mask]).abs().max().item()
    assert err <= 2e-5, f"{mode}: behaviour vs padded full-logits forward differ by {err:.2e}"


class _PromptTokens:
    """Counts the rows and tokens of every forward longer than one token (a prefill) at the embedding layer."""

    def __init__(self, model):
        self.calls: list[tuple[int, int]] = []
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        rows, width = args[0].shape[:2]
        if width > 1:
            self.calls.append((rows, width))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("mode", MODES)
def test_prompt_forward_runs_once_per_prompt(eos_heavy, mode):
    model, tok = eos_heavy
    b, g = len(PROMPTS), 6
    params = SamplingParams(num_generations=g, max_new_tokens=4, seed=0)
    with _PromptTokens(model) as ours:
        r = generate_rollouts(model, tok, PROMPTS, params, prompt_cache=mode)
    width = r.prompt_ids.shape[1]
    assert ours.calls == [
        (b, width)
    ]  # one prefill of the B prompts; every other forward is one token per row
    with _PromptTokens(model) as plain:
        generate_rollouts(model, tok, PROMPTS, params, prefill_once=False)
    assert plain.calls == [(b * g, width)]


def test_group_of_one_and_seeds(eos_heavy):
    model, tok = eos_heavy
    one = SamplingParams(num_generations=1, max_new_tokens=8, top_k=1, seed=0)
    _same_rollouts(
        generate_rollouts(model, tok, PROMPTS, one, prefill_once=False),
        generate_rollouts(model, tok, PROMPTS, one),
    )
    params = SamplingParams(num_generations=3, max_new_tokens=8, seed=11)
    a = generate_rollouts(model, tok, PROMPTS, params)
    b = generate_rollouts(model, tok, PROMPTS, params)
    c = generate_rollouts(model, tok, PROMPTS, params, seed=12)
    _same_rollouts(a, b, logp_tol=0.0)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the G samples of a group are drawn independently (not G copies of one)
    assert any(len({tuple(x) for x in a.completions()[i : i + 3]}) > 1 for i in range(0, 3 * len(PROMPTS), 3))


@pytest.mark.parametrize("mode", MODES)
def test_stop_strings_equal_plain_path(eos_heavy, mode):
    model, tok = eos_heavy
    base = generate_rollouts(model, tok, PROMPTS, num_generations=3, max_new_tokens=12, top_k=1, seed=0)
    # a stop string some completions contain: the text of a token inside the longest completion
    ids = max(base.completions(), key=len)
    stop = next(s for t in ids[1:-1] if (s := tok.decode(t)).strip().isalnum())
    params = SamplingParams(num_generations=3, max_new_tokens=12, top_k=1, seed=0, stop=[stop])
    plain = generate_rollouts(model, tok, PROMPTS, params, prefill_once=False)
    ours = generate_rollouts(model, tok, PROMPTS, params, prompt_cache=mode)
    _same_rollouts(plain, ours)
    assert any(t.endswith(stop) for t in ours.texts)


def test_one_token_prompts(eos_heavy):
    model, tok = eos_heavy
    params = SamplingParams(num_generations=2, max_new_tokens=6, top_k=1, seed=0)
    _same_rollouts(
        generate_rollouts(model, tok, [[5], [7]], params, prefill_once=False),
        generate_rollouts(model, tok, [[5], [7]], params),
    )


def test_static_cache_continuation_on_cpu(eos_heavy):
    # compile_decode's cache (the prompt expanded into a StaticCache); transformers compiles only on CUDA, so
    # here the same continuation runs uncompiled
    model, tok = eos_heavy
    params = SamplingParams(num_generations=3, max_new_tokens=7, top_k=1, seed=0)
    plain = generate_rollouts(model, tok, PROMPTS, params, prefill_once=False, return_logprobs=False)
    ids = plain.prompt_ids[::3]
    kw = dict(input_ids=ids, attention_mask=plain.prompt_mask[::3].long(), max_new_tokens=7,
              num_return_sequences=3, do_sample=True, top_k=1, pad_token_id=tok.pad_token_id,
              eos_token_id=[tok.eos_token_id], use_cache=True)  # fmt: skip
    with torch.no_grad():
        seq = _generate_prefill_once(model, kw, {}, "static", 7)
    got = seq[:, ids.shape[1] :]
    for row, want, m in zip(got, plain.completion_ids, plain.completion_mask):
        assert row[: int(m.sum())].tolist() == want[m].tolist()


def test_bad_arguments(eos_heavy):
    model, tok = eos_heavy
    with pytest.raises(ValueError, match="prompt_cache must be one of"):
        generate_rollouts(model, tok, PROMPTS, prompt_cache="copy")
    with pytest.raises(ValueError, match="compile_decode compiles the decode step on CUDA"):
        generate_rollouts(model, tok, PROMPTS, num_generations=2, compile_decode=True)
    with pytest.raises(ValueError, match="needs prefill_once=True"):
        generate_rollouts(model, tok, PROMPTS, compile_decode=True, prefill_once=False)
    with pytest.raises(ValueError, match="identical completions"):
        generate_rollouts(model, tok, PROMPTS, num_generations=2, do_sample=False)
    with pytest.raises(ValueError, match=r"model_inputs\['attention_mask'\]: set by generate_rollouts"):
        generate_rollouts(model, tok, PROMPTS, model_inputs={"attention_mask": torch.ones(4, 3)})
    with pytest.raises(
        ValueError, match=r"model_inputs\['token_type_ids'\]\[2\] must hold one value per token"
    ):
        types = [torch.zeros(len(p) + (i == 2)) for i, p in enumerate(tokenize_prompts(tok, PROMPTS))]
        generate_rollouts(model, tok, PROMPTS, model_inputs={"token_type_ids": types})
    with pytest.raises(ValueError, match="sequence of 4 1-D tensors"):
        generate_rollouts(model, tok, PROMPTS, model_inputs={"token_type_ids": [torch.zeros(3)]})


# ----------------------------------------------------------------------------------------------------------
# the shared-prefix cache and its attention


def _reference_attention(q, pk, pv, pmask, sk, sv, g):
    """fp64 softmax attention of each row over ``[its prefix | its suffix]`` (causal in the suffix)."""
    r, h_q, q_len, d = q.shape
    n = h_q // pk.shape[1]
    k = torch.cat([pk.repeat_interleave(g, 0), sk], 2).repeat_interleave(n, 1)
    v = torch.cat([pv.repeat_interleave(g, 0), sv], 2).repeat_interleave(n, 1)
    s_len = sk.shape[2]
    allowed = torch.cat(
        [
            pmask.repeat_interleave(g, 0)[:, None, None, :].expand(r, 1, q_len, -1),
            (torch.arange(s_len)[None, :] <= torch.arange(q_len)[:, None] + s_len - q_len).expand(
                r, 1, -1, -1
            ),
        ],
        -1,
    )
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return (w @ v).transpose(1, 2)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_prefix_attention_matches_reference(gen, q_len, dtype):
    from transformers.cache_utils import DynamicCache

    from fastgrpo import prefix_cache as pc

    b, g, h_kv, n, d, l_p = 3, 4, 2, 3, 16, 7
    pk, pv = (torch.randn(b, h_kv, l_p, d, generator=gen, dtype=torch.float64) for _ in range(2))
    pv[0, :, :2] = float("nan")  # padding positions of the prefix may hold anything
    pmask = torch.ones(b, l_p, dtype=torch.bool)
    pmask[0, :2] = False  # left padding
    pmask[2, :] = False  # a one-token prompt: its prefix is all padding
    prefix = DynamicCache()
    prefix.update(pk.to(dtype), pv.to(dtype), 0)
    cache = pc.SharedPrefixCache(prefix, g, pmask)
    module = torch.nn.Module()
    module.layer_idx = 0
    out, s_k, s_v = None, [], []
    token = pc._ACTIVE.set(cache)
    try:
        for step in range(2):  # the last prompt token(s), then one decoded token
            width = q_len if step == 0 else 1
            q = torch.randn(b * g, h_kv * n, width, d, generator=gen, dtype=torch.float64)
            k, v = (torch.randn(b * g, h_kv, width, d, generator=gen, dtype=torch.float64) for _ in range(2))
            s_k.append(k)
            s_v.append(v)
            keys, values = cache.update(k.to(dtype), v.to(dtype), 0)
            out, _ = pc.shared_prefix_attention(module, q.to(dtype), keys, values, None)
            ref = _reference_attention(
                q, pk, pv.nan_to_num(0.0), pmask, torch.cat(s_k, 2), torch.cat(s_v, 2), g
            )
            err = (out.double() - ref).abs().max().item()
            assert err <= (1e-12 if dtype == torch.float64 else 2e-6), f"step {step}: err {err:.2e}"
    finally:
        pc._ACTIVE.reset(token)
    assert cache.get_seq_length() == l_p + q_len + 1


def test_shared_cache_refuses_another_attention(eos_heavy):
    # a SharedPrefixCache read by any other attention would see only the completion tokens: it must raise
    from fastgrpo import prefix_cache as pc

    model, tok = eos_heavy
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        first.cache.crop(-1)
        shared = pc.SharedPrefixCache(first.cache, 2)
        with pytest.raises(RuntimeError, match="not read by the shared-prefix attention"):
            model.generate(ids, num_return_sequences=2, cache=shared, max_new_tokens=3, do_sample=True)
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
        from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

        sliding = DynamicCache()
        sliding.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
        pc.SharedPrefixCache(sliding, 2)


# ----------------------------------------------------------------------------------------------------------
# a vision-language model (M-RoPE, images through the vision tower)


@pytest.fixture(scope="module")
def tiny_qwen25_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny_tokenizer()
    v = len(tok)
    image, start, end = v - 3, v - 2, v - 1  # three ordinary ids of the tiny vocabulary act as vision tokens
    text = dict(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
                rope_parameters=dict(rope_type="default", mrope_section=[4, 2, 2], rope_theta=10000.0),
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)  # fmt: skip
    vision = dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, window_size=56,
                  fullatt_block_indexes=[0], tokens_per_second=2, initializer_range=0.2)  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image,
                              video_token_id=image - 1, vision_start_token_id=start, vision_end_token_id=end,
                              tie_word_embeddings=False)  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    # two prompts of different lengths, each with one image of a different patch grid (t, h, w): 4 and 6 tokens
    gen = torch.Generator().manual_seed(0)
    grids = [(1, 4, 4), (1, 4, 6)]
    prompts, types, pixels = [], [], []
    for i, (t, h, w) in enumerate(grids):
        ids = [5 + i, 6, 7, start] + [image] * (t * h * w // 4) + [end] + [8, 9, 10 + i] * (i + 1)
        prompts.append(ids)
        types.append(torch.tensor([int(x == image) for x in ids]))
        pixels.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen))
    inputs = {
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": types,
    }
    return model, tok, prompts, inputs


@pytest.mark.parametrize("mode", MODES)
def test_vision_language_model(tiny_qwen25_vl, mode):
    model, tok, prompts, inputs = tiny_qwen25_vl
    vision_calls: list[int] = []
    hook = model.model.visual.register_forward_hook(lambda m, a, o: vision_calls.append(int(a[0].shape[0])))
    try:
        params = SamplingParams(num_generations=3, max_new_tokens=8, top_k=1, seed=0)
        with _PromptTokens(model) as plain_tokens:
            plain = generate_rollouts(model, tok, prompts, params, prefill_once=False, model_inputs=inputs)
        plain_vision = list(vision_calls)
        vision_calls.clear()
        with _PromptTokens(model) as our_tokens:
            ours = generate_rollouts(model, tok, prompts, params, prompt_cache=mode, model_inputs=inputs)
    finally:
        hook.remove()
    _same_rollouts(plain, ours)
    width = ours.prompt_ids.shape[1]
    assert our_tokens.calls == [(2, width)] and plain_tokens.calls == [(6, width)]
    # the vision tower runs once per prompt's image (16 + 24 patches), in one call; transformers 5.24's plain
    # path also encodes the images before expanding them
    assert vision_calls == [40] and plain_vision == [40]
    assert model.config.text_config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------
# GPU: the compiled static-cache decode


@pytest.mark.gpu
def test_compile_decode_equals_dynamic_cache_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, tok = tiny_model_and_tokenizer(seed=0)
    model = model.cuda()
    params = SamplingParams(num_generations=4, max_new_tokens=16, top_k=1, seed=0)
    dynamic = generate_rollouts(model, tok, PROMPTS, params, prompt_cache="expanded")
    compiled = generate_rollouts(model, tok, PROMPTS, params, compile_decode=True)
    _same_rollouts(dynamic, compiled, logp_tol=1e-4)
    shared = generate_rollouts(model, tok, PROMPTS, params, prompt_cache="shared")
    _same_rollouts(dynamic, shared, logp_tol=1e-4)

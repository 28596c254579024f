"""One prefill per prompt (``SamplingParams.prefill_once``): the same rollouts as ``num_return_sequences``, with
the prompt computed once; the shared-prefix cache and its attention against plain references."""

from __future__ import annotations

import pytest
import torch
from conftest import eos_biased_tiny, padded_logprobs

from fastgrpo.packing import packed_logprobs
from fastgrpo.rollout import SamplingParams, _generate_prefill_once, generate_rollouts, tokenize_prompts
from fastgrpo.tiny import tiny_model_and_tokenizer

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
    return eos_biased_tiny(3.0)


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


def _vlm_examples():
    """Two images of different sizes in one prompt, a text-only prompt and a video prompt (prompts of different
    lengths; M-RoPE positions that differ from the text positions after each image)."""
    import numpy as np
    from PIL import Image

    from fastgrpo.tasks import Example

    rng = np.random.default_rng(0)

    def img(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    parts = [{"type": "image"}, {"type": "text", "text": "What is 2+3?"}, {"type": "image"}]
    video = [{"type": "text", "text": "Which"}, {"type": "video"}, {"type": "text", "text": "moves?"}]
    return [
        Example([{"role": "user", "content": parts}], "5", images=[img(56, 84), img(84, 112)]),
        Example([{"role": "user", "content": "What is 1+1?"}], "2"),
        Example([{"role": "user", "content": video}], "1", videos=[[img(56, 56) for _ in range(4)]]),
    ]


@pytest.mark.parametrize(
    "family, mode",
    [("qwen2.5-vl", "shared"), ("qwen2.5-vl", "expanded"), ("qwen2-vl", "shared"), ("llava", "shared")],
)
def test_vision_language_model(family, mode):
    # the trainer's path: prompts encoded by the processor, media as generation inputs (fastgrpo.vlm)
    from fastgrpo.tiny import tiny_vlm
    from fastgrpo.vlm import encode_prompts, generation_inputs, vision_modules

    model, proc = tiny_vlm(family)
    examples = _vlm_examples()
    if family == "llava":
        examples = examples[:2]  # images only
    enc = encode_prompts(proc, examples)
    tok = proc.tokenizer
    inputs = generation_inputs(enc, tok.pad_token_id, model=model)
    del inputs["input_ids"], inputs["attention_mask"]
    media_rows = sum(int(inputs[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in inputs)
    vision = vision_modules(model)[0][1]
    rows: list[int] = []
    hook = vision.register_forward_hook(lambda m, a, o: rows.append(int(a[0].shape[0])))
    try:
        params = SamplingParams(num_generations=3, max_new_tokens=8, top_k=1, seed=0)
        prompts = [e.ids for e in enc]
        with _PromptTokens(model) as plain_tokens:
            plain = generate_rollouts(model, tok, prompts, params, prefill_once=False, model_inputs=inputs)
        plain_rows = list(rows)
        rows.clear()
        with _PromptTokens(model) as our_tokens:
            ours = generate_rollouts(model, tok, prompts, params, prompt_cache=mode, model_inputs=inputs)
    finally:
        hook.remove()
    _same_rollouts(plain, ours)
    width, b = ours.prompt_ids.shape[1], len(prompts)
    assert our_tokens.calls == [(b, width)] and plain_tokens.calls == [(3 * b, width)]
    # every image / video goes through the vision tower once (transformers 5.24's plain path also encodes the
    # media before it expands the prompts)
    assert sum(rows) == media_rows and sum(plain_rows) == media_rows
    assert model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"


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

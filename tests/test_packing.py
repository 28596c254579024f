"""Packing: packed rows vs a padded batch, shared prompts, micro-batch planning, the use_cache guard, bad input.

References are plain: a right-padded ``model(input_ids, attention_mask)`` forward with full logits, then
``log_softmax`` and ``gather`` — the way every trainer computes per-token log-probs today.
"""

from __future__ import annotations

import pytest
import torch
from conftest import padded_logprobs, rand_ids
from transformers import Qwen2Model

from fastgrpo import _backends
from fastgrpo.packing import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    decoder_of,
    lm_head_of,
    pack,
    pack_micro_batches,
    pack_padded,
    pack_shared_prompt,
    packed_forward,
    packed_logprobs,
    plan_micro_batches,
    register_varlen_attention,
    shared_prompt_attention_mask,
    use_varlen_attention,
)
from fastgrpo.tiny import tiny_model

TOL = 1e-5  # fp32, packed vs padded per-token log-probs


@pytest.fixture(scope="module")
def models():
    register_varlen_attention()
    return {
        impl: tiny_model(seed=0, attn_implementation=impl) for impl in ("sdpa", "eager", VARLEN_ATTENTION)
    }


def padding_fraction(prompts, completions) -> float:
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    return 1.0 - sum(lens) / (len(lens) * max(lens))


CASES = {
    "mixed": ([3, 10, 1, 7, 25], [5, 1, 20, 2, 9]),
    "mostly_padding": ([2, 3, 4, 2, 5, 3, 2], [90, 4, 1, 6, 3, 2, 8]),
}


# ----------------------------------------------------------------------------------------------------------
# packed == padded


@pytest.mark.parametrize("impl", ["sdpa", "eager", VARLEN_ATTENTION])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_logprobs_equal_padded(models, impl, case, gen):
    model = models[impl]
    assert model.config.use_cache  # the dangerous default is on: packed_forward must override it
    vocab = model.config.vocab_size
    p_lens, c_lens = CASES[case]
    prompts, completions = rand_ids(gen, vocab, p_lens), rand_ids(gen, vocab, c_lens)
    if case == "mostly_padding":
        assert padding_fraction(prompts, completions) > 0.5
    batch = pack(prompts, completions)
    with torch.no_grad():
        got = packed_logprobs(model, batch)
        ref = padded_logprobs(model, prompts, completions)
    assert got.dtype == torch.float32 and got.shape == (sum(c_lens),)
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"{impl}/{case}: packed vs padded max |Δ logp| = {err:.2e}"


@pytest.mark.parametrize("impl", ["sdpa", VARLEN_ATTENTION])
def test_packed_gradients_equal_padded(models, impl, gen):
    model = models[impl]
    vocab = model.config.vocab_size
    prompts, completions = rand_ids(gen, vocab, [4, 9, 2]), rand_ids(gen, vocab, [6, 1, 12])
    w = torch.randn(19, generator=gen)

    def grads(fn):
        model.zero_grad()
        (fn() * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_packed = grads(lambda: packed_logprobs(model, pack(prompts, completions)))
    g_padded = grads(lambda: padded_logprobs(model, prompts, completions))
    model.zero_grad()
    for n in g_padded:
        scale = g_padded[n].abs().max().item() + 1e-6
        assert (g_packed[n] - g_padded[n]).abs().max().item() <= 1e-4 * scale, n


def test_packed_forward_returns_last_hidden_states_without_lm_head(models, gen):
    model = models["sdpa"]
    prompts, completions = rand_ids(gen, 400, [3, 5]), rand_ids(gen, 400, [4, 2])
    batch = pack(prompts, completions)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            hidden = packed_forward(model, batch)
    finally:
        handle.remove()
    assert calls == [], "packed_forward ran lm_head (built logits)"
    assert hidden.shape == (batch.num_tokens, model.config.hidden_size)
    # the hidden states are exactly what lm_head sees in an ordinary forward of each sequence
    with torch.no_grad():
        one = model(torch.cat([prompts[1], completions[1]])[None], output_hidden_states=True)
    s = int(batch.cu_seqlens[1])
    torch.testing.assert_close(model.lm_head(hidden[s:]), one.logits[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# the use_cache guard


def test_use_cache_guard(models, gen):
    model = models["sdpa"]
    prompts, completions = rand_ids(gen, 400, [4, 6, 3]), rand_ids(gen, 400, [5, 2, 7])
    batch = pack(prompts, completions)
    with pytest.raises(ValueError, match="use_cache"):
        packed_forward(model, batch, use_cache=True)
    with pytest.raises(ValueError, match="attention_mask"):
        packed_forward(model, batch, attention_mask=torch.ones_like(batch.input_ids))
    with torch.no_grad():
        safe = packed_forward(model, batch)
        safe_explicit = packed_forward(model, batch, use_cache=False)
        # the trap the guard exists for: with the config's cache on, transformers ignores the packed positions
        naive = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state[0]
    torch.testing.assert_close(safe, safe_explicit, atol=0, rtol=0)
    if torch.allclose(naive, safe, atol=1e-4):
        pytest.skip("this transformers version honours packed position_ids even with a cache")
    assert (naive - safe).abs().max() > 1e-3


def test_varlen_attention_with_gradient_checkpointing(models, gen):
    # checkpointed layers recompute attention in backward, outside packed_forward: still per sequence
    model = tiny_model(seed=0, attn_implementation=register_varlen_attention())
    ref = models["sdpa"]
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompts, completions = rand_ids(gen, 400, [4, 9, 2, 7]), rand_ids(gen, 400, [6, 1, 12, 3])
    batch = pack(prompts, completions)
    w = torch.randn(batch.num_targets, generator=gen)
    (packed_logprobs(model, batch) * w).sum().backward()
    ref.zero_grad()
    (padded_logprobs(ref, prompts, completions) * w).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-4 * (q.grad.abs().max().item() + 1e-6), n
    ref.zero_grad()


def test_varlen_attention_is_sdpa_outside_packing(models, gen):
    varlen, sdpa = models[VARLEN_ATTENTION], models["sdpa"]
    assert varlen.config._attn_implementation == VARLEN_ATTENTION
    ids = torch.randint(4, 400, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 8:] = 0  # right padding
    with torch.no_grad():
        torch.testing.assert_close(
            varlen(input_ids=ids, attention_mask=mask).logits, sdpa(input_ids=ids, attention_mask=mask).logits
        )
        a = varlen.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = sdpa.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    other = use_varlen_attention(tiny_model(seed=0))
    assert other.config._attn_implementation == VARLEN_ATTENTION


def test_varlen_refuses_sliding_window_models(gen):
    model = tiny_model(seed=0, attn_implementation=register_varlen_attention())
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model.config.sliding_window = 8
    batch = pack(rand_ids(gen, 400, [6]), rand_ids(gen, 400, [5]))
    with pytest.raises(ValueError, match="sliding window"):
        packed_forward(model, batch)


# ----------------------------------------------------------------------------------------------------------
# shared-prompt packing


def _shared_case(gen, vocab, prompt_lens, group_lens):
    prompts = rand_ids(gen, vocab, prompt_lens)
    groups = [rand_ids(gen, vocab, lens) for lens in group_lens]
    flat_p = [p for p, g in zip(prompts, groups) for _ in g]
    flat_c = [c for g in groups for c in g]
    return prompts, groups, flat_p, flat_c


@pytest.mark.parametrize("impl", ["sdpa", "eager", VARLEN_ATTENTION])
def test_shared_prompt_logprobs_equal_plain(models, impl, gen):
    model = models[impl]
    vocab = model.config.vocab_size
    prompts, groups, flat_p, flat_c = _shared_case(gen, vocab, [100, 7], [[32] * 8, [3, 1, 9]])
    shared = pack_shared_prompt(prompts, groups)
    plain = pack(flat_p, flat_c)
    assert shared.tokens_saved == 7 * 100 + 2 * 7
    assert shared.num_tokens == plain.num_tokens - shared.tokens_saved
    assert torch.equal(shared.targets, plain.targets)
    with torch.no_grad():
        a = packed_logprobs(model, shared)
        b = packed_logprobs(model, plain)
        c = padded_logprobs(model, flat_p, flat_c)
    assert (a - b).abs().max().item() <= TOL
    assert (a - c).abs().max().item() <= TOL


def test_shared_prompt_gradients_sum_over_group(models, gen):
    model = models["sdpa"]
    vocab = model.config.vocab_size
    prompts, groups, flat_p, flat_c = _shared_case(gen, vocab, [12, 5], [[6, 3, 8, 1], [4, 7]])
    shared, plain = pack_shared_prompt(prompts, groups), pack(flat_p, flat_c)
    w = torch.randn(shared.num_targets, generator=gen)
    captured = {}

    def keep(_module, _inp, out):
        out.retain_grad()
        captured["emb"] = out

    def run(batch):
        model.zero_grad()
        handle = model.model.embed_tokens.register_forward_hook(keep)
        try:
            (packed_logprobs(model, batch) * w).sum().backward()
        finally:
            handle.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, captured["emb"].grad[0]

    g_shared, emb_shared = run(shared)
    g_plain, emb_plain = run(plain)
    model.zero_grad()
    for n in g_plain:
        scale = g_plain[n].abs().max().item() + 1e-6
        assert (g_shared[n] - g_plain[n]).abs().max().item() <= 1e-4 * scale, n
    # the gradient reaching each shared prompt token is the sum over the group's unshared copies
    seq = 0
    for g, (p, group) in enumerate(zip(prompts, groups)):
        s = int(shared.cu_seqlens[g])
        total = sum(
            emb_plain[int(plain.cu_seqlens[seq + j]) : int(plain.cu_seqlens[seq + j]) + len(p)]
            for j in range(len(group))
        )
        torch.testing.assert_close(
            emb_shared[s : s + len(p)], total, atol=1e-4 * float(total.abs().max()), rtol=0
        )
        seq += len(group)


def test_shared_prompt_mask_rule():
    prompts = [torch.tensor([5, 6]), torch.tensor([7])]
    groups = [[torch.tensor([8, 9]), torch.tensor([10])], [torch.tensor([11])]]
    batch = pack_shared_prompt(prompts, groups)
    # row: [5 6 | 8 9 | 10] [7 | 11]
    assert batch.input_ids[0].tolist() == [5, 6, 8, 9, 10, 7, 11]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 0, 1]
    assert batch.branch_ids.tolist() == [-1, -1, 0, 0, 1, -1, 0]
    assert batch.cu_seqlens.tolist() == [0, 5, 7] and batch.cu_seqlens.dtype == torch.int32
    assert batch.logit_index.tolist() == [1, 2, 1, 5]  # last prompt token predicts every first token
    assert batch.targets.tolist() == [8, 9, 10, 11]
    assert batch.tokens_saved == 2
    m = shared_prompt_attention_mask(batch, "sdpa")[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # completion 1 sees the prompt and itself, not completion 0
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ]
    eager = shared_prompt_attention_mask(batch, "eager", torch.float32)[0, 0]
    assert torch.equal(eager == 0, torch.tensor(m, dtype=torch.bool))
    with pytest.raises(ValueError, match="flash"):
        shared_prompt_attention_mask(batch, "flash_attention_2")
    prompts_back, completions_back = batch.sequences()
    assert prompts_back == [[5, 6], [5, 6], [7]] and completions_back == [[8, 9], [10], [11]]
    with pytest.raises(ValueError, match="ambiguous"):
        batch.shifted_targets()


def test_shared_prompt_flex_block_mask_semantics(gen):
    # The BlockMask (the GPU path) against the dense sdpa mask, through flex_attention's eager reference
    # implementation (no compile; the compiled CPU kernel is not trusted, see fastgrpo.packing).
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    prompts, groups, _, _ = _shared_case(gen, 400, [20, 6], [[8, 3, 5], [2, 9]])
    batch = pack_shared_prompt(prompts, groups)
    block_mask = shared_prompt_attention_mask(batch, "flex_attention")
    dense = shared_prompt_attention_mask(batch, "sdpa")
    n = batch.num_tokens
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = flex_attention(q, k, v, block_mask=block_mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    flex_model = tiny_model(seed=0, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="GPU only"):
        packed_forward(flex_model, batch)


# ----------------------------------------------------------------------------------------------------------
# the row itself, round trips


def test_pack_layout_by_hand():
    batch = pack([[1, 2], [3]], [[4, 5, 6], [7]])
    # row: [1 2 4 5 6][3 7]
    assert batch.input_ids.tolist() == [[1, 2, 4, 5, 6, 3, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert batch.cu_seqlens.tolist() == [0, 5, 7] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 5
    assert batch.completion_mask.tolist() == [[False, False, True, True, True, False, True]]
    assert batch.targets.tolist() == [4, 5, 6, 7]
    assert batch.logit_index.tolist() == [1, 2, 3, 5]
    assert batch.completion_cu_seqlens.tolist() == [0, 3, 4]
    assert batch.shifted_targets().tolist() == [IGNORE_INDEX, 4, 5, 6, IGNORE_INDEX, 7, IGNORE_INDEX]
    padded, mask = batch.unpack(torch.tensor([10.0, 11.0, 12.0, 13.0]))
    assert padded.tolist() == [[10.0, 11.0, 12.0], [13.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.sequences() == ([[1, 2], [3]], [[4, 5, 6], [7]])


def test_pack_roundtrip_and_padded_input(gen):
    prompts, completions = rand_ids(gen, 400, [5, 1, 8, 3]), rand_ids(gen, 400, [2, 9, 1, 4])
    batch = pack(prompts, completions)
    back_p, back_c = batch.sequences()
    assert back_p == [p.tolist() for p in prompts] and back_c == [c.tolist() for c in completions]
    shifted = batch.shifted_targets()
    keep = shifted != IGNORE_INDEX
    assert torch.equal(shifted[keep], batch.targets)
    assert torch.equal(batch.input_ids[0, 1:][keep[:-1]], batch.targets)  # next-token alignment
    # a padded rollout (left-padded prompts, right-padded completions) packs to the same row
    tp, tc = 8, 9
    p_ids = torch.zeros(4, tp, dtype=torch.long)
    p_mask = torch.zeros(4, tp, dtype=torch.bool)
    c_ids = torch.zeros(4, tc, dtype=torch.long)
    c_mask = torch.zeros(4, tc, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p_ids[i, tp - len(p) :], p_mask[i, tp - len(p) :] = p, True
        c_ids[i, : len(c)], c_mask[i, : len(c)] = c, True
    again = pack_padded(p_ids, p_mask, c_ids, c_mask)
    assert torch.equal(again.input_ids, batch.input_ids) and torch.equal(again.logit_index, batch.logit_index)
    values = torch.randn(batch.num_targets, generator=gen)
    padded, mask = batch.unpack(values)
    assert torch.equal(mask, c_mask) and torch.equal(padded[mask], values)


def test_pack_bad_input():
    with pytest.raises(ValueError, match=r"completions\[1\] is empty"):
        pack([[1, 2], [3]], [[4], []])
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        pack([[]], [[4]])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        pack([[1], [2]], [[3]])
    with pytest.raises(ValueError, match="negative"):
        pack([[1, -100]], [[3]])
    with pytest.raises(ValueError, match="integer"):
        pack([torch.tensor([1.0, 2.0])], [[3]])
    with pytest.raises(ValueError, match="empty group"):
        pack_shared_prompt([[1]], [[]])
    with pytest.raises(ValueError, match="nothing to pack"):
        pack([], [])


# ----------------------------------------------------------------------------------------------------------
# micro-batches


def test_plan_by_hand():
    # K starts at ceil(28 / 10) = 3; longest first into the least loaded: 10->0, 9->1, 8->2, 1->2 (load 8 < 9)
    assert plan_micro_batches([10, 9, 8, 1], 10) == [[[0], [1], [2, 3]]]
    # two ranks, LPT: 10->r0, 9->r1, 8->r1 (9 < 10), 1->r0 (10 < 17); K = max(ceil(11/10), ceil(17/10)) = 2
    assert plan_micro_batches([10, 9, 8, 1], 10, num_ranks=2) == [[[0], [3]], [[1], [2]]]
    # a rank with fewer items than K gets an empty micro-batch
    assert plan_micro_batches([10, 10, 10, 1], 10, num_ranks=2) == [[[0], [2]], [[1], [3]]]
    assert plan_micro_batches([5, 5, 5], 100, num_ranks=4)[3] == [[]]


@pytest.mark.parametrize("num_ranks", [1, 3])
def test_plan_invariants(num_ranks, gen):
    # long-tailed lengths, like completions
    lengths = (torch.distributions.Pareto(8.0, 1.2).sample((200,)).clamp(max=500)).long().tolist()
    budget = 1024
    plan = plan_micro_batches(lengths, budget, num_ranks=num_ranks)
    assert len(plan) == num_ranks
    assert len({len(r) for r in plan}) == 1, "every rank needs the same number of micro-batches"
    seen = sorted(i for r in plan for mb in r for i in mb)
    assert seen == list(range(len(lengths)))
    for r in plan:
        for mb in r:
            assert sum(lengths[i] for i in mb) <= budget
            assert mb == sorted(mb)
    totals = [sum(lengths[i] for mb in r for i in mb) for r in plan]
    assert max(totals) - min(totals) <= max(lengths)
    k = len(plan[0])
    assert k <= -(-max(totals) // budget) + 2  # close to the lower bound
    assert plan == plan_micro_batches(lengths, budget, num_ranks=num_ranks)  # deterministic


def test_plan_bad_input():
    with pytest.raises(ValueError, match="item 1 has 300 tokens, more than token_budget=256"):
        plan_micro_batches([10, 300], 256)
    with pytest.raises(ValueError, match="token_budget"):
        plan_micro_batches([1], 0)
    with pytest.raises(ValueError, match="at least one token"):
        plan_micro_batches([0], 10)


def test_pack_micro_batches_match_one_row(models, gen):
    model = models["sdpa"]
    prompts = rand_ids(gen, 400, [4, 30, 2, 6, 5])
    completions = rand_ids(gen, 400, [20, 3, 15, 40, 1])
    micro = pack_micro_batches(prompts, completions, token_budget=48)
    assert all(mb.rows.num_tokens <= 48 for mb in micro) and len(micro) > 1
    assert sorted(i for mb in micro for i in mb.index) == list(range(5))
    with torch.no_grad():
        whole = pack(prompts, completions)
        ref, _ = whole.unpack(packed_logprobs(model, whole))
        for mb in micro:
            got, _ = mb.rows.unpack(packed_logprobs(model, mb.rows))
            torch.testing.assert_close(got, ref[mb.index, : got.shape[1]], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="more than token_budget"):
        pack_micro_batches(prompts, completions, token_budget=40)


def test_pack_micro_batches_shared_prompt_groups(models, gen):
    """Whole groups behind one prompt copy, planned by the packing layer; log-probs equal the plain layout's."""
    model = models["sdpa"]
    prompts = rand_ids(gen, 400, [7, 3, 12])
    groups = [rand_ids(gen, 400, lens) for lens in ([4, 9], [1, 6], [5, 2])]
    flat_p = [p for p, g in zip(prompts, groups) for _ in g]
    flat_c = [c for g in groups for c in g]
    micro = pack_micro_batches(flat_p, flat_c, token_budget=30, shared_prompt=True, group_size=2)
    assert len(micro) > 1 and all(mb.rows.is_shared_prompt and mb.rows.num_tokens <= 30 for mb in micro)
    assert sorted(i for mb in micro for i in mb.index) == list(range(6))
    assert all(mb.index[0] % 2 == 0 and mb.index[1] == mb.index[0] + 1 for mb in micro)  # whole groups
    with torch.no_grad():
        whole = pack(flat_p, flat_c)
        ref, _ = whole.unpack(packed_logprobs(model, whole))
        for mb in micro:
            got, _ = mb.rows.unpack(packed_logprobs(model, mb.rows))
            torch.testing.assert_close(got, ref[mb.index, : got.shape[1]], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="divide"):
        pack_micro_batches(flat_p, flat_c, token_budget=30, shared_prompt=True, group_size=4)


def test_pack_micro_batches_padding_for_idle_ranks():
    """3 groups over 2 ranks with one group per micro-batch: rank 1 gets a one-token padding micro-batch."""
    p, c = [[5, 6]] * 3, [[7], [8], [9]]
    plans = [pack_micro_batches(p, c, token_budget=3, rank=r, num_ranks=2, pad_id=0) for r in (0, 1)]
    assert len(plans[0]) == len(plans[1]) == 2
    padding = [mb for plan in plans for mb in plan if mb.is_padding]
    assert len(padding) == 1 and padding[0].rows.num_tokens == 2 and padding[0].num_loss_tokens == 0
    assert sorted(i for plan in plans for mb in plan for i in mb.index) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# models that do not fit


def test_model_without_lm_head(gen):
    causal = tiny_model(seed=0)
    body = Qwen2Model(causal.config)
    body.load_state_dict(causal.model.state_dict())
    batch = pack(rand_ids(gen, 400, [3]), rand_ids(gen, 400, [4]))
    with pytest.raises(ValueError, match="no lm_head"):
        lm_head_of(body)
    with pytest.raises(ValueError, match="no lm_head"):
        packed_logprobs(body, batch)
    # a body still gives hidden states (it is what packed_forward runs anyway)
    assert decoder_of(body) is body
    with torch.no_grad():
        torch.testing.assert_close(packed_forward(body, batch), packed_forward(causal, batch))


def test_logit_scale_and_softcap(gen):
    model = tiny_model(seed=0)
    batch = pack(rand_ids(gen, 400, [3, 2]), rand_ids(gen, 400, [4, 5]))
    with torch.no_grad():
        hidden = packed_forward(model, batch)
        model.config.logits_scaling = 4.0  # Granite: logits / 4
        got = packed_logprobs(model, batch, hidden=hidden, temperature=0.5)
        logits = model.lm_head(hidden[batch.logit_index]) / 4.0 / 0.5
        ref = torch.log_softmax(logits, -1).gather(-1, batch.targets[:, None])[:, 0]
        del model.config.logits_scaling
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
        model.config.final_logit_softcapping = 30.0
        with pytest.raises(ValueError, match="soft-caps"):
            packed_logprobs(model, batch, hidden=hidden)


def test_lm_head_bias_is_used(gen):
    model = tiny_model(seed=0)
    d, v = model.config.hidden_size, model.config.vocab_size
    head = torch.nn.Linear(d, v, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(torch.randn(v, generator=gen))
    model.lm_head = head
    prompts, completions = rand_ids(gen, v, [3, 6]), rand_ids(gen, v, [4, 2])
    with torch.no_grad():
        got = packed_logprobs(model, pack(prompts, completions))
        ref = padded_logprobs(model, prompts, completions)
    assert (got - ref).abs().max().item() <= TOL


def test_flash_attention_refused_without_flash_attn(gen):
    model = tiny_model(seed=0)
    model.config._attn_implementation = "flash_attention_2"
    batch = pack(rand_ids(gen, 400, [3]), rand_ids(gen, 400, [4]))
    if _backends.HAS_FLASH_ATTN:
        pytest.skip("flash-attn installed: the CPU refusal is about the device instead")
    with pytest.raises(_backends.BackendUnavailable, match="flash-attn"):
        packed_forward(model, batch)

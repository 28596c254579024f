"""The tiny model and tokenizer built in code: deterministic, fast, usable by every other test."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoTokenizer

from fastgrpo import tiny
from fastgrpo.tiny import EOS_TOKEN, PAD_TOKEN, tiny_model, tiny_model_and_tokenizer, tiny_tokenizer


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_model_and_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m1, _ = tiny_model_and_tokenizer(seed=7)
    assert torch.equal(torch.get_rng_state(), state), "building the model consumed the global RNG"
    torch.rand(100)  # the global RNG moves; the model must not depend on it
    m2, _ = tiny_model_and_tokenizer(seed=7)
    assert _same_weights(m1, m2)
    m3, _ = tiny_model_and_tokenizer(seed=8)
    assert not _same_weights(m1, m3)


def test_builds_well_under_a_second():
    tiny._tokenizer_json.cache_clear()  # time the tokenizer training too
    t0 = time.perf_counter()
    model, tok = tiny_model_and_tokenizer(seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"tiny model + tokenizer took {elapsed:.2f} s"
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_tokenizer_is_deterministic_and_sized():
    tiny._tokenizer_json.cache_clear()
    a = tiny_tokenizer()
    tiny._tokenizer_json.cache_clear()
    b = tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert 300 <= len(a) <= 1000
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(100)


def test_tokenizer_specials_roundtrip_and_chat_template(tmp_path):
    tok = tiny_tokenizer()
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == EOS_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    text = "What is 7+1? Put the final answer in <answer></answer>. Ünïcödé ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: nothing is unknown
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3+4?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    enc = tok(chat, add_special_tokens=False)["input_ids"]
    assert enc.count(tok.eos_token_id) == 1  # <|im_end|> is one special token
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.eos_token_id == tok.eos_token_id and again.pad_token_id == tok.pad_token_id


def test_model_matches_tokenizer_and_runs():
    model, tok = tiny_model_and_tokenizer()
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert not model.training
    ids = torch.tensor([tok("What is 1+2?")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    # init_std makes the untrained distribution clearly non-uniform (tests rely on it to see leaks)
    assert float(logits.softmax(-1).max()) > 5.0 / len(tok)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] <= ids.shape[1] + 5


def test_model_options():
    m = tiny_model(
        300,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        tie_word_embeddings=True,
        attn_implementation="eager",
        dtype=torch.float64,
    )
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.config._attn_implementation == "eager"
    assert m.lm_head.weight.dtype == torch.float64 and m.lm_head.weight.shape == (300, 32)

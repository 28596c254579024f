"""Rollout with transformers generate: shapes, masks through the first end token, behaviour log-probs, stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import eos_biased_tiny

from fastgrpo import _backends
from fastgrpo.packing import packed_logprobs
from fastgrpo.rollout import (
    HAS_VLLM,
    RolloutBatch,
    SamplingParams,
    VLLMEngine,
    completion_end_mask,
    generate_rollouts,
    tokenize_prompts,
)
from fastgrpo.tiny import tiny_model_and_tokenizer

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    [{"role": "user", "content": "What is 3+4?"}],
    "What is 1+1? <answer>",
    [5, 6, 7],
]


@pytest.fixture(scope="module")
def eos_heavy():
    """The tiny model with an lm_head bias that makes EOS likely: completions of many different lengths."""
    return eos_biased_tiny(5.0)


def _check_layout(r: RolloutBatch, eos: int, pad: int, b: int, g: int, max_new: int) -> None:
    assert r.prompt_ids.shape[0] == r.completion_ids.shape[0] == b * g
    assert r.completion_ids.shape[1] <= max_new
    assert r.group_ids.tolist() == [i for i in range(b) for _ in range(g)]
    # prompts left-padded: each mask row is False... then True...
    for row in r.prompt_mask.int():
        assert torch.equal(row, row.sort().values)
    for ids, m, trunc in zip(r.completion_ids, r.completion_mask, r.truncated):
        n = int(m.sum())
        assert n >= 1 and bool(m[:n].all()) and not bool(m[n:].any())  # contiguous from column 0
        eos_pos = (ids[:n] == eos).nonzero().flatten().tolist()
        if trunc:
            assert eos_pos == [] and n == max_new
        else:
            assert eos_pos == [n - 1]  # through and including the first EOS, nothing after
        assert bool((ids[n:] == pad).all())


def test_shapes_masks_and_groups(eos_heavy):
    model, tok = eos_heavy
    r = generate_rollouts(model, tok, PROMPTS, SamplingParams(num_generations=4, max_new_tokens=10, seed=0))
    _check_layout(r, tok.eos_token_id, tok.pad_token_id, 3, 4, 10)
    lens = r.completion_lens.tolist()
    assert len(set(lens)) > 2, f"want varied lengths to test masking, got {lens}"
    assert bool(r.truncated.any()) and bool((~r.truncated).any())
    # the G completions of a prompt share its (padded) prompt
    for i in range(3):
        assert bool((r.prompt_ids[4 * i : 4 * i + 4] == r.prompt_ids[4 * i]).all())
    assert r.prompts()[0] == tokenize_prompts(tok, PROMPTS[:1])[0]
    assert r.prompts()[8] == [5, 6, 7]
    assert len(r.texts) == 12 and all(isinstance(t, str) for t in r.texts)


def test_behaviour_logprobs_match_packed_recompute(eos_heavy):
    model, tok = eos_heavy
    for temperature in (0.7,):  # not 1: the temperature must be applied; top_k must not be (see rollout.py)
        params = SamplingParams(
            num_generations=3, max_new_tokens=8, temperature=temperature, top_k=50, seed=1
        )
        r = generate_rollouts(model, tok, PROMPTS, params)
        assert r.logprobs is not None and r.logprobs.dtype == torch.float32
        with torch.no_grad():
            for batch in (r.pack(), r.pack_shared()):
                recomputed = r.unpack(batch, packed_logprobs(model, batch, temperature=temperature))
                err = (recomputed - r.logprobs)[r.completion_mask].abs().max().item()
                assert err <= 2e-5, f"T={temperature}: behaviour vs recomputed log-probs differ by {err:.2e}"
        assert bool((r.logprobs[~r.completion_mask] == 0).all())


def test_seed_reproducible_and_mode_restored(eos_heavy):
    model, tok = eos_heavy
    model.train()
    try:
        a = generate_rollouts(model, tok, PROMPTS, num_generations=2, max_new_tokens=4, seed=5)
        assert model.training and all(m.training for m in model.modules())
        b = generate_rollouts(model, tok, PROMPTS, num_generations=2, max_new_tokens=4, seed=5)
        c = generate_rollouts(model, tok, PROMPTS, num_generations=2, max_new_tokens=4, seed=6)
    finally:
        model.eval()
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids[:, :1], c.completion_ids[:, :1])


def test_stop_strings():
    model, tok = tiny_model_and_tokenizer(seed=0)
    greedy = SamplingParams(num_generations=1, max_new_tokens=12, do_sample=False)
    base = generate_rollouts(model, tok, PROMPTS[:1], greedy)
    ids = base.completions()[0]
    # pick a token whose text is a clean stop string that does not occur earlier in the completion
    k = next(
        k
        for k in range(2, len(ids))
        if (s := tok.decode(ids[k])).strip().isalnum() and s not in tok.decode(ids[:k])
    )
    stop = tok.decode(ids[k])
    r = generate_rollouts(model, tok, PROMPTS[:1], greedy, stop=[stop])
    assert r.completions()[0] == ids[: k + 1]  # through the token that completes the stop string
    assert not bool(r.truncated[0])
    assert r.texts[0].endswith(stop)
    with pytest.raises(ValueError, match="sequence of strings"):
        generate_rollouts(model, tok, PROMPTS[:1], greedy, stop="</answer>")


def test_completion_end_mask_by_hand():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 7, 8]])
    mask, truncated = completion_end_mask(ids, [2], stop_index=torch.tensor([-1, -1, -1, 1]))
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]


def test_tokenizer_without_pad_token(eos_heavy):
    model, _ = eos_heavy
    _, tok = tiny_model_and_tokenizer(seed=0)  # a fresh tokenizer: the fixture's stays untouched
    tok.pad_token = None
    assert tok.pad_token_id is None
    r = generate_rollouts(model, tok, PROMPTS, num_generations=2, max_new_tokens=8, seed=0)
    assert r.pad_token_id == tok.eos_token_id
    _check_layout(r, tok.eos_token_id, tok.eos_token_id, 3, 2, 8)
    assert tok.pad_token is None  # not modified
    tok.eos_token = None
    model_no_eos = type(model)(model.config)
    model_no_eos.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        generate_rollouts(model_no_eos, tok, PROMPTS, num_generations=1, max_new_tokens=2)


def test_bad_prompts(eos_heavy):
    model, tok = eos_heavy
    long_prompt = "What is 1+1? " * 20
    n = len(tok(long_prompt)["input_ids"])
    with pytest.raises(ValueError, match=rf"prompts\[1\] has {n} tokens, more than max_prompt_length=16"):
        generate_rollouts(
            model, tok, ["hi", long_prompt], num_generations=1, max_new_tokens=2, max_prompt_length=16
        )
    r = generate_rollouts(
        model,
        tok,
        [long_prompt],
        num_generations=1,
        max_new_tokens=2,
        max_prompt_length=16,
        prompt_truncation="left",
    )
    assert r.prompts()[0] == tok(long_prompt)["input_ids"][-16:]
    with pytest.raises(ValueError, match="empty"):
        generate_rollouts(model, tok, ["hi", ""], num_generations=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_rollouts(model, tok, ["hi"], num_generations=1, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_rollouts(model, tok, ["hi"], num_generations=1, max_new_tokens=5000)
    with pytest.raises(ValueError, match="cannot generate"):
        generate_rollouts(model.model, tok, ["hi"], num_generations=1, max_new_tokens=2)


def test_vllm_is_never_imported_unless_used(tmp_path):
    # a fake vllm on the path that fails loudly when imported: importing fastgrpo.rollout must not touch it,
    # only building a VLLMEngine may
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('fake vllm imported')\n")
    code = (
        "import sys, fastgrpo.rollout as r\n"
        "assert r.HAS_VLLM, 'the fake vllm is not visible'\n"
        "assert 'vllm' not in sys.modules\n"
        "try:\n"
        "    r.VLLMEngine('/nonexistent')\n"
        "except ImportError as e:\n"
        "    assert 'fake vllm imported' in str(e)\n"
        "else:\n"
        "    raise AssertionError('VLLMEngine did not import vllm')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env, cwd=REPO)
    if HAS_VLLM:
        pytest.skip("vllm installed: the engine itself needs a GPU")
    with pytest.raises(_backends.BackendUnavailable, match="pip install vllm"):
        VLLMEngine("/nonexistent")


@pytest.mark.slow
def test_smollm2_rollout_with_stop_string():
    pytest.importorskip("gguf")
    from fastgrpo.models import load_smollm2

    model, tok = load_smollm2()
    prompt = [
        {"role": "user", "content": "What is 7+1? Put the final answer in <answer></answer>."},
        {"role": "assistant", "content": "<answer>8</answer>"},
        {"role": "user", "content": "What is 3+4? Put the final answer in <answer></answer>."},
    ]
    r = generate_rollouts(
        model, tok, [prompt], num_generations=4, max_new_tokens=24, stop=["</answer>"], seed=0
    )
    _check_layout_eos_or_stop(r, tok.eos_token_id, 24)
    assert any(t.endswith("</answer>") for t in r.texts), r.texts
    with torch.no_grad():
        batch = r.pack()
        recomputed = r.unpack(batch, packed_logprobs(model, batch))
    assert (recomputed - r.logprobs)[r.completion_mask].abs().max().item() <= 1e-3


def _check_layout_eos_or_stop(r: RolloutBatch, eos: int, max_new: int) -> None:
    for ids, m, trunc, text in zip(r.completion_ids, r.completion_mask, r.truncated, r.texts):
        n = int(m.sum())
        assert bool(m[:n].all()) and not bool(m[n:].any())
        if trunc:
            assert n == max_new
        else:
            assert int(ids[n - 1]) == eos or text.endswith("</answer>")

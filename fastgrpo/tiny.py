"""A tiny causal LM and its tokenizer, built in code: no download, deterministic, ready in well under a second.

Used by every test, by the trainer's ``--tiny`` mode and by the benchmarks. Two pieces:

* :func:`tiny_tokenizer` — a byte-level BPE (any text encodes, nothing is ever unknown) trained in code on a
  small embedded corpus of arithmetic questions and short sentences, wrapped in ``PreTrainedTokenizerFast``
  with ``<|pad|>`` (pad), ``<|im_end|>`` (eos, ends an assistant turn), ``<|im_start|>`` and a ChatML chat
  template, so chat-formatted prompts behave like SmolLM2-Instruct's. Left padding by default (generation).
* :func:`tiny_model` — a ``Qwen2ForCausalLM`` (GQA, q/k/v bias, RoPE, RMSNorm, SwiGLU: the same code paths as
  real checkpoints) with ``hidden_size=64``, two layers and the tokenizer's vocabulary (~512). Weights are
  drawn from ``N(0, init_std)`` under a private RNG seeded with ``seed``, so the global RNG is untouched and two
  calls with the same arguments give bit-identical models. ``init_std`` is larger than the usual 0.02 so
  that the untrained model's distributions are far from uniform: tests that compare log-probs then see any
  cross-sequence leak well above rounding noise.
"""

from __future__ import annotations

import functools
import logging

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

logger = logging.getLogger(__name__)

__all__ = [
    "PAD_TOKEN",
    "EOS_TOKEN",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "tiny_tokenizer",
    "tiny_model",
    "tiny_model_and_tokenizer",
]

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|im_start|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, ENDOFTEXT_TOKEN, BOS_TOKEN, EOS_TOKEN]

# ChatML, as SmolLM2-Instruct and Qwen2 use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """A small fixed corpus: the arithmetic / comparison tasks' vocabulary, tags and some plain English."""
    lines: list[str] = []
    for a in range(10):
        for b in range(10):
            lines.append(f"What is {a}+{b}? Put the final answer in <answer></answer>.")
            lines.append(f"<answer>{a + b}</answer>")
            lines.append(f"Which number is larger, {a} or {b}? <answer>{max(a, b)}</answer>")
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "A reward is given when the answer is correct and the format is right.",
        "Think step by step, then write the answer between the tags.",
        "system user assistant: You are a helpful assistant.",
        "Let me add the two numbers: the sum is",
        "the answer is therefore, so we get, and then, because, which means",
    ]
    return lines


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer trained in code (~10 ms, cached); ``len(tok) <= vocab_size``.

    Special tokens: pad ``<|pad|>`` (id 0), eos ``<|im_end|>``, ``<|im_start|>``, ``<|endoftext|>``.
    ``padding_side="left"`` (what generation needs); ``chat_template`` is ChatML.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (byte alphabet + specials), got {vocab_size}"
        )
    tok = Tokenizer.from_str(_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[BOS_TOKEN, ENDOFTEXT_TOKEN],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def tiny_model(
    vocab_size: int | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    init_std: float = 0.2,
    tie_word_embeddings: bool = False,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    pad_token_id: int = 0,
    eos_token_id: int | None = None,
) -> Qwen2ForCausalLM:
    """A ``Qwen2ForCausalLM`` from a config, initialised from ``seed`` (bit-identical across calls).

    Default size: ``V = len(tiny_tokenizer())`` (446), ``D=64``, 2 layers, 4 query / 2 key-value heads (GQA),
    ~0.13 M parameters. ``eos_token_id`` defaults to the tiny tokenizer's ``<|im_end|>`` id.
    """
    if vocab_size is None:
        vocab_size = len(tiny_tokenizer())
    if eos_token_id is None:
        eos_token_id = tiny_tokenizer().convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.to(dtype)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    model.eval()
    return model


def tiny_model_and_tokenizer(
    seed: int = 0, vocab_size: int = 512, **model_kwargs
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """:func:`tiny_model` sized to :func:`tiny_tokenizer`'s vocabulary, with matching pad / eos ids."""
    tok = tiny_tokenizer(vocab_size)
    model = tiny_model(
        len(tok),
        seed=seed,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **model_kwargs,
    )
    return model, tok

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
from typing import Any

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
    "TINY_VLM_FAMILIES",
    "tiny_vl_tokenizer",
    "tiny_vlm",
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
def _tokenizer_json(vocab_size: int, extra_specials: tuple[str, ...] = ()) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_specials),
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


# ----------------------------------------------------------------------------------------------------------
# tiny vision-language models

#: The tiny VLM families: ``qwen2-vl`` and ``qwen2.5-vl`` (multimodal rotary positions, M-RoPE; images and
#: video) and ``llava`` (a CLIP vision tower + projector in front of a Qwen2 decoder; plain 1-D positions,
#: images only).
TINY_VLM_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "llava")

QWEN_VL_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
LLAVA_IMAGE_TOKEN = "<image>"

# ChatML whose turns may be lists of Hugging Face chat parts; an image / video part renders as the model
# family's placeholder, which the processor then expands to one token per vision feature.
_PARTS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ IMAGE }}{% elif part['type'] == 'video' %}{{ VIDEO }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_VL_CHAT_TEMPLATE = _PARTS_TEMPLATE.replace(
    "{{ IMAGE }}", "<|vision_start|><|image_pad|><|vision_end|>"
).replace("{{ VIDEO }}", "<|vision_start|><|video_pad|><|vision_end|>")
LLAVA_CHAT_TEMPLATE = _PARTS_TEMPLATE.replace("{{ IMAGE }}", LLAVA_IMAGE_TOKEN).replace(
    "{{ VIDEO }}", "{{ raise_exception('this model takes no video') }}"
)


def tiny_vl_tokenizer(family: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """:func:`tiny_tokenizer`'s BPE trained with the family's vision special tokens added, and a chat template
    that renders image / video parts (``QWEN_VL_CHAT_TEMPLATE`` or ``LLAVA_CHAT_TEMPLATE``)."""
    if family not in TINY_VLM_FAMILIES:
        raise ValueError(f"family must be one of {TINY_VLM_FAMILIES}, got {family!r}")
    extra = QWEN_VL_SPECIAL_TOKENS if family.startswith("qwen") else (LLAVA_IMAGE_TOKEN,)
    tok = Tokenizer.from_str(_tokenizer_json(vocab_size, extra))
    template = QWEN_VL_CHAT_TEMPLATE if family.startswith("qwen") else LLAVA_CHAT_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[BOS_TOKEN, ENDOFTEXT_TOKEN, *extra],
        padding_side="left",
        chat_template=template,
        model_max_length=8192,
    )


def tiny_vlm(
    family: str = "qwen2.5-vl",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 1,
    vision_heads: int = 2,
    image_size: int = 28,
    init_std: float = 0.2,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    max_pixels: int = 28 * 28 * 64,
    vocab_size: int | None = None,
) -> tuple[torch.nn.Module, Any]:
    """A random vision-language model of ``family`` (:data:`TINY_VLM_FAMILIES`) and its processor, built in code.

    Qwen2-VL / Qwen2.5-VL: patch 14, spatial merge 2 (one token per 28x28 pixels), temporal patch 2, the image
    processor's ``smart_resize`` between 56x56 and ``max_pixels`` pixels (56x84 -> 6 tokens); ``mrope_section``
    splits the rotary half-dimension ``head_dim / 2`` over t / h / w. The video processor is transformers' own
    when torchvision is importable, else :class:`fastgrpo.vlm.FrameVideoProcessor` with the same settings
    (``min_pixels`` 56x56 here, so small frames keep their size). LLaVA: a CLIP vision tower on
    ``image_size`` pixels with patch 7 (``(image_size/7)^2`` tokens per image, the CLS token dropped) and a
    2-layer projector, in front of a Qwen2 decoder. Weights are drawn from ``N(0, init_std)`` under a private
    RNG seeded with ``seed`` (bit-identical across calls); ``model.eval()`` is returned. ``vocab_size`` (at
    least the tokenizer's) pads the embedding and LM head with rows no token maps to (benchmarks at a real
    vocabulary's LM-head cost).
    """
    from .vlm import make_processor

    tok = tiny_vl_tokenizer(family)
    text = dict(
        vocab_size=max(vocab_size or 0, len(tok)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192,
        initializer_range=init_std,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    if family.startswith("qwen"):
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
        half = hidden_size // num_heads // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        text["rope_parameters"] = dict(rope_type="default", mrope_section=section, rope_theta=10000.0)
        common = dict(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        if family == "qwen2-vl":
            from transformers import Qwen2VLConfig as Config
            from transformers import Qwen2VLForConditionalGeneration as Model
            from transformers import Qwen2VLProcessor as Processor

            vision = dict(depth=vision_depth, embed_dim=vision_hidden_size, hidden_size=hidden_size,
                          num_heads=vision_heads, mlp_ratio=2, initializer_range=init_std)  # fmt: skip
        else:
            from transformers import Qwen2_5_VLConfig as Config
            from transformers import Qwen2_5_VLForConditionalGeneration as Model
            from transformers import Qwen2_5_VLProcessor as Processor

            vision = dict(depth=vision_depth, hidden_size=vision_hidden_size, out_hidden_size=hidden_size,
                          intermediate_size=2 * vision_hidden_size, num_heads=vision_heads, window_size=56,
                          fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2,
                          initializer_range=init_std)  # fmt: skip
        config = Config(text_config=text, vision_config=vision, **common)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 56 * 56, "longest_edge": max_pixels}
        )
        video = dict(size={"shortest_edge": 56 * 56, "longest_edge": max_pixels}, patch_size=14,
                     temporal_patch_size=2, merge_size=2)  # fmt: skip
        processor = make_processor(Processor, image_processor, tok, QWEN_VL_CHAT_TEMPLATE, video_kwargs=video)
    elif family == "llava":
        from transformers import LlavaConfig as Config
        from transformers import LlavaForConditionalGeneration as Model
        from transformers import LlavaProcessor as Processor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        patch = 7
        vision = dict(model_type="clip_vision_model", hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                      num_hidden_layers=vision_depth, num_attention_heads=vision_heads, image_size=image_size,
                      patch_size=patch, projection_dim=vision_hidden_size, initializer_range=init_std)  # fmt: skip
        config = Config(
            text_config=dict(model_type="qwen2", **text),
            vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
        image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        processor = make_processor(
            Processor, image_processor, tok, LLAVA_CHAT_TEMPLATE, patch_size=patch, num_additional_image_tokens=1,
            vision_feature_select_strategy="default",
        )  # fmt: skip
    else:
        raise ValueError(f"family must be one of {TINY_VLM_FAMILIES}, got {family!r}")
    config._attn_implementation = attn_implementation
    config.get_text_config()._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Model(config)
    model.to(dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    return model, processor

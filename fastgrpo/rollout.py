"""Rollout: ``G`` sampled completions per prompt with ``transformers`` ``generate`` (vLLM when installed).

:func:`generate_rollouts` left-pads the prompts (decoder-only generation appends on the right), prefills each
prompt once and samples its ``G`` completions from that prompt's KV cache (below; or ``num_return_sequences = G``
with ``prefill_once=False``), and returns a :class:`RolloutBatch`:

* ``completion_ids [B·G, T_c]`` right-padded, ``completion_mask`` True up to **and including** the first end
  token: an EOS id (the tokenizer's and the model's ``generation_config``), or the token that completes a stop
  string. Rows are prompt-major (``group_ids = [0]*G + [1]*G + ...``), the order shared-prompt packing uses.
* ``truncated [B·G]``: no end token within ``max_new_tokens`` (DAPO's overlong shaping / masking needs it).
* ``logprobs [B·G, T_c]`` (when ``return_logprobs``): behaviour log-probs of the sampled tokens under
  ``softmax(logits / temperature)``, recorded during sampling at the cost of one ``log_softmax`` over ``[B·G, V]``
  per step (only the previous step's row is kept, never the ``[T_c, B·G, V]`` history). They include the
  default logits processors that run before sampling warpers (e.g. ``repetition_penalty``) but not top-k /
  top-p / min-p truncation: the distribution the loss recomputes, so ``old_logp`` can come from here. They
  differ from a packed fp32 recompute only by kernel rounding (KV-cache attention vs one full pass). With
  ``do_sample=False`` the temperature is 1.

One prefill per prompt (``SamplingParams.prefill_once``, the default)
------------------------------------------------------------------
``generate(num_return_sequences=G)`` copies every prompt ``G`` times *before* its prefill, so the prompt (and a
vision-language model's image tokens) runs through the model ``G`` times. With ``prefill_once``:

1. **Prefill** the ``B`` prompts once: ``model.generate(prompts, **model_inputs, max_new_tokens=1,
   do_sample=False, return_dict_in_generate=True)``. transformers prepares the inputs as for any generation
   (position ids from the padding mask, a VLM's M-RoPE positions and ``rope_deltas``, its vision tower on the
   images), so nothing here is model-specific; the greedy token is thrown away (no RNG is drawn) and the last
   prompt token is cropped from the returned cache (``Cache.crop(-1)``): ``[B, H, T_p - 1, d]`` per layer.
2. **Continue**: ``model.generate(prompts, num_return_sequences=G, cache=<that cache, for B·G rows>, ...)`` with
   the caller's sampling settings. transformers sees a cache holding all but the last prompt token, so its own
   prefill runs the last prompt token for the ``B·G`` rows (one decode-sized step) and samples, processes and
   stops exactly as the plain path: logits processors (the behaviour log-probs), stop strings, EOS handling and
   the RNG stream are the same code on the same ``[B·G, V]`` scores, up to fp32 rounding of the scores.
   The ``B·G``-row cache is one of (``SamplingParams.prompt_cache``):

   * ``"shared"``: :class:`fastgrpo.prefix_cache.SharedPrefixCache` keeps each prompt's keys/values once
     (``[B, H, T_p - 1, d]``) and only the completion tokens per row; the text decoder's attention is
     switched, for this call only, to ``fastgrpo_shared_prefix``, which attends the ``G`` queries of a group
     to their shared prefix in one product and to each row's own completion tokens, under one softmax (a
     two-part attention written here: transformers has no attention over a prefix shared by several rows).
     The prompt cache is neither copied nor re-read ``G`` times per decoded token.
   * ``"expanded"``: transformers' ``Cache.batch_repeat_interleave(G)`` (``G`` copies); any model.
   * ``"auto"`` (default): shared when ``G > 1`` and every cache layer is a plain full-attention
     ``DynamicLayer`` whose attention goes through transformers' ``AttentionInterface``, else expanded.

``compile_decode`` (CUDA only, off by default) continues instead from a ``StaticCache`` holding the expanded
prompt, so transformers compiles the decode step (``torch.compile``, its ``generate`` auto-compilation).
``do_sample=False`` with ``G > 1`` is refused (``G`` identical completions); with ``G = 1`` both paths run.

Extra model inputs (``generate_rollouts(..., model_inputs=...)``: a VLM's ``pixel_values``, ``image_grid_thw``,
``mm_token_type_ids``, ...) go to the prefill only, as ``generate`` takes them for the ``B`` prompts; the
continuation needs none of them (they live in the cache and in the model's generation state). The plain path
passes them to its single ``generate`` call.

Bad input, handled explicitly:

* prompt longer than ``max_prompt_length``: ``ValueError`` naming it, or left truncation with
  ``prompt_truncation="left"`` (keeps the end of the prompt, where chat templates put the generation prompt);
* empty prompt: ``ValueError``; empty completion cannot happen (``max_new_tokens >= 1``; an immediate EOS gives
  a one-token completion, the EOS, which is scored);
* tokenizer without a pad token: its EOS id pads (prompts on the left, completions on the right); masks come
  from lengths, never from comparing with the pad id, so pad == eos is safe. The tokenizer is not modified.
  Neither pad nor EOS: ``ValueError``.

vLLM (:class:`VLLMEngine`) is imported lazily inside the engine, only when one is built; importing this module
never imports vLLM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._backends import BackendUnavailable
from .models import eval_mode
from .packing import PackedBatch, _unwrap, pack, pack_shared_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "SamplingParams",
    "RolloutBatch",
    "generate_rollouts",
    "tokenize_prompts",
    "completion_end_mask",
    "PROMPT_CACHE_MODES",
    "HAS_VLLM",
    "VLLMEngine",
]

HAS_VLLM: bool = importlib.util.find_spec("vllm") is not None

Prompt = str | Sequence[int] | Sequence[dict]
ModelInputs = Mapping[str, "Tensor | Sequence[Tensor]"]

PROMPT_CACHE_MODES = ("auto", "shared", "expanded")


@dataclass
class SamplingParams:
    """Generation settings. ``num_generations`` is ``G`` (``num_return_sequences``).

    ``prefill_once`` (default True): one prefill per prompt, its ``G`` completions continue from its cache
    (module docstring); False: transformers' ``num_return_sequences`` (each prompt copied ``G`` times first).
    ``prompt_cache``: how the ``G`` rows of a group read that cache, ``"auto"`` | ``"shared"`` | ``"expanded"``.
    ``compile_decode``: continue from an expanded ``StaticCache`` with a compiled decode step (CUDA only).
    The three are ignored by :class:`VLLMEngine` (vLLM computes a prompt once for its ``n`` samples itself).
    """

    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = True
    stop: Sequence[str] = ()
    max_prompt_length: int | None = None
    prompt_truncation: str = "error"
    return_logprobs: bool = True
    seed: int | None = None
    prefill_once: bool = True
    prompt_cache: str = "auto"
    compile_decode: bool = False

    def validate(self) -> None:
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be >= 1 (a completion needs a token), got {self.max_new_tokens}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.prompt_truncation not in ("error", "left"):
            raise ValueError(f"prompt_truncation must be 'error' or 'left', got {self.prompt_truncation!r}")
        if isinstance(self.stop, str):
            raise ValueError("stop must be a sequence of strings, e.g. ('</answer>',), not a single string")
        if self.prompt_cache not in PROMPT_CACHE_MODES:
            raise ValueError(f"prompt_cache must be one of {PROMPT_CACHE_MODES}, got {self.prompt_cache!r}")
        if self.compile_decode and not self.prefill_once:
            raise ValueError(
                "compile_decode continues from the prefilled prompt cache: it needs prefill_once=True"
            )
        if self.compile_decode and self.prompt_cache == "shared":
            raise ValueError(
                "compile_decode decodes from a static (expanded) cache: use prompt_cache='expanded' or 'auto'"
            )


@dataclass
class RolloutBatch:
    """``B`` prompts × ``G`` completions, prompt-major (module docstring for the conventions).

    Attributes:
        prompt_ids: ``[B·G, T_p]`` int64, left-padded with ``pad_token_id``; ``prompt_mask`` bool alike.
        completion_ids: ``[B·G, T_c]`` int64, right-padded; ``completion_mask`` bool, through the first end token.
        logprobs: ``[B·G, T_c]`` fp32 behaviour log-probs (0 where masked), or None.
        truncated: ``[B·G]`` bool, no end token within ``max_new_tokens``.
        group_ids: ``[B·G]`` int64 prompt index of each row.
        num_generations: ``G``.
        texts: decoded completions (masked tokens, special tokens skipped).
        pad_token_id: the id used for padding.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    logprobs: Tensor | None
    truncated: Tensor
    group_ids: Tensor
    num_generations: int
    texts: list[str] = field(default_factory=list)
    pad_token_id: int = 0

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_ids.shape[0]) // self.num_generations

    @property
    def completion_lens(self) -> Tensor:
        """``[B·G]`` int64."""
        return self.completion_mask.sum(1)

    def prompts(self) -> list[list[int]]:
        """Unpadded prompt tokens per row (``B·G`` lists; each prompt repeated ``G`` times)."""
        return [row[m].tolist() for row, m in zip(self.prompt_ids.cpu(), self.prompt_mask.cpu())]

    def completions(self) -> list[list[int]]:
        """Completion tokens per row, through the first end token."""
        return [row[m].tolist() for row, m in zip(self.completion_ids.cpu(), self.completion_mask.cpu())]

    def pack(self, device: torch.device | str | None = None) -> PackedBatch:
        """All rows as one plain packed row (:func:`fastgrpo.packing.pack`); for micro-batches use
        :func:`fastgrpo.packing.pack_micro_batches` on :meth:`prompts` / :meth:`completions`."""
        return pack(self.prompts(), self.completions(), device=device)

    def pack_shared(self, device: torch.device | str | None = None) -> PackedBatch:
        """One copy of each prompt followed by its ``G`` completions (:func:`fastgrpo.packing.pack_shared_prompt`)."""
        prompts, completions, g = self.prompts(), self.completions(), self.num_generations
        return pack_shared_prompt(
            prompts[::g], [completions[i : i + g] for i in range(0, len(completions), g)], device=device
        )

    def unpack(self, batch: PackedBatch, values: Tensor) -> Tensor:
        """Per-target ``values [M]`` of ``self.pack()`` / ``pack_shared()`` in this batch's ``[B·G, T_c]`` layout."""
        padded, _ = batch.unpack(values)
        out = values.new_zeros(self.completion_ids.shape)
        out[:, : padded.shape[1]] = padded
        return out


def _pad_and_eos(tokenizer: Any, model: nn.Module | None) -> tuple[int, list[int]]:
    eos: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if int(e) not in eos:
            eos.append(int(e))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        if not eos:
            raise ValueError(
                "the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token (and eos_token) "
                "before generating"
            )
        pad = eos[0]
        logger.info("tokenizer has no pad token: padding with the EOS id %d (masks come from lengths)", pad)
    return int(pad), eos


def tokenize_prompts(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_prompt_length: int | None = None,
    prompt_truncation: str = "error",
    add_special_tokens: bool = False,
) -> list[list[int]]:
    """Token ids per prompt. A prompt is text (used as is), token ids, or a chat (list of ``{"role", "content"}``
    dicts, rendered with the tokenizer's chat template and the generation prompt).

    ``add_special_tokens=False`` by default: chat templates already hold their special tokens.
    """
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        elif isinstance(p, Tensor):
            ids = p.tolist()
        elif len(p) and isinstance(p[0], dict):
            ids = tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):  # a BatchEncoding in recent transformers
                ids = ids["input_ids"]
        else:
            ids = [int(t) for t in p]
        if len(ids) == 0:
            raise ValueError(f"prompts[{i}] is empty after tokenization; generation needs at least one token")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if prompt_truncation == "left":
                ids = ids[-max_prompt_length:]
            else:
                raise ValueError(
                    f"prompts[{i}] has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}; raise the "
                    "limit or pass prompt_truncation='left' to keep its last tokens"
                )
        out.append(list(ids))
    return out


def completion_end_mask(
    completion_ids: Tensor, eos_ids: Sequence[int], stop_index: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(mask [R, T_c] bool, truncated [R] bool)``: True through the first EOS in ``eos_ids`` or the position
    ``stop_index[r]`` (``-1`` = none) where a stop string completed, whichever comes first."""
    r, t = completion_ids.shape
    dev = completion_ids.device
    big = torch.full((r,), t, dtype=torch.long, device=dev)
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    pos = torch.arange(t, device=dev).expand(r, t)
    first_eos = torch.where(is_eos, pos, t).min(1).values if t else big
    end = first_eos
    if stop_index is not None:
        end = torch.minimum(end, torch.where(stop_index >= 0, stop_index.to(dev), big))
    mask = pos <= end[:, None]
    return mask, end >= t


class _BehaviourLogprobs:
    """Logits processor recording ``log_softmax(scores / T)`` at each sampled token.

    At step ``k`` ``input_ids`` already holds the token sampled at step ``k-1``, so the previous step's row is
    gathered then and only one ``[R, V]`` distribution is alive at a time; the last token is gathered after
    ``generate`` returns (:meth:`finish`).
    """

    def __init__(self, temperature: float) -> None:
        self.inv_temp = 1.0 / temperature
        self.prev: Tensor | None = None
        self.values: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prev is not None:
            self.values.append(self.prev.gather(1, input_ids[:, -1:])[:, 0])
        self.prev = torch.log_softmax(scores.float() * self.inv_temp, dim=-1)
        return scores

    def finish(self, completion_ids: Tensor) -> Tensor:
        if self.prev is not None and completion_ids.shape[1] > len(self.values):
            self.values.append(self.prev.gather(1, completion_ids[:, len(self.values)][:, None])[:, 0])
        self.prev = None
        if not self.values:
            return torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
        return torch.stack(self.values, 1)


class _StopStrings:
    """Stopping criterion for stop strings that remembers where each row first completed one."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int, rows: int, device) -> None:
        from transformers.generation.stopping_criteria import StopStringCriteria

        self.inner = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop))
        self.prompt_width = prompt_width
        self.index = torch.full((rows,), -1, dtype=torch.long, device=device)

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        hit = self.inner(input_ids, scores, **kwargs)
        new = hit & (self.index < 0)
        self.index[new] = input_ids.shape[1] - self.prompt_width - 1
        return hit


def generate_rollouts(
    model: nn.Module | VLLMEngine,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    params: SamplingParams | None = None,
    *,
    model_inputs: ModelInputs | None = None,
    **overrides: Any,
) -> RolloutBatch:
    """Sample ``G = params.num_generations`` completions for each prompt (module docstring).

    ``model``: an ``AutoModelForCausalLM`` / image-text-to-text model (or PEFT model), or a :class:`VLLMEngine`.
    ``overrides`` replace fields of ``params`` (e.g. ``max_new_tokens=16``). The model runs in eval mode and is
    restored after.

    ``model_inputs``: extra inputs of the prompts' forward, by name, each either a tensor for the whole batch,
    passed as is (``pixel_values`` / ``image_grid_thw`` of all prompts' images in prompt order, or a ``[B, T_p]``
    tensor already left-padded like the prompts), or a sequence of ``B`` 1-D tensors with one value per prompt
    token (``mm_token_type_ids``), left-padded with 0 here like the ids.
    """
    params = SamplingParams(**{**(params.__dict__ if params else {}), **overrides})
    params.validate()
    if isinstance(model, VLLMEngine):
        if model_inputs:
            raise ValueError("model_inputs are for transformers models; the vLLM engine takes text prompts")
        return model.generate(tokenizer, prompts, params)
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"{type(model).__name__} cannot generate: pass an AutoModelForCausalLM")
    b, g = len(prompts), params.num_generations
    if not params.do_sample and g > 1:
        raise ValueError(
            f"do_sample=False gives num_generations={g} identical completions per prompt: sample, or use "
            "num_generations=1"
        )
    device = next(model.parameters()).device
    if params.compile_decode and device.type != "cuda":
        raise ValueError(f"compile_decode compiles the decode step on CUDA; the model is on {device.type}")
    pad, eos = _pad_and_eos(tokenizer, model)
    ids = tokenize_prompts(
        tokenizer,
        prompts,
        max_prompt_length=params.max_prompt_length,
        prompt_truncation=params.prompt_truncation,
    )
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(x) for x in ids)
    if max_pos is not None and longest + params.max_new_tokens > max_pos:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({max_pos})"
        )
    extra = _collate_model_inputs(model_inputs, ids, longest, device)
    prefill_once = params.prefill_once and longest > 1  # one-token prompts have no prefill to share
    cache_mode = _prompt_cache_mode(model, params) if prefill_once else ""
    prompt_ids = torch.full((b, longest), pad, dtype=torch.long)
    prompt_mask = torch.zeros((b, longest), dtype=torch.bool)
    for i, x in enumerate(ids):  # left padding
        prompt_ids[i, longest - len(x) :] = torch.tensor(x, dtype=torch.long)
        prompt_mask[i, longest - len(x) :] = True
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    recorder = (
        _BehaviourLogprobs(params.temperature if params.do_sample else 1.0)
        if params.return_logprobs
        else None
    )
    stopper = _StopStrings(tokenizer, params.stop, longest, b * g, device) if params.stop else None
    gen_kwargs: dict[str, Any] = dict(
        input_ids=prompt_ids,
        attention_mask=prompt_mask.long(),
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=g,
        do_sample=params.do_sample,
        pad_token_id=pad,
        eos_token_id=eos or None,
        use_cache=True,
        repetition_penalty=params.repetition_penalty,
    )
    if params.do_sample:
        gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.min_p is not None:
            gen_kwargs["min_p"] = params.min_p
    if recorder is not None:
        from transformers import LogitsProcessorList

        gen_kwargs["logits_processor"] = LogitsProcessorList([recorder])
    if stopper is not None:
        from transformers import StoppingCriteriaList

        gen_kwargs["stopping_criteria"] = StoppingCriteriaList([stopper])

    rng = (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        if params.seed is not None
        else None
    )
    with contextlib.ExitStack() as stack:
        if rng is not None:
            stack.enter_context(rng)
            torch.manual_seed(params.seed)
        stack.enter_context(eval_mode(model))
        stack.enter_context(torch.no_grad())
        if prefill_once:
            sequences = _generate_prefill_once(model, gen_kwargs, extra, cache_mode, params.max_new_tokens)
        else:
            sequences = model.generate(**gen_kwargs, **extra)
    completion_ids = sequences[:, longest:]
    mask, truncated = completion_end_mask(completion_ids, eos, stopper.index if stopper is not None else None)
    completion_ids = completion_ids.masked_fill(~mask, pad)
    logprobs = None
    if recorder is not None:
        logprobs = recorder.finish(sequences[:, longest:]).masked_fill(~mask, 0.0)
    texts = tokenizer.batch_decode([row[m] for row, m in zip(completion_ids, mask)], skip_special_tokens=True)
    return RolloutBatch(
        prompt_ids=prompt_ids.repeat_interleave(g, 0),
        prompt_mask=prompt_mask.repeat_interleave(g, 0),
        completion_ids=completion_ids,
        completion_mask=mask,
        logprobs=logprobs,
        truncated=truncated,
        group_ids=torch.arange(b, device=device).repeat_interleave(g),
        num_generations=g,
        texts=texts,
        pad_token_id=pad,
    )


# Inputs generate_rollouts sets itself (from the prompts, or computed by transformers' generate).
_RESERVED_INPUTS = (
    "input_ids",
    "attention_mask",
    "inputs_embeds",
    "position_ids",
    "cache",
    "past_key_values",
)


def _collate_model_inputs(
    model_inputs: ModelInputs | None, ids: list[list[int]], width: int, device: torch.device
) -> dict[str, Tensor]:
    """``model_inputs`` as ``generate`` keyword arguments on ``device``: tensors as they are, per-token sequences
    (one 1-D tensor per prompt, as long as its ids) left-padded with 0 to ``[B, width]``."""
    if not model_inputs:
        return {}
    if not isinstance(model_inputs, Mapping):
        raise ValueError(
            f"model_inputs must be a mapping of input names to tensors, got {type(model_inputs).__name__}"
        )
    out: dict[str, Tensor] = {}
    for key, value in model_inputs.items():
        if key in _RESERVED_INPUTS:
            raise ValueError(
                f"model_inputs[{key!r}]: set by generate_rollouts from the prompts (or computed by transformers)"
            )
        if isinstance(value, Tensor):
            out[key] = value.to(device)
            continue
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(ids):
            raise ValueError(
                f"model_inputs[{key!r}] must be a tensor for the whole batch or a sequence of {len(ids)} 1-D "
                f"tensors (one per prompt), got {type(value).__name__}"
                + (f" of length {len(value)}" if isinstance(value, Sequence) else "")
            )
        rows = [torch.as_tensor(v) for v in value]
        for i, (v, x) in enumerate(zip(rows, ids)):
            if v.dim() != 1 or v.numel() != len(x):
                raise ValueError(
                    f"model_inputs[{key!r}][{i}] must hold one value per token of prompts[{i}] ([{len(x)}] after "
                    f"tokenization and truncation), got shape {tuple(v.shape)}"
                )
        padded = torch.zeros(len(ids), width, dtype=rows[0].dtype)
        for i, v in enumerate(rows):
            padded[i, width - v.numel() :] = v
        out[key] = padded.to(device)
    return out


def _generate_prefill_once(
    model: nn.Module, gen_kwargs: dict[str, Any], extra: dict[str, Tensor], mode: str, max_new_tokens: int
) -> Tensor:
    """``[B·G, T_p + T_c]`` sequences of ``model.generate(**gen_kwargs)`` with one prefill per prompt (module
    docstring): a one-token greedy ``generate`` on the ``B`` prompts (with ``extra``) returns their cache, whose
    last prompt token is cropped; ``generate`` then continues from it, for ``B·G`` rows (``mode``: ``"shared"``,
    ``"expanded"`` or ``"static"``, see :func:`_prompt_cache_mode`), with the caller's settings."""
    from . import prefix_cache  # imports transformers

    g = gen_kwargs["num_return_sequences"]
    prompt_ids, mask = gen_kwargs["input_ids"], gen_kwargs["attention_mask"]
    first = model.generate(
        input_ids=prompt_ids,
        attention_mask=mask,
        **extra,
        max_new_tokens=1,
        do_sample=False,
        pad_token_id=gen_kwargs["pad_token_id"],
        use_cache=True,
        return_dict_in_generate=True,
    )
    cache = getattr(first, "cache", None)
    if cache is None:  # transformers before 5.2x
        cache = getattr(first, "past_key_values", None)
    if cache is None or not getattr(cache, "is_croppable", True):
        raise ValueError(
            f"prefill_once needs a croppable transformers Cache from the prefill, got {type(cache).__name__}: "
            "use prefill_once=False for this model"
        )
    cache.crop(-1)  # the continuation runs the last prompt token, for all B·G rows
    # the cache keyword: ``cache`` since transformers 5.2x (``past_key_values`` before, still accepted)
    key = "cache" if "cache" in inspect.signature(_unwrap(model).forward).parameters else "past_key_values"
    if mode == "static":
        from transformers import StaticCache

        static = StaticCache(config=_unwrap(model).config, max_cache_len=prompt_ids.shape[1] + max_new_tokens)
        for i, layer in enumerate(cache.layers):  # the prompt, expanded, into the preallocated cache
            static.update(layer.keys.repeat_interleave(g, 0), layer.values.repeat_interleave(g, 0), i)
        return model.generate(**gen_kwargs, **{key: static})
    if mode == "expanded":
        if g > 1:  # (repeat_interleave copies even for 1)
            cache.batch_repeat_interleave(g)
        return model.generate(**gen_kwargs, **{key: cache})
    shared = prefix_cache.SharedPrefixCache(cache, g, mask[:, :-1].bool())
    with prefix_cache.shared_prefix_attention_for(model, shared):
        return model.generate(**gen_kwargs, **{key: shared})


def _prompt_cache_mode(model: nn.Module, params: SamplingParams) -> str:
    """``"static"``, ``"shared"`` or ``"expanded"`` (``params.prompt_cache``, ``"auto"`` resolved), decided from
    the model and its config before any model work: the layers of the ``DynamicCache`` transformers' ``generate``
    builds for it (``DynamicCache(config=text config)``, nothing allocated)."""
    if params.compile_decode:
        return "static"
    if params.prompt_cache == "expanded":
        return "expanded"
    from transformers import DynamicCache

    from .prefix_cache import shared_prefix_unsupported

    g = params.num_generations
    config = _unwrap(model).config.get_text_config(decoder=True)
    why = shared_prefix_unsupported(DynamicCache(config=config), model)
    if params.prompt_cache == "shared":
        if why:
            raise ValueError(f"prompt_cache='shared': {why}; use prompt_cache='expanded'")
        return "shared"
    if g == 1:
        return "expanded"  # one row per prompt: nothing to share (the cache is used as it is)
    if why:
        logger.info("prompt cache expanded %d times (prompt_cache='auto'): %s", g, why)
        return "expanded"
    return "shared"


class VLLMEngine:
    """Rollouts with vLLM, colocated with training on the same GPUs (docs/distributed.md).

    ``VLLMEngine(model_path, sleep_level=..., **llm_kwargs)`` starts ``vllm.LLM`` (vLLM's public offline API,
    the version of the ``vllm`` extra); :meth:`colocated_kwargs` gives the engine arguments of a trainer
    process (one engine per process through vLLM's ``external_launcher`` executor, tensor parallel over
    ``tensor_parallel_size`` processes). The trainer drives it with two calls:

    * :meth:`push_weights` after each update: ``(name, tensor)`` pairs of the plain ``transformers`` model (LoRA
      merged, shards gathered; :func:`fastgrpo.distributed.named_weights_for_inference`) are loaded into the
      engine's model (``LLM.apply_model(model.load_weights)``), then the prefix cache and the multimodal encoder
      cache are reset (``reset_prefix_cache``, ``reset_mm_cache``): their entries were computed by the old
      weights.
    * :meth:`generate`: the same :class:`RolloutBatch` as the ``transformers`` path; behaviour log-probs are
      vLLM's ``processed_logprobs`` of the sampled tokens (after temperature, before top-k / top-p, as the loss
      recomputes them).

    ``sleep_level`` 1 or 2 (vLLM's sleep mode): between generations the engine sleeps (level 1 keeps its weights
    in CPU memory, level 2 drops them) so training has the GPU memory; a push wakes the weights alone first
    (``wake_up(tags=["weights"])``), a generation wakes the rest. ``tp_group``: the process group of the ranks
    sharing one tensor-parallel engine (their prompts are gathered, each keeps its own completions).

    ``llm`` / ``sampling_params_cls``: an already built engine and vLLM's ``SamplingParams`` class (tests pass
    recorders); vLLM is imported here and nowhere else, only when an engine is built.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        sleep_level: int = 0,
        tp_group: Any = None,
        llm: Any = None,
        sampling_params_cls: Any = None,
        **llm_kwargs: Any,
    ) -> None:
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0 (off), 1 or 2, got {sleep_level}")
        if llm is None:
            if not HAS_VLLM:
                raise BackendUnavailable(
                    "the vLLM rollout engine needs vllm: pip install vllm (or the fastgrpo[vllm] extra; GPU machines)"
                )
            import vllm  # the only vLLM import in fastgrpo

            llm = vllm.LLM(model=model_path, enable_sleep_mode=sleep_level > 0, **llm_kwargs)
            sampling_params_cls = vllm.SamplingParams
        self.llm = llm
        self._sampling_params = sampling_params_cls
        self.sleep_level = sleep_level
        self.tp_group = tp_group
        self.asleep = False
        self.weights_dropped = False  # level-2 sleep frees the weights: a push must come before generating
        self.pushes = 0
        if sleep_level:
            self._sleep()

    @staticmethod
    def colocated_kwargs(
        cfg: Any, *, rank: int, world_size: int, max_model_len: int, seed: int = 0
    ) -> dict[str, Any]:
        """``vllm.LLM`` arguments of trainer process ``rank`` of ``world_size`` from a
        :class:`fastgrpo.config.VllmConfig`: one engine per process (``external_launcher``: vLLM joins the
        launcher's process group instead of starting workers), the same sampling seed within a tensor-parallel
        group (its engines must draw the same tokens), ``processed_logprobs`` behaviour log-probs."""
        tp = cfg.tensor_parallel_size
        if world_size % tp:
            raise ValueError(
                f"rollout.vllm.tensor_parallel_size={tp} must divide the number of processes ({world_size})"
            )
        kw: dict[str, Any] = dict(
            tensor_parallel_size=tp,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len or max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            dtype=cfg.dtype,
            seed=seed + rank // tp,
            logprobs_mode="processed_logprobs",
        )
        if world_size > 1 or tp > 1:
            kw["distributed_executor_backend"] = "external_launcher"
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(cfg, key) is not None:
                kw[key] = getattr(cfg, key)
        return kw

    def _sleep(self) -> None:
        self.llm.sleep(level=self.sleep_level)
        self.asleep = True
        self.weights_dropped = self.sleep_level == 2

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> int:
        """Load ``(name, tensor)`` pairs (names of the plain ``transformers`` model) into the engine, then reset
        its prefix and multimodal caches; returns the number of tensors. The pairs are consumed one at a time
        (a sharded policy gathers each tensor only when vLLM reads it)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # weights only: the KV cache stays freed during the copy
        count = [0]

        def counted() -> Iterator[tuple[str, Tensor]]:
            for name, tensor in named_tensors:
                count[0] += 1
                yield name, tensor

        weights = counted()
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.weights_dropped = False
        # cached prefixes and encoder outputs were computed by the previous weights
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.pushes += 1
        return count[0]

    def generate(self, tokenizer: Any, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        if self.asleep:
            if self.weights_dropped:
                raise RuntimeError(
                    "the vLLM engine slept at level 2 (weights freed): push_weights() before generating"
                )
            self.llm.wake_up()  # every remaining tag (KV cache, scheduling; the weights if still asleep)
            self.asleep = False
        pad, _ = _pad_and_eos(tokenizer, None)
        ids = tokenize_prompts(
            tokenizer,
            prompts,
            max_prompt_length=params.max_prompt_length,
            prompt_truncation=params.prompt_truncation,
        )
        mine, seed = slice(0, len(ids)), params.seed
        if self.tp_group is not None:  # the engines of a tensor-parallel group serve the same requests
            import torch.distributed as tdist

            parts: list[Any] = [None] * tdist.get_world_size(self.tp_group)
            tdist.all_gather_object(parts, (ids, seed), group=self.tp_group)
            k = tdist.get_rank(self.tp_group)
            start = sum(len(p[0]) for p in parts[:k])
            mine = slice(start, start + len(ids))
            ids = [x for p in parts for x in p[0]]
            seed = parts[0][1]  # the group's engines must sample every request alike
        sp = self._sampling_params(
            n=params.num_generations,
            temperature=params.temperature if params.do_sample else 0.0,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            min_p=params.min_p or 0.0,
            repetition_penalty=params.repetition_penalty,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0 if params.return_logprobs else None,
            seed=seed,
        )
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], sp, use_tqdm=False)[mine]
        ids = ids[mine]
        if self.sleep_level:
            self._sleep()
        return _vllm_batch(outs, ids, params, pad)


def _vllm_batch(outs: Sequence[Any], ids: list[list[int]], params: SamplingParams, pad: int) -> RolloutBatch:
    """vLLM's ``RequestOutput`` list (one per prompt, ``n`` completions each) as a :class:`RolloutBatch`."""
    g = params.num_generations
    longest = max(len(x) for x in ids)
    rows = [(i, o) for i, out in enumerate(outs) for o in out.outputs]
    t_c = max(1, max(len(o.token_ids) for _, o in rows))
    r = len(rows)
    prompt_ids = torch.full((r, longest), pad, dtype=torch.long)
    prompt_mask = torch.zeros((r, longest), dtype=torch.bool)
    completion_ids = torch.full((r, t_c), pad, dtype=torch.long)
    mask = torch.zeros((r, t_c), dtype=torch.bool)
    logprobs = torch.zeros((r, t_c), dtype=torch.float32) if params.return_logprobs else None
    truncated = torch.zeros(r, dtype=torch.bool)
    for k, (i, o) in enumerate(rows):
        p = ids[i]
        prompt_ids[k, longest - len(p) :] = torch.tensor(p)
        prompt_mask[k, longest - len(p) :] = True
        toks = list(o.token_ids)
        completion_ids[k, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[k, : len(toks)] = True
        truncated[k] = o.finish_reason == "length"
        if logprobs is not None and o.logprobs:
            logprobs[k, : len(toks)] = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, toks)])
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=mask,
        logprobs=logprobs,
        truncated=truncated,
        group_ids=torch.arange(len(ids)).repeat_interleave(g),
        num_generations=g,
        texts=[o.text for _, o in rows],
        pad_token_id=pad,
    )

"""Rollout: ``G`` sampled completions per prompt with ``transformers`` ``generate`` (vLLM when installed).

:func:`generate_rollouts` left-pads the prompts (decoder-only generation appends on the right), samples with the
KV cache and ``num_return_sequences = G``, and returns a :class:`RolloutBatch`:

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
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._backends import BackendUnavailable
from .models import eval_mode
from .packing import PackedBatch, pack, pack_shared_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "SamplingParams",
    "RolloutBatch",
    "generate_rollouts",
    "tokenize_prompts",
    "completion_end_mask",
    "HAS_VLLM",
    "VLLMEngine",
]

HAS_VLLM: bool = importlib.util.find_spec("vllm") is not None

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class SamplingParams:
    """Generation settings. ``num_generations`` is ``G`` (``num_return_sequences``)."""

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
    **overrides: Any,
) -> RolloutBatch:
    """Sample ``G = params.num_generations`` completions for each prompt (module docstring).

    ``model``: an ``AutoModelForCausalLM`` (or PEFT model), or a :class:`VLLMEngine`. ``overrides`` replace
    fields of ``params`` (e.g. ``max_new_tokens=16``). The model runs in eval mode and is restored after.
    """
    params = SamplingParams(**{**(params.__dict__ if params else {}), **overrides})
    params.validate()
    if isinstance(model, VLLMEngine):
        return model.generate(tokenizer, prompts, params)
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"{type(model).__name__} cannot generate: pass an AutoModelForCausalLM")
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
    device = next(model.parameters()).device
    b, g = len(ids), params.num_generations
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
        sequences = model.generate(**gen_kwargs)
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


class VLLMEngine:
    """Rollouts with vLLM (optional; only built when vLLM is installed, imported here and nowhere else).

    ``VLLMEngine(model_path, **llm_kwargs)`` starts ``vllm.LLM``; :meth:`generate` returns the same
    :class:`RolloutBatch` as the transformers path (behaviour log-probs from vLLM's sampled-token log-probs,
    which follow vLLM's own processing); :meth:`load_weights` pushes the policy's current weights.
    Not exercised by the CPU test suite (vLLM needs a GPU).
    """

    def __init__(self, model_path: str, **llm_kwargs: Any) -> None:
        if not HAS_VLLM:
            raise BackendUnavailable("the vLLM rollout engine needs vllm: pip install vllm (GPU machines)")
        import vllm  # the only vLLM import in fastgrpo

        self._vllm = vllm
        self.llm = vllm.LLM(model=model_path, **llm_kwargs)

    def load_weights(self, named_tensors: Any) -> None:
        """Copy ``(name, tensor)`` pairs (``policy.named_parameters()`` after merging adapters) into the engine."""
        engine = self.llm.llm_engine
        runner = engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(list(named_tensors))

    def generate(self, tokenizer: Any, prompts: Sequence[Prompt], params: SamplingParams) -> RolloutBatch:
        pad, eos = _pad_and_eos(tokenizer, None)
        ids = tokenize_prompts(
            tokenizer,
            prompts,
            max_prompt_length=params.max_prompt_length,
            prompt_truncation=params.prompt_truncation,
        )
        sp = self._vllm.SamplingParams(
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
            seed=params.seed,
        )
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], sp)
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

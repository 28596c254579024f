"""Varlen packing of (prompt, completion) pairs, token-budget micro-batches, and the packed forward pass.

Layout (one micro-batch = one packed row)
-----------------------------------------
``B`` sequences ``s_b = prompt_b ++ completion_b`` (``P_b + L_b`` tokens) are concatenated into one row::

    input_ids     [1, N]   N = sum_b (P_b + L_b)
    position_ids  [1, N]   0 .. P_b + L_b - 1 for each sequence (restarting at 0)
    cu_seqlens    [B+1]    int32, row offsets of the sequences (the flash-attn varlen convention)

and the loss side is described over the ``M = sum_b L_b`` completion tokens only::

    targets                [M]    completion tokens, sequence after sequence
    logit_index            [M]    row position whose hidden state predicts ``targets[m]``
                                  (``cu_seqlens[b] + P_b - 1 + j`` for token ``j`` of completion ``b``)
    completion_cu_seqlens  [B+1]  int32, offsets of each completion in the ``[M]`` layout

so ``hidden[logit_index] [M, D]`` with ``completion_cu_seqlens`` is the packed layout every fastgrpo loss takes
(``linear_logprobs(hidden[logit_index], lm_head.weight, targets)``), with no ignore index and no wasted rows.
:meth:`PackedBatch.shifted_targets` gives the classic ``[N]`` view (next token or ``IGNORE_INDEX``) and
:meth:`PackedBatch.unpack` turns any ``[M, ...]`` result back into the padded ``[B, T_c, ...]`` layout of
a rollout (completions right-aligned at column 0, zeros after the end).

Shared-prompt packing (:func:`pack_shared_prompt`, a "prefix grouper")
----------------------------------------------------------------------
The ``G`` completions of a prompt are laid out behind a single copy of it: ``[prompt, c_1, ..., c_G]``; the
positions of each completion continue from ``P`` (the positions it would have had behind its own copy) and
each completion attends to the prompt and to itself only::

    attend(q, kv) = same_group(q, kv) and kv <= q and (branch[kv] == -1 or branch[kv] == branch[q])

(``branch`` is -1 on prompt tokens, the completion's index within the group otherwise). Every completion
token then sees exactly the keys / values it would see unshared, so log-probs are equal up to summation order.
The last prompt position predicts the first token of every completion (``logit_index`` repeats it ``G``
times). The gradient reaching a shared prompt token is the sum over the group's completions, exactly as the
``G`` copies of unshared packing would receive in total: autograd sums over the ``G`` reads of its keys and
values and over the repeated ``logit_index`` gather. Saved per step: ``sum_g (G_g - 1) * P_g`` tokens
(:attr:`PackedBatch.tokens_saved`); cost: a mask that position ids cannot express, passed explicitly (a dense
boolean / additive ``[1, 1, N, N]`` mask for ``sdpa`` / ``eager``, a flex-attention ``BlockMask`` for
``flex_attention`` on GPU, where the mask costs O(N²/128²) blocks instead of O(N²) bytes). flash-attn varlen
cannot express it; such a model is refused with an explanation. flex_attention on CPU is refused too (torch
has no CPU backward for it and its compiled CPU kernel gave wrong outputs in our checks): use ``sdpa`` there.

Forward pass (:func:`packed_forward`): last hidden states, never logits
-----------------------------------------------------------------------
The cheapest correct way to get the last hidden states of a Hugging Face ``*ForCausalLM`` is to call its
decoder body (``model.get_decoder()``, i.e. ``model.model`` for Llama / Qwen / Mistral / SmolLM): its
``last_hidden_state`` is exactly what ``lm_head`` receives, ``lm_head`` is never run (no ``[N, V]`` logits,
not even for one token) and no per-layer hidden-state tuple is kept. ``output_hidden_states=True`` on the
full model would still build the logits and retain every layer's output. Models that post-process the logits
are handled by :func:`lm_head_of`: a multiplicative logit scale (Cohere ``logit_scale``, Granite
``logits_scaling``) is folded into the temperature; a non-linear soft-cap (Gemma 2/3) is refused.

Attention, by the model's ``attn_implementation`` (:func:`default_attn_implementation` picks the first):

* ``flash_attention_2`` (CUDA, flash-attn installed): ``cu_seq_lens_q/k`` and ``max_length_q/k`` are passed,
  transformers runs the varlen kernel; no mask at all.
* ``fastgrpo_varlen`` (:data:`VARLEN_ATTENTION`, registered with transformers by fastgrpo; the default
  elsewhere): the exact fallback. In a packed forward it runs causal sdpa on each sequence of the row
  (``sum_b L_b^2`` attention FLOPs, no ``[N, N]`` mask is ever built); everywhere else (padded batches,
  generation) it *is* transformers' ``sdpa``. Forward + backward of a 1816-token row of 32 sequences on the
  tiny model (CPU, one measurement on a busy 2-core machine): 2.7x faster than the block-diagonal mask below.
* ``sdpa`` / ``eager`` / ``flex_attention``: ``position_ids`` restarting per sequence and **no attention mask**,
  from which transformers builds the block-diagonal causal mask (``N^2`` attention work and mask memory).

Packing through ``position_ids`` works only when no KV cache is created: with ``use_cache=True`` (the default
of most configs, even in train mode) transformers skips the packed-sequence detection and sequences silently
attend across boundaries. :func:`packed_forward` therefore always passes ``use_cache=False`` and refuses
``use_cache=True``, a cache or an attention mask.

Micro-batches (:func:`plan_micro_batches`): see its docstring for the balancing rule.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import _backends
from . import vlm as _vlm
from .ops.linear_logprobs import linear_logprobs
from .vlm import VisionInputs

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "PackedBatch",
    "PackedVision",
    "mrope_position_ids",
    "LMHead",
    "pack",
    "pack_shared_prompt",
    "pack_padded",
    "plan_micro_batches",
    "pack_micro_batches",
    "MicroBatch",
    "packed_forward",
    "packed_logprobs",
    "lm_head_of",
    "logit_scale",
    "decoder_of",
    "attn_implementation_of",
    "default_attn_implementation",
    "VARLEN_ATTENTION",
    "register_varlen_attention",
    "use_varlen_attention",
    "shared_prompt_attention_mask",
]

IGNORE_INDEX = -100

TokenIds = Sequence[int] | Tensor


@dataclass
class PackedVision:
    """The vision side of one packed row (vision-language models; module docstring: multimodal rows).

    Attributes (``N`` row tokens, ``C`` prompt copies in the row: ``B`` for :func:`pack`, ``S`` groups for
    :func:`pack_shared_prompt`):
        mm_token_type_ids: ``[N]`` int64, 0 text, 1 image placeholder, 2 video placeholder.
        images, videos: the row's unique media items (deduplicated by content hash): the vision encoder runs
            once per entry.
        image_index, video_index: ``[K]`` int64, the unique item filling each placeholder run of the row, in
            row order (``K`` = media occurrences in the row).
        prompts: ``C`` entries, the :class:`fastgrpo.vlm.VisionInputs` of each prompt copy in row order (None
            for a text-only prompt); M-RoPE positions are computed from them.
    """

    mm_token_type_ids: Tensor
    images: list[_vlm.MediaItem]
    videos: list[_vlm.MediaItem]
    image_index: Tensor
    video_index: Tensor
    prompts: list[VisionInputs | None]

    @property
    def num_media(self) -> int:
        """Unique images + videos (vision-encoder inputs) of the row."""
        return len(self.images) + len(self.videos)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedVision:
        return replace(
            self,
            mm_token_type_ids=self.mm_token_type_ids.to(device, non_blocking=non_blocking),
            images=[it.to(device, non_blocking) for it in self.images],
            videos=[it.to(device, non_blocking) for it in self.videos],
            image_index=self.image_index.to(device, non_blocking=non_blocking),
            video_index=self.video_index.to(device, non_blocking=non_blocking),
        )


def _check_vision(vision: Sequence[VisionInputs | None] | None, prompts: Sequence[Tensor]) -> None:
    if vision is None:
        return
    if len(vision) != len(prompts):
        raise ValueError(f"got {len(vision)} vision entries for {len(prompts)} prompts; they pair one to one")
    for i, (v, p) in enumerate(zip(vision, prompts)):
        if v is None:
            continue
        if not isinstance(v, VisionInputs):
            raise ValueError(
                f"vision[{i}] must be a fastgrpo.vlm.VisionInputs or None, got {type(v).__name__}"
            )
        if v.num_prompt_tokens != p.numel():
            raise ValueError(
                f"vision[{i}] describes {v.num_prompt_tokens} prompt tokens but prompts[{i}] has {p.numel()}; "
                "pass the ids encode_prompts returned with their vision inputs"
            )


def _pack_vision(
    vision: Sequence[VisionInputs | None] | None, starts: Sequence[int], n_tokens: int
) -> PackedVision | None:
    """The :class:`PackedVision` of a row whose prompt copy ``c`` starts at row offset ``starts[c]``."""
    if vision is None or all(v is None for v in vision):
        return None
    types = torch.zeros(n_tokens, dtype=torch.long)
    unique: dict[str, dict[str, int]] = {"image": {}, "video": {}}
    items: dict[str, list[_vlm.MediaItem]] = {"image": [], "video": []}
    index: dict[str, list[int]] = {"image": [], "video": []}
    for v, s in zip(vision, starts):
        if v is None:
            continue
        types[s : s + v.num_prompt_tokens] = v.mm_token_type_ids
        for modality in ("image", "video"):
            for it in v.items(modality):
                if it.key not in unique[modality]:
                    unique[modality][it.key] = len(items[modality])
                    items[modality].append(it)
                index[modality].append(unique[modality][it.key])
    return PackedVision(
        mm_token_type_ids=types,
        images=items["image"],
        videos=items["video"],
        image_index=torch.as_tensor(index["image"], dtype=torch.long),
        video_index=torch.as_tensor(index["video"], dtype=torch.long),
        prompts=list(vision),
    )


@dataclass
class PackedBatch:
    """One packed row and its loss-side description (module docstring: layout).

    Attributes (``B`` sequences, ``N`` row tokens, ``M`` completion tokens, ``S`` attention segments):
        input_ids: ``[1, N]`` int64.
        position_ids: ``[1, N]`` int64.
        cu_seqlens: ``[S+1]`` int32 row offsets of the independent attention segments: one per sequence
            (``S = B``) for :func:`pack`, one per group for :func:`pack_shared_prompt`.
        max_seqlen: longest segment, in tokens.
        completion_mask: ``[1, N]`` bool, True on completion tokens of the row.
        targets: ``[M]`` int64 completion tokens.
        logit_index: ``[M]`` int64 row positions whose hidden state predicts ``targets``.
        completion_cu_seqlens: ``[B+1]`` int32 offsets of each completion in the ``[M]`` layout.
        prompt_lens, completion_lens: ``[B]`` int64.
        branch_ids: ``[N]`` int64 for shared-prompt rows (-1 on prompt tokens, the completion's index within
            its group otherwise); None for plain packing.
        group_sizes: ``[S]`` int64 completions per group (shared-prompt rows), None for plain packing.
        tokens_saved: prompt tokens not repeated thanks to prompt sharing (0 for plain packing).
        vision: the row's images / videos (:class:`PackedVision`), None for a text-only row.
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    completion_mask: Tensor
    targets: Tensor
    logit_index: Tensor
    completion_cu_seqlens: Tensor
    prompt_lens: Tensor
    completion_lens: Tensor
    branch_ids: Tensor | None = None
    group_sizes: Tensor | None = None
    tokens_saved: int = 0
    vision: PackedVision | None = None

    @property
    def num_sequences(self) -> int:
        """``B``."""
        return int(self.completion_lens.numel())

    @property
    def num_tokens(self) -> int:
        """``N``, tokens in the packed row."""
        return int(self.input_ids.shape[1])

    @property
    def num_targets(self) -> int:
        """``M``, completion tokens (loss positions)."""
        return int(self.targets.numel())

    @property
    def is_shared_prompt(self) -> bool:
        return self.branch_ids is not None

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (
                getattr(self, f.name).to(device, non_blocking=non_blocking)
                if isinstance(getattr(self, f.name), (Tensor, PackedVision))
                else getattr(self, f.name)
            )
            for f in fields(self)
        }
        return replace(self, **moved)

    def segment_ids(self) -> Tensor:
        """``[N]`` int64: index of the attention segment (sequence, or group when shared) of each row token."""
        lens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(lens.numel(), device=self.device), lens)

    def sequence_of_target(self) -> Tensor:
        """``[M]`` int64: the sequence (0..B-1) each target belongs to."""
        return torch.repeat_interleave(
            torch.arange(self.num_sequences, device=self.device), self.completion_lens
        )

    def shifted_targets(self) -> Tensor:
        """``[N]`` int64 classic shifted labels: ``targets`` scattered at ``logit_index``, ``IGNORE_INDEX`` elsewhere.

        Only for plain packing: in a shared-prompt row the last prompt position predicts ``G`` different tokens.
        """
        if self.is_shared_prompt:
            raise ValueError(
                "shifted_targets() is ambiguous for a shared-prompt row (the last prompt position predicts the "
                "first token of every completion); use logit_index and targets"
            )
        out = torch.full((self.num_tokens,), IGNORE_INDEX, dtype=torch.long, device=self.device)
        out[self.logit_index] = self.targets
        return out

    def unpack(self, values: Tensor, padding_value: float = 0.0) -> tuple[Tensor, Tensor]:
        """Scatter per-target ``values [M, ...]`` into the padded layout ``[B, T_c, ...]`` and its mask ``[B, T_c]``.

        ``T_c = max_b L_b``; completion ``b`` occupies columns ``0 .. L_b - 1`` (the rollout layout).
        """
        if values.shape[0] != self.num_targets:
            raise ValueError(
                f"values {tuple(values.shape)} must have M={self.num_targets} rows (one per completion token)"
            )
        b = self.num_sequences
        t_c = int(self.completion_lens.max()) if b else 0
        row = self.sequence_of_target()
        starts = self.completion_cu_seqlens[:-1].long()
        col = torch.arange(self.num_targets, device=self.device) - starts[row]
        out = values.new_full((b, t_c, *values.shape[1:]), padding_value)
        out[row, col] = values
        mask = torch.zeros(b, t_c, dtype=torch.bool, device=self.device)
        mask[row, col] = True
        return out, mask

    def sequences(self) -> tuple[list[list[int]], list[list[int]]]:
        """Round trip: the ``(prompts, completions)`` token lists this row was packed from."""
        ids = self.input_ids[0].tolist()
        p_lens, c_lens = self.prompt_lens.tolist(), self.completion_lens.tolist()
        prompts: list[list[int]] = []
        completions: list[list[int]] = []
        starts = self.cu_seqlens.tolist()
        if not self.is_shared_prompt:
            for b, (p, c) in enumerate(zip(p_lens, c_lens)):
                s = starts[b]
                prompts.append(ids[s : s + p])
                completions.append(ids[s + p : s + p + c])
            return prompts, completions
        b = 0
        for g, size in enumerate(self.group_sizes.tolist()):
            s, p = starts[g], p_lens[b]
            prompt = ids[s : s + p]
            pos = s + p
            for _ in range(size):
                prompts.append(list(prompt))
                completions.append(ids[pos : pos + c_lens[b]])
                pos += c_lens[b]
                b += 1
        return prompts, completions


# ----------------------------------------------------------------------------------------------------------
# building rows


def _as_ids(x: TokenIds, what: str, i: int) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(list(x), dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"{what}[{i}] must be a 1-D sequence of token ids, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{what}[{i}] must hold integer token ids, got {t.dtype}")
    t = t.detach().to("cpu", torch.long)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(
            f"{what}[{i}] holds a negative token id ({int(t.min())}); strip padding / -100 first"
        )
    return t


def _check_pair(p: Tensor, c: Tensor, i: int) -> None:
    if p.numel() == 0:
        raise ValueError(
            f"prompts[{i}] is empty: the first completion token needs at least one prompt token to be predicted "
            "from (prepend a BOS / chat-template token)"
        )
    if c.numel() == 0:
        raise ValueError(
            f"completions[{i}] is empty: it has no token to score. Drop it before packing, or keep the EOS "
            "token the rollout generated (rollout completions always hold at least one token)"
        )


def _cu(lens: Sequence[int]) -> Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        out[1:] = torch.cumsum(torch.as_tensor(list(lens), dtype=torch.int64), 0).to(torch.int32)
    return out


def pack(
    prompts: Sequence[TokenIds],
    completions: Sequence[TokenIds],
    *,
    vision: Sequence[VisionInputs | None] | None = None,
    device: torch.device | str | None = None,
) -> PackedBatch:
    """Pack ``B`` (prompt, completion) pairs of 1-D token ids into one row (module docstring: layout).

    ``vision[b]``: the images / videos of ``prompts[b]`` (:func:`fastgrpo.vlm.encode_prompts`), None for a
    text-only prompt; the row then carries a :class:`PackedVision` (equal media are encoded once per row).
    Raises ``ValueError`` for mismatched counts, an empty prompt or completion, non-integer or negative ids,
    vision inputs that do not match their prompt.
    """
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(completions)} completions; they pair one to one"
        )
    if len(prompts) == 0:
        raise ValueError("nothing to pack: prompts and completions are empty")
    ps = [_as_ids(p, "prompts", i) for i, p in enumerate(prompts)]
    cs = [_as_ids(c, "completions", i) for i, c in enumerate(completions)]
    for i, (p, c) in enumerate(zip(ps, cs)):
        _check_pair(p, c, i)
    _check_vision(vision, ps)
    p_lens = [p.numel() for p in ps]
    c_lens = [c.numel() for c in cs]
    seq_lens = [a + b for a, b in zip(p_lens, c_lens)]
    cu = _cu(seq_lens)
    input_ids = torch.cat([t for pair in zip(ps, cs) for t in pair])
    position_ids = torch.cat([torch.arange(n) for n in seq_lens])
    completion_mask = torch.cat([torch.arange(n) >= p for n, p in zip(seq_lens, p_lens)])
    targets = torch.cat(cs)
    starts = cu[:-1].long()
    logit_index = torch.cat(
        [torch.arange(c) + (s + p - 1) for s, p, c in zip(starts.tolist(), p_lens, c_lens)]
    )
    batch = PackedBatch(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        cu_seqlens=cu,
        max_seqlen=max(seq_lens),
        completion_mask=completion_mask[None],
        targets=targets,
        logit_index=logit_index,
        completion_cu_seqlens=_cu(c_lens),
        prompt_lens=torch.as_tensor(p_lens, dtype=torch.long),
        completion_lens=torch.as_tensor(c_lens, dtype=torch.long),
        vision=_pack_vision(vision, cu[:-1].tolist(), int(cu[-1])),
    )
    return batch if device is None else batch.to(device)


def pack_shared_prompt(
    prompts: Sequence[TokenIds],
    completions: Sequence[Sequence[TokenIds]],
    *,
    vision: Sequence[VisionInputs | None] | None = None,
    device: torch.device | str | None = None,
) -> PackedBatch:
    """Pack groups ``[prompt_g, c_g1, ..., c_gG]`` with one copy of each prompt (module docstring).

    Args:
        prompts: one prompt per group.
        completions: ``completions[g]`` is the list of the ``G_g >= 1`` completions of ``prompts[g]``.
        vision: ``vision[g]`` the images / videos of ``prompts[g]`` (None: text-only), stored once per group
            with the prompt: the vision encoder runs once per unique media item of the row.
    Sequence order in the ``[M]`` layout is group-major (the order of ``num_return_sequences`` rollouts).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completion groups")
    if len(prompts) == 0:
        raise ValueError("nothing to pack: prompts and completions are empty")
    ids, pos, branch, cmask, targets, logit_index = [], [], [], [], [], []
    p_lens, c_lens, group_lens, group_sizes, prompt_ids = [], [], [], [], []
    offset, saved, b = 0, 0, 0
    for g, (prompt, group) in enumerate(zip(prompts, completions)):
        p = _as_ids(prompt, "prompts", g)
        if len(group) == 0:
            raise ValueError(
                f"completions[{g}] is an empty group; every prompt needs at least one completion"
            )
        cs = [_as_ids(c, f"completions[{g}]", j) for j, c in enumerate(group)]
        for c in cs:
            _check_pair(p, c, b)
            b += 1
        n_p = p.numel()
        prompt_ids.append(p)
        ids.append(p)
        pos.append(torch.arange(n_p))
        branch.append(torch.full((n_p,), -1, dtype=torch.long))
        cmask.append(torch.zeros(n_p, dtype=torch.bool))
        cursor = offset + n_p
        for j, c in enumerate(cs):
            n_c = c.numel()
            ids.append(c)
            pos.append(torch.arange(n_p, n_p + n_c))
            branch.append(torch.full((n_c,), j, dtype=torch.long))
            cmask.append(torch.ones(n_c, dtype=torch.bool))
            targets.append(c)
            # first token predicted by the last prompt position, the rest by their predecessor in the branch
            logit_index.append(
                torch.cat([torch.tensor([offset + n_p - 1]), torch.arange(cursor, cursor + n_c - 1)])
            )
            cursor += n_c
            p_lens.append(n_p)
            c_lens.append(n_c)
        group_lens.append(cursor - offset)
        group_sizes.append(len(cs))
        saved += (len(cs) - 1) * n_p
        offset = cursor
    _check_vision(vision, prompt_ids)
    cu = _cu(group_lens)
    batch = PackedBatch(
        input_ids=torch.cat(ids)[None],
        position_ids=torch.cat(pos)[None],
        cu_seqlens=cu,
        max_seqlen=max(group_lens),
        completion_mask=torch.cat(cmask)[None],
        targets=torch.cat(targets),
        logit_index=torch.cat(logit_index),
        completion_cu_seqlens=_cu(c_lens),
        prompt_lens=torch.as_tensor(p_lens, dtype=torch.long),
        completion_lens=torch.as_tensor(c_lens, dtype=torch.long),
        branch_ids=torch.cat(branch),
        group_sizes=torch.as_tensor(group_sizes, dtype=torch.long),
        tokens_saved=saved,
        vision=_pack_vision(vision, cu[:-1].tolist(), int(cu[-1])),
    )
    return batch if device is None else batch.to(device)


def pack_padded(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    device: torch.device | str | None = None,
) -> PackedBatch:
    """Pack a padded rollout: ``prompt_ids / prompt_mask [B, T_p]`` (any padding side) and
    ``completion_ids / completion_mask [B, T_c]``; the tokens where the masks are true are kept, in order."""
    for name, t in (("prompt_mask", prompt_mask), ("completion_ids", completion_ids)):
        if t.dim() != 2 or t.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"{name} {tuple(t.shape)} must be [B, T] with B = prompt_ids.shape[0]")
    if prompt_mask.shape != prompt_ids.shape or completion_mask.shape != completion_ids.shape:
        raise ValueError(
            f"masks must match their ids: prompt_ids {tuple(prompt_ids.shape)} / prompt_mask "
            f"{tuple(prompt_mask.shape)}, completion_ids {tuple(completion_ids.shape)} / completion_mask "
            f"{tuple(completion_mask.shape)}"
        )
    p_ids, p_m = prompt_ids.cpu(), prompt_mask.cpu().bool()
    c_ids, c_m = completion_ids.cpu(), completion_mask.cpu().bool()
    prompts = [p_ids[i][p_m[i]] for i in range(p_ids.shape[0])]
    completions = [c_ids[i][c_m[i]] for i in range(c_ids.shape[0])]
    return pack(prompts, completions, device=device)


# ----------------------------------------------------------------------------------------------------------
# micro-batches


def plan_micro_batches(
    lengths: Sequence[int],
    token_budget: int,
    *,
    num_ranks: int = 1,
) -> list[list[list[int]]]:
    """Cut items (sequences, or whole groups for shared-prompt packing) into token-budget micro-batches.

    Args:
        lengths: tokens of each item (``P + L`` for a sequence; ``P + sum_c L_c`` for a shared-prompt group).
        token_budget: most tokens in one micro-batch (one packed row).
        num_ranks: data-parallel ranks to spread the items over.

    Returns:
        ``plan[rank][k]`` = the item indices of micro-batch ``k`` on ``rank``, in ascending order.

    Balancing rule (cost = tokens; attention's quadratic term is ignored, fine for RL-length sequences):

    1. Items are taken longest first (ties: lower index first).
    2. Ranks: each item goes to the rank holding the fewest tokens so far (ties: fewer items, then lower rank)
       — greedy longest-processing-time, so rank totals differ by at most the longest item.
    3. Every rank gets the **same number** ``K`` of micro-batches, because DDP / FSDP gradient accumulation
       needs the same number of forward/backward calls on every rank. ``K`` starts at
       ``max_rank ceil(tokens_rank / token_budget)``; within a rank each item goes to the micro-batch with the
       fewest tokens (same greedy), and if even that one cannot take it without exceeding the budget, ``K``
       grows by one and the assignment restarts.
    4. A rank with fewer items than ``K`` gets empty micro-batches (``[]``); the trainer runs a zero-weight step
       for them so collectives stay matched.

    Raises ``ValueError`` if any item is longer than ``token_budget`` (say which, and by how much): a prompt
    plus completion that cannot fit one row is an error, never a silent truncation.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    lens = [int(x) for x in lengths]
    for i, n in enumerate(lens):
        if n <= 0:
            raise ValueError(f"lengths[{i}] = {n}: every item needs at least one token")
        if n > token_budget:
            raise ValueError(
                f"item {i} has {n} tokens, more than token_budget={token_budget}: raise the budget, shorten the "
                "prompt (max_prompt_length) or the completion (max_new_tokens)"
            )
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))

    rank_items: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_tokens = [0] * num_ranks
    for i in order:
        r = min(range(num_ranks), key=lambda r: (rank_tokens[r], len(rank_items[r]), r))
        rank_items[r].append(i)  # stays longest-first
        rank_tokens[r] += lens[i]

    k = max(1, max(math.ceil(t / token_budget) for t in rank_tokens))
    while True:
        plan: list[list[list[int]]] = []
        fits = True
        for items in rank_items:
            bins: list[list[int]] = [[] for _ in range(k)]
            load = [0] * k
            for i in items:
                j = min(range(k), key=lambda j: (load[j], j))
                if load[j] + lens[i] > token_budget:
                    fits = False
                    break
                bins[j].append(i)
                load[j] += lens[i]
            if not fits:
                break
            plan.append([sorted(b) for b in bins])
        if fits:
            return plan
        k += 1


@dataclass
class MicroBatch:
    """One micro-batch of one rank: its packed row and, once the trainer's stages have filled them, what the loss
    needs for it. ``B_mb`` sequences, ``M`` completion tokens (``rows.num_targets``).

    Attributes:
        index: global indices (into the rollout batch) of its ``B_mb`` sequences, in packing order; empty for a
            padding micro-batch (rule 4 of :func:`plan_micro_batches`), whose ``rows`` is a one-token dummy row
            that runs with weight 0 so every rank makes the same number of forward/backward calls.
        rows: the packed row (:func:`pack` or :func:`pack_shared_prompt`).
        loss_mask: ``[M]`` bool, tokens that enter the loss (None: all).
        advantages: ``[B_mb]`` or ``[M]`` fp32, or the COPO pair ``(A_global, A_local)``.
        blend: ``[B_mb]`` COPO weight of the local loss, or None.
        old_logp, ref_logp: ``[M]`` fp32 behaviour / reference log-probs, or None.
    """

    index: list[int]
    rows: PackedBatch
    loss_mask: Tensor | None = None
    advantages: Tensor | tuple[Tensor, Tensor] | None = None
    blend: Tensor | None = None
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None

    @property
    def is_padding(self) -> bool:
        return not self.index

    @property
    def num_loss_tokens(self) -> int:
        if self.is_padding:
            return 0
        return self.rows.num_targets if self.loss_mask is None else int(self.loss_mask.sum())


def pack_micro_batches(
    prompts: Sequence[TokenIds],
    completions: Sequence[TokenIds],
    token_budget: int,
    *,
    shared_prompt: bool = False,
    group_size: int = 1,
    vision: Sequence[VisionInputs | None] | None = None,
    rank: int = 0,
    num_ranks: int = 1,
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> list[MicroBatch]:
    """This rank's token-budget micro-batches of a rollout batch (:func:`plan_micro_batches` + packing).

    ``prompts`` / ``completions`` (and ``vision``, the images / videos of each sequence's prompt, for a
    vision-language model): one per sequence, ``B`` in all. With ``shared_prompt`` the sequences are
    ``B / group_size`` groups of ``group_size`` consecutive sequences sharing one prompt (the rollout's
    prompt-major order); whole groups are planned and packed behind one copy of their prompt and its images
    (:func:`pack_shared_prompt`), so the prompt and the vision encoder run once, not ``G`` times. Otherwise each
    sequence is an item (:func:`pack`). A rank with fewer items than micro-batches gets padding micro-batches
    (see :class:`MicroBatch`), built from ``pad_id``.
    """
    if len(prompts) != len(completions) or (vision is not None and len(vision) != len(prompts)):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(completions)} completions and "
            f"{'no' if vision is None else len(vision)} vision entries; they pair one to one"
        )
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank={rank} must lie in [0, num_ranks={num_ranks})")
    g = group_size if shared_prompt else 1
    if g < 1 or len(prompts) % g:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the {len(prompts)} sequences")
    firsts = range(0, len(prompts), g)
    lengths = [len(prompts[i]) + sum(len(c) for c in completions[i : i + g]) for i in firsts]
    plan = plan_micro_batches(lengths, token_budget, num_ranks=num_ranks)[rank]
    out = []
    for items in plan:
        index = [i * g + j for i in items for j in range(g)]
        firsts = [i * g for i in items]
        if not items:
            rows = pack([[pad_id]], [[pad_id]], device=device)
        elif shared_prompt:
            rows = pack_shared_prompt([prompts[i] for i in firsts], [completions[i : i + g] for i in firsts],
                                      vision=None if vision is None else [vision[i] for i in firsts],
                                      device=device)  # fmt: skip
        else:
            rows = pack([prompts[i] for i in index], [completions[i] for i in index],
                        vision=None if vision is None else [vision[i] for i in index], device=device)  # fmt: skip
        out.append(MicroBatch(index, rows))
    return out


# ----------------------------------------------------------------------------------------------------------
# the model side


@dataclass
class LMHead:
    """What turns a last hidden state into logits: ``logits = scale * (hidden @ weight.T + bias)``.

    ``weight [V, D]``, ``bias [V]`` or None; ``scale`` folds into the temperature
    (``temperature_eff = temperature / scale``).
    """

    weight: Tensor
    bias: Tensor | None
    scale: float = 1.0

    def logit_temperature(self, temperature: float) -> float:
        """The temperature to pass with ``weight`` / ``bias`` so that the logits are ``scale * (h W^T + b) / t``
        (the scale folded in: ``t / scale``)."""
        return temperature / self.scale


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers are injected in place, so it runs them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def lm_head_of(model: nn.Module) -> LMHead:
    """The output projection of a causal LM (``model.get_output_embeddings()``), with its logit scale.

    Raises ``ValueError`` for a model without an ``lm_head`` (an ``AutoModel`` body) or whose logits are not a
    linear function of the last hidden state (final logit soft-capping).
    """
    inner = _unwrap(model)
    get_out = getattr(inner, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(
            f"{type(inner).__name__} has no lm_head (get_output_embeddings() is None): load the model with "
            "AutoModelForCausalLM, not AutoModel, so its output projection is available"
        )
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "final_logit_softcapping", None):
        raise ValueError(
            f"{type(inner).__name__} soft-caps its logits (final_logit_softcapping="
            f"{text_config.final_logit_softcapping}): logits are not linear in the hidden states, so the fused "
            "hidden-state losses cannot reproduce them"
        )
    bias = getattr(head, "bias", None)
    return LMHead(
        weight=head.weight, bias=bias if isinstance(bias, Tensor) else None, scale=logit_scale(config)
    )


def logit_scale(config: Any) -> float:
    """The factor a model multiplies its logits by after the LM head (the config fields transformers' models and
    TRL's fused LM head read): Cohere ``logit_scale``, Granite-MoE-style ``output_multiplier`` /
    ``lm_head_multiplier`` (multiply), Granite ``logits_scaling`` (divide; HyperCLOVA X multiplies by it); 1
    otherwise. Folded into the temperature (:meth:`LMHead.logit_temperature`)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder body of a causal LM (``model.get_decoder()``): returns ``last_hidden_state``, runs no lm_head.

    A body passed directly (an ``AutoModel``) is returned as is.
    """
    inner = _unwrap(model)
    get_dec = getattr(inner, "get_decoder", None)
    dec = get_dec() if callable(get_dec) else inner
    if dec is inner and callable(getattr(inner, "get_output_embeddings", None)):
        if inner.get_output_embeddings() is not None:
            raise ValueError(
                f"cannot locate the decoder body of {type(inner).__name__} (get_decoder() returned the model "
                "itself); packed_forward needs a model whose body returns last_hidden_state"
            )
    return dec


def attn_implementation_of(model: nn.Module) -> str:
    """The attention implementation the model runs (``config._attn_implementation``)."""
    config = getattr(_unwrap(model), "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return impl or "eager"


def default_attn_implementation(device: torch.device | str | None = None) -> str:
    """What a loader should ask for: ``flash_attention_2`` on CUDA with flash-attn installed, else the exact
    varlen fallback :data:`VARLEN_ATTENTION` (sdpa per sequence; registered with transformers on first use)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and _backends.HAS_FLASH_ATTN:
        return "flash_attention_2"
    return register_varlen_attention()


# ----------------------------------------------------------------------------------------------------------
# the exact varlen fallback: sdpa per sequence

VARLEN_ATTENTION = "fastgrpo_varlen"
_SKIP_MASK: contextvars.ContextVar[bool] = contextvars.ContextVar("fastgrpo_skip_mask", default=False)


def _varlen_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of ``fastgrpo_varlen``: with ``cu_seq_lens_q`` (a packed row) causal sdpa on each sequence of
    ``query / key / value [1, H, N, d]``, so the cost is ``sum_b L_b^2`` instead of ``N^2`` with a block-diagonal
    mask; without it (padded batches, generation with a KV cache), exactly transformers' ``sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{VARLEN_ATTENTION} packed attention needs one row without cache: query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}"
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    bounds = cu.tolist()
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    # a packed row needs no mask (the attention reads cu_seq_lens); anything else gets sdpa's mask
    if _SKIP_MASK.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


@functools.cache
def register_varlen_attention() -> str:
    """Register :data:`VARLEN_ATTENTION` with transformers (once) and return its name, for
    ``from_pretrained(..., attn_implementation=name)`` or ``model.set_attn_implementation(name)``.

    It behaves as ``sdpa`` everywhere (padded batches, generation) except in :func:`packed_forward`, where
    it runs causal sdpa per sequence of the packed row: exact, no ``[N, N]`` mask, and attention FLOPs of the
    sequences alone. Sliding-window layers are not supported by it (refused in :func:`packed_forward`).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


def use_varlen_attention(model: nn.Module) -> nn.Module:
    """Switch a loaded model to :data:`VARLEN_ATTENTION` (in place; returns the model)."""
    _unwrap(model).set_attn_implementation(register_varlen_attention())
    return model


_UNSAFE_KWARGS = ("attention_mask", "past_key_values", "cache", "position_ids", "input_ids", "inputs_embeds")


def shared_prompt_attention_mask(
    batch: PackedBatch, attn_implementation: str, dtype: torch.dtype = torch.float32
) -> Any:
    """The shared-prompt mask for one row, in the form ``attn_implementation`` takes.

    ``sdpa``: bool ``[1, 1, N, N]`` (True = attend); ``eager``: additive ``[1, 1, N, N]`` in ``dtype``
    (0 / finfo.min); ``flex_attention``: a ``BlockMask``. Rule: module docstring.
    """
    if batch.branch_ids is None:
        raise ValueError("shared_prompt_attention_mask needs a row from pack_shared_prompt")
    seg = batch.segment_ids()
    br = batch.branch_ids
    n = batch.num_tokens
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        # flex evaluates whole blocks, so indices up to the next multiple of its block size (128) are looked
        # up: pad the tables with values no real token matches (segment -1, branch -2)
        pad = (n // 128 + 1) * 128 - n
        seg_p = torch.nn.functional.pad(seg, (0, pad), value=-1)
        br_p = torch.nn.functional.pad(br, (0, pad), value=-2)

        def mask_mod(b, h, q, kv):
            same = (seg_p[q] == seg_p[kv]) & (kv <= q)
            return same & ((br_p[kv] == -1) | (br_p[kv] == br_p[q]))

        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=batch.device)
    idx = torch.arange(n, device=batch.device)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    allowed &= (br[None, :] == -1) | (br[None, :] == br[:, None])
    allowed = allowed[None, None]
    if attn_implementation in ("sdpa", VARLEN_ATTENTION):
        return allowed
    if attn_implementation == "eager":
        out = torch.zeros(allowed.shape, dtype=dtype, device=batch.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)
    raise ValueError(
        f"shared-prompt packing needs attn_implementation 'sdpa', 'eager' or 'flex_attention', got "
        f"{attn_implementation!r}: flash-attn varlen cannot express 'see the prompt and yourself only'. Load the "
        "model with attn_implementation='flex_attention' (GPU) or 'sdpa', or use plain pack()"
    )


def packed_forward(model: nn.Module, batch: PackedBatch, **model_kwargs: Any) -> Tensor:
    """Run a causal LM on one packed row and return its last hidden states ``[N, D]`` (never the logits).

    ``model`` is any ``AutoModelForCausalLM`` (also wrapped by PEFT) or its decoder body. Gradients flow as in
    an ordinary forward; wrap in ``torch.no_grad()`` for reference passes. ``model_kwargs`` go to the decoder
    (e.g. ``output_attentions``); ``use_cache=True``, a cache, an ``attention_mask`` or ids/positions there are
    refused with ``ValueError`` (module docstring: with a cache, packed sequences attend across boundaries).
    """
    if model_kwargs.get("use_cache"):
        raise ValueError(
            "packed_forward refuses use_cache=True: transformers ignores packed position_ids when a KV cache is "
            "created, and packed sequences would silently attend across their boundaries"
        )
    bad = [k for k in _UNSAFE_KWARGS if k in model_kwargs]
    if bad:
        raise ValueError(
            f"packed_forward builds {bad} itself from the PackedBatch (an attention mask or cache would break "
            "the block-diagonal attention of the packed row); do not pass them"
        )
    model_kwargs.pop("use_cache", None)
    if batch.input_ids.dim() != 2 or batch.input_ids.shape[0] != 1:
        raise ValueError(f"batch.input_ids must be [1, N], got {tuple(batch.input_ids.shape)}")
    multimodal = batch.vision is not None or _vlm.uses_mrope(model)
    if batch.vision is not None and not _vlm.is_vlm(model):
        raise ValueError(
            f"this row has {batch.vision.num_media} image(s) / video(s) but {type(_unwrap(model)).__name__} is a "
            "text-only model: load an image-text-to-text model (a text-only forward would silently drop them)"
        )
    impl = attn_implementation_of(model)
    decoder = decoder_of(model)
    kwargs: dict[str, Any] = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if batch.is_shared_prompt:
        dtype = next(decoder.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        _check_sliding_window(model, batch)
        if impl == "flex_attention" and batch.device.type == "cpu":
            raise ValueError(
                "shared-prompt packing with flex_attention runs on GPU only: torch has no CPU backward for "
                "flex_attention, and its compiled CPU kernel gave wrong outputs in our checks (torch 2.13). Use "
                "attn_implementation='sdpa' on CPU"
            )
        kwargs["attention_mask"] = shared_prompt_attention_mask(batch, impl, dtype)
    elif impl.startswith("flash_attention"):
        _backends.load_flash_attn()  # raises with the install hint when missing
        if batch.device.type != "cuda":
            raise _backends.BackendUnavailable(
                f"attn_implementation={impl!r} needs CUDA tensors; this row is on {batch.device}"
            )
    if not batch.is_shared_prompt and (impl.startswith("flash_attention") or impl == VARLEN_ATTENTION):
        if impl == VARLEN_ATTENTION:
            _check_sliding_window(model, batch)
        cu = batch.cu_seqlens
        kwargs.update(
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen
        )
    if multimodal:
        _multimodal_inputs(model, decoder, batch, kwargs)
    kwargs.update(model_kwargs)
    token = _SKIP_MASK.set(impl == VARLEN_ATTENTION and not batch.is_shared_prompt)
    try:
        out = decoder(**kwargs)
    finally:
        _SKIP_MASK.reset(token)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[0]


def _multimodal_inputs(
    model: nn.Module, decoder: nn.Module, batch: PackedBatch, kwargs: dict[str, Any]
) -> None:
    """Vision-language rows: ``input_ids`` -> ``inputs_embeds`` with the vision features scattered in at the
    placeholder tokens (the encoder run once per unique media item of the row), and M-RoPE position ids."""
    embeds = decoder.get_input_embeddings()(batch.input_ids)
    v = batch.vision
    if v is not None:
        for modality, code, items, index in (
            ("image", _vlm.IMAGE, v.images, v.image_index),
            ("video", _vlm.VIDEO, v.videos, v.video_index),
        ):
            mask = v.mm_token_type_ids == code
            n_tokens = int(mask.sum())
            if not items:
                continue  # VisionInputs guarantees no placeholders without media
            feats = _vlm.encode_media(model, items, modality)
            row = torch.cat([feats[i] for i in index.tolist()])
            if row.shape[0] != n_tokens:
                raise ValueError(
                    f"the row has {n_tokens} {modality} placeholder tokens but its {len(index)} {modality}(s) give "
                    f"{row.shape[0]} features: the prompt ids were not expanded by this model's processor"
                )
            embeds = embeds.masked_scatter(mask.view(1, -1, 1).expand_as(embeds), row.to(embeds.dtype))
    del kwargs["input_ids"]
    kwargs["inputs_embeds"] = embeds
    if _vlm.uses_mrope(model):
        kwargs["position_ids"] = mrope_position_ids(model, batch)


def _prompt_spans(batch: PackedBatch) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Per prompt copy in row order: ``(row start, P, [(completion row start, L), ...])``."""
    cu, p_lens, c_lens = batch.cu_seqlens.tolist(), batch.prompt_lens.tolist(), batch.completion_lens.tolist()
    if not batch.is_shared_prompt:
        return [(cu[b], p, [(cu[b] + p, c)]) for b, (p, c) in enumerate(zip(p_lens, c_lens))]
    spans, b = [], 0
    for g, size in enumerate(batch.group_sizes.tolist()):
        p, cursor, comps = p_lens[b], cu[g] + p_lens[b], []
        for c in c_lens[b : b + size]:
            comps.append((cursor, c))
            cursor += c
        spans.append((cu[g], p, comps))
        b += size
    return spans


def mrope_position_ids(model: nn.Module, batch: PackedBatch) -> Tensor:
    """``[4, 1, N]`` int64 position ids of a packed row for a model with multimodal rotary positions.

    Row 0: ``batch.position_ids`` (text positions restarting per sequence, or continuing from ``P`` after a
    shared prompt: transformers reads packed boundaries from it). Rows 1-3: t / h / w positions of each sample,
    from the model's ``get_rope_index`` on the sample's prompt followed by its completion (text tokens), i.e.
    what the model computes for the unpacked sample; a completion behind a shared prompt gets the positions it
    has behind its own copy. Text-only prompts: the text positions (as transformers computes them).
    """
    text = batch.position_ids[0]
    out = text.expand(4, -1).clone()
    v = batch.vision
    if v is None:
        return out[:, None]
    spans = _prompt_spans(batch)
    longest: dict[int, int] = {}
    for vi, (_, _, comps) in zip(v.prompts, spans):
        if vi is not None:
            longest[id(vi)] = max(longest.get(id(vi), 0), max(c for _, c in comps))
    cache: dict[int, Tensor] = {}  # one get_rope_index per distinct prompt (copies of plain packing share it)
    for vi, (start, p, comps) in zip(v.prompts, spans):
        if vi is None:
            continue
        if id(vi) not in cache:
            cache[id(vi)] = _vlm.mrope_positions(model, vi, longest[id(vi)]).to(out.device)
        pos = cache[id(vi)]
        out[1:, start : start + p] = pos[:, :p]
        for c_start, c in comps:
            out[1:, c_start : c_start + c] = pos[:, p : p + c]
    return out[:, None]


def _check_sliding_window(model: nn.Module, batch: PackedBatch) -> None:
    # An explicit 4-D mask (shared prompts) replaces the sliding-window mask too, and the varlen fallback runs
    # plain causal attention: both are exact only while no segment exceeds the window.
    config = getattr(_unwrap(model), "config", None)
    if hasattr(config, "get_text_config"):  # a vision-language model's decoder settings
        config = config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types and window and batch.max_seqlen > window:
        raise ValueError(
            f"this packed path ignores the model's sliding window ({window}) and a segment of {batch.max_seqlen} "
            "tokens exceeds it: use attn_implementation='sdpa' (or flash-attn) and plain pack() for this model"
        )


def packed_logprobs(
    model: nn.Module,
    batch: PackedBatch,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    hidden: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-completion-token log-probs ``[M]`` fp32 (and entropies) of ``batch.targets`` under ``model``.

    ``packed_forward`` then ``linear_logprobs(hidden[logit_index], lm_head.weight, targets)``: the ``[M, V]``
    logits never exist at once. Pass ``hidden [N, D]`` to reuse a forward already done. Differentiable; call
    under ``torch.no_grad()`` for reference / behaviour log-probs. Use ``batch.unpack`` for ``[B, T_c]``.
    """
    head = lm_head_of(model)
    if hidden is None:
        hidden = packed_forward(model, batch)
    if hidden.dim() != 2 or hidden.shape[0] != batch.num_tokens:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N={batch.num_tokens}, D]")
    h = hidden.index_select(0, batch.logit_index)
    return linear_logprobs(
        h,
        head.weight,
        batch.targets,
        bias=head.bias,
        temperature=head.logit_temperature(temperature),
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        backend=backend,
    )

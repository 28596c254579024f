"""A KV cache whose prompt prefix is shared by the ``G`` rows of a group, and the attention that reads it.

Generation of ``G`` completions per prompt holds ``R = B·G`` rows. After one prefill per prompt
(:mod:`fastgrpo.rollout`), the prompt's keys and values are the same for the ``G`` rows of its group. Expanding
them (``Cache.batch_repeat_interleave(G)``) costs ``G`` copies and, at every decoded token, ``G`` reads of the
prompt cache plus a ``torch.cat`` of the whole grown cache (transformers' ``DynamicLayer.update``).
:class:`SharedPrefixCache` keeps, per decoder layer,

* the prefix ``K_p, V_p [B, H_kv, L_p, d]`` once per group, with its padding mask ``[B, L_p]`` (left padding);
* the suffix ``K_s, V_s [R, H_kv, S, d]`` per row: the tokens fed after the prefix (the last prompt token, then
  the sampled ones), grown like a ``DynamicLayer``.

Its layers return the suffix from ``update``; the attention registered as :data:`SHARED_PREFIX_ATTENTION`
(:func:`shared_prefix_attention`) then computes, for queries ``q [R, H_q, Q, d]`` (``H_q = n·H_kv``)::

    s_p = q_g · K_p^T · scale      # the G·n·Q queries of a group against its prefix: one product per group
    s_s = q · K_s^T · scale        # each row against its own suffix, causal within the suffix
    w   = softmax([s_p | s_s])     # one softmax over both parts, in fp32
    out = w_p · V_p + w_s · V_s

which equals attention over ``[prefix | suffix]`` keys of each row: exact, no approximation. Products run in the
model dtype and the softmax in fp32, as transformers' eager attention. Written here because transformers has
no attention over a prefix shared by several rows; it is plain torch (two small batched matmuls per part).

Safety: the attention must be the registered one while the cache is used (:func:`shared_prefix_attention_for`
switches the decoder's ``attn_implementation`` for the duration and restores it). A layer whose ``update`` is
not followed by a read through :func:`shared_prefix_attention` raises at its next ``update`` (the other
attention would have seen only the suffix), never silently. Attention features not implemented here (logit
soft-capping, sliding windows, attention sinks) raise ``ValueError``.

transformers is imported by this module: :mod:`fastgrpo.rollout` imports it lazily, on the first prompt-once
rollout.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .packing import _unwrap

__all__ = [
    "SHARED_PREFIX_ATTENTION",
    "SharedPrefixCache",
    "shared_prefix_attention",
    "shared_prefix_attention_for",
    "shared_prefix_unsupported",
    "register_shared_prefix_attention",
    "text_decoder",
]

SHARED_PREFIX_ATTENTION = "fastgrpo_shared_prefix"

# The cache being read by the shared-prefix attention (set by shared_prefix_attention_for).
_ACTIVE: contextvars.ContextVar[SharedPrefixCache | None] = contextvars.ContextVar(
    "fastgrpo_shared_prefix_cache", default=None
)


class _SharedPrefixLayer(DynamicLayer):
    """One decoder layer: prefix ``[B, H_kv, L_p, d]`` once per group, suffix ``[R, H_kv, S, d]`` per row."""

    def __init__(self, keys: Tensor, values: Tensor, prefix_mask: Tensor | None) -> None:
        super().__init__()
        if prefix_mask is not None:
            # a masked position gets weight exactly 0, but 0 * NaN is NaN: padding values must be finite
            values = values.masked_fill(~prefix_mask[:, None, :, None], 0.0)
        self.prefix_keys, self.prefix_values, self.prefix_mask = keys, values, prefix_mask
        self.unread = False  # an update whose keys the shared attention has not read yet

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if self.unread:
            raise RuntimeError(
                "SharedPrefixCache: the previous keys of this layer were not read by the shared-prefix attention; "
                f"the model must run with attn_implementation={SHARED_PREFIX_ATTENTION!r} "
                "(fastgrpo.prefix_cache.shared_prefix_attention_for)"
            )
        self.unread = True
        return super().update(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + super().get_seq_length()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SharedPrefixCache rows are fixed at construction (group_size)")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("SharedPrefixCache rows are fixed at construction (group_size)")


class SharedPrefixCache(Cache):
    """``B·G`` rows over ``B`` prompt prefixes (module docstring).

    Args:
        prefix: a prefilled ``DynamicCache`` of ``B`` rows whose layers are all plain ``DynamicLayer`` (full
            attention); its tensors are used as they are, not copied.
        group_size: ``G``, consecutive rows per prefix (prompt-major, as ``num_return_sequences``).
        prefix_mask: ``[B, L_p]`` bool, False at padding (None: no padding).
    """

    def __init__(self, prefix: DynamicCache, group_size: int, prefix_mask: Tensor | None = None) -> None:
        why = shared_prefix_unsupported(prefix)
        if why:
            raise ValueError(f"SharedPrefixCache: {why}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        b, _, length, _ = prefix.layers[0].keys.shape
        if prefix_mask is not None and tuple(prefix_mask.shape) != (b, length):
            raise ValueError(
                f"prefix_mask must be [B, L_p] = [{b}, {length}], got {tuple(prefix_mask.shape)}"
            )
        mask = None if prefix_mask is None or bool(prefix_mask.all()) else prefix_mask.bool()
        super().__init__(
            layers=[_SharedPrefixLayer(layer.keys, layer.values, mask) for layer in prefix.layers]
        )
        self.group_size = group_size

    def check_all_read(self) -> None:
        """Raise if a layer's last update was not read by the shared-prefix attention."""
        if any(layer.unread for layer in self.layers):
            raise RuntimeError(
                "SharedPrefixCache: a decoder layer's attention did not go through the shared-prefix attention"
            )


def shared_prefix_unsupported(cache: Any, model: nn.Module | None = None) -> str:
    """Why ``cache`` (the prefill cache of ``model``) cannot become a :class:`SharedPrefixCache` read by
    :data:`SHARED_PREFIX_ATTENTION` (``""`` when it can)."""
    if model is not None:
        decoder = text_decoder(model)
        can_switch = getattr(decoder, "_can_set_attn_implementation", None)  # transformers' own check
        if callable(can_switch) and not can_switch():
            return f"{type(decoder).__name__} cannot switch its attention implementation"
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers:
        return (
            f"the cache is a {type(cache).__name__} with no layers, not a DynamicCache with its layers built"
        )
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if kinds:
        return (
            f"the model's cache has {', '.join(kinds)} layers (only full-attention DynamicLayer ones share)"
        )
    if getattr(cache, "offloading", False):
        return "the cache offloads its layers"
    return ""


def _group_rows(x: Tensor, b: int, g: int) -> Tensor:
    """``[B·G, H, M, k]`` -> ``[B, H, G·M, k]`` (the rows of a group side by side, per head)."""
    _, h, m, k = x.shape
    return x.reshape(b, g, h, m, k).transpose(1, 2).reshape(b, h, g * m, k)


def _ungroup_rows(x: Tensor, g: int) -> Tensor:
    """Inverse of :func:`_group_rows`."""
    b, h, gm, k = x.shape
    return x.reshape(b, h, g, gm // g, k).transpose(1, 2).reshape(b * g, h, gm // g, k)


def shared_prefix_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of :data:`SHARED_PREFIX_ATTENTION`: ``query [R, H_q, Q, d]`` against the module's prefix in the
    active :class:`SharedPrefixCache` and ``key / value [R, H_kv, S, d]``, the suffix its ``update`` returned.

    ``attention_mask`` is not used: the prefix mask comes from the cache, and the suffix holds only real tokens
    (the last prompt token and the sampled ones), causal among themselves. Returns ``[R, Q, H_q, d]``.
    """
    cache = _ACTIVE.get()
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or layer_idx is None or layer_idx >= len(cache.layers):
        raise RuntimeError(
            f"{SHARED_PREFIX_ATTENTION} attention runs only inside shared_prefix_attention_for(model, cache), on "
            f"decoder layers (module {type(module).__name__}, layer_idx={layer_idx})"
        )
    for name in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{SHARED_PREFIX_ATTENTION} does not implement {name}; use prompt_cache='expanded'"
            )
    if dropout:
        raise ValueError(f"{SHARED_PREFIX_ATTENTION} is for generation (eval mode): dropout must be 0")
    layer = cache.layers[layer_idx]
    if not (layer.unread and key is layer.keys):
        raise RuntimeError(
            f"{SHARED_PREFIX_ATTENTION}: layer {layer_idx} got keys that are not its cache's suffix (does the "
            "model transform the cached keys?); use prompt_cache='expanded'"
        )
    layer.unread = False
    pk, pv, pmask = layer.prefix_keys, layer.prefix_values, layer.prefix_mask
    r, h_q, q_len, d = query.shape
    b, h_kv, l_p, _ = pk.shape
    g, n, s = cache.group_size, h_q // h_kv, key.shape[2]
    if r != b * g or key.shape[0] != r:
        raise ValueError(
            f"{SHARED_PREFIX_ATTENTION}: {r} query rows and {key.shape[0]} suffix rows for {b} prefixes x "
            f"group_size {g}"
        )
    scale = d**-0.5 if scaling is None else scaling
    # query head h reads key/value head h // n (repeat_kv's order): [R, H_kv, n·Q, d]
    q = query.reshape(r, h_kv, n * q_len, d)
    s_p = torch.matmul(_group_rows(q, b, g), pk.transpose(-1, -2)) * scale  # [B, H_kv, G·n·Q, L_p]
    low = torch.finfo(s_p.dtype).min
    if pmask is not None:
        s_p = s_p.masked_fill(~pmask[:, None, None, :], low)
    s_p = _ungroup_rows(s_p, g)  # [R, H_kv, n·Q, L_p]
    s_s = torch.matmul(q, key.transpose(-1, -2)) * scale  # [R, H_kv, n·Q, S]
    if q_len > 1:  # query i is suffix position S - Q + i
        pos = torch.arange(q_len, device=query.device).repeat(n) + (s - q_len)
        s_s = s_s.masked_fill(torch.arange(s, device=query.device) > pos[:, None], low)
    acc = torch.promote_types(s_s.dtype, torch.float32)  # fp32 softmax (fp64 stays fp64)
    w = torch.softmax(torch.cat([s_p, s_s], dim=-1), dim=-1, dtype=acc).to(value.dtype)
    w_p, w_s = w.split([l_p, s], dim=-1)
    out = _ungroup_rows(torch.matmul(_group_rows(w_p, b, g), pv), g) + torch.matmul(w_s, value)
    return out.reshape(r, h_q, q_len, d).transpose(1, 2).contiguous(), None


@functools.cache
def register_shared_prefix_attention() -> str:
    """Register :data:`SHARED_PREFIX_ATTENTION` with transformers (once) and return its name. No mask function
    is registered: transformers then builds no attention mask for it (the attention does not read one)."""
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    return SHARED_PREFIX_ATTENTION


def text_decoder(model: nn.Module) -> nn.Module:
    """The (sub)model whose config is the text decoder's (``config.get_text_config(decoder=True)``): the model
    itself for a causal LM, the language model inside a vision-language model."""
    inner = _unwrap(model)
    config = inner.config.get_text_config(decoder=True)
    for m in inner.modules():
        if isinstance(m, PreTrainedModel) and m.config is config:
            return m
    return inner


@contextlib.contextmanager
def shared_prefix_attention_for(model: nn.Module, cache: SharedPrefixCache) -> Iterator[None]:
    """Run ``model``'s text decoder with :data:`SHARED_PREFIX_ATTENTION` on ``cache`` for the duration; its
    attention implementation is restored after. ``ValueError`` when the model cannot switch it (a model that
    does not dispatch through transformers' ``AttentionInterface``)."""
    decoder = text_decoder(model)
    before = decoder.config._attn_implementation
    decoder.set_attn_implementation(register_shared_prefix_attention())
    try:
        if decoder.config._attn_implementation != SHARED_PREFIX_ATTENTION:
            raise ValueError(
                f"{type(decoder).__name__} cannot switch its attention implementation (it does not use "
                "transformers' AttentionInterface): use prompt_cache='expanded'"
            )
        token = _ACTIVE.set(cache)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        cache.check_all_read()
    finally:
        decoder.set_attn_implementation(before)

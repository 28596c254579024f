"""TRL drop-in: a TRL ``GRPOTrainer`` computes its policy loss with :func:`fastgrpo.grpo_loss`.

TRL's ``GRPOTrainer._compute_loss`` runs the model with TRL's fused LM head (chunked per-token log-probs and
entropies), then applies the loss formulas to those ``[B, T]`` tensors. The drop-in replaces that method: it
runs the backbone only (no LM head), takes the last hidden states of the completion positions and the LM head's
weight, and hands them to :func:`fastgrpo.grpo_loss`, which computes the loss and its gradient in one chunked
pass without ever storing a ``[tokens, vocab]`` block beyond one chunk. The numbers are TRL's: same loss, same
gradients (to fp32 rounding), same logged metrics. Two ways to use it::

    from fastgrpo.integrations.trl import FastGRPOTrainer       # same arguments as trl.GRPOTrainer
    trainer = FastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

    from fastgrpo.integrations.trl import patch_trainer          # or: patch an existing GRPOTrainer
    trainer = patch_trainer(GRPOTrainer(...), backend="auto")

What is honoured, read from the trainer at every call (so changing ``trainer.beta`` etc. takes effect):
``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo`` with its two temperatures),
``beta`` (k3 KL against ``ref_per_token_logps``) with ``use_bias_correction_kl`` (the KL term times the
importance ratio, TRL 1.16's default), ``epsilon`` / ``epsilon_high``, ``delta``,
``importance_sampling_level`` (GSPO), ``temperature`` (and a model's ``logit_scale``), ``max_completion_length``,
``num_items_in_batch`` with TRL's rescaling (``/ num_processes``, ``· gradient_accumulation_steps /
steps_per_generation`` in training), the gradient-accumulation divisor of the other loss types, the tool mask,
vLLM's importance-sampling correction (folded into per-token advantages: the weight is positive and TRL applies
it before adding the KL), a static ``entropy_coef``, ``cast_lm_head_to_fp32`` and autocast. The metrics TRL logs
(``kl``, ``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``, ``policy_loss``) are computed from the detached
per-token log-probs and entropies the op returns, with TRL's reductions. A micro-batch whose completions are all
masked (``mask_truncated_completions=True``) gives TRL's loss 0 with zero gradients, and TRL's metrics.

Not supported (a ``NotImplementedError`` says so at patch time and at every call, never a silent fallback):
``loss_type`` ``luspo`` / ``vespo``; ``top_entropy_quantile < 1``; ``off_policy_mask_threshold``;
the adaptive entropy controller; MoE router auxiliary losses; final-logit soft-capping
(Gemma 2/3); an LM head that is an FSDP unit on its own (accelerate's FSDP2 puts it with the final norm, or in
the root: both work); vision-language models (the backbone must be ``model.base_model`` of a causal LM).

Sharded models: the loss runs *inside* the model's forward (the call TRL makes goes through every wrapper with
a callback that the innermost causal LM's forward applies to its last hidden states), so FSDP2 has gathered the
LM head's weight when the loss reads it and reduce-scatters its gradient after the backward, as for any
parameter it manages. Under DeepSpeed ZeRO-3 the LM head's weight (and bias) are registered as external
parameters of the module TRL calls (``deepspeed.zero.register_external_parameter``), so ZeRO-3 gathers them for
that forward. No collective is written here.
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from typing import Any

import torch

from fastgrpo.ops.grpo_loss import LOSS_TYPES, GRPOLossOutput, LossConfig, grpo_loss
from fastgrpo.packing import logit_scale

__all__ = ["FastGRPOTrainer", "patch_trainer", "fastgrpo_compute_loss", "check_supported"]  # noqa: F822 (lazy)

_HIDDEN_KW = "fastgrpo_hidden_states"
_CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _import_trl():
    try:
        import trl
    except ImportError as e:
        raise ImportError(
            "fastgrpo.integrations.trl needs TRL (tested with trl==1.16): pip install 'fastgrpo[bench]' or "
            f"pip install trl ({e})"
        ) from e
    return trl


# ----------------------------------------------------------------------------------------------------------
# Model plumbing: the backbone's hidden states and the LM head
# ----------------------------------------------------------------------------------------------------------


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a (possibly PEFT-wrapped) model: the object TRL patched."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _install_hidden_forward(model: torch.nn.Module) -> None:
    """Let ``model(..., fastgrpo_hidden_states=True)`` return the backbone's output (no LM head), and
    ``model(..., fastgrpo_hidden_states=fn)`` return ``fn(last_hidden_state)`` computed inside the forward.

    The call goes through every wrapper (DDP, FSDP, DeepSpeed, PEFT) exactly like TRL's ``fused_lm_head=True``
    call, so gradient synchronisation, parameter gathering and adapters behave as in TRL; only the innermost
    causal LM's forward is wrapped.
    """
    lm = _causal_lm(model)
    if getattr(lm, "_fastgrpo_hidden_forward", False):
        return
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm:
        raise NotImplementedError(
            f"{type(lm).__name__} exposes no separate backbone (`model.base_model`): the fastgrpo drop-in needs "
            "a causal LM whose last hidden states feed `get_output_embeddings()`"
        )
    previous = lm.forward

    @functools.wraps(previous)
    def forward(self, *args, **kwargs):
        then = kwargs.pop(_HIDDEN_KW, False)
        if not then:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        # inside the forward: a sharded LM head is gathered now (FSDP2 unit / ZeRO-3 external parameter)
        return then(out.last_hidden_state) if callable(then) else out

    lm.forward = types.MethodType(forward, lm)
    lm._fastgrpo_hidden_forward = True


# ----------------------------------------------------------------------------------------------------------
# What the drop-in supports
# ----------------------------------------------------------------------------------------------------------


def check_supported(trainer) -> None:
    """Raise ``NotImplementedError`` naming the first TRL option the drop-in cannot reproduce exactly."""

    def no(what: str) -> None:
        raise NotImplementedError(
            f"fastgrpo's TRL drop-in does not support {what}; use trl.GRPOTrainer as is"
        )

    if trainer.loss_type not in LOSS_TYPES:
        no(f"loss_type={trainer.loss_type!r} (supported: {', '.join(LOSS_TYPES)})")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        no("top_entropy_quantile < 1 (the entropy mask needs the entropies before the loss pass)")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        no("off_policy_mask_threshold")
    if getattr(trainer, "use_adaptive_entropy", False):
        no("the adaptive entropy controller (use_adaptive_entropy)")
    if getattr(trainer, "aux_loss_enabled", False):
        no("MoE router auxiliary losses")
    lm = _causal_lm(trainer.model)
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(text, "final_logit_softcapping", None) is not None:
        no("final-logit soft-capping (final_logit_softcapping)")


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _register_zero3_head(trainer) -> None:
    """Under ZeRO-3, register the LM head's parameters as external parameters of ``trainer.model`` (the module
    whose ``__call__`` runs the loss; PEFT calls the inner forward directly, so its hooks are the outer ones).
    Idempotent: DeepSpeed keys them by identity."""
    if not _zero3_enabled():
        return
    from fastgrpo.distributed import register_zero3_head

    register_zero3_head(trainer.model, _causal_lm(trainer.model))


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------


def fastgrpo_compute_loss(trainer, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``GRPOTrainer._compute_loss`` computed with :func:`fastgrpo.grpo_loss`; logs TRL's metrics."""
    check_supported(trainer)
    args = trainer.args
    opts = getattr(trainer, "_fastgrpo_options", {})
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    k = completion_ids.size(1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

    mode = "train" if trainer.model.training else "eval"
    gas = getattr(trainer, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
    gas = gas if mode == "train" else 1
    loss_type = trainer.loss_type
    beta = trainer.beta

    advantages = inputs["advantages"]
    per_token_adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    weight_is = None
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        # TRL multiplies the policy term (not the KL) by a positive per-token weight: the same as scaling A
        weight_is = inputs["importance_sampling_ratio"]
    loss_adv = per_token_adv if weight_is is None else (per_token_adv * weight_is).expand_as(mask)
    if loss_adv.dim() == 2 and loss_adv.shape[1] == 1:
        loss_adv = loss_adv.squeeze(1)

    if loss_type in ("dapo", "cispo"):
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            num_items = num_items * gas / args.steps_per_generation
        divisor = 1  # the normaliser already spans one accumulation window
    else:
        num_items, divisor = None, gas
    entropy_coef = trainer.entropy_coef if getattr(trainer, "_entropy_bonus_enabled", False) else 0.0
    # TRL's bonus is a token mean divided by the accumulation steps whatever the loss type. The op's is a token
    # mean; for the loss types whose whole loss is divided by `divisor` that division already applies to it.
    op_entropy_coef = entropy_coef / gas if divisor == 1 else entropy_coef

    old = inputs.get("old_per_token_logps")
    ref = inputs["ref_per_token_logps"] if beta != 0.0 else None
    config = LossConfig(
        loss_type=loss_type,
        importance_level=trainer.importance_sampling_level,
        eps_low=trainer.epsilon_low,
        eps_high=trainer.epsilon_high,
        delta=args.delta,
        beta=beta,
        entropy_coef=op_entropy_coef,
        kl_bias_correction=_bias_corrected_kl(args),
        sapo_tau_pos=args.sapo_temperature_pos,
        sapo_tau_neg=args.sapo_temperature_neg,
        chunk_size=opts.get("chunk_size"),
        backend=opts.get("backend", "auto"),
    )

    lm = _causal_lm(trainer.model)

    def loss_from_hidden(last_hidden: torch.Tensor) -> GRPOLossOutput:
        """The loss of the completion positions, inside the model's forward (module docstring)."""
        hidden = last_hidden[:, -k - 1 : -1]  # hidden[:, t] scores completion token t
        dev_type = hidden.device.type
        autocast_dtype = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else None
        head = lm.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if type(weight).__name__ == "DTensor":
            raise NotImplementedError(
                "fastgrpo's TRL drop-in: the LM head is still sharded inside the forward (an FSDP unit of its own "
                "whose forward never runs); shard it with the final norm (accelerate's default) or the root"
            )
        hidden = hidden.to(weight.device)
        if args.cast_lm_head_to_fp32:
            hidden = hidden.float()
        elif autocast_dtype is not None:  # TRL's head runs under autocast: the GEMMs in the autocast dtype
            hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
            bias = None if bias is None else bias.to(autocast_dtype)
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        if not bool(mask.any()):
            return _all_masked(hidden, weight, bias, mask, old)
        autocast_off = (
            torch.autocast(dev_type, enabled=False) if autocast_dtype is not None else nullcontext()
        )
        with autocast_off:
            return grpo_loss(
                hidden,
                weight,
                completion_ids,
                loss_adv,
                mask=mask,
                old_logp=old,
                ref_logp=ref,
                temperature=trainer.temperature / logit_scale(lm.config),
                max_completion_length=trainer.max_completion_length,
                num_items_in_batch=num_items,
                bias=bias,
                config=config,
            )

    _install_hidden_forward(trainer.model)
    _register_zero3_head(trainer)
    with trainer.accelerator.autocast():
        res = model(input_ids=input_ids, attention_mask=attention_mask, **{_HIDDEN_KW: loss_from_hidden})
    loss = res.loss / divisor
    _log_metrics(trainer, mode, res, inputs, mask, per_token_adv, old, ref, op_entropy_coef, loss_type)
    return loss


def _all_masked(hidden, weight, bias, mask, old) -> GRPOLossOutput:
    """TRL's result for a micro-batch without a valid token (``mask_truncated_completions`` can mask them all):
    loss 0 connected to the backbone and the LM head (zero gradients, so every parameter still takes part in
    DDP's reduction), and per-token values whose masked reductions give TRL's metrics (the log-probs equal to
    ``old`` make the ratio 1, so no ``0 * inf`` enters the masked sums)."""
    zero = hidden.sum() * 0.0 + weight.sum() * 0.0 + (0.0 if bias is None else bias.sum() * 0.0)
    zeros = torch.zeros(mask.shape, device=hidden.device)
    scalar = zeros.new_zeros(())
    logp = zeros if old is None else old.detach().float()
    return GRPOLossOutput(zero.float(), logp, zeros, scalar, scalar, scalar, scalar.new_ones(()))


def _bias_corrected_kl(args) -> bool:
    """TRL's ``use_bias_correction_kl`` (default True in 1.16; absent before): the KL term times the ratio."""
    return bool(getattr(args, "use_bias_correction_kl", False))


def _log_metrics(trainer, mode, res, inputs, mask, advantages, old, ref, op_entropy_coef, loss_type) -> None:
    """TRL 1.16's metrics, from the op's detached per-token log-probs and entropies."""
    acc = trainer.accelerator
    metrics = trainer._metrics[mode]
    logp, entropies = res.logp, res.entropy
    maskf = mask.to(logp.dtype)

    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * maskf).sum(-1) / maskf.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * maskf).sum(), maskf.sum().float()
        totals = acc.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if getattr(trainer, "_entropy_bonus_enabled", False):
        # TRL logs the loss before the entropy bonus (and before dividing by the accumulation steps)
        ent_mean = (entropies * maskf).sum() / maskf.sum().clamp(min=1.0)
        policy_loss = (res.loss.detach() + op_entropy_coef * ent_mean).reshape(())
        metrics["policy_loss"].append(acc.gather(policy_loss).nanmean().item())
        if mode == "train" and acc.sync_gradients:
            metrics["entropy_coef"].append(trainer.entropy_coef)

    old_logp = logp if old is None else old
    log_ratio = logp - old_logp
    if trainer.importance_sampling_level == "sequence":
        log_w = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        log_w = log_ratio
    coef_1 = torch.exp(log_w)

    if trainer.beta != 0.0:
        d = ref - logp
        kl = torch.exp(d) - d - 1
        metrics["kl"].append(global_masked_mean(kl * coef_1 if _bias_corrected_kl(trainer.args) else kl))
    metrics["entropy"].append(global_masked_mean(entropies))

    if loss_type in _CLIPPED_TYPES:
        if trainer.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=trainer.args.delta)
        low = (coef_1 < 1 - trainer.epsilon_low) & (advantages < 0)
        high = (coef_1 > 1 + trainer.epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        metrics["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        gathered_low = acc.gather(masked_seq_mean(low.float()))
        metrics["clip_ratio/low_min"].append(_nan_reduce(gathered_low, torch.min))
        gathered_high = acc.gather(masked_seq_mean(high.float()))
        metrics["clip_ratio/high_max"].append(_nan_reduce(gathered_high, torch.max))
    elif loss_type == "cispo":
        clipped = (coef_1 > trainer.epsilon_high) & (advantages > 0)
        metrics["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))


def _nan_reduce(x: torch.Tensor, fn) -> float:
    """TRL's ``nanmin`` / ``nanmax``: ignore NaN (fully masked sequences); NaN when everything is NaN."""
    x = x[~torch.isnan(x)]
    return fn(x).item() if x.numel() else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def patch_trainer(trainer, *, backend: str = "auto", chunk_size: int | None = None):
    """Make an existing ``trl.GRPOTrainer`` compute its loss with :func:`fastgrpo.grpo_loss`; returns it.

    ``backend`` / ``chunk_size`` are passed to the op. Raises ``NotImplementedError`` for an option the drop-in
    does not reproduce (see the module docstring).
    """
    check_supported(trainer)
    _install_hidden_forward(trainer.model)
    trainer._fastgrpo_options = {"backend": backend, "chunk_size": chunk_size}
    trainer._compute_loss = types.MethodType(fastgrpo_compute_loss, trainer)
    return trainer


@functools.cache
def _fast_trainer_class():
    trl = _import_trl()

    class FastGRPOTrainer(trl.GRPOTrainer):
        """``trl.GRPOTrainer`` whose loss is :func:`fastgrpo.grpo_loss` from hidden states (see the module).

        Extra keyword arguments: ``fastgrpo_backend`` (default ``"auto"``), ``fastgrpo_chunk_size``.
        """

        def __init__(
            self, *args, fastgrpo_backend: str = "auto", fastgrpo_chunk_size: int | None = None, **kw
        ):
            super().__init__(*args, **kw)
            check_supported(self)
            _install_hidden_forward(self.model)
            self._fastgrpo_options = {"backend": fastgrpo_backend, "chunk_size": fastgrpo_chunk_size}

        def _compute_loss(self, model, inputs):
            return fastgrpo_compute_loss(self, model, inputs)

    FastGRPOTrainer.__module__ = __name__
    return FastGRPOTrainer


def __getattr__(name: str):
    # the subclass needs trl.GRPOTrainer as its base: built on first access, so importing this module never
    # imports trl
    if name == "FastGRPOTrainer":
        return _fast_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Beyond one device: the policy module that data-parallel engines wrap, and the three strategies.

The trainer hands one module to the engine, :class:`PolicyLoss`: its ``forward`` runs the decoder on a packed
row *and* fastgrpo's fused loss with the LM head's weight read at that moment. Running the loss inside the
wrapped module's forward is what makes every engine work without a hand-written collective:

* **DDP** (``distributed.strategy: ddp``, accelerate): a full replica per process; the gradient hooks fire as
  the backward reaches each parameter, the LM head's included.
* **FSDP2** (``fsdp``, torch ``fully_shard``): each decoder block is one FSDP unit and the root unit (this
  module) holds the embeddings, the final norm and the LM head. Inside the root's forward FSDP has all-gathered
  the root's parameters, so the loss reads the LM head's *full* weight, and FSDP's post-backward
  reduce-scatters its gradient like any other. On GPUs the sharding is applied by accelerate's FSDP plugin
  (:func:`fsdp_plugin`); on CPU (accelerate ignores an FSDP plugin there and runs plain data parallel)
  :func:`shard_policy` applies the same ``fully_shard`` calls itself, so the CPU tests run the same engine.
* **DeepSpeed ZeRO-2 / ZeRO-3** (``deepspeed``, accelerate's DeepSpeed plugin, GPUs only): ZeRO-3 gathers a
  module's parameters in that module's forward; the LM head's forward never runs (the loss reads its weight),
  so :func:`register_zero3_head` registers the weight as an *external parameter* of this module
  (``deepspeed.zero.register_external_parameter``, DeepSpeed's public API for exactly this case).

Work that is not a training forward but needs the full weights (generation with ``transformers``, behaviour
and adapter-off reference log-probs) goes through :meth:`PolicyLoss.gathered`, registered as an FSDP forward
method (``register_fsdp_forward_method``), so the root's parameters are gathered by FSDP's own hooks. Those
calls come in rank-dependent numbers (each rank generates its own share), which per-call all-gathers cannot
match up: the trainer gathers every unit once for the phase (:func:`hold_full_weights`, one collective at a
point every rank reaches) and reshards before the training forward (:func:`release_full_weights`).

Checkpoints of an FSDP run are full state dicts gathered on rank 0 (:func:`full_state`, torch's
``get_state_dict(full_state_dict=True, cpu_offload=True)``): the same ``model.safetensors`` as a DDP run
(``fastgrpo export`` reads either), written by the atomic checkpoint writer of :mod:`fastgrpo.checkpoint`.
Torch's sharded distributed checkpoint would avoid rank 0 holding the full trainable state in CPU memory; it is
not used because the LoRA adapters and the models this trainer targets fit there easily, and one file layout
keeps export, evaluation and integrity checks identical for every strategy (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .ops import grpo_loss
from .ops.grpo_loss import GRPOLossOutput
from .packing import PackedBatch, lm_head_of, packed_forward

logger = logging.getLogger(__name__)

__all__ = [
    "PolicyLoss",
    "fsdp_block_names",
    "fsdp_kwargs",
    "shard_policy",
    "fsdp_plugin",
    "is_fsdp",
    "hold_full_weights",
    "release_full_weights",
    "gradient_sync",
    "full_state",
    "load_full_state",
    "deepspeed_config",
    "deepspeed_plugin",
    "register_zero3_head",
    "lm_head_params",
    "DeepSpeedSteps",
    "named_weights_for_inference",
]

_ROOT_PREFIX = "model."  # PolicyLoss holds the policy as `.model`: its parameter names gain this prefix


class PolicyLoss(nn.Module):
    """The policy as a data-parallel engine sees it (module docstring).

    ``forward(batch)`` returns the last hidden states ``[M, D]`` at the loss positions of the packed row;
    ``forward(batch, loss_kwargs)`` also applies :func:`fastgrpo.grpo_loss` with the LM head's current weight
    and returns its :class:`~fastgrpo.ops.grpo_loss.GRPOLossOutput` (``loss_kwargs``: every argument of
    ``grpo_loss`` after ``advantages``'s position is given by name, ``advantages`` included; the targets come
    from ``batch``). The logits are never built.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, batch: PackedBatch, loss_kwargs: dict[str, Any] | None = None
    ) -> Tensor | GRPOLossOutput:
        hidden = packed_forward(self.model, batch).index_select(0, batch.logit_index)
        if loss_kwargs is None:
            return hidden
        # read the head now: under FSDP / ZeRO-3 this is the gathered weight, outside a forward a shard
        head = lm_head_of(self.model)
        dev = hidden.device.type
        # the loss accumulates in fp32 itself; an engine's autocast (accelerate's bf16) must not downcast it
        no_autocast = (
            torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()
        )
        with no_autocast:
            return grpo_loss(
                hidden, head.weight.to(hidden.dtype), batch.targets, bias=head.bias, **loss_kwargs
            )

    def gathered(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the root's parameters gathered (an FSDP forward method under FSDP, a
        plain call otherwise)."""
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------------


def is_fsdp(module: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp_block_names(model: nn.Module, names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The class names of the FSDP units: ``names`` when given (each must occur in ``model``), else the model's
    ``_no_split_modules`` (its decoder layers, and a vision-language model's vision blocks)."""
    present = {type(m).__name__ for m in model.modules()}
    if names:
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(
                f"distributed.fsdp.blocks: {missing} name no module class of {type(model).__name__} (its classes "
                f"include {sorted(present)[:12]})"
            )
        return list(names)
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    found = [n for n in (getattr(inner, "_no_split_modules", None) or []) if n in present]
    if not found:
        raise ValueError(
            f"{type(inner).__name__} declares no _no_split_modules present in it: name the decoder block classes "
            "in distributed.fsdp.blocks"
        )
    return found


def _param_dtype(cfg: Any, mixed_precision: str) -> torch.dtype | None:
    if cfg.param_dtype == "auto":
        return torch.bfloat16 if mixed_precision == "bf16" else None
    return getattr(torch, cfg.param_dtype)


def fsdp_kwargs(cfg: Any, mixed_precision: str, device: torch.device) -> dict[str, Any]:
    """``fully_shard`` keyword arguments of a :class:`fastgrpo.config.FsdpConfig`: ``reshard_after_forward``,
    the mixed-precision policy (compute dtype, fp32 or bf16 reduce-scatter) and the CPU-offload policy."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    mp = MixedPrecisionPolicy(
        param_dtype=_param_dtype(cfg, mixed_precision), reduce_dtype=getattr(torch, cfg.reduce_dtype)
    )
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    return {"reshard_after_forward": cfg.reshard_after_forward, "mp_policy": mp, "offload_policy": offload}


def shard_policy(policy: PolicyLoss, cfg: Any, mixed_precision: str, device: torch.device) -> PolicyLoss:
    """Apply torch FSDP2 to ``policy`` in place: ``fully_shard`` on every block (:func:`fsdp_block_names`), then
    on the root; register :meth:`PolicyLoss.gathered` as an FSDP forward method. What accelerate's FSDP plugin
    does on GPUs (:func:`fsdp_plugin`), done directly where accelerate would not (CPU)."""
    from torch.distributed.fsdp import fully_shard

    kw = fsdp_kwargs(cfg, mixed_precision, device)
    names = set(fsdp_block_names(policy.model, cfg.blocks))
    blocks = [m for m in policy.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, **kw)
    # the root is not resharded after forward (torch's default for a root): its parameters are needed at once
    fully_shard(policy, **{k: v for k, v in kw.items() if k != "reshard_after_forward"})
    register_gathered(policy)
    logger.info("FSDP2: %d blocks (%s) + root, %s", len(blocks), ", ".join(sorted(names)), kw)
    return policy


def register_gathered(policy: nn.Module) -> None:
    """Make :meth:`PolicyLoss.gathered` an FSDP forward method (a no-op for a module without FSDP)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(policy, "gathered")


def fsdp_plugin(cfg: Any, mixed_precision: str, device: torch.device, blocks: list[str] | None = None) -> Any:
    """accelerate's ``FullyShardedDataParallelPlugin`` (FSDP2) doing what :func:`shard_policy` does: the same
    units (``transformer_cls_names_to_wrap``: ``blocks``, or set on the plugin once the model is loaded, from
    :func:`fsdp_block_names`), reshard, mixed-precision and offload policies, full state dicts. Activation
    checkpointing stays with ``model.gradient_checkpointing`` (transformers' own), so the plugin's is off."""
    from accelerate import FullyShardedDataParallelPlugin

    kw = fsdp_kwargs(cfg, mixed_precision, device)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=kw["reshard_after_forward"],
        mixed_precision_policy=kw["mp_policy"],
        cpu_offload=kw["offload_policy"] if cfg.cpu_offload else False,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=blocks,
        state_dict_type="FULL_STATE_DICT",
        activation_checkpointing=False,
        cpu_ram_efficient_loading=False,
    )


def _blocks(policy: nn.Module) -> list[nn.Module]:
    return [m for m in policy.modules() if m is not policy and is_fsdp(m)]


def hold_full_weights(policy: nn.Module) -> bool:
    """All-gather every FSDP unit of ``policy`` and keep them gathered (blocks stop resharding after their
    forward) until :func:`release_full_weights`. A collective: every rank calls it at the same point of the
    step. In between, any number of forward calls through :meth:`PolicyLoss.gathered` on each rank (a rank's
    share of generations, its non-padding micro-batches' reference passes) makes no collective, so ranks may
    make different numbers of them. The first call also runs the root's lazy initialisation. Returns False
    (and does nothing) without FSDP."""
    if not is_fsdp(policy):
        return False
    policy.gathered(lambda: None)  # the root's forward hooks: lazy init, the root unit's all-gather
    for block in _blocks(policy):
        block.set_reshard_after_forward(False, recurse=False)
        block.unshard()
    return True


def release_full_weights(policy: nn.Module, reshard_after_forward: bool) -> None:
    """Reshard the blocks :func:`hold_full_weights` gathered and restore their ``reshard_after_forward`` (local:
    no collective). The root stays gathered until its backward, as FSDP keeps it."""
    for block in _blocks(policy):
        block.set_reshard_after_forward(reshard_after_forward, recurse=False)
        block.reshard()


@contextlib.contextmanager
def gradient_sync(policy: nn.Module, sync: bool, accel: Any = None, world: int = 1) -> Iterator[None]:
    """Gradient accumulation without communication for a micro-batch that is not the step's last:
    FSDP2's ``set_requires_gradient_sync(False)`` (local unsharded gradients, one reduce-scatter on the last),
    DDP's ``no_sync`` through accelerate; DeepSpeed uses :class:`DeepSpeedSteps` instead."""
    if sync or world == 1 and not is_fsdp(policy):
        yield
        return
    if is_fsdp(policy):
        policy.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            policy.set_requires_gradient_sync(True)
        return
    with accel.no_sync(policy):
        yield


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
    return optimizer


def full_state(policy: nn.Module, optimizer: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The trainable weights (named as in the policy model, without the wrapper's prefix) and the optimizer
    state of an FSDP policy, gathered in full on rank 0's CPU (other ranks get empty dicts). A collective:
    every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optim = get_state_dict(policy, _inner_optimizer(optimizer), options=opts)
    return {k.removeprefix(_ROOT_PREFIX): v for k, v in weights.items()}, optim


def load_full_state(
    policy: nn.Module, optimizer: Any, weights: dict[str, Tensor], optim: dict[str, Any] | None
) -> None:
    """Load full trainable weights (named as in :func:`full_state`) and a full optimizer state (None: weights
    only) into an FSDP policy; each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    model_sd = {_ROOT_PREFIX + k: v for k, v in weights.items()}
    if optim is None:
        set_model_state_dict(policy, model_sd, options=opts)
        return
    set_state_dict(
        policy, _inner_optimizer(optimizer), model_state_dict=model_sd, optim_state_dict=optim, options=opts
    )


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------------------


def deepspeed_config(cfg: Any, mixed_precision: str, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed configuration of a :class:`fastgrpo.config.DeepSpeedConfig`.

    One micro-batch is one packed row (``train_micro_batch_size_per_gpu: 1``), and the trainer marks the
    accumulation boundary itself (:class:`DeepSpeedSteps`; a step's micro-batch count varies with the token
    budget), so DeepSpeed's own ``gradient_accumulation_steps`` is 1 and its loss scaling by it is off.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": False},
        # the trainer's own torch AdamW (also on offloaded CPU states, where DeepSpeed would want its CPUAdam)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def deepspeed_plugin(cfg: Any, mixed_precision: str, grad_clip: float) -> Any:
    """accelerate's ``DeepSpeedPlugin`` around :func:`deepspeed_config`."""
    from accelerate import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, mixed_precision, grad_clip))


def lm_head_params(model: nn.Module) -> list[Tensor]:
    """The LM head's weight and (if any) bias of ``model``."""
    head = lm_head_of(model)
    return [p for p in (head.weight, head.bias) if p is not None]


def register_zero3_head(module: nn.Module, model: nn.Module, deepspeed: Any = None) -> list[Tensor]:
    """Register the LM head's weight (and bias) of ``model`` as external parameters of ``module``, the module
    whose forward runs the fused loss, so ZeRO-3 gathers them for that forward and partitions their gradient
    after its backward. ``deepspeed``: the module to call (tests pass a recorder). Returns the parameters."""
    if deepspeed is None:
        import deepspeed
    params = lm_head_params(model)
    for p in params:
        deepspeed.zero.register_external_parameter(module, p)
    return params


class DeepSpeedSteps:
    """The DeepSpeed engine's side of one optimizer step over a varying number of micro-batches.

    accelerate's ``backward`` would step the engine after every micro-batch here (it marks a boundary whenever
    its own gradient-accumulation counter says so); the trainer instead marks the boundary on the step's last
    micro-batch (``set_gradient_accumulation_boundary``), passes its already-weighted losses to
    ``engine.backward(loss, scale_wrt_gas=False)``, and calls ``engine.step()`` once (clipping, optimizer step,
    zeroing) and reads the global gradient norm DeepSpeed computed.
    """

    def __init__(self, engine: Any):
        self.engine = engine

    def backward(self, loss: Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Weights for an inference engine
# ----------------------------------------------------------------------------------------------------------


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if callable(getattr(t, "full_tensor", None)) else t


@torch.no_grad()
def named_weights_for_inference(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of every weight of ``model`` under the names of the plain ``transformers`` model,
    one at a time, for an inference engine (vLLM's ``load_weights``).

    A PEFT model's LoRA adapters are merged into the yielded tensors: ``W + delta`` with peft's own
    ``get_delta_weight``, computed out of place, so the policy's base weights are never modified (merging into
    them and unmerging after, as ``merge_adapter`` / ``unmerge_adapter`` do, leaves rounding residue in the frozen
    weights after every push). FSDP-sharded weights are gathered one tensor at a time (``DTensor.full_tensor``).
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: no adapters to merge
        LoraLayer = ()  # noqa: N806
    is_peft = callable(getattr(model, "get_base_model", None))
    base = model.get_base_model() if is_peft else model
    lora = {name: m for name, m in base.named_modules() if LoraLayer and isinstance(m, LoraLayer)}
    seen: set[int] = set()
    for name, param in base.named_parameters(remove_duplicate=True):
        if id(param) in seen or ".lora_" in name or "lora_embedding" in name:
            continue
        seen.add(id(param))
        owner, _, leaf = name.rpartition(".")
        layer_name = owner.removesuffix(".base_layer")
        layer = lora.get(layer_name) if owner.endswith(".base_layer") else None
        tensor = _full(param)
        if layer is not None and leaf == "weight" and not getattr(layer, "merged", False):
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    tensor = tensor + _full(layer.get_delta_weight(adapter)).to(tensor.dtype)
        yield (f"{layer_name}.{leaf}" if layer is not None else name), tensor

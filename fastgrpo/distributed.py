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

The trainer reaches all of this through one object, :class:`Runtime` (built by :func:`make_accelerator`'s
accelerator and the policy): the wrapped policy, its optimizer step, the full-weight phases, checkpoint state
and the collectives, the same calls for every strategy; :func:`build_vllm_engine` starts the colocated vLLM
engine the trainer pushes weights to (:meth:`Runtime.push_weights`).
"""

from __future__ import annotations

import contextlib
import logging
import math
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
    "resolve_mixed_precision",
    "make_accelerator",
    "Runtime",
    "vllm_can_run",
    "build_vllm_engine",
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


# ----------------------------------------------------------------------------------------------------------
# The trainer's runtime: accelerator, wrapped policy, optimizer step, collectives, engine weights
# ----------------------------------------------------------------------------------------------------------


def resolve_mixed_precision(cfg: Any) -> str:
    """``train.mixed_precision`` of a :class:`fastgrpo.config.Config` resolved for this machine: ``"bf16"`` or
    ``"no"``."""
    cuda = torch.cuda.is_available()
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mp == "bf16" and not cuda:
        logger.warning("train.mixed_precision=bf16 needs a GPU here; running in fp32")
        mp = "no"
    return mp


def make_accelerator(cfg: Any) -> Any:
    """``Accelerator(cpu=True)`` without a GPU (the only CPU form that really runs several processes); on GPUs
    with accelerate's FSDP2 or DeepSpeed plugin for ``distributed.strategy`` ``fsdp`` / ``deepspeed`` (on CPU
    :class:`Runtime` applies FSDP2 itself: :func:`shard_policy`). With the run's experiment trackers
    (``train.report_to``; started with the run directory by :func:`fastgrpo.observability.start_trackers`)."""
    import importlib.util
    import os

    from accelerate import Accelerator

    from ._schema import ConfigError

    cuda = torch.cuda.is_available()
    mp = resolve_mixed_precision(cfg)
    strategy = cfg.distributed.strategy
    plugins: dict[str, Any] = {}
    if strategy == "fsdp" and cuda:
        plugins["fsdp_plugin"] = fsdp_plugin(cfg.distributed.fsdp, mp, torch.device("cuda"))
    elif strategy == "deepspeed":
        if not cuda:
            raise ConfigError(
                "distributed.strategy: deepspeed needs CUDA GPUs (DeepSpeed has no CPU training engine); use 'fsdp' "
                "or 'ddp' here"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError("distributed.strategy=deepspeed needs DeepSpeed: pip install deepspeed")
        plugins["deepspeed_plugin"] = deepspeed_plugin(cfg.distributed.deepspeed, mp, cfg.optim.grad_clip)
    # "no" is passed as None: the default, and compatible with an AcceleratorState another library created
    # the tensorboard tracker needs a logging directory: the runs' root until the run directory is named
    trackers = cfg.train.trackers()
    accel = Accelerator(cpu=not cuda, mixed_precision=None if mp == "no" else mp, log_with=trackers or None,
                        project_dir=cfg.train.output_dir if trackers else None, **plugins)  # fmt: skip
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accel.num_processes != expected:
        raise RuntimeError(
            f"launched as {expected} processes (WORLD_SIZE) but accelerate runs {accel.num_processes}: every "
            "process would train alone on the full batch. On CPU use `accelerate launch --multi_gpu "
            "--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no` or `torchrun "
            "--nproc_per_node N` (the --cpu flag and MULTI_CPU configs start unconnected processes)"
        )
    if expected == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1"):
        # `accelerate launch --cpu --num_processes N` starts ONE process here and says nothing
        logger.warning(
            "accelerate launch --cpu runs a single process (world size 1) whatever --num_processes says; for "
            "several CPU processes use `accelerate launch --multi_gpu --num_processes N` (fastgrpo creates "
            "Accelerator(cpu=True) itself when there is no GPU)"
        )
    return accel


class Runtime:
    """The policy as the run's engine trains it, for a :class:`fastgrpo.config.Config`: the wrapped
    :class:`PolicyLoss` (``policy``), its optimizer and LR scheduler (built over the parameters the engine
    trains: FSDP's sharded ones), and every engine-specific step of the trainer: work with the full weights
    outside the training forward, gradient accumulation, the optimizer step, checkpoint state and the
    collectives. The trainer calls these the same way for DDP, FSDP2 and DeepSpeed.

    ``make_optimizer(params)``: the optimizer over ``params`` (``optim`` section).
    """

    def __init__(self, cfg: Any, accel: Any, model: nn.Module, make_optimizer: Callable[[list[Tensor]], Any]):
        self.cfg, self.accel, self.model = cfg, accel, model
        self.rank, self.world, self.device = accel.process_index, accel.num_processes, accel.device
        d = cfg.distributed
        self.zero3 = d.strategy == "deepspeed" and d.deepspeed.zero_stage == 3
        self._holding = False
        policy = PolicyLoss(model)
        total_steps = cfg.train.steps * cfg.train.num_iterations
        if d.strategy == "fsdp" and self.device.type != "cuda":
            # accelerate would run plain data parallel with an FSDP plugin on CPU: torch's fully_shard directly
            shard_policy(policy, d.fsdp, resolve_mixed_precision(cfg), self.device)
            self.params = [p for p in policy.parameters() if p.requires_grad]
            self.optimizer = make_optimizer(self.params)
            self.scheduler = cfg.optim.build_scheduler(self.optimizer, total_steps)
            self.policy = policy
        else:
            self.params = [p for p in model.parameters() if p.requires_grad]
            optimizer = make_optimizer(self.params)
            self.scheduler = cfg.optim.build_scheduler(optimizer, total_steps)
            if d.strategy == "fsdp":
                accel.state.fsdp_plugin.transformer_cls_names_to_wrap = fsdp_block_names(model, d.fsdp.blocks)
            if self.zero3:
                register_zero3_head(policy, model)
            self.policy, self.optimizer = accel.prepare(policy, optimizer)
            if d.strategy == "fsdp":  # accelerate swapped the parameters for their sharded versions
                register_gathered(self.policy)
                self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.deepspeed = DeepSpeedSteps(self.policy) if d.strategy == "deepspeed" else None

    # -- the full weights outside the training forward ----------------------------------------------------

    def gathered(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the policy's full weights: through the FSDP root's registered forward
        method under FSDP (inside :meth:`hold`, so without collectives); under ZeRO-3 with the LM head gathered
        (the other modules gather their own in their forward); a plain call otherwise."""
        if self.zero3:
            with self.zero3_gathered(lm_head_params(self.model)):
                return fn(*args, **kwargs)
        if not is_fsdp(self.policy):
            return fn(*args, **kwargs)
        return self.policy.gathered(fn, *args, **kwargs)

    def hold(self) -> None:
        """Under FSDP, gather every unit for a rollout / reference / evaluation phase, which makes a
        rank-dependent number of forward calls (:func:`hold_full_weights`; every rank calls this at the same
        point). Idempotent until :meth:`release`."""
        if not self._holding:
            self._holding = hold_full_weights(self.policy)

    def release(self) -> None:
        """Reshard what :meth:`hold` gathered (before a training forward or a checkpoint)."""
        if self._holding:
            release_full_weights(self.policy, self.cfg.distributed.fsdp.reshard_after_forward)
            self._holding = False

    def zero3_gathered(self, params: list[Tensor]) -> Any:
        """DeepSpeed's ``GatheredParameters`` over ``params`` under ZeRO-3 (read-only), a no-op otherwise."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def push_weights(self, engine: Any) -> int:
        """The policy's weights into an inference engine (LoRA merged, FSDP shards gathered one tensor at a
        time, ZeRO-3 parameters gathered for the push); the number of tensors pushed."""
        with self.zero3_gathered(list(self.model.parameters())):
            return engine.push_weights(named_weights_for_inference(self.model))

    # -- one optimizer step ---------------------------------------------------------------------------------

    def sync(self, last: bool) -> Any:
        """The context of one micro-batch's forward and backward: gradients are reduced over the ranks on the
        step's ``last`` micro-batch only (DeepSpeed marks its boundary in :meth:`backward`)."""
        return gradient_sync(self.policy, last or self.deepspeed is not None, self.accel, self.world)

    def backward(self, loss: Tensor, last: bool) -> None:
        if self.deepspeed is not None:
            self.deepspeed.backward(loss, last)
        else:
            self.accel.backward(loss)

    def optimizer_step(self) -> tuple[float, bool]:
        """Clip (``optim.grad_clip`` > 0), step the optimizer and the LR schedule, zero the gradients; the
        global gradient norm and whether the parameters changed (False: a non-finite gradient, the step is
        skipped: parameters, optimizer state and schedule stay as they were). The DeepSpeed engine clips,
        steps and zeroes by itself."""
        if self.deepspeed is not None:
            norm = self.deepspeed.step()
            self.scheduler.step()
            return norm, True
        clip = self.cfg.optim.grad_clip
        total = self.accel.clip_grad_norm_(self.params, clip if clip > 0 else math.inf)
        # under FSDP the norm of the sharded gradients is a DTensor, reduced over the ranks by torch
        norm = float(_full(total))
        stepped = math.isfinite(norm)
        if stepped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    # -- checkpoints ----------------------------------------------------------------------------------------

    def checkpoint_state(self) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
        """The trainable weights and optimizer state to save when the engine holds them in another form (None,
        None: the model's and the optimizer's own state dicts). FSDP: full state dicts gathered on rank 0 (a
        collective); DeepSpeed: the weights, gathered one at a time under ZeRO-3, without ZeRO's partitioned
        optimizer state."""
        self.release()
        if is_fsdp(self.policy):
            return full_state(self.policy, self.optimizer)
        if self.deepspeed is None:
            return None, None
        weights = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                with self.zero3_gathered([p]):
                    weights[name] = p.detach().cpu().clone()
        return weights, {
            "deepspeed": "the ZeRO-partitioned optimizer state is not saved (docs/distributed.md)"
        }

    def checkpoint_loader(self, path: Any, saved: str, training: bool) -> tuple[Any, Callable | None]:
        """For a checkpoint written under ``distributed.strategy`` ``saved``: the optimizer to restore (None:
        none saved) and the loader of its weights and optimizer state (None: the model's own). A DeepSpeed
        checkpoint holds no optimizer state and only evaluates; an FSDP checkpoint's optimizer state is
        FQN-keyed (torch's full state dict) and loads into an FSDP run only."""
        if saved == "deepspeed" and training:
            raise RuntimeError(
                f"checkpoint {path} was written by a distributed.strategy=deepspeed run: it holds the gathered "
                "weights (export, evaluation) but not the ZeRO-partitioned optimizer state, so a run cannot resume "
                "from it exactly"
            )
        if saved != "deepspeed" and (saved == "fsdp") != (self.cfg.distributed.strategy == "fsdp"):
            raise RuntimeError(
                f"checkpoint {path} was written by a distributed.strategy={saved!r} run, whose optimizer state "
                f"has another layout; resume it with distributed.strategy={saved!r}"
            )
        optimizer = None if saved == "deepspeed" else self.optimizer
        if not is_fsdp(self.policy):
            return optimizer, None
        return optimizer, lambda weights, optim: load_full_state(self.policy, self.optimizer, weights,
                                                                 None if saved == "deepspeed" else optim)  # fmt: skip

    # -- collectives ----------------------------------------------------------------------------------------

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, items: list) -> list:
        """Every rank's ``items``, concatenated in rank order, on every rank."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks, so that all of them stop at the same step."""
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        t = self.accel.reduce(torch.tensor([float(f) for f in flags], device=self.device), reduction="sum")
        return tuple(bool(x > 0) for x in t.tolist())

    def reduce_sum(self, t: Tensor) -> Tensor:
        return t if self.world == 1 else self.accel.reduce(t, reduction="sum")


def vllm_can_run(device: torch.device) -> bool:
    """vLLM rollouts need a CUDA device and the ``vllm`` package."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("vllm") is not None


def build_vllm_engine(cfg: Any, rt: Runtime, tokenizer: Any) -> Any:
    """The colocated vLLM engine of this process (:meth:`fastgrpo.rollout.VLLMEngine.colocated_kwargs`), started
    from the policy's checkpoint directory (:func:`_engine_checkpoint`); the trainer pushes the policy's
    weights (:meth:`Runtime.push_weights`) before each generation that follows an update."""
    import os

    from .rollout import VLLMEngine

    r = cfg.rollout
    tp = r.vllm.tensor_parallel_size
    kw = VLLMEngine.colocated_kwargs(r.vllm, rank=rt.rank, world_size=rt.world, seed=cfg.train.seed,
                                     max_model_len=r.max_prompt_tokens + r.max_new_tokens)  # fmt: skip
    group = None
    if tp > 1:  # every rank creates every group (a collective), then keeps its own
        import torch.distributed as tdist

        group, _ = tdist.new_subgroups_by_enumeration(
            [list(range(i, i + tp)) for i in range(0, rt.world, tp)]
        )
    if "distributed_executor_backend" in kw:  # external_launcher runs the engine in this process
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = _engine_checkpoint(cfg, rt, tokenizer)
    return VLLMEngine(str(path), sleep_level=r.vllm.sleep_level, tp_group=group, **kw)


def _engine_checkpoint(cfg: Any, rt: Runtime, tokenizer: Any) -> Any:
    """A directory vLLM can load the policy's architecture from: the model's own checkpoint directory, else (a
    model built in code or read from GGUF) its config, tokenizer and current weights written once by the main
    process."""
    from pathlib import Path

    from .models import TINY_MODELS, _is_smollm2, local_checkpoint, smollm2_dir

    name = cfg.model.name
    if _is_smollm2(name):
        return smollm2_dir()  # the GGUF converted once to safetensors
    if name not in TINY_MODELS:
        try:
            return local_checkpoint(name)
        except FileNotFoundError:
            pass
    path = Path(cfg.train.output_dir) / ".vllm-models" / name.replace("/", "--")
    weights = dict(named_weights_for_inference(rt.model))  # every rank: gathering is a collective
    if rt.accel.is_main_process:
        from safetensors.torch import save_file

        model = rt.model
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        path.mkdir(parents=True, exist_ok=True)
        base.config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(path / "model.safetensors")
        )
    rt.accel.wait_for_everyone()
    return path

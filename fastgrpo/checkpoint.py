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
intact and never a half-written one under a final name. Older checkpoints beyond ``keep_last`` are removed,
and so are the temporary leftovers of an interrupted save (on the next save or resume).

Reading is checked: :func:`read_checkpoint` reads every file of a checkpoint before anything is applied and
raises :class:`CheckpointError` naming the file that is missing, truncated or corrupt (a disk that filled up, a
copy cut short). :func:`find_resumable` walks a run's checkpoints from the newest and resumes from the newest
intact one, logging each broken one it skips.

Why not ``accelerate``'s ``save_state`` / ``load_state`` (checked against accelerate 1.15's source). They do save
what a run needs: each prepared model's ``state_dict`` in safetensors, optimizers, schedulers and the grad
scaler, each process's RNG states (``random_states_<rank>.pkl``), and any object registered with
``register_for_checkpointing`` (the sampler and the EMA reference could be). What this module adds:

- only the trainable parameters: ``save_state`` writes the whole ``state_dict``, for a LoRA run the frozen base
  model (gigabytes) beside the adapter (megabytes), unless a ``register_save_state_pre_hook`` filters it and
  ``load_state`` is told ``strict=False``;
- atomic saves: ``save_state`` writes into the final directory file by file, and with ``total_limit`` deletes
  the oldest checkpoints before the new one is complete, so a crash mid-save can leave a half-written newest
  checkpoint and fewer intact ones; here a checkpoint is renamed into place whole and pruning comes after;
- checked loads: ``load_state`` applies each file as it reads it (a truncated optimizer file fails after the
  weights were loaded), has no fallback to an older checkpoint, and skips RNG states it cannot read with a log
  line at info level (the resumed run is then silently not exact); here every file is read and checked first,
  a broken checkpoint is named and the newest intact one is used;
- the run configuration (``config.yaml``, compared with the resumed configuration) and the world size the RNG
  states belong to (a different process count is an error, not a partial restore).

What accelerate has that this does not: sharded FSDP / DeepSpeed states (``save_state`` gathers or shards
them); here the trainable parameters are taken from the main process's module, which holds them whole under DDP.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "read_checkpoint",
    "find_resumable",
    "apply_checkpoint",
    "remove_leftovers",
    "capture_rng",
    "restore_rng",
    "trainable_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "resolve_resume",
]

_PREFIX = "step-"
_LEFTOVERS = (".tmp-", ".old-", ".latest-")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the checkpoint and the file."""


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
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``run_dir/checkpoints`` and return its directory.

    ``state`` holds everything else needed to continue (RNG states, sampler state, counters); it is stored
    with ``torch.save``. Call on the main process only. ``weights`` / ``optimizer_state``: what to write instead
    of ``model``'s trainable parameters and ``optimizer.state_dict()`` (a sharded run's full state dicts,
    gathered by :func:`fastgrpo.distributed.full_state`).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    name = f"{_PREFIX}{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_tensors(trainable_state_dict(model) if weights is None else weights, tmp / "model.safetensors")
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
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


def remove_leftovers(root: Path) -> None:
    """Delete what interrupted saves left under ``root`` (their temporary directories and pointer files)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(_LEFTOVERS):
            logger.info("removing %s, left by an interrupted save", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


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
    if path.name.startswith(_PREFIX) and path.parent.name == "checkpoints" or (path / "state.pt").is_file():
        return path  # one checkpoint (read_checkpoint says which of its files is broken, if one is)
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {path} (expected {path}/checkpoints/{_PREFIX}NNNNNN/ with "
            "model.safetensors and state.pt; runs save one every train.save_every steps and on SIGINT/SIGTERM)"
        )
    return found


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, read from disk and checked, not yet applied to a model."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    state: dict[str, Any]
    ema: dict[str, torch.Tensor] | None
    config_text: str | None

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _read(path: Path, name: str, reader: Any, required: bool = True) -> Any:
    f = path / name
    if not f.is_file():
        if required:
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        return None
    try:
        return reader(f)
    except Exception as e:  # safetensors, zip, pickle and EOF errors of a truncated or corrupt file
        raise CheckpointError(
            f"checkpoint {path}: {name} is unreadable (truncated or corrupt: {type(e).__name__}: {e})"
        ) from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check every file of the checkpoint directory ``path`` (:class:`CheckpointError` naming the
    broken file); nothing is applied."""
    path = Path(path)
    torch_load = lambda f: torch.load(f, map_location="cpu", weights_only=False)
    state = _read(path, "state.pt", torch_load)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path}: state.pt holds no step counter")
    return Checkpoint(
        path=path,
        weights=_read(path, "model.safetensors", lambda f: load_file(str(f))),
        optimizer=_read(path, "optimizer.pt", torch_load),
        scheduler=_read(path, "scheduler.pt", torch_load, required=False),
        state=state,
        ema=_read(path, "ema.safetensors", lambda f: load_file(str(f)), required=False),
        config_text=_read(path, "config.yaml", lambda f: f.read_text(), required=False),
    )


def find_resumable(path: str | Path) -> Checkpoint:
    """The checkpoint to resume from: ``path`` itself when it is a checkpoint directory, else the newest intact
    checkpoint of the run directory ``path`` (broken newer ones are skipped with a warning naming the file).

    Raises ``FileNotFoundError`` when there is no checkpoint, :class:`CheckpointError` when none is intact.
    """
    start = resolve_resume(path)
    root = start.parent
    remove_leftovers(root)
    if Path(path).resolve() == start.resolve():
        return read_checkpoint(start)  # a checkpoint named explicitly: that one or an error
    candidates = [start] + sorted(
        (p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.name < start.name), reverse=True
    )
    errors = []
    for candidate in candidates:
        try:
            ckpt = read_checkpoint(candidate)
        except CheckpointError as e:
            logger.warning("%s; trying an older checkpoint", e)
            errors.append(str(e))
            continue
        if errors:
            logger.warning("resuming from %s, the newest intact checkpoint", candidate)
        return ckpt
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(errors))


def apply_checkpoint(ckpt: Checkpoint, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: Any = None, load: Any = None) -> dict[str, Any]:  # fmt: skip
    """Load a read checkpoint's weights, optimizer and scheduler in place; return its ``state`` dict (with
    ``step``, ``path`` and, when present, ``ema_state``).

    ``load(weights, optimizer_state)``: how to load the (name-checked) weights and the optimizer state instead of
    copying into ``model``'s parameters and ``optimizer.load_state_dict`` (a sharded run:
    :func:`fastgrpo.distributed.load_full_state`)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(ckpt.weights) - set(params))
    if unknown:
        raise ValueError(
            f"checkpoint {ckpt.path}: {len(unknown)} saved parameters are not in the model (first: {unknown[0]!r}); "
            "was it written by a run with another model or LoRA setting?"
        )
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in ckpt.weights)
    if missing:
        raise ValueError(
            f"checkpoint {ckpt.path}: trainable parameter {missing[0]!r} is missing ({len(missing)} in all)"
        )
    if load is not None:
        load(ckpt.weights, ckpt.optimizer)
    else:
        with torch.no_grad():
            for name, tensor in ckpt.weights.items():
                params[name].copy_(tensor.to(params[name].dtype))
        if optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
    if scheduler is not None and ckpt.scheduler is not None:
        scheduler.load_state_dict(ckpt.scheduler)
    state = dict(ckpt.state)
    if ckpt.ema is not None:
        state["ema_state"] = ckpt.ema
    state["path"] = ckpt.path
    return state


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """:func:`read_checkpoint` of ``path`` (a checkpoint, or a run directory's newest) + :func:`apply_checkpoint`."""
    return apply_checkpoint(read_checkpoint(resolve_resume(path)), model=model, optimizer=optimizer,
                            scheduler=scheduler)  # fmt: skip

"""Input checks shared by the public ops. Every failure is a ``ValueError`` naming the argument and shapes."""

from __future__ import annotations

import torch
from torch import Tensor


def shape(t: Tensor | None) -> str:
    return "None" if t is None else f"{tuple(t.shape)}"


def check_finite(name: str, t: Tensor | None) -> None:
    """NaN or inf in an input is an error, never a silent NaN loss."""
    if t is None or not t.is_floating_point():
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} {shape(t)} contains {bad} NaN/inf value(s)")


def check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} {shape(t)} must be a floating-point tensor, got {t.dtype}")


def check_targets(targets: Tensor, vocab: int, valid: Tensor | None = None) -> None:
    """``targets`` are int64 (or any integer) token ids in ``[0, V)`` wherever ``valid`` is true."""
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets {shape(targets)} must be an integer tensor, got {targets.dtype}")
    t = targets if valid is None else targets[valid]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(
            f"targets {shape(targets)} must lie in [0, V={vocab}) on valid tokens; "
            f"found min {int(t.min())}, max {int(t.max())}"
        )

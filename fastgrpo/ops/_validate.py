"""Input checks shared by the public ops (and the advantage estimators). Every failure is a ``ValueError``
naming the argument and its shape."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The advantage estimators and scales (fastgrpo.advantages is their spec; the C++ op implements them too)
ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
SCALES = ("group", "batch", "none")


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def shape(t: Tensor | None) -> str:
    """``[2, 3]`` (``None`` for None): how every message of the library writes a tensor's shape."""
    return "None" if t is None else f"[{', '.join(str(s) for s in t.shape)}]"


def check_finite(name: str, t: Tensor | None) -> None:
    """NaN or inf in an input is an error, never a silent NaN loss."""
    if t is None or not t.is_floating_point():
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} {shape(t)} contains {bad} NaN/inf value(s)")


def check_logprobs(name: str, t: Tensor | None) -> None:
    """Finite log-probabilities, so ``<= 0`` (a log-softmax never exceeds 0 in floating point either)."""
    check_finite(name, t)
    if t is not None and t.numel() and bool((t > 0).any()):
        raise ValueError(
            f"{name} {shape(t)} must hold log-probabilities (<= 0); found {int((t > 0).sum())} positive "
            f"value(s), max {float(t.max()):.4g}"
        )


def check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} {shape(t)} must be a floating-point tensor, got {t.dtype}")


def check_targets(targets: Tensor, vocab: int) -> None:
    """``targets`` are integer token ids in ``[0, V)``."""
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets {shape(targets)} must be an integer tensor, got {targets.dtype}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"targets {shape(targets)} must lie in [0, V={vocab}) on valid tokens; "
            f"found min {int(targets.min())}, max {int(targets.max())}"
        )


def check_chunk_size(chunk_size: object) -> None:
    """``chunk_size``: tokens per logits block, a positive int, or None for the default."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype group statistics are computed in: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def is_finite_real(x: object) -> bool:
    """A finite int or float (not a bool): what every numeric hyper-parameter must be."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_head_outputs(lse: Tensor, logp: Tensor, entropy: Tensor, inputs: dict[str, Tensor | None]) -> None:
    """Raise when a log-partition, log-prob or entropy is NaN/inf, naming the input to blame.

    The O(N) results are checked, never the ``[N, D]`` / ``[N, V]`` inputs themselves: a NaN or inf anywhere in
    a row of ``hidden`` / ``logits`` or anywhere in ``weight`` / ``bias`` reaches every affected row's ``lse`` or
    entropy (an ``inf`` logit makes ``lse`` inf; a ``-inf`` one makes the entropy ``0 * -inf``). Only on that
    error path are the ``inputs`` (name -> tensor, in the order to blame) scanned to say which one is bad; when
    all are finite, the logits themselves overflowed the compute dtype.
    """
    ok = torch.isfinite(lse).all() & torch.isfinite(logp).all() & torch.isfinite(entropy).all()
    if bool(ok):
        return
    for name, t in inputs.items():
        check_finite(name, t)
    raise ValueError(
        f"the logits of {', '.join(f'{k} {shape(t)}' for k, t in inputs.items() if t is not None)} overflow "
        "(non-finite log-partition although every input is finite): scale them down or compute in float32"
    )

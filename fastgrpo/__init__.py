"""fastgrpo: fused kernels, drop-in losses and a lean trainer for group-relative RL on language models."""

from __future__ import annotations

__version__ = "0.1.0"

from .losses import GRPOLoss
from .ops import (
    IMPORTANCE_LEVELS,
    LOSS_TYPES,
    GRPOLossOutput,
    LossConfig,
    available_backends,
    grpo_loss,
    grpo_loss_from_logits,
    grpo_loss_ref,
    linear_logprobs,
    linear_logprobs_ref,
)

__all__ = [
    "IMPORTANCE_LEVELS",
    "LOSS_TYPES",
    "GRPOLoss",
    "GRPOLossOutput",
    "LossConfig",
    "available_backends",
    "grpo_loss",
    "grpo_loss_from_logits",
    "grpo_loss_ref",
    "linear_logprobs",
    "linear_logprobs_ref",
    "__version__",
]


def __getattr__(name: str):
    # group_advantages lives in the advantages module (middle layer); imported on first use
    if name == "group_advantages":
        from .advantages import group_advantages

        return group_advantages
    raise AttributeError(f"module 'fastgrpo' has no attribute {name!r}")

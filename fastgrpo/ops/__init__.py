"""The op layer: each op's math, plain-torch reference, autograd Function and public function."""

from ._dispatch import available_backends
from .grpo_loss import (
    LOSS_TYPES,
    GRPOLossOutput,
    LossConfig,
    grpo_loss,
    grpo_loss_from_logits,
    grpo_loss_ref,
)
from .linear_logprobs import linear_logprobs, linear_logprobs_ref

__all__ = [
    "LOSS_TYPES",
    "GRPOLossOutput",
    "LossConfig",
    "available_backends",
    "grpo_loss",
    "grpo_loss_from_logits",
    "grpo_loss_ref",
    "linear_logprobs",
    "linear_logprobs_ref",
]

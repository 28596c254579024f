"""The op layer: each op's math, plain-torch reference, autograd Function and public function.

Shape vocabulary (DESIGN.md): ``B`` sequences, ``T`` padded length, ``D`` hidden size, ``V`` vocabulary, and ``N``
the tokens an op scores: the rows of the packed layout (``hidden [N, D]``); in the loss, the loss tokens (the
completion tokens, of which the mask keeps the valid ones).
"""

from ._dispatch import available_backends
from .grpo_loss import (
    IMPORTANCE_LEVELS,
    LOSS_TYPES,
    GRPOLossOutput,
    LossConfig,
    accumulation_weight,
    grpo_loss,
    grpo_loss_from_logits,
    grpo_loss_ref,
)
from .linear_logprobs import linear_logprobs, linear_logprobs_ref

__all__ = [
    "IMPORTANCE_LEVELS",
    "LOSS_TYPES",
    "GRPOLossOutput",
    "LossConfig",
    "accumulation_weight",
    "available_backends",
    "grpo_loss",
    "grpo_loss_from_logits",
    "grpo_loss_ref",
    "linear_logprobs",
    "linear_logprobs_ref",
]

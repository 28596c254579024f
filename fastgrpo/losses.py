"""Drop-in loss modules. They store hyper-parameters only; the math lives in ``fastgrpo.ops``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import Tensor, nn

from .ops.grpo_loss import GRPOLossOutput, LossConfig, grpo_loss, grpo_loss_from_logits

__all__ = ["GRPOLoss"]


class GRPOLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`fastgrpo.grpo_loss`.

    ``GRPOLoss(loss_type="grpo", beta=0.04)`` or ``GRPOLoss(LossConfig(loss_type="grpo", beta=0.04))`` (the
    fields of :class:`~fastgrpo.LossConfig` as keywords, or the config, not both), then
    ``loss_fn(hidden, lm_head.weight, targets, advantages, mask=mask, ...)``. ``temperature`` and
    ``max_completion_length`` are call defaults; per-batch tensors (mask, cu_seqlens, old/ref log-probs, blend,
    ``num_items_in_batch``, bias) are call arguments.
    """

    def __init__(
        self,
        config: LossConfig | None = None,
        *,
        temperature: float = 1.0,
        max_completion_length: int | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        self.config = LossConfig.from_fields(config, **fields)
        self.defaults = {"temperature": temperature, "max_completion_length": max_completion_length}

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, advantages, **batch) -> GRPOLossOutput:
        return grpo_loss(
            hidden, weight, targets, advantages, config=self.config, **{**self.defaults, **batch}
        )

    def from_logits(self, logits: Tensor, targets: Tensor, advantages, **batch) -> GRPOLossOutput:
        return grpo_loss_from_logits(
            logits, targets, advantages, config=self.config, **{**self.defaults, **batch}
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())

"""Drop-in loss modules. They store hyper-parameters only; the math lives in ``fastgrpo.ops``."""

from __future__ import annotations

from dataclasses import asdict

from torch import Tensor, nn

from .ops.grpo_loss import GRPOLossOutput, LossConfig, grpo_loss, grpo_loss_from_logits

__all__ = ["GRPOLoss"]


class GRPOLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`fastgrpo.grpo_loss`.

    ``GRPOLoss(loss_type="grpo", beta=0.04)(hidden, lm_head.weight, targets, advantages, mask=mask, ...)``.
    Hyper-parameters are fixed at construction; per-batch tensors (mask, cu_seqlens, old/ref log-probs, blend,
    ``num_items_in_batch``) are call arguments.
    """

    def __init__(
        self,
        loss_type: str = "dapo",
        importance_level: str = "token",
        eps_low: float = 0.2,
        eps_high: float | None = None,
        delta: float | None = None,
        dual_clip: float | None = None,
        beta: float = 0.0,
        entropy_coef: float = 0.0,
        kl_bias_correction: bool = False,
        temperature: float = 1.0,
        max_completion_length: int | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.config = LossConfig.from_args(locals())
        self.temperature = temperature
        self.max_completion_length = max_completion_length
        self.chunk_size = chunk_size
        self.backend = backend

    def _kwargs(self) -> dict:
        kw = asdict(self.config)
        kw.pop("sapo_tau_pos"), kw.pop("sapo_tau_neg")
        return dict(
            kw,
            temperature=self.temperature,
            max_completion_length=self.max_completion_length,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        advantages,
        *,
        bias: Tensor | None = None,
        **batch,
    ) -> GRPOLossOutput:
        return grpo_loss(hidden, weight, targets, advantages, bias=bias, **self._kwargs(), **batch)

    def from_logits(self, logits: Tensor, targets: Tensor, advantages, **batch) -> GRPOLossOutput:
        return grpo_loss_from_logits(logits, targets, advantages, **self._kwargs(), **batch)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())

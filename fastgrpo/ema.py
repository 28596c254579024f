"""EMA reference model: a slowly moving copy of the policy (GRPO-CARE's consistency judge).

Every ``update_every`` optimizer steps (count them with :meth:`EMAReference.step`, called right after
``optimizer.step()``)::

    θ_ref <- decay * θ_ref + (1 - decay) * θ          decay = 0.995, update_every = 10 (GRPO-CARE)

initialised from the policy's weights at construction. Two storage modes:

- **full copy** (default for a fully trainable model): a frozen deep copy of the policy in ``.model``;
  call ``ema(input_ids=...)`` (or ``ema.model``) under ``no_grad`` to score with the reference. Buffers are
  copied, not averaged.
- **trainable only** (default when some parameters are frozen, e.g. a PEFT/LoRA model): only the trainable
  parameters are shadowed, which costs adapter-sized memory. Score with the reference by temporarily swapping
  the shadow weights into the policy: ``with ema.swapped_in(policy): ref_logits = policy(...)``. With LoRA the
  EMA of the factors ``A`` and ``B`` is not the EMA of the product ``BA``; for small steps (decay near 1) the
  difference is second order.

TRL's ``sync_ref_model`` is the same update with ``alpha = 1 - decay`` (TR-DPO: 0.6 every 512 steps).
Keep the shadow in fp32: with ``decay = 0.995`` a bf16 shadow loses most updates to rounding.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMAReference"]


class EMAReference:
    """An exponential moving average of a policy's weights (see the module docstring).

    Args:
        policy: the model being trained.
        decay: weight of the old reference in each update (0.995).
        update_every: optimizer steps between updates (10).
        trainable_only: shadow only ``requires_grad`` parameters; None (default) = True iff the policy has
            frozen parameters.
        dtype: storage dtype of the shadow (default: the policy's own); prefer fp32.
        device: storage device of the shadow (e.g. ``"cpu"`` to offload); default: the policy's.

    API: :meth:`step` (count an optimizer step, update when due; returns True when it updated),
    :meth:`update` (update now), ``ema(...)`` (full mode: the reference's forward, no grad),
    :meth:`swapped_in` (context manager, any mode), :meth:`copy_to` (write the shadow into a model),
    :meth:`state_dict` / :meth:`load_state_dict` (shadow tensors and the step counter).
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        decay: float = 0.995,
        update_every: int = 10,
        trainable_only: bool | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if update_every <= 0:
            raise ValueError(f"update_every must be a positive int, got {update_every}")
        params = dict(policy.named_parameters())
        if not params:
            raise ValueError("policy has no parameters")
        if trainable_only is None:
            trainable_only = any(not p.requires_grad for p in params.values())
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.trainable_only = bool(trainable_only)
        self.num_steps = 0
        self.num_updates = 0
        self._names: list[str]
        if self.trainable_only:
            self._names = [n for n, p in params.items() if p.requires_grad]
            if not self._names:
                raise ValueError("trainable_only=True but the policy has no trainable parameter")
            self.model: nn.Module | None = None
            self._shadow: dict[str, Tensor] = {
                n: params[n].detach().to(device=device, dtype=dtype, copy=True) for n in self._names
            }
        else:
            self.model = copy.deepcopy(policy)
            self.model.requires_grad_(False)
            self.model.eval()
            if dtype is not None or device is not None:
                self.model.to(device=device, dtype=dtype)
            self._names = list(params)
            self._shadow = dict(self.model.named_parameters())

    # -- the shadow -------------------------------------------------------------------------------------

    @property
    def shadow(self) -> Mapping[str, Tensor]:
        """Parameter name -> reference tensor (the live tensors; do not modify)."""
        return self._shadow

    def _policy_params(self, policy: nn.Module) -> dict[str, Tensor]:
        params = dict(policy.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise ValueError(f"policy lacks parameters the reference holds: {missing[:5]}")
        for n in self._names:
            if params[n].shape != self._shadow[n].shape:
                raise ValueError(
                    f"parameter {n!r} has shape {list(params[n].shape)} in the policy but "
                    f"{list(self._shadow[n].shape)} in the reference"
                )
        return params

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """``θ_ref <- decay θ_ref + (1 - decay) θ`` for every shadowed parameter, now."""
        params = self._policy_params(policy)
        for n in self._names:
            ref = self._shadow[n]
            ref.lerp_(params[n].detach().to(device=ref.device, dtype=ref.dtype), 1.0 - self.decay)
        if self.model is not None:
            ref_buffers = dict(self.model.named_buffers())
            for n, b in policy.named_buffers():
                if n in ref_buffers:
                    ref_buffers[n].copy_(b)
        self.num_updates += 1

    def step(self, policy: nn.Module) -> bool:
        """Count one optimizer step (call after ``optimizer.step()``); update every ``update_every`` steps."""
        self.num_steps += 1
        if self.num_steps % self.update_every == 0:
            self.update(policy)
            return True
        return False

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the reference weights into ``model``'s matching parameters."""
        params = self._policy_params(model)
        for n in self._names:
            params[n].copy_(self._shadow[n])

    @contextlib.contextmanager
    def swapped_in(self, policy: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the reference weights into ``policy`` (restored on exit, even on error)."""
        params = self._policy_params(policy)
        saved = {n: params[n].detach().clone() for n in self._names}
        try:
            self.copy_to(policy)
            yield policy
        finally:
            with torch.no_grad():
                for n in self._names:
                    params[n].copy_(saved[n])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The reference model's forward under ``no_grad`` (full-copy mode only)."""
        if self.model is None:
            raise RuntimeError(
                "this EMAReference holds only the trainable parameters; score with "
                "`with ema.swapped_in(policy): policy(...)`"
            )
        with torch.no_grad():
            return self.model(*args, **kwargs)

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "update_every", "num_steps", "num_updates", "trainable_only", "shadow": {name: tensor}}``."""
        return {
            "decay": self.decay,
            "update_every": self.update_every,
            "num_steps": self.num_steps,
            "num_updates": self.num_updates,
            "trainable_only": self.trainable_only,
            "shadow": {n: t.detach().clone() for n, t in self._shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the shadowed parameter names must match."""
        shadow = state["shadow"]
        if set(shadow) != set(self._names):
            extra, missing = sorted(set(shadow) - set(self._names)), sorted(set(self._names) - set(shadow))
            raise ValueError(f"EMA state does not match: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, t in shadow.items():
            if t.shape != self._shadow[n].shape:
                raise ValueError(
                    f"EMA state {n!r} has shape {list(t.shape)}, expected {list(self._shadow[n].shape)}"
                )
            self._shadow[n].copy_(t)
        self.decay = float(state["decay"])
        self.update_every = int(state["update_every"])
        self.num_steps = int(state["num_steps"])
        self.num_updates = int(state.get("num_updates", 0))

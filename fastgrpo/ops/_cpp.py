"""Python face of the C++/CUDA extension ``fastgrpo._C`` (sources and build notes in ``csrc/``).

The extension registers ``torch.ops.fastgrpo.*`` (CPU kernels always, CUDA kernels when built with a CUDA
torch); this module loads it through :func:`fastgrpo._backends.load_ext` (the only importer of ``_C``),
registers the fake (meta) implementations that let ``torch.compile`` trace the ops, and exposes:

- :func:`get_epilogue` — the ``cpp`` / ``cuda`` :class:`~fastgrpo.ops.epilogue.Epilogue` (the contract is in
  ``fastgrpo/ops/epilogue.py``); one set of ops serves both names and dispatches on the block's device,
  ``cuda`` additionally requires the CUDA kernels to be compiled in.
- :func:`group_advantages` — group statistics, the three estimators and scales, the GRPO-CARE bonus and COPO's
  global advantage / blend weight in one call (``fastgrpo.advantages.group_advantages``'s ``cpp`` / ``cuda``
  backends).

Op schemas (``csrc/bindings.cpp``)::

    fastgrpo::lse_logp_entropy(Tensor z, Tensor targets, float inv_temp) -> (Tensor lse, Tensor logp, Tensor entropy)
    fastgrpo::logits_grad_(Tensor(a!) z, Tensor targets, Tensor lse, Tensor entropy, Tensor c_logp,
                           Tensor? c_ent, float inv_temp) -> ()
    fastgrpo::group_advantages(Tensor rewards, Tensor index, int num_groups, str estimator, str scale, float eps,
                               Tensor? care_acc, Tensor? care_confidence, float care_coefficient, float care_margin,
                               float care_acc_threshold, Tensor? copo_entropy, float copo_k, float copo_b,
                               float copo_eps, bool copo_entropy_coef)
        -> (Tensor advantages, Tensor bonus, Tensor mean, Tensor std, Tensor global_advantages, Tensor blend_weight)
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from fastgrpo._backends import BackendUnavailable, load_ext
from fastgrpo.ops._validate import ESTIMATORS, SCALES, check_choice, compute_dtype
from fastgrpo.ops.epilogue import Epilogue

__all__ = [
    "GroupAdvantages",
    "build_info",
    "get_epilogue",
    "group_advantages",
    "lse_logp_entropy",
    "logits_grad_",
    "set_cpu_kernel",
]


@functools.cache
def _ext() -> ModuleType:
    """Load the extension (raises BackendUnavailable with the reason) and register the fake kernels once."""
    mod = load_ext()
    _register_fakes()
    return mod


def _loaded() -> None:
    # Under torch.compile the ops were loaded when the epilogue was built, before tracing: dynamo would trace
    # through the cache of `_ext` (and warn about it) for nothing.
    if not torch.compiler.is_compiling():
        _ext()


def _register_fakes() -> None:
    @torch.library.register_fake("fastgrpo::lse_logp_entropy")
    def _(z: Tensor, targets: Tensor, inv_temp: float) -> tuple[Tensor, Tensor, Tensor]:
        c = z.shape[0]
        return tuple(z.new_empty((c,), dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("fastgrpo::logits_grad_")
    def _(z, targets, lse, entropy, c_logp, c_ent, inv_temp) -> None:
        return None

    @torch.library.register_fake("fastgrpo::group_advantages")
    def _(
        rewards,
        index,
        num_groups,
        estimator,
        scale,
        eps,
        care_acc,
        care_confidence,
        care_coefficient,
        care_margin,
        care_acc_threshold,
        copo_entropy,
        copo_k,
        copo_b,
        copo_eps,
        copo_entropy_coef,
    ):
        b = rewards.shape[0]
        nb = b if care_acc is not None else 0
        ng = num_groups if copo_entropy is not None else 0
        return (
            rewards.new_empty((b,)),
            rewards.new_empty((nb,)),
            rewards.new_empty((num_groups,)),
            rewards.new_empty((num_groups,)),
            rewards.new_empty((ng,)),
            rewards.new_empty((ng,)),
        )


def _register_if_built() -> None:
    # The extension names this module as the home of its fake kernels (set_python_module), so importing it must
    # register them when the extension is there; without it, importing stays cheap and silent.
    try:
        _ext()
    except BackendUnavailable:
        pass


def build_info() -> dict:
    """``{"cuda": CUDA kernels compiled in, "avx2_built": AVX2 CPU kernels compiled in, "cpu_kernel": in use}``."""
    return dict(_ext().build_info())


def set_cpu_kernel(name: str) -> None:
    """Select the CPU epilogue kernels: ``"auto"`` (default), ``"avx2"`` or ``"default"`` (tests, benchmarks)."""
    _ext().set_cpu_kernel(name)


# ----------------------------------------------------------------------------------------------------------
# epilogue
# ----------------------------------------------------------------------------------------------------------


def lse_logp_entropy(z: Tensor, targets: Tensor, inv_temp: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(lse, logp, entropy)`` fp32 ``[C]`` of the ``[C, V]`` block ``z`` (fp32/bf16/fp16, contiguous)."""
    _loaded()
    return torch.ops.fastgrpo.lse_logp_entropy.default(z, targets, float(inv_temp))


def logits_grad_(
    z: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    c_logp: Tensor,
    c_ent: Tensor | None,
    inv_temp: float,
) -> Tensor:
    """Overwrite ``z`` with ``dL/dz`` (see ``fastgrpo.ops.epilogue``) and return it."""
    _loaded()
    torch.ops.fastgrpo.logits_grad_.default(z, targets, lse, entropy, c_logp, c_ent, float(inv_temp))
    return z


def get_epilogue(name: str) -> Epilogue:
    """The ``"cpp"`` or ``"cuda"`` epilogue; raises :class:`BackendUnavailable` with the reason when it cannot run."""
    if name not in ("cpp", "cuda"):
        raise ValueError(f"fastgrpo.ops._cpp serves the 'cpp' and 'cuda' epilogues, got {name!r}")
    info = build_info()  # raises when the extension is missing
    if name == "cuda" and not info["cuda"]:
        raise BackendUnavailable(
            "the 'cuda' epilogue needs fastgrpo._C built with its CUDA kernels, and this build has none "
            f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}). Rebuild on a machine with a "
            "CUDA torch and the CUDA toolkit: `pip install --no-build-isolation -e .` (CUDA_HOME set, "
            "FASTGRPO_NO_CUDA unset), or use backend='torch' / 'triton'."
        )
    return Epilogue(name, lse_logp_entropy, logits_grad_)


# ----------------------------------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------------------------------


class GroupAdvantages(NamedTuple):
    """Outputs of :func:`group_advantages` (dtype: fp64 for fp64 rewards, fp32 otherwise)."""

    advantages: Tensor  # [B]
    bonus: Tensor  # [B] GRPO-CARE bonus (already added to the rewards the advantages use); [0] without CARE
    mean: Tensor  # [P] group mean of the (bonus-augmented) rewards
    std: Tensor  # [P] unbiased group std (0 for size-1 groups)
    global_advantages: Tensor  # [P] COPO global advantage; [0] without COPO
    blend_weight: Tensor  # [P] COPO sigmoid(k (H - b)), weight of the local loss; [0] without COPO


def group_advantages(
    rewards: Tensor,
    index: Tensor,
    num_groups: int,
    *,
    scale: str = "group",
    estimator: str = "grpo",
    eps: float = 1e-4,
    care_acc: Tensor | None = None,
    care_confidence: Tensor | None = None,
    care_coefficient: float = 0.5,
    care_margin: float | None = 0.0,
    care_acc_threshold: float = 0.1,
    copo_entropy: Tensor | None = None,
    copo_k: float = 5.0,
    copo_b: float = 1.0,
    copo_eps: float = 1e-6,
    copo_entropy_coef: bool = False,
) -> GroupAdvantages:
    """Group-relative advantages and the CARE / COPO group terms in one extension call (CPU or CUDA).

    Semantics of ``fastgrpo.advantages`` (the spec): ``rewards [B]``, ``index`` int64 ``[B]`` in ``0..P-1`` with
    every group non-empty (``group_index``), ``num_groups = P`` (the number of prompts).

    - With ``care_acc`` and ``care_confidence`` (``[B]``): ``bonus = care_bonus(acc, confidence, ...)`` and the
      advantages are those of ``rewards + bonus`` (pass ``rewards = acc + fmt`` for GRPO-CARE's ``R``).
    - With ``copo_entropy`` (``[P]``, answer entropy in bits): ``global_advantages =
      copo_global_advantages(copo_global_reward(rewards', ..., use_entropy_coef=copo_entropy_coef), eps=copo_eps)``
      and ``blend_weight = copo_blend_weight(entropy, k=copo_k, b=copo_b)``, ``rewards'`` the rewards used above.

    Inputs are converted to fp64 (fp64 rewards) or fp32. The CPU op raises on NaN/inf and on bad ``index``; the
    CUDA op does not synchronise to check (validate first, as ``fastgrpo.advantages.group_advantages`` does).
    """
    _ext()
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("scale", scale, SCALES)
    if (care_acc is None) != (care_confidence is None):
        raise ValueError("give both care_acc and care_confidence (GRPO-CARE) or neither")
    dtype = compute_dtype(rewards)
    r = rewards.to(dtype)
    acc = None if care_acc is None else care_acc.to(device=r.device, dtype=dtype)
    conf = None if care_confidence is None else care_confidence.to(device=r.device, dtype=dtype)
    ent = None if copo_entropy is None else copo_entropy.to(device=r.device, dtype=dtype)
    margin = 0.0 if care_margin is None else float(care_margin)
    for name, v in (("eps", eps), ("copo_eps", copo_eps)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
    out = torch.ops.fastgrpo.group_advantages.default(
        r,
        index,
        int(num_groups),
        estimator,
        scale,
        float(eps),
        acc,
        conf,
        float(care_coefficient),
        margin,
        float(care_acc_threshold),
        ent,
        float(copo_k),
        float(copo_b),
        float(copo_eps),
        bool(copo_entropy_coef),
    )
    return GroupAdvantages(*out)


_register_if_built()

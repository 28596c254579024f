"""Benchmark: group-relative advantages, ``fastgrpo.group_advantages``, against TRL's formulas.

Implementations (``rewards [B]``, ``B = prompts · G`` completions, ``G`` consecutive completions per prompt):

* ``fastgrpo``: ``group_advantages(rewards, group_size=G, scale=..., estimator=...)``; ``fastgrpo-ids`` the same
  through ``group_ids`` (ragged groups path);
* ``naive``: TRL 1.16's ``GRPOTrainer`` formulas — ``view(-1, G)`` mean / unbiased std, ``repeat_interleave``,
  ``(r - mean) / (std + 1e-4)`` (estimator ``grpo`` only).

A memory-bound op: the work formula is bytes, one fp32 read of the rewards and one fp32 write of the
advantages (``8·B`` bytes), printed as GB/s; ``copy_floor`` times ``rewards.clone()`` (the same bytes moved).
Forward only (advantages carry no gradient).
"""

from __future__ import annotations

import sys

import torch

from bench._harness import Case, Impl, Setup, make_generator, peer_import

OP = "advantages"
MODES = ("fwd",)
MEM_MODES = ()
FLOOR_NAME = "copy_floor"


def cases(device: str, smoke: bool) -> list[Case]:
    out = [
        Case(f"check-{scale}", {"P": 37, "G": 8}, "float32", device, {"scale": scale}, seed=i, timed=False)
        for i, scale in enumerate(("group", "batch", "none"))
    ]
    out.append(Case("check-G1", {"P": 16, "G": 1}, "float32", device, {"scale": "group"}, timed=False))
    if smoke:
        out.append(Case("smoke", {"P": 64, "G": 8}, "float32", device, {"scale": "group"}))
    else:
        for p, g in ((64, 8), (1024, 16), (16384, 64)):
            out.append(Case(f"{device}", {"P": p, "G": g}, "float32", device, {"scale": "group"}))
    return out


def work(case: Case, mode: str) -> tuple[float, str]:
    return 8.0 * case.shape["P"] * case.shape["G"], "GB/s"


def setup(case: Case, only: set[str] | None = None, upcast: bool = False) -> Setup:
    P, G = case.shape["P"], case.shape["G"]
    dev = torch.device(case.device)
    gen = make_generator(case)
    # outcome-style rewards: 0/1 correctness plus a small format term; some groups all-equal (zero std)
    r = torch.bernoulli(torch.full((P, G), 0.5, device=dev), generator=gen)
    r = r + 0.5 * torch.bernoulli(torch.full((P, G), 0.8, device=dev), generator=gen)
    r[: max(1, P // 8)] = 1.0
    rewards = r.reshape(-1)
    group_ids = torch.arange(P, device=dev).repeat_interleave(G)
    scale = case.params.get("scale", "group")
    estimator = case.params.get("estimator", "grpo")
    impls: dict[str, Impl] = {}
    skipped: dict[str, str] = {}
    want = lambda name: only is None or name in only
    named = lambda a: {"advantages": a}

    adv_mod = peer_import("fastgrpo.advantages", skipped, "fastgrpo")
    if adv_mod is not None:
        fn = adv_mod.group_advantages
        if want("fastgrpo"):
            impls["fastgrpo"] = Impl(
                lambda: fn(rewards, group_size=G, scale=scale, estimator=estimator), None, named
            )
        if want("fastgrpo-ids"):
            impls["fastgrpo-ids"] = Impl(
                lambda: fn(rewards, group_ids=group_ids, scale=scale, estimator=estimator), None, named
            )

    if want("naive") and estimator == "grpo":

        def naive():
            grouped = rewards.view(-1, G)
            mean = grouped.mean(dim=1).repeat_interleave(G)
            if scale == "group":
                std = (
                    grouped.std(dim=1).repeat_interleave(G) if G > 1 else torch.full_like(rewards, torch.nan)
                )
            else:
                std = rewards.std().expand_as(rewards)
            adv = rewards - mean
            if scale != "none":
                adv = adv / (std + 1e-4)
            return torch.nan_to_num(adv, nan=0.0)  # TRL: a group of one has NaN std -> advantage 0

        impls["naive"] = Impl(naive, None, named)

    floor = {"fwd": lambda: rewards.clone()} if case.timed and only is None else None
    reference = "fastgrpo" if "fastgrpo" in impls or only is not None else "naive"
    return Setup({"rewards": rewards}, [], impls, skipped, floor, reference)


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run_main

    return run_main(["--op", OP, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

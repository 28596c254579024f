"""Reward schemes of the GRPO family, usable on plain strings and tensors without the trainer.

- :mod:`.outcome` — answer extraction and equivalence, format reward, DAPO overlong shaping;
- :mod:`.rewardmap` — RewardMap's difficulty-weighted reward with the route-planning detail score;
- :mod:`.care` — GRPO-CARE answer span, EMA-reference confidence and consistency bonus;
- :mod:`.copo` — COPO answer entropy, global advantage and blend weight;
- :mod:`.mmr1` — MMR1 variance promotion score (outcome variance + trajectory diversity);
- :mod:`.prm` — GroundedPRM hybrid rollout reward, step-level advantages, step verifier, greedy search;
- :mod:`.registry` — every scheme by name with typed parameters (``build_scheme({"name": ..., "params": ...})``);
- :mod:`.terms` — a run's weighted reward terms (registry schemes, registered functions, ``python:`` imports);
- :mod:`.shaping` — the advantage pipeline the trainer calls once per step, the schemes as its stages.

Samplers (curricula, variance-aware sampling, DAPO dynamic filtering) are in :mod:`fastgrpo.sampling`, the
EMA reference in :mod:`fastgrpo.ema`, group-relative advantages in :mod:`fastgrpo.advantages`.
"""

from __future__ import annotations

from .care import CareRewards, answer_confidence, answer_span_mask, care_rewards
from .copo import CopoAdvantages, answer_entropy_bits, answer_labels, canonicalize_answer, copo_advantages
from .mmr1 import (
    distinct_n,
    minmax_normalize,
    outcome_variance,
    self_bleu,
    strip_padding,
    trajectory_diversity,
    variance_promotion_score,
)
from .outcome import (
    OutcomeScores,
    accuracy_reward,
    answers_equivalent,
    dapo_overlong_penalty,
    dapo_reward,
    extract_answer,
    extract_boxed,
    format_reward,
    normalize_answer,
    outcome_rewards,
    parse_number,
)
from .prm import (
    ArithmeticStepVerifier,
    GreedySearchResult,
    StepCandidate,
    StepVerifier,
    backpropagate,
    generative_prm_scorer,
    grounded_hybrid_reward,
    hf_step_proposer,
    hybrid_rollout_reward,
    prm_greedy_search,
    prm_score_from_top_logprobs,
    split_steps,
    step_index,
    step_token_advantages,
)
from .registry import Scheme, build_scheme, get_scheme, list_schemes, register_scheme
from .rewardmap import (
    RewardMapSample,
    RouteSection,
    parse_route_sections,
    planning_detail_reward,
    rewardmap_reward,
)
from .shaping import AdvantagePipeline, Advantages, RolloutGroups
from .terms import RewardTerms, register_reward

__all__ = [
    "AdvantagePipeline",
    "Advantages",
    "ArithmeticStepVerifier",
    "RewardTerms",
    "RolloutGroups",
    "register_reward",
    "CareRewards",
    "CopoAdvantages",
    "GreedySearchResult",
    "StepCandidate",
    "OutcomeScores",
    "RewardMapSample",
    "RouteSection",
    "Scheme",
    "StepVerifier",
    "accuracy_reward",
    "answer_confidence",
    "answer_entropy_bits",
    "answer_labels",
    "answer_span_mask",
    "answers_equivalent",
    "backpropagate",
    "build_scheme",
    "canonicalize_answer",
    "care_rewards",
    "copo_advantages",
    "dapo_overlong_penalty",
    "dapo_reward",
    "distinct_n",
    "extract_answer",
    "extract_boxed",
    "format_reward",
    "generative_prm_scorer",
    "grounded_hybrid_reward",
    "get_scheme",
    "hf_step_proposer",
    "hybrid_rollout_reward",
    "list_schemes",
    "minmax_normalize",
    "normalize_answer",
    "outcome_rewards",
    "outcome_variance",
    "parse_number",
    "parse_route_sections",
    "planning_detail_reward",
    "prm_greedy_search",
    "prm_score_from_top_logprobs",
    "register_scheme",
    "rewardmap_reward",
    "self_bleu",
    "split_steps",
    "step_index",
    "step_token_advantages",
    "strip_padding",
    "trajectory_diversity",
    "variance_promotion_score",
]

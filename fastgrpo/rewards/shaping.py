"""From a step's scored rollouts to the advantages the loss takes: one pipeline, the schemes as its stages.

The trainer calls one object, :class:`AdvantagePipeline`, once per step::

    advantages = pipeline(groups, rewards, ref_logp=...)      # identical on every rank

    rewards  <- each stage's shape_rewards      (GRPO-CARE: + consistency bonus)
    A        <- the group-relative estimator    (grpo / dr_grpo / rloo / reinforce_pp of the registry)
    A        <- each stage's shape_advantages   (COPO: global/local pair + blend; GroundedPRM: token advantages)

A scheme is a :class:`Stage` with one or two of those methods and a ``needs_reference`` flag (GRPO-CARE scores
its answer confidence under the reference model, so the trainer then hands it the reference log-probs of every
completion). Adding a scheme means adding a stage here and a config section, not a branch in the trainer's loop.
Every stage is a thin adapter over the tested tensor functions of :mod:`fastgrpo.rewards` /
:mod:`fastgrpo.advantages`; the formulas are documented there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._schema import ConfigError
from .care import answer_token_span
from .copo import PromptRewardWindow
from .outcome import extract_answer
from .prm import ArithmeticStepVerifier, StepVerifier, build_step_verifier
from .registry import Scheme, build_scheme

__all__ = [
    "RolloutGroups",
    "Advantages",
    "Stage",
    "CareBonus",
    "CopoBlend",
    "ProcessAdvantages",
    "AdvantagePipeline",
    "token_pieces",
]

logger = logging.getLogger(__name__)


@dataclass
class RolloutGroups:
    """A step's scored rollouts: ``B = P * G`` completions, group-major (the ``G`` completions of a prompt are
    consecutive), identical on every rank.

    Attributes:
        example: index of each completion's example in the training set ``[B]``.
        examples: the examples themselves (``fastgrpo.tasks.Example``), ``[B]``.
        prompt_ids, completion_ids: token ids per completion.
        texts: decoded completions.
        truncated: ``[B]`` bool, no end token within the length limit.
        terms: reward term name -> ``[B]`` unweighted values.
        group_size: ``G``.
        vision: a vision-language model's per-completion prompt images / video (``fastgrpo.vlm.VisionInputs``
            or None; the ``G`` completions of a prompt share one), None for a text model.
        behaviour_logp: the rollout engine's log-probs of each completion's tokens ``[L_b]`` (vLLM with
            ``rollout.vllm.behaviour_logprobs``), or None.
    """

    example: list[int]
    examples: list[Any]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: Tensor
    terms: dict[str, Tensor]
    group_size: int
    vision: list[Any] | None = None
    behaviour_logp: list[Tensor] | None = None

    @property
    def size(self) -> int:
        return len(self.example)

    def columns(self) -> dict[str, Any]:
        """Per-completion columns (for :class:`fastgrpo.sampling.DynamicSamplingBuffer`)."""
        cols: dict[str, Any] = {
            "example": self.example,
            "examples": self.examples,
            "prompt_ids": self.prompt_ids,
            "completion_ids": self.completion_ids,
            "texts": self.texts,
            "truncated": self.truncated,
        }
        if self.vision is not None:
            cols["vision"] = self.vision
        if self.behaviour_logp is not None:
            cols["behaviour_logp"] = self.behaviour_logp
        cols.update({f"term/{k}": v for k, v in self.terms.items()})
        return cols

    @classmethod
    def from_columns(cls, cols: dict[str, Any], group_size: int) -> RolloutGroups:
        terms = {k[len("term/") :]: v for k, v in cols.items() if k.startswith("term/")}
        return cls(cols["example"], cols["examples"], cols["prompt_ids"], cols["completion_ids"], cols["texts"],
                   cols["truncated"], terms, group_size, cols.get("vision"), cols.get("behaviour_logp"))  # fmt: skip


@dataclass
class Advantages:
    """What the loss takes per completion, and the rewards it came from.

    ``values [B]``: the advantage (COPO: the global one); ``local`` / ``blend [B]``: COPO's local advantage and
    the weight of the local loss; ``per_token``: token-level advantages ``[L_b]`` per completion (GroundedPRM),
    which replace ``values`` in the loss. ``rewards [B]``: the rewards after reward shaping. ``metrics``: the
    stages' statistics for the step's log.
    """

    values: Tensor
    rewards: Tensor
    local: Tensor | None = None
    blend: Tensor | None = None
    per_token: list[Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def per_sample(self) -> tuple[Tensor, Tensor]:
        """``(advantage [B], nonzero [B] bool)``: each completion's net advantage and whether it carries any.

        Sequence advantages: the value itself. COPO: ``(1 - w) A_global + w A_local``, the advantage the blended
        loss's gradient has at ratio 1 (on-policy). Token advantages: their mean over the completion (the sign of
        its net push under a token-mean loss), and ``nonzero`` when any token's advantage is non-zero (a
        completion whose token advantages cancel still trains its tokens).
        """
        if self.per_token is not None:
            net = torch.stack([t.float().mean() if t.numel() else torch.zeros(()) for t in self.per_token])
            nonzero = torch.tensor([bool((t != 0).any()) for t in self.per_token], dtype=torch.bool)
            return net, nonzero
        net = self.values if self.blend is None else (1 - self.blend) * self.values + self.blend * self.local
        return net, net != 0

    def select(self, index: Sequence[int]) -> tuple[Tensor | tuple[Tensor, Tensor], Tensor | None]:
        """``(advantages, blend)`` of the completions ``index`` in the layout ``grpo_loss`` takes: ``[B_mb]``,
        the concatenated token advantages ``[M]``, or the COPO pair with its blend weight."""
        ix = torch.as_tensor(list(index), dtype=torch.long)
        if self.per_token is not None:
            return torch.cat([self.per_token[i] for i in index]), None
        if self.blend is not None:
            return (self.values[ix], self.local[ix]), self.blend[ix]
        return self.values[ix], None


def token_pieces(tokenizer: Any, completion_ids: Sequence[Sequence[int]]) -> list[list[str]]:
    """Each completion token decoded on its own (special tokens skipped): ``pieces[b][t]``.

    Their concatenation is the completion's text up to what single-token decoding cannot show (bytes of one
    character split over tokens, a SentencePiece leading space), which leaves ASCII markup such as
    ``<answer>`` or a newline intact, so character offsets in it locate tokens exactly. One ``batch_decode``.
    """
    flat = [[t] for ids in completion_ids for t in ids]
    decoded = tokenizer.batch_decode(flat, skip_special_tokens=True) if flat else []
    out, pos = [], 0
    for ids in completion_ids:
        out.append(decoded[pos : pos + len(ids)])
        pos += len(ids)
    return out


class Stage:
    """A scheme's hooks in the pipeline (module docstring); the defaults change nothing.

    A stage that keeps state across steps (COPO's running statistics) returns it from ``state_dict`` (empty:
    stateless) and restores it in ``load_state_dict``; the trainer saves it in its checkpoints.
    """

    needs_reference: bool = False

    def shape_rewards(self, groups: RolloutGroups, rewards: Tensor, ref_logp: list[Tensor] | None,
                      metrics: dict[str, float]) -> Tensor:  # fmt: skip
        return rewards

    def shape_advantages(self, groups: RolloutGroups, adv: Advantages) -> Advantages:
        return adv

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class CareBonus(Stage):
    """GRPO-CARE: ``rewards + bonus``, the consistency bonus of accurate completions whose answer the reference
    (the EMA of the policy) finds likely (:mod:`fastgrpo.rewards.care`).

    The answer span of a completion is located from character offsets of its decoded tokens
    (:func:`token_pieces` and :func:`~fastgrpo.rewards.care.answer_token_span`), so the tags are found whatever
    the tokenizer made of them in context. Metrics: ``care/bonus`` (mean bonus) and ``care/no_answer_span``
    (share of completions without an answer span; their confidence is the cap).
    """

    needs_reference = True

    def __init__(self, care: Scheme, confidence: Scheme, tokenizer: Any, *, accuracy_term: str,
                 answer_open: str = "<answer>", answer_close: str = "</answer>"):  # fmt: skip
        self.care, self.confidence, self.tokenizer = care, confidence, tokenizer
        self.accuracy_term, self.answer_open, self.answer_close = accuracy_term, answer_open, answer_close

    def shape_rewards(self, groups, rewards, ref_logp, metrics):
        if ref_logp is None:
            raise ValueError("GRPO-CARE needs the reference log-probs of every completion (ref_logp)")
        conf = torch.zeros(groups.size)
        missing = 0
        for b, pieces in enumerate(token_pieces(self.tokenizer, groups.completion_ids)):
            span = torch.zeros(1, len(pieces), dtype=torch.bool)
            found = answer_token_span(pieces, self.answer_open, self.answer_close)
            if found is None:
                missing += 1
            else:
                span[0, found[0] : found[1]] = True
            conf[b] = self.confidence(ref_logp[b][None].float().cpu(), span)[0]
        acc = groups.terms[self.accuracy_term]
        bonus = self.care(acc, torch.zeros_like(acc), conf, groups.group_size).bonus
        metrics["care/bonus"] = float(bonus.mean())
        metrics["care/no_answer_span"] = missing / max(groups.size, 1)
        return rewards + bonus


class CopoBlend(Stage):
    """COPO: the global (prompt-level) and local advantages with the entropy blend weight
    (:mod:`fastgrpo.rewards.copo`), from the answers extracted from the completions.

    ``reward_term``: the correctness term that COPO's global reward and its ``soft-with-zero`` gate read (the
    paper's binary reward); the local advantage reads the step's (shaped) total reward, as GRPO would (see
    :mod:`fastgrpo.rewards.copo` for why). ``global_stats``: ``"batch"`` standardises the global reward over
    this step's prompts (the paper; warned about once below :data:`FEW_PROMPTS` prompts per step),
    ``"running"`` over this step's and the previous ``stats_window`` prompts (beyond the paper; the window is
    the stage's state, saved in checkpoints).

    Metrics: ``copo/blend`` (mean weight of the local loss), ``copo/entropy`` (mean answer entropy of the
    groups, bits), ``copo/stats_prompts`` (prompts the global reward was standardised over).
    """

    #: Prompts per step below which the batch statistics of the global reward are mostly noise (the paper: 512).
    FEW_PROMPTS = 64

    def __init__(self, copo: Scheme, *, reward_term: str = "accuracy", global_stats: str = "batch",
                 stats_window: int = 64):  # fmt: skip
        if global_stats not in ("batch", "running"):
            raise ValueError(f"global_stats must be 'batch' or 'running', got {global_stats!r}")
        self.copo, self.reward_term, self.global_stats = copo, reward_term, global_stats
        self.window = PromptRewardWindow(stats_window) if global_stats == "running" else None
        self._warned = False

    def shape_advantages(self, groups, adv):
        if self.reward_term not in groups.terms:
            raise ConfigError(
                f"advantage.copo.reward_term: no reward term named {self.reward_term!r} (the terms are "
                f"{list(groups.terms)}); COPO's global reward and gate read the binary correctness term"
            )
        num_prompts = groups.size // groups.group_size
        history = None if self.window is None else self.window.values
        if history is None and num_prompts < self.FEW_PROMPTS and not self._warned:
            self._warned = True
            logger.warning(
                "COPO standardises its global (prompt-level) reward over the %d prompts of each step (the paper: "
                "512); over fewer than %d that statistic is mostly noise, and under the released soft-with-zero "
                "gating the wrong answers of an above-average prompt are pushed up (metric adv/wrong_positive). "
                "Raise rollout.prompts_per_step, or set advantage.copo.global_stats=running (statistics over "
                "recent prompts, beyond the paper); at 4 prompts per step on the addition task neither learned "
                "as much as plain GRPO (docs/schemes.md).",
                num_prompts, self.FEW_PROMPTS,
            )  # fmt: skip
        answers = [extract_answer(t) for t in groups.texts]
        out = self.copo(adv.rewards, answers, groups.group_size, accuracy=groups.terms[self.reward_term],
                        history=history)  # fmt: skip
        if self.window is not None:
            self.window.update(out.global_reward)
        adv.values, adv.local, adv.blend = out.global_advantages, out.local_advantages, out.blend
        adv.metrics.update({
            "copo/blend": float(out.blend.mean()),
            "copo/entropy": float(out.entropy.mean()),
            "copo/stats_prompts": num_prompts + (0 if history is None else history.numel()),
        })  # fmt: skip
        return adv

    def state_dict(self):
        return {} if self.window is None else {"window": self.window.state_dict()}

    def load_state_dict(self, state):
        if self.window is None:
            return super().load_state_dict(state)
        if "window" not in state:
            raise ValueError("COPO with running statistics: the saved state has no 'window'")
        self.window.load_state_dict(state["window"])


class ProcessAdvantages(Stage):
    """GroundedPRM: each reasoning step (text between ``step_sep``) checked by the verifier in its context (the
    completion's question, from ``groups.examples``, and the steps before it: :meth:`StepVerifier.check_path`),
    the step scores standardised per group into token-level advantages, plus the outcome advantage
    (:func:`fastgrpo.rewards.prm.step_token_advantages`). Metrics: ``prm/step_score`` (mean step check) and
    ``prm/bad_steps`` (share of steps checked wrong)."""

    def __init__(
        self, prm: Scheme, tokenizer: Any, *, verifier: StepVerifier | None = None, step_sep: str = "\n"
    ):
        self.prm, self.tokenizer, self.step_sep = prm, tokenizer, step_sep
        self.verifier = verifier if verifier is not None else ArithmeticStepVerifier()

    def token_steps(self, pieces: Sequence[str]) -> list[int]:
        """Step number of each completion token: steps end at the token that writes ``step_sep``."""
        steps, k = [], 0
        for piece in pieces:
            steps.append(k)
            k += piece.count(self.step_sep)
        return steps

    def shape_advantages(self, groups, adv):
        ids = groups.completion_ids
        T = max(len(c) for c in ids)
        token_step = torch.full((groups.size, T), -1, dtype=torch.long)
        scores = []
        for b, pieces in enumerate(token_pieces(self.tokenizer, ids)):
            example = groups.examples[b]
            question = getattr(example, "question", None)
            if not isinstance(question, str):
                raise ValueError(
                    f"GroundedPRM step checks need each completion's question: groups.examples[{b}] is "
                    f"{type(example).__name__}, not an example with a .question"
                )
            token_step[b, : len(pieces)] = torch.tensor(self.token_steps(pieces))
            steps = self.tokenizer.decode(ids[b], skip_special_tokens=True).split(self.step_sep)
            scores.append([float(v) for v in self.verifier.check_path(question, steps)])
        tok = self.prm(scores, token_step, groups.group_size, outcome_advantages=adv.values)
        adv.per_token = [tok[b, : len(c)] for b, c in enumerate(ids)]
        flat = [x for row in scores for x in row]
        adv.metrics["prm/step_score"] = sum(flat) / max(len(flat), 1)
        adv.metrics["prm/bad_steps"] = sum(x < 0 for x in flat) / max(len(flat), 1)
        return adv


class AdvantagePipeline:
    """``rewards -> shaped rewards -> group-relative advantage -> shaped advantages`` (module docstring)."""

    def __init__(self, estimator: Scheme, stages: Sequence[Stage] = ()):
        self.estimator, self.stages = estimator, list(stages)

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s in self.stages)

    def __call__(
        self, groups: RolloutGroups, rewards: Tensor, ref_logp: list[Tensor] | None = None
    ) -> Advantages:
        """One step's advantages. Besides the stages' metrics, for every scheme: ``adv/nonzero``, the share of
        completions whose advantage is non-zero, and ``adv/wrong_positive``, the share of wrong completions
        (accuracy term <= 0) whose advantage is positive (0 when none is wrong); per completion as
        :meth:`Advantages.per_sample` defines it. The accuracy term is ``accuracy`` when the run has one, else
        the first term (as the trainer's evaluation)."""
        metrics: dict[str, float] = {}
        for stage in self.stages:
            rewards = stage.shape_rewards(groups, rewards, ref_logp, metrics)
        adv = Advantages(self.estimator(rewards, groups.group_size), rewards, metrics=metrics)
        for stage in self.stages:
            adv = stage.shape_advantages(groups, adv)
        net, nonzero = adv.per_sample()
        metrics["adv/nonzero"] = float(nonzero.float().mean())
        if groups.terms:
            acc = groups.terms["accuracy" if "accuracy" in groups.terms else next(iter(groups.terms))]
            wrong = acc.to(net.device) <= 0
            metrics["adv/wrong_positive"] = (
                float((net[wrong] > 0).float().mean()) if bool(wrong.any()) else 0.0
            )
        return adv

    def state_dict(self) -> dict[str, Any]:
        """The stages' state across steps, keyed ``"<position>.<stage class>"`` (stateless stages left out)."""
        return {f"{i}.{type(s).__name__}": st for i, s in enumerate(self.stages) if (st := s.state_dict())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the saved stages must be this pipeline's stateful ones."""
        keys = {f"{i}.{type(s).__name__}": s for i, s in enumerate(self.stages)}
        mine = set(self.state_dict())
        if set(state) != mine:
            raise ValueError(
                f"advantage pipeline state: saved for stages {sorted(state)}, but this pipeline's stateful stages "
                f"are {sorted(mine)} (a checkpoint of another advantage configuration?)"
            )
        for key, st in state.items():
            keys[key].load_state_dict(st)

    @classmethod
    def from_config(cls, section: Any, tokenizer: Any) -> AdvantagePipeline:
        """Built from a run config's ``advantage`` section (``scheme``, ``params``, ``care``, ``copo``, ``prm``)."""
        stages: list[Stage] = []
        if section.care.enabled:
            c = section.care
            stages.append(CareBonus(build_scheme({"name": "care", "params": c.params}),
                                    build_scheme({"name": "care_confidence", "params": c.confidence}), tokenizer,
                                    accuracy_term=c.accuracy_term, answer_open=c.answer_open,
                                    answer_close=c.answer_close))  # fmt: skip
        if section.copo.enabled:
            c = section.copo
            stages.append(CopoBlend(build_scheme({"name": "copo", "params": c.params}), reward_term=c.reward_term,
                                    global_stats=c.global_stats, stats_window=c.stats_window))  # fmt: skip
        if section.prm.enabled:
            prm = build_scheme({"name": "grounded_prm", "params": section.prm.params})
            verifier = build_step_verifier(section.prm.verifier, grounded=section.prm.grounded)
            stages.append(ProcessAdvantages(prm, tokenizer, verifier=verifier, step_sep=section.prm.step_sep))
        return cls(build_scheme({"name": section.scheme, "params": section.params}), stages)

"""What a task is: examples with chat prompts, a ground-truth answer and the metadata reward schemes read.

An :class:`Example` holds the chat ``messages`` of one prompt (earlier worked-example turns included, ending
with the user's question), the ground-truth ``answer`` string and ``meta``, a flat dict of what the reward
schemes need (``answer_type`` for the outcome checker, RewardMap's ``type`` / ``difficulty_city`` /
``question_transfer_count`` / stations / network, the arithmetic steps, the multiple-choice options ...).
A :class:`Task` produces deterministic train and eval splits from a seed; the two never share a question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Example",
    "Task",
    "ANSWER_INSTRUCTION",
    "check_subset",
    "message_text",
    "one_shot",
    "render_prompt",
]

ANSWER_INSTRUCTION = "Put the final answer in <answer></answer>."


@dataclass
class Example:
    """One prompt. ``messages``: chat turns (``{"role", "content"}``) ending with the user's question.

    A turn's ``content`` is a string, or (vision-language prompts) a list of parts in the Hugging Face chat
    format: ``{"type": "text", "text": ...}``, ``{"type": "image"}``, ``{"type": "video"}``. ``images`` and
    ``videos`` hold the media of the ``image`` / ``video`` parts in the order they appear in the messages
    (an image: a PIL image, a file path or bytes; a video: a list of frames or a file path).

    An example built from a dataset row also keeps what TRL-style reward functions receive
    (:mod:`fastgrpo.rewards.terms`): ``raw_prompt``, the prompt as the dataset holds it (a string, or chat
    messages), and ``columns``, the row's other columns as they are. Both are None for built-in tasks.
    """

    messages: list[dict[str, Any]]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    raw_prompt: Any = None
    columns: dict[str, Any] | None = None

    @property
    def question(self) -> str:
        """The text of the last turn (its text parts joined, for a multimodal turn)."""
        return message_text(self.messages[-1])

    @property
    def is_multimodal(self) -> bool:
        return bool(self.images or self.videos)


def message_text(message: dict[str, Any]) -> str:
    """A chat turn's text: its ``content`` string, or the ``text`` of its parts joined by newlines."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")


def one_shot(question: str, example_question: str, example_answer: str) -> list[dict[str, str]]:
    """A worked example turn, then the question.

    Measured on SmolLM2-135M-Instruct (ENVIRONMENT.md): without one earlier exchange the model writes the
    answer tags in 0-4% of samples and GRPO learns nothing; with it, 52-98%.
    """
    return [
        {"role": "user", "content": example_question},
        {"role": "assistant", "content": example_answer},
        {"role": "user", "content": question},
    ]


def check_subset(task: str, option: str, values: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``values`` as a tuple, after checking it is a non-empty subset of ``allowed``.

    Raises ``ValueError`` naming the task and the option otherwise (a bare string is refused: it would be
    read as a sequence of characters).
    """
    if isinstance(values, str) or not values or any(v not in allowed for v in values):
        raise ValueError(f"{task} task: {option} must be a non-empty subset of {allowed}, got {values!r}")
    return tuple(values)


class Task:
    """Base class: subclasses implement :meth:`make` (one example from an RNG) and set ``name``.

    ``stage_key`` names the ``meta`` field a curriculum sampler orders by (``None``: no stages).
    """

    name: str = "task"
    stage_key: str | None = None
    #: training examples drawn when the config leaves ``task.num_train`` unset (0: every example there is)
    default_num_train: int = 512

    def make(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def _dedup_key(self, example: Example) -> str:
        return example.question

    def split(self, num_train: int, num_eval: int, seed: int) -> tuple[list[Example], list[Example]]:
        """Deterministic train / eval splits with no question in both (eval drawn first, then excluded).

        When the question space is small (single-digit addition has 100 questions) the train split may
        repeat questions; eval questions never appear in it.
        """
        rng = random.Random(seed)
        eval_set: list[Example] = []
        seen: set[str] = set()
        tries = 0
        while len(eval_set) < num_eval and tries < 50 * max(num_eval, 1):
            tries += 1
            ex = self.make(rng)
            key = self._dedup_key(ex)
            if key not in seen:
                seen.add(key)
                eval_set.append(ex)
        train: list[Example] = []
        tries = 0
        while len(train) < num_train:
            tries += 1
            if tries > 200 * max(num_train, 1):
                raise ValueError(
                    f"task {self.name!r}: could not draw {num_train} training questions disjoint from the "
                    f"{len(eval_set)} eval questions; lower task.num_eval"
                )
            ex = self.make(rng)
            if self._dedup_key(ex) not in seen:
                train.append(ex)
        return train, eval_set


def render_prompt(messages: list[dict[str, str]], tokenizer: Any, chat_template: bool = True) -> str:
    """Prompt text for generation: the tokenizer's chat template with the assistant turn opened, or, when
    disabled or absent, a plain ``User:`` / ``Assistant:`` transcript."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"

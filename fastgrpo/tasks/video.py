"""Short videos of moving shapes with multiple-choice questions (GRPO-CARE style), generated in code.

Each example is a clip of ``num_frames`` frames (PIL images, ``frame_size`` square) showing coloured shapes
and one question with four options ``A``-``D``; the prompt asks for reasoning in ``<think></think>`` and the
letter in ``<answer></answer>``, so GRPO-CARE's format reward matches and its consistency bonus has an answer
span to score. Kinds (each needs more than one frame to answer):

=============  ==================================================================  ======================
kind           question                                                            harder with
=============  ==================================================================  ======================
``direction``  in which of eight directions does the <colour> <shape> move?         more moving distractors
``order``      in which order do the shapes first appear?                          four shapes, moving
``count``      how many different shapes appear over the whole clip? (they come    more shapes (2-5)
               and go; no frame shows them all)
``next``       a shape cycles through colours: which colour comes in the next       longer cycles,
               frame?                                                               distractors
=============  ==================================================================  ======================

``meta``: ``answer_type="choice"``, ``kind``, ``difficulty`` (easy / middle / hard), ``choices`` (option
texts), ``correct_index``, ``num_frames``, ``frame_size``, ``fps`` (the rate a player should use) and
``scene``: one dict per shape with ``shape``, ``colours`` (its colour name in each frame) and ``track`` (its
centre ``[x, y]`` in each frame as fractions of the frame, ``None`` while hidden). The answer follows from the
scene alone, and the frames are drawn from the scene, so a test can recompute both.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from typing import Any

from .base import Example, Task, check_subset
from .render import COLOURS, SHAPES, check_size, draw_shape, pil

__all__ = ["VideoShapesTask", "KINDS", "DIRECTIONS", "render_frames"]

KINDS = ("direction", "order", "count", "next")
DIFFICULTIES = ("easy", "middle", "hard")
# screen coordinates: y grows downwards
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0),
    "down-right": (1, 1),
    "down": (0, 1),
    "down-left": (-1, 1),
    "left": (-1, 0),
    "up-left": (-1, -1),
    "up": (0, -1),
    "up-right": (1, -1),
}
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
_RADIUS = 0.08  # shape half-size, fraction of the frame
_BACKGROUND = (245, 245, 245)
_LETTERS = "ABCD"
_INSTRUCTION = "Think it through inside <think></think>, then give the letter of the correct option in <answer></answer>."
_EXAMPLE_Q = (
    "A lamp shows red, green, red, green, red. Which colour does it show next?\n"
    f"Options:\nA. blue\nB. green\nC. red\nD. yellow\n{_INSTRUCTION}"
)
_EXAMPLE_A = "<think>The colours alternate red, green. The last one is red, so green comes next.</think>\n<answer>B</answer>"

Track = list[list[float] | None]


class _Crowded(Exception):
    """No room for one more shape: the caller draws the scene again."""


class _Scene:
    """Shapes of one clip: each added with a track that keeps clear of the others in every frame."""

    def __init__(self, rng: random.Random, num_frames: int):
        self.rng, self.T = rng, num_frames
        self.objects: list[dict[str, Any]] = []

    def pick(self, n: int) -> list[tuple[str, str]]:
        """``n`` (shape, colour) pairs, no shape and no colour twice."""
        return list(zip(self.rng.sample(SHAPES, n), self.rng.sample(_COLOURS, n)))

    def add(self, shape: str, colour: str | list[str], make: Callable[[], Track]) -> None:
        """Add ``shape`` with ``colour`` (one, or one per frame) on the first track from ``make()`` that keeps
        2.6 radii from every other shape whenever both are visible; :class:`_Crowded` after 100 tries."""
        gap2 = (2.6 * _RADIUS) ** 2
        for _ in range(100):
            track = make()
            if all(
                a is None or b is None or (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 >= gap2
                for obj in self.objects
                for a, b in zip(obj["track"], track)
            ):
                colours = [colour] * self.T if isinstance(colour, str) else colour
                self.objects.append({"shape": shape, "colours": colours, "track": track})
                return
        raise _Crowded


def _static(rng: random.Random, T: int, visible: range | None = None) -> Track:
    lo, hi = _RADIUS + 0.04, 1 - _RADIUS - 0.04
    p = [round(rng.uniform(lo, hi), 4), round(rng.uniform(lo, hi), 4)]
    return [list(p) if visible is None or t in visible else None for t in range(T)]


def _moving(rng: random.Random, T: int, d: tuple[int, int], visible: range | None = None) -> Track:
    """A straight track in direction ``d`` covering 0.4-0.5 of the frame over the clip, inside the frame."""
    dist = rng.uniform(0.4, 0.5)
    norm = (d[0] ** 2 + d[1] ** 2) ** 0.5
    step = (d[0] / norm * dist / (T - 1), d[1] / norm * dist / (T - 1))
    lo, hi = _RADIUS + 0.04, 1 - _RADIUS - 0.04
    start = []
    for k in range(2):
        end_off = step[k] * (T - 1)
        a, b = lo - min(0.0, end_off), hi - max(0.0, end_off)
        start.append(rng.uniform(a, b))
    return [
        [round(start[0] + t * step[0], 4), round(start[1] + t * step[1], 4)]
        if visible is None or t in visible
        else None
        for t in range(T)
    ]


def render_frames(scene: list[dict[str, Any]], num_frames: int, frame_size: int) -> list[Any]:
    """The clip of ``scene`` (module docstring) as ``num_frames`` RGB ``PIL.Image`` frames of ``frame_size``^2."""
    Image, ImageDraw, _ = pil()
    frames = []
    for t in range(num_frames):
        img = Image.new("RGB", (frame_size, frame_size), _BACKGROUND)
        draw = ImageDraw.Draw(img)
        for obj in scene:
            pos = obj["track"][t]
            if pos is not None:
                centre = (pos[0] * frame_size, pos[1] * frame_size)
                draw_shape(draw, obj["shape"], centre, _RADIUS * frame_size, COLOURS[obj["colours"][t]])
        frames.append(img)
    return frames


def _options(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], int]:
    """Four distinct options: ``right`` and three of ``pool``, shuffled; returns them and the right index."""
    options = [right, *rng.sample([p for p in pool if p != right], 3)]
    rng.shuffle(options)
    return options, options.index(right)


def _ask_direction(scene: _Scene, level: int) -> tuple[str, list[str], int]:
    rng, T = scene.rng, scene.T
    objs = scene.pick(1 + level)
    names = list(DIRECTIONS)
    right = rng.choice(names)
    scene.add(*objs[0], lambda: _moving(rng, T, DIRECTIONS[right]))
    for shape, colour in objs[1:]:  # distractors moving some other way
        other = DIRECTIONS[rng.choice([n for n in names if n != right])]
        scene.add(shape, colour, lambda o=other: _moving(rng, T, o))
    shape, colour = objs[0]
    return (f"In which direction does the {colour} {shape} move?", *_options(rng, right, names))


def _ask_order(scene: _Scene, level: int) -> tuple[str, list[str], int]:
    rng, T = scene.rng, scene.T
    objs = scene.pick(min(3 if level == 0 else 4, T - 1))
    starts = sorted(rng.sample(range(T - 1), len(objs)))
    for (shape, colour), a in zip(objs, starts):
        vis = range(a, T)
        if level == 2:  # hard: the shapes also move
            d = rng.choice(list(DIRECTIONS.values()))
            scene.add(shape, colour, lambda d=d, v=vis: _moving(rng, T, d, v))
        else:
            scene.add(shape, colour, lambda v=vis: _static(rng, T, v))
    perms = [", ".join(f"{c} {s}" for s, c in p) for p in itertools.permutations(objs)]
    return ("In which order do the shapes first appear?", *_options(rng, perms[0], perms))


def _ask_count(scene: _Scene, level: int) -> tuple[str, list[str], int]:
    rng, T = scene.rng, scene.T
    n = 2 + level + (rng.random() < 0.5)  # 2-3, 3-4, 4-5 shapes, all of different kinds
    objs = scene.pick(n)
    while True:  # visibility intervals such that no single frame shows every shape
        spans = []
        for _ in range(n):
            a = rng.randrange(T - 1)
            spans.append(range(a, rng.randint(a + 2, T)))
        if max(sum(t in s for s in spans) for t in range(T)) < n:
            break
    for (shape, colour), vis in zip(objs, spans):
        scene.add(shape, colour, lambda v=vis: _static(rng, T, v))
    low = max(1, n - rng.randint(0, 3))
    options = [str(k) for k in range(low, low + 4)]
    stem = "Shapes come and go during the video. How many different shapes appear in total?"
    return stem, options, options.index(str(n))


def _ask_next(scene: _Scene, level: int) -> tuple[str, list[str], int]:
    rng, T = scene.rng, scene.T
    period = min(2 + (level > 0) + (level == 2 and rng.random() < 0.5), T // 2)
    objs = scene.pick(1 + level)
    cycle = rng.sample(_COLOURS, period)
    shape = objs[0][0]
    scene.add(shape, [cycle[t % period] for t in range(T)], lambda: _static(rng, T))
    for s, _ in objs[1:]:  # distractors of one colour outside the cycle
        scene.add(s, rng.choice([x for x in _COLOURS if x not in cycle]), lambda: _static(rng, T))
    stem = (
        f"The {shape} changes colour in a repeating pattern. "
        "Which colour will it have in the frame right after the video ends?"
    )
    return (stem, *_options(rng, cycle[T % period], list(_COLOURS)))


_ASK = {"direction": _ask_direction, "order": _ask_order, "count": _ask_count, "next": _ask_next}


class VideoShapesTask(Task):
    """Clips of moving shapes, four-option questions on direction, order, count or the next colour.

    ``kinds`` / ``difficulties``: what to draw from (uniformly). ``num_frames``: frames per clip (Qwen2-VL's
    video processor groups frames in pairs; an odd count gets its last frame repeated). ``frame_size``: frame
    side in pixels (56 suits a tiny CI model). ``fps``: recorded in ``meta`` for players and processors.
    ``one_shot``: a text-only worked example turn first.
    """

    name = "video_shapes"

    def __init__(self, kinds: list[str] | tuple[str, ...] = KINDS,
                 difficulties: list[str] | tuple[str, ...] = DIFFICULTIES, num_frames: int = 8,
                 frame_size: int = 224, fps: float = 2.0, one_shot: bool = True):  # fmt: skip
        self.kinds = check_subset("video_shapes", "kinds", kinds, KINDS)
        self.difficulties = check_subset("video_shapes", "difficulties", difficulties, DIFFICULTIES)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 4:
            raise ValueError(f"video_shapes task: num_frames must be an integer >= 4, got {num_frames!r}")
        self.num_frames = num_frames
        self.frame_size = check_size("video_shapes", "frame_size", frame_size)
        if self.frame_size is None:
            raise ValueError("video_shapes task: frame_size must be an integer >= 16 pixels, got None")
        if not fps > 0:
            raise ValueError(f"video_shapes task: fps must be > 0, got {fps!r}")
        self.fps, self.one_shot = float(fps), one_shot

    def make(self, rng: random.Random) -> Example:
        kind = rng.choice(self.kinds)
        difficulty = rng.choice(self.difficulties)
        level = DIFFICULTIES.index(difficulty)
        T = self.num_frames
        for _ in range(100):  # a crowded clip is drawn again
            clip = _Scene(rng, T)
            try:
                stem, options, idx = _ASK[kind](clip, level)
                break
            except _Crowded:
                continue
        else:  # pragma: no cover - a few redraws at most
            raise RuntimeError(f"video_shapes: could not place the shapes of a {kind} clip")
        text = "\n".join(
            [stem, "Options:", *(f"{_LETTERS[i]}. {o}" for i, o in enumerate(options)), _INSTRUCTION]
        )
        frames = render_frames(clip.objects, T, self.frame_size)
        meta = {
            "answer_type": "choice",
            "kind": kind,
            "difficulty": difficulty,
            "choices": options,
            "correct_index": idx,
            "num_frames": T,
            "frame_size": self.frame_size,
            "fps": self.fps,
            "scene": clip.objects,
        }
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}
        ]
        if self.one_shot:
            messages = [
                {"role": "user", "content": _EXAMPLE_Q},
                {"role": "assistant", "content": _EXAMPLE_A},
                *messages,
            ]
        return Example(messages, _LETTERS[idx], meta, videos=[frames])

    def _dedup_key(self, example: Example) -> str:
        # the same question text is asked about many clips
        return example.question + json.dumps(example.meta["scene"], sort_keys=True)

"""Visual math (MMR1 style): bar charts, line charts and plane figures with a numeric answer.

Each example renders one figure with Pillow and asks a question whose answer is an integer, checked by the
outcome reward's numeric comparison (``meta["answer_type"] = "numeric"``). Difficulty varies within each kind,
so prompts differ in how often a policy solves them, which is what MMR1's variance-aware sampling selects on:

============  ===========================  ===================================  ===================================
kind          easy                         middle                               hard
============  ===========================  ===================================  ===================================
``bar``       the value of one bar         the difference of two bars           the mean of all bars
``line``      the value in one year        the change between two years         the largest rise from one year to
                                                                                the next
``geometry``  area of a rectangle          hypotenuse of a right triangle       area of an L-shaped figure
                                           (legs labelled) or the third angle
                                           of a triangle (two labelled)
============  ===========================  ===================================  ===================================

Charts print each value next to its bar or point, so what is hard is the arithmetic and finding the right
marks, not reading an axis to the pixel. ``meta``: ``answer_type``, ``kind``, ``difficulty``, ``level``
(1-3), ``op`` (what the question computes), ``data`` (the figure's numbers: chart ``labels`` / ``values``,
the question's ``targets``, or the figure's dimensions) and ``image_size``.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

from .base import ANSWER_INSTRUCTION, Example, Task, check_subset
from .render import check_size, fit, font, pil, scaled_size, text_box
from .simple import EXAMPLE_ANSWER, EXAMPLE_QUESTION

__all__ = ["VisualMathTask", "KINDS", "render_figure", "bar_boxes"]

KINDS = ("bar", "line", "geometry")
DIFFICULTIES = ("easy", "middle", "hard")
_NATURAL = (480, 360)
_FRUITS = ("Apples", "Pears", "Plums", "Figs", "Kiwis", "Limes", "Dates", "Mangos")
_BAR_COLOUR = (59, 130, 246)
_LINE_COLOUR = (220, 38, 38)
_FILL = (219, 234, 254)
_INK = (20, 20, 20)
# chart plot area at scale 1: left, top, right, bottom
_PLOT = (60, 50, 460, 310)


def _nice_step(top: int) -> int:
    """A tick step (1, 2, 5 x 10^k) giving 4-8 ticks up to ``top``."""
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500):
        if top / step <= 8:
            return step
    return 1000


def _axis_top(values: list[int]) -> tuple[int, int]:
    step = _nice_step(max(values))
    return step * math.ceil(max(values) * 1.15 / step), step


def bar_boxes(values: list[int], scale: float = 1.0) -> list[tuple[float, float, float, float]]:
    """``(left, top, right, bottom)`` pixel box of each bar of a chart of ``values`` drawn at ``scale``."""
    left, top, right, bottom = _PLOT
    y_max, _ = _axis_top(values)
    slot = (right - left) / len(values)
    out = []
    for i, v in enumerate(values):
        x0 = left + slot * (i + 0.2)
        x1 = left + slot * (i + 0.8)
        y = bottom - (bottom - top) * v / y_max
        out.append((x0 * scale, y * scale, x1 * scale, bottom * scale))
    return out


def _draw_axes(draw: Any, s: float, values: list[int], title: str) -> None:
    left, top, right, bottom = _PLOT
    y_max, step = _axis_top(values)
    f = font(12 * s)
    for tick in range(0, y_max + 1, step):
        y = (bottom - (bottom - top) * tick / y_max) * s
        draw.line((left * s, y, right * s, y), fill=(225, 225, 225), width=max(1, round(s)))
        label = str(tick)
        _, t, r, b = text_box(f, label)
        draw.text((left * s - 6 * s - r, y - (t + b) / 2), label, font=f, fill=_INK)
    draw.line((left * s, top * s, left * s, bottom * s), fill=_INK, width=max(1, round(2 * s)))
    draw.line((left * s, bottom * s, right * s, bottom * s), fill=_INK, width=max(1, round(2 * s)))
    tf = font(16 * s)
    _, _, r, _ = text_box(tf, title)
    draw.text(((_NATURAL[0] * s - r) / 2, 14 * s), title, font=tf, fill=_INK)


def _centred(draw: Any, xy: tuple[float, float], text: str, f: Any, anchor_bottom: bool = False) -> None:
    left, top, right, bottom = text_box(f, text)
    x = xy[0] - (left + right) / 2
    y = xy[1] - bottom if anchor_bottom else xy[1] - top
    draw.text((x, y), text, font=f, fill=_INK)


def _draw_bar(draw: Any, s: float, data: dict) -> None:
    labels, values = data["labels"], data["values"]
    _draw_axes(draw, s, values, "Fruit sold (boxes)")
    f = font(13 * s)
    for label, v, (x0, y0, x1, y1) in zip(labels, values, bar_boxes(values, s)):
        draw.rectangle((x0, y0, x1, y1), fill=_BAR_COLOUR)
        _centred(draw, ((x0 + x1) / 2, y0 - 4 * s), str(v), f, anchor_bottom=True)
        _centred(draw, ((x0 + x1) / 2, y1 + 6 * s), label, f)


def _line_points(values: list[int], s: float) -> list[tuple[float, float]]:
    left, top, right, bottom = _PLOT
    y_max, _ = _axis_top(values)
    slot = (right - left) / len(values)
    return [
        ((left + slot * (i + 0.5)) * s, (bottom - (bottom - top) * v / y_max) * s)
        for i, v in enumerate(values)
    ]


def _draw_line(draw: Any, s: float, data: dict) -> None:
    labels, values = data["labels"], data["values"]
    _draw_axes(draw, s, values, "Visitors per year (thousands)")
    pts = _line_points(values, s)
    draw.line(pts, fill=_LINE_COLOUR, width=max(1, round(3 * s)), joint="curve")
    f = font(13 * s)
    r = 4.5 * s
    for label, v, (x, y) in zip(labels, values, pts):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_LINE_COLOUR)
        _centred(draw, (x, y - 8 * s), str(v), f, anchor_bottom=True)
        _centred(draw, (x, _PLOT[3] * s + 6 * s), label, f)


def _label(draw: Any, s: float, xy: tuple[float, float], text: str) -> None:
    _centred(draw, (xy[0], xy[1]), text, font(16 * s))


def _right_angle(draw: Any, corner: tuple[float, float], ux: float, uy: float, size: float, s: float) -> None:
    """A right-angle square at ``corner`` spanning ``ux`` horizontally and ``uy`` vertically (signs = sides)."""
    x, y = corner
    pts = [(x + ux * size, y), (x + ux * size, y + uy * size), (x, y + uy * size)]
    draw.line(pts, fill=_INK, width=max(1, round(1.5 * s)))


def _draw_geometry(draw: Any, s: float, data: dict) -> None:
    W, H = _NATURAL
    shape = data["shape"]
    lw = max(1, round(3 * s))
    if shape == "rectangle":
        w, h = data["width"], data["height"]
        k = min(320 / w, 220 / h)
        x0, y0 = (W - w * k) / 2 * s, (H - h * k) / 2 * s
        x1, y1 = x0 + w * k * s, y0 + h * k * s
        draw.rectangle((x0, y0, x1, y1), fill=_FILL, outline=_INK, width=lw)
        _label(draw, s, ((x0 + x1) / 2, y1 + 8 * s), str(w))
        _centred(draw, (x1 + 18 * s, (y0 + y1) / 2 - 8 * s), str(h), font(16 * s))
    elif shape == "right_triangle":
        a, b = data["a"], data["b"]  # horizontal and vertical legs
        k = min(320 / a, 230 / b)
        x0, y1 = (W - a * k) / 2 * s, (H + b * k) / 2 * s
        pts = [(x0, y1), (x0 + a * k * s, y1), (x0, y1 - b * k * s)]
        draw.polygon(pts, fill=_FILL, outline=_INK, width=lw)
        _right_angle(draw, (x0, y1), 1, -1, 16 * s, s)
        _label(draw, s, (x0 + a * k * s / 2, y1 + 8 * s), str(a))
        _centred(draw, (x0 - 18 * s, y1 - b * k * s / 2 - 8 * s), str(b), font(16 * s))
        _centred(draw, (x0 + a * k * s / 2 + 18 * s, y1 - b * k * s / 2 - 22 * s), "?", font(16 * s))
    elif shape == "triangle":
        # angles A (bottom left), B (bottom right) and C (top); A and B are labelled
        A, B = math.radians(data["A"]), math.radians(data["B"])
        base = 1.0
        # apex from the two base angles (law of sines): height over the base
        xa = base * math.tan(B) / (math.tan(A) + math.tan(B))
        ya = xa * math.tan(A)
        k = min(340 / base, 240 / ya)
        x0, y0 = (W - base * k) / 2 * s, (H + ya * k) / 2 * s
        pA, pB, pC = (x0, y0), (x0 + base * k * s, y0), (x0 + xa * k * s, y0 - ya * k * s)
        draw.polygon([pA, pB, pC], fill=_FILL, outline=_INK, width=lw)
        f = font(15 * s)
        _centred(draw, (pA[0] + 34 * s, pA[1] - 22 * s), f"{data['A']}°", f)
        _centred(draw, (pB[0] - 34 * s, pB[1] - 22 * s), f"{data['B']}°", f)
        _centred(draw, (pC[0], pC[1] + 14 * s), "?", f)
    else:  # l_shape: a W x H rectangle with a w x h rectangle cut from its top right corner
        Wd, Hd, w, h = data["W"], data["H"], data["w"], data["h"]
        k = min(320 / Wd, 230 / Hd)
        x0, y0 = (W - Wd * k) / 2 * s, (H - Hd * k) / 2 * s
        X, Y, cw, ch = Wd * k * s, Hd * k * s, w * k * s, h * k * s
        pts = [
            (x0, y0),
            (x0 + X - cw, y0),
            (x0 + X - cw, y0 + ch),
            (x0 + X, y0 + ch),
            (x0 + X, y0 + Y),
            (x0, y0 + Y),
        ]
        draw.polygon(pts, fill=_FILL, outline=_INK, width=lw)
        f = font(16 * s)
        _centred(draw, (x0 + X / 2, y0 + Y + 8 * s), str(Wd), f)
        _centred(draw, (x0 - 18 * s, y0 + Y / 2 - 8 * s), str(Hd), f)
        _centred(draw, (x0 + X - cw / 2, y0 + ch - 26 * s), str(w), f)
        _centred(draw, (x0 + X - cw - 18 * s, y0 + ch / 2 - 8 * s), str(h), f)


_DRAW = {"bar": _draw_bar, "line": _draw_line, "geometry": _draw_geometry}


def render_figure(kind: str, data: dict, image_size: int | None = None) -> Any:
    """The figure of ``kind`` (``bar``, ``line`` or ``geometry``) for ``data`` as an RGB ``PIL.Image``.

    ``image_size``: the longer side in pixels (None: 480x360). Drawn at ``max(1, image_size / 480)`` times the
    natural scale and resized down to the exact size when smaller.
    """
    Image, ImageDraw, _ = pil()
    size = scaled_size(_NATURAL, image_size)
    s = max(1.0, size[0] / _NATURAL[0])
    img = Image.new("RGB", (round(_NATURAL[0] * s), round(_NATURAL[1] * s)), (255, 255, 255))
    _DRAW[kind](ImageDraw.Draw(img), s, data)
    return fit(img, size)


def _make_bar(rng: random.Random, level: int) -> tuple[str, str, str, dict]:
    n = rng.randint(3 + level, 4 + level)
    labels = rng.sample(_FRUITS, n)
    values = [rng.randint(2, (12, 30, 60)[level]) for _ in range(n)]
    if level == 0:
        i = rng.randrange(n)
        q, answer, op, targets = f"How many boxes of {labels[i]} were sold?", values[i], "value", [labels[i]]
    elif level == 1:
        i, j = rng.sample(range(n), 2)
        if values[i] == values[j]:
            values[i] += 1
        if values[i] < values[j]:
            i, j = j, i
        q = f"How many more boxes of {labels[i]} than of {labels[j]} were sold?"
        answer, op, targets = values[i] - values[j], "difference", [labels[i], labels[j]]
    else:
        values[-1] += -sum(values) % n  # a whole-number mean
        q, answer, op, targets = (
            "What is the mean number of boxes sold per fruit?",
            sum(values) // n,
            "mean",
            labels,
        )
    return q, str(answer), op, {"labels": labels, "values": values, "targets": targets}


def _make_line(rng: random.Random, level: int) -> tuple[str, str, str, dict]:
    n = rng.randint(4 + level, 5 + level)
    first = rng.randint(2012, 2018)
    labels = [str(first + i) for i in range(n)]
    values = [rng.randint(5, (20, 40, 80)[level])]
    for _ in range(n - 1):
        values.append(max(1, values[-1] + rng.randint(-8, 12)))
    if level == 0:
        i = rng.randrange(n)
        q, answer, op, targets = (
            f"How many thousand visitors were there in {labels[i]}?",
            values[i],
            "value",
            [labels[i]],
        )
    elif level == 1:
        i, j = sorted(rng.sample(range(n), 2))
        q = f"By how many thousand did the number of visitors change from {labels[i]} to {labels[j]}? (A fall is negative.)"
        answer, op, targets = values[j] - values[i], "change", [labels[i], labels[j]]
    else:
        rises = [values[i + 1] - values[i] for i in range(n - 1)]
        best = max(rises)
        if best <= 0 or rises.count(best) > 1:  # make one rise the unique largest
            k = rng.randrange(n - 1)
            bump = max(max(rises), 0) - rises[k] + rng.randint(1, 5)
            for t in range(k + 1, n):
                values[t] += bump
            rises = [values[i + 1] - values[i] for i in range(n - 1)]
        q = "What is the largest rise in visitors (in thousands) from one year to the next?"
        answer, op, targets = max(rises), "largest_rise", labels
    return q, str(answer), op, {"labels": labels, "values": values, "targets": targets}


_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (9, 40, 41))


def _make_geometry(rng: random.Random, level: int) -> tuple[str, str, str, dict]:
    if level == 0:
        w, h = rng.randint(3, 15), rng.randint(2, 12)
        data = {"shape": "rectangle", "width": w, "height": h}
        return "What is the area of the rectangle?", str(w * h), "area", data
    if level == 1 and rng.random() < 0.5:
        a, b, c = rng.choice(_TRIPLES)
        m = rng.randint(1, 3)
        a, b, c = a * m, b * m, c * m
        if rng.random() < 0.5:
            a, b = b, a
        data = {"shape": "right_triangle", "a": a, "b": b}
        return "How long is the side marked '?' of the right triangle?", str(c), "hypotenuse", data
    if level == 1:
        A = rng.randint(30, 80)
        B = rng.randint(30, 80)
        data = {"shape": "triangle", "A": A, "B": B}
        return (
            "How many degrees is the angle marked '?' of the triangle?",
            str(180 - A - B),
            "third_angle",
            data,
        )
    Wd, Hd = rng.randint(8, 20), rng.randint(6, 16)
    w, h = rng.randint(2, Wd - 3), rng.randint(2, Hd - 3)
    data = {"shape": "l_shape", "W": Wd, "H": Hd, "w": w, "h": h}
    q = "A rectangle is cut from one corner of a larger rectangle. What is the area of the remaining shape?"
    return q, str(Wd * Hd - w * h), "l_area", data


_MAKE = {"bar": _make_bar, "line": _make_line, "geometry": _make_geometry}


class VisualMathTask(Task):
    """Bar charts, line charts and plane figures with integer answers, in three difficulties.

    ``kinds`` / ``difficulties``: what to draw from (uniformly). ``image_size``: the longer side of the image
    in pixels (None: 480x360; e.g. 112 for a tiny CI model). ``one_shot``: a text-only worked example turn
    first (the ``compare`` / ``addition`` one).
    """

    name = "visual_math"

    def __init__(self, kinds: list[str] | tuple[str, ...] = KINDS,
                 difficulties: list[str] | tuple[str, ...] = DIFFICULTIES,
                 image_size: int | None = None, one_shot: bool = True):  # fmt: skip
        self.kinds = check_subset("visual_math", "kinds", kinds, KINDS)
        self.difficulties = check_subset("visual_math", "difficulties", difficulties, DIFFICULTIES)
        self.image_size = check_size("visual_math", "image_size", image_size)
        self.one_shot = one_shot

    def make(self, rng: random.Random) -> Example:
        kind = rng.choice(self.kinds)
        difficulty = rng.choice(self.difficulties)
        level = DIFFICULTIES.index(difficulty)
        question, answer, op, data = _MAKE[kind](rng, level)
        image = render_figure(kind, data, self.image_size)
        text = f"{question} {ANSWER_INSTRUCTION}"
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        ]
        if self.one_shot:
            messages = [
                {"role": "user", "content": EXAMPLE_QUESTION},
                {"role": "assistant", "content": EXAMPLE_ANSWER},
                *messages,
            ]
        meta = {
            "answer_type": "numeric",
            "kind": kind,
            "difficulty": difficulty,
            "level": level + 1,
            "op": op,
            "data": data,
            "image_size": list(image.size),
        }
        return Example(messages, answer, meta, images=[image])

    def _dedup_key(self, example: Example) -> str:
        return example.question + json.dumps(example.meta["data"], sort_keys=True)

"""Transit maps as images (RewardMap / ReasonMap style): the ``transit`` task's questions about a drawn map.

Each example draws a schematic metro map (:func:`random_transit_map`) and renders it with Pillow
(:func:`render_transit_map`): coloured lines, white station discs, transfer stations as larger discs with a
black ring, every station named, and a legend of the lines. The question is one of RewardMap's six types,
asked by the text task's :func:`~fastgrpo.tasks.transit.ask_question` (same wording, answers and
``meta``), so RewardMap's difficulty-weighted reward with the route detail term and its four-stage curriculum
(``stage_key = "type"``) apply unchanged. The question text names lines and stations only; the map is in the
image.

Map generator. Stations sit on a grid of points; a line is a polyline whose vertices are its stations, each
leg a straight horizontal, vertical or diagonal run of one or two grid steps, turning by at most 90 degrees at
a station. The first line starts anywhere; every later line is grown forwards and backwards from a station of
an earlier line (so the network is connected) and may stop at one more existing station: one or two shared
stations per line, as the text generator, which gives a similar spread of fewest-transfer counts. What keeps
the drawing unambiguous: no two lines share a leg (they only cross), a line never passes through a station
without stopping, and a new station never sits right above, below or beside a station it is not connected
to (room for the labels). Sizes follow the text task (``SIZES``: easy 3 lines of 5 stations, middle 4 of 7,
hard 5 of 9) on grids of 7x5, 9x7 and 12x9 points, so harder maps are bigger and busier.

``meta`` adds to the text task's: ``positions`` (station -> grid point ``[x, y]``), ``grid`` and
``image_size`` (``[width, height]`` of the image).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from .base import ANSWER_INSTRUCTION, Example, Task, check_subset
from .render import COLOURS, check_size, fit, font, pil, scaled_size, text_box
from .transit import LINE_NAMES, QUESTION_TYPES, SIZES, STATION_NAMES, ask_question

__all__ = [
    "TransitMap",
    "TransitMapTask",
    "GRIDS",
    "LINE_COLOURS",
    "random_transit_map",
    "render_transit_map",
    "station_pixel",
]

Point = tuple[int, int]

# grid points (columns, rows) per difficulty
GRIDS: dict[str, tuple[int, int]] = {"easy": (7, 5), "middle": (9, 7), "hard": (12, 9)}
LINE_COLOURS: dict[str, tuple[int, int, int]] = {
    name: COLOURS[name.split()[0].lower()] for name in LINE_NAMES
}
_DIRS: tuple[Point, ...] = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))

# drawing constants at scale 1 (pixels)
_CELL, _MARGIN, _LINE_W, _STATION_R, _TRANSFER_R, _FONT, _LEGEND_FONT = 92, 72, 7, 6, 9, 14, 15


@dataclass
class TransitMap:
    """A drawn network: ``metro`` (line -> ordered stations), ``positions`` (station -> grid point)."""

    metro: dict[str, list[str]]
    positions: dict[str, Point]
    grid: tuple[int, int]

    @property
    def transfers(self) -> set[str]:
        """Stations served by two or more lines."""
        count: dict[str, int] = {}
        for stops in self.metro.values():
            for s in stops:
                count[s] = count.get(s, 0) + 1
        return {s for s, c in count.items() if c > 1}


class _Layout:
    """What is already drawn: stations, every grid point on a line, every unit leg (grid edge)."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid
        self.stations: list[Point] = []
        self.station_set: set[Point] = set()
        self.points: set[Point] = set()
        self.edges: set[frozenset[Point]] = set()

    def inside(self, p: Point) -> bool:
        return 0 <= p[0] < self.grid[0] and 0 <= p[1] < self.grid[1]

    def add_line(self, stops: list[Point]) -> None:
        for p in stops:
            if p not in self.station_set:
                self.station_set.add(p)
                self.stations.append(p)
        for a, b in zip(stops, stops[1:]):
            for u, v in _unit_steps(a, b):
                self.points.update((u, v))
                self.edges.add(frozenset((u, v)))


def _unit_steps(a: Point, b: Point) -> list[tuple[Point, Point]]:
    k = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
    d = ((b[0] - a[0]) // k, (b[1] - a[1]) // k)
    pts = [(a[0] + i * d[0], a[1] + i * d[1]) for i in range(k + 1)]
    return list(zip(pts, pts[1:]))


def _walk(
    rng: random.Random,
    layout: _Layout,
    own: set[Point],
    start: Point,
    count: int,
    heading: Point | None,
    transfers: list[int],
) -> list[Point] | None:
    """``count`` new stations walking from ``start``; ``own`` (this line's points) is updated. None: stuck.

    ``transfers[0]``: how many more existing stations the line may stop at (decremented when it does).
    """
    out: list[Point] = []
    p = start
    for _ in range(count):
        options: list[tuple[float, Point, Point]] = []
        for d in _DIRS:
            if heading is not None and d[0] * heading[0] + d[1] * heading[1] < 0:
                continue  # turn by at most 90 degrees
            if heading is not None and d == (-heading[0], -heading[1]):
                continue
            for k in (1, 2):
                q = (p[0] + k * d[0], p[1] + k * d[1])
                if not layout.inside(q) or q in own:
                    continue
                inner = [(p[0] + i * d[0], p[1] + i * d[1]) for i in range(1, k)]
                if any(r in layout.station_set or r in own for r in inner):
                    continue  # a line never passes a station without stopping
                if any(frozenset(e) in layout.edges for e in _unit_steps(p, q)):
                    continue  # lines cross but never share a leg
                if q in layout.station_set:
                    if not transfers[0]:
                        continue
                    weight = 1.0  # stop at an existing station: a transfer
                elif q in layout.points:
                    continue  # a station would sit on another line without being its stop
                else:
                    near = [(q[0] + 1, q[1]), (q[0] - 1, q[1]), (q[0], q[1] + 1), (q[0], q[1] - 1)]
                    if any((n in layout.station_set or n in own) and n != p for n in near):
                        continue  # room for labels
                    weight = 1.0
                if heading is not None:
                    weight *= (
                        4.0 if d == heading else (2.0 if d[0] * heading[0] + d[1] * heading[1] > 0 else 1.0)
                    )
                options.append((weight * (1.0 if k == 1 else 1.5), d, q))
        if not options:
            return None
        _, d, q = rng.choices(options, weights=[o[0] for o in options])[0]
        transfers[0] -= q in layout.station_set
        for _, v in _unit_steps(p, q):
            own.add(v)
        out.append(q)
        p, heading = q, d
    return out


def random_transit_map(rng: random.Random, difficulty: str) -> TransitMap:
    """A connected schematic map of ``SIZES[difficulty]`` lines x stations on ``GRIDS[difficulty]``."""
    if difficulty not in SIZES:
        raise ValueError(f"difficulty must be one of {tuple(SIZES)}, got {difficulty!r}")
    num_lines, per_line = SIZES[difficulty]
    grid = GRIDS[difficulty]
    all_points = [(x, y) for y in range(grid[1]) for x in range(grid[0])]
    for _ in range(500):
        layout = _Layout(grid)
        lines: list[list[Point]] = []
        for li in range(num_lines):
            stops = None
            for _ in range(40):
                if li == 0:
                    anchor = rng.choice(all_points)
                else:
                    anchor = rng.choice(layout.stations)
                j = rng.randrange(per_line)  # the anchor's index on the new line
                own = {anchor}
                transfers = [rng.randint(0, 1) if li else 0]  # shared stations besides the anchor
                ahead = _walk(rng, layout, own, anchor, per_line - 1 - j, None, transfers)
                if ahead is None:
                    continue
                first = ahead[0] if ahead else None
                back_heading = None
                if first is not None:
                    k = max(abs(first[0] - anchor[0]), abs(first[1] - anchor[1]))
                    back_heading = ((anchor[0] - first[0]) // k, (anchor[1] - first[1]) // k)
                behind = _walk(rng, layout, own, anchor, j, back_heading, transfers)
                if behind is None:
                    continue
                stops = behind[::-1] + [anchor] + ahead
                break
            if stops is None:
                break
            layout.add_line(stops)
            lines.append(stops)
        if len(lines) == num_lines:
            names = rng.sample(STATION_NAMES, len(layout.stations))
            name_of = dict(zip(layout.stations, names))
            metro = {LINE_NAMES[i]: [name_of[p] for p in stops] for i, stops in enumerate(lines)}
            return TransitMap(metro, {name_of[p]: p for p in layout.stations}, grid)
    # at most 6 of the 500 attempts were needed in 1,000 hard maps
    raise RuntimeError(f"could not lay out a {difficulty} transit map")  # pragma: no cover


def _legend_layout(tmap: TransitMap, width: int) -> list[tuple[str, float, int]]:
    """``(item, x, row)`` of each legend entry at scale 1: the lines, then the transfer marker."""
    f = font(_LEGEND_FONT)
    out, x, row = [], 24.0, 0
    for item in [*tmap.metro, "Transfer station"]:
        w = 44 + text_box(f, item)[2]
        if x > 24 and x + w > width - 24:
            x, row = 24.0, row + 1
        out.append((item, x, row))
        x += w + 24
    return out


def _natural_size(tmap: TransitMap) -> tuple[int, int, int]:
    """``(width, height, legend top)`` at scale 1."""
    cols, rows = tmap.grid
    width = 2 * _MARGIN + (cols - 1) * _CELL
    legend_top = 2 * _MARGIN + (rows - 1) * _CELL - _MARGIN // 3
    legend_rows = 1 + max(row for _, _, row in _legend_layout(tmap, width))
    return width, legend_top + 12 + 28 * legend_rows, legend_top


def station_pixel(tmap: TransitMap, station: str, image_size: tuple[int, int]) -> tuple[float, float]:
    """Pixel centre of ``station`` in a rendering of ``tmap`` of ``image_size`` ``(width, height)``."""
    w, _, _ = _natural_size(tmap)
    s = image_size[0] / w
    x, y = tmap.positions[station]
    return ((_MARGIN + x * _CELL) * s, (_MARGIN + y * _CELL) * s)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _label_box(
    x: float,
    y: float,
    r: float,
    w: float,
    h: float,
    bounds: tuple[float, float, float, float],
    placed: list[tuple[float, ...]],
    markers: list[tuple[float, ...]],
    samples: list[tuple[float, float]],
    s: float,
) -> tuple[float, float, float, float]:
    """The least crowded of eight places around a station at ``(x, y)`` for a ``w`` x ``h`` label."""
    candidates = [
        (x + r, y - h / 2),  # right
        (x - r - w, y - h / 2),  # left
        (x - w / 2, y - r - h),  # above
        (x - w / 2, y + r),  # below
        (x + r * 0.7, y - r * 0.7 - h),  # above right
        (x - r * 0.7 - w, y - r * 0.7 - h),  # above left
        (x + r * 0.7, y + r * 0.7),  # below right
        (x - r * 0.7 - w, y + r * 0.7),  # below left
    ]
    reach = (x - r - w, y - r - h, x + r + w, y + r + h)  # what any candidate can touch
    placed = [b for b in placed if _overlap(b, reach)]
    markers = [m for m in markers if _overlap(m, reach)]
    samples = [(sx, sy) for sx, sy in samples if reach[0] <= sx <= reach[2] and reach[1] <= sy <= reach[3]]
    best, best_cost = None, 0.0
    for cx, cy in candidates:
        box = (cx, cy, cx + w, cy + h)
        outside = box[0] < bounds[0] or box[1] < bounds[1] or box[2] > bounds[2] or box[3] > bounds[3]
        cost = 1e6 * outside
        cost += 100 * sum(_overlap(box, b) for b in placed) + 50 * sum(_overlap(box, m) for m in markers)
        cost += 20 * s * s * sum(box[0] <= sx <= box[2] and box[1] <= sy <= box[3] for sx, sy in samples)
        if best is None or cost < best_cost:
            best, best_cost = box, cost
    return best


def render_transit_map(tmap: TransitMap, image_size: int | None = None) -> Any:
    """The map as an RGB ``PIL.Image``; ``image_size``: its longer side in pixels (None: natural size).

    Drawn at ``max(1, image_size / natural)`` times the natural scale (so labels stay sharp when enlarged)
    and resized down to the exact size when smaller than the natural one. Order: lines, station markers,
    labels (transfer stations first, each at the free-most of eight places), legend.
    """
    Image, ImageDraw, ImageFont = pil()
    nat_w, nat_h, legend_top = _natural_size(tmap)
    size = scaled_size((nat_w, nat_h), image_size)
    s = max(1.0, size[0] / nat_w)
    W, H = round(nat_w * s), round(nat_h * s)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    white, black = (255, 255, 255), (0, 0, 0)
    lw, ring = max(1, round(_LINE_W * s)), max(1, round(3 * s))

    def px(p: Point) -> tuple[float, float]:
        return ((_MARGIN + p[0] * _CELL) * s, (_MARGIN + p[1] * _CELL) * s)

    samples: list[tuple[float, float]] = []  # points on the lines, to keep labels off them
    for line, stops in tmap.metro.items():
        pts = [px(tmap.positions[st]) for st in stops]
        draw.line(pts, fill=LINE_COLOURS[line], width=lw, joint="curve")
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            samples += [(x0 + (x1 - x0) * t / 8, y0 + (y1 - y0) * t / 8) for t in range(1, 8)]

    transfers = tmap.transfers
    line_of = {st: line for line, stops in tmap.metro.items() for st in stops}
    radius = {st: (_TRANSFER_R if st in transfers else _STATION_R) * s for st in tmap.positions}
    markers: list[tuple[float, ...]] = []
    for st, p in tmap.positions.items():
        (x, y), r = px(p), radius[st]
        outline = black if st in transfers else LINE_COLOURS[line_of[st]]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=white, outline=outline, width=ring)
        markers.append((x - r, y - r, x + r, y + r))

    f = font(_FONT * s)
    stroke = isinstance(f, ImageFont.FreeTypeFont)  # FreeType can outline text; the bitmap font cannot
    bounds = (2 * s, 2 * s, W - 2 * s, legend_top * s)
    placed: list[tuple[float, ...]] = []
    for st in sorted(tmap.positions, key=lambda st: (st not in transfers, tmap.positions[st][::-1])):
        x, y = px(tmap.positions[st])
        left, top, right, bottom = text_box(f, st)
        box = _label_box(
            x, y, radius[st] + 3 * s, right - left, bottom - top, bounds, placed, markers, samples, s
        )
        placed.append(box)
        if stroke:
            draw.text(
                (box[0] - left, box[1] - top),
                st,
                font=f,
                fill=black,
                stroke_width=max(1, round(2 * s)),
                stroke_fill=white,
            )
        else:
            draw.rectangle(box, fill=white)
            draw.text((box[0] - left, box[1] - top), st, font=f, fill=black)

    lf = font(_LEGEND_FONT * s)
    y0 = legend_top * s
    draw.line((16 * s, y0, W - 16 * s, y0), fill=(200, 200, 200), width=max(1, round(s)))
    for item, x1, row in _legend_layout(tmap, nat_w):
        x, cy = x1 * s, y0 + (12 + 28 * row + 14) * s
        if item in tmap.metro:
            draw.line((x, cy, x + 36 * s, cy), fill=LINE_COLOURS[item], width=lw)
        else:
            r = _TRANSFER_R * s
            draw.ellipse(
                (x + 18 * s - r, cy - r, x + 18 * s + r, cy + r), fill=white, outline=black, width=ring
            )
        _, top, _, bottom = text_box(lf, item)
        draw.text((x + 44 * s, cy - (top + bottom) / 2), item, font=lf, fill=black)
    return fit(img, size)


_EXAMPLE_Q = f"Is 7 larger than 3? Answer yes or no. {ANSWER_INSTRUCTION}"
_EXAMPLE_A = "<answer>yes</answer>"


class TransitMapTask(Task):
    """RewardMap's six question types about a transit map shown as an image.

    ``types`` / ``difficulties``: as the ``transit`` task. ``image_size``: the longer side of the image in
    pixels (None: the natural size, about 700x530 easy to 1150x900 hard; small values such as 112 suit a tiny
    CI model, the processor's ``max_pixels`` caps what a real VLM sees). ``one_shot``: put a text-only worked
    example turn first (teaches the answer tags).
    """

    name = "transit_map"
    stage_key = "type"

    def __init__(self, types: list[str] | tuple[str, ...] = QUESTION_TYPES,
                 difficulties: list[str] | tuple[str, ...] = ("easy", "middle", "hard"),
                 image_size: int | None = None, one_shot: bool = False):  # fmt: skip
        self.types = check_subset("transit_map", "types", types, QUESTION_TYPES)
        self.difficulties = check_subset("transit_map", "difficulties", difficulties, tuple(SIZES))
        self.image_size = check_size("transit_map", "image_size", image_size)
        self.one_shot = one_shot

    def make(self, rng: random.Random) -> Example:
        difficulty = rng.choice(self.difficulties)
        tmap = random_transit_map(rng, difficulty)
        qtype = rng.choice(self.types)
        question, answer, meta = ask_question(rng, tmap.metro, qtype, difficulty)
        image = render_transit_map(tmap, self.image_size)
        text = f"The image shows a transit map. {question} {ANSWER_INSTRUCTION}"
        meta.update(
            positions={st: list(p) for st, p in tmap.positions.items()},
            grid=list(tmap.grid),
            image_size=list(image.size),
        )
        turn = [{"type": "image"}, {"type": "text", "text": text}]
        messages = [{"role": "user", "content": turn}]
        if self.one_shot:
            messages = [
                {"role": "user", "content": _EXAMPLE_Q},
                {"role": "assistant", "content": _EXAMPLE_A},
                *messages,
            ]
        return Example(messages, answer, meta, images=[image])

    def _dedup_key(self, example: Example) -> str:
        # the question text alone repeats across maps ("How many stations does the Red Line have?")
        return example.question + json.dumps(example.meta["metro"], sort_keys=True)

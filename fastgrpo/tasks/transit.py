"""A text transit-map task in the spirit of ReasonMap / ReasonMap-Plus (RewardMap), generated in code.

Each example draws a random network of lines (ordered station lists; lines cross at shared transfer
stations, and the network is connected), prints it as text and asks one question of a RewardMap type:

=============  ==========================================================  ==============
type           question                                                    answer
=============  ==========================================================  ==============
``TorF1``      is station S a stop of line L?                              yes / no
``TorF2``      are stations S1 and S2 on a common line?                    yes / no
``Counting1``  how many stops lie strictly between S1 and S2 on line L?    letter A-D
``Counting2``  how many lines stop at station S?                           integer
``Counting3``  how many stations does line L have?                         integer
``planning``   a route from S1 to S2, legs ``Route Name / Departure Stop    route sections
               / Arrival Stop`` separated by ``--``
=============  ==========================================================  ==============

``meta`` carries what RewardMap's scorer reads (the fields of :class:`fastgrpo.rewards.RewardMapSample`): ``type``, ``answer`` (int: 1/0 for yes/no, the option index
0-3 for Counting1, the count, or the number of legs of the shortest-transfer route for planning),
``difficulty_city`` (easy / middle / hard from the network size), ``transfer_count`` (fewest
transfers between the two planning stations), ``station_1``, ``station_2`` and ``metro`` (line name ->
ordered stations), plus ``route`` (one optimal plan, a list of ``(line, departure, arrival)``).
"""

from __future__ import annotations

import random
from collections import deque

from .base import ANSWER_INSTRUCTION, Example, Task, check_subset, one_shot

__all__ = [
    "TransitTask",
    "QUESTION_TYPES",
    "STAGES",
    "SIZES",
    "STATION_NAMES",
    "LINE_NAMES",
    "random_network",
    "min_transfer_route",
    "format_route",
    "ask_question",
]

QUESTION_TYPES = ("TorF1", "TorF2", "Counting1", "Counting2", "Counting3", "planning")
# RewardMap's curriculum (utils/rl_dataset.py): true/false, then counting 2/3, then counting 1, then planning.
STAGES = (("TorF1", "TorF2"), ("Counting2", "Counting3"), ("Counting1",), ("planning",))

_ADJ = ["North", "South", "East", "West", "Old", "New", "Upper", "Lower", "Grand", "Little", "Royal", "Green"]
_NOUN = ["Park", "Bridge", "Market", "Harbor", "Hill", "Gate", "Square", "Cross", "Field", "Garden", "Tower",
         "Mill", "Lake", "Court", "Abbey", "Wharf", "Common", "Street"]  # fmt: skip
LINE_NAMES = [
    "Red Line",
    "Blue Line",
    "Green Line",
    "Yellow Line",
    "Purple Line",
    "Orange Line",
    "Brown Line",
]
STATION_NAMES = tuple(f"{a} {n}" for a in _ADJ for n in _NOUN)
# difficulty -> (number of lines, stations per line)
SIZES = {"easy": (3, 5), "middle": (4, 7), "hard": (5, 9)}


def random_network(rng: random.Random, num_lines: int, stations_per_line: int) -> dict[str, list[str]]:
    """Connected network: every line after the first shares one or two stations with earlier lines."""
    names = list(STATION_NAMES)
    rng.shuffle(names)
    fresh = iter(names)
    metro: dict[str, list[str]] = {}
    for line in LINE_NAMES[:num_lines]:
        used = sorted({s for stops in metro.values() for s in stops})
        shared = rng.sample(used, min(len(used), rng.randint(1, 2))) if used else []
        stops = shared + [next(fresh) for _ in range(stations_per_line - len(shared))]
        rng.shuffle(stops)
        metro[line] = stops
    return metro


def min_transfer_route(metro: dict[str, list[str]], start: str, goal: str) -> list[tuple[str, str, str]]:
    """A route with the fewest transfers, as ``(line, departure, arrival)`` legs (BFS over lines)."""
    lines_at: dict[str, list[str]] = {}
    for line, stops in metro.items():
        for s in stops:
            lines_at.setdefault(s, []).append(line)
    # state: (line, boarding station); parent pointers rebuild the legs
    queue = deque((line, start) for line in lines_at[start])
    parent: dict[tuple[str, str], tuple[str, str] | None] = {(line, start): None for line in lines_at[start]}
    while queue:
        line, board = queue.popleft()
        if goal in metro[line]:
            legs = [(line, board, goal)]
            node = parent[(line, board)]
            while node is not None:
                prev_line, prev_board = node
                legs.append((prev_line, prev_board, legs[-1][1]))
                node = parent[node]
            return legs[::-1]
        for s in metro[line]:
            for nxt in lines_at[s]:
                if nxt != line and (nxt, s) not in parent:
                    parent[(nxt, s)] = (line, board)
                    queue.append((nxt, s))
    raise ValueError(f"no route from {start!r} to {goal!r}")


def format_route(legs: list[tuple[str, str, str]]) -> str:
    """RewardMap's answer layout: one field per line, legs separated by a ``--`` line."""
    return "\n--\n".join(
        f"Route Name: {ln}\nDeparture Stop: {dep}\nArrival Stop: {arr}" for ln, dep, arr in legs
    )


def ask_question(
    rng: random.Random, metro: dict[str, list[str]], qtype: str, difficulty: str
) -> tuple[str, str, dict]:
    """One question of type ``qtype`` about ``metro``: ``(question text, answer, meta)``.

    The text names lines and stations but does not describe the map (the caller shows it, as text or as an
    image); ``meta`` holds RewardMap's fields (module docstring) and ``answer_type``.
    """
    stations = sorted({s for stops in metro.values() for s in stops})
    lines = list(metro)
    meta = {"type": qtype, "difficulty_city": difficulty, "transfer_count": 0,
            "station_1": "", "station_2": "", "metro": metro}  # fmt: skip
    if qtype == "TorF1":
        line = rng.choice(lines)
        on = rng.random() < 0.5
        pool = metro[line] if on else [s for s in stations if s not in metro[line]]
        s = rng.choice(pool)
        q = f"Is {s} a stop on the {line}? Answer yes or no."
        answer, meta["answer"], meta["station_1"] = ("yes" if on else "no"), int(on), s
    elif qtype == "TorF2":
        s1, s2 = rng.sample(stations, 2)
        same = any(s1 in st and s2 in st for st in metro.values())
        q = f"Are {s1} and {s2} on a common line? Answer yes or no."
        answer, meta["answer"] = ("yes" if same else "no"), int(same)
        meta["station_1"], meta["station_2"] = s1, s2
    elif qtype == "Counting1":
        line = rng.choice(lines)
        i, j = sorted(rng.sample(range(len(metro[line])), 2))
        s1, s2 = metro[line][i], metro[line][j]
        true = j - i - 1
        options = sorted(set(range(max(0, true - 3), true + 4)) - {true})
        options = sorted(rng.sample(options, 3) + [true])
        letters = "ABCD"
        choice_text = " ".join(f"{letters[k]}) {v}" for k, v in enumerate(options))
        q = (f"On the {line}, how many stops lie strictly between {s1} and {s2}? {choice_text}. "
             "Answer with the letter.")  # fmt: skip
        idx = options.index(true)
        answer, meta["answer"] = letters[idx], idx
        meta["station_1"], meta["station_2"], meta["choices"] = s1, s2, options
    elif qtype == "Counting2":
        s = rng.choice(stations)
        n = sum(s in st for st in metro.values())
        q = f"How many lines stop at {s}? Answer with a number."
        answer, meta["answer"], meta["station_1"] = str(n), n, s
    elif qtype == "Counting3":
        line = rng.choice(lines)
        n = len(metro[line])
        q = f"How many stations does the {line} have? Answer with a number."
        answer, meta["answer"] = str(n), n
    else:  # planning
        s1, s2 = rng.sample(stations, 2)
        legs = min_transfer_route(metro, s1, s2)
        q = (f"Plan a route from {s1} to {s2} with as few transfers as possible. Write each leg as three "
             "lines 'Route Name: <line>', 'Departure Stop: <station>', 'Arrival Stop: <station>' and put a "
             "line '--' between legs.")  # fmt: skip
        answer = format_route(legs)
        meta.update(answer=len(legs), transfer_count=len(legs) - 1, station_1=s1, station_2=s2,
                    route=legs)  # fmt: skip
    meta["answer_type"] = {"TorF1": "yesno", "TorF2": "yesno", "Counting1": "choice"}.get(
        qtype, "route" if qtype == "planning" else "numeric"
    )
    return q, answer, meta


def _describe(metro: dict[str, list[str]]) -> str:
    return "Transit map (each line lists its stops in order):\n" + "\n".join(
        f"{line}: {' - '.join(stops)}" for line, stops in metro.items()
    )


def _prompt(metro: dict[str, list[str]], question: str) -> str:
    return f"{_describe(metro)}\n\n{question} {ANSWER_INSTRUCTION}"


def worked_example(qtype: str) -> tuple[str, str]:
    """A fixed worked example of question type ``qtype``: ``(prompt, answer in <answer> tags)`` about a small
    network of its own (two lines of four stops, drawn once from a fixed seed), in the task's exact format."""
    rng = random.Random(f"transit-worked-example-{qtype}")
    metro = random_network(rng, 2, 4)
    question, answer, _ = ask_question(rng, metro, qtype, "easy")
    return _prompt(metro, question), f"<answer>{answer}</answer>"


class TransitTask(Task):
    """Random transit networks with RewardMap's six question types.

    ``types``: which question types to draw (uniformly); ``difficulties``: network sizes to draw from;
    ``one_shot``: put a worked example of the same question type, on a small network of its own
    (:func:`worked_example`), before the question. Off by default (RewardMap's prompts have none); a
    135M-parameter model needs it to write the ``<answer>`` tags at all (ENVIRONMENT.md, issue 21).
    """

    name = "transit"
    stage_key = "type"

    def __init__(self, types: list[str] | tuple[str, ...] = QUESTION_TYPES,
                 difficulties: list[str] | tuple[str, ...] = ("easy", "middle", "hard"), one_shot: bool = False):  # fmt: skip
        self.types = check_subset("transit", "types", types, QUESTION_TYPES)
        self.difficulties = check_subset("transit", "difficulties", difficulties, tuple(SIZES))
        self.one_shot = one_shot

    def make(self, rng: random.Random) -> Example:
        difficulty = rng.choice(self.difficulties)
        metro = random_network(rng, *SIZES[difficulty])
        qtype = rng.choice(self.types)
        question, answer, meta = ask_question(rng, metro, qtype, difficulty)
        prompt = _prompt(metro, question)
        if self.one_shot:  # its own RNG: the drawn questions are the same with and without it
            return Example(one_shot(prompt, *worked_example(qtype)), answer, meta)
        return Example([{"role": "user", "content": prompt}], answer, meta)

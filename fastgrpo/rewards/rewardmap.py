"""RewardMap (arXiv 2510.02240): difficulty-weighted reward with a partial-credit detail term.

Per completion, with ``acc`` in {0, 1} and the detail score ``D`` (planning questions only)::

    R = W * (correct_weight * acc + detail_weight * min(D, detail_cap))     # 10, 0.5, 10
    W = city_weights[difficulty_city] (+ transfer_bonus if type == "planning" and transfer_count > 0)
        city_weights = {easy: 1.0, middle: 1.2, hard: 1.5},  transfer_bonus = 0.5

Question types (ReasonMap / ReasonMap-Plus): ``TorF1``/``TorF2`` (yes/no, gold 1 = yes), ``Counting2``/
``Counting3`` (integer), ``Counting1`` (multiple choice A-D mapped to 0-3), ``planning`` (a route). A route
answer is ``--``-separated sections, each with ``Route Name:``, ``Departure Stop:`` and ``Arrival Stop:``;
it is correct iff the first departure / last arrival are the query stations, every route exists in the map
and holds both its stops, and each arrival equals the next departure (:func:`planning_accuracy`).

Planning detail score (:func:`planning_detail_reward`), walking the parsed sections only when the endpoints
match the query (else ``D = 0``)::

    +2                                   endpoints match
    for section i = 0, 1, ...:
      -5  if i > transfer_count          more sections than the t+1 a t-transfer route needs
      if the route exists in the map:
        +4 if transfer_count == 0 and it is a line holding both query stations; +3 if transfer_count > 0
        if both stops are on the route and i is not the last section:
          +1 if arrival_i == departure_{i+1} and i + 1 <= transfer_count
    D = min(D, detail_cap)    (no lower bound)

W is constant within a group, so group-std GRPO cancels it (and the x10) up to ``eps``; they matter with
``scale="none"`` or ``"batch"`` in :func:`fastgrpo.advantages.group_advantages`.

Differences from the official code (``verl/utils/reward_score/reason_map.py``):

- **Last-section penalty [code quirk]**: the official test is ``i + 1 > transfer_count``, which penalises
  the last section of every correctly sized answer by 5 (a correct direct route scores ``D = 1`` instead of
  6). The default here penalises only sections beyond ``transfer_count + 1``, the paper's intent;
  ``official_last_section_penalty=True`` reproduces the released behaviour.
- Station names are normalised by :func:`normalize_station` (lower case; drops spaces, hyphens, commas,
  quotes, parentheses, "metro", "station", a trailing 站). The official ``clean_string`` additionally
  rewrites a few city-specific spellings (Univ -> University, Road -> lu, ...) and maps two Beijing line
  names; pass ``normalize=`` and ``route_aliases=`` to reproduce those.
- When the completion has an ``<answer>`` tag or a ``\\boxed{}``, planning sections are parsed from it
  only; the official code parses the whole response (reasoning included).
- The official yes/no and counting parsers strip a few answer prefixes by hand; here
  :func:`fastgrpo.rewards.outcome.extract_answer` is used. The paper's format term does not exist in the
  released code and is not added here either (add :func:`~fastgrpo.rewards.outcome.format_reward`
  yourself if wanted).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fastgrpo.rewards.outcome import extract_answer, extract_answer_tag, extract_boxed, parse_choice

__all__ = [
    "QUESTION_TYPES",
    "CITY_WEIGHTS",
    "RouteSection",
    "RewardMapSample",
    "normalize_station",
    "parse_route_sections",
    "difficulty_weight",
    "answer_accuracy",
    "planning_accuracy",
    "planning_detail_reward",
    "rewardmap_reward",
]

QUESTION_TYPES = ("TorF1", "TorF2", "Counting1", "Counting2", "Counting3", "planning")
CITY_WEIGHTS: Mapping[str, float] = {"easy": 1.0, "middle": 1.2, "hard": 1.5}


@dataclass(frozen=True)
class RouteSection:
    """One leg of a planned route: ride ``route`` from ``departure`` to ``arrival`` (raw strings)."""

    route: str
    departure: str
    arrival: str


@dataclass
class RewardMapSample:
    """The metadata of one RewardMap question.

    ``metro`` maps a line name to its ordered station list (the map's metro JSON); needed for planning.
    ``answer``: 1/0 for TorF (yes/no), the integer for Counting2/3, the option index 0-3 for Counting1;
    unused for planning.
    """

    type: str
    difficulty_city: str = "easy"
    answer: int | None = None
    transfer_count: int = 0
    station_1: str = ""
    station_2: str = ""
    metro: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in QUESTION_TYPES:
            raise ValueError(f"type must be one of {QUESTION_TYPES}, got {self.type!r}")
        if self.transfer_count < 0:
            raise ValueError(f"transfer_count must be >= 0, got {self.transfer_count}")


def normalize_station(name: str) -> str:
    """Comparable station name: drop parentheses, "metro"/"station", a trailing 站, punctuation, spaces; lower."""
    s = re.sub(r"[\(（][^\)）]*[\)）]", "", name)
    s = re.sub(r"(?i)\b(?:metro|station)\b", "", s)
    s = s.strip()
    s = s.removesuffix("站")
    s = re.sub(r"[\s\-,*'\"`]+", "", s)
    return s.lower()


_FIELD = r"{label}\s*:?\s*(.*?)\s*(?:\n|(?=route\s*name\s*:|departure\s*stop\s*:|arrival\s*stop\s*:)|$)"


def _field(section: str, label: str) -> str | None:
    m = re.search(_FIELD.format(label=label), section, flags=re.IGNORECASE | re.DOTALL)
    return m.group(1).strip() if m else None


def parse_route_sections(text: str) -> list[RouteSection]:
    """Parse ``--``-separated route sections; sections missing one of the three fields are skipped.

    Parses the ``<answer>`` tag content (or the last ``\\boxed{}``) when present, else the whole text.
    """
    body = extract_answer_tag(text)
    if body is None:
        body = extract_boxed(text)
    if body is None:
        body = text
    out: list[RouteSection] = []
    for section in body.split("--"):
        low = section.lower()
        if not all(k in low for k in ("route name", "departure stop", "arrival stop")):
            continue
        route = _field(section, r"route\s*name")
        dep = _field(section, r"departure\s*stop")
        arr = _field(section, r"arrival\s*stop")
        if route is None or dep is None or arr is None:
            continue
        out.append(RouteSection(route, dep, arr))
    return out


def difficulty_weight(
    type: str,
    difficulty_city: str,
    transfer_count: int = 0,
    *,
    city_weights: Mapping[str, float] = CITY_WEIGHTS,
    transfer_bonus: float = 0.5,
) -> float:
    """``W = city_weights[difficulty_city] (+ transfer_bonus for planning with transfer_count > 0)``."""
    if difficulty_city not in city_weights:
        raise ValueError(f"difficulty_city must be one of {tuple(city_weights)}, got {difficulty_city!r}")
    w = float(city_weights[difficulty_city])
    if type == "planning" and transfer_count > 0:
        w += transfer_bonus
    return w


def _route_stations(
    metro: Mapping[str, Sequence[str]],
    route: str,
    aliases: Mapping[str, str],
    normalize: Callable[[str], str],
) -> list[str] | None:
    name = route.strip()
    for key, target in aliases.items():
        if key in name:
            name = target
    if name not in metro:
        return None
    return [normalize(s) for s in metro[name]]


def planning_accuracy(
    response: str,
    sample: RewardMapSample,
    *,
    normalize: Callable[[str], str] = normalize_station,
    route_aliases: Mapping[str, str] | None = None,
) -> bool:
    """Whether a planning answer is a valid route from ``station_1`` to ``station_2`` (module docstring)."""
    sections = parse_route_sections(response)
    if not sections:
        return False
    aliases = route_aliases or {}
    if normalize(sections[0].departure) != normalize(sample.station_1):
        return False
    if normalize(sections[-1].arrival) != normalize(sample.station_2):
        return False
    for i, sec in enumerate(sections):
        stations = _route_stations(sample.metro, sec.route, aliases, normalize)
        if (
            stations is None
            or normalize(sec.departure) not in stations
            or normalize(sec.arrival) not in stations
        ):
            return False
        if i + 1 < len(sections) and normalize(sec.arrival) != normalize(sections[i + 1].departure):
            return False
    return True


def answer_accuracy(response: str, sample: RewardMapSample, **planning_kwargs) -> bool:
    """Correctness of a completion for any question type (yes/no, integer, A-D choice, route)."""
    if sample.type == "planning":
        return planning_accuracy(response, sample, **planning_kwargs)
    pred = extract_answer(response)
    if pred is None or sample.answer is None:
        return False
    pred = pred.strip().rstrip(".").lstrip(":").strip()
    if sample.type.startswith("TorF"):
        return pred.lower() == ("yes" if sample.answer == 1 else "no")
    if sample.type == "Counting1":
        letter = parse_choice(pred, letters="ABCD")
        return letter is not None and "ABCD".index(letter) == sample.answer
    try:
        return int(pred) == int(sample.answer)
    except ValueError:
        return False


def planning_detail_reward(
    response: str,
    sample: RewardMapSample,
    *,
    endpoint_bonus: float = 2.0,
    extra_section_penalty: float = 5.0,
    direct_line_bonus: float = 4.0,
    transfer_line_bonus: float = 3.0,
    transfer_match_bonus: float = 1.0,
    detail_cap: float = 10.0,
    official_last_section_penalty: bool = False,
    normalize: Callable[[str], str] = normalize_station,
    route_aliases: Mapping[str, str] | None = None,
) -> float:
    """Partial credit ``D`` of a route answer (module docstring); 0 for non-planning questions."""
    if sample.type != "planning":
        return 0.0
    sections = parse_route_sections(response)
    if not sections:
        return 0.0
    s1, s2 = normalize(sample.station_1), normalize(sample.station_2)
    if normalize(sections[0].departure) != s1 or normalize(sections[-1].arrival) != s2:
        return 0.0
    aliases = route_aliases or {}
    t = sample.transfer_count
    direct_lines = {
        name
        for name, st in sample.metro.items()
        if s1 in {normalize(x) for x in st} and s2 in {normalize(x) for x in st}
    }
    score = endpoint_bonus
    for i, sec in enumerate(sections):
        too_many = (i + 1 > t) if official_last_section_penalty else (i > t)
        if too_many:
            score -= extra_section_penalty
        stations = _route_stations(sample.metro, sec.route, aliases, normalize)
        if stations is None:
            continue
        if t == 0:
            name = sec.route.strip()
            for key, target in aliases.items():
                if key in name:
                    name = target
            if name in direct_lines:
                score += direct_line_bonus
        else:
            score += transfer_line_bonus
        both = normalize(sec.departure) in stations and normalize(sec.arrival) in stations
        if both and i + 1 < len(sections) and i + 1 <= t:
            if normalize(sec.arrival) == normalize(sections[i + 1].departure):
                score += transfer_match_bonus
    return min(score, detail_cap)


def rewardmap_reward(
    response: str,
    sample: RewardMapSample,
    *,
    correct_weight: float = 10.0,
    detail_weight: float = 0.5,
    difficulty_aware: bool = True,
    city_weights: Mapping[str, float] = CITY_WEIGHTS,
    transfer_bonus: float = 0.5,
    detail_scorer: Callable[[str, RewardMapSample], float] | None = planning_detail_reward,
    accuracy_fn: Callable[[str, RewardMapSample], bool] = answer_accuracy,
) -> float:
    """RewardMap reward ``W * (correct_weight * acc + detail_weight * D)`` of one completion.

    ``detail_scorer(response, sample) -> D`` is pluggable (default the route-planning scorer, already capped;
    None disables the detail term, i.e. the binary-reward baseline). ``difficulty_aware=False`` is the
    official ``mode="baseline"`` (``W = 1``).
    """
    acc = bool(accuracy_fn(response, sample))
    detail = float(detail_scorer(response, sample)) if detail_scorer is not None else 0.0
    w = (
        difficulty_weight(
            sample.type,
            sample.difficulty_city,
            sample.transfer_count,
            city_weights=city_weights,
            transfer_bonus=transfer_bonus,
        )
        if difficulty_aware
        else 1.0
    )
    return w * (correct_weight * float(acc) + detail_weight * detail)

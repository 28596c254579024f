"""fastgrpo.rewards.rewardmap: parsing, accuracy, detail score, difficulty weight, full reward."""

from __future__ import annotations

import pytest

from fastgrpo.rewards.rewardmap import (
    RewardMapSample,
    answer_accuracy,
    difficulty_weight,
    normalize_station,
    parse_route_sections,
    planning_accuracy,
    planning_detail_reward,
    rewardmap_reward,
)

METRO = {
    "Line 1": ["Alpha", "Bravo", "Central", "Delta"],
    "Line 2": ["Xray", "Central Station", "Yankee"],
    "Line 3": ["Alpha", "Delta"],
}


def route(*legs: tuple[str, str, str]) -> str:
    return "\n--\n".join(f"Route Name: {r}\nDeparture Stop: {d}\nArrival Stop: {a}" for r, d, a in legs)


def planning(s1: str, s2: str, t: int, city: str = "middle") -> RewardMapSample:
    return RewardMapSample(
        "planning", difficulty_city=city, transfer_count=t, station_1=s1, station_2=s2, metro=METRO
    )


def test_parse_sections_and_normalise():
    text = (
        "<think>Route Name: nope</think><answer>"
        + route(("Line 1", "Alpha", "Central"), ("Line 2", "Central", "Yankee"))
        + "</answer>"
    )
    secs = parse_route_sections(text)
    assert [(s.route, s.departure, s.arrival) for s in secs] == [
        ("Line 1", "Alpha", "Central"),
        ("Line 2", "Central", "Yankee"),
    ]
    # sections missing a field are skipped; one-line sections parse too
    assert (
        len(parse_route_sections("Route Name: Line 1 Departure Stop: Alpha Arrival Stop: Delta -- junk")) == 1
    )
    assert normalize_station("Central Station") == normalize_station("central") == "central"
    assert normalize_station("Wangfujing (Line 1) 站") == "wangfujing"


def test_planning_one_transfer_hand_computed():
    s = planning("Alpha", "Yankee", 1)
    ans = route(("Line 1", "Alpha", "Central"), ("Line 2", "Central", "Yankee"))
    assert planning_accuracy(ans, s)
    # D = +2 endpoints; i=0: +3 (route exists, t > 0) +1 (Central == next departure, i+1 <= 1);
    #     i=1: +3 (route exists); no extra section -> 2 + 3 + 1 + 3 = 9
    assert planning_detail_reward(ans, s) == 9.0
    # official quirk: i=1 has i+1 = 2 > 1 -> -5 -> 4
    assert planning_detail_reward(ans, s, official_last_section_penalty=True) == 4.0
    # W = middle 1.2 + 0.5 (planning with transfers) = 1.7; R = 1.7 * (10 * 1 + 0.5 * 9) = 24.65
    assert rewardmap_reward(ans, s) == pytest.approx(24.65)
    assert rewardmap_reward(ans, s, difficulty_aware=False) == pytest.approx(14.5)
    assert rewardmap_reward(ans, s, detail_scorer=None) == pytest.approx(17.0)


def test_planning_direct_route_and_extra_sections():
    s = planning("Alpha", "Delta", 0, city="easy")
    direct = route(("Line 1", "Alpha", "Delta"))
    # D = 2 + 4 (Line 1 holds both query stations) = 6; official: -5 on the only section -> 1
    assert planning_detail_reward(direct, s) == 6.0
    assert planning_detail_reward(direct, s, official_last_section_penalty=True) == 1.0
    # Line 3 also holds both: +4 too
    assert planning_detail_reward(route(("Line 3", "Alpha", "Delta")), s) == 6.0
    # a needless transfer: i=0 -> +4 (Line 1 direct); i=1 -> -5 (too many sections), Line 3 -> +4 -> 2 + 4 - 5 + 4 = 5
    # (+1 for the matching transfer is not given: i + 1 > transfer_count)
    extra = route(("Line 1", "Alpha", "Bravo"), ("Line 3", "Bravo", "Delta"))
    assert planning_detail_reward(extra, s) == 5.0
    assert not planning_accuracy(extra, s)  # Bravo is not on Line 3
    # W = easy 1.0 (no transfer bonus for t = 0): R = 10 + 0.5 * 6 = 13
    assert rewardmap_reward(direct, s) == pytest.approx(13.0)


def test_planning_wrong_answers():
    s = planning("Alpha", "Yankee", 1)
    # wrong endpoint: no detail at all
    assert planning_detail_reward(route(("Line 1", "Alpha", "Delta")), s) == 0.0
    # unknown route: no +3 and not correct: 2 + (i=0 unknown: 0) + (i=1: +3) = 5
    bad = route(("Line 9", "Alpha", "Central"), ("Line 2", "Central", "Yankee"))
    assert planning_detail_reward(bad, s) == 5.0
    assert not planning_accuracy(bad, s)
    # broken transfer (arrival != next departure)
    broken = route(("Line 1", "Alpha", "Bravo"), ("Line 2", "Central", "Yankee"))
    assert not planning_accuracy(broken, s)
    assert planning_detail_reward(broken, s) == 2 + 3 + 3  # no +1
    assert planning_detail_reward("no route at all", s) == 0.0


def test_detail_cap_at_ten():
    metro = {"A": ["s", "m"], "B": ["m", "n"], "C": ["n", "e"]}
    s = RewardMapSample("planning", transfer_count=2, station_1="s", station_2="e", metro=metro)
    ans = route(("A", "s", "m"), ("B", "m", "n"), ("C", "n", "e"))
    # 2 + (3 + 1) + (3 + 1) + 3 = 13 -> capped at 10
    assert planning_detail_reward(ans, s) == 10.0
    assert planning_detail_reward(ans, s, detail_cap=100.0) == 13.0


@pytest.mark.parametrize(
    "qtype, answer, response, ok",
    [
        ("TorF1", 1, "... \\boxed{Yes}", True),
        ("TorF2", 0, "The answer is no.", True),
        ("TorF1", 1, "\\boxed{no}", False),
        ("Counting2", 5, "So the answer is 5.", True),
        ("Counting3", 5, "\\boxed{6}", False),
        ("Counting3", 5, "\\boxed{five}", False),
        ("Counting1", 1, "\\boxed{B}", True),
        ("Counting1", 1, "\\boxed{(C)}", False),
        ("Counting1", 1, "\\boxed{E}", False),
    ],
)
def test_vqa_accuracy(qtype, answer, response, ok):
    assert answer_accuracy(response, RewardMapSample(qtype, answer=answer)) is ok


def test_difficulty_weights_and_reward():
    assert difficulty_weight("TorF1", "hard") == 1.5
    assert difficulty_weight("planning", "hard", 0) == 1.5
    assert difficulty_weight("planning", "hard", 2) == 2.0
    assert difficulty_weight("Counting1", "middle", 3) == 1.2  # transfer bonus is for planning only
    # TorF, hard, correct: 1.5 * 10 = 15; no detail term outside planning
    assert (
        rewardmap_reward("\\boxed{yes}", RewardMapSample("TorF1", difficulty_city="hard", answer=1)) == 15.0
    )
    # a pluggable detail scorer applies to any type
    assert rewardmap_reward(
        "\\boxed{no}", RewardMapSample("TorF1", answer=1), detail_scorer=lambda r, s: 4.0
    ) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="difficulty_city"):
        difficulty_weight("TorF1", "extreme")
    with pytest.raises(ValueError, match="type"):
        RewardMapSample("Counting9")

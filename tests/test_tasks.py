"""Built-in tasks: determinism, disjoint splits, verifiable answers, RewardMap metadata, the dataset plug-in."""

from __future__ import annotations

import json

import pytest

from fastgrpo.tasks import TASKS, build_task, render_prompt
from fastgrpo.tasks.transit import QUESTION_TYPES, min_transfer_route, random_network
from fastgrpo.tiny import tiny_tokenizer

BUILTIN = [n for n in TASKS if n != "dataset"]


@pytest.mark.parametrize("name", BUILTIN)
def test_split_is_deterministic_and_disjoint(name):
    task = build_task(name)
    train, ev = task.split(40, 10, seed=3)
    train2, ev2 = task.split(40, 10, seed=3)
    assert [e.question for e in train] == [e.question for e in train2]
    assert [e.answer for e in ev] == [e.answer for e in ev2]
    assert len(train) == 40 and len(ev) == 10
    # the question text, or for an image task the question with its picture (Task._dedup_key)
    assert not {task._dedup_key(e) for e in ev} & {task._dedup_key(e) for e in train}
    for e in train + ev:
        assert e.messages[-1]["role"] == "user" and e.answer
        assert "<answer></answer>" in e.question
        assert e.meta["answer_type"] in ("numeric", "choice", "yesno", "route")


def test_compare_and_addition_answers():
    for e in build_task("compare").split(50, 0, 0)[0]:
        assert int(e.answer) == max(e.meta["x"], e.meta["y"]) and e.meta["x"] != e.meta["y"]
        assert len(e.messages) == 3 and e.messages[1]["content"] == "<answer>8</answer>"  # the worked example
    for e in build_task("addition").split(50, 0, 0)[0]:
        assert int(e.answer) == e.meta["a"] + e.meta["b"]
    assert len(build_task("compare", one_shot=False).split(1, 0, 0)[0][0].messages) == 1


def test_arithmetic_steps_are_correct():
    for e in build_task("arithmetic", num_ops=3).split(50, 0, 1)[0]:
        assert eval(e.meta["expression"]) == int(e.answer)  # the written expression means what the steps do
        assert len(e.meta["steps"]) == 3
        for step in e.meta["steps"]:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)
        assert e.meta["steps"][-1].endswith(f"= {e.answer}")


def test_mcq_answer_letter_points_at_the_right_option():
    for e in build_task("mcq").split(80, 0, 2)[0]:
        idx = "ABCD".index(e.answer)
        assert idx == e.meta["correct_index"] and len(set(e.meta["choices"])) == 4
        right = int(e.meta["choices"][idx])
        kind = e.meta["kind"]
        if kind == "largest":
            assert right == max(map(int, e.meta["choices"]))
        elif kind == "even":
            assert right % 2 == 0 and all(int(c) % 2 for i, c in enumerate(e.meta["choices"]) if i != idx)


def test_transit_network_and_routes():
    import random

    rng = random.Random(0)
    for _ in range(30):
        metro = random_network(rng, 5, 9)
        stations = sorted({s for st in metro.values() for s in st})
        s1, s2 = rng.sample(stations, 2)
        legs = min_transfer_route(metro, s1, s2)
        assert legs[0][1] == s1 and legs[-1][2] == s2
        for (line, dep, arr), nxt in zip(legs, legs[1:] + [None]):
            assert dep in metro[line] and arr in metro[line] and dep != arr
            if nxt is not None:
                assert nxt[1] == arr
        # fewest transfers: one leg exactly when a line holds both stations
        direct = any(s1 in st and s2 in st for st in metro.values())
        assert (len(legs) == 1) == direct


def test_transit_meta_for_rewardmap():
    task = build_task("transit")
    seen = set()
    for e in task.split(120, 0, 5)[0]:
        m = e.meta
        seen.add(m["type"])
        assert m["difficulty_city"] in ("easy", "middle", "hard") and isinstance(m["answer"], int)
        if m["type"] == "planning":
            assert m["transfer_count"] == len(m["route"]) - 1 and m["station_1"] and m["station_2"]
        if m["type"] in ("TorF1", "TorF2"):
            assert e.answer == ("yes" if m["answer"] else "no")
        if m["type"] == "Counting1":
            assert "ABCD"[m["answer"]] == e.answer
    assert seen == set(QUESTION_TYPES)
    only = build_task("transit", types=["planning"], difficulties=["easy"])
    assert {e.meta["type"] for e in only.split(10, 0, 0)[0]} == {"planning"}


def test_unknown_task_or_option_is_named():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        build_task("nope")
    with pytest.raises(ValueError, match=r"task.options.digits: unknown option"):
        build_task("addition", digits=2)
    with pytest.raises(ValueError, match="types must be"):
        build_task("transit", types=["TorF9"])


def test_dataset_task_from_jsonl(tmp_path):
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1), "level": i % 3} for i in range(20)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    task = build_task("dataset", source=str(f))
    train, ev = task.split(0, 5, seed=0)
    assert len(ev) == 5 and len(train) == 15
    assert not {e.question for e in ev} & {e.question for e in train}
    assert train[0].meta["level"] in (0, 1, 2) and "prompt" not in train[0].meta
    with pytest.raises(ValueError, match="no column 'question'"):
        build_task("dataset", source=str(f), prompt_field="question")


def test_render_prompt_uses_chat_template():
    tok = tiny_tokenizer()
    e = build_task("compare").split(1, 0, 0)[0][0]
    text = render_prompt(e.messages, tok)
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>user") == 2
    plain = render_prompt(e.messages, tok, chat_template=False)
    assert plain.startswith("User: What is 7+1?") and plain.endswith("Assistant:")


def test_transit_gold_answers_score_full_marks_with_rewardmap():
    """The task's ground truth is what RewardMap's scorer accepts: correct for every question type."""
    import dataclasses

    from fastgrpo.rewards import RewardMapSample, rewardmap_reward
    from fastgrpo.rewards.rewardmap import answer_accuracy
    from fastgrpo.rewards.terms import resolve_term

    accuracy = resolve_term("accuracy", {})
    fields = {f.name for f in dataclasses.fields(RewardMapSample)}
    seen = set()
    for e in build_task("transit").split(150, 0, 3)[0]:
        sample = RewardMapSample(**{k: v for k, v in e.meta.items() if k in fields})
        gold = f"<answer>{e.answer}</answer>"
        assert answer_accuracy(gold, sample), (e.meta["type"], e.answer)
        assert rewardmap_reward(gold, sample) >= 10.0 > rewardmap_reward("<answer>no idea</answer>", sample)
        # the accuracy term agrees (a route by RewardMap's checker: math-verify cannot read one)
        assert accuracy(gold, e, 0) == 1.0 and accuracy("<answer>no idea</answer>", e, 0) == 0.0
        seen.add(e.meta["type"])
    assert seen == set(QUESTION_TYPES)


def test_transit_one_shot_worked_example_of_the_same_type():
    """``one_shot``: a worked example of the question's own type (its answer scores full marks on its own small
    network) before the question; the drawn questions are the ones drawn without it."""
    from fastgrpo.rewards.terms import resolve_term

    accuracy = resolve_term("accuracy", {})
    plain = build_task("transit").split(40, 8, 7)
    shot = build_task("transit", one_shot=True).split(40, 8, 7)
    for a, b in zip(plain[0] + plain[1], shot[0] + shot[1]):
        assert [m["role"] for m in b.messages] == ["user", "assistant", "user"]
        assert b.messages[-1] == a.messages[-1] and (b.answer, b.meta) == (a.answer, a.meta)
        example_q, example_a = b.messages[0]["content"], b.messages[1]["content"]
        assert example_q != a.question and example_a.startswith("<answer>")
        kind = a.meta["type"]
        mark = {"TorF1": "a stop on", "TorF2": "common line", "Counting1": "strictly between",
                "Counting2": "How many lines", "Counting3": "How many stations", "planning": "Plan a route"}[kind]  # fmt: skip
        assert mark in example_q and mark in a.question
    ex = build_task("transit", types=["planning"], one_shot=True).split(1, 0, 0)[0][0]
    worked = ex.messages[1]["content"]
    assert "Route Name:" in worked and accuracy(worked, ex, 0) == 0.0  # another network's route is wrong here

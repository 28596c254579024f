"""TRL-style reward functions beside fastgrpo's own: signature detection at build time, the arguments TRL 1.16
passes, ``None`` rewards (nansum), errors naming the reward, and TRL-format datasets training on ``--tiny``."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import TINY_RUN

import fastgrpo.models
import fastgrpo.trainer as trainer_mod
from fastgrpo.config import ConfigError, load_config
from fastgrpo.rewards import RewardTerms, register_reward
from fastgrpo.rewards.registry import build_scheme
from fastgrpo.rewards.terms import reward_signature
from fastgrpo.tasks import Example

pytestmark = pytest.mark.usefixtures("one_thread")

# -- reward functions of both kinds (module level: configs import them as python:test_trl_rewards:NAME) ------

CALLS: list[dict] = []


def trl_digit(prompts, completions, completion_ids, solution, trainer_state, **kwargs):
    """TRL style: 1 when the completion holds a digit; None for rows whose ``kind`` is "skip"."""
    CALLS.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, solution=solution,
                      trainer_state=trainer_state, **kwargs))  # fmt: skip
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    kinds = kwargs.get("kind") or [None] * len(texts)
    return [None if k == "skip" else float(any(ch.isdigit() for ch in t)) for t, k in zip(texts, kinds)]


def trl_length(completions, completion_ids):
    """TRL style without **kwargs: it is given only what it names."""
    return [len(ids) / 10 for ids in completion_ids]


def per_completion(text, example):
    return float(len(text) % 2)


def needs_a_missing_column(completions, difficulty, **kwargs):
    return [0.0] * len(completions)


def one_argument(text):
    return 0.0


# -- signatures --------------------------------------------------------------------------------------------


def test_the_signature_decides_the_kind():
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    assert reward_signature(per_completion, "p").kind == "completion"
    assert reward_signature(lambda text, ex: 1.0, "l").kind == "completion"
    sig = reward_signature(trl_digit, "t")
    assert sig.kind == "batch" and sig.accepts is None
    assert sig.required == ("prompts", "completions", "completion_ids", "solution", "trainer_state")
    sig = reward_signature(trl_length, "n")
    assert sig.kind == "batch" and sig.accepts == {"completions", "completion_ids"}
    assert reward_signature(think_format_reward, "think").kind == "batch"  # TRL's own, unchanged
    assert (
        reward_signature(get_soft_overlong_punishment(8, 2), "overlong").kind == "batch"
    )  # a callable object
    assert reward_signature(lambda **kw: [], "kw").kind == "batch"
    with pytest.raises(
        ConfigError, match=r"rewards: reward 'one' has the signature \(text\); fastgrpo calls"
    ):
        reward_signature(one_argument, "one")
    with pytest.raises(ConfigError, match="has the signature"):
        reward_signature(lambda a, b, c: 0.0, "three")
    with pytest.raises(ConfigError, match="positional-only"):
        reward_signature(lambda completions, /, **kw: [], "posonly")
    with pytest.raises(ValueError, match="expected a function"):
        register_reward("not_a_function", 3.0)


# -- scoring -----------------------------------------------------------------------------------------------


def _examples():
    plain = Example([{"role": "user", "content": "What is 2+2?"}], "4", {"answer_type": "auto"},
                    raw_prompt="What is 2+2?", columns={"solution": "4", "kind": "math"})  # fmt: skip
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    conv = Example(
        chat, "", {"answer_type": "auto"}, raw_prompt=chat, columns={"solution": "red", "kind": "skip"}
    )
    return plain, conv


def test_batched_reward_gets_what_trl_passes():
    CALLS.clear()
    register_reward("trl_digit", trl_digit)
    register_reward("trl_length", trl_length)
    terms = RewardTerms([("trl_digit", 1.0, {}), ("trl_length", 0.5, {})], columns=["solution", "kind"])
    plain, conv = _examples()
    state = object()
    texts = ["it is 4", "no digits", "red"]
    out = terms.score_lists(texts, [plain, plain, conv], [[5, 6, 7], [8], [9, 9]], trainer_state=state)
    assert len(CALLS) == 1  # once per batch, not per completion
    call = CALLS[0]
    assert call["prompts"] == ["What is 2+2?", "What is 2+2?", conv.raw_prompt]
    # plain prompts get plain completions, conversational ones TRL's assistant message lists
    assert call["completions"] == ["it is 4", "no digits", [{"role": "assistant", "content": "red"}]]
    assert call["completion_ids"] == [[5, 6, 7], [8], [9, 9]]
    assert call["solution"] == ["4", "4", "red"] and call["kind"] == ["math", "math", "skip"]
    assert call["trainer_state"] is state and callable(call["log_metric"]) and callable(call["log_extra"])
    assert out["trl_digit"][:2] == [1.0, 0.0] and math.isnan(out["trl_digit"][2])  # None: not applicable
    assert out["trl_length"] == [0.3, 0.1, 0.2]  # given only completions and completion_ids
    # nansum: the None term counts 0 -> 1*1 + 0.5*0.3, 0 + 0.5*0.1, (none) + 0.5*0.2
    total = terms.total(terms.as_tensors([{k: v[i] for k, v in out.items()} for i in range(3)]))
    assert torch.equal(total, torch.tensor([1.0 + 0.5 * 0.3, 0.5 * 0.1, 0.5 * 0.2], dtype=torch.float32))
    assert terms.total({k: v[2] for k, v in out.items()}) == 0.5 * 0.2
    # means over the completions a term applies to (TRL's nanmean)
    means = terms.means(terms.score_batch(texts, [plain, plain, conv], [[5, 6, 7], [8], [9, 9]]))
    assert means["trl_digit"] == 0.5 and means["trl_length"] == pytest.approx(0.2)


def test_log_metric_is_averaged_and_log_extra_warns_once(caplog):
    def logs(completions, log_metric, log_extra, **kwargs):
        log_metric("my/metric", len(completions))
        log_extra("note", ["x"] * len(completions))
        return [1.0] * len(completions)

    register_reward("logs", logs)
    terms = RewardTerms([("logs", 1.0, {})])
    plain, _ = _examples()
    with caplog.at_level(logging.WARNING, logger="fastgrpo.rewards.terms"):
        terms.score_lists(["a"], [plain], [[1]])
        terms.score_lists(["a", "b", "c"], [plain] * 3, [[1]] * 3)
    assert terms.pop_metrics() == {"my/metric": 2.0} and terms.pop_metrics() == {}
    assert caplog.text.count("log_extra") == 1


def test_every_reward_none_warns_and_scores_zero(caplog):
    register_reward("never", lambda completions, **kw: [None] * len(completions))
    register_reward("never_either", lambda text, example: None)  # fastgrpo's kind may return None too
    terms = RewardTerms([("never", 1.0, {}), ("never_either", 2.0, {})])
    plain, _ = _examples()
    with caplog.at_level(logging.WARNING, logger="fastgrpo.rewards.terms"):
        values = terms.score_batch(["x", "y"], [plain, plain], [[1], [2]])
    assert "every reward returned None for 2 of 2 completions" in caplog.text
    assert torch.equal(terms.total(values), torch.zeros(2))
    assert terms.means(values) == {"never": None, "never_either": None}


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda completions, **kw: [1.0], r"reward 'bad' returned 1 rewards for 2 completions"),
        (
            lambda completions, **kw: {"a": 1},
            r"reward 'bad' returned dict; a TRL-style reward returns a list",
        ),
        (lambda completions, **kw: 1.0, r"reward 'bad' returned float"),
        (lambda completions, **kw: [1.0, "high"], r"reward 'bad' returned 'high' \(str\) for completion 1"),
        (
            lambda completions, **kw: [float("nan"), 1.0],
            r"reward 'bad' returned nan for completion 0; rewards must",
        ),
        (lambda completions, **kw: [1.0, math.inf], r"reward 'bad' returned inf for completion 1"),
        (lambda text, example: float("nan"), r"reward 'bad' returned nan for completion 0"),
        (lambda text, example: [1.0], r"reward 'bad' returned \[1.0\] \(list\) for completion 0"),
    ],
)
def test_bad_reward_values_name_the_reward(fn, message):
    register_reward("bad", fn)
    terms = RewardTerms([("bad", 1.0, {})])
    plain, _ = _examples()
    with pytest.raises(ValueError, match=message):
        terms.score_lists(["a1", "b"], [plain, plain], [[1], [2]])


def test_trl_library_rewards_run_unchanged():
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    register_reward("overlong", get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4))
    register_reward("think", think_format_reward)
    terms = RewardTerms([("overlong", 1.0, {}), ("think", 1.0, {})])
    _, conv = _examples()
    texts = ["<think>x</think>y", "no tags", "<think>a"]
    out = terms.score_lists(texts, [conv] * 3, [[1] * 5, [1] * 8, [1] * 12])
    assert out == {"overlong": [0.0, -0.5, -1.0], "think": [1.0, 0.0, 0.0]}  # (6 - 8) / 4 = -0.5


def test_numbers_of_any_kind_are_accepted():
    import numpy as np

    register_reward("numbers", lambda completions, **kw: np.array([True, 2, 0.5]))  # TRL takes these too
    register_reward("tensor", lambda completions, **kw: torch.tensor([1.0, 0.0, 2.0]))
    terms = RewardTerms([("numbers", 1.0, {}), ("tensor", 1.0, {})])
    plain, _ = _examples()
    out = terms.score_lists(["a", "b", "c"], [plain] * 3, [[1]] * 3)
    assert out == {"numbers": [1.0, 2.0, 0.5], "tensor": [1.0, 0.0, 2.0]}


def test_per_completion_terms_are_the_schemes_values():
    """The built-in terms through the batched call give the schemes' own floats, bit for bit."""
    acc, fmt = build_scheme("accuracy"), build_scheme({"name": "format", "params": {"pattern": ".*[0-9].*"}})
    terms = RewardTerms([("accuracy", 1.0, {}), ("format", 0.5, {"pattern": ".*[0-9].*"})])
    ex = Example([{"role": "user", "content": "2+2?"}], "4", {"answer_type": "numeric"})
    texts = ["<answer>4</answer>", "five", "<answer>4.0</answer> 7", "the answer is 3"]
    out = terms.score_lists(texts, [ex] * 4, [3, 1, 5, 4])  # lengths only: per-completion terms need no ids
    assert out["accuracy"] == [acc(t, "4", mode="numeric") for t in texts]
    assert out["format"] == [fmt(t) for t in texts]
    assert terms.score("five", ex, 1) == {"accuracy": 0.0, "format": 0.0}
    assert terms.fns["accuracy"]("<answer>4</answer>", ex, 3) == 1.0


# -- through the trainer -----------------------------------------------------------------------------------


def _dataset(tmp_path, conversational: bool):
    rows = []
    for i in range(8):
        q = f"What is {i} + 1?"
        prompt = [{"role": "user", "content": q}] if conversational else q
        # TRL's accuracy_reward returns None where the gold solution does not parse ("n/a")
        rows.append(
            {
                "prompt": prompt,
                "solution": str(i + 1) if i % 4 else "n/a",
                "kind": "skip" if i % 2 else "math",
            }
        )
    path = tmp_path / "trl.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _cfg(tmp_path, data, rewards, *extra):
    return load_config(
        None,
        [*TINY_RUN, "task.name=dataset", f"task.dataset={data}", "task.answer_field=null", "task.num_eval=2",
         "rollout.group_size=4", "rollout.prompts_per_step=2", "train.steps=2", f"rewards={rewards}",
         f"train.output_dir={tmp_path}", "train.run_name=r", "train.log_completions=8", *extra],
    )  # fmt: skip


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
def test_trl_rewards_and_dataset_train_two_steps(tmp_path, conversational):
    pytest.importorskip("math_verify")  # TRL's accuracy_reward uses it
    CALLS.clear()
    # TRL's own rewards read conversational completions (completion[0]["content"]), as they do in TRL
    trl_own = "{name: 'python:trl.rewards:accuracy_reward'}" if conversational else "{name: trl_length}"
    register_reward("trl_length", trl_length)
    rewards = f"[{{name: 'python:test_trl_rewards:trl_digit'}}, {trl_own}]"
    res = trainer_mod.train(
        _cfg(tmp_path, _dataset(tmp_path, conversational), rewards, "train.eval_prompts=2")
    )
    assert [r["step"] for r in res.metrics] == [1, 2]
    train_calls = [c for c in CALLS if len(c["completions"]) == 8]  # 2 prompts x 4 completions a step
    assert len(train_calls) == 2
    assert [c["trainer_state"].global_step for c in train_calls] == [0, 1]
    assert all(c["trainer_state"].max_steps == 2 for c in train_calls)
    first = train_calls[0]
    assert all(isinstance(c, list) == conversational for c in first["completions"])
    assert all(isinstance(p, list) == conversational for p in first["prompts"])
    assert first["solution"][0] in {str(i + 1) for i in range(8)} | {"n/a"}
    lines = [json.loads(x) for x in (tmp_path / "r" / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and {"example", "prompt", "rewards", "reward", "advantage"} <= set(lines[0])
    for line, kind, solution in zip(lines[:8], first["kind"], first["solution"]):  # step 1, in scoring order
        assert (line["rewards"]["python:test_trl_rewards:trl_digit"] is None) == (kind == "skip")
        if conversational:
            assert (line["rewards"]["python:trl.rewards:accuracy_reward"] is None) == (solution == "n/a")
    for line in lines:
        terms = [v for v in line["rewards"].values() if v is not None]
        assert terms and line["reward"] == pytest.approx(sum(terms))  # nansum with weights 1
    for step in (lines[:8], lines[8:]):  # group-relative: advantages of a group sum to 0
        for g in range(2):
            assert sum(x["advantage"] for x in step[4 * g : 4 * g + 4]) == pytest.approx(0.0, abs=1e-5)
    assert all(r["eval/reward"] is not None for r in res.metrics if "eval/reward" in r)


def test_wrong_shaped_rewards_fail_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the rewards were checked")

    monkeypatch.setattr(fastgrpo.models, "load_policy", no_model)
    data = _dataset(tmp_path, conversational=False)
    with pytest.raises(ConfigError, match=r"reward 'python:test_trl_rewards:one_argument' has the signature"):
        trainer_mod.Trainer(_cfg(tmp_path, data, "[{name: 'python:test_trl_rewards:one_argument'}]"))
    with pytest.raises(
        ConfigError, match=r"requires the argument\(s\) \['difficulty'\].*\['kind', 'solution'\]"
    ):
        trainer_mod.Trainer(
            _cfg(tmp_path, data, "[{name: 'python:test_trl_rewards:needs_a_missing_column'}]")
        )
    with pytest.raises(ConfigError, match=r"cannot import reward function 'python:test_trl_rewards:nothing'"):
        trainer_mod.Trainer(_cfg(tmp_path, data, "[{name: 'python:test_trl_rewards:nothing'}]"))
    with pytest.raises(ConfigError, match=r"its params \['x'\] would be ignored"):
        trainer_mod.Trainer(
            _cfg(tmp_path, data, "[{name: 'python:test_trl_rewards:trl_length', params: {x: 1}}]")
        )

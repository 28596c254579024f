"""The dataset task with datasets as users have them: in memory, saved to disk, data files; plain and
conversational prompts; optional answers; separate eval data; no silent cap; media columns passed through."""

from __future__ import annotations

import json
import logging

import pytest

import fastgrpo.models

datasets = pytest.importorskip("datasets")

from fastgrpo.rewards.outcome import ANSWER_REWARDS, accuracy_reward  # noqa: E402
from fastgrpo.tasks import DatasetTask, build_task  # noqa: E402
from fastgrpo.tasks.dataset import ExampleList  # noqa: E402


def _rows(n: int, start: int = 0, **extra) -> list[dict]:
    return [
        {"prompt": f"What is {i}+1?", "answer": str(i + 1), "level": i % 3, **extra}
        for i in range(start, start + n)
    ]


def _conversational(n: int) -> list[dict]:
    return [
        {
            "prompt": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"What is {i}*2?"},
            ],
            "solution": f"{i} * 2 = <<{i}*2={2 * i}>>{2 * i}\n#### {2 * i}",
        }
        for i in range(n)
    ]


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


# -- sources -------------------------------------------------------------------------------------------------


def test_in_memory_dataset_uses_every_row_and_logs_the_counts(caplog):
    ds = datasets.Dataset.from_list(_rows(700))
    task = build_task("dataset", source=ds)
    with caplog.at_level(logging.INFO, logger="fastgrpo.tasks.dataset"):
        train, ev = task.split(0, 64, seed=0)
    # more rows than the trainer's old default cap of 512: all of them are used
    assert len(train) == 700 - 64 and len(ev) == 64
    assert not {e.question for e in ev} & {e.question for e in train}
    assert "training on 636 of 636 rows of split 'train'" in caplog.text
    assert "evaluating on 64 rows (held out of split 'train')" in caplog.text
    # an explicit limit is a limit, and says so
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastgrpo.tasks.dataset"):
        train, _ = task.split(100, 64, seed=0)
    assert (
        len(train) == 100
        and "training on 100 of 636 rows" in caplog.text
        and "num_train limit" in caplog.text
    )


def test_splits_are_deterministic_and_lazy():
    task = DatasetTask(datasets.Dataset.from_list(_rows(30)))
    a, b = task.split(0, 5, seed=3), task.split(0, 5, seed=3)
    assert [e.question for e in a[0]] == [e.question for e in b[0]]
    assert [e.question for e in task.split(0, 5, seed=4)[0]] != [e.question for e in a[0]]
    train = a[0]
    assert isinstance(train, ExampleList) and len(train) == 25
    assert [e.question for e in train[2:5]] == [train[i].question for i in (2, 3, 4)]
    assert train[-1].question == list(train)[-1].question
    assert (
        train[0].meta["level"] in (0, 1, 2)
        and "prompt" not in train[0].meta
        and "answer" not in train[0].meta
    )


def test_dataset_dict_in_memory_with_an_eval_split(caplog):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(_rows(40)), test=datasets.Dataset.from_list(_rows(10, start=100))
    )
    task = build_task("dataset", source=dd, eval_split="test")
    with caplog.at_level(logging.INFO, logger="fastgrpo.tasks.dataset"):
        train, ev = task.split(0, 0, seed=0)
    assert len(train) == 40 and len(ev) == 10  # num_eval <= 0: the whole eval split
    assert {e.answer for e in ev} == {str(i + 1) for i in range(100, 110)}
    assert "evaluating on 10 rows (split 'test')" in caplog.text
    assert len(task.split(0, 4, seed=0)[1]) == 4
    with pytest.raises(ValueError, match=r"no split 'validation' \(splits: \['train', 'test'\]\)"):
        DatasetTask(dd, eval_split="validation")
    with pytest.raises(ValueError, match="no split 'dev'"):
        DatasetTask(dd, split="dev")
    with pytest.raises(ValueError, match="eval_split 'train' is the training split"):
        DatasetTask(dd, eval_split="train")


def test_saved_dataset_dict_and_dataset_directories(tmp_path):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(_conversational(12)),
        test=datasets.Dataset.from_list(_conversational(4)),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    task = build_task("dataset", source=str(tmp_path / "dd"), answer_field="solution", eval_split="test")
    train, ev = task.split(0, 0, seed=0)
    assert (len(train), len(ev)) == (12, 4)
    ex = train[0]
    assert [m["role"] for m in ex.messages] == ["system", "user"]
    assert accuracy_reward("<answer>" + ex.answer.rsplit("#### ", 1)[1] + "</answer>", ex.answer) == 1.0
    datasets.Dataset.from_list(_rows(6)).save_to_disk(str(tmp_path / "one"))
    assert len(DatasetTask(str(tmp_path / "one")).split(0, 2, seed=0)[0]) == 4


def test_jsonl_files_with_a_separate_eval_file(tmp_path):
    train_f = _write_jsonl(tmp_path / "train.jsonl", _rows(20))
    eval_f = _write_jsonl(tmp_path / "eval.jsonl", _rows(6, start=50))
    task = build_task("dataset", source=str(train_f), eval_source=str(eval_f))
    train, ev = task.split(0, 0, seed=0)
    assert (len(train), len(ev)) == (20, 6)
    assert {e.answer for e in ev} == {str(i + 1) for i in range(50, 56)}
    with pytest.raises(ValueError, match="one data file, its only split is 'train'.*eval_source"):
        DatasetTask(str(train_f), eval_split="test")
    with pytest.raises(ValueError, match="not a supported data file"):
        DatasetTask(str(_write_jsonl(tmp_path / "d.txt", _rows(2))))


def test_a_directory_of_data_files(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _rows(8))
    _write_jsonl(tmp_path / "test.jsonl", _rows(3, start=20))
    task = DatasetTask(str(tmp_path), eval_split="test")
    train, ev = task.split(0, 0, seed=0)
    assert (len(train), len(ev)) == (8, 3)
    with pytest.raises(ValueError, match="validation"):
        DatasetTask(str(tmp_path), eval_split="validation")


def test_list_of_dicts_and_streaming_refused():
    assert len(DatasetTask(_rows(4)).split(0, 1, seed=0)[0]) == 3
    with pytest.raises(ValueError, match="must hold dicts"):
        DatasetTask(["What is 1+1?"])
    streamed = datasets.Dataset.from_list(_rows(4)).to_iterable_dataset()
    with pytest.raises(ValueError, match="streaming datasets are not supported"):
        DatasetTask(streamed)
    with pytest.raises(ValueError, match="is empty"):
        DatasetTask(datasets.Dataset.from_list(_rows(2)).select([]))


# -- prompts -------------------------------------------------------------------------------------------------


def test_plain_and_conversational_prompts_and_the_system_prompt():
    plain = DatasetTask(_rows(2), system_prompt="Be brief.").split(0, 0, seed=0)[0][0]
    assert plain.messages[0] == {"role": "system", "content": "Be brief."}
    assert plain.messages[1]["role"] == "user" and plain.question.startswith("What is")
    conv = DatasetTask(_conversational(2), answer_field="solution", system_prompt="Other.").split(0, 0, 0)[0][
        0
    ]
    # the conversation's own system turn is kept, not doubled
    assert [m["role"] for m in conv.messages] == ["system", "user"]
    assert conv.messages[0]["content"] == "Answer briefly."


def test_bad_prompts_name_the_row_and_column():
    with pytest.raises(
        ValueError, match=r"no column 'question' for the prompts.*columns: \['answer', 'level', 'prompt'\]"
    ):
        DatasetTask(_rows(2), prompt_field="question")
    task = DatasetTask([{"prompt": "fine", "answer": "1"}, {"prompt": 7, "answer": "2"}])
    with pytest.raises(ValueError, match=r"row 1, column 'prompt': a prompt is a string or .*got int"):
        task.example(task.rows[1], index=1)
    task = DatasetTask([{"prompt": [{"text": "no role"}], "answer": "1"}])
    with pytest.raises(ValueError, match="chat messages with 'role' and 'content'"):
        task.split(0, 0, seed=0)[0][0]


# -- answers -------------------------------------------------------------------------------------------------


def test_no_answer_column():
    rows = [{"prompt": f"Write a haiku about {w}."} for w in ("rain", "snow", "sun", "wind")]
    task = DatasetTask(datasets.Dataset.from_list(rows))
    assert not task.has_answers
    train, _ = task.split(0, 1, seed=0)
    assert all(e.answer == "" for e in train)
    task.check_rewards(["format", "length"])  # rewards that need no gold answer are fine
    for name in ANSWER_REWARDS:
        with pytest.raises(
            ValueError, match=rf"reward '{name}' compares completions with the gold answer.*answer_field"
        ):
            task.check_rewards(["format", name])
    with pytest.raises(ValueError, match="reward 'accuracy'.*gold answer is empty"):
        accuracy_reward("<answer>x</answer>", train[0].answer)
    # answer_field=None ignores an existing answer column
    assert DatasetTask(_rows(3), answer_field=None).split(0, 0, 0)[0][0].answer == ""
    DatasetTask(_rows(3)).check_rewards(["accuracy"])
    # a column named explicitly must exist
    with pytest.raises(ValueError, match="no column 'solution' for the answers.*answer_field=None"):
        DatasetTask(_rows(3), answer_field="solution")


def test_eval_data_must_have_the_columns(tmp_path):
    eval_f = _write_jsonl(tmp_path / "eval.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match="eval data has no prompt column 'prompt'"):
        DatasetTask(_rows(4), eval_source=str(eval_f))


# -- media ---------------------------------------------------------------------------------------------------


def test_images_and_videos_pass_through():
    rows = [
        {"prompt": "What is shown?", "answer": "cat", "images": ["img-a.png", "img-b.png"], "videos": None},
        {"prompt": "And here?", "answer": "dog", "images": "img-c.png", "videos": [["f0", "f1"]]},
    ]
    task = DatasetTask(rows)
    a, b = (task.example(r) for r in rows)
    assert a.images == ["img-a.png", "img-b.png"] and a.videos == [] and a.is_multimodal
    assert b.images == ["img-c.png"] and b.videos == [["f0", "f1"]]
    assert "images" not in a.meta and "videos" not in b.meta
    assert not task.example({"prompt": "text only", "answer": "1"}).is_multimodal


# -- through the trainer (two tiny steps) ----------------------------------------------------------------------

_TINY = [
    "model.name=tiny",
    "train.progress=false",
    "train.plot=false",
    "train.eval_prompts=0",
    "train.steps=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=4",
    "task.name=dataset",
    "task.num_eval=2",
]


@pytest.mark.parametrize("kind", ["conversational", "plain-no-answers"])
def test_trains_two_steps_on_a_users_jsonl(tmp_path, kind):
    from fastgrpo.config import load_config
    from fastgrpo.trainer import train

    if kind == "conversational":  # TRL's conversational format with a GSM8K-style solution column, two splits
        (tmp_path / "data").mkdir()
        _write_jsonl(tmp_path / "data" / "train.jsonl", _conversational(8))
        f = _write_jsonl(tmp_path / "data" / "test.jsonl", _conversational(3)).parent
        extra = ["task.answer_field=solution", "task.eval_split=test", "train.eval_prompts=3"]
    else:  # plain prompts, no answer column, a reward that needs none
        f = _write_jsonl(
            tmp_path / "d.jsonl", [{"prompt": f"Say {w}."} for w in ("a", "b", "c", "d", "e", "f")]
        )
        extra = ["rewards=[{name: format, params: {pattern: '.*'}}]"]
    cfg = load_config(None, [*_TINY, f"task.dataset={f}", f"train.output_dir={tmp_path}", *extra])
    result = train(cfg)
    assert len(result.metrics) == 2 and all(r["reward"] == r["reward"] for r in result.metrics)  # no NaN
    if kind == "conversational":
        assert [step for step, _ in result.evals] == [0, 2]  # greedy accuracy on the test split's 3 prompts


def test_trainer_wiring_of_the_dataset_task(tmp_path, monkeypatch):
    """Unset task.num_train trains on every row; a reward that needs answers, on a dataset without them, and a
    text-only model given images fail before any model is loaded (load_policy is never called)."""
    from fastgrpo.config import ConfigError, load_config
    from fastgrpo.trainer import Trainer

    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(700)]
    f = _write_jsonl(tmp_path / "d.jsonl", rows)
    t = Trainer(
        load_config(None, [*_TINY, f"task.dataset={f}", f"train.output_dir={tmp_path}"]), write_run=False
    )
    assert len(t.train_set) == 700 - 2  # all of them, not 512: two held out for eval
    with pytest.raises(
        ConfigError, match=r"rewards\.0\.name: 'accuracy' compares completions with the gold answer"
    ):
        load_config(
            None, [*_TINY, f"task.dataset={f}", "task.answer_field=null", "rewards=[{name: accuracy}]"]
        )

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(fastgrpo.models, "load_policy", no_model)
    g = _write_jsonl(
        tmp_path / "noanswer.jsonl", [{"prompt": "Say a."}, {"prompt": "Say b."}, {"prompt": "Say c."}]
    )
    with pytest.raises(ConfigError, match="reward 'accuracy' compares completions with the gold answer"):
        Trainer(load_config(None, [*_TINY, f"task.dataset={g}", "rewards=[{name: accuracy}]"]))
    monkeypatch.undo()
    img = tmp_path / "pic.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    media = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
              "answer": "x", "images": [str(img)]}] * 4  # fmt: skip
    h = _write_jsonl(tmp_path / "media.jsonl", media)
    with pytest.raises(
        ConfigError,
        match=r"split: example \d+: images: the example has images / video but the model is text-only",
    ):
        Trainer(
            load_config(None, [*_TINY, f"task.dataset={h}", f"train.output_dir={tmp_path}"]), write_run=False
        )

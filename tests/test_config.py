"""Config: YAML loading, --set overrides with coercion, clear errors naming the key, every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastgrpo.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
METHODS = {"grpo", "dr_grpo", "dapo", "gspo", "rewardmap", "care", "copo", "mmr1", "prm"}


def test_defaults_validate():
    cfg = Config().validate()
    assert cfg.loss.loss_type == "dapo" and cfg.rollout.group_size == 8
    assert [(t.name, t.weight) for t in cfg.rewards] == [("format", 0.5), ("accuracy", 1.0)]


def test_overrides_coerce_types():
    cfg = load_config(None, ["loss.beta=0.04", "optim.lr=1e-4", "rewards.1.weight=2", "model.lora.enabled=yes",
                             "model.lora.target_modules=[q_proj,v_proj]", "loss.eps_high=0.28",
                             "loss.eps_high=null", "train.steps=3.0", "task.options={lo: 1, hi: 5}"])  # fmt: skip
    assert cfg.loss.beta == 0.04 and isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-4
    assert cfg.rewards[1].weight == 2.0 and isinstance(cfg.rewards[1].weight, float)
    assert cfg.model.lora.enabled is True and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.loss.eps_high is None
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)
    assert cfg.task.options == {"lo": 1, "hi": 5}


def test_yaml_strings_for_numbers(tmp_path):
    # PyYAML reads "2e-4" (no dot) as a string; the float field coerces it
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 2e-4\nrollout: {group_size: '4'}\n")
    cfg = load_config(f)
    assert cfg.optim.lr == 2e-4 and cfg.rollout.group_size == 4


@pytest.mark.parametrize(
    "override, match",
    [
        ("loss.loss_typ=grpo", r"loss\.loss_typ: unknown key; did you mean 'loss_type'"),
        ("los.beta=1", r"los: unknown key; did you mean 'loss'"),
        ("loss.loss_type=foo", r"loss\.loss_type: 'foo' is not one of"),
        ("optim.lr=fast", r"optim\.lr: expected a number"),
        ("train.steps=1.5", r"train\.steps: expected an integer"),
        ("model.lora.enabled=maybe", r"model\.lora\.enabled: expected a boolean"),
        ("rewards.7.weight=1", r"rewards\.7: no list item"),
        ("rewards.0.wieght=1", r"rewards\.0\.wieght: unknown key"),
        ("train.steps", r"expected KEY=VALUE"),
        ("train.steps=0", r"train\.steps: must be > 0"),
        ("rollout.temperature=0", r"rollout\.temperature: must be > 0"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_yaml_key_names_the_dotted_path(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  lora:\n    rank: 8\n")
    with pytest.raises(ConfigError, match=r"model\.lora\.rank: unknown key"):
        load_config(f)
    f.write_text("rewards:\n  - {name: format, wieght: 1}\n")
    with pytest.raises(ConfigError, match=r"rewards\.0\.wieght: unknown key"):
        load_config(f)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="model.reference"):
        load_config(None, ["loss.beta=0.1", "model.reference=none"])
    with pytest.raises(ConfigError, match="adapter-off"):
        load_config(None, ["model.reference=adapter-off"])
    with pytest.raises(ConfigError, match="EMA"):
        load_config(None, ["advantage.care.enabled=true", "model.reference=frozen"])


def test_reference_mode_auto():
    assert Config().reference_mode() == "none"
    assert load_config(None, ["loss.beta=0.1"]).reference_mode() == "frozen"
    assert load_config(None, ["loss.beta=0.1", "model.lora.enabled=true"]).reference_mode() == "adapter-off"
    assert load_config(None, ["advantage.care.enabled=true"]).reference_mode() == "ema"


def test_round_trip():
    cfg = load_config(None, ["loss.beta=0.04", "rewards.0.params={pattern: x}"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    assert apply_overrides(cfg, []) == cfg


def test_every_method_has_a_config():
    assert METHODS <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0

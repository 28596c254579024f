"""fastgrpo.rewards.registry: every scheme by name, typed parameters, config validation."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import pytest
import torch

from fastgrpo.advantages import group_advantages
from fastgrpo.rewards import registry
from fastgrpo.rewards.registry import build_scheme, get_scheme, list_schemes, register_scheme, scheme_params

# what configs and the library build by name (nothing registered that nothing builds)
EXPECTED = {
    "grpo", "dr_grpo", "rloo", "reinforce_pp", "accuracy", "format", "dapo", "rewardmap", "curriculum",
    "gated_curriculum", "care", "care_confidence", "copo", "mmr1_vps", "vas", "grounded_prm", "prm_greedy_search",
}  # fmt: skip


def test_every_scheme_is_registered_and_builds_with_defaults():
    assert EXPECTED == set(list_schemes())
    for name in list_schemes():
        scheme = build_scheme(name)
        assert scheme.name == name and dataclasses.is_dataclass(scheme.params)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_params_are_keyword_arguments_of_the_target(name):
    spec = get_scheme(name)
    target = spec.target.__init__ if inspect.isclass(spec.target) else spec.target
    sig = inspect.signature(target)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for f in dataclasses.fields(spec.params):
        assert f.name in sig.parameters or has_var_kw, f"{name}: {f.name} is not an argument of the target"


def test_build_and_call_matches_direct_call():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.equal(build_scheme("grpo")(r, 4), group_advantages(r, 4))
    assert torch.equal(build_scheme("dr_grpo")(r, 4), group_advantages(r, 4, scale="none"))
    s = build_scheme({"name": "grpo", "params": {"eps": 1e-6, "scale": "batch"}})
    assert torch.equal(s(r, 4), group_advantages(r, 4, eps=1e-6, scale="batch"))
    # call-site keywords win over the configured ones (two groups, so group and batch std differ)
    r2 = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    assert torch.equal(s(r2, 4, scale="group"), group_advantages(r2, 4, eps=1e-6))
    assert not torch.equal(s(r2, 4), group_advantages(r2, 4, eps=1e-6))
    copo = build_scheme({"name": "copo", "params": {"k": 20, "b": 0.5}})  # YAML ints accepted for floats
    assert copo.params.k == 20.0 and isinstance(copo.params.k, float)
    out = copo(torch.tensor([1.0, 0.0]), ["1", "2"], 2)
    assert out.blend.shape == (2,)
    rm = build_scheme(
        {"name": "rewardmap", "params": {"difficulty_aware": False, "city_weights": {"easy": 2.0}}}
    )
    assert rm.params.city_weights == {"easy": 2.0}
    cur = build_scheme({"name": "curriculum", "params": {"seed": 0}})([[1], [0]])
    assert list(cur) == [1, 0]
    vas = build_scheme({"name": "vas", "params": {"mix_ratio": 0.25}})(10, 8)
    assert vas.weighted_per_batch == 2


@pytest.mark.parametrize(
    "config, match",
    [
        ("nope", "unknown scheme 'nope'"),
        ({"name": "grpo", "params": {"epsilon": 1.0}}, r"no parameter\(s\) \['epsilon'\]"),
        ({"name": "grpo", "params": {"scale": "std"}}, "'scale': 'std' is not one of"),
        ({"name": "grpo", "params": {"eps": "small"}}, "'eps': expected a number"),
        ({"name": "dapo", "params": {"max_length": 1.5}}, "'max_length': expected an integer"),
        ({"name": "dapo", "params": {"overlong_shaping": 1}}, "expected a boolean"),
        ({"name": "care", "params": {"margin": "x"}}, "'margin'"),
        ({"name": "grpo", "param": {}}, "unknown key"),
        ({"params": {}}, "mapping with 'name'"),
    ],
)
def test_bad_configs_raise(config, match):
    with pytest.raises(ValueError, match=match):
        build_scheme(config)


def test_optional_and_register_custom(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registrations stay in this test
    assert scheme_params("care", {"margin": None}).margin is None
    assert scheme_params("gated_curriculum", {"max_passes": None}).max_passes is None

    @dataclass
    class Params:
        scale: float = 2.0

    register_scheme("test_double", kind="reward", params=Params, target=lambda x, *, scale: scale * x)
    assert build_scheme({"name": "test_double", "params": {"scale": 3}})(2.0) == 6.0
    with pytest.raises(ValueError, match="already registered"):
        register_scheme("test_double", kind="reward", params=Params, target=lambda x, *, scale: x)
    with pytest.raises(ValueError, match="kind"):
        register_scheme("test_other", kind="loss", params=Params, target=lambda x: x)
    assert "test_double" in list_schemes("reward") and "test_double" not in list_schemes("sampler")

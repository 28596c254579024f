"""fastgrpo.rewards.copo: answer entropy, global / local advantages, blend weight and gating."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgrpo.rewards.copo import answer_entropy_bits, answer_labels, canonicalize_answer, copo_advantages


def test_answer_entropy_hand_computed():
    answers = ["1", "1", "1", "1", "2", "2"] + ["a", "b", "c", "d", "e", "f"] + ["7"] * 6
    h = answer_entropy_bits(answers, 6)
    # p = (2/3, 1/3): H = 0.9182958 bits; six distinct: log2 6 = 2.5849625; all equal: 0
    torch.testing.assert_close(h, torch.tensor([0.9182958, math.log2(6), 0.0]))


def test_canonicalisation_modes():
    same = ["0.5", "1/2", "\\frac{1}{2}", "$0.50$"]
    assert answer_entropy_bits(same, 4).item() == 0.0
    # official: raw strings -> four distinct answers -> log2 4 = 2 bits
    assert answer_entropy_bits(same, 4, canonicalize="none").item() == pytest.approx(2.0)
    assert canonicalize_answer(" Paris. ") == "paris"
    assert canonicalize_answer(None) is None
    # missing answers form one class: [None, None, "3", "3"] -> p = (1/2, 1/2) -> 1 bit
    assert answer_entropy_bits([None, None, "3", "3"], 4).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="canonicalize"):
        canonicalize_answer("1", mode="latex")


def test_sympy_canonicalisation():
    pytest.importorskip("sympy")
    labels = answer_labels(["x^2+2x+1", "(x+1)^2", "x"], canonicalize="sympy")
    assert labels.tolist() == [0, 0, 1]
    assert answer_labels(["x^2+2x+1", "(x+1)^2", "x"]).tolist() == [0, 1, 2]


def test_copo_advantages_hand_computed():
    # K = 6, two prompts. Group 0: 5 right answers "4" + one wrong "5"; group 1: all wrong, all different.
    r = torch.tensor([1.0, 1, 1, 1, 1, 0] + [0.0] * 6)
    answers = ["4"] * 5 + ["5"] + ["a", "b", "c", "d", "e", "f"]
    out = copo_advantages(r, answers, 6)
    # entropy: group 0 p = (5/6, 1/6) -> H0 = 0.6500224; group 1 -> log2 6
    h0 = -(5 / 6 * math.log2(5 / 6) + 1 / 6 * math.log2(1 / 6))
    torch.testing.assert_close(out.entropy, torch.tensor([h0, math.log2(6)]))
    # local: group 0 mean 5/6, unbiased std sqrt(1/6) = 0.4082483: right -> (1/6)/0.40825 = 0.4082, wrong -2.0412;
    # group 1 has no spread -> 0
    s = math.sqrt(1 / 6) + 1e-6
    torch.testing.assert_close(out.local_advantages, torch.tensor([1 / 6 / s] * 5 + [-5 / 6 / s] + [0.0] * 6))
    # global: R = [5/6, 0] -> +-1/sqrt(2) broadcast to the group
    torch.testing.assert_close(out.global_reward, torch.tensor([5 / 6, 0.0]))
    torch.testing.assert_close(
        out.global_advantages, torch.tensor([0.70710678] * 6 + [-0.70710678] * 6), atol=1e-5, rtol=0
    )
    # blend (soft-with-zero): w0 = sigmoid(5 (0.65 - 1)) = 0.1480; the wrong sample and group 1 (all r = 0) get 0
    w0 = 1 / (1 + math.exp(-5 * (h0 - 1)))
    torch.testing.assert_close(out.blend, torch.tensor([w0] * 5 + [0.0] * 7))
    a_glob, a_loc = out.pair
    assert a_glob is out.global_advantages and a_loc is out.local_advantages


def test_copo_gating_variants_and_coefficient():
    r = torch.tensor([1.0, 1, 1, 1, 1, 0] + [0.0] * 6)
    answers = ["4"] * 5 + ["5"] + ["a", "b", "c", "d", "e", "f"]
    h0 = -(5 / 6 * math.log2(5 / 6) + 1 / 6 * math.log2(1 / 6))
    w0, w1 = 1 / (1 + math.exp(-5 * (h0 - 1))), 1 / (1 + math.exp(-5 * (math.log2(6) - 1)))
    forced = copo_advantages(r, answers, 6, gating="soft-with-forced")
    # the zero-spread group is pure global
    torch.testing.assert_close(forced.blend, torch.tensor([w0] * 6 + [0.0] * 6))
    soft = copo_advantages(r, answers, 6, gating="only-soft")
    torch.testing.assert_close(soft.blend, torch.tensor([w0] * 6 + [w1] * 6))
    assert copo_advantages(r, answers, 6, gating="only-global").blend.tolist() == [0.0] * 12
    assert copo_advantages(r, answers, 6, gating="no-global").blend.tolist() == [1.0] * 12
    coef = copo_advantages(r, answers, 6, gating="only-soft-with-coef", global_loss_coef=0.25)
    torch.testing.assert_close(coef.global_advantages, 0.25 * soft.global_advantages)
    # entropy coefficient: group 1 accuracy is 0 anyway; group 0: c = 1 - (5/6)/log2 6 * H0
    ent = copo_advantages(r, answers, 6, use_entropy_coef=True)
    torch.testing.assert_close(ent.global_reward[0], torch.tensor(5 / 6 * (1 - (5 / 6) / math.log2(6) * h0)))
    # other constants: k = 20, b = 0.5
    kb = copo_advantages(r, answers, 6, k=20.0, b=0.5, gating="only-soft")
    torch.testing.assert_close(kb.blend[0], torch.tensor(1 / (1 + math.exp(-20 * (h0 - 0.5)))))


def test_copo_labels_tensor_and_bad_inputs():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    out = copo_advantages(r, torch.tensor([0, 1, 3, 3]), 2)
    torch.testing.assert_close(out.entropy, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="one answer per completion"):
        copo_advantages(r, ["1", "2"], 2)
    with pytest.raises(ValueError, match="gating"):
        copo_advantages(r, ["1"] * 4, 2, gating="soft")
    with pytest.raises(ValueError, match="rewards.*finite"):
        copo_advantages(torch.tensor([1.0, float("nan"), 0, 0]), ["1"] * 4, 2)
    with pytest.raises(ValueError, match="global_loss_coef"):
        copo_advantages(r, ["1"] * 4, 2, global_loss_coef=-1.0)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 6), g=st.integers(1, 4), data=st.data())
def test_property_copo_permutation_and_finite(k, g, data):
    n = k * g
    r = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n)))
    answers = data.draw(st.lists(st.sampled_from(["1", "2", "3", None]), min_size=n, max_size=n))
    out = copo_advantages(r, answers, k)
    for t in (out.global_advantages, out.local_advantages, out.blend):
        assert t.shape == (n,) and t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    assert out.entropy.shape == (g,) and bool((out.entropy <= math.log2(k) + 1e-6).all())
    assert bool(((out.blend >= 0) & (out.blend <= 1)).all())
    perm = torch.cat([torch.randperm(k) + i * k for i in range(g)])
    out2 = copo_advantages(r[perm], [answers[i] for i in perm.tolist()], k)
    torch.testing.assert_close(out2.local_advantages, out.local_advantages[perm])
    torch.testing.assert_close(out2.global_advantages, out.global_advantages[perm])
    torch.testing.assert_close(out2.blend, out.blend[perm])
    if k == 1:
        assert bool((out.local_advantages == 0).all()) and bool((out.entropy == 0).all())

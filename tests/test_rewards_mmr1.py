"""fastgrpo.rewards.mmr1: outcome variance, diversity metrics, VPS and normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgrpo.rewards.mmr1 import (
    distinct_n,
    edit_distance,
    mean_edit_distance,
    minmax_normalize,
    outcome_variance,
    self_bleu,
    sentence_bleu,
    strip_padding,
    trajectory_diversity,
    variance_promotion_score,
)


def test_outcome_variance_hand_computed():
    acc = torch.tensor([[1.0, 1, 0, 0], [1.0, 1, 1, 1], [1.0, 0, 0, 0]])
    # P = .5 -> .25 (max); P = 1 -> 0; P = .25 -> .1875
    torch.testing.assert_close(outcome_variance(acc), torch.tensor([0.25, 0.0, 0.1875]))
    torch.testing.assert_close(outcome_variance(torch.tensor([0.5])), torch.tensor([0.25]))


def test_distinct_and_bleu_hand_computed():
    # trigrams (1,2,3), (2,3,4), (1,2,3), (2,3,5): 3 unique of 4 -> 0.75
    assert distinct_n([[1, 2, 3, 4], [1, 2, 3, 5]], 3) == 0.75
    assert distinct_n([[1, 2]], 3) == 0.0
    # hyp [1,2,3,4] vs ref [1,2,3,5]: p1 = 3/4, p2 = 2/3, p3 = 1/2 -> (1/4)^(1/3) = 0.6299605; BP = 1
    assert sentence_bleu([1, 2, 3, 4], [[1, 2, 3, 5]]) == pytest.approx(0.25 ** (1 / 3))
    # hyp [1,2,9,3] vs ref [1,2,3,4]: p1 = 3/4, p2 = 1/3, p3 = 0 -> smoothed 0.1/2 -> (0.75 * 1/3 * 0.05)^(1/3)
    assert sentence_bleu([1, 2, 9, 3], [[1, 2, 3, 4]]) == pytest.approx(0.0125 ** (1 / 3))
    # clipping: hyp [1,1,1,1] vs ref [1,2,3,4]: p1 = min(4, 1)/4 = 1/4, p2 = 0 -> 0.1/3, p3 = 0 -> 0.1/2
    assert sentence_bleu([1, 1, 1, 1], [[1, 2, 3, 4]]) == pytest.approx((0.25 * 0.1 / 3 * 0.05) ** (1 / 3))
    # brevity penalty: hyp [1,2,3] vs ref [1,2,3,4,5,6]: precisions 1 -> exp(1 - 6/3) = e^-1
    assert sentence_bleu([1, 2, 3], [[1, 2, 3, 4, 5, 6]]) == pytest.approx(math.exp(-1))
    assert sentence_bleu([7, 8], [[1, 2]]) == 0.0  # no unigram match
    # self-BLEU: identical responses -> 1 ; two responses: mean of the two BLEUs (symmetric here)
    assert self_bleu([[1, 2, 3, 4]] * 3) == pytest.approx(1.0)
    assert self_bleu([[1, 2, 3, 4], [1, 2, 3, 5]]) == pytest.approx(0.25 ** (1 / 3))
    assert self_bleu([[1, 2, 3]]) == 0.0
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2
    assert mean_edit_distance([[1, 2], [1, 3], [4, 5]]) == pytest.approx((1 + 2 + 2) / 3)


def test_padding_is_stripped_and_tds_sign():
    padded = torch.tensor([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 0, 0]])
    assert strip_padding(padded, pad_id=0) == [[1, 2, 3], [4, 5, 6, 7]]
    assert strip_padding(padded, mask=padded != 0) == [[1, 2, 3], [4, 5, 6, 7]]
    # pad tokens shared by both rows look like overlap: raw self-BLEU counts them (official quirk)
    assert self_bleu(strip_padding(padded)) > 0.0
    assert self_bleu(strip_padding(padded, pad_id=0)) == 0.0
    # TDS = 1 - selfBLEU (paper intent); official_raw_self_bleu returns selfBLEU itself
    same = [[1, 2, 3, 4]] * 4
    assert trajectory_diversity(same) == pytest.approx(0.0)
    assert trajectory_diversity(same, official_raw_self_bleu=True) == pytest.approx(1.0)
    assert trajectory_diversity(padded, pad_id=0) == pytest.approx(1.0)
    assert trajectory_diversity([[1, 2, 3, 4], [1, 2, 3, 5]], method="distinct_n") == 0.75
    with pytest.raises(ValueError, match="method"):
        trajectory_diversity(same, method="bleu4")


def test_vps_and_minmax_hand_computed():
    acc = torch.tensor([[1.0, 1, 0, 0], [1.0, 1, 1, 1], [1.0, 0, 0, 0]])
    diverse = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]  # no shared unigram: selfBLEU 0 -> TDS 1
    same = [[1, 2, 3, 4]] * 4  # TDS 0
    vps = variance_promotion_score(acc, [same, diverse, same])
    # .8 * OVS + .2 * TDS: [.8 * .25, .8 * 0 + .2, .8 * .1875] = [.2, .2, .15]
    torch.testing.assert_close(vps, torch.tensor([0.2, 0.2, 0.15]))
    # (v - .15) / (.05 + 1e-8)
    torch.testing.assert_close(minmax_normalize(vps), torch.tensor([1.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    # official quirk: raw self-BLEU adds similarity -> the all-same prompts gain 0.2
    raw = variance_promotion_score(acc, [same, diverse, same], official_raw_self_bleu=True)
    torch.testing.assert_close(raw, torch.tensor([0.4, 0.0, 0.35]))
    # learnability only (released yaml): no responses needed
    torch.testing.assert_close(variance_promotion_score(acc, alpha=1.0, beta=0.0), outcome_variance(acc))
    # momentum mixes with the previous weights
    w = minmax_normalize(torch.tensor([0.0, 1.0]), previous=torch.tensor([1.0, 0.0]), momentum=0.25)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="responses"):
        variance_promotion_score(acc, [same])
    with pytest.raises(ValueError, match="vps.*finite"):
        minmax_normalize(torch.tensor([0.0, float("inf")]))


@settings(max_examples=30, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=8), min_size=1, max_size=5), data=st.data()
)
def test_property_diversity_bounds_and_permutation(seqs, data):
    for method in ("self_bleu", "distinct_n"):
        v = trajectory_diversity(seqs, method=method)
        assert 0.0 <= v <= 1.0 + 1e-12
        perm = data.draw(st.permutations(range(len(seqs))))
        assert trajectory_diversity([seqs[i] for i in perm], method=method) == pytest.approx(v)

"""fastgrpo.rewards.care: answer span, confidence, consistency bonus and total reward."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgrpo.advantages import group_advantages
from fastgrpo.rewards.care import answer_confidence, answer_span_mask, answer_token_span, care_rewards
from fastgrpo.rewards.shaping import token_pieces

OPEN, CLOSE = [5, 6], [7, 8]


def test_answer_span_mask():
    ids = torch.tensor(
        [
            [1, 5, 6, 9, 9, 7, 8, 2],  # span 3..4
            [5, 6, 1, 7, 8, 5, 6, 4],  # two tags: the last one; no close -> to the end (truncated)
            [1, 2, 3, 4, 7, 8, 0, 0],  # no opening tag -> empty
            [5, 6, 3, 3, 3, 0, 0, 0],  # no close; the valid mask ends at 5
        ]
    )
    mask = torch.tensor([[1] * 8, [1] * 8, [1] * 6 + [0] * 2, [1] * 5 + [0] * 3])
    got = answer_span_mask(ids, OPEN, CLOSE, mask=mask)
    want = torch.zeros(4, 8, dtype=torch.bool)
    want[0, 3:5] = True
    want[1, 7] = True
    want[3, 2:5] = True
    assert torch.equal(got, want)
    # a tag straddling the end of the valid tokens does not count
    ids2 = torch.tensor([[5, 6, 1, 7, 8]])
    got2 = answer_span_mask(ids2, OPEN, CLOSE, mask=torch.tensor([[1, 1, 1, 1, 0]]))
    assert got2.tolist() == [[False, False, True, True, False]]


@pytest.mark.parametrize(
    "pieces, span",
    [
        (["so", ".<", "answer", ">", "4", "</", "answer", ">"], (4, 5)),  # the tag split in context
        (["<answer>", "1", "2", "</answer>", "<answer>", "7", "</answer>"], (5, 6)),  # the last opening tag
        (["<answer>", " 9", " 1"], (1, 3)),  # no closing tag (truncated): to the end
        (["<answer>", " ", "5", " </", "answer>"], (2, 3)),  # whitespace-only overlaps are not the answer
        (["<answer", ">4", "</ans", "wer>"], (1, 2)),  # ">4" holds the tag's end and the answer
        (["<answer>", "</answer>"], (0, 0)),  # an empty answer: an empty range
        (["the answer is 4"], None),  # no opening tag
    ],
)
def test_answer_token_span_hand_cases(pieces, span):
    assert answer_token_span(pieces) == span


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<answer>4</answer>", "4"),
        ("So it is <answer>4</answer>", "4"),
        ("so.<answer>4</answer>", "4"),
        ("x\n<answer> 12 </answer>", "12"),  # " </" holds a space of the answer and the tag: not in the span
        ("The answer:<answer>B</answer><|im_end|>", "B"),
        ("Think: 3+4=7.\n<answer>7", "7"),  # truncated before the closing tag
    ],
)
def test_answer_token_span_real_bpe_contexts(smollm2_tokenizer, text, answer):
    """With SmolLM2's BPE, " <answer>" and ".<answer>" are other ids than "<answer>" alone (so matching the tags'
    own ids finds no span); locating the answer in the decoded tokens' text finds it in every context."""
    tok = smollm2_tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    (pieces,) = token_pieces(tok, [ids])
    s, e = answer_token_span(pieces)
    assert tok.decode(ids[s:e]) == answer
    open_ids = tok("<answer>", add_special_tokens=False)["input_ids"]
    close_ids = tok("</answer>", add_special_tokens=False)["input_ids"]
    by_ids = answer_span_mask(torch.tensor([ids]), open_ids, close_ids)[0]
    if text.startswith((" ", "So", "so.")):  # the old id matching misses these
        assert not bool(by_ids.any())


def test_answer_span_mask_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        answer_span_mask(torch.zeros(1, 3, dtype=torch.long), [], CLOSE)
    with pytest.raises(ValueError, match=r"mask.*\[2, 3\].*\[2, 4\]"):
        answer_span_mask(torch.zeros(2, 3, dtype=torch.long), OPEN, CLOSE, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="integer"):
        answer_span_mask(torch.zeros(2, 3), OPEN, CLOSE)


def test_answer_confidence_hand_computed():
    lp = torch.tensor(
        [[math.log(0.5), math.log(0.5), -50.0], [0.0, 0.0, 0.0], [math.log(0.8), math.log(0.2), 0.0]]
    )
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 0]])
    c = answer_confidence(lp, m)
    # row 0: exp(2 log .5 / (2 + 1e-6)) ~ 0.5; row 1: empty -> exp(0) = 1 -> capped 0.95;
    # row 2: geometric mean sqrt(0.8 * 0.2) = 0.4
    torch.testing.assert_close(c, torch.tensor([0.5, 0.95, 0.4]), atol=1e-5, rtol=0)
    # padding outside the mask may be anything finite or not
    lp[0, 2] = float("-inf")
    torch.testing.assert_close(answer_confidence(lp, m)[0], torch.tensor(0.5), atol=1e-5, rtol=0)
    lp[0, 0] = float("nan")
    with pytest.raises(ValueError, match="ref_logp"):
        answer_confidence(lp, m)


def test_care_group_where_exactly_eligible_confident_samples_get_bonus():
    # one group of K = 8 (the official group size)
    # acc   = [1, 1, 1, 1, 0, 0, .05, 1] -> mean .63125 -> eligible: acc > .1 and >= mean -> 0,1,2,3,7
    # conf  = [.9, .5, .8, .95, .95, .95, .95, .7]; mu over eligible = (.9+.5+.8+.95+.7)/5 = 0.77
    # bonus where conf >= .77: samples 0 (.9), 2 (.8), 3 (.95) -> 0.5 * 1 each; 1 (.5) and 7 (.7) get none,
    # nor the confident but wrong 4, 5, 6
    acc = torch.tensor([1, 1, 1, 1, 0, 0, 0.05, 1])
    fmt = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1.0])
    conf = torch.tensor([0.9, 0.5, 0.8, 0.95, 0.95, 0.95, 0.95, 0.7])
    out = care_rewards(acc, fmt, conf, group_size=8)
    assert out.bonus.tolist() == [0.5, 0, 0.5, 0.5, 0, 0, 0, 0]
    assert out.eligible.tolist() == [True, True, True, True, False, False, False, True]
    torch.testing.assert_close(out.total, acc + fmt + out.bonus)
    # margin 0.1: threshold 0.67 -> sample 7 (.7) joins; sample 1 (.5) still not
    out = care_rewards(acc, fmt, conf, group_size=8, margin=0.1)
    assert out.bonus.tolist() == [0.5, 0, 0.5, 0.5, 0, 0, 0, 0.5]
    # the advantage used for training: GRPO on the total, eps 1e-4
    adv = group_advantages(out.total, 8)
    assert adv.shape == (8,) and bool(torch.isfinite(adv).all())


def test_care_rewards_ragged_and_bad_inputs():
    acc = torch.tensor([0.0, 0.0, 1.0, 1.0])
    out = care_rewards(acc, torch.zeros(4), torch.full((4,), 0.9), group_ids=torch.tensor([3, 3, 1, 1]))
    # group 3: nobody eligible; group 1: both eligible with equal confidence -> both get 0.5
    assert out.bonus.tolist() == [0, 0, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"fmt.*\[4\]"):
        care_rewards(acc, torch.zeros(3), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="confidence.*finite"):
        care_rewards(acc, torch.zeros(4), torch.tensor([0.1, float("nan"), 0, 0]), 2)
    with pytest.raises(ValueError, match="empty batch"):
        care_rewards(torch.zeros(0), torch.zeros(0), torch.zeros(0), 2)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    g=st.integers(1, 4),
    data=st.data(),
)
def test_property_care_permutation_and_bounds(k, g, data):
    n = k * g
    acc = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.05, 0.5, 1.0]), min_size=n, max_size=n)))
    conf = torch.tensor(
        data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.75, 0.9]), min_size=n, max_size=n))
    )
    out = care_rewards(acc, torch.zeros(n), conf, group_size=k)
    assert out.bonus.shape == (n,) and out.bonus.dtype == torch.float32
    assert bool(torch.isfinite(out.total).all())
    assert bool(((out.bonus == 0) | (out.eligible & (out.bonus == 0.5 * acc))).all())
    # permuting within each group permutes the bonus
    perm = torch.cat([torch.randperm(k) + i * k for i in range(g)])
    out2 = care_rewards(acc[perm], torch.zeros(n), conf[perm], group_size=k)
    assert torch.equal(out2.bonus, out.bonus[perm])
    # a single sample is its own mean: eligible iff acc > 0.1, and it meets mu = its own confidence
    if k == 1:
        assert torch.equal(out.bonus, 0.5 * acc * (acc > 0.1))

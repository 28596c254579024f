"""fastgrpo.ema.EMAReference: update rule, period, PEFT-style trainable-only mode, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastgrpo.ema import EMAReference


def make_policy(value: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def set_all(m: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)


def test_full_copy_update_every_k_hand_computed():
    policy = make_policy(1.0)
    ema = EMAReference(policy)  # decay 0.995, every 10 steps
    assert not ema.trainable_only and ema.model is not policy
    set_all(policy, 3.0)
    updated = [ema.step(policy) for _ in range(10)]
    assert updated == [False] * 9 + [True]
    # 0.995 * 1 + 0.005 * 3 = 1.01
    for p in ema.model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.01))
        assert not p.requires_grad
    # second update at step 20: 0.995 * 1.01 + 0.005 * 3 = 1.01995
    for _ in range(10):
        ema.step(policy)
    torch.testing.assert_close(ema.model[0].weight, torch.full((2, 3), 1.01995))
    # the reference forward runs without grad and with the reference weights
    x = torch.ones(4, 3)
    ema.model.eval()
    out = ema(x)
    assert not out.requires_grad


def test_buffers_are_copied_and_decay_edge_cases():
    policy = make_policy(1.0)
    ema = EMAReference(policy, decay=0.5, update_every=1)
    policy.train()
    policy(torch.randn(8, 3))  # moves the BatchNorm running stats
    ema.step(policy)
    torch.testing.assert_close(ema.model[1].running_mean, policy[1].running_mean)
    with pytest.raises(ValueError, match="decay"):
        EMAReference(policy, decay=1.5)
    with pytest.raises(ValueError, match="update_every"):
        EMAReference(policy, update_every=0)


def test_trainable_only_for_peft_like_models():
    policy = make_policy(1.0)
    policy[0].weight.requires_grad_(False)  # "base" weight frozen; bias and BatchNorm trainable ("adapters")
    ema = EMAReference(policy, decay=0.9, update_every=2)
    assert ema.trainable_only and ema.model is None
    assert set(ema.shadow) == {"0.bias", "1.weight", "1.bias"}
    set_all(policy, 2.0)
    ema.step(policy)
    ema.step(policy)
    # 0.9 * 1 + 0.1 * 2 = 1.1 for the shadowed params
    torch.testing.assert_close(ema.shadow["0.bias"], torch.full((2,), 1.1))
    # swapping the reference in and out restores the policy, even on error
    with ema.swapped_in(policy) as m:
        assert m is policy
        torch.testing.assert_close(policy[0].bias, torch.full((2,), 1.1))
        torch.testing.assert_close(policy[0].weight, torch.full((2, 3), 2.0))  # frozen: policy's own
    torch.testing.assert_close(policy[0].bias, torch.full((2,), 2.0))
    with pytest.raises(KeyError):
        with ema.swapped_in(policy):
            raise KeyError("boom")
    torch.testing.assert_close(policy[0].bias, torch.full((2,), 2.0))
    with pytest.raises(RuntimeError, match="swapped_in"):
        ema(torch.ones(1, 3))


def test_state_dict_roundtrip_and_mismatch():
    policy = make_policy(1.0)
    ema = EMAReference(policy, update_every=3)
    set_all(policy, 5.0)
    for _ in range(4):
        ema.step(policy)
    state = ema.state_dict()
    fresh = EMAReference(make_policy(0.0), update_every=3)
    fresh.load_state_dict(state)
    assert fresh.num_steps == 4 and fresh.num_updates == 1
    for a, b in zip(fresh.model.parameters(), ema.model.parameters()):
        torch.testing.assert_close(a, b)
    # resumed counters: the next update happens at step 6 in both
    assert [fresh.step(policy) for _ in range(2)] == [False, True]
    other = EMAReference(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks parameters"):
        ema.update(nn.Linear(3, 2))


@pytest.mark.slow
def test_with_a_real_peft_lora_model():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    )
    ema = EMAReference(model, decay=0.5, update_every=1)
    assert ema.trainable_only and all("lora_" in n for n in ema.shadow)
    before = {n: t.clone() for n, t in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.step(model)
    for n, t in ema.shadow.items():
        torch.testing.assert_close(t, before[n] + 0.5)  # 0.5 * old + 0.5 * (old + 1)
    x = torch.randn(3, 4)
    with ema.swapped_in(model):
        ref_out = model(x)
    assert not torch.allclose(ref_out, model(x))

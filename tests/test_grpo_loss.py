"""grpo_loss: the reference against TRL's formulas, every backend against the fp64 reference under the error
budget, padded == packed, from_logits, the module, Liger parity, metrics and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_budget, loss_batch

import fastgrpo
from fastgrpo import GRPOLoss, LossConfig, grpo_loss, grpo_loss_from_logits, grpo_loss_ref, linear_logprobs
from fastgrpo.ops import accumulation_weight

BACKENDS = fastgrpo.available_backends("cpu")
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]


# ------------------------------------------------------------------------------------------------------------
# An independent transcription of TRL 1.16 GRPOTrainer._compute_loss on padded [B, T] tensors (fp64).
# ------------------------------------------------------------------------------------------------------------
# dual_clip: verl's compute_policy_loss (clip_ratio_c), which TRL does not have.
def trl_loss(logits, y, mask, adv, *, old=None, ref=None, beta=0.0, loss_type="dapo", level="token",
             eps_low=0.2, eps_high=0.2, delta=None, max_len=None, num_items=None, temperature=1.0,
             entropy_coef=0.0, tau_pos=1.0, tau_neg=1.05, bias_kl=False, dual_clip=None):  # fmt: skip
    lsm = torch.log_softmax(logits / temperature, -1)
    logp = lsm.gather(-1, y[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    old = logp.detach() if old is None else old
    lr = logp - old
    lw = lr if level == "token" else ((lr * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    c1 = torch.exp(lw)
    a = adv[:, None] if adv.dim() == 1 else adv
    if beta != 0.0:  # TRL computes the KL first: its bias correction uses the ratio before the delta clamp
        d = ref - logp
        kl = torch.exp(d) - d - 1
        if bias_kl:
            kl = kl * c1
    if loss_type == "cispo":
        ptl = -torch.clamp(c1, max=eps_high).detach() * a * logp
    elif loss_type == "sapo":
        tau = torch.where(a > 0, tau_pos, tau_neg)
        ptl = -torch.sigmoid(tau * (c1 - 1)) * 4 / tau * a
    else:
        c2 = torch.clamp(c1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            c1 = torch.clamp(c1, max=delta)
        ptl = -torch.min(c1 * a, c2 * a)
        if dual_clip is not None:  # verl: pg_losses3 = -A * clip_ratio_c; min with it where A < 0
            ptl = torch.where(a < 0, torch.min(-a * dual_clip, ptl), ptl)
    if beta != 0.0:
        ptl = ptl + beta * kl
    if loss_type in ("grpo", "sapo"):
        loss = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (ptl * mask).sum() / (ptl.size(0) * max_len)
    else:
        loss = (ptl * mask).sum() / num_items
    if entropy_coef:
        loss = loss - entropy_coef * (ent * mask).sum() / mask.sum().clamp(min=1.0)
    return loss


def make_batch(gen, b=4, t=9, d=16, v=101, mask_p=0.3):
    return loss_batch(gen, b, t, d, v, mask_p)


def leaves(x, dtype, bias=True):
    out = [x["h"].detach().to(dtype).requires_grad_(), x["w"].detach().to(dtype).requires_grad_()]
    out.append(x["bias"].detach().to(dtype).requires_grad_() if bias else None)
    return out


def grads(ts):
    return [None if t is None else t.grad for t in ts]


CASES = [dict(loss_type=lt, importance_level=lvl) for lt in LOSS_TYPES for lvl in ("token", "sequence")] + [
    dict(loss_type="grpo", importance_level="token", delta=1.5, eps_high=0.28),
    dict(loss_type="dapo", importance_level="token", dual_clip=3.0, eps_high=0.28),
    dict(loss_type="bnpo", importance_level="token", entropy_coef=0.01),
    dict(loss_type="grpo", importance_level="sequence", eps_low=3e-4, eps_high=4e-4),
    dict(loss_type="dapo", importance_level="token", delta=1.5, eps_high=0.28, kl_bias_correction=True),
    dict(loss_type="grpo", importance_level="sequence", kl_bias_correction=True),
    dict(loss_type="sapo", importance_level="token", sapo_tau_pos=0.7, sapo_tau_neg=1.6),
    dict(loss_type="grpo", importance_level="sequence", dual_clip=1.5, eps_high=0.28),
]


def case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_reference_equals_trl_formulas(gen, case, beta):
    x = make_batch(gen)
    kw = dict(case)
    eps_high = kw.get("eps_high", 5.0 if kw["loss_type"] == "cispo" else 0.2)
    kw["eps_high"] = eps_high
    h, w, b = leaves(x, torch.float64)
    ours = grpo_loss_ref(
        h,
        w,
        x["y"],
        x["adv"],
        bias=b,
        mask=x["mask"],
        old_logp=x["old"],
        ref_logp=x["ref"],
        beta=beta,
        temperature=0.9,
        num_items_in_batch=17,
        max_completion_length=12,
        **kw,
    )
    ours.loss.backward()
    h2, w2, b2 = leaves(x, torch.float64)
    theirs = trl_loss(
        h2 @ w2.t() + b2,
        x["y"],
        x["mask"],
        x["adv"],
        old=x["old"],
        ref=x["ref"],
        beta=beta,
        loss_type=kw["loss_type"],
        level=kw["importance_level"],
        eps_low=kw.get("eps_low", 0.2),
        eps_high=eps_high,
        delta=kw.get("delta"),
        max_len=12,
        num_items=17,
        temperature=0.9,
        entropy_coef=kw.get("entropy_coef", 0.0),
        bias_kl=kw.get("kl_bias_correction", False),
        tau_pos=kw.get("sapo_tau_pos", 1.0),
        tau_neg=kw.get("sapo_tau_neg", 1.05),
        dual_clip=kw.get("dual_clip"),
    )
    theirs.backward()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-10, atol=1e-12)
    for g1, g2 in zip(grads([h, w, b]), grads([h2, w2, b2])):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def run_loss(fn, x, dtype, *, layout="padded", bias=True, **kw):
    h, w, b = leaves(x, dtype, bias)
    cast = lambda t: t.to(dtype if dtype == torch.float64 else torch.float32)
    args = dict(old_logp=cast(x["old"]), ref_logp=cast(x["ref"]))
    adv = cast(x["adv"])
    if "blend" in kw:
        kw["blend"] = cast(kw["blend"])
        adv = (adv, cast(kw.pop("adv_local")))
    if layout == "padded":
        out = fn(h, w, x["y"], adv, bias=b, mask=x["mask"], **args, **kw)
    else:  # packed: drop padding, describe sequences by cu_seqlens
        m = x["mask"].bool()
        lens = m.sum(1)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        pk = lambda t: t[m]
        out = fn(
            h[m],
            w,
            x["y"][m],
            adv,
            bias=b,
            cu_seqlens=cu,
            old_logp=pk(args["old_logp"]),
            ref_logp=pk(args["ref_logp"]),
            **kw,
        )
    g = torch.randn((), generator=torch.Generator().manual_seed(7), dtype=torch.float64).item()
    (out.loss * g).backward()
    return out, [out.loss] + grads([h, w, b])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backend_matches_fp64(gen, backend, dtype, case):
    x = make_batch(gen, b=5, t=13, d=24, v=1001)
    kw = dict(case, beta=0.04, max_completion_length=13, temperature=0.8)
    if kw["loss_type"] == "cispo":
        kw.setdefault("eps_high", 5.0)
    _, gt = run_loss(grpo_loss_ref, x, torch.float64, **kw)
    _, lo = run_loss(grpo_loss_ref, x, dtype, **kw)
    _, out = run_loss(grpo_loss, x, dtype, backend=backend, chunk_size=16, **kw)
    for name, o, g, l in zip(("loss", "d_hidden", "d_weight", "d_bias"), out, gt, lo):
        assert_budget(o, g, l, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[11]], ids=case_id)
def test_copo_blend_and_padded_equals_packed(gen, backend, case):
    x = make_batch(gen, b=6, t=7, d=16, v=130)
    blend = torch.sigmoid(torch.randn(6, generator=gen, dtype=torch.float64))
    adv_local = torch.randn(6, generator=gen, dtype=torch.float64)
    kw = dict(case, beta=0.02, dual_clip=3.0, max_completion_length=7)
    _, gt = run_loss(grpo_loss_ref, x, torch.float64, blend=blend, adv_local=adv_local, **kw)
    o_pad, pad = run_loss(
        grpo_loss, x, torch.float32, backend=backend, blend=blend, adv_local=adv_local, **kw
    )
    o_pk, pk = run_loss(
        grpo_loss, x, torch.float32, layout="packed", backend=backend, blend=blend, adv_local=adv_local, **kw
    )
    _, lo = run_loss(grpo_loss_ref, x, torch.float32, blend=blend, adv_local=adv_local, **kw)
    for name, a, b_, g, l in zip(("loss", "d_hidden", "d_weight", "d_bias"), pad, pk, gt, lo):
        assert_budget(a, g, l, torch.float32, name + " padded")
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
    # the blend really mixes two losses: w = 1 everywhere gives the local loss alone
    assert o_pad.logp.shape == (6, 7) and o_pk.logp.shape == (int(x["mask"].sum()),)
    torch.testing.assert_close(o_pad.logp[x["mask"].bool()], o_pk.logp, rtol=0, atol=1e-6)


def test_blend_extremes_select_one_advantage(gen):
    x = make_batch(gen, b=3, t=5, d=8, v=50)
    h, w, _ = leaves(x, torch.float32, bias=False)
    a_g, a_l = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    kw = dict(mask=x["mask"], old_logp=x["old"].float(), loss_type="grpo")
    both = lambda wt: grpo_loss(h, w, x["y"], (a_g, a_l), blend=torch.full((3,), wt), **kw).loss
    torch.testing.assert_close(both(0.0), grpo_loss(h, w, x["y"], a_g, **kw).loss)
    torch.testing.assert_close(both(1.0), grpo_loss(h, w, x["y"], a_l, **kw).loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(gen, backend):
    """T=1, a group of size 1, all-equal (zero) advantages, a fully masked row, per-token advantages."""
    for b, t in [(1, 1), (3, 1), (2, 63)]:
        x = make_batch(gen, b=b, t=t, d=8, v=257, mask_p=0.0)
        _, gt = run_loss(grpo_loss_ref, x, torch.float64, loss_type="grpo")
        _, lo = run_loss(grpo_loss_ref, x, torch.float32, loss_type="grpo")
        _, out = run_loss(grpo_loss, x, torch.float32, loss_type="grpo", backend=backend)
        for o, g, l in zip(out, gt, lo):
            assert_budget(o, g, l, torch.float32, f"B={b} T={t}")
    x = make_batch(gen, b=4, t=6, d=8, v=64)
    x["mask"][2] = 0.0  # a fully masked row still counts in B for grpo (TRL clamps its length to 1)
    x["adv"] = torch.zeros(4, dtype=torch.float64)  # all-equal rewards: zero advantages
    out, res = run_loss(grpo_loss, x, torch.float32, loss_type="grpo", beta=0.0, backend=backend)
    assert float(out.loss.detach()) == 0.0 and float(res[1].abs().max()) == 0.0
    assert float(out.logp[2].abs().max()) == 0.0
    x = make_batch(gen, b=4, t=6, d=8, v=64)
    x["mask"][2] = 0.0
    x["adv"] = torch.randn(4, 6, generator=gen, dtype=torch.float64)  # per-token advantages (PRM steps)
    _, gt = run_loss(grpo_loss_ref, x, torch.float64, loss_type="grpo", importance_level="sequence")
    _, lo = run_loss(grpo_loss_ref, x, torch.float32, loss_type="grpo", importance_level="sequence")
    _, out = run_loss(
        grpo_loss, x, torch.float32, loss_type="grpo", importance_level="sequence", backend=backend
    )
    for o, g, l in zip(out, gt, lo):
        assert_budget(o, g, l, torch.float32, "per-token advantages")


def test_hand_computed_on_policy():
    """V=2, one sequence of two tokens, logits 0 -> p = 1/2, logp = -ln 2; on-policy ratio 1, A = 2.
    grpo: l_t = -(1 * A) = -2 per token, mean over 2 tokens -> loss -2.
    d loss / d logit[t, target] = -A/|o| * (1 - p) = -2/2 * 1/2 = -0.5; other logit +0.5."""
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    y = torch.tensor([[0, 1]])
    out = grpo_loss_from_logits(logits, y, torch.tensor([2.0]), loss_type="grpo")
    out.loss.backward()
    assert math.isclose(out.loss.item(), -2.0, rel_tol=1e-6)
    torch.testing.assert_close(out.logp, torch.full((1, 2), -math.log(2)))
    torch.testing.assert_close(out.entropy, torch.full((1, 2), math.log(2)))
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.5, 0.5], [0.5, -0.5]]]))
    assert float(out.ratio_mean) == 1.0 and float(out.clip_frac_low) == 0.0


def test_clip_fraction_metrics():
    """Ratios exp(+-0.5) = 1.65 / 0.61 with eps 0.2: high-clipped where A > 0 and r > 1.2, low-clipped where
    A < 0 and r < 0.8. Tokens: (r=1.65, A=+1) high; (r=0.61, A=-1) low; (r=1.65, A=-1) neither; (r=1, A=+1)."""
    logits = torch.zeros(4, 1, 3)
    y = torch.zeros(4, 1, dtype=torch.long)
    lp = -math.log(3)
    old = torch.tensor([[lp - 0.5], [lp + 0.5], [lp - 0.5], [lp]])
    out = grpo_loss_from_logits(logits, y, torch.tensor([1.0, -1.0, -1.0, 1.0]), old_logp=old)
    assert float(out.clip_frac_high) == 0.25 and float(out.clip_frac_low) == 0.25
    expected_ratio = (2 * math.exp(0.5) + math.exp(-0.5) + 1) / 4
    assert math.isclose(float(out.ratio_mean), expected_ratio, rel_tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logits_matches_hidden_version_and_leaves_logits_alone(gen, backend):
    x = make_batch(gen, b=3, t=5, d=8, v=70)
    h, w, b = leaves(x, torch.float32)
    kw = dict(
        mask=x["mask"],
        old_logp=x["old"].float(),
        ref_logp=x["ref"].float(),
        beta=0.1,
        loss_type="grpo",
        entropy_coef=0.05,
    )
    out = grpo_loss(h, w, x["y"], x["adv"].float(), bias=b, backend=backend, **kw)
    out.loss.backward()
    logits = (h.detach() @ w.detach().t() + b.detach()).requires_grad_()
    saved = logits.detach().clone()
    out2 = grpo_loss_from_logits(logits, x["y"], x["adv"].float(), backend=backend, **kw)
    out2.loss.backward()
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad @ w.detach(), h.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(logits.detach(), saved)
    # inplace=True writes the gradient into the caller's logits
    lg = saved.clone().requires_grad_()
    buf = lg.detach()
    o3 = grpo_loss_from_logits(lg * 1.0, x["y"], x["adv"].float(), inplace=True, backend=backend, **kw)
    o3.loss.backward()
    torch.testing.assert_close(lg.grad, logits.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(buf, saved)  # lg itself was not the buffer (lg * 1.0 was)


def test_module_wrapper(gen):
    x = make_batch(gen, b=2, t=4, d=8, v=40)
    h, w, _ = leaves(x, torch.float32, bias=False)
    mod = GRPOLoss(loss_type="dr_grpo", beta=0.05, max_completion_length=8)
    out = mod(h, w, x["y"], x["adv"].float(), mask=x["mask"], ref_logp=x["ref"].float())
    ref = grpo_loss(
        h,
        w,
        x["y"],
        x["adv"].float(),
        mask=x["mask"],
        ref_logp=x["ref"].float(),
        loss_type="dr_grpo",
        beta=0.05,
        max_completion_length=8,
    )
    torch.testing.assert_close(out.loss, ref.loss)
    assert "dr_grpo" in repr(mod)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLoss(loss_type="ppo")


def test_no_grad_returns_value(gen):
    x = make_batch(gen, b=2, t=4, d=8, v=40)
    h, w, _ = leaves(x, torch.float32, bias=False)
    with_grad = grpo_loss(h, w, x["y"], x["adv"].float(), mask=x["mask"]).loss
    with torch.no_grad():
        no_grad = grpo_loss(h, w, x["y"], x["adv"].float(), mask=x["mask"]).loss
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, with_grad.detach())


def test_bad_inputs(gen):
    x = make_batch(gen, b=2, t=4, d=8, v=40)
    h, w, _ = leaves(x, torch.float32, bias=False)
    y, m, a = x["y"], x["mask"], x["adv"].float()
    call = lambda **k: grpo_loss(**{**dict(hidden=h, weight=w, targets=y, advantages=a, mask=m), **k})
    with pytest.raises(ValueError, match="loss_type"):
        call(loss_type="ppo")
    with pytest.raises(ValueError, match="importance_level"):
        call(importance_level="tok")
    with pytest.raises(ValueError, match=r"advantages must be \[B=2\] or \[2, 4\], got \[3\]"):
        call(advantages=torch.zeros(3))
    with pytest.raises(ValueError, match="advantages.*NaN"):
        call(advantages=torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="old_logp.*NaN"):
        call(old_logp=torch.full((2, 4), float("inf")))
    with pytest.raises(ValueError, match="no valid token"):
        call(mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="beta=0.1 needs ref_logp"):
        call(beta=0.1)
    with pytest.raises(ValueError, match="targets"):
        call(targets=torch.full((2, 4), 40))
    with pytest.raises(ValueError, match="cu_seqlens"):
        grpo_loss(h.reshape(8, 8), w, y.reshape(8), a)
    with pytest.raises(ValueError, match="end at N=8"):
        grpo_loss(h.reshape(8, 8), w, y.reshape(8), a, cu_seqlens=torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(
            h.reshape(8, 8), w, y.reshape(8), a, cu_seqlens=torch.tensor([0, 3, 8]), loss_type="dr_grpo"
        )
    with pytest.raises(ValueError, match="pair"):
        call(blend=torch.ones(2))
    with pytest.raises(ValueError, match="blend is None"):
        call(advantages=(a, a))
    with pytest.raises(ValueError, match="empty"):
        grpo_loss(h[:0], w, y[:0], a[:0])
    with pytest.raises(ValueError, match="delta"):
        call(delta=0.5)


# ------------------------------------------------------------------------------------------------------------
# Parity with Liger-Kernel's LigerFusedLinearGRPOLoss (pure torch path, compiled=False)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_liger_parity(gen, loss_type, level, beta):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    if level == "sequence" and loss_type in ("cispo", "sapo"):
        pytest.skip("Liger supports sequence-level ratios only for grpo/bnpo/dr_grpo/dapo")
    x = make_batch(gen, b=4, t=11, d=32, v=300)
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    delta = 1.6 if loss_type in ("grpo", "dapo") else None
    lig = liger.LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=False,
        use_ref_model=beta > 0,
        chunk_size=2,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        loss_type=loss_type,
        max_completion_length=11,
        importance_sampling_level=level,
        temperature=0.9,
        delta=delta,
    )
    h1, w1, b1 = leaves(x, torch.float32)
    res = lig(
        h1,
        w1,
        x["y"],
        x["mask"].float(),
        x["adv"].float(),
        bias=b1,
        ref_per_token_logps=x["ref"].float(),
        old_per_token_logps=x["old"].float(),
        num_items_in_batch=torch.tensor(30.0),
    )
    loss_l = res[0] if isinstance(res, tuple) else res
    loss_l.backward()
    h2, w2, b2 = leaves(x, torch.float32)
    ours = grpo_loss(
        h2,
        w2,
        x["y"],
        x["adv"].float(),
        bias=b2,
        mask=x["mask"],
        old_logp=x["old"].float(),
        ref_logp=x["ref"].float(),
        beta=beta,
        loss_type=loss_type,
        importance_level=level,
        eps_high=eps_high,
        delta=delta,
        temperature=0.9,
        max_completion_length=11,
        num_items_in_batch=30,
    )
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, loss_l, rtol=2e-5, atol=2e-6)
    for a, b_ in zip(grads([h2, w2, b2]), grads([h1, w1, b1])):
        torch.testing.assert_close(a, b_, rtol=2e-4, atol=2e-6)


def test_torch_compile_gives_the_same_loss_and_gradients(gen):
    """torch.compile traces around the chunked Function (graph breaks allowed) and keeps the numbers."""
    x = make_batch(gen, b=2, t=5, d=8, v=30)
    h, w, _ = leaves(x, torch.float32, bias=False)
    f = lambda h_, w_: grpo_loss(h_, w_, x["y"], x["adv"].float(), mask=x["mask"], loss_type="grpo").loss
    ref = f(h, w)
    ref.backward()
    g_ref = h.grad.clone()
    h.grad = None
    out = torch.compile(f, backend="eager")(h, w)
    out.backward()
    torch.testing.assert_close(out.detach(), ref.detach())
    torch.testing.assert_close(h.grad, g_ref)


# ------------------------------------------------------------------------------------------------------------
# Dual clip, overflowing ratios, SAPO temperatures: hand-computed
# ------------------------------------------------------------------------------------------------------------
def _two_way_batch(ratios, advantages):
    """One sequence over V = 2 with zero logits (p = 1/2, logp = -ln 2 for target 0) and old log-probs that
    give each token the requested ratio r = exp(logp - old)."""
    t = len(ratios)
    logits = torch.zeros(1, t, 2, requires_grad=True)
    y = torch.zeros(1, t, dtype=torch.long)
    old = torch.tensor([[-math.log(2) - math.log(r) for r in ratios]])
    return logits, y, old, torch.tensor([advantages])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_clip_hand_computed(backend):
    """dapo (mean over 5 tokens), eps 0.2, verl clip_ratio_c = 3; per token l = -min(rA, clip(r)A), and for
    A < 0: min(max(-A r, -A clip(r)), -3 A) (ALGORITHMS.md 0.1):
      r=5,   A=-1: max(5, 1.2) = 5,      min(5, 3) = 3  (dual clip: constant, gradient 0)
      r=2,   A=-1: max(2, 1.2) = 2,      min(2, 3) = 2  (dl/dlogp = -A r = 2)
      r=0.5, A=-1: max(0.5, 0.8) = 0.8,  min(0.8, 3) = 0.8 (clipped: gradient 0)
      r=5,   A=+1: -min(5, 1.2) = -1.2                  (clipped: gradient 0; no dual clip for A > 0)
      r=4,   A=-2: max(8, 2.4) = 8,      min(8, 6) = 6  (dual clip)
    loss = (3 + 2 + 0.8 - 1.2 + 6) / 5 = 2.12; without the dual clip (5 + 2 + 0.8 - 1.2 + 8) / 5 = 2.92.
    Gradient: only token 2 (coefficient 2 / 5 = 0.4): dL/dz = 0.4 (onehot(0) - p) = [0.2, -0.2]; without the
    dual clip tokens 1 and 5 add 5 / 5 = 1 and 8 / 5 = 1.6 times (onehot - p): [0.5, -0.5] and [0.8, -0.8]."""
    ratios, adv = [5.0, 2.0, 0.5, 5.0, 4.0], [-1.0, -1.0, -1.0, 1.0, -2.0]
    for dual_clip, loss, coefs in [(3.0, 2.12, [0, 0.4, 0, 0, 0]), (None, 2.92, [1.0, 0.4, 0, 0, 1.6])]:
        logits, y, old, a = _two_way_batch(ratios, adv)
        out = grpo_loss_from_logits(logits, y, a, old_logp=old, dual_clip=dual_clip, backend=backend)
        out.loss.backward()
        assert math.isclose(out.loss.item(), loss, rel_tol=1e-6)
        expected = torch.tensor([[[c / 2, -c / 2] for c in coefs]])
        torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_ratio_loss_and_gradient(backend):
    """A log-ratio beyond fp32's range (old = -150 against logp = -ln 2: r = e^149.3 = inf in fp32).
    A = -1, dapo over 2 tokens (token 1: r = 1, l = 1, dl/dlogp = 1):
    - no dual clip: l_2 = -min(-inf, -1.2) = +inf, so the loss is +inf (a non-finite loss, not NaN);
    - dual clip 3: l_2 = min(inf, 3) = 3, loss (1 + 3) / 2 = 2, finite, so the gradient must be finite: token 2's
      branch is the constant one (0), token 1's: 1/2 (onehot - p) = [0.25, -0.25];
    - A = 0 on the overflowing token: r A is taken as 0 (its limit), loss (1 + 0) / 2 = 0.5, not NaN."""
    ratios = [1.0, 1.0]
    logits, y, old, _ = _two_way_batch(ratios, [-1.0, -1.0])
    old[0, 1] = -150.0
    kw = dict(old_logp=old, backend=backend)
    out = grpo_loss_from_logits(logits, y, torch.tensor([-1.0]), **kw)
    assert out.loss.item() == math.inf
    out = grpo_loss_from_logits(logits, y, torch.tensor([-1.0]), dual_clip=3.0, **kw)
    out.loss.backward()
    assert math.isclose(out.loss.item(), 2.0, rel_tol=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.25, -0.25], [0.0, 0.0]]]))
    logits.grad = None
    out = grpo_loss_from_logits(logits, y, torch.tensor([[-1.0, 0.0]]), **kw)
    out.loss.backward()
    assert math.isclose(out.loss.item(), 0.5, rel_tol=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.25, -0.25], [0.0, 0.0]]]))


def test_sapo_temperatures_hand_computed():
    """SAPO l = -sigmoid(tau (r - 1)) 4 / tau A, tau = tau_pos for A > 0 else tau_neg; r = 2 (old = logp - ln 2).
    A = +1, tau_pos = 0.5: -sigmoid(0.5) * 8 = -0.62246 * 8 = -4.97968;
    A = -1, tau_neg = 2:   +sigmoid(2) * 2 = 0.88080 * 2 = 1.76159. grpo (one sequence each): mean = -1.60904.
    With TRL's defaults (1, 1.05): -sigmoid(1) * 4 = -2.92423 and +sigmoid(1.05) * 4 / 1.05 = 2.82200 -> -0.05112."""
    logits = torch.zeros(2, 1, 2)
    y = torch.zeros(2, 1, dtype=torch.long)
    old = torch.full((2, 1), -math.log(2) - math.log(2))
    a = torch.tensor([1.0, -1.0])
    sig = lambda x: 1 / (1 + math.exp(-x))
    kw = dict(old_logp=old, loss_type="sapo")
    out = grpo_loss_from_logits(logits, y, a, sapo_tau_pos=0.5, sapo_tau_neg=2.0, **kw)
    assert math.isclose(out.loss.item(), (-sig(0.5) * 8 + sig(2.0) * 2) / 2, rel_tol=1e-5)
    assert math.isclose(out.loss.item(), -1.60904, abs_tol=1e-5)
    out = grpo_loss_from_logits(logits, y, a, **kw)
    assert math.isclose(out.loss.item(), (-sig(1.0) * 4 + sig(1.05) * 4 / 1.05) / 2, rel_tol=1e-5)
    assert math.isclose(out.loss.item(), -0.05112, abs_tol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs found by trying (issue 13): chunk sizes, non-finite inputs, log-probs above 0, float64 on auto
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [0, -4, 2.5, True])
def test_chunk_size_must_be_a_positive_integer(gen, chunk):
    """A non-positive chunk size used to run the chunk loop zero times over torch.empty buffers."""
    x = make_batch(gen, b=2, t=4, d=8, v=40)
    h, w, _ = leaves(x, torch.float32, bias=False)
    y, a = x["y"], x["adv"].float()
    match = "^chunk_size must be a positive integer"
    with pytest.raises(ValueError, match=match):
        grpo_loss(h, w, y, a, chunk_size=chunk)
    with pytest.raises(ValueError, match=match):
        grpo_loss_from_logits(h @ w.t(), y, a, chunk_size=chunk)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(h, w, y, chunk_size=chunk)
    with pytest.raises(ValueError, match=match):
        GRPOLoss(chunk_size=chunk)


# -inf in the bias bans a token (test_minus_inf_bias_bans_tokens)
NON_FINITE = [(n, v) for n in ("hidden", "weight") for v in (math.nan, math.inf, -math.inf)]
NON_FINITE += [("bias", math.nan), ("bias", math.inf)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where,value", NON_FINITE)
def test_non_finite_head_inputs_raise_naming_the_argument(gen, backend, where, value):
    """Found by the O(N) log-partition / entropy check (no pass over [N, D]); the message names the input."""
    x = make_batch(gen, b=2, t=5, d=8, v=40, mask_p=0.0)
    h, w, b = (t.detach() for t in leaves(x, torch.float32))
    if where == "hidden":
        h[1, 2, 3] = value
    elif where == "weight":
        w[7, 3] = value
    else:
        b[7] = value
    a = x["adv"].float()
    for fn in (
        lambda: grpo_loss(h, w, x["y"], a, bias=b, backend=backend),
        lambda: grpo_loss(h, w, x["y"], a, bias=b, backend=backend, importance_level="sequence"),
        lambda: linear_logprobs(h, w, x["y"], bias=b, backend=backend),
    ):
        with pytest.raises(ValueError, match=f"^{where} .* NaN/inf"):
            fn()
    if where == "hidden":  # a masked row is not scored: its values do not matter
        mask = torch.ones(2, 5)
        mask[1, 2] = 0
        out = grpo_loss(h, w, x["y"], a, bias=b, mask=mask, backend=backend)
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_raise(gen, backend):
    x = make_batch(gen, b=2, t=3, d=8, v=40)
    logits = (x["h"] @ x["w"].t()).float()
    for value in (math.nan, math.inf):
        z = logits.clone()
        z[1, 0, 5] = value
        with pytest.raises(ValueError, match=r"^logits \[2, 3, 40\] contains 1 NaN/inf"):
            grpo_loss_from_logits(z, x["y"], x["adv"].float(), backend=backend)
    # overflow with finite inputs: fp16 logits scaled past its range by the temperature
    with pytest.raises(ValueError, match="overflow"):
        grpo_loss_from_logits(
            torch.full((1, 2, 3), 6e4, dtype=torch.float16), torch.zeros(1, 2, dtype=torch.long),
            torch.ones(1), temperature=1e-36, backend=backend,
        )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_bias_bans_tokens(gen, backend):
    """A -inf bias entry gives its token probability 0: finite loss, entropy and gradients on every backend, and
    the same numbers as the fp64 reference over the remaining vocabulary."""
    x = make_batch(gen, b=3, t=4, d=8, v=40)
    x["y"] = x["y"] % 30
    banned = x["bias"].clone()
    banned[30:] = -math.inf
    kw = dict(beta=0.04, entropy_coef=0.01, loss_type="grpo")
    x_b = dict(x, bias=banned)
    _, out = run_loss(grpo_loss, x_b, torch.float32, backend=backend, **kw)
    x_cut = dict(x, w=x["w"][:30], bias=x["bias"][:30])
    _, gt = run_loss(grpo_loss_ref, x_cut, torch.float64, **kw)
    _, lo = run_loss(grpo_loss_ref, x_cut, torch.float32, **kw)
    assert all(bool(torch.isfinite(t).all()) for t in out)
    assert float(out[2][30:].abs().max()) == 0.0 and float(out[3][30:].abs().max()) == 0.0
    for name, o, g, l in zip(("loss", "d_hidden", "d_weight", "d_bias"), out, gt, lo):
        o = o[:30] if name in ("d_weight", "d_bias") else o
        assert_budget(o, g, l, torch.float32, name)


def test_log_probs_above_zero_raise(gen):
    x = make_batch(gen, b=2, t=4, d=8, v=40)
    h, w, _ = leaves(x, torch.float32, bias=False)
    for name in ("old_logp", "ref_logp"):
        bad = x[name[:3]].float().clone()
        bad[0, 1] = 0.5
        with pytest.raises(ValueError, match=rf"^{name} .* must hold log-probabilities \(<= 0\)"):
            grpo_loss(h, w, x["y"], x["adv"].float(), beta=0.1, **{"old_logp": x["old"].float(), "ref_logp": x["ref"].float(), name: bad})  # fmt: skip
    ok = torch.zeros(2, 4)  # exactly 0 (probability 1) is a log-probability
    grpo_loss(h, w, x["y"], x["adv"].float(), old_logp=ok)


def test_auto_backend_supports_float64(gen):
    """auto picked the C++ extension for float64 CPU inputs, which then raised; now it picks one that runs, and an
    explicit backend that cannot take float64 says so."""
    from fastgrpo._backends import BackendUnavailable

    x = make_batch(gen, b=2, t=4, d=8, v=40)
    h, w, b = leaves(x, torch.float64)
    out = grpo_loss(h, w, x["y"], x["adv"], bias=b, mask=x["mask"], old_logp=x["old"])
    ref = grpo_loss_ref(h, w, x["y"], x["adv"], bias=b, mask=x["mask"], old_logp=x["old"])
    assert out.logp.dtype == torch.float32  # log-probs and losses are fp32 whatever the inputs (DESIGN.md)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    grpo_loss_from_logits(h @ w.t(), x["y"], x["adv"], mask=x["mask"])
    linear_logprobs(h, w, x["y"], bias=b)
    assert "cpp" not in fastgrpo.available_backends("cpu", torch.float64)
    if "cpp" in BACKENDS:
        with pytest.raises(BackendUnavailable, match="backend='cpp' supports float32, bfloat16, float16"):
            grpo_loss(h, w, x["y"], x["adv"], backend="cpp")


# ------------------------------------------------------------------------------------------------------------
# LossConfig: one configuration for the functions, the module and the trainer
# ------------------------------------------------------------------------------------------------------------
def test_loss_config_is_the_one_configuration(gen):
    import dataclasses
    import typing

    hints = typing.get_type_hints(LossConfig)
    assert typing.get_args(hints["loss_type"]) == fastgrpo.LOSS_TYPES
    assert typing.get_args(hints["importance_level"]) == fastgrpo.IMPORTANCE_LEVELS
    assert hints["chunk_size"] == int | None and hints["eps_high"] == float | None
    assert [f.name for f in dataclasses.fields(LossConfig)] == [
        "loss_type", "importance_level", "eps_low", "eps_high", "delta", "dual_clip", "beta", "entropy_coef",
        "kl_bias_correction", "sapo_tau_pos", "sapo_tau_neg", "chunk_size", "backend",
    ]  # fmt: skip
    x = make_batch(gen, b=3, t=5, d=8, v=40)
    h, w, b = leaves(x, torch.float32)
    cfg = LossConfig(loss_type="grpo", beta=0.05, dual_clip=2.0, eps_high=0.28, chunk_size=4, backend="torch")
    batch = dict(mask=x["mask"], old_logp=x["old"].float(), ref_logp=x["ref"].float(), bias=b)
    by_config = grpo_loss(h, w, x["y"], x["adv"].float(), config=cfg, **batch)
    by_keywords = grpo_loss(h, w, x["y"], x["adv"].float(), **dataclasses.asdict(cfg), **batch)
    assert torch.equal(by_config.loss, by_keywords.loss)
    assert by_config.loss.item() != grpo_loss(h, w, x["y"], x["adv"].float(), **batch).loss.item()
    module = GRPOLoss(cfg)
    assert torch.equal(module(h, w, x["y"], x["adv"].float(), **batch).loss, by_config.loss)
    logits = h.detach() @ w.detach().t() + b.detach()
    assert torch.equal(
        module.from_logits(logits, x["y"], x["adv"].float(), **{k: v for k, v in batch.items() if k != "bias"}).loss,
        grpo_loss_from_logits(logits, x["y"], x["adv"].float(), config=cfg, mask=x["mask"], old_logp=x["old"].float(), ref_logp=x["ref"].float()).loss,
    )  # fmt: skip
    # a field keyword beside the config: an error naming it (a keyword left at its default is fine)
    with pytest.raises(ValueError, match="^beta=0.1 is given beside config"):
        grpo_loss(h, w, x["y"], x["adv"].float(), config=cfg, beta=0.1, **batch)
    with pytest.raises(ValueError, match="^loss_type='grpo' is given beside config"):
        grpo_loss_from_logits(logits, x["y"], x["adv"].float(), config=LossConfig("bnpo"), loss_type="grpo")
    grpo_loss_from_logits(logits, x["y"], x["adv"].float(), config=LossConfig("bnpo"), loss_type="dapo")
    with pytest.raises(ValueError, match="^chunk_size=8 is given beside config"):
        GRPOLoss(cfg, chunk_size=8)
    with pytest.raises(TypeError, match="betta"):
        GRPOLoss(betta=0.1)
    with pytest.raises(ValueError, match="config must be a fastgrpo.LossConfig"):
        grpo_loss(h, w, x["y"], x["adv"].float(), config={"beta": 0.1})


@pytest.mark.parametrize(
    "field,value",
    [
        ("loss_type", "ppo"), ("importance_level", "seq"), ("eps_low", -0.1), ("eps_low", math.nan),
        ("eps_high", -1.0), ("eps_high", math.inf), ("delta", 1.0), ("dual_clip", 0.5), ("beta", -0.01),
        ("beta", math.nan), ("entropy_coef", math.inf), ("entropy_coef", "0.1"), ("kl_bias_correction", 1),
        ("sapo_tau_pos", 0.0), ("sapo_tau_neg", -1.0), ("chunk_size", 0), ("chunk_size", 1.5),
        ("backend", "cuda_fast"), ("eps_low", True),
    ],
)  # fmt: skip
def test_loss_config_validate_names_the_field_first(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        LossConfig(**{field: value}).validate()


def _loss_of(x, h, w, seqs, loss_type, num_items):
    ix = torch.tensor(seqs)
    return grpo_loss(
        h[ix], w, x["y"][ix], x["adv"][ix].float(), mask=x["mask"][ix], old_logp=x["old"][ix].float(),
        ref_logp=x["ref"][ix].float(), num_items_in_batch=num_items, loss_type=loss_type, max_completion_length=6,
        eps_high=5.0 if loss_type == "cispo" else None, beta=0.04,
    ).loss  # fmt: skip


def test_accumulation_weight_gives_the_global_gradient(gen):
    """Two simulated DDP ranks, each with its share of the global batch split into micro-batches: the sum over a
    rank's micro-batches of accumulation_weight(...) * grad(micro-batch loss), averaged over the ranks, equals
    the gradient of the whole batch's loss in one call (bnpo: the mean of the ranks' token-mean losses, TRL's
    per-process normalisation). dapo / cispo micro-batches use the global token count as num_items_in_batch."""
    world = 2
    x = make_batch(gen, b=8, t=6, d=8, v=50)
    x["mask"][5, 1:] = 0.0  # ragged, and one near-empty sequence
    ranks = [[[0, 1, 2], [3]], [[4, 5], [6, 7]]]  # sequence indices of each micro-batch, per rank
    total_tokens = int(x["mask"].sum())
    for lt in LOSS_TYPES:
        h = x["h"].float().requires_grad_()
        w = x["w"].float().requires_grad_()
        items = total_tokens if lt in ("dapo", "cispo") else None
        rank_grads = []
        for mbs in ranks:
            local = sum(int(x["mask"][i].sum()) for mb in mbs for i in mb)
            total = 0.0
            for mb in mbs:
                wgt = accumulation_weight(
                    lt, num_seqs=len(mb), total_seqs=8, num_tokens=int(x["mask"][mb].sum()), local_tokens=local,
                    world_size=world,
                )  # fmt: skip
                total = total + wgt * _loss_of(x, h, w, mb, lt, items)
            rank_grads.append(torch.autograd.grad(total, [h, w]))
        ddp = [(a + b_) / world for a, b_ in zip(*rank_grads)]
        if lt == "bnpo":
            direct = sum(_loss_of(x, h, w, [i for mb in mbs for i in mb], lt, None) for mbs in ranks) / world
        else:
            direct = _loss_of(x, h, w, list(range(8)), lt, None)
        one_shot = torch.autograd.grad(direct, [h, w])
        for got, want in zip(ddp, one_shot):
            assert float(want.abs().max()) > 0
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m, lt=lt: f"{lt}: {m}")
    with pytest.raises(ValueError, match="loss_type"):
        accumulation_weight("ppo", num_seqs=1, total_seqs=1, num_tokens=1, local_tokens=1, world_size=1)

"""End to end through the public ops with the Triton backends, under the CPU interpreter.

``linear_logprobs`` / ``grpo_loss`` with ``backend="triton"`` (fused kernels) and ``"triton_chunked"`` (library
GEMM + Triton epilogues), and ``grpo_loss_from_logits``, against the fp64 reference under the STYLE.md error
budget: every loss type, both importance levels, the COPO blend, padded and packed layouts.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import assert_budget, loss_batch

if importlib.util.find_spec("triton") is None:  # not importorskip: importing triton here fixes its mode
    pytest.skip("triton is not installed", allow_module_level=True)

import fastgrpo  # noqa: E402
from fastgrpo import grpo_loss, grpo_loss_from_logits, grpo_loss_ref, linear_logprobs, linear_logprobs_ref  # noqa: E402
from fastgrpo._backends import BackendUnavailable  # noqa: E402
from fastgrpo.ops.grpo_loss import grpo_loss_from_logits_ref  # noqa: E402

BACKENDS = ["triton", "triton_chunked"]
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]


# The interpreter mode is fixed when triton is first imported: it must come from the process environment.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="run with TRITON_INTERPRET=1 in the environment (Triton's CPU interpreter)",
)


def make_batch(gen, b=4, t=9, d=48, v=130, mask_p=0.3):
    return loss_batch(gen, b, t, d, v, mask_p)


def run_loss(fn, x, dtype, *, layout="padded", **kw):
    """``[loss, d_hidden, d_weight, d_bias]`` of ``fn`` on the batch (``dtype`` inputs, fp32 side tensors)."""
    h, w, b = (x[k].detach().to(dtype).requires_grad_() for k in ("h", "w", "bias"))
    side = torch.float64 if dtype == torch.float64 else torch.float32
    old, ref, adv = (x[k].to(side) for k in ("old", "ref", "adv"))
    if "blend" in kw:
        kw["blend"] = kw["blend"].to(side)
        adv = (adv, kw.pop("adv_local").to(side))
    if layout == "padded":
        out = fn(h, w, x["y"], adv, bias=b, mask=x["mask"], old_logp=old, ref_logp=ref, **kw)
    else:
        m = x["mask"].bool()
        cu = torch.zeros(m.shape[0] + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(m.sum(1), 0)
        out = fn(h[m], w, x["y"][m], adv, bias=b, cu_seqlens=cu, old_logp=old[m], ref_logp=ref[m], **kw)
    (out.loss * 0.73).backward()
    return out, [out.loss, h.grad, w.grad, b.grad]


def check(out, gt, lo, dtype, what):
    for name, o, g, r in zip(("loss", "d_hidden", "d_weight", "d_bias"), out, gt, lo):
        assert_budget(o, g, r, dtype, f"{what} {name}")


def test_auto_never_picks_triton_on_cpu(monkeypatch):
    assert not {"triton", "triton_chunked"} & set(fastgrpo.available_backends("cpu"))
    fastgrpo._backends.load_triton()  # its first import fixes its mode: the interpreter's, before unsetting it
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not {"triton", "triton_chunked"} & set(fastgrpo.available_backends("cpu"))
    h, w, y = torch.randn(3, 16), torch.randn(20, 16), torch.randint(0, 20, (3,))
    for backend in BACKENDS:
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
            linear_logprobs(h, w, y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_logprobs(gen, backend, dtype):
    n, d, v = 37, 48, 1001
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=gen)
    g_lp, g_en = (
        torch.randn(n, generator=gen, dtype=torch.float64),
        torch.randn(n, generator=gen, dtype=torch.float64),
    )

    def run(fn, dt, **kw):
        leaves = [t.detach().to(dt).requires_grad_() for t in (h, w, b)]
        lp, en = fn(leaves[0], leaves[1], y, bias=leaves[2], temperature=0.7, **kw)
        ((lp * g_lp.to(lp.dtype)).sum() + (en * g_en.to(en.dtype)).sum()).backward()
        return [lp, en] + [t.grad for t in leaves]

    gt = run(linear_logprobs_ref, torch.float64)
    lo = run(linear_logprobs_ref, dtype)
    out = run(linear_logprobs, dtype, return_entropy=True, backend=backend, chunk_size=16)
    for name, o, g, r in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), out, gt, lo):
        assert_budget(o, g, r, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_types_token_level(gen, backend, loss_type):
    x = make_batch(gen)
    kw = dict(loss_type=loss_type, beta=0.04, max_completion_length=9, temperature=0.8, entropy_coef=0.01)
    if loss_type == "cispo":
        kw["eps_high"] = 5.0
    _, gt = run_loss(grpo_loss_ref, x, torch.float64, **kw)
    _, lo = run_loss(grpo_loss_ref, x, torch.float32, **kw)
    _, out = run_loss(grpo_loss, x, torch.float32, backend=backend, chunk_size=16, **kw)
    check(out, gt, lo, torch.float32, f"{backend} {loss_type}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_grpo_loss_sequence_level(gen, backend, loss_type):
    x = make_batch(gen)
    kw = dict(loss_type=loss_type, importance_level="sequence", beta=0.04, dual_clip=3.0, eps_high=0.28)
    if loss_type == "cispo":
        kw["eps_high"] = 5.0
    _, gt = run_loss(grpo_loss_ref, x, torch.float64, **kw)
    _, lo = run_loss(grpo_loss_ref, x, torch.float32, **kw)
    _, out = run_loss(grpo_loss, x, torch.float32, backend=backend, chunk_size=16, **kw)
    check(out, gt, lo, torch.float32, f"{backend} GSPO {loss_type}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_bf16(gen, backend):
    x = make_batch(gen, v=1001)
    kw = dict(loss_type="dapo", beta=0.04, delta=1.5, eps_high=0.28, entropy_coef=0.01)
    _, gt = run_loss(grpo_loss_ref, x, torch.float64, **kw)
    _, lo = run_loss(grpo_loss_ref, x, torch.bfloat16, **kw)
    _, out = run_loss(grpo_loss, x, torch.bfloat16, backend=backend, chunk_size=16, **kw)
    check(out, gt, lo, torch.bfloat16, f"{backend} bf16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_copo_blend_padded_equals_packed(gen, backend, level):
    x = make_batch(gen, b=6, t=7)
    blend = torch.sigmoid(torch.randn(6, generator=gen, dtype=torch.float64))
    adv_local = torch.randn(6, generator=gen, dtype=torch.float64)
    kw = dict(loss_type="grpo", importance_level=level, beta=0.02, max_completion_length=7)
    bl = dict(blend=blend, adv_local=adv_local)
    _, gt = run_loss(grpo_loss_ref, x, torch.float64, **bl, **kw)
    _, lo = run_loss(grpo_loss_ref, x, torch.float32, **bl, **kw)
    o_pad, pad = run_loss(grpo_loss, x, torch.float32, backend=backend, **dict(bl), **kw)
    o_pk, pk = run_loss(grpo_loss, x, torch.float32, layout="packed", backend=backend, **dict(bl), **kw)
    check(pad, gt, lo, torch.float32, f"{backend} blend padded")
    check(pk, gt, lo, torch.float32, f"{backend} blend packed")
    torch.testing.assert_close(o_pad.logp[x["mask"].bool()], o_pk.logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("inplace", [False, True])
def test_grpo_loss_from_logits(gen, inplace):
    x = make_batch(gen)
    kw = dict(loss_type="grpo", beta=0.04, entropy_coef=0.01, temperature=0.9)

    def run(dtype, backend=None):
        logits = (x["h"] @ x["w"].t() + x["bias"]).to(dtype).detach().requires_grad_()
        src = logits * 1.0 if inplace else logits  # in place: the op must own a non-leaf buffer
        keep = src.detach().clone()
        extra = {} if backend is None else dict(backend=backend, inplace=inplace, chunk_size=16)
        fn = grpo_loss_from_logits if backend is not None else grpo_loss_from_logits_ref
        old, ref, adv = (x[k].to(dtype) for k in ("old", "ref", "adv"))
        out = fn(src, x["y"], adv, mask=x["mask"], old_logp=old, ref_logp=ref, **extra, **kw)
        out.loss.backward()
        if backend is not None and not inplace:
            assert torch.equal(src.detach(), keep), "the caller's logits must not change"
        return out, [out.loss, logits.grad]

    _, gt = run(torch.float64)
    _, lo = run(torch.float32)
    out, res = run(torch.float32, backend="triton")
    for name, o, g, r in zip(("loss", "d_logits"), res, gt, lo):
        assert_budget(o, g, r, torch.float32, f"from_logits inplace={inplace} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:(All-NaN slice|invalid value):RuntimeWarning")  # interpreter's numpy, NaN
def test_non_finite_inputs_and_overflowing_ratios(gen, backend):
    """Issue 13 on the Triton backends (tiny shapes): NaN / inf head inputs raise naming the argument, found from
    the kernels' O(N) outputs; a -inf bias bans a token; an overflowing ratio under the dual clip gives a finite
    loss with finite gradients (the hand-computed case of test_grpo_loss.py)."""
    import math

    x = make_batch(gen, b=2, t=5, v=70)
    h, w, b = (x[k].float() for k in ("h", "w", "bias"))
    a = x["adv"].float()
    for name, t in (("hidden", h), ("weight", w), ("bias", b)):
        for value in (math.nan, math.inf):
            bad = t.clone()
            bad.view(-1)[7] = value
            args = {"hidden": h, "weight": w, "bias": b, name: bad}
            with pytest.raises(ValueError, match=f"^{name} .* NaN/inf"):
                grpo_loss(args["hidden"], args["weight"], x["y"], a, bias=args["bias"], backend=backend)
            with pytest.raises(ValueError, match=f"^{name} .* NaN/inf"):
                linear_logprobs(args["hidden"], args["weight"], x["y"], bias=args["bias"], backend=backend)
    z = (h @ w.t() + b).clone()
    z[1, 2, 3] = math.nan
    with pytest.raises(ValueError, match=r"^logits \[2, 5, 70\] contains 1 NaN/inf"):
        grpo_loss_from_logits(z, x["y"], a, backend=backend)
    banned = b.clone()
    banned[60:] = -math.inf
    out = grpo_loss(h.requires_grad_(), w, x["y"] % 60, a, bias=banned, entropy_coef=0.01, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and torch.isfinite(out.entropy).all()
    logits = torch.zeros(1, 2, 2, requires_grad=True)  # p = 1/2; token 2's ratio e^149 is inf in fp32
    old = torch.tensor([[-math.log(2), -150.0]])
    y2 = torch.zeros(1, 2, dtype=torch.long)
    out = grpo_loss_from_logits(
        logits, y2, torch.tensor([-1.0]), old_logp=old, dual_clip=3.0, backend=backend
    )
    out.loss.backward()
    assert math.isclose(out.loss.item(), 2.0, rel_tol=1e-6)  # (1 + 3) / 2
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.25, -0.25], [0.0, 0.0]]]))

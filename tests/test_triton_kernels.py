"""Triton kernels under the CPU interpreter against fp64 torch, with the STYLE.md error budget.

Small odd shapes (N=37, D=48 or 64, V=1001 or 130) with blocks of 64 vocabulary columns, so every tile kind is
hit: partial token blocks, a partial last vocabulary tile, a masked K loop (D=48) and an unmasked one (D=64),
several vocabulary slices in the forward and several ``d_weight`` slabs in the backward. The interpreter's
bf16 ``tl.dot`` is broken, so the kernels upcast the operands there (``UPCAST_DOT``); the gradient still goes
through the input dtype before its products, as on the GPU.

GPU tests (``-m gpu``) run the same comparisons at real model shapes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_budget, max_err

if importlib.util.find_spec("triton") is None:  # not importorskip: importing triton here fixes its mode
    pytest.skip("triton is not installed", allow_module_level=True)

from fastgrpo._backends import BackendUnavailable  # noqa: E402
from fastgrpo.ops import _triton  # noqa: E402
from fastgrpo.ops.epilogue import torch_lse_logp_entropy  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TILE = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)


@pytest.fixture(autouse=True)
def _mode(request):
    """CPU tests run the kernels in Triton's interpreter, GPU tests compile them: the mode is fixed when triton
    is first imported, so it comes from the environment of the whole pytest process."""
    if request.node.get_closest_marker("gpu") is None:
        if not INTERPRET:
            pytest.skip("run with TRITON_INTERPRET=1 in the environment (Triton's CPU interpreter)")
    elif INTERPRET:
        pytest.skip("GPU tests need compiled kernels: run without TRITON_INTERPRET")


def _cfgs(num_groups=3, dw_slab_bytes=None, block_v=64):
    configs = _triton._kernels().configs
    RowConfig, TileConfig = configs.RowConfig, configs.TileConfig

    tile = TileConfig(**{**TILE, "BLOCK_V": block_v})
    return _triton.override_configs(
        fwd=tile, bwd=tile, epilogue=RowConfig(BLOCK_V=block_v, num_warps=4), num_groups=num_groups,
        dw_slab_bytes=dw_slab_bytes,
    )  # fmt: skip


def make(gen, n, d, v, *, bias=True, scale=1.0):
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    c_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    c_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    return h, w, b, y, c_logp, c_ent


def reference(h, w, b, y, c_logp, c_ent, inv_temp, dtype):
    """``(lse, logp, entropy, [d_h, d_w, d_b])`` of ``L = sum c_logp logp + c_ent entropy`` by autograd through
    materialised logits in ``dtype`` (fp64: ground truth; bf16: the low-precision reference of the budget)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (h, w, b)]
    z = leaves[0] @ leaves[1].t()
    if b is not None:
        z = z + leaves[2]
    x = (z if dtype == torch.float64 else z.float()) * inv_temp
    lse = torch.logsumexp(x, -1)
    ls = x - lse[:, None]
    logp = ls.gather(1, y[:, None]).squeeze(1)
    ent = -(ls.exp() * ls).sum(-1)
    loss = (logp * c_logp.to(logp.dtype)).sum()
    if c_ent is not None:
        loss = loss + (ent * c_ent.to(ent.dtype)).sum()
    loss.backward()
    return lse.detach(), logp.detach(), ent.detach(), [t.grad if t is not None else None for t in leaves]


def run_fused(h, w, b, y, c_logp, c_ent, inv_temp, dtype, needs=(True, True, True)):
    hh, ww = h.to(dtype), w.to(dtype)
    bb = b.to(dtype) if b is not None else None
    lse, logp, ent = _triton.fused_lse_logp_entropy(hh, ww, bb, y, inv_temp)
    grads = _triton.fused_linear_grad(
        hh, ww, bb, y, lse, ent, c_logp.float(), None if c_ent is None else c_ent.float(), inv_temp, needs
    )
    return lse, logp, ent, list(grads)


def check_all(out, gt, lo, dtype, what):
    for name, o, g, r in zip(("lse", "logp", "entropy"), out[:3], gt[:3], lo[:3]):
        assert o.dtype == torch.float32
        assert_budget(o, g, r, dtype, f"{what} {name}")
    for name, o, g, r in zip(("d_hidden", "d_weight", "d_bias"), out[3], gt[3], lo[3]):
        if g is None:
            assert o is None, f"{what}: {name} should be None"
            continue
        assert o is not None and o.dtype == r.dtype, f"{what}: {name} dtype"
        assert_budget(o, g, r, dtype, f"{what} {name}")


# ---------------------------------------------------------------------------------------------------------------
# Fused kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "n,d,v,bias,temp",
    [(37, 48, 1001, True, 0.7), (37, 64, 130, False, 1.0)],
    ids=["n37-d48-v1001-bias", "n37-d64-v130"],
)
def test_fused_matches_fp64(gen, dtype, n, d, v, bias, temp):
    h, w, b, y, c_logp, c_ent = make(gen, n, d, v, bias=bias)
    gt = reference(h, w, b, y, c_logp, c_ent, 1 / temp, torch.float64)
    lo = reference(h, w, b, y, c_logp, c_ent, 1 / temp, dtype)
    # bf16: d_weight is accumulated in fp32 slabs of 2 x 64 vocabulary rows (several launches)
    slab = 2 * 64 * d * 4 if dtype == torch.bfloat16 else None
    with _cfgs(num_groups=3, dw_slab_bytes=slab):
        out = run_fused(h, w, b, y, c_logp, c_ent, 1 / temp, dtype)
    check_all(out, gt, lo, dtype, f"fused {dtype}")


def test_fused_no_entropy_term_and_partial_grads(gen):
    n, d, v = 37, 48, 130
    h, w, b, y, c_logp, _ = make(gen, n, d, v)
    gt = reference(h, w, b, y, c_logp, None, 1.0, torch.float64)
    lo = reference(h, w, b, y, c_logp, None, 1.0, torch.float32)
    with _cfgs():
        out = run_fused(h, w, b, y, c_logp, None, 1.0, torch.float32, needs=(False, True, True))
    d_h_gt, d_h_lo = gt[3][0], lo[3][0]
    gt[3][0] = lo[3][0] = None  # d_hidden not requested
    check_all(out, gt, lo, torch.float32, "fused c_ent=None")
    with _cfgs():
        out = run_fused(h, w, b, y, c_logp, None, 1.0, torch.float32, needs=(True, False, False))
    assert out[3][1] is None and out[3][2] is None
    assert_budget(out[3][0], d_h_gt, d_h_lo, torch.float32, "fused d_hidden only")
    with _cfgs():
        assert (
            run_fused(h, w, b, y, c_logp, None, 1.0, torch.float32, needs=(False, False, False))[3]
            == [None] * 3
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_single_token(gen, dtype):
    h, w, b, y, c_logp, c_ent = make(gen, 1, 48, 1001)
    gt = reference(h, w, b, y, c_logp, c_ent, 1.0, torch.float64)
    lo = reference(h, w, b, y, c_logp, c_ent, 1.0, dtype)
    with _cfgs(num_groups=None):  # automatic slices: one token block spread over the vocabulary
        out = run_fused(h, w, b, y, c_logp, c_ent, 1.0, dtype)
    check_all(out, gt, lo, dtype, "fused N=1")


def test_fused_extreme_logits(gen):
    """|x| ~ 1e4: no overflow, and the entropy keeps its precision (no lse - E[x] cancellation)."""
    h, w, b, y, c_logp, c_ent = make(gen, 37, 48, 130, scale=3e3)
    assert float((h @ w.t()).abs().max()) > 5e3
    gt = reference(h, w, b, y, c_logp, c_ent, 1.0, torch.float64)
    lo = reference(h, w, b, y, c_logp, c_ent, 1.0, torch.float32)
    with _cfgs():
        out = run_fused(h, w, b, y, c_logp, c_ent, 1.0, torch.float32)
    check_all(out, gt, lo, torch.float32, "fused extreme")
    # a peaked distribution has a tiny entropy: it must be accurate in absolute terms, not only relative to lse
    assert max_err(out[2], gt[2]) < 1e-3


@pytest.mark.parametrize("num_groups", [1, 2, 16])
def test_fused_forward_vocab_slices_agree(gen, num_groups):
    h, w, b, y, *_ = make(gen, 37, 48, 1001)
    gt = reference(h, w, b, y, torch.zeros(37, dtype=torch.float64), None, 1.0, torch.float64)
    with _cfgs(num_groups=num_groups):
        out = _triton.fused_lse_logp_entropy(h.float(), w.float(), b.float(), y, 1.0)
    for o, g in zip(out, gt[:3]):
        assert max_err(o, g) < 2e-5


def test_fused_zero_coefficient_rows_get_zero_grad(gen):
    """Padding tokens (zero coefficients) contribute exactly nothing; tiles of them skip their products."""
    h, w, b, y, c_logp, c_ent = make(gen, 37, 48, 130)
    c_logp[16:32] = 0.0  # one whole 16-token block
    c_ent[16:32] = 0.0
    c_logp[35] = c_ent[35] = 0.0
    gt = reference(h, w, b, y, c_logp, c_ent, 1.0, torch.float64)
    lo = reference(h, w, b, y, c_logp, c_ent, 1.0, torch.float32)
    with _cfgs():
        out = run_fused(h, w, b, y, c_logp, c_ent, 1.0, torch.float32)
    check_all(out, gt, lo, torch.float32, "fused zero rows")
    d_h = out[3][0]
    assert torch.all(d_h[16:32] == 0) and torch.all(d_h[35] == 0)


def test_fused_does_not_modify_inputs(gen):
    h, w, b, y, c_logp, c_ent = make(gen, 37, 48, 130)
    ins = [t.float() for t in (h, w, b, c_logp, c_ent)] + [y]
    copies = [t.clone() for t in ins]
    with _cfgs():
        lse, logp, ent = _triton.fused_lse_logp_entropy(ins[0], ins[1], ins[2], y, 0.5)
        _triton.fused_linear_grad(ins[0], ins[1], ins[2], y, lse, ent, ins[3], ins[4], 0.5)
    for a, c in zip(ins, copies):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------------
# Logits epilogue (chunked backend, grpo_loss_from_logits)


def lse_logp_entropy(z, y, inv_temp):
    """``(lse, logp, entropy)`` computed in ``z``'s dtype (``epilogue.torch_lse_logp_entropy`` upcasts to fp32)."""
    x = z * inv_temp
    lse = torch.logsumexp(x, -1)
    ls = x - lse[:, None]
    return lse, ls.gather(1, y[:, None]).squeeze(1), -(ls.exp() * ls).sum(-1)


def epilogue_reference(z, y, c_logp, c_ent, inv_temp):
    """fp64 ``(lse, logp, entropy)`` and ``dL/dz`` by autograd."""
    x = z.detach().double().requires_grad_()
    lse, logp, ent = lse_logp_entropy(x, y, inv_temp)
    loss = (logp * c_logp.double()).sum() + ((ent * c_ent.double()).sum() if c_ent is not None else 0.0)
    loss.backward()
    return lse.detach(), logp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v", [1001, 130])
def test_epilogue_matches_fp64(gen, dtype, v):
    c = 13  # one program per row: the interpreter's cost is rows x column steps
    z = (torch.randn(c, v, generator=gen) * 4).to(dtype)
    y = torch.randint(0, v, (c,), generator=gen)
    c_logp, c_ent = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    gt = epilogue_reference(z, y, c_logp, c_ent, 0.7)
    # low-precision reference: the torch epilogue fed the same block (fp32 math on the dtype's values),
    # its gradient rounded to the dtype as the contract requires
    lo_fwd = torch_lse_logp_entropy(z, y, 0.7)
    lo_grad = epilogue_reference(z, y, c_logp, c_ent, 0.7)[3].to(dtype)
    z_before = z.clone()
    with _cfgs():
        lse, logp, ent = _triton.logits_lse_logp_entropy(z, y, 0.7)
        g = _triton.logits_grad(z, y, lse, ent, c_logp, c_ent, 0.7)
    assert torch.equal(z, z_before), "logits_grad without out= must not modify the logits"
    for name, o, r, lo in zip(("lse", "logp", "entropy"), (lse, logp, ent), gt[:3], lo_fwd):
        assert_budget(o, r, lo, dtype, f"epilogue {name}")
    assert g.dtype == dtype and g.shape == z.shape
    assert_budget(g, gt[3], lo_grad, dtype, "epilogue grad")
    with _cfgs():  # in place (the engine's block) gives the same values
        g2 = _triton.logits_grad_(z, y, lse, ent, c_logp, c_ent, 0.7)
    assert g2 is z and torch.equal(g2, g)


def test_epilogue_out_argument_and_strided_rows(gen):
    c, v = 21, 130
    big = torch.randn(c, v + 7, generator=gen)
    z = big[:, :v]  # row stride v + 7
    y = torch.randint(0, v, (c,), generator=gen)
    c_logp = torch.randn(c, generator=gen)
    gt = epilogue_reference(z, y, c_logp, None, 1.0)
    out = torch.empty(c, v, dtype=torch.float32)
    with _cfgs():
        lse, logp, ent = _triton.logits_lse_logp_entropy(z, y, 1.0)
        res = _triton.logits_grad(z, y, lse, ent, c_logp, None, 1.0, out=out)
    assert res is out
    assert max_err(logp, gt[1]) < 1e-5 and max_err(out, gt[3]) < 1e-6


def test_epilogue_masked_vocab_and_extreme(gen):
    """-inf logits (masked vocabulary) get probability 0 and gradient 0; |x| ~ 1e4 stays finite and accurate."""
    c, v = 9, 130
    z = (torch.randn(c, v, generator=gen) * 1e4).double()  # fp32 values held exactly in fp64
    z[:, 100:] = float("-inf")
    z[0, :] = float("-inf")
    z[0, 5] = 3.0  # a row with one finite entry: p = onehot, entropy 0
    y = torch.randint(0, 100, (c,), generator=gen)
    y[0] = 5
    c_logp, c_ent = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    with _cfgs():
        lse, logp, ent = _triton.logits_lse_logp_entropy(z.float(), y, 1.0)
        g = _triton.logits_grad(z.float(), y, lse, ent, c_logp, c_ent, 1.0)
    assert torch.isfinite(lse).all() and torch.isfinite(ent).all() and torch.isfinite(g).all()
    assert torch.all(g[:, 100:] == 0) and float(ent[0]) == 0.0 and float(logp[0]) == 0.0
    # the finite part against fp64 (gt) and the torch epilogue in fp32 (lo), rows 1..8
    fin, yf, cl, ce = z[1:, :100], y[1:], c_logp[1:], c_ent[1:]
    gt = epilogue_reference(fin, yf, cl, ce, 1.0)
    lo_fwd = torch_lse_logp_entropy(fin.float(), yf, 1.0)
    x = fin.float().requires_grad_()
    lse32, logp32, ent32 = torch_lse_logp_entropy(x, yf, 1.0)
    ((logp32 * cl).sum() + (ent32 * ce).sum()).backward()
    for name, o, r, lo_ in zip(("lse", "logp", "entropy"), (lse[1:], logp[1:], ent[1:]), gt[:3], lo_fwd):
        assert_budget(o, r, lo_, torch.float32, f"extreme {name}")
    assert_budget(g[1:, :100], gt[3], x.grad, torch.float32, "extreme grad")


def test_chunked_epilogue_in_engine(gen):
    from fastgrpo.ops._engine import chunked_pass
    from fastgrpo.ops.epilogue import get_epilogue

    ep = _triton.get_chunked_epilogue()
    assert ep.name == "triton_chunked"
    h, w, b, y, c_logp, c_ent = make(gen, 37, 48, 130)
    kw = dict(coefs=(c_logp.float(), c_ent.float()), needs_grad=(True, True, True))
    ref = chunked_pass(h.float(), w.float(), b.float(), y, 0.7, 16, get_epilogue("torch"))
    with _cfgs():
        res = chunked_pass(h.float(), w.float(), b.float(), y, 0.7, 16, ep)
        g = chunked_pass(
            h.float(), w.float(), b.float(), y, 0.7, 16, ep, saved_stats=(res.lse, res.entropy), **kw
        )
    g_ref = chunked_pass(
        h.float(),
        w.float(),
        b.float(),
        y,
        0.7,
        16,
        get_epilogue("torch"),
        saved_stats=(ref.lse, ref.entropy),
        **kw,
    )
    for a, r in [(res.lse, ref.lse), (res.logp, ref.logp), (res.entropy, ref.entropy)]:
        assert max_err(a, r) < 1e-5
    for a, r in [(g.d_hidden, g_ref.d_hidden), (g.d_weight, g_ref.d_weight), (g.d_bias, g_ref.d_bias)]:
        assert max_err(a, r) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Availability, validation, torch.library


def test_check_available(monkeypatch):
    _triton.check_available("cpu")  # interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        _triton.check_available("cpu")
    with pytest.raises(BackendUnavailable, match="CPU tensors"):
        _triton.fused_lse_logp_entropy(
            torch.zeros(2, 16), torch.zeros(8, 16), None, torch.zeros(2, dtype=torch.long), 1.0
        )
    with pytest.raises(BackendUnavailable):
        _triton.check_available("meta")


def test_interpreter_mode_must_precede_the_triton_import():
    """Setting TRITON_INTERPRET after `import triton` leaves triton's own library compiled: a clear error, not an
    obscure failure inside the interpreter."""
    code = (
        "import os, torch, triton; os.environ['TRITON_INTERPRET'] = '1'\n"
        "from fastgrpo.ops import _triton\n"
        "from fastgrpo._backends import BackendUnavailable\n"
        "try:\n"
        "    _triton.logits_lse_logp_entropy(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), 1.0)\n"
        "except BackendUnavailable as e:\n"
        "    print('RAISED', e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert "RAISED TRITON_INTERPRET must be set before triton is first imported" in proc.stdout, proc.stderr[
        -2000:
    ]


def test_errors_name_arguments_and_shapes():
    h, w, y = torch.zeros(4, 16), torch.zeros(8, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight \[8, 12\]"):
        _triton.fused_lse_logp_entropy(h, torch.zeros(8, 12), None, y, 1.0)
    with pytest.raises(ValueError, match=r"targets .*\[3\]"):
        _triton.fused_lse_logp_entropy(h, w, None, y[:3], 1.0)
    with pytest.raises(ValueError, match=r"bias .*\[7\]"):
        _triton.fused_lse_logp_entropy(h, w, torch.zeros(7), y, 1.0)
    with pytest.raises(ValueError, match=r"c_logp .*\[5\]"):
        _triton.fused_linear_grad(h, w, None, y, torch.zeros(4), torch.zeros(4), torch.zeros(5), None, 1.0)
    with pytest.raises(ValueError, match=r"out .*\[4, 7\]"):
        _triton.logits_grad(torch.zeros(4, 8), y, *[torch.zeros(4)] * 3, None, 1.0, out=torch.zeros(4, 7))
    with pytest.raises(ValueError, match="dtype"):
        _triton.fused_lse_logp_entropy(h, w.double(), None, y, 1.0)


def test_torch_compile_traces_the_ops(gen):
    h, w, b, y, c_logp, c_ent = make(gen, 37, 48, 130)
    h, w, b, c_logp, c_ent = (t.float() for t in (h, w, b, c_logp, c_ent))

    def f(h, w, b, y, c_logp, c_ent):
        lse, logp, ent = _triton.fused_lse_logp_entropy(h, w, b, y, 0.7)
        d_h, d_w, d_b = _triton.fused_linear_grad(h, w, b, y, lse, ent, c_logp, c_ent, 0.7)
        z = h @ w.t() + b
        lse2, logp2, ent2 = _triton.logits_lse_logp_entropy(z, y, 0.7)
        g = _triton.logits_grad(z, y, lse2, ent2, c_logp, c_ent, 0.7)
        return logp - logp2, ent - ent2, d_h, d_w, d_b, g

    with _cfgs():
        eager = f(h, w, b, y, c_logp, c_ent)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(h, w, b, y, c_logp, c_ent)
    for a, c in zip(eager, compiled):
        assert max_err(c, a) < 1e-5
    assert max_err(eager[0], torch.zeros(37)) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# GPU (real shapes)


def _gpu_case(n, d, v, dtype, bias):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g, dtype=dtype)
    w = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(dtype)
    b = torch.randn(v, device="cuda", generator=g, dtype=dtype) if bias else None
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    c_logp = torch.randn(n, device="cuda", generator=g)
    c_ent = torch.randn(n, device="cuda", generator=g)
    return h, w, b, y, c_logp, c_ent


def _chunked_reference(h, w, b, y, c_logp, c_ent, inv_temp, dtype, chunk=1024):
    """fp64 ground truth or ``dtype`` reference, one chunk of logits at a time (the full [N, V] would not fit)."""
    lse, logp, ent, dh = [], [], [], []
    dw = torch.zeros(w.shape, device=w.device, dtype=torch.float64)
    db = torch.zeros(w.shape[0], device=w.device, dtype=torch.float64) if b is not None else None
    for s in range(0, h.shape[0], chunk):
        sl = slice(s, s + chunk)
        r = reference(h[sl], w, b, y[sl], c_logp[sl], c_ent[sl], inv_temp, dtype)
        lse.append(r[0]), logp.append(r[1]), ent.append(r[2]), dh.append(r[3][0])
        dw += r[3][1].double()
        if db is not None:
            db += r[3][2].double()
    return torch.cat(lse), torch.cat(logp), torch.cat(ent), [torch.cat(dh), dw, db]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n,d,v,bias", [(4096, 4096, 151936, False), (1000, 1536, 32001, True)])
def test_gpu_fused_real_shapes(dtype, n, d, v, bias):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    h, w, b, y, c_logp, c_ent = _gpu_case(n, d, v, dtype, bias)
    gt = _chunked_reference(
        h.double(), w.double(), None if b is None else b.double(), y, c_logp, c_ent, 0.9, torch.float64
    )
    lo = _chunked_reference(h, w, b, y, c_logp, c_ent, 0.9, dtype)
    lo[3][1], lo[3][2] = lo[3][1].to(dtype), None if b is None else lo[3][2].to(dtype)
    out = run_fused(h, w, b, y, c_logp, c_ent, 0.9, dtype)
    check_all(out, gt, lo, dtype, f"gpu fused {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_epilogue_real_shapes(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    c, v = 2048, 151936
    z = (torch.randn(c, v, device="cuda") * 4).to(dtype)
    y = torch.randint(0, v, (c,), device="cuda")
    c_logp, c_ent = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    gt = epilogue_reference(z, y, c_logp, c_ent, 0.7)
    lo_fwd = torch_lse_logp_entropy(z, y, 0.7)
    lse, logp, ent = _triton.logits_lse_logp_entropy(z, y, 0.7)
    g = _triton.logits_grad(z, y, lse, ent, c_logp, c_ent, 0.7)
    for name, o, r, lo in zip(("lse", "logp", "entropy"), (lse, logp, ent), gt[:3], lo_fwd):
        assert_budget(o, r, lo, dtype, f"gpu epilogue {name}")
    assert_budget(g, gt[3], gt[3].to(dtype), dtype, "gpu epilogue grad")

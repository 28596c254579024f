"""linear_logprobs against the fp64 reference under the STYLE.md error budget, for every CPU backend."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_budget

import fastgrpo
from fastgrpo import linear_logprobs, linear_logprobs_ref

BACKENDS = [b for b in fastgrpo.available_backends("cpu")]


def make(gen, n, d, v, dtype, scale=1.0, bias=True, lead=None):
    h = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    if lead is not None:
        h, y = h.view(*lead, d), y.view(*lead)
    return h, w, b, y


def run_grads(fn, h, w, b, y, dtype, g_lp, g_en, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (h, w, b)]
    lp, en = fn(leaves[0], leaves[1], y, bias=leaves[2], **kw)
    ((lp * g_lp).sum() + (en * g_en).sum()).backward()
    return lp, en, [t.grad if t is not None else None for t in leaves]


def ref_fn(h, w, y, bias=None, temperature=1.0, **_):
    return linear_logprobs_ref(h, w, y, bias=bias, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n,d,v,scale,chunk",
    [(1, 32, 1001, 1.0, None), (63, 32, 130, 1.0, 16), (1025, 16, 1001, 1.0, 256), (40, 16, 257, 3e3, 8)],
    ids=["n1", "n63-v130", "n1025-v1001", "extreme"],
)
def test_matches_fp64_reference(gen, backend, dtype, n, d, v, scale, chunk):
    h, w, b, y = make(gen, n, d, v, dtype, scale)
    if scale > 1:  # |z| ~ 1e4: check the inputs really are extreme
        assert float((h @ w.t()).abs().max()) > 5e3
        if dtype == torch.bfloat16:
            # bf16 logits near 1e4 are spaced by 64: any two GEMMs disagree by whole spacings, so the budget
            # against one reference sample means nothing. What must hold: finite, stable outputs.
            lp, en = linear_logprobs(
                h.to(dtype),
                w.to(dtype),
                y,
                bias=b.to(dtype),
                return_entropy=True,
                chunk_size=chunk,
                backend=backend,
            )
            assert (
                torch.isfinite(lp).all()
                and torch.isfinite(en).all()
                and (lp <= 0).all()
                and (en >= -1e-3).all()
            )
            return
    g_lp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_en = torch.randn(n, generator=gen, dtype=torch.float64)
    temp = 0.7
    gt = run_grads(ref_fn, h, w, b, y, torch.float64, g_lp, g_en, temperature=temp)
    lo = run_grads(ref_fn, h, w, b, y, dtype, g_lp.to(dtype), g_en.to(dtype), temperature=temp)
    out = run_grads(
        lambda *a, **k: linear_logprobs(*a, **k, return_entropy=True, chunk_size=chunk, backend=backend),
        h, w, b, y, dtype, g_lp.float(), g_en.float(), temperature=temp,
    )  # fmt: skip
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_budget(out[0], gt[0], lo[0], dtype, "logp")
    assert_budget(out[1], gt[1], lo[1], dtype, "entropy")
    for name, go, gg, gl in zip(("d_hidden", "d_weight", "d_bias"), out[2], gt[2], lo[2]):
        assert go.dtype == dtype
        assert_budget(go, gg, gl, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_layout_and_naive_parity(gen, backend):
    """[B, T, D] input equals the naive log_softmax(...).gather on materialised logits."""
    h, w, _, y = make(gen, 6 * 11, 24, 333, torch.float32, bias=False, lead=(6, 11))
    h, w = h.float(), w.float()
    naive = torch.log_softmax(h @ w.t(), -1).gather(-1, y[..., None]).squeeze(-1)
    ours = linear_logprobs(h, w, y, backend=backend, chunk_size=7)
    assert ours.shape == (6, 11)
    torch.testing.assert_close(ours, naive, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_only_for_inputs_that_require_them(gen, backend):
    h, w, b, y = make(gen, 20, 16, 50, torch.float32)
    h, w, b = h.float().requires_grad_(), w.float(), b.float().requires_grad_()
    lp = linear_logprobs(h, w, y, bias=b, backend=backend)
    lp.sum().backward()
    assert h.grad is not None and b.grad is not None and w.grad is None
    # no grad at all: plain forward, no graph
    with torch.no_grad():
        assert not linear_logprobs(h, w, y, bias=b, backend=backend).requires_grad


def test_bad_inputs(gen):
    h, w, _, y = make(gen, 8, 4, 10, torch.float32, bias=False)
    h, w = h.float(), w.float()
    with pytest.raises(ValueError, match=r"targets .* \[0, V=10\)"):
        linear_logprobs(h, w, torch.full((8,), 10))
    with pytest.raises(ValueError, match=r"weight must be \[V, D\]"):
        linear_logprobs(h, w[:, :3], y)
    with pytest.raises(ValueError, match="leading shape"):
        linear_logprobs(h, w, y[:5])
    with pytest.raises(ValueError, match="empty"):
        linear_logprobs(h[:0], w, y[:0])
    with pytest.raises(ValueError, match="integer"):
        linear_logprobs(h, w, y.float())
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(h, w, y, backend="nope")


def test_explicit_backend_never_falls_back(monkeypatch):
    """An explicit backend that cannot run raises with the reason; auto picks one that runs."""
    from fastgrpo._backends import BackendUnavailable

    monkeypatch.setenv("FASTGRPO_NO_EXT", "1")
    from fastgrpo import _backends

    _backends._ext.cache_clear()
    from fastgrpo.ops import epilogue

    epilogue.EPILOGUES.pop("cpp", None)
    try:
        h, w, y = torch.randn(4, 8), torch.randn(12, 8), torch.randint(0, 12, (4,))
        with pytest.raises(BackendUnavailable, match="FASTGRPO_NO_EXT"):
            linear_logprobs(h, w, y, backend="cpp")
        with pytest.raises(BackendUnavailable):
            linear_logprobs(h, w, y, backend="cuda")
        assert linear_logprobs(h, w, y).shape == (4,)  # auto -> torch
    finally:
        _backends._ext.cache_clear()
        epilogue.EPILOGUES.pop("cpp", None)


def test_peak_memory_is_one_block(gen):
    """The forward never allocates anything near the [N, V] logits: check with a tracking allocator hook."""
    n, d, v = 512, 16, 4096
    h, w, _, y = make(gen, n, d, v, torch.float32, bias=False)
    h, w = h.float().requires_grad_(), w.float().requires_grad_()
    chunk = 32
    sizes = []
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        lp = linear_logprobs(h, w, y, chunk_size=chunk, backend="torch")
        lp.sum().backward()
    for evt in prof.events():
        if evt.cpu_memory_usage > 0:
            sizes.append(evt.cpu_memory_usage)
    full_logits = n * v * 4
    assert max(sizes) < full_logits / 4, f"largest allocation {max(sizes)} B vs logits {full_logits} B"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("native", [True, False], ids=["native-half-gemm", "fp32-gemm"])
def test_half_precision_gemm_dtype_on_cpu(gen, monkeypatch, backend, native):
    """bf16 inputs on a CPU without native bf16 GEMMs run the chunk GEMMs in fp32 (the result then equals the
    fp32 computation on the same bf16 values); with native support they stay bf16. Both meet the budget."""
    from fastgrpo.ops import _engine

    monkeypatch.setattr(_engine, "cpu_native_half_gemm", lambda dtype: native)
    cpu = torch.device("cpu")
    assert _engine.gemm_dtype(cpu, torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert _engine.gemm_dtype(cpu, torch.float16) == (torch.float16 if native else torch.float32)
    assert _engine.gemm_dtype(cpu, torch.float32) == torch.float32
    assert _engine.gemm_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16

    n, d, v = 70, 48, 1001
    h, w, b, y = make(gen, n, d, v, torch.float64)
    g_lp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_en = torch.randn(n, generator=gen, dtype=torch.float64)

    def ours(*a, **k):
        return linear_logprobs(*a, **k, return_entropy=True, chunk_size=16, backend=backend)

    out = run_grads(ours, h, w, b, y, torch.bfloat16, g_lp.float(), g_en.float())
    gt = run_grads(ref_fn, h, w, b, y, torch.float64, g_lp, g_en)
    lo = run_grads(ref_fn, h, w, b, y, torch.bfloat16, g_lp.bfloat16(), g_en.bfloat16())
    assert_budget(out[0], gt[0], lo[0], torch.bfloat16, "logp")
    for name, go, gg, gl in zip(("d_hidden", "d_weight", "d_bias"), out[2], gt[2], lo[2]):
        assert go.dtype == torch.bfloat16
        assert_budget(go, gg, gl, torch.bfloat16, name)
    # the fp32 computation on the bf16-rounded inputs: equal to fp32 rounding iff the GEMMs ran in fp32
    hb, wb, bb = (t.bfloat16().double() for t in (h, w, b))
    f32 = run_grads(ours, hb, wb, bb, y, torch.float32, g_lp.float(), g_en.float())
    lp_err = (out[0] - f32[0]).abs().max().item()
    if native:
        assert lp_err > 1e-4, "bf16 GEMMs should differ from fp32 ones by bf16 rounding of the logits"
    else:
        assert lp_err < 1e-5
        torch.testing.assert_close(out[2][0], f32[2][0].bfloat16(), rtol=0, atol=0)

"""Shared benchmark harness: cases, timing, peak memory, output checks, CSV, plots and tables.

A benchmark script (``bench/bench_<op>.py``) defines

* ``OP`` (the ``op`` column), ``MODES`` (a subset of ``fwd``, ``bwd``, ``fwd_bwd``), ``MEM_MODES`` (modes whose
  peak memory is measured);
* ``cases(device, smoke) -> list[Case]``;
* ``setup(case, only=None, upcast=False) -> Setup``: inputs and one :class:`Impl` per backend / peer (only the
  names in ``only`` when given; ``upcast=True`` rounds the inputs to ``case.dtype`` and returns them in fp32,
  the ground truth of low-precision checks);
* ``work(case, mode) -> (amount, unit)``: the FLOPs (``"TFLOP/s"``) or bytes (``"GB/s"``) of one call, the
  formula written out in the script; ``FLOOR_NAME``: the backend name of the floor rows.

:func:`run_op` then, per case: checks every implementation's outputs and gradients against the reference
(before any timing; a mismatch voids the implementation for that case and is reported), times the floor
(``Setup.floor``) and every implementation that passed, per mode, and measures peak memory — on CPU in a fresh
process per (case, implementation, mode) (``bench/_child.py``), on CUDA with the allocator's peak statistics.

Timing: ``p50`` / ``p20`` / ``p80`` of repeated calls after warm-up; ``time.perf_counter`` on CPU, CUDA events
(with an L2 flush before each call, as ``triton.testing.do_bench`` does) on GPU. ``bwd`` times the backward
alone (the forward runs untimed before each call).
"""

from __future__ import annotations

import csv
import functools
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

COLUMNS = [
    "op",
    "backend",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "p50",
    "p20",
    "p80",
    "dtype",
    "device",
    "torch",
    "triton",
    "fastgrpo",
    "git_sha",
]
ALL_MODES = ("fwd", "bwd", "fwd_bwd")
REPO = Path(__file__).resolve().parent.parent
MB = 2**20

# The STYLE.md error budget, the one rule of the tests (tests/conftest.py) and of these checks:
#   err(impl) <= factor * err(torch reference in the low-precision dtype) + ATOL[dtype] * scale
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
# fp32 cases here compare directly with the reference: fp32 rounding of reductions over V and N terms.
FP32_TOL = 2e-4
# Scalars (the loss) are compared relative to max(|ref|, this): a loss close to 0 is a sum of O(1) terms.
SCALAR_FLOOR = 1e-3


# ----------------------------------------------------------------------------------------------------------
# Cases, implementations, setups
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One input configuration. ``shape`` is ordered (it becomes ``x_name`` / ``x_value``, e.g. ``NxDxV``)."""

    name: str
    shape: dict[str, int]
    dtype: str = "float32"
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    timed: bool = True  # False: a check-only case (outputs compared, nothing timed)

    @property
    def x_name(self) -> str:
        return "x".join(self.shape)

    @property
    def x_value(self) -> str:
        return "x".join(str(v) for v in self.shape.values())

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> Case:
        return cls(**json.loads(s))

    def label(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name} [{self.x_name}={self.x_value} {self.dtype}{' ' + p if p else ''}]"


@dataclass
class Impl:
    """One backend or peer on a setup's inputs.

    ``forward()`` runs the op on the setup's inputs and returns whatever it returns; ``loss(out)`` maps that to
    the scalar whose ``backward()`` gives the gradients (None: the op has no backward); ``outputs(out)`` maps
    it to the named tensors compared against the reference (each implementation returns what it has: a peer
    that does not produce entropies simply omits them).
    """

    forward: Callable[[], Any]
    loss: Callable[[Any], torch.Tensor] | None
    outputs: Callable[[Any], dict[str, torch.Tensor]]
    note: str = ""  # shown under the tables
    # Computes its gradients during the forward (a one-pass fused loss): its ``fwd`` is credited with the
    # ``fwd_bwd`` work and compared with the ``fwd_bwd`` floor, its ``bwd`` (a scaling) gets no rate.
    grads_in_forward: bool = False


@dataclass
class Setup:
    inputs: dict[str, torch.Tensor]
    grad_inputs: list[str]  # inputs whose .grad is compared and reset between calls
    impls: dict[str, Impl]
    skipped: dict[str, str]  # backend/peer name -> why it cannot run here (printed, never replaced)
    floor: dict[str, Callable[[], Any]] | None = None  # mode -> the bare floor work (no autograd)
    reference: str | None = None  # name of the implementation the others are checked against


# ----------------------------------------------------------------------------------------------------------
# Environment columns
# ----------------------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache
def git_sha() -> str:
    def git(*args: str) -> str:
        # GIT_OPTIONAL_LOCKS=0: reading the state never rewrites the index
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else ""

    try:
        sha = git("rev-parse", "--short=12", "HEAD") or "nocommit"
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16() -> str:
    """The CPU's native bf16 support: ``"AMX-BF16"``, ``"AVX512-BF16"`` or ``""`` (none, or unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return "AMX-BF16" if "amx_bf16" in flags else ("AVX512-BF16" if "avx512_bf16" in flags else "")


def env_columns(device: str) -> dict[str, str]:
    if device == "cuda":
        dev = f"cuda: {torch.cuda.get_device_name()}"
    else:
        dev = f"cpu: {cpu_model()} ({torch.get_num_threads()} threads)"
    return {"device": dev, **_versions()}


@functools.cache
def _versions() -> dict[str, str]:
    try:
        import fastgrpo

        fg = getattr(fastgrpo, "__version__", None) or _version("fastgrpo")
    except ImportError:
        fg = "none"
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastgrpo": fg,
        "git_sha": git_sha(),
    }


# ----------------------------------------------------------------------------------------------------------
# Running one implementation once (checks, memory) and timing it
# ----------------------------------------------------------------------------------------------------------


def _clear_grads(setup: Setup) -> None:
    for n in setup.grad_inputs:
        setup.inputs[n].grad = None


def run_once(setup: Setup, name: str, mode: str) -> None:
    """One call of ``mode`` (no timing): used by the memory measurement."""
    impl = setup.impls[name]
    _clear_grads(setup)
    if impl.loss is None or mode == "fwd":
        with torch.set_grad_enabled(impl.loss is not None):
            out = impl.forward()
        del out
        return
    impl.loss(impl.forward()).backward()


def collect(setup: Setup, name: str) -> dict[str, torch.Tensor]:
    """Forward (+ backward) once; the named outputs and the input gradients as fp32 copies."""
    impl = setup.impls[name]
    _clear_grads(setup)
    with torch.set_grad_enabled(impl.loss is not None):
        out = impl.forward()
        if impl.loss is not None:
            impl.loss(out).backward()
    res = {k: v.detach().float().clone() for k, v in impl.outputs(out).items()}
    for n in setup.grad_inputs:
        g = setup.inputs[n].grad
        if g is not None:
            res[f"d_{n}"] = g.detach().float().clone()
    _clear_grads(setup)
    return res


def abs_err(x: torch.Tensor, gt: torch.Tensor) -> float:
    """Max abs error in fp64; NaN / inf in ``x`` make it infinite (never within a budget)."""
    x = x.detach().double()
    if not bool(torch.isfinite(x).all()):
        return math.inf
    return float((x - gt.detach().double()).abs().max()) if x.numel() else 0.0


def error_budget(ref_err: float, dtype: torch.dtype, *, scale: float = 1.0, factor: float = 2.0) -> float:
    """The error allowed to an implementation in ``dtype`` whose low-precision torch reference is ``ref_err``
    from the ground truth: ``factor * ref_err + ATOL[dtype] * scale``. A non-finite ``ref_err`` (the reference
    itself overflowed) counts 0: the implementation is then held to the atol alone."""
    return factor * (ref_err if math.isfinite(ref_err) else 0.0) + ATOL[dtype] * scale


def max_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest normalised error over the outputs both have: ``max|a - b| / max|b|`` (scalars: ``/ max(|b|,
    SCALAR_FLOOR)``). NaN / inf / shape mismatch give ``inf``. Returns (error, name of the worst output)."""
    worst, where = 0.0, ""
    common = [k for k in ref if k in got]
    if not common:
        return math.inf, "no common outputs"
    for k in common:
        a, b = got[k], ref[k]
        if a.shape != b.shape:
            return math.inf, f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if not torch.isfinite(a).all():
            return math.inf, f"{k}: non-finite"
        scale = b.abs().max().item() if b.numel() else 0.0
        scale = max(scale, SCALAR_FLOOR) if b.numel() == 1 else max(scale, 1e-30)
        e = (a - b).abs().max().item() / scale if b.numel() else 0.0
        if e > worst or not where:
            worst, where = e, k
    return worst, where


class _Timer:
    """Times the body of ``with timer:``; the last reading is ``timer.seconds``."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.seconds = 0.0
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            # the L2 flush of triton.testing.do_bench: every call starts from a cold cache
            self._flush = torch.empty(256 * MB // 4, dtype=torch.int32, device="cuda")

    def __enter__(self):
        if self.cuda:
            self._flush.zero_()
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0
        return False


@dataclass
class TimingOptions:
    warmup: int = 1
    reps: int = 5  # at least this many timed calls ...
    min_time: float = 1.0  # ... and more until this many seconds were timed ...
    max_reps: int = 50  # ... but never more than this


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(v) for v in q)  # type: ignore[return-value]


def time_call(step: Callable[[_Timer], None], device: str, opts: TimingOptions) -> tuple[float, float, float]:
    """``step(timer)`` runs one call with its timed part inside ``with timer:``. Returns seconds (p50, p20, p80)."""
    timer = _Timer(device)
    for _ in range(opts.warmup):
        step(timer)
    times: list[float] = []
    while len(times) < opts.reps or (sum(times) < opts.min_time and len(times) < opts.max_reps):
        step(timer)
        times.append(timer.seconds)
    return _quantiles(times)


def impl_step(setup: Setup, name: str, mode: str) -> Callable[[_Timer], None]:
    impl = setup.impls[name]

    if impl.loss is None or mode == "fwd":

        def fwd(timer: _Timer) -> None:
            _clear_grads(setup)
            with torch.set_grad_enabled(impl.loss is not None), timer:
                out = impl.forward()
            del out

        return fwd
    if mode == "bwd":

        def bwd(timer: _Timer) -> None:
            _clear_grads(setup)
            loss = impl.loss(impl.forward())
            with timer:
                loss.backward()

        return bwd

    def fwd_bwd(timer: _Timer) -> None:
        _clear_grads(setup)
        with timer:
            impl.loss(impl.forward()).backward()

    return fwd_bwd


def floor_step(fn: Callable[[], Any]) -> Callable[[_Timer], None]:
    def step(timer: _Timer) -> None:
        with torch.no_grad(), timer:
            fn()

    return step


# ----------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_extra_peak_mb(setup: Setup, name: str, mode: str) -> float:
    """In this (fresh) process: peak RSS of one call minus the RSS with the inputs allocated, in MiB."""
    import resource

    gc.collect()
    base = _status_kb("VmRSS")
    exact = reset_peak_rss() and base is not None
    run_once(setup, name, mode)
    if exact:
        peak = _status_kb("VmHWM")
    else:  # lifetime peak: an upper bound when the imports or the setup peaked higher than the call
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base = base or 0
    return (peak - base) / 1024


def cuda_extra_peak_mb(setup: Setup, name: str, mode: str) -> float:
    _clear_grads(setup)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_once(setup, name, mode)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    _clear_grads(setup)
    return (peak - base) / MB


def cpu_peak_in_child(
    module: str, case: Case, name: str, mode: str, timeout: float = 1800
) -> tuple[float | None, str]:
    """Run ``bench/_child.py`` for one (case, implementation, mode); returns (MiB or None, error text)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Large blocks go straight to mmap and back to the OS when freed, so RSS tracks live memory; with glibc's
    # dynamic threshold, freed blocks below 32 MiB would stay resident and hide later allocations.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same threads as the timed runs
    cmd = [sys.executable, "-m", "bench._child", module, case.to_json(), name, mode]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            return res.get("peak_mb"), res.get("error", "")
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return None, f"child exited {r.returncode}: {' | '.join(tail)}"


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    device: str = "cpu"
    smoke: bool = False
    memory: bool = True
    timing: TimingOptions = field(default_factory=TimingOptions)
    only: set[str] | None = None  # implementations to run (the reference always runs)
    case_filter: str | None = None  # comma-separated case names (exact)
    modes: set[str] | None = None  # time only these modes (None: every mode of the op)
    dtypes: set[str] | None = None  # run only the cases of these dtypes (e.g. {"float32"})
    after_case: Callable[[OpResult], None] | None = None  # e.g. write the outputs so far (long runs)
    smoke_memory_done: bool = False  # --smoke measures one peak (a fresh process costs seconds)


@dataclass
class OpResult:
    rows: list[dict[str, Any]]
    failures: list[str]  # voided rows and errors: the run fails when this is not empty
    notes: list[str]  # skipped backends / peers and why
    impl_notes: list[str] = field(default_factory=list)  # how to read an implementation's numbers


def _row(
    op: str, case: Case, backend: str, mode: str, metric: str, unit: str, q, env: dict[str, str]
) -> dict:
    p50, p20, p80 = q
    return {
        "op": op,
        "backend": backend,
        "mode": mode,
        "metric": metric,
        "unit": unit,
        "x_name": case.x_name,
        "x_value": case.x_value,
        "p50": f"{p50:.6g}",
        "p20": f"{p20:.6g}",
        "p80": f"{p80:.6g}",
        "dtype": case.dtype,
        **env,
    }


def _check_case(mod, case: Case, setup: Setup, names: list[str], out: OpResult) -> list[str]:
    """Compare every implementation with the reference; returns the names that passed."""
    env = env_columns(case.device)
    ref_name = setup.reference or names[0]
    lowp = case.torch_dtype in (torch.bfloat16, torch.float16)
    if lowp:
        # ground truth: the reference on the same (rounded) inputs in fp32
        gt_setup = mod.setup(case, only={ref_name}, upcast=True)
        ref = collect(gt_setup, ref_name)
        del gt_setup
        budget_name = "naive" if "naive" in setup.impls else ref_name
    else:
        ref = collect(setup, ref_name)
    results: dict[str, dict[str, torch.Tensor] | Exception] = {}
    for name in names:
        try:
            results[name] = ref if (name == ref_name and not lowp) else collect(setup, name)
        except (
            torch.OutOfMemoryError
        ) as e:  # a materialising peer at a real-model shape: a finding, not a bug
            results[name] = e
            _free_device_memory(case.device)
        except Exception as e:  # a backend that claims to run and raises: reported, never timed
            results[name] = e
    if lowp:
        base = results.get(budget_name)
        base_err = max_err(base, ref)[0] if isinstance(base, dict) else math.inf
        # no reference result to size the budget (it failed, e.g. out of memory): nothing to hold others to
        tol = error_budget(base_err, case.torch_dtype) if isinstance(base, dict) else math.inf
        rule = f"<= 2*err({budget_name}, {case.dtype})={2 * base_err:.2e} + {ATOL[case.torch_dtype]:g}"
    else:
        tol, rule = FP32_TOL, f"<= {FP32_TOL:g} vs {ref_name}"
    passed = []
    for name, res in results.items():
        if isinstance(res, torch.OutOfMemoryError):
            note = f"{mod.OP} {case.name} {case.x_value} {case.dtype}: {name} ran out of memory"
            out.notes.append(note)
            print(f"  oom  {name}: out of memory; not timed")
            continue
        if isinstance(res, Exception):
            msg = f"{mod.OP} {case.label()}: {name} raised {type(res).__name__}: {res}"
            out.failures.append(msg)
            print(f"  !! ERROR {msg}")
            continue
        err, where = max_err(res, ref)
        ok = err <= tol
        out.rows.append(_row(mod.OP, case, name, "check", "max_err", "rel", (err, err, err), env))
        out.rows.append(_row(mod.OP, case, name, "check", "check", "pass", (float(ok),) * 3, env))
        status = "ok  " if ok else "VOID"
        print(f"  check {status} {name:<22} max_err={err:.2e} ({where}) {rule}")
        if ok:
            passed.append(name)
            note = setup.impls[name].note
            if note and f"{name}: {note}" not in out.impl_notes:
                out.impl_notes.append(f"{name}: {note}")
        else:
            msg = (
                f"{mod.OP} {case.label()}: {name} does NOT match {ref_name}: max_err={err:.3e} on {where} "
                f"(allowed {tol:.2e}); its timings are void"
            )
            out.failures.append(msg)
            print(f"  !! MISMATCH {msg}")
    return passed


def run_op(module: str, opts: RunOptions) -> OpResult:
    """Run every case of one benchmark module; rows follow :data:`COLUMNS`."""
    mod = importlib.import_module(module)
    out = OpResult(rows=[], failures=[], notes=[])
    modes = [m for m in mod.MODES if m in ALL_MODES and (opts.modes is None or m in opts.modes)]
    wanted = set(opts.case_filter.split(",")) if opts.case_filter else None
    for case in mod.cases(opts.device, opts.smoke):
        if wanted is not None and case.name not in wanted:
            continue
        if opts.dtypes is not None and case.dtype not in opts.dtypes:
            continue
        print(f"\n== {mod.OP}: {case.label()}")
        env = env_columns(case.device)
        setup = mod.setup(case)
        for name, why in setup.skipped.items():
            note = f"{mod.OP}: {name} skipped: {why}"
            if note not in out.notes:  # once per op, not per case
                out.notes.append(note)
                print(f"  skip {name}: {why}")
        names = [n for n in setup.impls if opts.only is None or n in opts.only or n == setup.reference]
        passed = _check_case(mod, case, setup, names, out)
        if not case.timed:
            continue
        floor_times: dict[str, float] = {}
        for mode in modes:
            if setup.floor and mode in setup.floor:
                q = time_call(floor_step(setup.floor[mode]), opts.device, opts.timing)
                floor_times[mode] = q[0]
                _emit_time(mod, case, mod.FLOOR_NAME, mode, q, None, out, env)
        setup.floor = None  # frees the floor's [N, V] buffers before the implementations run
        gc.collect()
        _free_device_memory(case.device)
        for name in list(passed):
            for mode in modes:
                if setup.impls[name].loss is None and mode != "fwd":
                    continue
                try:
                    q = time_call(impl_step(setup, name, mode), opts.device, opts.timing)
                except torch.OutOfMemoryError:
                    _clear_grads(setup)
                    _free_device_memory(case.device)
                    out.notes.append(
                        f"{mod.OP} {case.name} {case.x_value} {case.dtype}: {name} {mode} ran out of memory"
                    )
                    print(f"  oom  {name} {mode}: out of memory; not timed")
                    continue
                work_mode: str | None = mode
                if setup.impls[name].grads_in_forward and mode != "fwd_bwd":
                    work_mode = "fwd_bwd" if mode == "fwd" else None
                floor = floor_times.get(work_mode) if work_mode else None
                _emit_time(mod, case, name, mode, q, floor, out, env, work_mode)
        if opts.memory:
            mem_names = passed
            mem_modes = [m for m in getattr(mod, "MEM_MODES", ()) if opts.modes is None or m in opts.modes]
            if opts.smoke:  # exercise the probe once per run, cheaply: the reference, last mode
                mem_names = [n for n in passed if n == setup.reference] if not opts.smoke_memory_done else []
                mem_modes = mem_modes[-1:]
                opts.smoke_memory_done = opts.smoke_memory_done or bool(mem_names and mem_modes)
            for name in mem_names:
                for mode in mem_modes:
                    if setup.impls[name].loss is None and mode != "fwd":
                        continue
                    if opts.device == "cuda":
                        try:
                            mb, err = cuda_extra_peak_mb(setup, name, mode), ""
                        except torch.OutOfMemoryError:
                            _clear_grads(setup)
                            _free_device_memory(case.device)
                            print(
                                f"  oom  {name} {mode}: out of memory (peak above the device's free memory)"
                            )
                            continue
                    else:
                        mb, err = cpu_peak_in_child(module, case, name, mode)
                    if mb is None:
                        msg = f"{mod.OP} {case.label()}: memory of {name} {mode} failed: {err}"
                        out.failures.append(msg)
                        print(f"  !! {msg}")
                        continue
                    out.rows.append(_row(mod.OP, case, name, mode, "peak_mem", "MB", (mb, mb, mb), env))
                    print(f"  mem   {name:<22} {mode:<8} extra peak {mb:9.1f} MB")
        del setup
        gc.collect()
        if opts.device == "cuda":
            torch.cuda.empty_cache()
        if opts.after_case is not None:
            opts.after_case(out)
    return out


def _free_device_memory(device: str) -> None:
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _emit_time(mod, case: Case, name: str, mode: str, q, floor, out: OpResult, env, work_mode="same") -> None:
    """Time rows, plus throughput and floor fraction for the work of ``work_mode`` (None: no rate)."""
    p50, p20, p80 = q
    out.rows.append(_row(mod.OP, case, name, mode, "time", "ms", (p50 * 1e3, p20 * 1e3, p80 * 1e3), env))
    work_mode = mode if work_mode == "same" else work_mode
    amount, unit = mod.work(case, work_mode) if work_mode else (None, "")
    rate = ""
    if amount:
        scale = 1e12 if unit == "TFLOP/s" else 1e9
        r = (amount / p50 / scale, amount / p80 / scale, amount / p20 / scale)
        metric = "tflops" if unit == "TFLOP/s" else "bandwidth"
        out.rows.append(_row(mod.OP, case, name, mode, metric, unit, r, env))
        rate = f"{r[0]:8.3f} {unit}"
    frac = ""
    if floor is not None and name != mod.FLOOR_NAME:
        fr = (floor / p50, floor / p80, floor / p20)
        out.rows.append(_row(mod.OP, case, name, mode, "floor_frac", "x", fr, env))
        frac = f"{fr[0]:6.1%} of floor"
    print(
        f"  time  {name:<22} {mode:<8} {p50 * 1e3:10.2f} ms [{p20 * 1e3:.2f}, {p80 * 1e3:.2f}] {rate} {frac}"
    )


# ----------------------------------------------------------------------------------------------------------
# Outputs: CSV, markdown table, plot
# ----------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in COLUMNS})


def finish_script(op: str, device: str, smoke: bool, out_dir: str | Path, rows: list[dict[str, Any]],
                  failures: list[str]) -> int:  # fmt: skip
    """The end of a benchmark script with its own ``main`` (the convention in bench/README.md): its rows into
    ``<out_dir>/<op>_<device>[_smoke].csv``, where they went, each failure; the exit status (1 on a failure)."""
    out = Path(out_dir) / (f"{op}_{device}" + ("_smoke" if smoke else "") + ".csv")
    write_csv(out, rows)
    print(f"\nwrote {out} ({len(rows)} rows) on {env_columns(device)['device']}")
    for f in failures:
        print(f"  !! {f}")
    return 1 if failures else 0


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cases_of(rows) -> list[tuple[str, str, str]]:
    seen: dict[tuple[str, str, str], None] = {}
    for r in rows:
        if r["metric"] == "time":
            seen[(r["x_name"], r["x_value"], r["dtype"])] = None
    return list(seen)


def markdown_table(rows: list[dict[str, Any]], modes=ALL_MODES) -> str:
    """One table per timed case: p50 time per mode, throughput and floor fraction of the slowest mode, peak
    memory, and the check's max error."""
    lines: list[str] = []
    for x_name, x_value, dtype in _cases_of(rows):
        sel = [r for r in rows if (r["x_name"], r["x_value"], r["dtype"]) == (x_name, x_value, dtype)]
        have = [m for m in modes if any(r["mode"] == m and r["metric"] == "time" for r in sel)]
        main = have[-1] if have else "fwd"
        rate_unit = next((r["unit"] for r in sel if r["metric"] in ("tflops", "bandwidth")), "")
        mem_modes = [m for m in modes if any(r["mode"] == m and r["metric"] == "peak_mem" for r in sel)]
        backends = list(dict.fromkeys(r["backend"] for r in sel if r["metric"] == "time"))
        head = [f"{m} ms" for m in have]
        if rate_unit:
            head.append(f"{main} {rate_unit}")
        head.append(f"{main} vs floor")
        head += [f"{m} peak MB" for m in mem_modes]
        head.append("max err")
        lines.append(f"**{x_name} = {x_value}, {dtype}**\n")
        lines.append("| backend | " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * len(head))

        values = {(r["backend"], r["mode"], r["metric"]): float(r["p50"]) for r in sel}

        def get(backend, mode, metric, values=values):
            return values.get((backend, mode, metric))

        for b in backends:
            cells = []
            for m in have:
                t = get(b, m, "time")
                cells.append("—" if t is None else f"{t:.1f}" if t >= 10 else f"{t:.3g}")
            if rate_unit:
                v = get(b, main, "tflops") or get(b, main, "bandwidth")
                cells.append("—" if v is None else f"{v:.3g}")
            fr = get(b, main, "floor_frac")
            cells.append(
                "floor"
                if fr is None and get(b, main, "time") and b.endswith("floor")
                else "—"
                if fr is None
                else f"{fr:.0%}"
            )
            for m in mem_modes:
                v = get(b, m, "peak_mem")
                cells.append("—" if v is None else f"{v:.0f}")
            e = get(b, "check", "max_err")
            cells.append("—" if e is None else f"{e:.1e}")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Bar chart per timed case: p50 time per backend and mode (whiskers p20-p80), and extra peak memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = _cases_of(rows)
    if not cases:
        return False
    has_mem = any(r["metric"] == "peak_mem" for r in rows)
    nrows = 2 if has_mem else 1
    fig, axes = plt.subplots(nrows, len(cases), figsize=(5.5 * len(cases), 4 * nrows), squeeze=False)
    for j, key in enumerate(cases):
        sel = [r for r in rows if (r["x_name"], r["x_value"], r["dtype"]) == key]
        backends = list(dict.fromkeys(r["backend"] for r in sel if r["metric"] == "time"))
        modes = [m for m in ALL_MODES if any(r["mode"] == m and r["metric"] == "time" for r in sel)]
        width = 0.8 / max(len(modes), 1)
        ax = axes[0][j]
        for k, m in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for i, b in enumerate(backends):
                r = next((r for r in sel if (r["backend"], r["mode"], r["metric"]) == (b, m, "time")), None)
                if r is None:
                    continue
                p50, p20, p80 = float(r["p50"]), float(r["p20"]), float(r["p80"])
                xs.append(i + (k - (len(modes) - 1) / 2) * width)
                ys.append(p50)
                lo.append(p50 - p20)
                hi.append(p80 - p50)
            ax.bar(xs, ys, width, yerr=[lo, hi], label=m, capsize=2)
        ax.set_xticks(range(len(backends)), backends, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("time (ms, p50)")
        ax.set_title(f"{key[0]}={key[1]} {key[2]}", fontsize=9)
        ax.legend(fontsize=7)
        if has_mem:
            ax = axes[1][j]
            mem = [r for r in sel if r["metric"] == "peak_mem"]
            mmodes = list(dict.fromkeys(r["mode"] for r in mem))
            mb = [b for b in backends if any(r["backend"] == b for r in mem)]
            w = 0.8 / max(len(mmodes), 1)
            for k, m in enumerate(mmodes):
                pts = [
                    (i, float(r["p50"]))
                    for i, b in enumerate(mb)
                    for r in mem
                    if (r["backend"], r["mode"]) == (b, m)
                ]
                ax.bar([i + (k - (len(mmodes) - 1) / 2) * w for i, _ in pts], [v for _, v in pts], w, label=m)
            ax.set_xticks(range(len(mb)), mb, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("extra peak memory (MB)")
            if mmodes:
                ax.legend(fontsize=7)
            else:
                ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(op: str, res: OpResult, out_dir: Path, device: str, smoke: bool) -> dict[str, Path]:
    """CSV (always), markdown table and PNG (when something was timed)."""
    stem = f"{op}_{device}" + ("_smoke" if smoke else "")
    paths = {"csv": out_dir / f"{stem}.csv"}
    write_csv(paths["csv"], res.rows)
    table = markdown_table(res.rows)
    if table:
        env = env_columns(device)
        header = (
            f"<!-- {op} on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
            f"fastgrpo {env['fastgrpo']} @ {env['git_sha']} -->\n"
        )
        notes = "".join(f"- {n}\n" for n in res.impl_notes)
        skipped = "".join(f"- {n}\n" for n in res.notes)
        text = (
            header
            + table
            + ("\nNotes:\n\n" + notes if notes else "")
            + ("\nSkipped:\n\n" + skipped if skipped else "")
        )
        paths["md"] = out_dir / f"{stem}.md"
        paths["md"].write_text(text)
        png = out_dir / f"{stem}.png"
        if plot(res.rows, png, f"{op} — {env['device']} — {env['git_sha']}"):
            paths["png"] = png
    return paths


# ----------------------------------------------------------------------------------------------------------
# Helpers for the benchmark scripts
# ----------------------------------------------------------------------------------------------------------


def ours():
    """The fastgrpo module exposing the public ops (falls back to ``fastgrpo.ops`` while ``fastgrpo/__init__``
    does not re-export them); None when fastgrpo cannot be imported."""
    try:
        import fastgrpo
    except ImportError:
        return None
    if hasattr(fastgrpo, "grpo_loss") and hasattr(fastgrpo, "linear_logprobs"):
        return fastgrpo
    try:
        from fastgrpo.ops import _dispatch
        from fastgrpo.ops.grpo_loss import grpo_loss, grpo_loss_from_logits
        from fastgrpo.ops.linear_logprobs import linear_logprobs
    except ImportError:
        return None

    class _Ops:
        pass

    ns = _Ops()
    ns.grpo_loss, ns.grpo_loss_from_logits, ns.linear_logprobs = (
        grpo_loss,
        grpo_loss_from_logits,
        linear_logprobs,
    )
    ns.available_backends = _dispatch.available_backends
    return ns


def our_backends(device: str) -> tuple[list[str], dict[str, str]]:
    """(backends that run on ``device``, {backend: why not} for the others), from fastgrpo's own dispatch."""
    try:
        from fastgrpo.ops import _dispatch
    except ImportError as e:
        return [], {"fastgrpo": f"not importable ({e})"}
    dev = torch.device(device)
    ok, why = [], {}
    for name in _dispatch.BACKENDS:
        if name.startswith("triton") and dev.type == "cpu":
            # only under TRITON_INTERPRET=1 (the tests set it): an interpreter's speed is not worth measuring,
            # and tests/test_triton_*.py check its outputs
            why[name] = "Triton runs on CPU only in its interpreter: not benchmarked"
            continue
        try:
            _dispatch.check_backend(name, dev)
            ok.append(name)
        except Exception as e:  # BackendUnavailable, ImportError of a broken extension
            why[name] = str(e).splitlines()[0]
    return ok, why


def peer_import(module: str, skipped: dict[str, str], name: str):
    """Import a peer's module, or record why not in ``skipped`` and return None."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a peer broken against this torch
        skipped[name] = (
            f"cannot import {module} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        )
        return None


def make_generator(case: Case) -> torch.Generator:
    dev = "cuda" if case.device == "cuda" else "cpu"
    return torch.Generator(device=dev).manual_seed(1234 + case.seed)


def gemm_floor(
    hidden: torch.Tensor, weight: torch.Tensor, gen: torch.Generator
) -> dict[str, Callable[[], None]]:
    """The GEMM floor of a linear head: ``Z = H W^T`` (fwd) and ``dZ W``, ``dZ^T H`` (bwd) alone, timed on the same
    operands, in the dtype fastgrpo's chunk GEMMs run in (``fastgrpo.ops._engine.gemm_dtype``: fp32 for bf16 on
    a CPU without native bf16 GEMMs; the input dtype everywhere else). ``hidden [N, D]``, ``weight [V, D]``."""
    from fastgrpo.ops._engine import gemm_dtype

    dt = gemm_dtype(hidden.device, hidden.dtype)
    h2, w2 = hidden.detach().to(dt), weight.detach().to(dt)
    n, v = h2.shape[0], w2.shape[0]
    z = torch.empty(n, v, dtype=dt, device=h2.device)
    dz = torch.randn(n, v, generator=gen, device=h2.device).to(dt)
    dh, dw = torch.empty_like(h2), torch.empty_like(w2)

    def f_fwd() -> None:
        torch.mm(h2, w2.t(), out=z)

    def f_bwd() -> None:
        torch.mm(dz, w2, out=dh)
        torch.mm(dz.t(), h2, out=dw)

    def f_all() -> None:
        f_fwd()
        f_bwd()

    return {"fwd": f_fwd, "bwd": f_bwd, "fwd_bwd": f_all}


def prepare_tensor(x: torch.Tensor, case: Case, upcast: bool, requires_grad: bool = False) -> torch.Tensor:
    """Round a fp32 tensor to the case dtype (and back to fp32 when ``upcast``)."""
    x = x.to(case.torch_dtype)
    if upcast:
        x = x.float()
    return x.requires_grad_(requires_grad)

"""What a run shows: per-step metrics JSONL, optional TensorBoard, phase timers, peak memory, the end-of-run
plot and the summary line.

``metrics.jsonl`` has one JSON object per step with (among others) ``step``, ``reward``, ``kl``,
``entropy``, ``clip_frac`` (low + high), ``completion_len``, ``tokens_per_s`` and the time split
``time/generation``, ``time/reference``, ``time/policy`` (forward + backward), ``time/optimizer``,
``time/step`` in seconds, plus ``peak_mem_mb`` (CUDA allocator peak on GPU, process max RSS on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "PhaseTimer",
    "MetricsLogger",
    "peak_memory_mb",
    "read_metrics",
    "plot_run",
    "reward_summary",
    "PLOT_KEYS",
    "LearningSignalGuard",
]

# (metric key, panel title) of the end-of-run plot
PLOT_KEYS = (
    ("reward", "mean reward"),
    ("kl", "KL to reference"),
    ("entropy", "token entropy"),
    ("clip_frac", "clip fraction"),
    ("completion_len", "response length (tokens)"),
)


class PhaseTimer:
    """Wall-clock seconds per named phase, accumulated until :meth:`pop`."""

    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        if self.sync_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.totals[phase] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals = defaultdict(float)
        return out


def peak_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak memory in MiB: the CUDA allocator's peak on a GPU device, else the process's max RSS."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON line per step to ``run_dir/metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``resume_step``: when resuming, lines of steps after it (written after the checkpoint) are dropped so the
    file reads exactly like an uninterrupted run's.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "train.tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from e
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a run directory or the file itself).

    A torn last line (a run killed while writing it) is skipped with a warning; an unreadable line before the
    last is an error naming the file and line number."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == last:
                logger.warning("%s: skipped the torn last line %d (an interrupted write): %s", path, i + 1, e)
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
    return rows


def reward_summary(rows: list[dict[str, Any]], window: int = 10, key: str = "reward") -> dict[str, float]:
    """Mean of ``key`` over the first and last ``window`` steps (fewer when the run is short)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return {"first": float("nan"), "last": float("nan"), "gain": float("nan"), "window": 0}
    w = max(1, min(window, len(values) // 2 if len(values) > 1 else 1))
    first, last = sum(values[:w]) / w, sum(values[-w:]) / w
    return {"first": first, "last": last, "gain": last - first, "window": w}


def plot_run(
    run_dir: str | Path, out: str | Path | None = None, rows: list[dict[str, Any]] | None = None
) -> Path:
    """Plot reward, KL, entropy, clip fraction and response length over steps into a PNG; return its path.

    ``rows``: the run's metrics when already read (:func:`read_metrics`)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir) if rows is None else rows
    out = Path(out) if out is not None else run_dir / "plot.png"
    fig, axes = plt.subplots(1, len(PLOT_KEYS), figsize=(4 * len(PLOT_KEYS), 3.2))
    for ax, (key, title) in zip(axes, PLOT_KEYS):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1, alpha=0.5 if len(pts) > 10 else 1.0)
            if len(pts) > 10:  # a 10-step moving average makes the trend readable over sampling noise
                smooth = [
                    sum(ys[max(0, i - 9) : i + 1]) / len(ys[max(0, i - 9) : i + 1]) for i in range(len(ys))
                ]
                ax.plot(xs, smooth, lw=2)
        if key == "reward" and any(r.get("eval/accuracy") is not None for r in rows):
            ev = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
            ax.plot(*zip(*ev), "o--", label="eval accuracy")
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class LearningSignalGuard:
    """Says once, after the first ``steps`` training steps, when a run gives GRPO nothing to learn from.

    GRPO learns from the spread of rewards inside a group. Two situations leave none and look alike on a reward
    curve (flat): nearly every group scores all its completions alike (``zero_std_groups`` above
    ``identical_share`` on average), or almost no completion holds an answer the checker can score
    (``answer_rate`` below ``answer_share``). :meth:`update` takes each step's metrics and returns the warning
    (also logged) the step it decides, else None; it decides once.
    """

    def __init__(self, steps: int = 5, *, identical_share: float = 0.9, answer_share: float = 0.05):
        self.steps, self.identical_share, self.answer_share = steps, identical_share, answer_share
        self.seen: list[tuple[float, float]] = []
        self.done = steps <= 0

    def update(self, metrics: dict[str, Any]) -> str | None:
        if self.done:
            return None
        self.seen.append((float(metrics["zero_std_groups"]), float(metrics.get("answer_rate", 1.0))))
        if len(self.seen) < self.steps:
            return None
        self.done = True
        identical = sum(z for z, _ in self.seen) / len(self.seen)
        answers = sum(a for _, a in self.seen) / len(self.seen)
        if answers < self.answer_share:
            message = (
                f"no learning signal: over the first {len(self.seen)} steps only {answers:.0%} of the completions "
                "hold an answer the reward can score (<answer>...</answer>, \\boxed{}, 'the answer is'). Usually "
                "fixed by a worked example turn in the prompt (the built-in tasks' one_shot option), an answer "
                "format the model already writes, or a stronger model"
            )
        elif identical > self.identical_share:
            message = (
                f"no learning signal: over the first {len(self.seen)} steps {identical:.0%} of the groups gave all "
                "their completions the same reward, so their advantages are 0. Usually fixed by a larger group "
                "(rollout.group_size), easier prompts or a worked example turn, partial-credit reward terms, "
                "or a stronger model"
            )
        else:
            return None
        logger.warning(message)
        return message

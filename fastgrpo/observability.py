"""What a run shows: per-step metrics JSONL, experiment trackers, phase timers, peak memory, the end-of-run
plot and the summary line.

``metrics.jsonl`` has one JSON object per step with (among others) ``step``, ``reward``, ``kl``,
``entropy``, ``clip_frac`` (low + high), ``completion_len``, ``tokens_per_s`` and the time split
``time/generation``, ``time/reference``, ``time/policy`` (forward + backward), ``time/optimizer``,
``time/step`` in seconds, plus ``peak_mem_mb`` (CUDA allocator peak on GPU, process max RSS on CPU), the reward
terms (``reward/<term>``), what reward functions logged, and the schemes' own statistics under their prefixes
(``care/``, ``copo/``, ``prm/``, ``vas/``, ``curriculum/``, ``filter/``, ``adv/``).

Trackers (``train.report_to``: TensorBoard, Weights & Biases, MLflow, Trackio) are accelerate's
(:func:`start_trackers`, ``Accelerator.log``): they get the configuration once and every numeric metric per step;
``metrics.jsonl`` is written in any case and is what :func:`plot_run` and ``fastgrpo plot`` read.
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
    "SCHEME_PREFIXES",
    "plot_panels",
    "LearningSignalGuard",
    "start_trackers",
    "progress_fields",
    "completion_record",
]

# (metric key, panel title) of the end-of-run plot's fixed panels
PLOT_KEYS = (
    ("reward", "mean reward"),
    ("kl", "KL to reference"),
    ("entropy", "token entropy"),
    ("clip_frac", "clip fraction"),
    ("completion_len", "response length (tokens)"),
)
#: prefixes of the schemes' own metrics: each one a run logs gets a panel of its own
SCHEME_PREFIXES = ("care/", "copo/", "prm/", "vas/", "curriculum/", "filter/", "adv/")


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


def _flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted key: scalar}`` (lists and empty mappings as strings): what every tracker's
    hyper-parameter store accepts (TensorBoard's ``add_hparams`` takes scalars only)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat_config(v, f"{prefix}{k}."))
        return out
    if data is None or isinstance(data, (bool, int, float, str)):
        return {prefix[:-1]: data}
    return {prefix[:-1]: str(data)}


def start_trackers(accelerator: Any, run_dir: str | Path, *, project: str, config: dict[str, Any]) -> None:
    """Start the experiment trackers an ``Accelerator`` was built with (``log_with``): accelerate's
    ``init_trackers`` under ``project``, the run directory's name as the run name, the flattened ``config`` as
    the run's hyper-parameters. TensorBoard writes under ``run_dir/tensorboard/<project>``; W&B, MLflow and
    Trackio where their own settings (environment variables such as ``WANDB_MODE``, ``MLFLOW_TRACKING_URI``,
    ``TRACKIO_DIR``) say. Main process only (accelerate's rule)."""
    run_dir = Path(run_dir)
    # the Accelerator exists before the run directory is named: point its logging directory at it now
    accelerator.project_configuration.logging_dir = str(run_dir / "tensorboard")
    name = run_dir.name
    accelerator.init_trackers(project, config=_flat_config(config),
                              init_kwargs={"wandb": {"name": name, "dir": str(run_dir)}, "mlflow": {"run_name": name},
                                           "trackio": {"name": name}})  # fmt: skip


class MetricsLogger:
    """Appends one JSON line per step to ``run_dir/metrics.jsonl`` and sends its numbers to the experiment
    trackers of ``accelerator`` (set it after :func:`start_trackers`).

    ``resume_step``: when resuming, lines of steps after it (written after the checkpoint) are dropped so the
    file reads exactly like an uninterrupted run's.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None, accelerator: Any = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.accelerator = accelerator

    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None:
            numbers = {k: v for k, v in row.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
            self.accelerator.log(numbers, step=int(row.get("step", 0)))

    def close(self) -> None:
        """Finish the trackers (not ``Accelerator.end_training``: that also ends the process group)."""
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()


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


def plot_panels(rows: list[dict[str, Any]]) -> list[tuple[str, tuple[str, ...]]]:
    """The plot's panels, ``(title, metric keys)``: the fixed :data:`PLOT_KEYS`, then the reward terms together
    (when there are several), then every scheme metric (:data:`SCHEME_PREFIXES`) the run logged, in first-seen
    order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if v is not None and not isinstance(v, bool) and isinstance(v, (int, float)):
                seen.setdefault(k)
    panels = [(title, (key,)) for key, title in PLOT_KEYS]
    terms = tuple(k for k in seen if k.startswith("reward/"))
    if len(terms) > 1:
        panels.append(("reward terms", terms))
    panels += [(k, (k,)) for k in seen if k.startswith(SCHEME_PREFIXES)]
    return panels


def plot_run(
    run_dir: str | Path, out: str | Path | None = None, rows: list[dict[str, Any]] | None = None
) -> Path:
    """Plot reward, KL, entropy, clip fraction and response length over steps, then the reward terms and the
    schemes' metrics the run logged (:func:`plot_panels`), into a PNG; return its path.

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
    panels = plot_panels(rows)
    ncols = min(len(PLOT_KEYS), len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
            if not pts:
                continue
            xs, ys = zip(*pts)
            label = key[len("reward/") :] if len(keys) > 1 else None
            line = ax.plot(xs, ys, lw=1, alpha=0.5 if len(pts) > 10 else 1.0, label=label)[0]
            if len(pts) > 10:  # a 10-step moving average makes the trend readable over sampling noise
                smooth = [
                    sum(ys[max(0, i - 9) : i + 1]) / len(ys[max(0, i - 9) : i + 1]) for i in range(len(ys))
                ]
                ax.plot(xs, smooth, lw=2, color=line.get_color())
        if keys == ("reward",) and any(r.get("eval/accuracy") is not None for r in rows):
            ev = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
            ax.plot(*zip(*ev), "o--", label="eval accuracy")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
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


def progress_fields(metrics: dict[str, Any]) -> dict[str, str]:
    """The progress bar's fields: reward, KL (only when the loss has a KL term), entropy, clip fraction,
    throughput."""
    out = {"reward": f"{metrics['reward']:.3f}"}
    if metrics.get("kl") is not None:
        out["kl"] = f"{metrics['kl']:.4f}"
    out.update(ent=f"{metrics['entropy']:.3f}", clip=f"{metrics['clip_frac']:.3f}",
               tok_s=f"{metrics['tokens_per_s']:.0f}")  # fmt: skip
    return out


def completion_record(step: int, groups: Any, adv: Any, i: int) -> dict[str, Any]:
    """One line of ``completions.jsonl``: completion ``i`` of a step's
    :class:`~fastgrpo.rewards.shaping.RolloutGroups` with its prompt (the example's index in the training set
    and its last turn), every reward term (null: not applicable), the total reward after reward shaping and the
    advantage of its :class:`~fastgrpo.rewards.shaping.Advantages` (COPO: the global one, the local one and the
    blend weight; PRM: the mean of the token advantages too)."""
    ex = groups.examples[i]
    value = lambda x: None if math.isnan(x := float(x)) else x  # noqa: E731
    rec = {"step": step, "example": groups.example[i], "prompt": ex.question, "answer": ex.answer,
           "completion": groups.texts[i], "completion_len": len(groups.completion_ids[i]),
           "truncated": bool(groups.truncated[i]), "rewards": {k: value(v[i]) for k, v in groups.terms.items()},
           "reward": value(adv.rewards[i]), "advantage": value(adv.values[i])}  # fmt: skip
    if adv.local is not None:
        rec.update(advantage_local=value(adv.local[i]), blend=value(adv.blend[i]))
    if adv.per_token is not None:
        tok = adv.per_token[i]
        rec["advantage_token_mean"] = value(tok.float().mean()) if len(tok) else None
    return rec

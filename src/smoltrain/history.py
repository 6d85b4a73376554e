"""A run's logged history (metrics.jsonl, samples.jsonl) and its curves drawn as PNG files.

Shared by the HTML report and the exported model card, so it sits low: it knows files and matplotlib,
nothing of models. Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so drawing is safe in any process, headless or not, and in threads.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """The JSON records of a file, skipping lines torn by a kill mid-write; [] when it is missing."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


@dataclass
class History:
    """Training-step and evaluation records of one run, each sorted by step."""

    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    tasks: list[dict] = field(default_factory=list)  # records with task/<name>/acc (eval.tasks)

    @classmethod
    def load(cls, run_dir: Path, up_to_step: int | None = None) -> History:
        recs = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl")
                if isinstance(r.get("step"), int) and (up_to_step is None or r["step"] <= up_to_step)]
        key = lambda r: r["step"]  # noqa: E731
        return cls(sorted((r for r in recs if _num(r.get("loss"))), key=key),
                   sorted((r for r in recs if _num(r.get("val_loss"))), key=key),
                   sorted((r for r in recs if any(k.startswith("task/") for k in r)), key=key))

    def task_scores(self, record: dict | None = None) -> dict[str, dict[str, float]]:
        """{task: {acc, acc_norm}} of one task record (default: the last one)."""
        rec = record if record is not None else (self.tasks[-1] if self.tasks else {})
        out: dict[str, dict[str, float]] = {}
        for key, value in rec.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "task" and _num(value):
                out.setdefault(parts[1], {})[parts[2]] = float(value)
        return out

    def series(self, name: str, evals: bool = False) -> tuple[list[int], list[float]]:
        """(steps, values) of a logged scalar, leaving out records where it is null."""
        pairs = [(r["step"], float(r[name])) for r in (self.evals if evals else self.train) if _num(r.get(name))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def val_at(self, step: int) -> dict | None:
        """The evaluation logged at exactly this step, if any."""
        return next((r for r in self.evals if r["step"] == step), None)

    def nearest_val(self, step: int) -> dict | None:
        """The evaluation closest to `step` (the later one on a tie): labels checkpoints saved between evals."""
        return min(self.evals, key=lambda r: (abs(r["step"] - step), -r["step"]), default=None)

    def last(self, evals: bool = False) -> dict | None:
        recs = self.evals if evals else self.train
        return recs[-1] if recs else None

    def throughput(self) -> dict:
        """tokens/s and MFU summaries; the first logged step is left out (it pays for warm-up)."""
        steady = self.train[1:] or self.train
        tps = [float(r["tokens_per_sec"]) for r in steady if _num(r.get("tokens_per_sec"))]
        mfu = [float(r["mfu"]) for r in steady if _num(r.get("mfu"))]
        mem = [float(r["mem_gb"]) for r in self.train if _num(r.get("mem_gb"))]
        last = self.last() or {}
        return {"median_tokens_per_sec": statistics.median(tps) if tps else None,
                "max_tokens_per_sec": max(tps) if tps else None,
                "median_mfu": statistics.median(mfu) if mfu else None,
                "peak_mem_gb": max(mem) if mem else None, "tokens": last.get("tokens"),
                "tokens_per_source": last.get("tokens_per_source") or {}}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _figure(title: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, ax, path: Path) -> Path:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_loss(history: History, path: Path) -> Path | None:
    """Training loss and validation loss against step (None when nothing was logged)."""
    steps, loss = history.series("loss")
    vsteps, vloss = history.series("val_loss", evals=True)
    if not steps and not vsteps:
        return None
    fig, ax = _figure("loss", "cross-entropy (nats/token)")
    if steps:
        ax.plot(steps, loss, label="train loss", linewidth=1.2)
    if vsteps:
        ax.plot(vsteps, vloss, "o-", label="val loss", linewidth=1.2, markersize=4)
    return _save(fig, ax, path)


def plot_series(history: History, name: str, title: str, ylabel: str, path: Path) -> Path | None:
    """One training scalar (lr, tokens_per_sec, grad_norm) against step; None when never logged."""
    steps, values = history.series(name)
    if not steps:
        return None
    fig, ax = _figure(title, ylabel)
    ax.plot(steps, values, linewidth=1.2)
    return _save(fig, ax, path)


def plot_tasks(history: History, path: Path) -> Path | None:
    """Accuracy (solid) and normalised accuracy (dashed) of every eval.tasks task against step."""
    if not history.tasks:
        return None
    fig, ax = _figure("downstream tasks", "accuracy")
    names = sorted({n for r in history.tasks for n in history.task_scores(r)})
    for name in names:
        for metric, style in (("acc", "o-"), ("acc_norm", "s--")):
            pts = [(r["step"], history.task_scores(r)[name][metric]) for r in history.tasks
                   if metric in history.task_scores(r).get(name, {})]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{name} {metric}", markersize=4)
    return _save(fig, ax, path)

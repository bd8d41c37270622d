"""Figures of a run, or of a group of runs over seeds (mean, with ± std): the accuracy matrix with its numbers, the
average accuracy after each task, the accuracy before and after task-adaptive prediction, and the task-identity
accuracy per task. Drawn on matplotlib `Figure` objects (no pyplot, no display), so they work on any machine and in
TensorBoard.
"""
from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from utils import atomic_write_bytes

DPI = 100
CURVES_SIZE = (7.0, 4.5)  # inches: 700 x 450 px
Curve = tuple[str, np.ndarray, np.ndarray | None]  # label, mean per task, std per task (None: one run)


def matrix_size(num_tasks: int) -> tuple[float, float]:
    """Inches: room for the numbers in every cell, whatever the number of tasks."""
    return 3.0 + 0.6 * num_tasks, 2.0 + 0.5 * num_tasks


def as_array(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """A results.json matrix or list (None where undefined) as floats with NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def mean_and_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Over axis 0 (the runs): the mean, and the sample std (n - 1) when there are several runs. A value undefined in
    any run stays undefined."""
    if len(values) == 1:
        return values[0], None
    return values.mean(axis=0), values.std(axis=0, ddof=1)


def _cell_text(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if std is None or np.isnan(std) else f"{mean:.1f}\n±{std:.1f}"


def matrix_figure(mean: np.ndarray, std: np.ndarray | None = None, title: str = "") -> Figure:
    """acc[i, t] (accuracy on task i after training task t), each defined cell with its number (and ± std over
    seeds); a perceptually uniform colour scale from 0 to 100 % with its bar, so 49 % and 99 % look apart."""
    n = mean.shape[0]
    fig = Figure(figsize=matrix_size(n), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=0.0, vmax=100.0)
    for i, c in zip(*np.nonzero(np.isfinite(mean)), strict=True):
        value = float(mean[i, c])
        ax.text(c, i, _cell_text(value, None if std is None else float(std[i, c])), ha="center", va="center",
                fontsize=9 if n <= 10 else 6, color="white" if value < 60 else "black")
    ticks = list(range(n))
    ax.set_xticks(ticks, labels=[str(k + 1) for k in ticks])
    ax.set_yticks(ticks, labels=[str(k + 1) for k in ticks])
    ax.set_xlabel("after training task")
    ax.set_ylabel("evaluated task")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def run_matrix_figure(acc: np.ndarray, t: int, title: str = "") -> Figure:
    """One run's matrix after task t (cells of later tasks and below the diagonal left blank); a one-row matrix is a
    common test set's, evaluated after every task."""
    seen = np.full(acc.shape, np.nan)
    common = acc.shape[0] == 1
    for i in range(min(t + 1, acc.shape[0])):
        start = 0 if common else i
        seen[i, start:t + 1] = acc[i, start:t + 1]
    return matrix_figure(seen, None, title)


def _curves_axes(xlabel: str, ylabel: str, title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=CURVES_SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def _integer_ticks(ax: Any, longest: int) -> None:
    ax.set_xticks(range(1, longest + 1))


def average_accuracy_figure(curves: Sequence[Curve]) -> Figure:
    """A_t after each task for every group, one line each with a band of ± std over seeds."""
    fig, ax = _curves_axes("after training task", "average accuracy A_t (%)", "average accuracy over the seen tasks")
    for label, mean, std in curves:
        x = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(x, mean, marker="o", label=label)
        if std is not None:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    _integer_ticks(ax, max((len(m) for _, m, _ in curves), default=1))
    ax.legend(fontsize=7)
    return fig


def task_identity_figure(curves: Sequence[Curve]) -> Figure:
    """After the last task: the share of each task's test images whose task was inferred right, per group."""
    fig, ax = _curves_axes("evaluated task (after the last task)", "task-identity accuracy (%)",
                           "task-identity accuracy per task")
    for label, mean, std in curves:
        ax.errorbar(np.arange(1, len(mean) + 1), mean, yerr=std, marker="o", capsize=3, label=label)
    _integer_ticks(ax, max((len(m) for _, m, _ in curves), default=1))
    ax.legend(fontsize=7)
    return fig


def alignment_figure(label: str, before: Curve, after: Curve) -> Figure:
    """A_t after each task before and after task-adaptive prediction (a task without it has no 'before' bar)."""
    fig, ax = _curves_axes("after training task", "average accuracy A_t (%)",
                           f"before and after task-adaptive prediction\n{label}")
    width = 0.38
    for offset, (name, mean, std) in ((-width / 2, before), (width / 2, after)):
        shown = np.isfinite(mean)
        x = np.arange(1, len(mean) + 1)[shown] + offset
        ax.bar(x, mean[shown], width, yerr=None if std is None else std[shown], capsize=3, label=name)
    _integer_ticks(ax, len(after[1]))
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# From results.json contents to figures
# ----------------------------------------------------------------------------------------------------------------
def final_phase_key(results: dict[str, Any]) -> str | None:
    """The `<phase>_pre_alignment` entry of the run's own last phase (not one of an earlier phase, which also has
    its own result entry), or None without task-adaptive prediction."""
    phases = results["final"].get("phases") or {}
    keys = [k for k in phases if k.endswith("_pre_alignment") and k.removesuffix("_pre_alignment") not in phases]
    return keys[0] if keys else None


def _per_task(results: dict[str, Any], get: Any) -> list[float | None]:
    return [get(task) for task in results["tasks"]]


def group_curve(label: str, runs: Sequence[dict[str, Any]], get: Any) -> Curve:
    return (label, *mean_and_std(as_array([_per_task(r, get) for r in runs])))


def _slug(label: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9+-]+", "_", label).strip("_")[:100] or "group"
    unique, k = slug, 2
    while unique in taken:
        unique, k = f"{slug}_{k}", k + 1
    taken.add(unique)
    return unique


def figure_pixels(fig: Figure) -> np.ndarray:
    """The figure drawn at DPI, as an RGB (height, width, 3) uint8 array, for loggers that take pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: Path, pdf: bool = False) -> list[Path]:
    """`path`.png (and .pdf), each written atomically; returns the files."""
    written = []
    for suffix in (".png", ".pdf") if pdf else (".png",):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix[1:], dpi=DPI)
        file = path.parent / (path.name + suffix)
        atomic_write_bytes(buffer, file)
        written.append(file)
    return written


def _alignment(label: str, runs: Sequence[dict[str, Any]]) -> Figure | None:
    key = final_phase_key(runs[0])
    if key is None or any(final_phase_key(r) != key for r in runs):
        return None
    before = group_curve("before TAP", runs, lambda task: (task.get("phases") or {}).get(key, {}).get("avg_acc"))
    after = group_curve("after TAP", runs, lambda task: task["avg_acc"])
    return alignment_figure(label, before, after)


def write_report_figures(groups: Sequence[tuple[str, Sequence[dict[str, Any]]]], folder: Path,
                         pdf: bool = False) -> list[Path]:
    """For (label, runs' results.json contents) per group: each group's mean matrix and, with task-adaptive
    prediction, its before/after figure; then every group's A_t curve on one figure and the task-identity
    accuracy per task on another. Returns the files written."""
    written: list[Path] = []
    taken: set[str] = set()
    for label, runs in groups:
        slug = _slug(label, taken)
        mean, std = mean_and_std(np.stack([as_array(r["acc_matrix"]) for r in runs]))
        seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
        written += save_figure(matrix_figure(mean, std, label + seeds), folder / f"matrix_{slug}", pdf)
        figure = _alignment(label, runs)
        if figure is not None:
            written += save_figure(figure, folder / f"alignment_{slug}", pdf)
    accuracy = [group_curve(label, runs, lambda task: task["avg_acc"]) for label, runs in groups]
    written += save_figure(average_accuracy_figure(accuracy), folder / "average_accuracy", pdf)
    identity = [(label, *mean_and_std(as_array([r["final"]["tii_acc"] for r in runs]))) for label, runs in groups]
    written += save_figure(task_identity_figure(identity), folder / "task_identity", pdf)
    return written

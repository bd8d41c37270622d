"""Continual-learning metrics over the accuracy matrix.

`acc[i, t]` is the accuracy (%) on task i's test set after training task t; entries with i > t are not defined. With
one test set common to every task (CORe50, the task-free stream) the matrix is one row, `acc[0, t]`.
"""
from __future__ import annotations

import numpy as np


def average_accuracy(acc: np.ndarray, t: int) -> float:
    """A_t: unweighted mean over the seen tasks i <= t of acc[i, t]."""
    return float(np.mean(acc[: t + 1, t]))


def average_incremental_accuracy(acc: np.ndarray, t: int) -> float:
    """Mean of A_0 .. A_t (the papers' CAA)."""
    return float(np.mean([average_accuracy(acc, s) for s in range(t + 1)]))


def forgetting_reference(acc: np.ndarray, t: int) -> float | None:
    """The reference's forgetting: the best accuracy over columns 0..t (the current one included) minus the current
    one, averaged over i < t. Including the current column makes every term >= 0."""
    if t == 0:
        return None
    return float(np.mean([acc[i, : t + 1].max() - acc[i, t] for i in range(t)]))


def forgetting_standard(acc: np.ndarray, t: int) -> float | None:
    """Chaudhry et al.'s forgetting: the best accuracy over the earlier columns i..t-1 minus the current one, averaged
    over i < t. A task that improved gives a negative term."""
    if t == 0:
        return None
    return float(np.mean([acc[i, i:t].max() - acc[i, t] for i in range(t)]))


def backward_transfer(acc: np.ndarray, t: int) -> float | None:
    """BWT_t: mean over i < t of acc[i, t] - acc[i, i]."""
    if t == 0:
        return None
    return float(np.mean([acc[i, t] - acc[i, i] for i in range(t)]))


def summarize_common(acc: np.ndarray, t: int) -> dict[str, float | None]:
    """The same keys for one common test set: A_t is its accuracy after task t, forgetting its drop from the best
    before (the reference's: best up to now; the standard: best before now), BWT undefined (no task of its own)."""
    row = acc[0, : t + 1]
    return {
        "avg_acc": float(row[t]),
        "avg_incremental_acc": float(np.mean(row)),
        "forgetting": float(row.max() - row[t]) if t else None,
        "forgetting_standard": float(row[:t].max() - row[t]) if t else None,
        "bwt": None,
    }


def summarize(acc: np.ndarray, t: int, common_test_set: bool = False) -> dict[str, float | None]:
    if common_test_set:
        return summarize_common(acc, t)
    return {
        "avg_acc": average_accuracy(acc, t),
        "avg_incremental_acc": average_incremental_accuracy(acc, t),
        "forgetting": forgetting_reference(acc, t),
        "forgetting_standard": forgetting_standard(acc, t),
        "bwt": backward_transfer(acc, t),
    }


def format_matrix(acc: np.ndarray, t: int, common_test_set: bool = False) -> str:
    """The seen part of the matrix as text: one row per test task (or the common test set's one row, "all"), one
    column per training task."""
    header = "test\\after " + " ".join(f"{f'T{c + 1}':>7}" for c in range(t + 1))
    if common_test_set:
        return header + "\n" + f"{'all':>11} " + " ".join(f"{acc[0, c]:7.2f}" for c in range(t + 1))
    rows = [header]
    for i in range(t + 1):
        cells = " ".join(f"{acc[i, c]:7.2f}" if c >= i else f"{'':>7}" for c in range(t + 1))
        rows.append(f"{f'T{i + 1}':>11} {cells}")
    return "\n".join(rows)


def format_summary(summary: dict[str, float | None], task: int, num_tasks: int) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    return (
        f"after task {task + 1}/{num_tasks}: A_t {fmt(summary['avg_acc'])} | "
        f"avg incremental {fmt(summary['avg_incremental_acc'])} | "
        f"forgetting {fmt(summary['forgetting'])} (standard {fmt(summary['forgetting_standard'])}) | "
        f"BWT {fmt(summary['bwt'])}"
    )


def episode_summary(accuracies: list[float]) -> dict[str, float | None]:
    """Mean accuracy over few-shot episodes with its 95% confidence interval, 1.96 x s / sqrt(n), s the sample
    standard deviation (ddof 1; none for a single episode). The reference printed 1.96 x std, without the sqrt(n),
    and with the population std: kept as `reference_interval` to compare with its logs."""
    values = np.asarray(accuracies, dtype=np.float64)
    n = len(values)
    if n == 0:
        return {"episodes": 0, "mean_acc": None, "std_acc": None, "ci95": None, "reference_interval": None}
    std = float(values.std(ddof=1)) if n > 1 else None
    return {"episodes": n, "mean_acc": float(values.mean()), "std_acc": std,
            "ci95": 1.96 * std / np.sqrt(n) if std is not None else None,
            "reference_interval": float(1.96 * values.std())}

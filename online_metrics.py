"""Metrics of online continual learning: pure functions over accuracy arrays and a prequential correctness stream.

Inputs (accuracies in percent, 0-100; T tasks, H evaluations per task):
  R (T x T)      R[i, j]: test accuracy on task j after training tasks 1..i; every task is evaluated, future ones too.
  A (T x H x T)  A[i, h, j]: accuracy on task j at the h-th evaluation during task i; A[i, H-1, :] == R[i, :].

Keys of `online_summary`:
  n_tasks                    T
  n_continual_evaluations    H, the evaluations per task (the last one at the task's end)
  accuracy_matrix            R as nested lists
  anytime_accuracy_matrix    A as nested lists
  accuracy_all               [t]: mean over all T tasks j of R[t, j]
  accuracy_all_avg           mean over t of accuracy_all[t]
  accuracy_seen              [t]: mean over the seen tasks j <= t of R[t, j]
  accuracy_seen_avg          mean over t of accuracy_seen[t]
  accuracy_final             accuracy_all[T-1]
  forward_transfer           2 / (T (T-1)) * sum over i < j of R[i, j] (a task before it is trained); None when T == 1
  backward_transfer          2 / (T (T-1)) * sum over i > j of R[i, j] - R[j, j]; None when T == 1
  anytime_accuracy_all       [t*H + h]: mean over all tasks j of A[t, h, j]
  anytime_accuracy_all_avg   mean of anytime_accuracy_all
  anytime_accuracy_seen      [t*H + h]: mean over the seen tasks j <= t of A[t, h, j]
  anytime_accuracy_seen_avg  mean of anytime_accuracy_seen
  anytime_task_index         [t*H + h]: t + (h + 1) / H, the evaluation's position in task units (for plotting)

Keys of `prequential_summary` (each training sample is predicted before it is learned from; N samples, boundaries
b_0 = 0 < b_1 < ... < b_T = N where task t holds samples b_t .. b_{t+1}-1, window W):
  n_samples                  N
  window                     W
  n_windows                  N // W, full windows only
  prequential_accuracy       100 * mean(correct), cumulative over the whole stream
  prequential_task_accuracy  [t]: 100 * mean(correct[b_t:b_{t+1}])
  windowed_accuracy          [k]: 100 * mean(correct[kW:(k+1)W]), consecutive non-overlapping windows
  window_task_index          [k]: t + (end - b_t) / (b_{t+1} - b_t), the window's end = (k+1)W in task t units,
                             where b_t < end <= b_{t+1} (a window ending on a boundary belongs to the task it closes)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _check_shapes(R: np.ndarray, A: np.ndarray) -> None:
    """R must be T x T and A T x H x T whose last evaluation of each task is R's row."""
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T x T matrix, got shape {R.shape}")
    n_tasks = R.shape[0]
    if A.ndim != 3 or A.shape[0] != n_tasks or A.shape[2] != n_tasks or A.shape[1] == 0:
        raise ValueError(f"A must be T x H x T with T = {n_tasks} and H >= 1, got shape {A.shape}")
    if not np.allclose(A[:, -1, :], R, rtol=0.0, atol=1e-9):
        raise ValueError("A[:, -1, :] must equal R: the last evaluation of each task is its end-of-task evaluation")


def _seen_means(rows: np.ndarray, task_of_row: np.ndarray) -> np.ndarray:
    """Mean of each row over the columns j <= its task (the tasks seen so far)."""
    seen = np.arange(rows.shape[1])[None, :] <= task_of_row[:, None]
    return (rows * seen).sum(axis=1) / seen.sum(axis=1)


def _transfers(R: np.ndarray) -> tuple[float | None, float | None]:
    """Forward and backward transfer, averaged over the T (T-1) / 2 task pairs; undefined for a single task."""
    n_tasks = R.shape[0]
    if n_tasks == 1:
        return None, None
    pairs = n_tasks * (n_tasks - 1) / 2
    forward = np.triu(R, k=1).sum() / pairs
    backward = np.tril(R - np.diag(R)[None, :], k=-1).sum() / pairs
    return float(forward), float(backward)


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def online_summary(R: np.ndarray, A: np.ndarray) -> dict[str, Any]:
    """Every end-of-task and anytime metric of the module docstring, from R (T x T) and A (T x H x T)."""
    R = np.asarray(R, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    _check_shapes(R, A)
    n_tasks, n_evals = A.shape[0], A.shape[1]
    accuracy_all = R.mean(axis=1)
    accuracy_seen = _seen_means(R, np.arange(n_tasks))
    anytime_rows = A.reshape(n_tasks * n_evals, n_tasks)
    anytime_task = np.repeat(np.arange(n_tasks), n_evals)
    anytime_all = anytime_rows.mean(axis=1)
    anytime_seen = _seen_means(anytime_rows, anytime_task)
    forward, backward = _transfers(R)
    return {
        "n_tasks": n_tasks,
        "n_continual_evaluations": n_evals,
        "accuracy_matrix": R.tolist(),
        "anytime_accuracy_matrix": A.tolist(),
        "accuracy_all": _floats(accuracy_all),
        "accuracy_all_avg": float(accuracy_all.mean()),
        "accuracy_seen": _floats(accuracy_seen),
        "accuracy_seen_avg": float(accuracy_seen.mean()),
        "accuracy_final": float(accuracy_all[-1]),
        "forward_transfer": forward,
        "backward_transfer": backward,
        "anytime_accuracy_all": _floats(anytime_all),
        "anytime_accuracy_all_avg": float(anytime_all.mean()),
        "anytime_accuracy_seen": _floats(anytime_seen),
        "anytime_accuracy_seen_avg": float(anytime_seen.mean()),
        "anytime_task_index": _floats(anytime_task + (np.tile(np.arange(n_evals), n_tasks) + 1) / n_evals),
    }


def _check_stream(correct: np.ndarray, bounds: np.ndarray, window: int) -> None:
    """The stream is 1-D, the boundaries go strictly up from 0 to its length, the window is a positive count."""
    if correct.ndim != 1 or correct.size == 0:
        raise ValueError(f"correct must be a non-empty 1-D array of the stream's outcomes, got shape {correct.shape}")
    if bounds.ndim != 1 or bounds.size < 2 or bounds[0] != 0 or bounds[-1] != correct.size:
        raise ValueError(f"boundaries must be T+1 sample indices from 0 to {correct.size}, got {bounds.tolist()}")
    if np.any(np.diff(bounds) <= 0):
        raise ValueError(f"boundaries must be strictly increasing (every task has samples), got {bounds.tolist()}")
    if window <= 0:
        raise ValueError(f"window must be a positive number of samples, got {window}")


def prequential_summary(correct: np.ndarray, boundaries: Sequence[int], window: int) -> dict[str, Any]:
    """Test-then-train accuracy of a training stream: cumulative, per task and over full windows of `window`."""
    correct = np.asarray(correct).astype(bool)
    bounds = np.asarray(boundaries, dtype=np.int64)
    _check_stream(correct, bounds, window)
    n_windows = correct.size // window
    windowed = correct[: n_windows * window].reshape(n_windows, window).mean(axis=1)
    ends = (np.arange(n_windows) + 1) * window
    task = np.searchsorted(bounds, ends, side="left") - 1  # b_task < end <= b_{task+1}
    task_index = task + (ends - bounds[task]) / (bounds[task + 1] - bounds[task])
    task_accuracy = [float(100.0 * correct[lo:hi].mean()) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return {
        "n_samples": int(correct.size),
        "window": int(window),
        "n_windows": int(n_windows),
        "prequential_accuracy": float(100.0 * correct.mean()),
        "prequential_task_accuracy": task_accuracy,
        "windowed_accuracy": _floats(100.0 * windowed),
        "window_task_index": _floats(task_index),
    }


def format_online_matrix(R: np.ndarray) -> str:
    """R as text: one row per training stage ("after Ti"), one column per evaluated task, every cell filled."""
    R = np.asarray(R, dtype=np.float64)
    header = "after\\test " + " ".join(f"{f'T{c + 1}':>7}" for c in range(R.shape[1]))
    rows = [f"{f'after T{i + 1}':>11} " + " ".join(f"{v:7.2f}" for v in row) for i, row in enumerate(R)]
    return "\n".join([header, *rows])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_online_summary(summary: dict[str, Any], prequential: dict[str, Any] | None = None) -> str:
    """A few human-readable lines: the headline accuracies, the transfers, the prequential accuracy and R."""
    lines = [
        f"final accuracy {_fmt(summary['accuracy_final'])} | "
        f"avg accuracy seen {_fmt(summary['accuracy_seen_avg'])} / all {_fmt(summary['accuracy_all_avg'])}",
        f"anytime avg accuracy seen {_fmt(summary['anytime_accuracy_seen_avg'])} / "
        f"all {_fmt(summary['anytime_accuracy_all_avg'])} ({summary['n_continual_evaluations']} evaluations per task)",
        f"forward transfer {_fmt(summary['forward_transfer'])} | "
        f"backward transfer {_fmt(summary['backward_transfer'])}",
    ]
    if prequential is not None:
        lines.append(f"prequential accuracy {_fmt(prequential['prequential_accuracy'])} "
                     f"({prequential['n_windows']} windows of {prequential['window']} samples)")
    lines.append(format_online_matrix(np.asarray(summary["accuracy_matrix"])))
    return "\n".join(lines)


def common_test_summary(positions: Sequence[float], accuracies: Sequence[float],
                        task_end: Sequence[bool]) -> dict[str, Any]:
    """One common test set (CORe50, the task-free stream), evaluated at `positions` (in task units, increasing):
      accuracy_final         the last evaluation's accuracy (at the end of the stream)
      anytime_accuracy       every evaluation's accuracy, with anytime_task_index its position
      anytime_accuracy_avg   their mean
      accuracy_after_task    the evaluations made at a task's end, with after_task_index their positions
      accuracy_avg           their mean
      forgetting             the best accuracy at an earlier task end minus the final one (None with a single one)"""
    values = np.asarray(accuracies, dtype=np.float64)
    ends = np.asarray(task_end, dtype=bool)
    if values.size == 0 or values.shape != ends.shape or not ends[-1]:
        raise ValueError("a common test set needs its evaluations, the last at the end of the stream")
    after = values[ends]
    return {"accuracy_final": float(values[-1]), "anytime_accuracy": values.tolist(),
            "anytime_task_index": [float(p) for p in positions], "anytime_accuracy_avg": float(values.mean()),
            "accuracy_after_task": after.tolist(),
            "after_task_index": [float(p) for p, e in zip(positions, ends, strict=True) if e],
            "accuracy_avg": float(after.mean()),
            "forgetting": float(after[:-1].max() - after[-1]) if after.size > 1 else None}

"""The online protocol: one pass over each task's stream, every batch predicted before it is learned from
(test-then-train), and every test set evaluated `continual_evaluations` times per task, the last at the task's end.

`run_online` is the loop, for the command line (`--protocol online`) and for Python (`learner.Learner`); `run_protocol`
is the command line's run around it: the sharded stream, results.json, TensorBoard and the task checkpoints.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler

import metrics
import online_metrics
from config.resolved import Config, config_to_dict
from datasets.scenario import Scenario, ShardSampler
from divergence import check_loss, check_tensors
from learner import Learner
from provenance import Provenance
from run_files import checkpoint_path
from utils import (
    DistContext,
    UserError,
    all_gather_objects,
    all_reduce_sum,
    atomic_torch_save,
    atomic_write_json,
    get_rank,
    get_world_size,
    is_dist,
    is_main_process,
    log,
)


def evaluation_points(num_batches: int, evaluations: int) -> list[int]:
    """After how many of a task's batches its evaluations come: evenly spaced, the last at the task's end."""
    if num_batches < evaluations:
        raise UserError(f"--continual_evaluations {evaluations}: a task's stream has only {num_batches} batches; "
                        f"evaluate at most once per batch (lower it, or --online_batch_size)")
    return [round((h + 1) * num_batches / evaluations) for h in range(evaluations)]


def stream_batches(order: np.ndarray, batch_size: int, world_size: int) -> list[np.ndarray]:
    """`order` cut into consecutive batches of `batch_size`; a last batch too small to give each process an image is
    merged into the one before, so no process ever has an empty share."""
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < world_size:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


class OnlineStream:
    """A task's stream for this process: the global batches of `order` (positions in `dataset`), of which rank r
    takes images r, r + W, ...; each item is (images, labels, stream positions, loss weight), the weight making
    the processes' mean gradient the mean over the whole global batch."""

    def __init__(self, dataset: Any, order: np.ndarray, batch_size: int, num_workers: int = 0,
                 pin_memory: bool = False):
        self.rank, self.world = get_rank(), get_world_size()
        self.batches = stream_batches(order, batch_size, self.world)
        shares = [batch[self.rank::self.world].tolist() for batch in self.batches]
        self.loader = DataLoader(dataset, batch_sampler=shares, num_workers=num_workers, pin_memory=pin_memory)
        starts = np.cumsum([0] + [len(b) for b in self.batches])
        self.positions = [np.arange(start, start + len(batch))[self.rank::self.world]
                          for start, batch in zip(starts, self.batches, strict=False)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray, float]]:
        for k, (images, labels) in enumerate(self.loader):
            yield images, labels, self.positions[k], len(labels) * self.world / len(self.batches[k])


def _unpack(batch: Sequence, seen: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, float]:
    """(images, labels) from a plain loader, or (images, labels, positions, weight) from an OnlineStream."""
    if len(batch) == 4:
        return batch[0], batch[1], np.asarray(batch[2]), float(batch[3])
    images, labels = batch[0], batch[1]
    return images, labels, np.arange(seen, seen + len(labels)), 1.0


def deterministic(loader: Iterable) -> bool:
    """The same images in the same order at every pass: its batches may be cached by key."""
    return isinstance(loader, DataLoader) and isinstance(loader.sampler, (SequentialSampler, ShardSampler))


def unseen(learner: Learner, classes: Sequence[int] | None) -> bool:
    """No class of a test set can be predicted yet: its accuracy is 0 without a pass (the predictions are among the
    classes seen so far)."""
    if classes is None or learner.cfg.data.eval_all_classes:
        return False
    return not bool(learner.seen[list(classes)].any())


@torch.no_grad()
def test_accuracies(learner: Learner, loaders: Sequence[Iterable],
                    test_classes: Sequence[Sequence[int]] | None = None) -> list[float]:
    """Accuracy (%) on each test loader, counts summed over the processes (each holds a disjoint shard);
    `test_classes[i]`, when known, lets a test set none of whose classes is seen yet count 0 without a pass."""
    device = learner.ctx.device
    counts = torch.zeros(len(loaders), 2, dtype=torch.float64, device=device)
    for i, loader in enumerate(loaders):
        if unseen(learner, test_classes[i] if test_classes else None):
            counts[i, 1] = 1.0  # 0 right of (a stand-in) 1: accuracy 0
            continue
        cache = deterministic(loader)
        for b, (images, labels) in enumerate(loader):
            predicted = learner.predict(images, ("test", i, b) if cache else None)
            labels = labels.to(device)
            counts[i] += torch.stack([(predicted == labels).sum(), labels.new_tensor(len(labels))]).double()
    counts = all_reduce_sum(counts)
    return (100.0 * counts[:, 0] / counts[:, 1].clamp(min=1.0)).tolist()


@dataclass
class Evaluation:
    task: int            # during which task (0-based)
    batches: int         # after how many of its batches
    position: float      # in task units: task + batches / its batches
    accuracies: list[float]
    task_end: bool


@dataclass
class OnlineResults:
    """What `run_online` measured. `summary` holds the metrics (online_metrics' keys), readable as attributes:
    `results.accuracy_final`, `results.anytime_accuracy_seen_avg`, `results.prequential_accuracy`..."""
    evaluations: list[Evaluation] = field(default_factory=list)
    correct: list[np.ndarray] = field(default_factory=list)  # per task, the prequential hits in stream order
    losses: list[float] = field(default_factory=list)  # per task, the mean training loss
    summary: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        summary = self.__dict__.get("summary", {})
        if name in summary:
            return summary[name]
        raise AttributeError(name)


def summarize(results: OnlineResults, num_tasks: int, evaluations: int, common_test_set: bool,
              window: int) -> dict[str, Any]:
    """The metrics of the tasks done so far: R and A (a test set per task), or the common test set's curve; and the
    prequential accuracy over the stream."""
    done = len(results.correct)
    hits = np.concatenate(results.correct) if done else np.zeros(0, dtype=bool)
    bounds = np.cumsum([0] + [len(c) for c in results.correct]).tolist()
    out: dict[str, Any] = {"completed_tasks": done}
    if len(hits):
        out.update(online_metrics.prequential_summary(hits, bounds, window))
    if common_test_set or done < num_tasks:
        evals = results.evaluations
        if evals and evals[-1].task_end:
            out.update(online_metrics.common_test_summary([e.position for e in evals],
                                                          [float(np.mean(e.accuracies)) for e in evals],
                                                          [e.task_end for e in evals]))
        return out
    anytime = np.array([e.accuracies for e in results.evaluations]).reshape(num_tasks, evaluations, num_tasks)
    out.update(online_metrics.online_summary(anytime[:, -1, :], anytime))
    return out


@dataclass
class OnlinePlan:
    """When to evaluate: `continual_evaluations` per task (`per_task`), or (the task-free stream) at the end of
    the tasks in `at_task_ends` only."""
    continual_evaluations: int = 1
    per_task: bool = True
    at_task_ends: frozenset[int] = frozenset()

    def points(self, t: int, num_batches: int) -> list[int]:
        if self.per_task:
            return evaluation_points(num_batches, self.continual_evaluations)
        return [num_batches] if t in self.at_task_ends else []


def gaussian_plan(num_tasks: int, evaluations: int) -> OnlinePlan:
    """The task-free stream: `evaluations` points spread over the whole schedule, at episode ends, the last one at
    its end."""
    ends = {round((h + 1) * num_tasks / evaluations) - 1 for h in range(min(evaluations, num_tasks))}
    return OnlinePlan(evaluations, per_task=False, at_task_ends=frozenset(ends))


def _gathered_hits(positions: list[np.ndarray], hits: list[np.ndarray]) -> np.ndarray:
    """The task's prequential hits of every process, in stream order."""
    local = (np.concatenate(positions), np.concatenate(hits)) if positions else (np.zeros(0), np.zeros(0, bool))
    parts = all_gather_objects(local) if is_dist() else [local]
    where = np.concatenate([p for p, _ in parts])
    return np.concatenate([h for _, h in parts])[np.argsort(where, kind="stable")]


class OnlineLoop:
    """The state of `run_online` between tasks (see there)."""

    def __init__(self, learner: Learner, test_loaders: Sequence[Iterable], plan: OnlinePlan,
                 on_evaluation: Callable[[Evaluation], None] | None,
                 test_classes: Sequence[Sequence[int]] | None = None):
        self.learner, self.test_loaders, self.plan = learner, test_loaders, plan
        self.test_classes = test_classes
        self.on_evaluation = on_evaluation
        self.results = OnlineResults()

    def evaluate(self, t: int, batches: int, num_batches: int) -> None:
        accuracies = test_accuracies(self.learner, self.test_loaders, self.test_classes)
        evaluation = Evaluation(t, batches, t + batches / num_batches, accuracies, batches == num_batches)
        self.results.evaluations.append(evaluation)
        if self.on_evaluation is not None:
            self.on_evaluation(evaluation)

    def run_task(self, t: int, stream: Iterable, stats: Iterable | None) -> None:
        learner, num_batches = self.learner, len(stream)
        points = set(self.plan.points(t, num_batches))
        learner.on_task_start(t)
        positions, hits, seen = [], [], 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=learner.ctx.device)
        for k, batch in enumerate(stream, 1):
            images, labels, where, weight = _unpack(batch, seen)
            seen += len(labels)
            predicted = learner.predict(images)  # test, then train: before this batch is learned from
            hits.append(predicted == labels.to(predicted.device))
            positions.append(where)
            loss_sum += learner.train_batch(images, labels, weight).double() * len(labels)
            if k in points and k < num_batches:
                self.evaluate(t, k, num_batches)
        learner.on_task_end(t, stats)
        totals = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(seen))]))
        self.results.losses.append(float(totals[0] / totals[1].clamp(min=1.0)))
        check_loss(self.results.losses[-1], "training", f"task {t + 1}", "lower --lr, or use --amp none")
        self.results.correct.append(_gathered_hits(positions, [h.cpu().numpy() for h in hits]))
        if num_batches in points:
            self.evaluate(t, num_batches, num_batches)


def run_online(learner: Learner, train_streams: Sequence[Iterable], test_loaders: Sequence[Iterable],
               continual_evaluations: int = 1, eval_window: int = 1000, common_test_set: bool = False,
               plan: OnlinePlan | None = None, stats_loaders: Sequence[Iterable | None] | None = None,
               on_task_end: Callable[[int, OnlineResults], None] | None = None,
               on_evaluation: Callable[[Evaluation], None] | None = None,
               test_classes: Sequence[Sequence[int]] | None = None) -> OnlineResults:
    """Train `learner` on each task's stream in one pass and evaluate it on every test loader.

    `train_streams[t]`: task t's batches, (images, labels) (or an OnlineStream's items); `test_loaders`: one per task
    (its R and anytime A matrices follow), or, with `common_test_set`, one for every task. Each training batch is
    predicted before it is learned from (prequential accuracy over windows of `eval_window` images). Every test set
    is evaluated `continual_evaluations` times per task at evenly spaced points, the last after the task's end
    (`plan` may say otherwise). `stats_loaders[t]`: the task's images under the test transform, for methods that
    keep class statistics. `test_classes[i]`: the classes of test set i, when known (a set none of whose classes is
    seen yet is not passed through the model: its accuracy is 0). Returns the measurements with their metrics in
    `summary`."""
    num_tasks = len(train_streams)
    if not common_test_set and len(test_loaders) != num_tasks:
        raise UserError(f"{num_tasks} training streams but {len(test_loaders)} test loaders: give one per task, or "
                        f"common_test_set=True with one")
    plan = plan or OnlinePlan(continual_evaluations)
    loop = OnlineLoop(learner, test_loaders, plan, on_evaluation, test_classes)
    for t, stream in enumerate(train_streams):
        loop.run_task(t, stream, stats_loaders[t] if stats_loaders else None)
        loop.results.summary = summarize(loop.results, num_tasks, plan.continual_evaluations, common_test_set,
                                         eval_window)
        if on_task_end is not None:
            on_task_end(t, loop.results)
    return loop.results


# ----------------------------------------------------------------------------------------------------------------
# The command line's online run
# ----------------------------------------------------------------------------------------------------------------
def task_order(scenario: Scenario, t: int, seed: int, steps: int, batch_size: int) -> np.ndarray:
    """Task t's stream: its training images in one seeded order (the same on every process); with `steps` > 0 (a
    Gaussian episode of that many batches), that many batches taken from the order, repeated if need be."""
    indices = scenario.train_indices(t)
    if len(indices) == 0:
        raise UserError(f"task {t + 1} has no training images (classes {scenario.task_classes[t]})")
    rng = np.random.default_rng([seed, t])
    order = rng.permutation(indices)
    if steps > 0:
        need = steps * batch_size
        order = np.concatenate([order] + [rng.permutation(indices) for _ in range(need // len(indices))])[:need]
    return order


class ProtocolRecord:
    """results.json, TensorBoard and the task checkpoints of an online run, written after every task."""

    def __init__(self, cfg: Config, scenario: Scenario, learner: Learner, output_dir: Path, logger: Any,
                 provenance: Provenance):
        self.cfg, self.scenario, self.learner, self.output_dir = cfg, scenario, learner, output_dir
        self.logger, self.provenance = logger, provenance
        self.config = config_to_dict(cfg)
        self.started = time.perf_counter()

    def on_evaluation(self, evaluation: Evaluation) -> None:
        sets = self.scenario.num_test_sets
        seen = evaluation.accuracies[:evaluation.task + 1] if sets > 1 else evaluation.accuracies
        mean_seen, mean_all = float(np.mean(seen)), float(np.mean(evaluation.accuracies))
        step = round(evaluation.position * 1000)  # the curves' x axis: thousandths of a task
        self.logger.log_scalars({"online/anytime_accuracy_seen": mean_seen, "online/anytime_accuracy_all": mean_all},
                                step)
        what = f"seen tasks {mean_seen:.2f} | all tasks {mean_all:.2f}" if sets > 1 else f"test set {mean_all:.2f}"
        log(f"task {evaluation.task + 1} after {evaluation.batches} batches: accuracy on {what}")

    def on_task_end(self, t: int, results: OnlineResults) -> None:
        check_tensors(self.learner.method.trained_tensors(), f"task {t + 1}", "lower --lr, or use --amp none")
        self.provenance.update(t)
        summary = results.summary
        prequential = summary.get("prequential_task_accuracy", [None])[-1]
        log(f"task {t + 1}/{self.scenario.num_tasks}: loss {results.losses[-1]:.4f} | test-then-train accuracy "
            f"{prequential:.2f}")
        self.logger.log_scalars({"online/train_loss": results.losses[-1], "online/prequential_accuracy": prequential},
                                t + 1)
        if not is_main_process():
            return
        atomic_torch_save({"model": self.learner.method.checkpoint_state(), "task": t, "config": self.config,
                           "protocol": "online"}, checkpoint_path(self.output_dir, t))
        atomic_write_json(self.as_dict(results), self.output_dir / "results.json")

    def task_matrix(self, results: OnlineResults) -> np.ndarray:
        """The offline runs' accuracy matrix from the end-of-task evaluations: [test set, after task], NaN where a
        test set was not evaluated then (a task not seen yet; an episode without evaluation)."""
        scenario = self.scenario
        acc = np.full((scenario.num_test_sets, scenario.num_tasks), np.nan)
        for e in results.evaluations:
            if e.task_end:
                sets = scenario.evaluated_sets(e.task)
                acc[sets, e.task] = np.asarray(e.accuracies)[sets]
        return acc

    def final(self, results: OnlineResults, acc: np.ndarray) -> dict[str, Any]:
        """The offline runs' summary keys (what the report's columns read) and every online metric."""
        summary, last = results.summary, self.scenario.num_tasks - 1
        if self.scenario.common_test_set:
            offline = {"avg_acc": summary["accuracy_final"], "avg_incremental_acc": summary["accuracy_avg"],
                       "forgetting": summary["forgetting"], "forgetting_standard": summary["forgetting"], "bwt": None}
        else:
            offline = metrics.summarize(acc, last)
        scalars = {k: v for k, v in summary.items() if not isinstance(v, list | dict)}
        return {"task": last + 1, **offline, "avg_tii_acc": None, **scalars}

    def as_dict(self, results: OnlineResults) -> dict[str, Any]:
        cfg, done = self.cfg, len(results.correct)
        acc = self.task_matrix(results)
        first = self.scenario.first_evaluation
        matrix = [[None if np.isnan(acc[i, c]) or c < first(i) else float(acc[i, c]) for c in range(acc.shape[1])]
                  for i in range(acc.shape[0])]
        tasks = [{"task": t + 1, "avg_acc": float(np.nanmean(acc[:, t])) if not np.isnan(acc[:, t]).all() else None,
                  "avg_tii_acc": None, "train_loss": results.losses[t]} for t in range(done)]
        return {"subcommand": cfg.subcommand, "method": cfg.method, "dataset": cfg.data.dataset,
                "model": cfg.backbone.model, "protocol": "online", "scenario": self.scenario.kind,
                "num_tasks": self.scenario.num_tasks, "completed_tasks": done,
                "class_order": self.scenario.class_order, "task_classes": self.scenario.task_classes,
                "acc_matrix": matrix, "tasks": tasks,
                "final": self.final(results, acc) if done == self.scenario.num_tasks else None,
                "online": results.summary, "train_losses": results.losses,
                "evaluations": [vars(e) for e in results.evaluations],
                "wall_seconds": time.perf_counter() - self.started,
                "provenance": self.provenance.as_dict(), "config": self.config}


def run_protocol(learner: Learner, scenario: Scenario, cfg: Config, ctx: DistContext, logger: Any) -> dict[str, Any]:
    """The command line's online run of `learner` over `scenario`; returns what results.json holds."""
    stream_cfg, output_dir = cfg.stream, Path(cfg.run.output_dir)
    batch = stream_cfg.online_batch_size or cfg.context.global_batch_size
    if batch < ctx.world_size:
        raise UserError(f"--online_batch_size {batch} is smaller than the {ctx.world_size} processes")
    data = scenario.benchmark
    streams = [OnlineStream(data.train, task_order(scenario, t, cfg.run.seed, stream_cfg.steps_per_task, batch),
                            batch, cfg.data.num_workers, scenario.loader.pin_memory) for t in range(scenario.num_tasks)]
    plan = gaussian_plan(scenario.num_tasks, stream_cfg.continual_evaluations) if scenario.kind == "gaussian" \
        else OnlinePlan(stream_cfg.continual_evaluations)
    if plan.per_task:
        for stream in streams:
            evaluation_points(len(stream), plan.continual_evaluations)  # before any work: a stream too short
    record = ProtocolRecord(cfg, scenario, learner, output_dir, logger, Provenance(cfg, ctx.device))
    if is_main_process():
        atomic_write_json(record.config, output_dir / "config.json")
    log(f"online protocol: {scenario.num_tasks} tasks of {', '.join(str(len(s)) for s in streams[:5])}"
        f"{'...' if len(streams) > 5 else ''} batches of {batch} images, each predicted before it is learned from")
    tests = [scenario.test_loader(i) for i in range(scenario.num_test_sets)]
    try:
        results = run_online(learner, streams, tests, stream_cfg.continual_evaluations, stream_cfg.eval_window,
                             scenario.common_test_set, plan, None, record.on_task_end, record.on_evaluation,
                             scenario.task_classes if scenario.kind == "class" else None)
        summary = results.summary
        for accuracy, where in zip(summary["windowed_accuracy"], summary["window_task_index"], strict=True):
            logger.log_scalars({"online/windowed_test_then_train_accuracy": accuracy}, round(where * 1000))
    finally:
        logger.close()
    log(online_metrics.format_online_summary(summary, summary) if not scenario.common_test_set
        else format_common(summary))
    return record.as_dict(results)


def format_common(summary: dict[str, Any]) -> str:
    """The common test set's lines: final, average after each task, anytime average, forgetting, prequential."""
    forgetting = summary.get("forgetting")
    return (f"final accuracy {summary['accuracy_final']:.2f} | average after each task {summary['accuracy_avg']:.2f} | "
            f"anytime average {summary['anytime_accuracy_avg']:.2f} | forgetting "
            f"{'-' if forgetting is None else f'{forgetting:.2f}'} | test-then-train accuracy "
            f"{summary['prequential_accuracy']:.2f} ({summary['n_windows']} windows of {summary['window']})")

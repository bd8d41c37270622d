"""The continual scenario: class order, the classes of each task, class masks and the per-task loaders.

Labels keep their dataset ids; a task is a set of label ids, so a shuffled class order needs no relabelling. Three
kinds: class-incremental (tasks split the classes, a test set per task), domain-incremental (every task holds every
class, its images from one domain; a test set per domain, or one common test set) and the task-free Gaussian stream
(episodes whose label sets follow Gaussian presence curves; one common test set).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from utils import UserError, get_rank, get_world_size

from .base import Benchmark


def make_class_order(num_classes: int, shuffle: bool, seed: int) -> list[int]:
    """Natural order, or the reference's shuffle (`random.seed(seed); random.shuffle(order)`)."""
    order = list(range(num_classes))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def split_into_tasks(class_order: list[int], num_tasks: int, dataset: str = "the dataset") -> list[list[int]]:
    num_classes = len(class_order)
    if num_tasks < 1 or num_classes % num_tasks:
        divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
        raise UserError(
            f"--num_tasks {num_tasks} does not split the {num_classes} classes of {dataset} into equal tasks "
            f"({num_classes} = {num_tasks} x {num_classes // max(num_tasks, 1)} + {num_classes % max(num_tasks, 1)}); "
            f"use one of {divisors}")
    per_task = num_classes // num_tasks
    return [class_order[t * per_task:(t + 1) * per_task] for t in range(num_tasks)]


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r + W, r + 2W, ...: every item exactly once over all ranks, no padding duplicates."""

    def __init__(self, num_items: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_items, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class LoaderSettings:
    batch_size: int
    num_workers: int = 0
    pin_memory: bool = False
    seed: int = 0
    eval_batch_size: int | None = None


class ClassBatches(Sampler[list[int]]):
    """Batches of one class each: class by class, this rank's share of the class's positions (every world-th one, so
    no image is seen twice), `batch_size` at a time."""

    def __init__(self, classes: list[np.ndarray], batch_size: int, rank: int, world: int):
        self.shares = [positions[rank::world] for positions in classes]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for share in self.shares:
            for start in range(0, len(share), self.batch_size):
                yield share[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return sum(-(-len(share) // self.batch_size) for share in self.shares)


SCENARIO_KINDS = ("class", "domain", "gaussian")


@dataclass
class Scenario:
    class_order: list[int]
    task_classes: list[list[int]]  # the class mask of each task (domain: every class; gaussian: the label set)
    num_classes: int
    benchmark: Benchmark | None = None
    loader: LoaderSettings = field(default_factory=lambda: LoaderSettings(batch_size=1))
    task_datasets: list[int] | None = None  # the dataset of each task, when several datasets are learnt in turn
    kind: str = "class"
    common_test_set: bool = False  # one test set for every task (CORe50, the Gaussian stream), else one per task

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def num_test_sets(self) -> int:
        return 1 if self.common_test_set else self.num_tasks

    def evaluated_sets(self, t: int) -> list[int]:
        """The test sets evaluated after task t: those of the tasks seen so far, or the common one."""
        return [0] if self.common_test_set else list(range(t + 1))

    def first_evaluation(self, i: int) -> int:
        """The task after which test set i is first evaluated (its forgetting counts from there)."""
        return 0 if self.common_test_set else i

    @property
    def has_task_identity(self) -> bool:
        """Whether a class tells its task (class-incremental): task-identity accuracy is defined only then."""
        return self.kind == "class"

    @property
    def class_to_task(self) -> torch.Tensor:
        mapping = torch.full((self.num_classes,), -1, dtype=torch.long)
        for t, classes in enumerate(self.task_classes):
            mapping[classes] = t
        return mapping

    def class_mask(self, t: int) -> torch.Tensor:
        """Boolean mask over all classes: True for the classes of task t."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[self.task_classes[t]] = True
        return mask

    def seen_mask(self, t: int) -> torch.Tensor:
        """True for the classes of tasks 0..t."""
        return torch.stack([self.class_mask(s) for s in range(t + 1)]).any(0)

    def _indices(self, targets: np.ndarray, t: int) -> np.ndarray:
        return np.flatnonzero(np.isin(targets, self.task_classes[t]))

    def train_indices(self, t: int) -> np.ndarray:
        """Positions in the training split of task t's images: its classes, or (domain) its domain's images."""
        data = self._require_data()
        if self.kind == "domain":
            return np.flatnonzero(data.train_domains == t)
        return self._indices(data.train_targets, t)

    def test_indices(self, i: int) -> np.ndarray:
        """Positions in the test split of test set i: task i's classes, domain i's images, or every test image."""
        data = self._require_data()
        if self.common_test_set:
            return np.arange(len(data.test_targets))
        if self.kind == "domain":
            return np.flatnonzero(data.test_domains == i)
        return self._indices(data.test_targets, i)

    def _require_data(self) -> Benchmark:
        if self.benchmark is None:
            raise RuntimeError("this scenario was built without data (benchmark or --print_config)")
        return self.benchmark

    def train_loader(self, t: int) -> DataLoader:
        """Task t's training images, shuffled by a DistributedSampler seeded per task (call set_epoch per epoch)."""
        data = self._require_data()
        subset = Subset(data.train, self.train_indices(t).tolist())
        if len(subset) == 0:
            raise UserError(f"task {t + 1} has no training images (classes {self.task_classes[t]})")
        sampler = DistributedSampler(subset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                                     seed=self.loader.seed + t)
        return self._loader(subset, sampler, self.loader.batch_size)

    def test_loader(self, i: int) -> DataLoader:
        """Test set i (see `test_indices`), sharded over the ranks without duplicates."""
        return self._sharded(self._require_data().test, self.test_indices(i))

    def stats_loader(self, t: int, per_class: bool = False) -> DataLoader:
        """Task t's training images under the test transform, sharded without duplicates (class statistics); with
        `per_class`, in batches of one class each, as the reference's per-class loaders give them."""
        data = self._require_data()
        indices = self.train_indices(t)
        if not per_class:
            return self._sharded(data.train_eval, indices)
        targets = data.train_targets[indices]
        batches = ClassBatches([np.flatnonzero(targets == c) for c in self.task_classes[t]],
                               self.loader.eval_batch_size or self.loader.batch_size, get_rank(), get_world_size())
        return DataLoader(Subset(data.train_eval, indices.tolist()), batch_sampler=batches,
                          num_workers=self.loader.num_workers, pin_memory=self.loader.pin_memory)

    def _sharded(self, dataset: Dataset, indices: np.ndarray) -> DataLoader:
        subset = Subset(dataset, indices.tolist())
        sampler = ShardSampler(len(subset), get_rank(), get_world_size())
        return self._loader(subset, sampler, self.loader.eval_batch_size or self.loader.batch_size)

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.loader.num_workers,
                          pin_memory=self.loader.pin_memory, drop_last=False,
                          persistent_workers=False)


@dataclass(frozen=True)
class StreamShape:
    """What a task is: `kind` (class, domain or gaussian) and the Gaussian schedule's episode length and width."""
    kind: str = "class"
    steps_per_task: int = -1
    gaussian_width: float = 50.0

    @classmethod
    def of(cls, stream: Any) -> StreamShape:
        """From a run's stream settings (`scenario`, `steps_per_task`, `gaussian_width`)."""
        return cls(stream.scenario, stream.steps_per_task, stream.gaussian_width)


def _common_test_set(benchmark: Benchmark | None, num_tasks: int) -> bool:
    """Whether a domain-incremental benchmark's test set is common to every domain (no domains of its own); its
    domains were checked against --num_tasks before the data was read (datasets.check_domains)."""
    if benchmark is None:
        return False
    if benchmark.train_domains is None or int(benchmark.train_domains.max()) + 1 != num_tasks:
        raise UserError(f"{benchmark.name} does not hold {num_tasks} domains, one per task")
    return benchmark.test_domains is None


def build_scenario(num_classes: int, num_tasks: int, shuffle: bool, seed: int, dataset: str,
                   benchmark: Benchmark | None = None, loader: LoaderSettings | None = None,
                   shape: StreamShape | None = None) -> Scenario:
    """The scenario of `shape.kind`: the class split into tasks, the domains as tasks, or the Gaussian schedule's
    episodes (label sets drawn with `seed`, class order[j] peaking j-th)."""
    shape = shape or StreamShape()
    order = make_class_order(num_classes, shuffle, seed)
    common = False
    if shape.kind == "gaussian":
        from .gaussian import gaussian_schedule  # noqa: PLC0415 (only the task-free scenario needs it)
        label_sets = gaussian_schedule(num_classes, num_tasks, shape.steps_per_task, shape.gaussian_width, seed)
        tasks, common = [sorted(order[j] for j in labels) for labels in label_sets], True
    elif shape.kind == "domain":
        tasks, common = [list(order) for _ in range(num_tasks)], _common_test_set(benchmark, num_tasks)
    else:
        tasks = split_into_tasks(order, num_tasks, dataset)
    return Scenario(class_order=order, task_classes=tasks, num_classes=num_classes, benchmark=benchmark,
                    loader=loader or LoaderSettings(batch_size=1), kind=shape.kind, common_test_set=common)

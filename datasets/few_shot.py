"""Data of the few-shot LoRA flow: the upstream benchmark over the continual classes of one or more
datasets, and the episodes drawn from a dataset's held-out classes.

Dataset i's first `continual[i]` labels are learnt upstream, relabelled after the continual classes of the datasets
before it (Cars 0..159 -> 0..159, CUB 0..159 -> 160..319); its next `few_shot[i]` labels never appear upstream. The
relabelling is applied to the stored targets (the reference's target_transform was ignored by its ImageFolder-backed
datasets, so its labels of different datasets collided).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from utils import UserError

from .base import Benchmark
from .scenario import LoaderSettings, Scenario, make_class_order, split_into_tasks


class Relabelled(Dataset):
    """Items `indices` of `dataset`, with the labels `targets`."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, targets: np.ndarray):
        self.dataset, self.indices, self.targets = dataset, indices.tolist(), targets.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.indices[index]][0], self.targets[index]


def check_class_split(member: Benchmark, continual: int, few_shot: int) -> None:
    if continual + few_shot > member.num_classes:
        raise UserError(f"{member.name} has {member.num_classes} classes, fewer than the {continual} continual + "
                        f"{few_shot} few-shot classes asked for; lower --continual_classes_per_dataset or "
                        f"--few_shot_classes_per_dataset")


def upstream_benchmark(members: list[Benchmark], continual: list[int]) -> Benchmark:
    """The continual classes of every member as one benchmark, member i's labels shifted by sum(continual[:i])."""
    splits: dict[str, list[Dataset]] = {"train": [], "train_eval": [], "test": []}
    targets: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    offset = 0
    for member, classes in zip(members, continual, strict=True):
        for split, member_targets in (("train", member.train_targets), ("test", member.test_targets)):
            keep = np.flatnonzero(member_targets < classes)
            labels = member_targets[keep] + offset
            targets[split].append(labels)
            datasets = ("train", "train_eval") if split == "train" else ("test",)
            for name in datasets:
                splits[name].append(Relabelled(getattr(member, name), keep, labels))
        offset += classes
    return Benchmark(name="+".join(m.name for m in members), num_classes=offset,
                     train=ConcatDataset(splits["train"]), train_eval=ConcatDataset(splits["train_eval"]),
                     test=ConcatDataset(splits["test"]), train_targets=np.concatenate(targets["train"]),
                     test_targets=np.concatenate(targets["test"]))


def build_upstream_scenario(continual: list[int], tasks: list[int], shuffle: bool, seed: int, names: list[str],
                            benchmark: Benchmark | None = None, loader: LoaderSettings | None = None) -> Scenario:
    """Dataset after dataset, each one's continual classes cut into its tasks (`--shuffle` shuffles the class order
    within each dataset); `task_datasets[t]` is the dataset of task t."""
    order, task_classes, task_datasets = [], [], []
    offset = 0
    for i, (classes, num_tasks, name) in enumerate(zip(continual, tasks, names, strict=True)):
        member_order = [offset + c for c in make_class_order(classes, shuffle, seed)]
        member_tasks = split_into_tasks(member_order, num_tasks, f"{name} (its {classes} continual classes)")
        order += member_order
        task_classes += member_tasks
        task_datasets += [i] * len(member_tasks)
        offset += classes
    return Scenario(class_order=order, task_classes=task_classes, num_classes=offset, benchmark=benchmark,
                    loader=loader or LoaderSettings(batch_size=1), task_datasets=task_datasets)


@dataclass
class Episode:
    classes: list[int]   # the member's labels; label k of the episode's head is the k-th smallest
    support: np.ndarray  # indices into the member's train split, `num_shots` per class
    query: np.ndarray    # indices into its test split, up to `num_queries` per class


class EpisodeSampler:
    """Episode e is a function of (seed, e) alone, so results do not depend on which rank draws it or on a resume.
    As in the reference, each episode draws `num_ways` of the given classes, then `num_shots` training images and
    up to `num_queries` test images of each, without replacement."""

    def __init__(self, member: Benchmark, classes: list[int], num_ways: int, num_shots: int, num_queries: int,
                 seed: int):
        self.classes, self.num_ways, self.num_shots, self.num_queries, self.seed = (
            classes, num_ways, num_shots, num_queries, seed)
        self.train_by_class = {c: np.flatnonzero(member.train_targets == c) for c in classes}
        self.test_by_class = {c: np.flatnonzero(member.test_targets == c) for c in classes}
        for c in classes:
            if len(self.train_by_class[c]) < num_shots or not len(self.test_by_class[c]):
                raise UserError(f"class {c} of {member.name} has {len(self.train_by_class[c])} training and "
                                f"{len(self.test_by_class[c])} test images; an episode needs {num_shots} "
                                f"(--num_shots) and at least one; choose other --few_class_idx or fewer shots")

    def episode(self, e: int) -> Episode:
        rng = np.random.default_rng([self.seed, e])
        classes = sorted(rng.choice(self.classes, self.num_ways, replace=False).tolist())
        support = [rng.choice(self.train_by_class[c], self.num_shots, replace=False) for c in classes]
        query = [rng.choice(self.test_by_class[c], min(self.num_queries, len(self.test_by_class[c])), replace=False)
                 for c in classes]
        return Episode(classes, np.concatenate(support), np.concatenate(query))

"""What every benchmark loader returns: the two splits as in-memory or on-disk samples plus their labels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class TransformedDataset(Dataset):
    """`load(i)` gives the raw sample (a PIL image or a tensor); `transform` turns it into the model's input.

    Keeping loading and transform apart lets one copy of the data serve the train transform, and the test transform
    over the train split (class statistics), without loading the data twice.
    """

    def __init__(self, load: Callable[[int], object], targets: np.ndarray, transform: Callable | None):
        self.load = load
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, int(self.targets[index])


class ArrayImages:
    """Loads item i of an (N, H, W, C) uint8 array as a PIL image; a class rather than a lambda so that DataLoader
    workers started with `spawn` can pickle it."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


@dataclass
class Benchmark:
    name: str
    num_classes: int
    train: Dataset        # train split, train transform
    train_eval: Dataset   # train split, test transform (class statistics of deterministic features)
    test: Dataset         # test split, test transform
    train_targets: np.ndarray
    test_targets: np.ndarray

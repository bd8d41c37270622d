"""What every benchmark loader returns: the two splits as in-memory or on-disk samples plus their labels."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
    """Loads item i of an (N, H, W, C) or grayscale (N, H, W) uint8 array as an RGB PIL image (the backbone takes
    three channels); a class rather than a lambda so that DataLoader workers started with `spawn` can pickle it."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


class ImageFiles:
    """Loads item i of a list of image files as an RGB PIL image, from disk on every call, so a 30k-image benchmark
    costs no RAM; a class rather than a lambda so that DataLoader workers started with `spawn` can pickle it."""

    def __init__(self, root: Path, relpaths: list[str]):
        self.root = Path(root)
        self.relpaths = list(relpaths)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __call__(self, index: int) -> Image.Image:
        path = self.root / self.relpaths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as err:  # FileNotFoundError and PIL's UnidentifiedImageError are both OSErrors
            raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); "
                            f"replace it from the dataset's archive") from err


@dataclass
class Benchmark:
    name: str
    num_classes: int
    train: Dataset        # train split, train transform
    train_eval: Dataset   # train split, test transform (class statistics of deterministic features)
    test: Dataset         # test split, test transform
    train_targets: np.ndarray
    test_targets: np.ndarray
    # domain-incremental benchmarks: each sample's domain 0..D-1 (its task); None elsewhere
    train_domains: np.ndarray | None = None
    test_domains: np.ndarray | None = None  # None: one test set common to every domain

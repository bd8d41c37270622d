"""Split Digits, the offline default: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), so a fresh
machine runs the whole pipeline with no download."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.model_selection import train_test_split

from .base import Benchmark, TransformedDataset

TEST_FRACTION = 0.3
SPLIT_SEED = 0  # fixed, so the split never depends on --seed


class TensorRows:
    """Loads row i of a tensor (the images are already at the model's input size)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __call__(self, index: int) -> torch.Tensor:
        return self.rows[index]


def _to_model_input(images: np.ndarray, input_size: int) -> torch.Tensor:
    """(N, 8, 8) pixel values 0..16 -> (N, 3, S, S) normalised to [-1, 1] like the ViT's own (0.5, 0.5) stats."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def load_digits(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    digits = sklearn_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(indices, test_size=TEST_FRACTION, stratify=digits.target,
                                           random_state=SPLIT_SEED)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    images = _to_model_input(digits.images, input_size)
    targets = digits.target.astype(np.int64)
    train = TransformedDataset(TensorRows(images[train_idx]), targets[train_idx], None)
    test = TransformedDataset(TensorRows(images[test_idx]), targets[test_idx], None)
    return Benchmark(name="Split-Digits", num_classes=10, train=train, train_eval=train, test=test,
                     train_targets=targets[train_idx], test_targets=targets[test_idx])

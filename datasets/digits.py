"""Split Digits, the offline default: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), so a fresh
machine runs the whole pipeline with no download; Digits-Domains, the same split in three domains, likewise for
domain-incremental runs."""
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


def _fixed_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The (N, 8, 8) images, their labels, and the sorted train and test indices of the fixed stratified split."""
    digits = sklearn_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(indices, test_size=TEST_FRACTION, stratify=digits.target,
                                           random_state=SPLIT_SEED)
    return digits.images, digits.target.astype(np.int64), np.sort(train_idx), np.sort(test_idx)


def load_digits(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    raw_images, targets, train_idx, test_idx = _fixed_split()
    images = _to_model_input(raw_images, input_size)
    train = TransformedDataset(TensorRows(images[train_idx]), targets[train_idx], None)
    test = TransformedDataset(TensorRows(images[test_idx]), targets[test_idx], None)
    return Benchmark(name="Split-Digits", num_classes=10, train=train, train_eval=train, test=test,
                     train_targets=targets[train_idx], test_targets=targets[test_idx])


# ----------------------------------------------------------------------------------------------------------------
# Digits-Domains: the same split seen in three domains, for domain-incremental runs with no download
# ----------------------------------------------------------------------------------------------------------------
NUM_DOMAINS = 3  # 0: as is, 1: rotated 90 degrees, 2: colour-shifted
# domain 2 per channel: red inverted, green at half contrast, blue inverted at half contrast; values stay in [-1, 1]
COLOUR_SHIFT = torch.tensor([-1.0, 0.5, -0.5]).view(3, 1, 1)


def to_domain(image: torch.Tensor, domain: int) -> torch.Tensor:
    """A (3, S, S) model input as it looks in `domain`; a pure function, so every copy is the same."""
    if domain == 1:
        return torch.rot90(image, 1, dims=(1, 2))
    if domain == 2:
        return image * COLOUR_SHIFT
    return image


class DomainRows:
    """Item i is row i seen in domain `domains[i]` (made per item, when loaded)."""

    def __init__(self, rows: torch.Tensor, domains: np.ndarray):
        self.rows, self.domains = rows, domains

    def __call__(self, index: int) -> torch.Tensor:
        return to_domain(self.rows[index], int(self.domains[index]))


def load_digits_domains(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    """The Split-Digits split dealt into NUM_DOMAINS domains: image i of each split goes to domain i % NUM_DOMAINS,
    so each domain holds every class with its own images (no image in two domains) and a run costs what a
    Split-Digits run costs."""
    raw_images, targets, train_idx, test_idx = _fixed_split()
    images = _to_model_input(raw_images, input_size)
    train_domains = np.arange(len(train_idx), dtype=np.int64) % NUM_DOMAINS
    test_domains = np.arange(len(test_idx), dtype=np.int64) % NUM_DOMAINS
    train = TransformedDataset(DomainRows(images[train_idx], train_domains), targets[train_idx], None)
    test = TransformedDataset(DomainRows(images[test_idx], test_domains), targets[test_idx], None)
    return Benchmark(name="Digits-Domains", num_classes=10, train=train, train_eval=train, test=test,
                     train_targets=targets[train_idx], test_targets=targets[test_idx],
                     train_domains=train_domains, test_domains=test_domains)

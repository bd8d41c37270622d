"""CIFAR-100 in torchvision's on-disk layout: `<data-path>/cifar-100-python/{train,test,meta}` (python pickles)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from utils import UserError, prepare_once_per_node

from .archives import download_into
from .base import ArrayImages, Benchmark, TransformedDataset
from .transforms import cifar_transforms

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FOLDER = "cifar-100-python"


def read_cifar_pickle(path: Path, label_key: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file of the CIFAR python layout: (N, 32, 32, 3) uint8 images and their labels under `label_key`
    (`fine_labels` for CIFAR-100, `labels` for CIFAR-10). Any unreadable file is one line naming it and `source`."""
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, AttributeError) as err:
        raise UserError(
            f"{path} is not a readable CIFAR pickle ({type(err).__name__}: {err}); delete "
            f"{path.parent} and let the run download it again, or extract {source} there") from err
    if len(images) != len(labels):
        raise UserError(f"{path} holds {len(images)} images but {len(labels)} labels; the file is corrupt, "
                        f"extract {source} again")
    return images, labels


def _ensure_present(root: Path, download: bool) -> None:
    folder = root / CIFAR100_FOLDER
    if (folder / "train").is_file() and (folder / "test").is_file():
        return
    if not download:
        raise UserError(f"CIFAR-100 not found: expected {folder}/train and {folder}/test; "
                        f"extract {CIFAR100_URL} into {root}")
    from torchvision.datasets.utils import download_and_extract_archive
    try:
        download_into(root, lambda staging: download_and_extract_archive(CIFAR100_URL, str(staging), md5=CIFAR100_MD5))
    except UserError:
        raise
    except Exception as err:  # network errors come in many types (URLError, socket errors, HTTP errors)
        raise UserError(f"CIFAR-100 not found in {folder} and the download from {CIFAR100_URL} failed "
                        f"({type(err).__name__}); extract that archive into {root}") from err


def load_cifar100(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    root = Path(data_path)
    prepare_once_per_node(root, lambda: _ensure_present(root, download), create=download)
    train_images, train_labels = read_cifar_pickle(root / CIFAR100_FOLDER / "train", "fine_labels",
                                                   CIFAR100_URL)
    test_images, test_labels = read_cifar_pickle(root / CIFAR100_FOLDER / "test", "fine_labels", CIFAR100_URL)
    train_tf, test_tf = cifar_transforms(input_size)

    return Benchmark(
        name="Split-CIFAR100", num_classes=100,
        train=TransformedDataset(ArrayImages(train_images), train_labels, train_tf),
        train_eval=TransformedDataset(ArrayImages(train_images), train_labels, test_tf),
        test=TransformedDataset(ArrayImages(test_images), test_labels, test_tf),
        train_targets=train_labels, test_targets=test_labels,
    )

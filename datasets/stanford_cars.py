"""Split Stanford Cars (196 car models) read from torchvision's `StanfordCars` layout, `<data-path>/stanford_cars/`:
`devkit/cars_meta.mat` (`class_names`), `devkit/cars_train_annos.mat` and `cars_test_annos_withlabels.mat`
(`annotations`: one struct per image with `fname`, `class` 1..196 and a bounding box we ignore), images under
`cars_train/` and `cars_test/`.

A copy prepared for torchvision's `StanfordCars` works as is, with the official 8,144 / 8,041 train/test split.
There is no download and no extraction: the original site no longer serves the files (torchvision dropped its
download for the same reason), so `download` is accepted for a uniform loader signature and ignored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from utils import UserError

from .base import Benchmark, ImageFiles, TransformedDataset
from .transforms import default_transforms

CARS_URL = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
CARS_FOLDER = "stanford_cars"
META_FILE = "devkit/cars_meta.mat"
# split -> (annotations file, image folder), relative to CARS_FOLDER
SPLITS = {"train": ("devkit/cars_train_annos.mat", "cars_train"),
          "test": ("cars_test_annos_withlabels.mat", "cars_test")}


def _check_present(folder: Path) -> None:
    expected = [folder / META_FILE] + [folder / path for paths in SPLITS.values() for path in paths]
    missing = next((path for path in [folder, *expected] if not path.exists()), None)
    if missing is not None:
        raise UserError(f"Stanford Cars not found: {missing} is missing; expected {', '.join(map(str, expected))} "
                        f"(torchvision's StanfordCars layout). The original URL {CARS_URL} no longer serves the data, "
                        f"so nothing can be downloaded automatically: place a copy in that layout there by hand")


def _read_mat(path: Path, key: str) -> np.ndarray:
    """`key` of a .mat file as a 1-d array (squeeze_me turns a one-row struct array into a 0-d one)."""
    try:
        return np.atleast_1d(scipy.io.loadmat(path, squeeze_me=True)[key])
    except Exception as err:  # a damaged file raises MatReadError, OSError, ValueError, zlib.error... from scipy
        raise UserError(f"Stanford Cars file {path} is unreadable or lacks {key!r} ({type(err).__name__}: {err}); "
                        f"replace it from your copy of the dataset") from err


def _read_split(folder: Path, split: str, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Image file names (under the split's image folder) and 0-based labels, in annotation order."""
    annotations_path, images = (folder / path for path in SPLITS[split])
    try:
        records = _read_mat(annotations_path, "annotations")
        fnames = [str(annotation["fname"]) for annotation in records]
        labels = np.array([int(annotation["class"]) - 1 for annotation in records], dtype=np.int64)
    except (KeyError, ValueError, IndexError, TypeError) as err:
        raise UserError(f"Stanford Cars file {annotations_path} lacks the 'fname' / 'class' annotation fields "
                        f"({type(err).__name__}: {err}); replace it from your copy of the dataset") from err
    if not len(labels) or labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"Stanford Cars file {annotations_path} must give every image a class in 1..{num_classes} "
                        f"(the classes in {folder / META_FILE}); replace it from your copy of the dataset")
    missing = [name for name in fnames if not (images / name).is_file()]
    if missing:
        raise UserError(f"Stanford Cars image {images / missing[0]} is missing ({len(missing)} of {len(fnames)} "
                        f"listed in {annotations_path}); copy the complete {images.name}/ folder")
    return fnames, labels


def load_cars196(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    folder = Path(data_path) / CARS_FOLDER
    _check_present(folder)
    num_classes = len(_read_mat(folder / META_FILE, "class_names"))
    train_files, train_labels = _read_split(folder, "train", num_classes)
    test_files, test_labels = _read_split(folder, "test", num_classes)
    train_tf, test_tf = default_transforms(input_size)
    train_images = ImageFiles(folder / SPLITS["train"][1], train_files)

    return Benchmark(
        name="Split-Cars196", num_classes=num_classes,
        train=TransformedDataset(train_images, train_labels, train_tf),
        train_eval=TransformedDataset(train_images, train_labels, test_tf),
        test=TransformedDataset(ImageFiles(folder / SPLITS["test"][1], test_files), test_labels, test_tf),
        train_targets=train_labels, test_targets=test_labels,
    )

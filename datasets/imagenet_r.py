"""Split ImageNet-R: 200 ImageNet classes as renditions (art, cartoons, sketches...), 30,000 images in
`<data-path>/imagenet-r/<wnid>/*.jpg`, the layout of the official `imagenet-r.tar`.

The official data has no train/test split. The reference drew one from the global torch RNG (so it depended on
--seed) and then MOVED the user's files into `train/` and `test/` folders, racing under DDP. Here the
80/20 split is stratified per class with a fixed seed, computed once on rank 0 and kept as a JSON file of relative
paths next to the images; the images themselves are never moved or deleted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from utils import UserError, atomic_write_json, prepare_once_per_node, warn

from .archives import download_into, extract_folder_from_tar
from .base import IMAGE_EXTENSIONS, Benchmark, ImageFiles, TransformedDataset
from .transforms import default_transforms

IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
IMAGENET_R_FOLDER = "imagenet-r"
IMAGENET_R_ARCHIVE = "imagenet-r.tar"
SPLIT_SEED = 0  # fixed, so the split never depends on --seed
TRAIN_NUMERATOR, TRAIN_DENOMINATOR = 4, 5  # 80 % train, in integer arithmetic so rounding is exact
SPLIT_FILE = f"split_seed{SPLIT_SEED}.json"


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-R
# ----------------------------------------------------------------------------------------------------------------
def _ensure_present(root: Path, download: bool) -> None:
    folder, archive = root / IMAGENET_R_FOLDER, root / IMAGENET_R_ARCHIVE
    if folder.is_dir():
        return
    if not archive.is_file():
        if not download:
            raise UserError(f"ImageNet-R not found: expected {folder}/<wnid>/*.jpg or {archive}; "
                            f"download {IMAGENET_R_URL} into {root}")
        from torchvision.datasets.utils import download_url
        try:
            download_into(root, lambda staging: download_url(IMAGENET_R_URL, str(staging), filename=IMAGENET_R_ARCHIVE))
        except UserError:
            raise
        except Exception as err:  # network errors come in many types (URLError, socket errors, HTTP errors)
            raise UserError(f"ImageNet-R not found in {folder} and the download from {IMAGENET_R_URL} failed "
                            f"({type(err).__name__}); place imagenet-r.tar in {root} or extract it there") from err
    extract_folder_from_tar(archive, IMAGENET_R_FOLDER, root, IMAGENET_R_URL)


def _list_images(folder: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Sorted class (wnid) folders and, per class, its sorted image file names."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} has no class folders; extract {IMAGENET_R_URL} into {folder.parent}")
    if {"train", "test"} <= set(classes):
        raise UserError(f"{folder} has train/ and test/ folders, the layout the reference creates by moving files; "
                        f"extract a fresh {IMAGENET_R_ARCHIVE} (one folder per wnid) and point --data-path at it")
    files = {name: sorted(entry.name for entry in os.scandir(folder / name)
                          if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
             for name in classes}
    empty = [name for name in classes if not files[name]]
    if empty:
        raise UserError(f"{folder / empty[0]} holds no images ({len(empty)} empty class folders); "
                        f"re-extract {IMAGENET_R_ARCHIVE}")
    return classes, files


def compute_split(classes: list[str], files: dict[str, list[str]]) -> dict:
    """Per class: sorted file names, shuffled by a generator seeded with SPLIT_SEED (a fresh one per class, so a
    class's split does not depend on the others), the first 80 % (rounded down, at least one) train, the rest test."""
    train: list[list] = []
    test: list[list] = []
    for label, name in enumerate(classes):
        names = np.array(files[name], dtype=object)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
        n_train = max(1, len(names) * TRAIN_NUMERATOR // TRAIN_DENOMINATOR)
        train += [[f"{name}/{names[i]}", label] for i in order[:n_train]]
        test += [[f"{name}/{names[i]}", label] for i in order[n_train:]]
    return {"seed": SPLIT_SEED, "train_fraction": TRAIN_NUMERATOR / TRAIN_DENOMINATOR, "classes": classes,
            "train": train, "test": test}


def _check_split(split: dict, classes: list[str], files: dict[str, list[str]], path: Path) -> None:
    """A split file made from other images (files added or removed since) would silently change the benchmark."""
    listed = sorted(item[0] for item in split["train"] + split["test"])
    found = sorted(f"{name}/{file}" for name in classes for file in files[name])
    if split["classes"] != classes or listed != found:
        raise UserError(f"{path} lists {len(listed)} images in {len(split['classes'])} classes but "
                        f"{path.parent} holds {len(found)} in {len(classes)}; delete {path} to recompute the split")


def _load_or_create_split(folder: Path) -> dict:
    path = folder / SPLIT_FILE
    classes, files = _list_images(folder)
    if path.is_file():
        try:
            split = json.loads(path.read_text())
            if not all(key in split for key in ("classes", "train", "test")):
                raise KeyError("classes/train/test")
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{path} is not a readable split file ({type(err).__name__}: {err}); "
                            f"delete it to recompute the split") from err
        _check_split(split, classes, files, path)
        return split
    split = compute_split(classes, files)
    try:
        atomic_write_json(split, path)
    except OSError as err:  # a read-only dataset folder: the split is deterministic, so every run recomputes it
        warn(f"cannot write the ImageNet-R split file {path} ({err}); using the same split computed in memory")
    return split


def load_imagenet_r(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    root = Path(data_path)
    folder = root / IMAGENET_R_FOLDER
    prepare_once_per_node(root, lambda: _ensure_present(root, download), create=download)
    split = prepare_once_per_node(root, lambda: _load_or_create_split(folder))
    train_paths = [item[0] for item in split["train"]]
    test_paths = [item[0] for item in split["test"]]
    train_labels = np.array([item[1] for item in split["train"]], dtype=np.int64)
    test_labels = np.array([item[1] for item in split["test"]], dtype=np.int64)
    train_tf, test_tf = default_transforms(input_size)
    train_images = ImageFiles(folder, train_paths)

    return Benchmark(
        name="Split-Imagenet-R", num_classes=len(split["classes"]),
        train=TransformedDataset(train_images, train_labels, train_tf),
        train_eval=TransformedDataset(train_images, train_labels, test_tf),
        test=TransformedDataset(ImageFiles(folder, test_paths), test_labels, test_tf),
        train_targets=train_labels, test_targets=test_labels,
    )

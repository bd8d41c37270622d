"""Split CUB-200 (Caltech-UCSD Birds-200-2011) read straight from the official `<data-path>/CUB_200_2011/` folder:
`images.txt` ("<id> <relpath>"), `image_class_labels.txt` ("<id> <class 1..200>") and `train_test_split.txt`
("<id> <1=train|0=test>"), images under `CUB_200_2011/images/`.

The reference wanted a pre-split `CUB_200_2011/{train,test}/<class>/` ImageFolder layout and its preparation code
could not make one (it opened the .tgz with zipfile and moved folders to wrong paths); reading the official
split files needs no preparation and gives the official 5,994 / 5,794 split. `CUB_200_2011.tgz` is extracted on
rank 0 if the folder is absent. There is no download: the archive sits behind a records page, not a stable URL.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils import UserError, prepare_once_per_node

from .archives import extract_folder_from_tar
from .base import Benchmark, ImageFiles, TransformedDataset
from .transforms import default_transforms

CUB_SOURCE = "https://data.caltech.edu/records/65de6-vjz86 (CUB_200_2011.tgz)"
CUB_FOLDER = "CUB_200_2011"
CUB_ARCHIVE = "CUB_200_2011.tgz"
INDEX_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def _ensure_present(root: Path) -> None:
    folder, archive = root / CUB_FOLDER, root / CUB_ARCHIVE
    if folder.is_dir():
        return
    if not archive.is_file():
        raise UserError(f"CUB-200 not found: expected {folder}/ (with {', '.join(INDEX_FILES)} and images/) "
                        f"or {archive}; get {CUB_SOURCE} and place it in {root}")
    extract_folder_from_tar(archive, CUB_FOLDER, root, CUB_SOURCE)


def _read_index(path: Path) -> dict[int, str]:
    """'<id> <value>' per line -> {id: value}; the value may not contain spaces in the official files, but a
    relative path with spaces would still survive because only the first space separates."""
    if not path.is_file():
        raise UserError(f"CUB-200 file {path} is missing; re-extract {CUB_ARCHIVE} from {CUB_SOURCE}")
    entries: dict[int, str] = {}
    number = 0
    try:
        for number, line in enumerate(path.read_text().splitlines(), start=1):  # noqa: B007 (the error names it)
            if not line.strip():
                continue
            key, value = line.strip().split(maxsplit=1)
            entries[int(key)] = value
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"CUB-200 file {path} is unreadable at line {number} ({type(err).__name__}); "
                        f"re-extract {CUB_ARCHIVE} from {CUB_SOURCE}") from err
    return entries


def _read_split(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """Relative image paths (under images/), 0-based labels, is-train flags and the number of classes, by id."""
    images, labels, is_train = (_read_index(folder / name) for name in INDEX_FILES)
    ids = sorted(images)
    for name, entries in zip(INDEX_FILES[1:], (labels, is_train), strict=True):
        if sorted(entries) != ids:
            raise UserError(f"CUB-200 file {folder / name} lists {len(entries)} image ids but {folder / INDEX_FILES[0]}"
                            f" lists {len(ids)} (or different ones); the files do not belong together, re-extract "
                            f"{CUB_ARCHIVE}")
    try:
        targets = np.array([int(labels[i]) for i in ids], dtype=np.int64) - 1
        flags = np.array([int(is_train[i]) for i in ids], dtype=np.int64)
    except ValueError as err:
        raise UserError(f"CUB-200 files {folder / INDEX_FILES[1]} / {INDEX_FILES[2]} hold a non-integer value "
                        f"({err}); re-extract {CUB_ARCHIVE}") from err
    num_classes = int(targets.max()) + 1 if len(targets) else 0
    if not len(targets) or targets.min() < 0 or len(np.unique(targets)) != num_classes:
        raise UserError(f"CUB-200 file {folder / INDEX_FILES[1]} must number classes 1..K with every class used; "
                        f"re-extract {CUB_ARCHIVE}")
    if not np.isin(flags, (0, 1)).all():
        raise UserError(f"CUB-200 file {folder / INDEX_FILES[2]} must mark each image 1 (train) or 0 (test)")
    relpaths = [images[i] for i in ids]
    missing = [p for p in relpaths if not (folder / "images" / p).is_file()]
    if missing:
        raise UserError(f"CUB-200 image {folder / 'images' / missing[0]} is missing ({len(missing)} of "
                        f"{len(relpaths)} listed in {INDEX_FILES[0]}); re-extract {CUB_ARCHIVE}")
    return relpaths, targets, flags.astype(bool), num_classes


def load_cub200(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    root = Path(data_path)
    folder = root / CUB_FOLDER
    prepare_once_per_node(root, lambda: _ensure_present(root))
    relpaths, targets, is_train, num_classes = _read_split(folder)
    train_idx, test_idx = np.flatnonzero(is_train), np.flatnonzero(~is_train)
    train_labels, test_labels = targets[train_idx], targets[test_idx]
    train_tf, test_tf = default_transforms(input_size)
    train_images = ImageFiles(folder / "images", [relpaths[i] for i in train_idx])

    return Benchmark(
        name="Split-CUB200", num_classes=num_classes,
        train=TransformedDataset(train_images, train_labels, train_tf),
        train_eval=TransformedDataset(train_images, train_labels, test_tf),
        test=TransformedDataset(ImageFiles(folder / "images", [relpaths[i] for i in test_idx]), test_labels, test_tf),
        train_targets=train_labels, test_targets=test_labels,
    )

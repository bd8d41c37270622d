"""CORe50 for domain-incremental learning: 50 household objects filmed in 11 sessions (backgrounds, lighting), read
from the official `core50_128x128.zip` unpacked as `<data-path>/core50_128x128/s1..s11/o1..o50/*.png`.

The 8 training sessions are the domains, one per task, in the order of TRAIN_SESSIONS; sessions 3, 7 and 10 form one
test set common to every domain. There is no download: the archive is large, so it is fetched and unpacked by hand once.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils import UserError

from .base import IMAGE_EXTENSIONS, Benchmark, ImageFiles, TransformedDataset
from .transforms import default_transforms

CORE50_URL = "http://bias.csr.unibo.it/maltoni/download/core50/core50_128x128.zip"
CORE50_FOLDER = "core50_128x128"
NUM_SESSIONS = 11
NUM_OBJECTS = 50
TRAIN_SESSIONS = (1, 2, 4, 5, 6, 8, 9, 11)  # domain d is session TRAIN_SESSIONS[d]
TEST_SESSIONS = (3, 7, 10)
LAYOUT = f"{CORE50_FOLDER}/s1..s{NUM_SESSIONS}/o1..o{NUM_OBJECTS}/*.png"


def _locate(root: Path) -> Path:
    """The core50_128x128 folder: inside --data-path, or --data-path itself. Every session and object folder must
    be there, since a missing one would silently drop a domain or a class."""
    folder = root / CORE50_FOLDER
    if not folder.is_dir() and (root / "s1").is_dir():
        folder = root
    if not folder.is_dir():
        raise UserError(f"CORe50 not found: expected {root}/{LAYOUT}; download {CORE50_URL} and unzip it into "
                        f"--data-path ({root})")
    missing = [f"s{session}/o{obj}" for session in range(1, NUM_SESSIONS + 1) for obj in range(1, NUM_OBJECTS + 1)
               if not (folder / f"s{session}" / f"o{obj}").is_dir()]
    if missing:
        raise UserError(f"CORe50 in {folder} lacks {len(missing)} session/object folders (first: {missing[0]}); "
                        f"expected <data-path>/{LAYOUT}; unzip {CORE50_URL} into --data-path again")
    return folder


def _list_sessions(folder: Path, sessions: tuple[int, ...]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Relative image paths, labels (object oN -> N-1) and the index of each image's session within `sessions`:
    sessions in the given order, objects in numeric order, file names sorted, so the listing is the same on any disk."""
    relpaths: list[str] = []
    labels: list[int] = []
    positions: list[int] = []
    for position, session in enumerate(sessions):
        for obj in range(1, NUM_OBJECTS + 1):
            subfolder = f"s{session}/o{obj}"
            names = sorted(entry.name for entry in os.scandir(folder / subfolder)
                           if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
            relpaths += [f"{subfolder}/{name}" for name in names]
            labels += [obj - 1] * len(names)
            positions += [position] * len(names)
    return relpaths, np.array(labels, dtype=np.int64), np.array(positions, dtype=np.int64)


def load_core50(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    """`download` is accepted for the common loader signature; the archive is never downloaded."""
    folder = _locate(Path(data_path))
    train_paths, train_labels, train_domains = _list_sessions(folder, TRAIN_SESSIONS)
    test_paths, test_labels, _ = _list_sessions(folder, TEST_SESSIONS)
    train_tf, test_tf = default_transforms(input_size)
    train_images = ImageFiles(folder, train_paths)

    return Benchmark(
        name="CORe50", num_classes=NUM_OBJECTS,
        train=TransformedDataset(train_images, train_labels, train_tf),
        train_eval=TransformedDataset(train_images, train_labels, test_tf),
        test=TransformedDataset(ImageFiles(folder, test_paths), test_labels, test_tf),
        train_targets=train_labels, test_targets=test_labels,
        train_domains=train_domains, test_domains=None,
    )

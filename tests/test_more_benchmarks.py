"""Split ImageNet-R, Split CUB-200, 5-datasets and Split Cars196 on tiny fake trees in the real on-disk formats
(no downloads)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.io import savemat

from conftest import raises_one_line
from datasets import build_scenario
from datasets.cub import load_cub200
from datasets.five_datasets import load_five_datasets
from datasets.imagenet_r import SPLIT_FILE, load_imagenet_r
from datasets.scenario import LoaderSettings
from datasets.stanford_cars import CARS_URL, load_cars196


def _image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).convert(mode).save(path)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-R
# ----------------------------------------------------------------------------------------------------------------
IMAGENET_R_COUNTS = {"n01443537": 5, "n01484850": 4, "n01494475": 2}  # -> train 4+3+1, test 1+1+1


def write_fake_imagenet_r(root: Path, counts: dict[str, int] = IMAGENET_R_COUNTS) -> Path:
    """`counts`: images per class folder (wnid)."""
    rng = np.random.default_rng(0)
    for wnid, count in counts.items():
        for i in range(count):
            _image(root / "imagenet-r" / wnid / f"{['art', 'cartoon', 'sketch'][i % 3]}_{i}.jpg", rng)
    return root


def test_imagenet_r_split_is_deterministic_written_once_and_moves_nothing(tmp_path):
    root = write_fake_imagenet_r(tmp_path / "data")
    images_before = _tree(root / "imagenet-r")
    bench = load_imagenet_r(str(root), input_size=32, download=False)
    assert bench.name == "Split-Imagenet-R" and bench.num_classes == 3
    assert len(bench.train) == 8 and len(bench.test) == 3 and len(bench.train_eval) == 8
    assert bench.train_targets.tolist() == [0] * 4 + [1] * 3 + [2]
    assert bench.test_targets.tolist() == [0, 1, 2]
    image, label = bench.test[1]
    assert image.shape == (3, 32, 32) and label == 1 and image.min() >= 0 and image.max() <= 1
    assert bench.train[0][0].shape == (3, 32, 32)
    assert torch.equal(bench.train_eval[3][0], bench.train_eval[3][0])

    split_path = root / "imagenet-r" / SPLIT_FILE
    split = json.loads(split_path.read_text())
    assert split["classes"] == sorted(IMAGENET_R_COUNTS)
    assert sorted(p for p, _ in split["train"] + split["test"]) == sorted(images_before)
    assert not set(p for p, _ in split["train"]) & set(p for p, _ in split["test"])
    # the user's files stay where they were, byte for byte; only the split file was added
    after = _tree(root / "imagenet-r")
    assert after.pop(SPLIT_FILE) and after == images_before

    # a later run reads the file; deleting it recomputes exactly the same split (independent of any global RNG)
    np.random.seed(123), torch.manual_seed(123)
    again = load_imagenet_r(str(root), input_size=32, download=False)
    assert again.train.load.relpaths == bench.train.load.relpaths
    split_path.unlink()
    load_imagenet_r(str(root), input_size=32, download=False)
    assert json.loads(split_path.read_text()) == split


def test_imagenet_r_stale_split_file_is_an_error(tmp_path):
    root = write_fake_imagenet_r(tmp_path)
    load_imagenet_r(str(root), input_size=32, download=False)
    _image(root / "imagenet-r" / "n01443537" / "new.jpg", np.random.default_rng(1))
    raises_one_line(lambda: load_imagenet_r(str(root), 32, download=False), SPLIT_FILE, "delete")


def _archived(source: Path, folder: str, archive: Path, *extra: str) -> Path:
    """`source/folder` (and `source/extra...`) packed into `archive` (gzipped for .tgz) as the published archive
    lays them out; returns the archive's folder, which holds nothing else."""
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz" if archive.suffix == ".tgz" else "w") as tar:
        for name in (folder, *extra):
            tar.add(source / name, arcname=name)
    return archive.parent


def test_imagenet_r_from_the_tar_archive(tmp_path):
    source = write_fake_imagenet_r(tmp_path / "src")
    root = _archived(source, "imagenet-r", tmp_path / "data" / "imagenet-r.tar")
    bench = load_imagenet_r(str(root), input_size=32, download=False)
    assert bench.num_classes == 3 and len(bench.train) == 8 and len(bench.test) == 3
    assert (root / "imagenet-r.tar").is_file()  # the archive is kept
    assert (root / "imagenet-r" / SPLIT_FILE).is_file()
    assert sorted(p.name for p in root.iterdir()) == ["imagenet-r", "imagenet-r.tar"]  # no temporary left behind
    # same images, same split as from the extracted folder
    reference = load_imagenet_r(str(source), input_size=32, download=False)
    assert bench.train.load.relpaths == reference.train.load.relpaths
    assert torch.equal(bench.test[2][0], reference.test[2][0])


def test_imagenet_r_truncated_tar_and_missing_data_are_one_line_errors(tmp_path):
    source = write_fake_imagenet_r(tmp_path / "src")
    root = tmp_path / "data"
    root.mkdir()
    archive = root / "imagenet-r.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source / "imagenet-r", arcname="imagenet-r")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2 + 100])
    raises_one_line(lambda: load_imagenet_r(str(root), 32, download=False), str(archive), "imagenet-r.tar")
    assert not (root / "imagenet-r").exists()  # no half-extracted folder left to be mistaken for the data
    assert sorted(p.name for p in root.iterdir()) == ["imagenet-r.tar"]

    # cut exactly between two members: tarfile itself would take that for a complete, shorter archive
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        last_member = tar.getmembers()[-1].offset
    archive.write_bytes(data[:last_member])
    raises_one_line(lambda: load_imagenet_r(str(root), 32, download=False), "end-of-archive marker")
    assert sorted(p.name for p in root.iterdir()) == ["imagenet-r.tar"]

    empty = tmp_path / "empty"
    raises_one_line(lambda: load_imagenet_r(str(empty), 32, download=False),
                    str(empty / "imagenet-r"), "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar")


def test_imagenet_r_failed_download_gives_one_line(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    raises_one_line(lambda: load_imagenet_r(str(tmp_path), 32, download=True), "failed (URLError)", str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# CUB-200
# ----------------------------------------------------------------------------------------------------------------
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (class 1..3, is_train) per image id 1..8, in the files' id order
CUB_IMAGES = [(1, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 1), (3, 0), (3, 1)]


def write_fake_cub(root: Path, classes: list[str] = CUB_CLASSES,
                   images: list[tuple[int, int]] = CUB_IMAGES) -> Path:
    """The official CUB_200_2011 folder; `images` holds (class 1.., is_train) per image id."""
    rng = np.random.default_rng(0)
    folder = root / "CUB_200_2011"
    lines: dict[str, list[str]] = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for image_id, (label, is_train) in enumerate(images, start=1):
        relpath = f"{classes[label - 1]}/{classes[label - 1][4:]}_{image_id:04d}_{image_id}.jpg"
        _image(folder / "images" / relpath, rng)
        lines["images.txt"].append(f"{image_id} {relpath}")
        lines["image_class_labels.txt"].append(f"{image_id} {label}")
        lines["train_test_split.txt"].append(f"{image_id} {is_train}")
    for name, content in lines.items():
        (folder / name).write_text("\n".join(content) + "\n")
    (folder / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    return root


def test_cub_reads_the_official_split_files(tmp_path):
    root = write_fake_cub(tmp_path)
    before = _tree(root)
    bench = load_cub200(str(root), input_size=32, download=False)
    assert bench.name == "Split-CUB200" and bench.num_classes == 3
    assert bench.train_targets.tolist() == [0, 0, 1, 1, 2]
    assert bench.test_targets.tolist() == [0, 1, 2]
    image, label = bench.test[2]
    assert image.shape == (3, 32, 32) and label == 2
    assert bench.train[4][0].shape == (3, 32, 32) and bench.train[4][1] == 2
    assert _tree(root) == before  # nothing written, nothing moved


def test_cub_from_the_tgz_archive(tmp_path):
    source = write_fake_cub(tmp_path / "src")
    (source / "attributes.txt").write_text("1 has_bill_shape::curved\n")  # the real tgz has it at top level
    root = _archived(source, "CUB_200_2011", tmp_path / "data" / "CUB_200_2011.tgz", "attributes.txt")
    bench = load_cub200(str(root), input_size=32, download=False)
    assert len(bench.train) == 5 and len(bench.test) == 3
    assert (root / "CUB_200_2011.tgz").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["CUB_200_2011", "CUB_200_2011.tgz"]

    truncated = tmp_path / "trunc"
    truncated.mkdir()
    data = (root / "CUB_200_2011.tgz").read_bytes()
    (truncated / "CUB_200_2011.tgz").write_bytes(data[: len(data) // 2])
    raises_one_line(lambda: load_cub200(str(truncated), 32, download=False), "CUB_200_2011.tgz", "data.caltech.edu")
    assert sorted(p.name for p in truncated.iterdir()) == ["CUB_200_2011.tgz"]


def test_cub_missing_or_mismatched_files_name_the_file(tmp_path):
    raises_one_line(lambda: load_cub200(str(tmp_path / "nothing"), 32, download=False),
                    str(tmp_path / "nothing" / "CUB_200_2011"), "https://data.caltech.edu/records/65de6-vjz86")
    root = write_fake_cub(tmp_path / "a")
    (root / "CUB_200_2011" / "train_test_split.txt").unlink()
    raises_one_line(lambda: load_cub200(str(root), 32, download=False), "train_test_split.txt")

    root = write_fake_cub(tmp_path / "b")
    labels = root / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    raises_one_line(lambda: load_cub200(str(root), 32, download=False), str(labels))

    root = write_fake_cub(tmp_path / "c")
    next((root / "CUB_200_2011" / "images" / CUB_CLASSES[2]).iterdir()).unlink()
    raises_one_line(lambda: load_cub200(str(root), 32, download=False), "is missing", CUB_CLASSES[2])


# ----------------------------------------------------------------------------------------------------------------
# 5-datasets
# ----------------------------------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """MNIST's idx format: magic 0x00000803 (images) / 0x00000801 (labels), big-endian sizes, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_fake_five_datasets(root: Path) -> dict[str, dict[str, list[int]]]:
    """Returns each member's raw labels per split, in file order."""
    rng = np.random.default_rng(0)
    labels: dict[str, dict[str, list[int]]] = {}
    # SVHN: X is (32, 32, 3, N), y is (N, 1) with the digit 0 stored as 10
    labels["SVHN"] = {"train": [10, 1, 2], "test": [3, 10]}
    root.mkdir(parents=True, exist_ok=True)
    for split, ys in labels["SVHN"].items():
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, len(ys)), dtype=np.uint8),
                                              "y": np.array(ys, dtype=np.uint8).reshape(-1, 1)})
    # MNIST gzipped (as downloaded), Fashion-MNIST extracted
    for name, compress, counts in (("MNIST", True, (4, 2)), ("FashionMNIST", False, (2, 3))):
        labels[name] = {}
        for (split, (images_name, labels_name)), count in zip(
                (("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                 ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))), counts, strict=True):
            ys = [(3 * i + 1) % 10 for i in range(count)]
            labels[name][split] = ys
            _write_idx(root / name / "raw" / images_name, rng.integers(0, 256, (count, 28, 28)), compress)
            _write_idx(root / name / "raw" / labels_name, np.array(ys), compress)
    # CIFAR-10: five train batches and a test batch
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    labels["CIFAR10"] = {"train": [], "test": [9, 0]}
    for name, ys in [(f"data_batch_{i}", [i, i + 4]) for i in range(1, 6)] + [("test_batch", [9, 0])]:
        if name != "test_batch":
            labels["CIFAR10"]["train"] += ys
        with open(folder / name, "wb") as handle:
            pickle.dump({"batch_label": name, "labels": ys, "filenames": [f"{j}.png" for j in range(len(ys))],
                         "data": rng.integers(0, 256, (len(ys), 3072), dtype=np.uint8)}, handle)
    # notMNIST: letters A..J are classes 0..9, grayscale 28x28 PNGs
    labels["notMNIST"] = {"train": [], "test": []}
    for split, folder_name, letters in (("train", "Train", "ABJ"), ("test", "Test", "CJ")):
        for letter in "ABCDEFGHIJ":
            (root / "notMNIST" / folder_name / letter).mkdir(parents=True)
        for letter in letters:
            _image(root / "notMNIST" / folder_name / letter / f"{letter}x.png", rng, (28, 28), "L")
            labels["notMNIST"][split].append("ABCDEFGHIJ".index(letter))
    return labels


def test_five_datasets_offsets_transforms_and_sizes(tmp_path):
    root = tmp_path / "data"
    raw = write_fake_five_datasets(root)
    bench = load_five_datasets(str(root), input_size=32, download=False)
    assert bench.name == "5-datasets" and bench.num_classes == 50
    order = ["SVHN", "MNIST", "CIFAR10", "notMNIST", "FashionMNIST"]
    for split, targets in (("train", bench.train_targets), ("test", bench.test_targets)):
        expected = []
        for i, name in enumerate(order):
            expected += [(y % 10) + 10 * i for y in raw[name][split]]  # SVHN's 10 -> 0
        assert targets.tolist() == expected
    assert bench.test_targets[:2].tolist() == [3, 0] and bench.train_targets[0] == 0
    assert np.concatenate([d.targets for d in bench.train.datasets]).tolist() == bench.train_targets.tolist()
    assert len(bench.train) == len(bench.train_eval) == len(bench.train_targets) == 3 + 4 + 10 + 3 + 2
    assert len(bench.test) == len(bench.test_targets) == 2 + 2 + 2 + 2 + 3

    for dataset, targets in ((bench.test, bench.test_targets), (bench.train_eval, bench.train_targets)):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 32, 32) and label == targets[index]
    assert bench.train[len(bench.train) - 1][0].shape == (3, 32, 32)

    # each member keeps its own transform: only CIFAR-10 is normalised, the grayscale ones stay in [0, 1] as RGB
    cifar_index = 2 + 2  # first CIFAR-10 test item
    fashion = bench.test[len(bench.test) - 1][0]
    assert fashion.min() >= 0 and fashion.max() <= 1 and torch.equal(fashion[0], fashion[1])
    assert "Normalize" in repr(bench.test.datasets[2].transform)
    assert all("Normalize" not in repr(bench.test.datasets[i].transform) for i in (0, 1, 3, 4))
    assert "ColorJitter" in repr(bench.train.datasets[2].transform)
    assert bench.test[cifar_index][1] == 29

    # per-task selection works on the offset targets (the reference's compared raw labels with offset class ids)
    scenario = build_scenario(50, 5, False, 0, "5-datasets", benchmark=bench, loader=LoaderSettings(batch_size=4))
    for task in range(5):
        seen = [int(y) for _, ys in scenario.test_loader(task) for y in ys]
        assert seen and all(10 * task <= y < 10 * task + 10 for y in seen)


def test_five_datasets_missing_member_names_its_path_and_source(tmp_path):
    root = tmp_path / "data"
    write_fake_five_datasets(root)
    for path in (root / "notMNIST" / "Test").rglob("*.png"):
        path.unlink()
    os.rename(root / "notMNIST", root / "elsewhere")
    raises_one_line(lambda: load_five_datasets(str(root), 32, download=False),
                    "notMNIST", str(root / "notMNIST"), "Adversarial-Continual-Learning/raw/main/data/notMNIST.zip")
    (root / "test_32x32.mat").unlink()
    raises_one_line(lambda: load_five_datasets(str(root), 32, download=False),
                    "member SVHN", str(root / "test_32x32.mat"), "http://ufldl.stanford.edu/housenumbers/",
                    "also missing: notMNIST")


def test_five_datasets_notmnist_zip_is_extracted_and_bad_files_are_one_line(tmp_path):
    import zipfile

    root = tmp_path / "data"
    write_fake_five_datasets(root)
    with zipfile.ZipFile(root / "notMNIST.zip", "w") as archive:
        for path in sorted((root / "notMNIST").rglob("*")):
            archive.write(path, path.relative_to(root).as_posix())
    reference = load_five_datasets(str(root), 32, download=False)
    os.rename(root / "notMNIST", tmp_path / "moved_away")
    bench = load_five_datasets(str(root), 32, download=False)
    assert bench.test_targets.tolist() == reference.test_targets.tolist()
    assert (root / "notMNIST.zip").is_file() and (root / "notMNIST" / "Train" / "J" / "Jx.png").is_file()

    mnist_labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(mnist_labels, "wb") as handle:
        handle.write(b"\x00\x00\x08\x03garbage")
    raises_one_line(lambda: load_five_datasets(str(root), 32, download=False), str(mnist_labels), "magic")


# ----------------------------------------------------------------------------------------------------------------
# Stanford Cars
# ----------------------------------------------------------------------------------------------------------------
CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
# class 1..3 per image, in annotation order
CARS_TRAIN = [1, 3, 2, 1, 3]
CARS_TEST = [2, 1, 3]


def write_fake_cars(root: Path, classes: list[str] = CARS_CLASSES, train: list[int] = CARS_TRAIN,
                    test: list[int] = CARS_TEST) -> Path:
    """torchvision's StanfordCars layout; the annotations are struct arrays with the real files' fields. `train` and
    `test` hold each image's class (1-based)."""
    rng = np.random.default_rng(0)
    folder = root / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object)})
    fields = [("bbox_x1", "u2"), ("bbox_y1", "u2"), ("bbox_x2", "u2"), ("bbox_y2", "u2"), ("class", "u1"),
              ("fname", "U9")]
    for annos_file, images, labels in (("devkit/cars_train_annos.mat", "cars_train", train),
                                         ("cars_test_annos_withlabels.mat", "cars_test", test)):
        names = [f"{i:05d}.jpg" for i in range(1, len(labels) + 1)]
        for name in names:
            _image(folder / images / name, rng)
        records = np.array([(1, 2, 9, 8, label, name) for label, name in zip(labels, names, strict=True)], dtype=fields)
        savemat(folder / annos_file, {"annotations": records})
    return root


def test_cars_reads_torchvisions_layout(tmp_path):
    from torchvision.datasets import StanfordCars

    root = write_fake_cars(tmp_path)
    before = _tree(root)
    bench = load_cars196(str(root), input_size=32, download=True)
    assert bench.name == "Split-Cars196" and bench.num_classes == 3
    assert bench.train_targets.tolist() == [0, 2, 1, 0, 2]
    assert bench.test_targets.tolist() == [1, 0, 2]
    assert len(bench.train) == len(bench.train_eval) == 5 and len(bench.test) == 3
    image, label = bench.test[0]
    assert image.shape == (3, 32, 32) and label == 1
    assert bench.train[1][0].shape == (3, 32, 32) and bench.train_eval[1][0].shape == (3, 32, 32)
    # torchvision reads the fake tree too, with the same classes and labels
    for split, targets in (("train", bench.train_targets), ("test", bench.test_targets)):
        reference = StanfordCars(str(root), split=split)
        assert reference.classes == CARS_CLASSES
        assert [reference[i][1] for i in range(len(reference))] == targets.tolist()
    assert _tree(root) == before  # nothing written, nothing moved


def test_cars_missing_data_explains_that_it_cannot_be_downloaded(tmp_path, monkeypatch):
    import urllib.request

    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise AssertionError("the loader must not try the network")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    nothing = tmp_path / "nothing"
    folder = nothing / "stanford_cars"
    raises_one_line(lambda: load_cars196(str(nothing), 32, download=True),
                    f"{folder} is missing", str(folder / "devkit" / "cars_meta.mat"), str(folder / "cars_test"),
                    CARS_URL, "no longer serves", "by hand")
    assert not nothing.exists()

    root = write_fake_cars(tmp_path / "a")
    (root / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    raises_one_line(lambda: load_cars196(str(root), 32, download=True),
                    f"{root / 'stanford_cars' / 'cars_test_annos_withlabels.mat'} is missing", CARS_URL)


def test_cars_missing_image_and_bad_mat_files_name_the_file(tmp_path):
    root = write_fake_cars(tmp_path / "a")
    (root / "stanford_cars" / "cars_train" / "00002.jpg").unlink()
    (root / "stanford_cars" / "cars_train" / "00004.jpg").unlink()
    raises_one_line(lambda: load_cars196(str(root), 32, download=False),
                    str(root / "stanford_cars" / "cars_train" / "00002.jpg"), "is missing (2 of 5")

    root = write_fake_cars(tmp_path / "b")
    meta = root / "stanford_cars" / "devkit" / "cars_meta.mat"
    meta.write_bytes(b"not a mat file")
    raises_one_line(lambda: load_cars196(str(root), 32, download=False), str(meta), "unreadable")

    root = write_fake_cars(tmp_path / "c")
    annos_file = root / "stanford_cars" / "devkit" / "cars_train_annos.mat"
    annos_file.write_bytes(annos_file.read_bytes()[:200])
    raises_one_line(lambda: load_cars196(str(root), 32, download=False), str(annos_file), "unreadable")

    # a class beyond cars_meta.mat's list (e.g. a meta file from another copy)
    root = write_fake_cars(tmp_path / "d")
    meta = root / "stanford_cars" / "devkit" / "cars_meta.mat"
    savemat(meta, {"class_names": np.array(CARS_CLASSES[:2], dtype=object)})
    raises_one_line(lambda: load_cars196(str(root), 32, download=False), "cars_train_annos.mat", "1..2")

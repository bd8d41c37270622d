"""5-datasets: SVHN, MNIST, CIFAR-10, notMNIST and Fashion-MNIST in that order, 10 classes each, as one 50-class
benchmark (member i gets labels 10*i .. 10*i+9).

Two reference bugs are fixed here. The label offsets are applied to the stored targets, not in a target_transform,
so the per-class and per-task selections that read the targets arrays see the same labels as the model (the
reference's compared raw labels 0-9 with offset class ids and found no images from the second member on).
And every member keeps its own transform: CIFAR-10 the CIFAR one, the others the default one, where the reference
let CIFAR-10's normalisation and colour jitter leak into notMNIST and Fashion-MNIST.

Files are read directly rather than through torchvision's dataset classes, whose integrity checks would reject any
copy that is not byte-identical to the official one; torchvision only does the downloads.

Layout under `<data-path>`:
    train_32x32.mat, test_32x32.mat                       SVHN
    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    cifar-10-batches-py/{data_batch_1..5,test_batch}
    notMNIST/{Train,Test}/<A..J>/*.png                    (or notMNIST.zip, extracted on first use)
    FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset

from utils import UserError, prepare_once_per_node

from .archives import download_into
from .base import IMAGE_EXTENSIONS, ArrayImages, Benchmark, ImageFiles, TransformedDataset
from .cifar import read_cifar_pickle
from .transforms import cifar_transforms, default_transforms

CLASSES_PER_MEMBER = 10
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
NOTMNIST_URL = "https://github.com/facebookresearch/Adversarial-Continual-Learning/raw/main/data/notMNIST.zip"
NOTMNIST_LETTERS = "ABCDEFGHIJ"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

Split = tuple[Callable[[int], Image.Image], np.ndarray]  # (loader, 0-based labels)


# ----------------------------------------------------------------------------------------------------------------
# Readers, one per on-disk format
# ----------------------------------------------------------------------------------------------------------------
def _unreadable(path: Path, err: Exception, source: str) -> UserError:
    return UserError(f"{path} is not readable ({type(err).__name__}: {err}); delete it and get it again from {source}")


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int, source: str) -> np.ndarray:
    """The idx format of MNIST-like files: magic 0x0000 08 <ndim> (unsigned bytes), big-endian int32 sizes, data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
        if len(raw) < 4 + 4 * ndim or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != ndim:
            raise ValueError(f"bad magic number {raw[:4].hex()}, expected 000008{ndim:02x}")
        shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"{data.size} bytes of data for shape {shape}")
    except (OSError, EOFError, ValueError) as err:
        raise _unreadable(path, err, source) from err
    return data.reshape(shape)


def _mnist_like(folder: Path, source: str) -> Callable[[str], Split]:
    def read(split: str) -> Split:
        images_name, labels_name = IDX_FILES[split]
        images = _read_idx(_idx_path(folder, images_name), 3, source)
        labels = _read_idx(_idx_path(folder, labels_name), 1, source).astype(np.int64)
        if len(images) != len(labels) or (len(labels) and labels.max() >= CLASSES_PER_MEMBER):
            raise UserError(f"{folder} holds {len(images)} {split} images but {len(labels)} labels (or labels above 9);"
                            f" the files do not belong together, get them again from {source}")
        return ArrayImages(images), labels
    return read


def _read_svhn(root: Path) -> Callable[[str], Split]:
    def read(split: str) -> Split:
        from scipy.io import loadmat
        path = root / f"{split}_32x32.mat"
        try:
            entry = loadmat(path)
            images = np.ascontiguousarray(np.asarray(entry["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
            labels = np.asarray(entry["y"], dtype=np.int64).reshape(-1)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _unreadable(path, err, SVHN_URL + path.name) from err
        if len(images) != len(labels) or images.shape[1:] != (32, 32, 3):
            raise UserError(f"{path} holds images of shape {images.shape} and {len(labels)} labels; "
                            f"expected (N, 32, 32, 3) and N; get it again from {SVHN_URL + path.name}")
        labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10
        return ArrayImages(images), labels
    return read


def _read_cifar10(folder: Path) -> Callable[[str], Split]:
    def read(split: str) -> Split:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        batches = [read_cifar_pickle(folder / name, "labels", CIFAR10_URL) for name in names]
        images = np.ascontiguousarray(np.concatenate([images for images, _ in batches]))
        return ArrayImages(images), np.concatenate([labels for _, labels in batches])
    return read


def _read_notmnist(folder: Path) -> Callable[[str], Split]:
    """File names only; the images are decoded per item, not all held in RAM as the reference did."""
    def read(split: str) -> Split:
        split_folder = folder / ("Train" if split == "train" else "Test")
        relpaths, labels = [], []
        for label, letter in enumerate(NOTMNIST_LETTERS):
            letter_folder = split_folder / letter
            if not letter_folder.is_dir():
                raise UserError(f"notMNIST folder {letter_folder} is missing; extract notMNIST.zip from "
                                f"{NOTMNIST_URL} into {folder.parent}")
            names = sorted(e.name for e in os.scandir(letter_folder)
                           if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
            relpaths += [f"{letter}/{name}" for name in names]
            labels += [label] * len(names)
        return ImageFiles(split_folder, relpaths), np.array(labels, dtype=np.int64)
    return read


# ----------------------------------------------------------------------------------------------------------------
# Members: where they live, how to get them, how to read them
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Member:
    name: str
    expected: str                       # what the error message says to place where
    source: str
    present: Callable[[], bool]
    download: Callable[[Path], None]    # downloads into the folder given (a temporary one, see download_into)
    read: Callable[[str], Split]        # "train" / "test" -> (loader, 0-based labels)
    transforms: Callable[[int], tuple]  # input_size -> (train transform, test transform)


def _extract_notmnist_zip(archive: Path, root: Path) -> None:
    """Extract to a temporary folder and rename `notMNIST/` into place only when complete (the reference extracted only
    right after downloading, so a zip placed by hand was never used)."""
    tmp = Path(tempfile.mkdtemp(prefix=".notMNIST.extracting-", dir=root))
    try:
        try:
            with zipfile.ZipFile(archive) as handle:
                handle.extractall(tmp)  # zipfile drops absolute paths and `..` components itself
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise UserError(f"{archive} is not a readable zip ({type(err).__name__}: {err}); delete it and "
                            f"download it again from {NOTMNIST_URL}") from err
        if not (tmp / "notMNIST").is_dir():
            raise UserError(f"{archive} has no top-level notMNIST/ folder; get the zip from {NOTMNIST_URL}")
        if not (root / "notMNIST").exists():
            os.replace(tmp / "notMNIST", root / "notMNIST")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mnist_folder(root: Path, name: str) -> Path:
    # `MNIST_RGB/raw` is where the reference's MNIST subclass put the same files; accept it as a fallback
    for folder in (root / name / "raw", root / f"{name}_RGB" / "raw"):
        if _idx_complete(folder):
            return folder
    return root / name / "raw"


def _idx_complete(folder: Path) -> bool:
    return all(_idx_path(folder, f) for pair in IDX_FILES.values() for f in pair)


def _idx_present(root: Path, name: str) -> bool:
    return _idx_complete(_mnist_folder(root, name))


def _tv_download(cls_name: str) -> Callable[[Path], None]:
    """torchvision's download of both splits of one member."""
    def download(folder: Path) -> None:
        import torchvision.datasets as tvd
        for train in (True, False):
            if cls_name == "SVHN":
                tvd.SVHN(str(folder), split="train" if train else "test", download=True)
            else:
                getattr(tvd, cls_name)(str(folder), train=train, download=True)
    return download


def _notmnist_download(folder: Path) -> None:
    """The zip alone; it is extracted where it lands, like one placed by hand."""
    from torchvision.datasets.utils import download_url
    download_url(NOTMNIST_URL, str(folder), filename="notMNIST.zip")


def _unzip_notmnist(root: Path) -> None:
    if not (root / "notMNIST").is_dir() and (root / "notMNIST.zip").is_file():
        _extract_notmnist_zip(root / "notMNIST.zip", root)


def _members(root: Path) -> list[Member]:
    cifar_folder = root / "cifar-10-batches-py"
    notmnist_folder = root / "notMNIST"
    idx_names = " and ".join(f"{a}, {b}" for a, b in IDX_FILES.values())
    return [
        Member("SVHN", f"{root}/train_32x32.mat and {root}/test_32x32.mat", SVHN_URL,
               lambda: all((root / f"{s}_32x32.mat").is_file() for s in ("train", "test")),
               _tv_download("SVHN"), _read_svhn(root), default_transforms),
        Member("MNIST", f"{root / 'MNIST' / 'raw'}/ with {idx_names} (.gz or not)", MNIST_URL,
               lambda: _idx_present(root, "MNIST"), _tv_download("MNIST"),
               _mnist_like(_mnist_folder(root, "MNIST"), MNIST_URL),
               default_transforms),
        Member("CIFAR-10", f"{cifar_folder}/ with data_batch_1..5 and test_batch", CIFAR10_URL,
               lambda: all((cifar_folder / n).is_file() for n in [f"data_batch_{i}" for i in range(1, 6)]
                           + ["test_batch"]),
               _tv_download("CIFAR10"), _read_cifar10(cifar_folder), cifar_transforms),
        Member("notMNIST", f"{notmnist_folder}/Train/<A..J>/*.png and {notmnist_folder}/Test/<A..J>/*.png "
                           f"(or {root}/notMNIST.zip)", NOTMNIST_URL,
               lambda: (notmnist_folder / "Train").is_dir() and (notmnist_folder / "Test").is_dir(),
               _notmnist_download, _read_notmnist(notmnist_folder), default_transforms),
        Member("Fashion-MNIST", f"{root / 'FashionMNIST' / 'raw'}/ with {idx_names} (.gz or not)", FASHION_URL,
               lambda: _idx_present(root, "FashionMNIST"), _tv_download("FashionMNIST"),
               _mnist_like(_mnist_folder(root, "FashionMNIST"), FASHION_URL), default_transforms),
    ]


def _download(root: Path, member: Member) -> None:
    """One member, moved into `root` only once its download is complete (the members downloaded before it stay)."""
    try:
        download_into(root, member.download)
    except UserError:
        raise
    except Exception as err:  # network errors come in many types (URLError, socket errors, HTTP errors)
        raise UserError(f"5-datasets member {member.name} not found and its download from {member.source} "
                        f"failed ({type(err).__name__}); place {member.expected}") from err


def _ensure_present(root: Path, download: bool) -> None:
    """Unzip a hand-placed notMNIST.zip, download what is absent when allowed, else name the first missing member."""
    _unzip_notmnist(root)
    missing = [m for m in _members(root) if not m.present()]
    if missing and download:
        for member in missing:
            _download(root, member)
        _unzip_notmnist(root)
        missing = [m for m in _members(root) if not m.present()]
    if missing:
        first, others = missing[0], [m.name for m in missing[1:]]
        also = f" (also missing: {', '.join(others)})" if others else ""
        raise UserError(f"5-datasets member {first.name} not found: expected {first.expected}; "
                        f"get it from {first.source}{also}")


def load_five_datasets(data_path: str, input_size: int, download: bool = True) -> Benchmark:
    root = Path(data_path)
    prepare_once_per_node(root, lambda: _ensure_present(root, download), create=download)
    splits: dict[str, list[TransformedDataset]] = {"train": [], "train_eval": [], "test": []}
    for i, member in enumerate(_members(root)):
        train_tf, test_tf = member.transforms(input_size)
        offset = CLASSES_PER_MEMBER * i
        train_images, train_labels = member.read("train")
        test_images, test_labels = member.read("test")
        for labels in (train_labels, test_labels):
            if len(labels) and not 0 <= labels.min() <= labels.max() < CLASSES_PER_MEMBER:
                raise UserError(f"5-datasets member {member.name} has labels outside 0..9 in {member.expected}; "
                                f"get it again from {member.source}")
        splits["train"].append(TransformedDataset(train_images, train_labels + offset, train_tf))
        splits["train_eval"].append(TransformedDataset(train_images, train_labels + offset, test_tf))
        splits["test"].append(TransformedDataset(test_images, test_labels + offset, test_tf))
    train, train_eval, test = (ConcatDataset(splits[k]) for k in ("train", "train_eval", "test"))

    return Benchmark(
        name="5-datasets", num_classes=CLASSES_PER_MEMBER * len(splits["train"]),
        train=train, train_eval=train_eval, test=test,
        train_targets=np.concatenate([d.targets for d in splits["train"]]),
        test_targets=np.concatenate([d.targets for d in splits["test"]]),
    )

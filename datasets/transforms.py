"""The reference's image transforms, parametrised by the input size.

Test images are resized to input/0.875 (256 for 224) and centre-cropped, exactly as the reference does at 224.
"""
from __future__ import annotations

from torchvision import transforms as T

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def _test_transform(input_size: int, normalize: list) -> T.Compose:
    return T.Compose([
        T.Resize(int(round(input_size / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        *normalize,
    ])


def cifar_transforms(input_size: int) -> tuple[T.Compose, T.Compose]:
    """CIFAR: bicubic random-resized crop, flip, brightness jitter, CIFAR-100 normalisation."""
    normalize = [T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    train = T.Compose([
        T.RandomResizedCrop(input_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=63 / 255),
        T.ToTensor(),
        *normalize,
    ])
    return train, _test_transform(input_size, normalize)


def default_transforms(input_size: int) -> tuple[T.Compose, T.Compose]:
    """Every other benchmark: random-resized crop (scale 0.05-1), flip, inputs in [0, 1] without normalisation."""
    train = T.Compose([
        T.RandomResizedCrop(input_size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(0.5),
        T.ToTensor(),
    ])
    return train, _test_transform(input_size, [])

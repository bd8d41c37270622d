"""Benchmarks by their `--dataset` name, and the continual scenario built on top of them."""
from __future__ import annotations

from typing import Callable

from utils import UserError

from .base import Benchmark
from .cifar import load_cifar100
from .digits import load_digits
from .scenario import Scenario, build_scenario

# `--dataset` value -> loader(data_path, input_size, download) -> Benchmark
BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "Split-CIFAR100": load_cifar100,
    "Split-Digits": load_digits,
}


def load_benchmark(name: str, data_path: str, input_size: int, download: bool = True) -> Benchmark:
    if name not in BENCHMARKS:
        raise UserError(f"unknown --dataset {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](data_path, input_size, download=download)


__all__ = ["BENCHMARKS", "Benchmark", "Scenario", "build_scenario", "load_benchmark"]

"""Benchmarks by their `--dataset` name, and the continual scenario built on top of them."""
from __future__ import annotations

from collections.abc import Callable

from utils import UserError

from .base import Benchmark
from .cifar import load_cifar100
from .core50 import TRAIN_SESSIONS, load_core50
from .cub import load_cub200
from .digits import NUM_DOMAINS, load_digits, load_digits_domains
from .five_datasets import load_five_datasets
from .imagenet_r import load_imagenet_r
from .scenario import Scenario, build_scenario
from .stanford_cars import load_cars196

# `--dataset` value -> loader(data_path, input_size, download) -> Benchmark
BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "Split-CIFAR100": load_cifar100,
    "Split-Digits": load_digits,
    "Split-Imagenet-R": load_imagenet_r,
    "Split-CUB200": load_cub200,
    "Split-Cars196": load_cars196,
    "5-datasets": load_five_datasets,
    "CORe50": load_core50,
    "Digits-Domains": load_digits_domains,
}


# the domain-incremental benchmarks and their domains (one task each)
DOMAINS: dict[str, int] = {"CORe50": len(TRAIN_SESSIONS), "Digits-Domains": NUM_DOMAINS}


def check_domains(dataset: str, num_tasks: int) -> None:
    """Before any data is read: a domain-incremental run needs a benchmark with domains, one task per domain."""
    if dataset not in DOMAINS:
        raise UserError(f"{dataset} has no domains, so it cannot run the domain-incremental scenario; domain-"
                        f"incremental runs: core50_<method>, digitsdomain_<method>")
    if num_tasks != DOMAINS[dataset]:
        raise UserError(f"--num_tasks {num_tasks}: {dataset} has {DOMAINS[dataset]} domains, one task each; drop "
                        f"--num_tasks")


def load_benchmark(name: str, data_path: str, input_size: int, download: bool = True) -> Benchmark:
    if name not in BENCHMARKS:
        raise UserError(f"unknown --dataset {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](data_path, input_size, download=download)


__all__ = ["BENCHMARKS", "Benchmark", "Scenario", "build_scenario", "load_benchmark"]

"""A training step never waits for the device: no call that copies a value to the host (or sizes its output by the
data) in the forward and backward of any method. Each one stalls a GPU step until the queued kernels have run."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from config.cli import parse_args
from datasets import build_scenario
from datasets.few_shot import build_upstream_scenario
from datasets.scenario import Scenario
from models import METHODS, ContinualMethod, create_method
from models.hide import HiDeMethod

# each of these waits for the device: to read a value, or to know how big its result is
SYNCING = {"item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy", "unique",
           "unique_consecutive", "nonzero", "argwhere", "masked_select", "bincount"}
# flags that reach the code paths a preset leaves off (prompt momentum, the contrastive term)
EXTRA_FLAGS = {"hideprompt": ["--prompt_momentum", "0.1", "--reg", "0.1"], "hidelora": ["--reg", "0.1"]}


def _has_bool_tensor(index: Any) -> bool:
    parts = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


class HostSyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for the device, by name (`[mask]`: indexing with a bool tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls[name] += 1
        elif name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_tensor(args[1]):
            self.calls[f"{name}[mask]"] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_each_kind_of_sync():
    x = torch.randn(6)
    with HostSyncCounter() as counter:
        x.sum().item(), int(x[0]), float(x[1]), bool(x[2] > 0), x.tolist(), x.cpu(), x.numpy()
        torch.unique(x), x.nonzero(), x[x > 0], torch.bincount(torch.tensor([1, 2]))
        if x[3] > 0:
            pass
    assert counter.calls == {"item": 1, "__int__": 1, "__float__": 1, "__bool__": 2, "tolist": 1, "cpu": 1,
                             "numpy": 1, "unique": 1, "nonzero": 1, "__getitem__[mask]": 1, "bincount": 1}


def _method(name: str) -> tuple[ContinualMethod, Scenario]:
    cfg = parse_args([f"digits_{name}", "--device", "cpu", "--batch-size", "4", *EXTRA_FLAGS.get(name, [])])
    if name == "few_shot_lora":
        scenario = build_upstream_scenario(list(cfg.continual_classes_per_dataset), list(cfg.tasks_per_dataset),
                                           False, cfg.seed, list(cfg.datasets))
    else:
        scenario = build_scenario(cfg.num_classes, cfg.num_tasks, False, cfg.seed, cfg.dataset)
    torch.manual_seed(0)
    return create_method(cfg, scenario), scenario


def _with_class_statistics(method: HiDeMethod, classes: list[int]) -> None:
    """Statistics of the earlier task's classes, so the contrastive term has prototypes to contrast with."""
    for stats in (method.tii_stats, getattr(method, "wtp_stats", None)):
        if stats is not None:
            stats.mean[classes] = torch.randn_like(stats.mean[classes])
            stats.present[classes, 0] = True


# nearest class mean takes no gradient step: it has no training step to check
TRAINING_METHODS = [name for name, method in METHODS.items() if method.trains]


@pytest.mark.parametrize("name", TRAINING_METHODS)
def test_a_training_step_of_every_method_never_waits_for_the_device(name):
    method, scenario = _method(name)
    if isinstance(method, HiDeMethod):
        _with_class_statistics(method, scenario.task_classes[0])
    images = torch.randn(4, 3, 32, 32)
    # the first task and a later one where there is one (momentum, prototypes, a frozen backbone)
    for task in sorted({0, min(1, scenario.num_tasks - 1)}):
        targets = torch.tensor(scenario.task_classes[task]).repeat(4)[:4]
        for phase in method.phases:
            method.set_phase(phase)
            method.begin_task(task)
            method.train()
            with HostSyncCounter() as counter:
                loss, logits = method(images, targets, task)
                loss.backward()
            assert logits.shape == (4, scenario.num_classes) and loss.isfinite()
            assert counter.calls == {}, f"{name} task {task} phase {phase}: {dict(counter.calls)}"

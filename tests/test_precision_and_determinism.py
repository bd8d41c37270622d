"""`--amp auto` asks about the GPU each rank will use without touching CUDA."""
from __future__ import annotations

import pytest
import torch

import utils

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _forbidden(*_args, **_kwargs):
    raise AssertionError("resolve_amp made a CUDA context or a tensor on a GPU")


@pytest.fixture
def fake_gpus(monkeypatch):
    """CUDA with `count` visible GPUs of compute capability `capability`; returns the indices asked about. Anything
    that would create a context or a tensor on a GPU fails the test."""
    asked: list[int] = []
    state = {"count": 8, "capability": (8, 0)}

    def capability(index: int) -> tuple[int, int]:
        asked.append(index)
        return state["capability"]

    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    for name in ("is_bf16_supported", "set_device", "current_device", "init", "_lazy_init", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, _forbidden)
    return asked, state


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), "none"), ((7, 5), "none"), ((8, 0), "bf16"),
                                                      ((9, 0), "bf16")])
def test_auto_amp_is_bf16_only_where_the_gpu_has_it_natively(fake_gpus, capability, expected):
    asked, state = fake_gpus
    state["capability"] = capability
    assert utils.resolve_amp("auto", "cuda") == expected
    assert utils.resolve_amp("auto", "auto") == expected
    assert asked == [0, 0]  # a plain process runs on cuda:0


def test_auto_amp_asks_about_the_gpu_of_this_rank(fake_gpus, monkeypatch):
    asked, state = fake_gpus
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert utils.resolve_amp("auto", "cuda") == "bf16"
    state["count"] = 1  # one GPU per task: each rank sees its own as cuda:0
    assert utils.resolve_amp("auto", "cuda") == "bf16"
    assert utils.resolve_amp("auto", "cuda:5") == "bf16"  # an explicit index is used as given
    assert asked == [3, 0, 5]


def test_auto_amp_reads_the_local_rank_of_srun_and_of_the_legacy_launcher(fake_gpus, monkeypatch):
    asked, state = fake_gpus
    state["count"] = 4
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "14")
    monkeypatch.setenv("SLURM_LOCALID", "6")
    utils.resolve_amp("auto", "cuda")
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    utils.resolve_amp("auto", "cuda", local_rank_arg=1)  # torch.distributed.launch without --use_env
    assert asked == [2, 1]


def test_explicit_amp_and_cpu_ask_no_gpu(fake_gpus, monkeypatch):
    asked, _ = fake_gpus
    assert utils.resolve_amp("fp16", "cuda") == "fp16" and utils.resolve_amp("none", "auto") == "none"
    for native in (True, False):
        monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda native=native: native)
        assert utils.resolve_amp("auto", "cpu") == ("bf16" if native else "none")
    assert asked == []


def test_auto_amp_without_a_visible_gpu_is_fp32_and_leaves_the_error_to_the_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", _forbidden)
    assert utils.resolve_amp("auto", "cuda") == "none"


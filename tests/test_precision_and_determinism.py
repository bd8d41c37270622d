"""`--amp auto` asks about the GPU each rank will use without touching CUDA; `--deterministic` switches torch to
deterministic kernels before the run does anything on a device."""
from __future__ import annotations

import os

import pytest
import torch

import utils
from conftest import TINY, run_main

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


@pytest.fixture
def restore_determinism():
    """Deterministic mode is process-wide: put back what the test found."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    yield
    enabled, warn_only, benchmark, deterministic, workspace = before
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def test_deterministic_is_off_by_default_and_changes_nothing(restore_determinism):
    torch.use_deterministic_algorithms(False)
    utils.use_deterministic_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_deterministic_keeps_a_workspace_the_user_set(restore_determinism):
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    utils.use_deterministic_algorithms(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
def test_deterministic_flag_applies_before_the_run_and_in_the_few_shot_flow(tmp_path, restore_determinism):
    torch.use_deterministic_algorithms(False)
    assert run_main("digits_ncm", *TINY, "--deterministic", "--output_dir", str(tmp_path / "ncm")) == 0
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"

    torch.use_deterministic_algorithms(False)
    assert run_main("digits_few_shot_lora", *TINY, "--deterministic", "--train_vanilla", "--epochs", "0",
                    "--output_dir", str(tmp_path / "fs")) == 0
    assert torch.are_deterministic_algorithms_enabled()

"""The provenance in results.json and eval_results.json: git state, versions, devices, hosts, command, launcher,
times and peak memory, one entry per launch (a --resume appends, never overwrites), and the per-task timings."""
from __future__ import annotations

import datetime
import json
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torchvision

import engine
import provenance
from config.cli import parse_args
from conftest import REPO, read_json, run_cli, run_main

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
LAUNCH_FIELDS = ["start_time", "end_time", "wall_seconds", "command", "hostname", "world_size", "first_task",
                 "last_task"]
FAST = ["--device", "cpu", "--epochs", "1", "--num_tasks", "2"]


def _seconds(iso: str) -> datetime.datetime:
    return datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")


def test_git_state_is_this_checkout_and_none_elsewhere(tmp_path, monkeypatch):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    commit, dirty = provenance.git_state(REPO)
    assert commit == head and re.fullmatch(r"[0-9a-f]{40}", commit) and isinstance(dirty, bool)
    assert provenance.git_state(tmp_path) == (None, None)  # not a checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "inner").mkdir()
    assert provenance.git_state(tmp_path / "inner") == (None, None)  # inside another repository: not its commit

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert provenance.git_state(REPO) == (None, None)


def test_git_dirty_tells_uncommitted_changes_to_tracked_files(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    (tmp_path / "untracked.txt").write_text("not code")
    assert provenance.git_state(tmp_path)[1] is False  # untracked files are no change to the code
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_state(tmp_path)[1] is True


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "single"),
    ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, "torchrun"),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4"}, "srun"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "single"),  # a plain process inside an allocation
])
def test_launcher_is_read_from_the_environment(monkeypatch, env, expected):
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert provenance.launcher() == expected


def test_times_are_utc_iso_seconds():
    assert provenance.utc_time(0) == "1970-01-01T00:00:00Z"
    assert provenance.utc_time(1796109123.9) == "2026-12-01T07:12:03Z"


def test_a_continued_record_keeps_the_earlier_launches_and_sums_their_time(monkeypatch):
    cfg = parse_args(["digits_linear", "--device", "cpu", "--batch-size", "8"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "main.py", "digits_linear", "--output_dir", "a b"])
    record = provenance.Provenance(cfg, torch.device("cpu"))
    earlier = {"start_time": "2026-01-01T00:00:00Z", "end_time": "2026-01-01T01:00:00Z", "wall_seconds": 3600.0,
               "command": "python main.py x", "hostname": "n1", "world_size": 1, "first_task": 1, "last_task": 3}
    record.continue_from({"launches": [earlier], "peak_memory_bytes": 2**50, "peak_memory_kind": "rss"})
    record.update(3)
    record.update(4)
    out = record.as_dict()
    assert out["launches"][0] == earlier and list(out["launches"][1]) == LAUNCH_FIELDS
    mine = out["launches"][1]
    assert (mine["first_task"], mine["last_task"]) == (4, 5)
    assert mine["command"] == out["command"] == "python main.py digits_linear --output_dir 'a b'"
    assert out["start_time"] == earlier["start_time"] and out["end_time"] == mine["end_time"]
    assert out["wall_seconds"] == pytest.approx(3600.0 + mine["wall_seconds"])
    assert out["peak_memory_bytes"] == 2**50  # the most over the launches
    assert (out["batch_size"], out["global_batch_size"], out["world_size"]) == (8, 8, 1)
    assert out["effective_lr"] == pytest.approx(0.3 * 8 / 256)


def _check_provenance(p: dict, commands: list[str], tasks: list[tuple[int, int]]) -> None:
    assert p["torch"] == torch.__version__ and p["torchvision"] == torchvision.__version__
    assert p["timm"] == timm.__version__ and p["numpy"] == np.__version__
    assert p["python"] == ".".join(map(str, sys.version_info[:3]))
    commit, dirty = provenance.git_state(REPO)
    assert p["git_commit"] == commit and re.fullmatch(r"[0-9a-f]{40}", p["git_commit"]) and p["git_dirty"] is dirty
    assert p["device_type"] == "cpu" and p["device_names"] == [provenance.cpu_model()] and p["device_count"] == 1
    assert p["hostnames"] == [p["hostname"]] and p["launcher"] == "single" and p["world_size"] == 1
    assert isinstance(p["peak_memory_bytes"], int) and 50 * 2**20 < p["peak_memory_bytes"] < 64 * 2**30
    assert p["peak_memory_kind"] == "rss"
    launches = p["launches"]
    assert [entry["command"] for entry in launches] == commands
    assert [(entry["first_task"], entry["last_task"]) for entry in launches] == tasks
    for entry in launches:
        assert list(entry) == LAUNCH_FIELDS and ISO.match(entry["start_time"]) and ISO.match(entry["end_time"])
        assert _seconds(entry["start_time"]) <= _seconds(entry["end_time"])
        assert isinstance(entry["wall_seconds"], float) and 0 < entry["wall_seconds"] < 600
    assert p["start_time"] == launches[0]["start_time"] and p["end_time"] == launches[-1]["end_time"]
    assert p["wall_seconds"] == pytest.approx(sum(entry["wall_seconds"] for entry in launches))


@pytest.mark.slow
def test_results_record_every_launch_and_the_task_timings(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = ["digits_linear", "--output_dir", str(out), *FAST, "--stop_after_task", "1"]
    monkeypatch.setattr(sys, "orig_argv", ["python", "main.py", *first])
    assert run_main(*first) == 0
    before = read_json(out / "results.json")["provenance"]
    _check_provenance(before, [shlex.join(["python", "main.py", *first])], [(1, 1)])

    second = ["digits_linear", "--output_dir", str(out), *FAST, "--resume"]
    monkeypatch.setattr(sys, "orig_argv", ["python", "main.py", *second])
    assert run_main(*second) == 0
    results = read_json(out / "results.json")
    after = results["provenance"]
    _check_provenance(after, [shlex.join(["python", "main.py", *args]) for args in (first, second)], [(1, 1), (2, 2)])
    assert after["launches"][0] == before["launches"][0]  # the resume added its launch, changed nothing of the first
    assert after["launches"][0]["end_time"] <= after["launches"][1]["start_time"]
    for task in results["tasks"]:
        parts = task["phase_seconds"]["train"]
        assert set(task["phase_seconds"]) == {"train"} and set(parts) == {"train", "statistics", "evaluate"}
        assert all(isinstance(v, float) and v >= 0 for v in parts.values())
        assert parts["train"] >= task["train_seconds"]  # the epochs, and the set-up around them
        assert sum(parts.values()) <= task["wall_seconds"] < after["wall_seconds"]

    evaluate = ["digits_linear", "--output_dir", str(out), *FAST, "--eval"]
    monkeypatch.setattr(sys, "orig_argv", ["python", "main.py", *evaluate])
    assert run_main(*evaluate) == 0
    evaluated = read_json(out / "eval_results.json")
    _check_provenance(evaluated["provenance"], [shlex.join(["python", "main.py", *evaluate])], [(1, 2)])
    for task in evaluated["tasks"]:
        assert task["phase_seconds"] == {"train": {"evaluate": task["eval_seconds"]}}
        assert task["eval_seconds"] <= task["wall_seconds"]


class Killed(BaseException):
    """Stands for a SIGKILL: nothing of the run's own handling runs."""


@pytest.mark.slow
def test_a_task_resumed_from_its_rolling_state_counts_the_earlier_launch_s_time(tmp_path, monkeypatch):
    """HiDe-Prompt in one launch, killed in the second epoch of phase wtp: the resume's timings of task 1 hold phase
    tii as the killed launch measured it and the wtp epoch it finished."""
    out = tmp_path / "run"
    args = ["digits_hideprompt", "--output_dir", str(out), *FAST, "--epochs", "2", "--tii_epochs", "1",
            "--crct_epochs", "2", "--stop_after_task", "1", "--tensorboard", "False"]
    real, wtp_epochs = engine.train_one_epoch, []

    def killed_in_wtp_epoch_2(*a, **kw):
        wtp_epochs.extend(["wtp"] if a[-1] == "wtp" else [])
        if len(wtp_epochs) == 2:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_wtp_epoch_2)
    with pytest.raises(Killed):
        run_main(*args)
    monkeypatch.setattr(engine, "train_one_epoch", real)
    assert not (out / "results.json").exists()
    state = torch.load(out / "checkpoint" / "rolling_state.pth", weights_only=False)
    assert (state["phase"], state["epoch"]) == ("wtp", 1) and set(state["seconds"]) == {"tii"}
    assert run_main(*args, "--resume") == 0
    results = read_json(out / "results.json")
    task = results["tasks"][0]
    assert task["phase_seconds"]["tii"] == state["seconds"]["tii"]  # measured by the killed launch
    assert task["phase_seconds"]["wtp"]["train"] > state["train"]["seconds"]  # its epoch 1, and epoch 2 now
    parts = sum(sum(phase.values()) for phase in task["phase_seconds"].values())
    assert parts <= task["wall_seconds"]
    assert task["wall_seconds"] - parts < sum(state["seconds"]["tii"].values())  # tii counted once, not twice
    launches = results["provenance"]["launches"]  # the killed launch wrote no results: not on record
    assert len(launches) == 1 and (launches[0]["first_task"], launches[0]["last_task"]) == (1, 1)


def test_the_provenance_holds_plain_json_types():
    """Each field has the JSON type the report reads (no numpy or torch scalars, no tuples)."""
    cfg = parse_args(["digits_linear", "--device", "cpu"])
    record = provenance.Provenance(cfg, torch.device("cpu"))
    record.update(0)
    out = json.loads(json.dumps(record.as_dict()))
    types = {"git_commit": str, "git_dirty": bool, "python": str, "torch": str, "torchvision": str, "timm": str,
             "numpy": str, "device_type": str, "device_names": list, "device_count": int, "world_size": int,
             "batch_size": int, "global_batch_size": int, "effective_lr": float, "hostname": str, "hostnames": list,
             "command": str, "launcher": str, "start_time": str, "end_time": str, "wall_seconds": float,
             "peak_memory_bytes": int, "peak_memory_kind": str, "launches": list}
    assert set(out) == set(types)
    assert {key: type(out[key]) for key in types} == types


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_are_gathered_into_one_record(tmp_path):
    out = tmp_path / "run"
    args = ["digits_linear", "--output_dir", str(out), *FAST, "--batch-size", "8"]
    done = run_cli(args, nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    p = read_json(out / "results.json")["provenance"]
    assert (p["launcher"], p["world_size"], p["batch_size"], p["global_batch_size"]) == ("torchrun", 2, 8, 16)
    assert p["device_count"] == 1 and p["hostnames"] == [p["hostname"]]  # one host's CPU, however many processes
    assert p["command"] == shlex.join([sys.executable, "-u", "main.py", *args])  # the worker's, as torchrun started it
    assert [(e["first_task"], e["last_task"], e["world_size"]) for e in p["launches"]] == [(1, 2, 2)]

"""Epoch-level resume, preemption and the divergence guard: a run killed or preempted anywhere ends, once resumed,
bit-identical to a run that was never stopped (results apart from timings, every saved tensor); a non-finite value
stops the run in one line before anything holding it is saved."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import models.hide
import preemption
from conftest import REPO, free_port, read_json, run_main
from divergence import Diverged, LossWatch, check_tensors

# HiDe-Prompt in one launch: two phases per task, statistics and task-adaptive prediction in both
HIDE = ["digits_hideprompt", "--device", "cpu", "--epochs", "2", "--tii_epochs", "1", "--crct_epochs", "2",
        "--stop_after_task", "2", "--print_freq", "4"]
ROLLING = "rolling_state.pth"


def _untimed(obj):
    """A results file without what differs between identical runs: timings, the folder it was written to and the
    provenance (times, command lines, launches)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if "second" not in k and k not in ("output_dir", "provenance")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_run(expected: Path, resumed: Path) -> None:
    assert _untimed(read_json(resumed / "results.json")) == _untimed(read_json(expected / "results.json"))
    names = sorted(p.name for p in (expected / "checkpoint").iterdir())
    assert sorted(p.name for p in (resumed / "checkpoint").iterdir()) == names  # the rolling state is gone
    for name in names:
        mine = torch.load(resumed / "checkpoint" / name, weights_only=False)
        theirs = torch.load(expected / "checkpoint" / name, weights_only=False)
        assert _equal(mine["model"], theirs["model"]), name
        assert _equal(mine["optimizers"], theirs["optimizers"]), name


def _launch(args: list[str], nproc: int = 0) -> subprocess.Popen:
    # a single process gets this process's threads, so that it computes exactly what the in-process runs compute
    threads = "1" if nproc else str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc else [sys.executable]
    return subprocess.Popen([*launcher, "main.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(process: subprocess.Popen, lines: list[str] | None = None) -> tuple[int, str]:
    rest, _ = process.communicate(timeout=300)
    return process.returncode, "".join(lines or []) + rest


def _run(args: list[str], nproc: int = 0) -> tuple[int, str]:
    return _finish(_launch(args, nproc))


def _run_until(args: list[str], line: str, signum: int, nproc: int = 0, tree: bool = False) -> tuple[int, str]:
    """Launch, send `signum` (to the launcher, or with `tree` to it and its workers, which torchrun starts in sessions
    of their own) once `line` is printed, wait for the end."""
    process, seen = _launch(args, nproc), []
    for text in process.stdout:
        seen.append(text)
        if line in text:
            workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
            for pid in [process.pid, *map(int, workers)] if tree else [process.pid]:
                os.kill(pid, signum)
            break
    return _finish(process, seen)


# ----------------------------------------------------------------------------------------------------------------
# In-process: a failure at a chosen point, then --resume
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert run_main(*HIDE, "--output_dir", str(out)) == 0
    return out


class Killed(BaseException):
    """Stands for a SIGKILL: nothing of the run's own handling runs (not an Exception)."""


@pytest.mark.slow
def test_a_kill_inside_task_adaptive_prediction_redoes_it_from_the_state_after_training(uninterrupted, tmp_path,
                                                                                          monkeypatch):
    out, calls = tmp_path / "out", []
    real = models.hide.task_adaptive_prediction

    def killed_in_task2_wtp(*args, **kwargs):
        calls.append(kwargs["where"])
        if kwargs["where"] == "task 2 phase wtp":
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(models.hide, "task_adaptive_prediction", killed_in_task2_wtp)
    with pytest.raises(Killed):
        run_main(*HIDE, "--output_dir", str(out))
    state = torch.load(out / "checkpoint" / ROLLING, weights_only=False)
    assert (state["task"], state["phase"], state["epoch"]) == (1, "wtp", 2)  # after training, before statistics
    assert set(state["phases"]) == {"tii", "tii_pre_alignment"}
    monkeypatch.setattr(models.hide, "task_adaptive_prediction", real)
    assert run_main(*HIDE, "--output_dir", str(out), "--resume") == 0
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_a_preemption_between_the_parts_of_a_task_stops_at_once_and_resumes_identically(uninterrupted, tmp_path,
                                                                                          capsys, monkeypatch):
    out = tmp_path / "out"
    real, evaluations = engine.evaluate, []

    def preempted_during_the_third_evaluation(*args, **kwargs):
        evaluations.append(args[2])
        if len(evaluations) == 3:  # task 2's first: its tii phase, before alignment
            preemption.request("SIGTERM")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", preempted_during_the_third_evaluation)
    capsys.readouterr()
    assert run_main(*HIDE, "--output_dir", str(out)) == preemption.EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert err == ("preempted at task 2 phase tii after its evaluation (SIGTERM); task 2 continues after epoch 1 of "
                   "phase tii: continue with --resume")
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [ROLLING, "task1_checkpoint.pth"]
    monkeypatch.setattr(engine, "evaluate", real)
    assert run_main(*HIDE, "--output_dir", str(out), "--resume") == 0
    assert_same_run(uninterrupted, out)
    assert read_json(out / "results.json")["config"]["run"]["resume"] is False  # the run's own configuration


@pytest.mark.slow
def test_a_resume_may_not_change_what_the_rolling_state_was_trained_with(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        run_main(*HIDE, "--output_dir", str(out))
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [ROLLING]
    before = (out / "checkpoint" / ROLLING).read_bytes()
    capsys.readouterr()
    assert run_main(*HIDE, "--output_dir", str(out), "--resume", "--tii_lr", "0.02") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume would continue") and "tii_lr: 0.01 there, 0.02 here" in err
    assert (out / "checkpoint" / ROLLING).read_bytes() == before


# ----------------------------------------------------------------------------------------------------------------
# Real signals: single process and torchrun x 2 (gloo)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "out"
    code, _ = _run_until([*HIDE, "--output_dir", str(out)], "task 2 epoch 2/2 step 8/16", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [ROLLING, "task1_checkpoint.pth"]
    code, log = _run([*HIDE, "--output_dir", str(out), "--resume"])
    assert code == 0 and "resuming task 2 from" in log
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_sigterm_and_sigkill_mid_epoch_then_resume_equal_an_uninterrupted_run(tmp_path):
    expected, preempted, killed = tmp_path / "expected", tmp_path / "preempted", tmp_path / "killed"
    assert _run([*HIDE, "--output_dir", str(expected)], nproc=2)[0] == 0
    # SIGTERM to the torchrun agent: it forwards it, both workers stop at the same step and say where, once
    code, log = _run_until([*HIDE, "--output_dir", str(preempted)], "task 2 epoch 2/2 step 4/8", signal.SIGTERM,
                           nproc=2)
    assert code != 0
    lines = [line for line in log.splitlines() if line.startswith("preempted at ")]
    assert len(lines) == 1 and "(SIGTERM)" in lines[0] and lines[0].endswith("continue with --resume")
    # SIGKILL to everything, mid-epoch
    code, log = _run_until([*HIDE, "--output_dir", str(killed)], "task 2 epoch 1/2 step 4/8", signal.SIGKILL, nproc=2,
                           tree=True)
    assert code == -signal.SIGKILL and "preempted at" not in log  # no process lived on to say anything
    for out in (preempted, killed):
        assert (out / "checkpoint" / ROLLING).is_file()
        code, log = _run([*HIDE, "--output_dir", str(out), "--resume"], nproc=2)
        assert code == 0 and "resuming task 2 from" in log
        assert_same_run(expected, out)


def _running(pid: str) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for whoever adopted it, maybe for long)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.distributed
def test_workers_stop_within_seconds_when_their_launcher_dies(tmp_path):
    out = tmp_path / "out"
    process = _launch(["digits_linear", "--device", "cpu", "--epochs", "200", "--output_dir", str(out)], nproc=2)
    seen = []
    for text in process.stdout:
        seen.append(text)
        if "task 1 epoch 2/200" in text:
            break
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    process.kill()  # SIGKILL to the agent alone: it forwards nothing
    killed_at = time.monotonic()
    rest, _ = process.communicate(timeout=60)
    while any(map(_running, workers)) and time.monotonic() - killed_at < 30:
        time.sleep(0.2)
    took = time.monotonic() - killed_at
    assert not any(map(_running, workers)) and took < preemption.ORPHAN_GRACE_SECONDS + 3, (took, rest[-2000:])
    # the workers' own line (their stdout is the dead agent's pipe, which the test still reads)
    assert "the launcher (PID" in rest and "died" in rest, rest[-2000:]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    time.sleep(1)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files  # nothing writes on


# ----------------------------------------------------------------------------------------------------------------
# The divergence guard
# ----------------------------------------------------------------------------------------------------------------
def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


@pytest.mark.slow
def test_a_nan_in_task_adaptive_prediction_stops_the_run_before_it_is_saved(tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_main(*HIDE, "--output_dir", str(out), "--ca_lr", "1e30") == 2
    assert _one_error_line(capsys) == ("error: the task-adaptive-prediction loss became nan at task 2 phase tii, "
                                       "alignment epoch 1/2; lower --ca_lr")
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [ROLLING, "task1_checkpoint.pth"]
    assert read_json(out / "results.json")["completed_tasks"] == 1
    for name in (ROLLING, "task1_checkpoint.pth"):  # what was saved holds finite values only
        check_tensors(torch.load(out / "checkpoint" / name, weights_only=False)["model"], name, "")


def test_a_nan_in_training_stops_every_rank_before_anything_is_saved(tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_main(*HIDE, "--output_dir", str(out), "--lr", "1e30") == 2
    err = _one_error_line(capsys)
    assert err.startswith("error: the training loss became nan at task 1 phase wtp epoch 1/2 step ")
    assert err.endswith("; lower --lr, or use --amp none")
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [ROLLING]
    state = torch.load(out / "checkpoint" / ROLLING, weights_only=False)
    assert (state["task"], state["phase"], state["epoch"]) == (0, "tii", 1)  # the last good state: before the NaN
    check_tensors(state["model"], ROLLING, "")


def test_an_exploding_loss_warns_once_per_task_phase_naming_its_flag(tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    args = [*HIDE, "--output_dir", str(out), "--lr", "1e6", "--tii_lr", "1e6", "--epochs", "1", "--tii_epochs", "1",
            "--stop_after_task", "1"]
    assert run_main(*args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "probably diverging" in line]
    assert len(warnings) == 2
    assert "(task 1 phase tii epoch 1/1 step" in warnings[0] and warnings[0].endswith("lower --tii_lr, or use --amp "
                                                                                      "none")
    assert "(task 1 phase wtp epoch 1/1 step" in warnings[1] and "lower --lr," in warnings[1]


def test_check_tensors_names_the_first_non_finite_tensor_and_counts_the_others():
    good = {"head.weight": torch.ones(2, 2), "steps": torch.tensor([3])}
    check_tensors(good, "task 1", "lower --lr")
    bad = {**good, "stats.mean": torch.tensor([1.0, float("nan")]), "stats.var": torch.tensor([float("inf")])}
    with pytest.raises(Diverged) as err:
        check_tensors(bad, "task 3 phase wtp: its class statistics", "lower --lr")
    assert str(err.value) == ("task 3 phase wtp: its class statistics: stats.mean holds NaN or inf (and 1 more "
                              "tensors); nothing was saved from it; lower --lr")


def test_loss_watch_warns_once_past_the_growth_factor(capsys):
    watch = LossWatch("training", "lower --lr")
    for loss in (2.0, 150.0, 199.0, 201.0, 5000.0):
        watch.update(loss, f"step {loss}")
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == ["warning: the training loss grew from 2 to 201 (step 201.0): the run is probably diverging; "
                        "lower --lr"]



def test_a_worker_whose_launcher_died_before_it_started_stops_at_once(tmp_path, capsys):
    """Under torchrun a worker watches its launcher; one whose parent is already no launcher (it died while the worker
    imported torch) stops at its first safe point."""
    out = tmp_path / "out"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "main.py", "digits_linear", "--device", "cpu", "--output_dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == preemption.EXIT_CODE
    assert done.stderr.strip().splitlines()[-1] == (
        f"preempted at task 1 before training (the launcher (PID {os.getpid()}) died); no task is finished yet: "
        f"continue with --resume")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]
    assert preemption.is_launcher(os.getpid()) is False
    # stopped before any epoch ended: the resume still keeps to the settings the run started with
    config = (out / "config.json").read_text()
    capsys.readouterr()
    assert run_main("digits_linear", "--device", "cpu", "--output_dir", str(out), "--resume", "--lr", "0.5") == 2
    assert "lr: 0.3 there, 0.5 here" in capsys.readouterr().err
    assert run_main("digits_linear", "--device", "cpu", "--output_dir", str(out), "--resume", "--epochs", "1",
                    "--stop_after_task", "1") == 2
    assert run_main("digits_linear", "--device", "cpu", "--output_dir", str(out), "--resume", "--stop_after_task",
                    "1") == 0
    assert (out / "config.json").read_text() == config
    assert read_json(out / "results.json")["config"] == json.loads(config)

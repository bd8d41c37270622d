"""What a new user meets first: output folders that hold other runs' folders, --resume with nothing to resume,
refusals that name the run a folder holds and a free folder to use instead."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, fails_with_one_line, folder_snapshot, read_json, run_cli, run_main
from run_files import held_run, run_folder_for

FAST = [*TINY, "--epochs", "1", "--num_tasks", "2", "--batch-size", "16"]


def test_a_run_folder_of_its_own_gets_a_suffix_when_taken_and_resume_takes_the_last(tmp_path):
    parent = str(tmp_path / "output")
    assert run_folder_for("digits_l2p", 42, parent=parent) == f"{parent}/digits_l2p_seed42"
    assert run_folder_for("digits_l2p", 42, resuming=True, parent=parent) == f"{parent}/digits_l2p_seed42"
    for name in ("digits_l2p_seed42", "digits_l2p_seed42_2"):
        (tmp_path / "output" / name).mkdir(parents=True)
        (tmp_path / "output" / name / "config.json").write_text('{"subcommand": "digits_l2p", "seed": 42}')
    (tmp_path / "output" / "digits_l2p_seed7").mkdir()  # another seed's folder, empty: no run
    assert run_folder_for("digits_l2p", 42, parent=parent) == f"{parent}/digits_l2p_seed42_3"
    assert run_folder_for("digits_l2p", 42, resuming=True, parent=parent) == f"{parent}/digits_l2p_seed42_2"
    assert run_folder_for("digits_l2p", 7, parent=parent) == f"{parent}/digits_l2p_seed7"
    assert held_run(tmp_path / "output") is None  # holds runs' folders, not a run
    assert held_run(tmp_path / "output" / "digits_l2p_seed42") == "a run of digits_l2p (seed 42)"


@pytest.mark.slow
def test_a_folder_holding_only_other_runs_folders_is_a_valid_output_dir(tmp_path):
    out = tmp_path / "output"
    (out / "demo" / "ncm_seed42").mkdir(parents=True)
    (out / "demo" / "ncm_seed42" / "results.json").write_text("{}")
    before = folder_snapshot(out / "demo")
    assert run_main("digits_linear", "--output_dir", str(out), *FAST) == 0
    assert read_json(out / "results.json")["completed_tasks"] == 2
    assert folder_snapshot(out / "demo") == before


@pytest.mark.slow
def test_resume_with_nothing_to_resume_says_so_and_starts_at_task_1(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert run_main("digits_linear", "--output_dir", str(out), *FAST, "--resume") == 0
    err = capsys.readouterr().err
    assert f"warning: --resume: {out} holds no run to resume; the run starts at task 1" in err
    assert read_json(out / "results.json")["completed_tasks"] == 2


@pytest.mark.slow
def test_a_folder_holding_another_run_is_refused_naming_that_run_and_a_free_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "output"
    assert run_main("digits_linear", "--output_dir", str(out), *FAST, "--stop_after_task", "1", "--seed", "3") == 0
    before = folder_snapshot(out)
    err = fails_with_one_line(capsys, "digits_l2p", "--output_dir", str(out), *FAST)
    assert err == (f"error: --output_dir {out} holds a run of digits_linear (seed 3, 1/2 tasks done); pass --resume "
                   f"to continue it, or choose another folder, e.g. output/digits_l2p_seed42")
    assert folder_snapshot(out) == before


@pytest.mark.slow
def test_run_sh_sets_up_once_and_again_only_when_the_requirements_change(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing pinned\n")
    env = {**os.environ, "VENV": str(tmp_path / "venv"), "REQUIREMENTS": str(requirements),
           "PYTHON": sys.executable}

    def set_up() -> tuple[str, float]:
        start = time.perf_counter()
        done = subprocess.run(["bash", "run.sh", "setup"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout, time.perf_counter() - start

    out, _ = set_up()
    assert out.splitlines() == [f"creating the virtual environment {tmp_path / 'venv'}",
                                f"installing {requirements} into {tmp_path / 'venv'} (the first time takes a few "
                                f"minutes)"]
    stamp = tmp_path / "venv" / "requirements.sha256"
    assert stamp.read_text().strip() == hashlib.sha256(requirements.read_bytes()).hexdigest()
    out, seconds = set_up()
    assert out == "" and seconds < 10  # nothing to do
    requirements.write_text("# changed\n")
    out, _ = set_up()
    assert out.splitlines() == [f"installing {requirements} into {tmp_path / 'venv'} (the first time takes a few "
                                f"minutes)"]


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_one_rank_prints_the_error_and_torchrun_shows_it_as_the_root_cause(tmp_path):
    result = run_cli(["digits_linear", "--device", "cpu", "--output_dir", str(tmp_path / "out"),
                      "--pretrained_checkpoint", str(tmp_path / "absent.pth")], nproc=2)
    assert result.returncode != 0
    line = f"error: weights file {tmp_path / 'absent.pth'} does not exist"
    assert [x for x in result.stderr.splitlines() if x.startswith("error: ")] == [line]  # rank 0 alone
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert f"traceback : {line}" in root_cause and "error_file: <N/A>" not in root_cause
    assert not (tmp_path / "out").exists()


def test_cpu_threads_default_to_the_cores_shared_among_the_node_processes(monkeypatch):
    import torch

    import utils
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: set(range(32)))
    cpu = torch.device("cpu")
    try:
        assert utils.set_cpu_threads(None, cpu, 1) == 8  # capped
        assert utils.set_cpu_threads(None, cpu, 8) == 4  # 32 cores among 8 processes
        assert utils.set_cpu_threads(3, cpu, 8) == 3  # --threads wins
        monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: {0, 1})
        assert utils.set_cpu_threads(None, cpu, 4) == 1  # never 0
        torch.set_num_threads(5)
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        assert utils.set_cpu_threads(None, cpu, 1) == 5  # the user's OMP_NUM_THREADS is kept
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l2p", "hideprompt"])
def test_identical_commands_give_identical_results_with_several_cpu_threads(tmp_path, method):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:  # in subprocesses: the thread count is the process's
        result = run_cli([f"digits_{method}", "--output_dir", str(out), *FAST, "--threads", "2"])
        assert result.returncode == 0, result.stderr[-2000:]
        assert "2 CPU thread(s) per process" in result.stdout + result.stderr
    first, second = (read_json(out / "results.json") for out in runs)
    assert first["acc_matrix"] == second["acc_matrix"]
    assert [t["train_loss"] for t in first["tasks"]] == [t["train_loss"] for t in second["tasks"]]


@pytest.mark.slow
@pytest.mark.distributed
def test_prompt_methods_under_ddp_print_no_library_warning_and_one_line_per_epoch(tmp_path):
    result = run_cli(["digits_l2p", "--output_dir", str(tmp_path / "run"), *FAST], nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "find_unused_parameters" not in output and "Warning" not in output
    epoch_lines = [line for line in output.splitlines() if "epoch 1/1" in line]
    assert len(epoch_lines) == 2 and all("ETA" in line for line in epoch_lines)  # one per task, none per step


@pytest.mark.slow
def test_the_reference_readme_lines_after_the_demo(tmp_path, fake_cifar, capsys, monkeypatch):
    """Its L2P, S-Prompt and DualPrompt lines all pass --output_dir ./output, where the demo keeps its runs' folders:
    the first runs; the next would overwrite it and gets one line naming it and a free folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output" / "demo" / "ncm_seed42").mkdir(parents=True)
    (tmp_path / "output" / "demo" / "ncm_seed42" / "results.json").write_text("{}")
    small = [*TINY, "--data-path", str(fake_cifar), "--output_dir", "./output", "--num_tasks", "2",
             "--batch-size", "16"]
    assert run_main("cifar100_l2p", *small, "--epochs", "1") == 0
    assert read_json(tmp_path / "output" / "results.json")["subcommand"] == "cifar100_l2p"
    err = fails_with_one_line(capsys, "cifar100_sprompt_5e", *small, "--epochs", "1")
    assert err == ("error: --output_dir output holds a run of cifar100_l2p (seed 42, 2/2 tasks done); pass --resume "
                   "to continue it, or choose another folder, e.g. output/cifar100_sprompt_seed42")


def test_without_output_dir_each_run_gets_a_folder_of_its_own(tmp_path, monkeypatch):
    from config.cli import parse_args
    monkeypatch.chdir(tmp_path)
    assert parse_args(["digits_l2p", "--seed", "3"]).run.output_dir == "output/digits_l2p_seed3"
    (tmp_path / "output" / "digits_l2p_seed3").mkdir(parents=True)
    (tmp_path / "output" / "digits_l2p_seed3" / "config.json").write_text('{"subcommand": "digits_l2p"}')
    assert parse_args(["digits_l2p", "--seed", "3"]).run.output_dir == "output/digits_l2p_seed3_2"
    assert parse_args(["digits_l2p", "--seed", "3", "--resume"]).run.output_dir == "output/digits_l2p_seed3"
    assert parse_args(["digits_l2p", "--output_dir", "mine"]).run.output_dir == "mine"

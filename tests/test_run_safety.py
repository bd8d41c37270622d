"""Runs that cannot silently go wrong: honest resumes, settings checked before anything is written, writes that fail
in one line with earlier files intact, readable files, no stale temporaries, no partial --eval results."""
from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import utils
from conftest import fails_with_one_line, folder_snapshot, read_json, run_main

FAST = ["--device", "cpu", "--epochs", "1", "--num_tasks", "5"]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "-1"], "--lr must be greater than 0, got -1.0"),
    (["--n_centroids", "0"], "--n_centroids must be at least 1, got 0"),
    (["--stop_after_task", "0"], "--stop_after_task 0: choose 1..5"),
    (["--tii_lr", "inf"], "--tii_lr must be a finite number, got inf"),
])
def test_settings_are_checked_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert message in fails_with_one_line(capsys, "digits_hideprompt", "--output_dir", str(out), *flags)
    assert not out.exists()


def test_a_file_where_the_checkpoints_go_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint").write_text("not a folder")
    err = fails_with_one_line(capsys, "digits_linear", "--output_dir", str(out), "--resume", *FAST)
    assert f"{out / 'checkpoint'} is a file where the task checkpoints go" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_and_neutral_ones_may_differ(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["digits_linear", "--output_dir", str(out), *FAST]
    assert run_main(*common, "--stop_after_task", "2") == 0
    before = folder_snapshot(out, skip=("tensorboard",))
    err = fails_with_one_line(capsys, *common, "--resume", "--lr", "0.01", "--batch-size", "8")
    assert "lr: 0.3 there, 0.01 here" in err and "batch_size: 16 there, 8 here" in err
    assert folder_snapshot(out, skip=("tensorboard",)) == before  # nothing rewritten
    first_config = (out / "config.json").read_text()
    assert run_main(*common, "--resume", "--print_freq", "3", "--num_workers", "0", "--tensorboard", "False") == 0
    assert read_json(out / "results.json")["completed_tasks"] == 5
    assert (out / "config.json").read_text() == first_config  # the settings the run's tasks used


def test_an_atomic_write_that_fails_says_so_in_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    utils.atomic_torch_save({"x": torch.zeros(2)}, path)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.os, "fsync", full_disk)
    with pytest.raises(utils.UserError, match=rf"cannot write {path} \(No space left on device\)"):
        utils.atomic_torch_save({"x": torch.ones(2)}, path)
    assert torch.equal(torch.load(path)["x"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary left behind


DISK_BYTES = 8704 * 1024  # room for task 1 and task 2's first rolling state, not its second (each file ~3.1 MB)


@contextmanager
def small_disk(folder: Path, monkeypatch) -> Iterator[Callable[[], None]]:
    """`folder` on a file system of DISK_BYTES: a real tmpfs where this test may mount one (root), else a writer whose
    fsync fails with ENOSPC once the folder would hold more; yields a function that frees space."""
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES // 1024}k", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if mounted:
        try:
            yield lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    real_fsync = os.fsync

    def fsync_within_the_disk(fd: int) -> None:
        if sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) > DISK_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(utils.os, "fsync", fsync_within_the_disk)
    yield lambda: monkeypatch.setattr(utils.os, "fsync", real_fsync)


@pytest.mark.slow
def test_a_full_disk_mid_run_stops_in_one_line_and_results_never_claim_a_missing_checkpoint(tmp_path, capsys,
                                                                                               monkeypatch):
    out = tmp_path / "disk"
    args = ["digits_hideprompt", "--output_dir", str(out), "--epochs", "1", "--tii_epochs", "1", "--tensorboard",
            "False", "--stop_after_task", "2"]
    with small_disk(out, monkeypatch) as free_space:
        err = fails_with_one_line(capsys, *args)
        assert err.endswith(f"cannot write {out / 'checkpoint' / 'rolling_state.pth'} (No space left on device); "
                            f"the files written before it are intact: free space or fix permissions, then --resume")
        assert read_json(out / "results.json")["completed_tasks"] == 1
        # task 2's rolling state after its first phase stays: the resume continues from there
        assert torch.load(out / "checkpoint" / "rolling_state.pth", weights_only=False)["phase"] == "tii"
        assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["rolling_state.pth", "task1_checkpoint.pth"]
        assert not [p for p in out.rglob("*.tmp")]
        free_space()
        capsys.readouterr()
        assert run_main(*args, "--resume") == 0
        assert "resuming task 2 from" in capsys.readouterr().out
        assert read_json(out / "results.json")["completed_tasks"] == 2
        assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["task1_checkpoint.pth",
                                                                         "task2_checkpoint.pth"]


def test_files_are_written_with_the_mode_the_umask_gives_and_stale_temporaries_go(tmp_path):
    old = os.umask(0o022)
    try:
        utils.atomic_write_json({"a": 1}, tmp_path / "results.json")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    (tmp_path / ".results.json.k2j4_9ab.tmp").write_text("{")
    (tmp_path / "notes.tmp").write_text("mine")
    assert [p.name for p in utils.remove_stale_temporaries(tmp_path)] == [".results.json.k2j4_9ab.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "results.json"]


@pytest.mark.slow
def test_a_failed_eval_leaves_no_partial_results_and_a_resume_clears_stale_temporaries(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["digits_linear", "--output_dir", str(out), *FAST]
    assert run_main(*common, "--stop_after_task", "2") == 0
    stale = out / "checkpoint" / ".task3_checkpoint.pth.ab12cd34.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert run_main(*common, "--resume") == 0
    assert not stale.exists()
    (out / "checkpoint" / "task4_checkpoint.pth").write_bytes(b"truncated")
    err = fails_with_one_line(capsys, *common, "--eval")
    assert "cannot read checkpoint" in err and "task4_checkpoint.pth" in err
    assert not (out / "eval_results.json").exists()
    assert json.loads((out / "results.json").read_text())["completed_tasks"] == 5

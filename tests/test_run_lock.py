"""One run per folder, no orphans: rank 0 locks its output folder for the run's life, so a second launch on it stops
at once naming the holder; `--dist_timeout` bounds every wait for another process; a dead or hung process ends the
others' run in one line instead of a traceback or a hang."""
from __future__ import annotations

import datetime

import pytest

import utils
from conftest import run_main

FAST = ["--device", "cpu", "--epochs", "1", "--num_tasks", "5"]


def _fails_with_one_line(capsys, *args) -> str:
    capsys.readouterr()
    assert run_main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_dist_timeout_that_is_not_positive_is_refused_at_parse_time(tmp_path, capsys, value):
    out = tmp_path / "out"
    err = _fails_with_one_line(capsys, "digits_linear", "--output_dir", str(out), "--dist_timeout", value)
    assert f"--dist_timeout must be greater than 0, got {float(value)}" in err
    assert not out.exists()


def test_dist_timeout_reaches_the_process_group(tmp_path, capsys, monkeypatch):
    seen = {}

    def init_process_group(**kwargs) -> None:
        seen.update(kwargs)
        raise utils.UserError("stopped after init_process_group")  # the test needs nothing after it

    monkeypatch.setattr(utils.dist, "init_process_group", init_process_group)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    err = _fails_with_one_line(capsys, "digits_linear", "--output_dir", str(tmp_path / "out"), *FAST,
                               "--dist-timeout", "0.25")
    assert err == "error: stopped after init_process_group"
    assert seen["timeout"] == datetime.timedelta(seconds=15) and seen["backend"] == "gloo"
    assert seen["world_size"] == 2 and seen["rank"] == 0


def test_a_resume_may_give_another_dist_timeout_but_not_another_lr(tmp_path):
    from config.cli import parse_args
    from config.resolved import config_to_dict
    from run_files import check_same_settings

    saved = config_to_dict(parse_args(["digits_linear", "--dist_timeout", "30"]))
    path = tmp_path / "out" / "checkpoint" / "task1_checkpoint.pth"
    check_same_settings(saved, parse_args(["digits_linear", "--dist_timeout", "0.5"]), path)
    with pytest.raises(utils.UserError, match="lr: 0.3 there, 0.01 here"):
        check_same_settings(saved, parse_args(["digits_linear", "--lr", "0.01"]), path)

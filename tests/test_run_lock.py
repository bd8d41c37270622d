"""One run per folder, no orphans: rank 0 locks its output folder for the run's life, so a second launch on it stops
at once naming the holder; `--dist_timeout` bounds every wait for another process; a dead or hung process ends the
others' run in one line instead of a traceback or a hang."""
from __future__ import annotations

import datetime
import errno
import fcntl
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_files
import utils
from conftest import REPO, TINY, fails_with_one_line, folder_snapshot, free_port, read_json, run_main
from run_files import LOCK_FILE, check_output_dir

FAST = ["--device", "cpu", "--epochs", "1", "--num_tasks", "5"]


def _in_use(folder: Path, pid: int, flag: str = "--output_dir") -> re.Pattern:
    """The refusal naming the holder, as the message a user sees."""
    return re.compile(rf"error: {flag} {re.escape(str(folder))} is in use by another run \(PID {pid} on host "
                      rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it "
                      rf"to end or choose another {flag}")


class LockHolder:
    """Another process holding `folder`'s lock as a run does (forked: no second torch import), until released."""

    def __init__(self, folder: Path) -> None:
        self._release, theirs = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("fork").Process(target=self._hold, args=(folder, theirs))
        self.process.start()
        assert self._release.poll(30) and self._release.recv() == "locked"
        self.pid = self.process.pid

    @staticmethod
    def _hold(folder: Path, conn) -> None:
        run_files.lock_output_dir(folder)
        conn.send("locked")
        conn.recv()

    def release(self) -> None:
        self._release.send("release")
        self.process.join(30)
        assert self.process.exitcode == 0


def _launch_pair(logs: Path, *args: str) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of `main.py args`, started by hand as a scheduler would, without torchrun (which would kill the
    others when one dies); rank r's stdout and stderr go to logs/rank{r}.out and .err."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ranks = []
    for rank in range(2):
        with open(logs / f"rank{rank}.out", "w") as out, open(logs / f"rank{rank}.err", "w") as err:
            ranks.append(subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, stdout=out, stderr=err,
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    return ranks


def test_a_launch_on_a_folder_another_run_holds_is_refused_naming_it_and_writes_nothing(tmp_path, capsys,
                                                                                       monkeypatch):
    import main

    def read_data(*args, **kwargs):
        raise AssertionError("a folder in use is refused before any data is read")

    monkeypatch.setattr(main, "load_benchmark", read_data)
    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    for t in range(1, 6):  # what --eval's check looks for; the lock refuses before anything reads them
        (out / "checkpoint" / f"task{t}_checkpoint.pth").write_bytes(b"a checkpoint")
    (out / "config.json").write_text("{}")
    holder = LockHolder(out)
    try:
        before = folder_snapshot(out)
        assert set(before) == {LOCK_FILE, "config.json", *(f"checkpoint/task{t}_checkpoint.pth" for t in range(1, 6))}
        for flags in (["--resume"], ["--eval"]):
            err = fails_with_one_line(capsys, "digits_linear", "--output_dir", str(out), *FAST, *flags)
            assert _in_use(out, holder.pid).fullmatch(err), err
        assert folder_snapshot(out) == before  # the holder's record too
    finally:
        holder.release()


def test_a_new_folder_another_launch_took_meanwhile_is_refused_before_the_first_write(tmp_path, capsys,
                                                                                      monkeypatch):
    import main

    out, holders, log_run = tmp_path / "out", [], main._log_run

    def another_launch_takes_the_folder(*args) -> None:  # both passed the checks while the folder did not exist
        assert not out.exists()  # nothing made for a launch that may still be refused
        holders.append(LockHolder(out))
        log_run(*args)

    monkeypatch.setattr(main, "_log_run", another_launch_takes_the_folder)
    try:
        err = fails_with_one_line(capsys, "digits_linear", "--output_dir", str(out), *FAST)
        assert _in_use(out, holders[0].pid).fullmatch(err), err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        for holder in holders:
            holder.release()


@pytest.mark.slow
@pytest.mark.distributed
def test_every_rank_of_a_refused_launch_stops_and_only_rank_0_says_why(tmp_path):
    out = tmp_path / "out"
    holder = LockHolder(out)
    try:
        before = folder_snapshot(out)
        ranks = _launch_pair(tmp_path, "digits_linear", "--output_dir", str(out), *TINY, "--resume")
        assert [rank.wait(timeout=120) for rank in ranks] == [2, 2]
        assert folder_snapshot(out) == before
    finally:
        holder.release()
    assert _in_use(out, holder.pid).fullmatch((tmp_path / "rank0.err").read_text().strip())
    assert (tmp_path / "rank1.err").read_text() == ""


@pytest.mark.parametrize("held, flag", [("", "--output_dir"), ("vanilla_model", "--vanilla_model_output_dir")])
def test_the_few_shot_flow_locks_its_folder_and_the_upstream_folders_it_trains(tmp_path, capsys, held, flag):
    out = tmp_path / "fs"
    holder = LockHolder(out / held)
    try:
        before = folder_snapshot(out)
        err = fails_with_one_line(capsys, "digits_few_shot_lora", "--output_dir", str(out), "--device", "cpu",
                                   "--resume", "--train_vanilla")
        assert _in_use(out / held, holder.pid, flag).fullmatch(err), err
        after = folder_snapshot(out)
        # the flow's folder is locked before its upstream ones: a free one may have got a lock file, nothing else
        assert {name: after[name] for name in before} == before and set(after) - set(before) <= {LOCK_FILE}
    finally:
        holder.release()


def test_a_holder_yet_to_record_itself_still_refuses_and_a_file_system_without_flock_only_warns(tmp_path, capsys,
                                                                                                  monkeypatch):
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # locked, its record not written yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(utils.UserError, match=re.escape(f"--output_dir {tmp_path} is in use by another run (its "
                                                            f"holder has not recorded itself yet)")):
            run_files.lock_output_dir(tmp_path)
    finally:
        os.close(fd)

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(run_files.fcntl, "flock", no_flock)
    capsys.readouterr()
    run_files.lock_output_dir(tmp_path / "lustre")
    assert capsys.readouterr().err == (f"warning: cannot lock --output_dir {tmp_path / 'lustre'} (Function not "
                                       f"implemented); a second run in it would not be stopped\n")
    assert run_files._held == {}


def test_a_lock_file_alone_is_an_empty_folder_and_no_stale_temporary(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"pid": 1, "host": "node7", "started": "2026-12-01 10:00:00"}\n')
    check_output_dir(str(tmp_path), 5, evaluating=False, resuming=False)  # a fresh run may start in it
    assert utils.remove_stale_temporaries(tmp_path) == [] and (tmp_path / LOCK_FILE).exists()
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(utils.UserError, match="holds a run; pass --resume"):
        check_output_dir(str(tmp_path), 5, evaluating=False, resuming=False)


@pytest.mark.slow
def test_each_run_releases_its_lock_at_exit_and_keeps_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["digits_linear", "--output_dir", str(out), *FAST]
    assert run_main(*common, "--stop_after_task", "2") == 0
    holder = read_json(out / LOCK_FILE)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    before = folder_snapshot(out)
    time.sleep(1.1)  # a record stamped with each launch's time would now differ
    # the same process again (a lock kept past main() would refuse it), refused by a check after the lock: one
    # process's record is the same for each of its runs, so the folder is left byte for byte
    assert "lr: 0.3 there, 0.01 here" in fails_with_one_line(capsys, *common, "--resume", "--lr", "0.01")
    assert folder_snapshot(out) == before
    assert run_main(*common, "--resume") == 0
    assert read_json(out / "results.json")["completed_tasks"] == 5
    assert read_json(out / LOCK_FILE) == holder
    LockHolder(out).release()  # and another process may take it once the runs ended


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_dist_timeout_that_is_not_positive_is_refused_at_parse_time(tmp_path, capsys, value):
    out = tmp_path / "out"
    err = fails_with_one_line(capsys, "digits_linear", "--output_dir", str(out), "--dist_timeout", value)
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
    err = fails_with_one_line(capsys, "digits_linear", "--output_dir", str(tmp_path / "out"), *FAST,
                               "--dist-timeout", "0.25")
    assert err == "error: stopped after init_process_group"
    assert seen["timeout"] == datetime.timedelta(seconds=15) and seen["backend"] == "gloo"
    assert seen["world_size"] == 2 and seen["rank"] == 0


def test_a_resume_may_give_another_dist_timeout_but_not_another_lr(tmp_path):
    from config.cli import parse_args
    from config.resolved import config_to_dict
    from run_files import check_same_settings

    saved = config_to_dict(parse_args(["digits_linear", "--dist_timeout", "30"]))
    check_same_settings(saved, parse_args(["digits_linear", "--dist_timeout", "0.5"]))
    with pytest.raises(utils.UserError, match="lr: 0.3 there, 0.01 here"):
        check_same_settings(saved, parse_args(["digits_linear", "--lr", "0.01"]))


# what torch 2.14's gloo raised in the runs below (plain RuntimeErrors), and what the run says of them
GLOO_DEAD_PEER = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                  "[127.0.0.1]:55432: Connection reset by peer. This is typically caused by a remote worker hanging or "
                  "bugs in the application. Check the logs of the remote worker before reporting an error. GLHF!")
GLOO_HUNG_PEER = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                  "6000ms for recv operation to complete")


@pytest.mark.parametrize("err, cause", [
    (RuntimeError(GLOO_DEAD_PEER), "Read error [127.0.0.1]:55432: Connection reset by peer"),
    (RuntimeError(GLOO_HUNG_PEER), "Timed out waiting 6000ms for recv operation to complete"),
    (utils.dist.DistNetworkError("Connection reset by peer\nException raised from recvBytes"),
     "Connection reset by peer"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 3x2)"), None),
    (RuntimeError("gloo says hello"), None),
    (ValueError(GLOO_DEAD_PEER), None),
])
def test_only_errors_that_say_a_process_was_lost_count_as_such(err, cause):
    assert utils.lost_contact_cause(err) == cause


def test_a_lost_process_is_one_line_and_any_other_runtime_error_a_traceback(tmp_path, capsys, monkeypatch):
    import main

    errors = iter([RuntimeError(GLOO_HUNG_PEER), RuntimeError("CUDA error: an illegal memory access")])

    def run(cfg) -> int:
        raise next(errors)

    monkeypatch.setattr(main, "_run", run)
    args = ["digits_linear", "--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert run_main(*args) == 1
    assert capsys.readouterr().err == (
        "error: lost contact with another process of the run (Timed out waiting 6000ms for recv operation to "
        "complete); its files up to the last saved epoch are intact: --resume\n")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_main(*args)


def test_the_process_group_is_destroyed_after_a_lost_process_too_and_its_error_then_dropped(monkeypatch):
    destroyed = []

    def destroy_process_group() -> None:
        destroyed.append(True)
        raise RuntimeError(GLOO_DEAD_PEER)

    monkeypatch.setattr(utils, "is_dist", lambda: True)
    monkeypatch.setattr(utils.dist, "destroy_process_group", destroy_process_group)
    utils.cleanup_distributed(peers_lost=True)
    assert destroyed == [True]
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        utils.cleanup_distributed()


def _wait_for_training(ranks: list[subprocess.Popen], logs: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(r"^task 1 epoch", (logs / "rank0.out").read_text(), re.M):
        assert all(rank.poll() is None for rank in ranks), (logs / "rank0.err").read_text()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sig, flags, cause, within", [
    # killed: its sockets close, and the next collective fails at once
    (signal.SIGKILL, [], r"[^()\n]*(reset by peer|closed by peer|Broken pipe)[^()\n]*", (0, 30)),
    # stopped: nothing closes; the collective waits --dist_timeout (6 s) and fails
    (signal.SIGSTOP, ["--dist_timeout", "0.1"], r"Timed out waiting 6000ms for \w+ operation to complete", (6, 40)),
], ids=["dead", "hung"])
def test_a_dead_or_hung_process_ends_the_others_run_in_one_line(tmp_path, sig, flags, cause, within):
    out = tmp_path / "out"
    ranks = _launch_pair(tmp_path, "digits_linear", "--output_dir", str(out), *TINY, "--epochs", "50",
                         "--num_tasks", "5", *flags)
    try:
        _wait_for_training(ranks, tmp_path)
        ranks[1].send_signal(sig)
        lost = time.monotonic()
        code = ranks[0].wait(timeout=within[1])
        took = time.monotonic() - lost
    finally:
        for rank in ranks:
            rank.kill()  # the stopped one (a no-op on one that ended)
            rank.wait()
    assert code == 1 and within[0] <= took < within[1], (code, took)
    assert re.fullmatch(rf"error: lost contact with another process of the run \({cause}\); its files up to the last "
                        rf"saved epoch are intact: --resume\n", (tmp_path / "rank0.err").read_text())
    assert not list(out.rglob("*.tmp"))

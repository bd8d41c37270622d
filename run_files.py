"""A run's files on disk: where its task checkpoints are, reading them, checking a folder before a run writes into
it, and the lock that keeps a second run out of it. A leaf module: the engine and the methods (HiDe's stage 2 reads
stage 1's files) both import it."""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from config.resolved import Config, config_to_dict, differing_settings, flat_settings
from utils import (
    UserError,
    all_gather_objects,
    broadcast_object,
    is_dist,
    is_main_process,
    run_on_main_only,
    warn,
)

# The file rank 0 holds an exclusive flock on while a run writes in its folder. It is never deleted: a process that
# deleted it could let two later runs lock two different files of the same name.
LOCK_FILE = ".lock"
# what a run writes at the top of its folder first: a folder holding none of them holds no run
RUN_FILES = ("config.json", "results.json", "checkpoint")
# folder -> descriptor of its locked lock file; open until release_output_dirs() or the process's exit
_held: dict[Path, int] = {}
# when this process started (near enough: when it imported this), so that its record is the same for each of its runs
_STARTED = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")

# Keys that define the experiment: a resume with any of them changed is refused. Backbones count by the table name
# they resolve to, so an alias and its name are the same experiment.
EXPERIMENT_KEYS = ("dataset", "method", "stage", "backbone", "pretrained_checkpoint", "original_backbone",
                   "original_model_checkpoint", "num_tasks", "class_order", "input_size", "pretrained", "seed")


def checkpoint_path(output_dir: str | Path, task: int) -> Path:
    """The reference's path, so stage-2 style reuse of a run's per-task files keeps working (task is 0-based)."""
    return Path(output_dir) / "checkpoint" / f"task{task + 1}_checkpoint.pth"


def completed_tasks(output_dir: str | Path, num_tasks: int) -> int:
    """Number of consecutive task checkpoints present from task 1 on."""
    done = 0
    while done < num_tasks and checkpoint_path(output_dir, done).is_file():
        done += 1
    return done


def check_output_dir(output_dir: str, num_tasks: int, evaluating: bool, resuming: bool,
                     flag: str = "--output_dir", suggestion: str = "") -> None:
    """Refuse, before anything is written, to overwrite a run, to write where we cannot, or to evaluate nothing
    (`flag` names the option that chose `output_dir`; `suggestion` is a free folder to propose). A folder holding
    other files or other runs' folders, but no run at its top, is free. Rank 0 decides for every rank: another node
    may not see the folder (`lock_output_dir` then says so)."""
    run_on_main_only(lambda: _check_output_dir(Path(output_dir), num_tasks, evaluating, resuming, flag, suggestion))


def held_run(folder: Path) -> str | None:
    """What run `folder` holds at its top (its config.json, results.json or task checkpoints), e.g. "a run of
    digits_l2p (seed 42, 2/5 tasks done)", or None."""
    if not any((folder / name).exists() for name in RUN_FILES):
        return None
    try:
        config = flat_settings(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return "a run"
    num_tasks = config.get("num_tasks")
    progress = f", {completed_tasks(folder, int(num_tasks))}/{num_tasks} tasks done" if num_tasks else ""
    return f"a run of {config.get('subcommand', '?')} (seed {config.get('seed', '?')}{progress})"


def run_folder_for(subcommand: str, seed: int, resuming: bool = False, parent: str = "./output") -> str:
    """A folder of its own for a run: `<parent>/<subcommand>_seed<seed>`, or with a suffix `_2`, `_3`... when that
    one holds a run already; to resume, the last of them that holds a run."""
    def candidate(k: int) -> Path:
        return Path(parent) / (f"{subcommand}_seed{seed}" + (f"_{k}" if k > 1 else ""))
    k = 1
    while held_run(candidate(k)) is not None:
        k += 1
    return str(candidate(max(k - 1, 1) if resuming else k))


def _check_output_dir(out: Path, num_tasks: int, evaluating: bool, resuming: bool, flag: str,
                      suggestion: str) -> None:
    if evaluating:
        missing = [str(checkpoint_path(out, t)) for t in range(num_tasks) if not checkpoint_path(out, t).is_file()]
        if missing:
            raise UserError(f"--eval needs the checkpoint of every task, but {len(missing)} are missing "
                            f"(first: {missing[0]}); point {flag} at a finished run")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; choose a folder")
    if checkpoint_path(out, 0).parent.exists() and not checkpoint_path(out, 0).parent.is_dir():
        raise UserError(f"{flag} {out}: {checkpoint_path(out, 0).parent} is a file where the task checkpoints go; "
                        f"move it or choose another {flag}")
    held = held_run(out)
    if held is not None and not resuming:
        raise UserError(f"{flag} {out} holds {held}; pass --resume to continue it, or choose another folder"
                        + (f", e.g. {suggestion}" if suggestion else ""))
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out} is not writable ({existing} does not allow it); choose another folder")


def check_run_complete(directory: str, num_tasks: int, flag: str, hint: str) -> None:
    """Every task checkpoint of the run in `directory` (which option `flag` points at) is there; `hint` says how to
    make them."""
    missing = [t for t in range(num_tasks) if not checkpoint_path(directory, t).is_file()]
    if missing:
        raise UserError(f"{flag} {directory}: {checkpoint_path(directory, missing[0])} is missing ({len(missing)} of "
                        f"{num_tasks} task checkpoints absent); {hint}")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, unpickling errors, permission problems
        raise UserError(f"cannot read checkpoint {path} ({type(err).__name__}: {str(err)[:120]}); "
                        f"delete it to retrain that task") from err


def read_run_json(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file of a run (config, results), or one line naming it and `fix`."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err}); {fix}") from err


def check_same_experiment(saved: dict[str, Any], cfg: Config, path: Path,
                          keys: Sequence[str] = EXPERIMENT_KEYS) -> None:
    """`saved` (a saved config, any layout) and `cfg` agree on `keys`, the settings that define what `path` holds.
    A key this method does not have (a setting it does not read) is no part of its experiment."""
    present = [k for k in keys if k in flat_settings(config_to_dict(cfg))]
    differing = differing_settings(saved, cfg, present)
    if differing:
        raise UserError(f"{path} belongs to another experiment ({differing}); use its settings or a new --output_dir")


# Settings that change nothing of what a run trains or evaluates: a resume may give other values. `device`,
# `compile` and `threads` choose the kernels, not the computation: results move by floating-point rounding only
RESULT_NEUTRAL = frozenset({
    "layout", "output_dir", "device", "compile", "threads", "eval", "resume", "stop_after_task", "print_freq",
    "tensorboard", "print_config", "dist_url", "dist_timeout", "local_rank", "num_workers", "pin_mem", "data_path",
    "explicit_flags", "no_effect_flags",
    # where the curves are logged
    "wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_mode",
    # the few-shot flow's switches and episode settings: its upstream runs do not read them
    "train_vanilla", "train_shared", "train_few_shot", "num_shots", "num_ways", "num_episodes", "num_queries",
    "num_fs_epochs", "fs_lr", "fs_backbone", "few_shot_dataset_idx", "few_class_idx",
})


def check_same_settings(saved: dict[str, Any], cfg: Config) -> None:
    """A resume continues the run in `cfg.run.output_dir` with the settings it started with (`saved`, any layout):
    every setting both configs have must agree, apart from RESULT_NEUTRAL ones."""
    theirs, current = flat_settings(saved), flat_settings(config_to_dict(cfg))
    keys = [k for k in current if k in theirs and k not in RESULT_NEUTRAL]
    differing = differing_settings(saved, cfg, keys)
    if differing:
        raise UserError(f"--resume would continue {cfg.run.output_dir} with other settings than it started with "
                        f"({differing}); resume with that run's settings, or start a new --output_dir")


def read_run_checkpoint(directory: str, t: int, cfg: Config, kind: str, is_kind: Callable[[dict], bool],
                        same_keys: Sequence[str], hint: str) -> dict[str, torch.Tensor]:
    """The model state saved after task t by the run in `directory`, once its config (flattened, any layout) shows
    it is `kind` (`hint` says how to make one) and agrees with `cfg` on `same_keys`."""
    path = checkpoint_path(directory, t)
    saved = load_checkpoint(path)
    theirs = flat_settings(saved.get("config", {}))
    if not is_kind(theirs):
        raise UserError(f"{path} is not {kind} (method {theirs.get('method')!r}, stage "
                        f"{theirs.get('part', theirs.get('stage'))!r}); {hint}")
    differing = differing_settings(saved.get("config", {}), cfg, same_keys)
    if differing:
        raise UserError(f"{path} was trained with other settings ({differing}); use that run's settings")
    return saved["model"]


def lock_output_dir(output_dir: str | Path, flag: str = "--output_dir", create: bool = True) -> None:
    """Rank 0 locks `output_dir` until the run ends; if another process holds it, every rank stops and rank 0 names
    the holder. `create=False` leaves a missing folder for a later call: a launch that ends up refused must not
    have made it, so lock an existing folder as soon as it is checked (a second launch stops at once) and any
    folder again right before the first write (once is enough: a folder locked already is kept)."""
    run_on_main_only(lambda: _lock(Path(output_dir), flag, create))
    if create:
        _check_shared(Path(output_dir), flag)


# How long a rank waits to see the lock record rank 0 wrote (a network file system may show it a little later)
SHARED_WAIT_SECONDS = 10.0


def _check_shared(folder: Path, flag: str) -> None:
    """Every rank sees the lock record rank 0 wrote in `folder`: rank 0 alone writes checkpoints that every rank
    reads on --resume, --eval and in HiDe's stage 2, so a folder local to each node would desynchronise the ranks."""
    if not is_dist():
        return
    expected = broadcast_object(_own_record(folder) if is_main_process() else None)
    if expected is None:  # rank 0 could not lock the folder, and warned
        return
    deadline = time.monotonic() + SHARED_WAIT_SECONDS
    seen = is_main_process() or _record_in(folder) == expected
    while not seen and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = _record_in(folder) == expected
    blind = [(rank, host) for rank, (ok, host) in enumerate(all_gather_objects((seen, socket.gethostname())))
             if not ok]
    if blind:
        ranks = ", ".join(str(rank) for rank, _ in blind)
        hosts = ", ".join(sorted({host for _, host in blind}))
        raise UserError(f"{flag} {folder} must be on a file system shared by all nodes: rank(s) {ranks} (on "
                        f"{hosts}) do not see the files rank 0 writes there; use a folder every node mounts")


def _own_record(folder: Path) -> bytes | None:
    fd = _held.get(folder.resolve())
    if fd is None:
        return None
    try:
        return os.pread(fd, 4096, 0) or None
    except OSError:
        return None


def _record_in(folder: Path) -> bytes | None:
    try:
        return (folder / LOCK_FILE).read_bytes()
    except OSError:
        return None


def release_output_dirs() -> None:
    """Unlock every folder this process locked (main's exit; in-process runs, as the tests make, need it)."""
    for fd in _held.values():
        fcntl.flock(fd, fcntl.LOCK_UN)  # releases it for DataLoader workers forked with the descriptor too
        os.close(fd)
    _held.clear()


def _lock(folder: Path, flag: str, create: bool) -> None:
    key = folder.resolve()
    if key in _held or not (create or folder.is_dir()):
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # no O_TRUNC: the holder's record must survive a refused launch opening the file
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:  # --eval of a read-only run, say: it cannot write its results either, and says so later
        warn(f"cannot lock {flag} {folder} ({err.strerror or err}); a second run in it would not be stopped")
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise UserError(f"{flag} {folder} is in use by another run ({holder}); wait for it to end or choose another "
                        f"{flag}") from None
    except OSError as err:  # a file system without flock (Lustre mounted without -o flock): run, but say so
        os.close(fd)
        warn(f"cannot lock {flag} {folder} ({err.strerror or err}); a second run in it would not be stopped")
        return
    _held[key] = fd
    _write_holder(fd)


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message of a refused launch; written only once the lock is ours, and only if it
    changed (the folder's files stay as they were when the same process runs in it again)."""
    record = (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _STARTED}) + "\n").encode()
    try:
        if os.pread(fd, len(record) + 1, 0) != record:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)  # the file stays open: without this a network file system may show other nodes nothing
    except OSError:  # the lock holds without its record: a refused launch then names no holder
        pass


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return f"PID {record['pid']} on host {record['host']}, started {record['started']}"
    except (OSError, ValueError, TypeError, KeyError):  # a holder that has not written its record yet
        return "its holder has not recorded itself yet"

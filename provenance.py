"""Where, how and with what a results file was made: the code's commit, library versions, devices and hosts, the
command line, times and peak memory. `RunRecord` writes it as `provenance` into results.json and eval_results.json.

Every rank builds a `Provenance` and calls `update` (both gather over the ranks); rank 0 writes `as_dict()`. A
--resume continues the record of the launches before it (from the task checkpoint's results), adding its own.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torchvision

from config.resolved import Config
from utils import all_gather_objects, launcher_ranks

PROJECT = Path(__file__).resolve().parent
GIT_TIMEOUT = 5.0  # seconds: a hung git (a network file system) must not hold the run


def _git(folder: Path, *args: str) -> str | None:
    """git's output in `folder`, or None when git is absent, fails or hangs."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(folder: Path = PROJECT) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files have uncommitted changes) of the checkout `folder` is the top of; (None,
    None) when it is none: a copy inside some other repository must not report that repository's commit."""
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != folder.resolve():
        return None, None
    commit = _git(folder, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": np.__version__}


def cpu_model() -> str:
    with suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _device_key(device: torch.device, hostname: str) -> str:
    """What tells devices apart over ranks: a GPU's UUID (each task may see its own GPU as cuda:0), else host and
    index; a host's CPU counts once however many processes share it."""
    if device.type != "cuda":
        return f"{hostname}/cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else f"{hostname}/cuda:{index}"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): the most CUDA memory tensors took on `device`, else this process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "rss"  # Linux counts kibibytes, macOS bytes


def launcher() -> str:
    """torchrun (also torch.distributed.launch, which runs on it), srun, or single (a plain process)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if launcher_ranks() is None:
        return "single"
    env = os.environ
    return "srun" if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 else "torchrun"


def utc_time(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Provenance:
    """The provenance of one results file: this launch's facts, gathered over the ranks once, and the launches
    before it. Top-level device and host fields describe the latest launch; `start_time` is the first launch's,
    `wall_seconds` the sum over launches, `peak_memory_bytes` the most over ranks and launches."""

    def __init__(self, cfg: Config, device: torch.device):
        hostname = socket.gethostname()
        ranks = all_gather_objects((hostname, device_name(device), _device_key(device, hostname)))
        commit, dirty = git_state()
        context = cfg.context
        self.facts: dict[str, Any] = {
            "git_commit": commit, "git_dirty": dirty, **library_versions(), "device_type": device.type,
            "device_names": list(dict.fromkeys(name for _, name, _ in ranks)),
            "device_count": len({key for _, _, key in ranks}), "world_size": len(ranks),
            "batch_size": cfg.optim.batch_size, "global_batch_size": context.global_batch_size,
            "effective_lr": context.effective_lr, "hostname": hostname,
            "hostnames": list(dict.fromkeys(host for host, _, _ in ranks)), "command": shlex.join(sys.orig_argv),
            "launcher": launcher()}
        self.device = device
        self.started, self.clock = time.time(), time.perf_counter()
        self.launch: dict[str, Any] | None = None  # this launch's entry, from its first write on
        self.earlier: list[dict[str, Any]] = []
        self.peak, self.peak_kind = peak_memory(device)

    def continue_from(self, saved: dict[str, Any] | None) -> None:
        """Keep the launches recorded in `saved` (the provenance of the results a --resume continues)."""
        if not saved:
            return
        self.earlier = list(saved.get("launches", []))
        if saved.get("peak_memory_kind") == self.peak_kind:
            self.peak = max(self.peak, int(saved.get("peak_memory_bytes") or 0))

    def update(self, task: int) -> None:
        """This launch has results up to `task` (0-based) to write now: its end time, and the peak memory over the
        ranks (a collective: every rank calls it)."""
        local, _ = peak_memory(self.device)
        self.peak = max(self.peak, *all_gather_objects(local))
        first = task + 1 if self.launch is None else self.launch["first_task"]
        self.launch = {"start_time": utc_time(self.started), "end_time": utc_time(time.time()),
                       "wall_seconds": time.perf_counter() - self.clock, "command": self.facts["command"],
                       "hostname": self.facts["hostname"], "world_size": self.facts["world_size"],
                       "first_task": first, "last_task": task + 1}

    def as_dict(self) -> dict[str, Any]:
        launches = [*self.earlier, *([self.launch] if self.launch else [])]
        unwritten = utc_time(self.started)  # no launch has written results yet
        return {**self.facts, "start_time": launches[0]["start_time"] if launches else unwritten,
                "end_time": launches[-1]["end_time"] if launches else unwritten,
                "wall_seconds": float(sum(entry["wall_seconds"] for entry in launches)),
                "peak_memory_bytes": self.peak, "peak_memory_kind": self.peak_kind, "launches": launches}

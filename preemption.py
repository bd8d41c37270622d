"""Stopping a run cleanly when the scheduler asks: SIGTERM or SIGUSR1 (what SLURM and most schedulers send before
killing a job), or the death of the torchrun agent that launched this worker.

A signal only sets a flag. The engine looks at it where every rank can stop together: at the progress lines of a
training epoch (on the same all-reduce those lines already make) and between the parts of a task. There every rank
learns whether any rank was asked, the rolling state of the last finished epoch is on disk, and the run exits with
`EXIT_CODE` and one line saying where it stopped.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch

from utils import all_gather_objects, all_reduce_sum

EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, the job may be retried (requeued) as it is
SIGNALS = ("SIGTERM", "SIGUSR1")
PARENT_POLL_SECONDS = 0.5
# after the launcher died nobody waits for this worker's result: it stops at the next safe point or after this long
ORPHAN_GRACE_SECONDS = 5.0

_reason: str | None = None


class Preempted(Exception):
    """Every rank agreed to stop; `str()` is the one line to print."""


def request(reason: str) -> None:
    """Ask the run to stop at its next safe point (what the signal handlers and the launcher watchdog call)."""
    global _reason
    if _reason is None:
        _reason = reason


def clear() -> None:
    """Forget a request (a new run in the same process, as tests make)."""
    global _reason
    _reason = None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    request(signal.Signals(signum).name)


def is_launcher(pid: int) -> bool:
    """Whether process `pid` is a torchrun / torch.distributed.launch agent (True where /proc cannot tell)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"torchrun" in command or b"torch.distributed.run" in command or b"torch.distributed.launch" in command


def _watch_launcher(parent: int) -> None:
    """Once the launcher is gone (this process re-parented, or its parent is no launcher: it died while this worker
    started), stop at the next safe point, and at the latest after ORPHAN_GRACE_SECONDS (also out of a collective
    that waits for the dead launcher's store): a killed torchrun must leave nothing training or writing."""
    if is_launcher(parent):
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
    request(f"the launcher (PID {parent}) died")
    time.sleep(ORPHAN_GRACE_SECONDS)
    os._exit(EXIT_CODE)


@contextmanager
def handling_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGUSR1 ask the run to stop, and under torchrun a watchdog notices the agent's death (a
    launcher killed with SIGKILL, or by a SIGUSR1 it does not handle, forwards nothing). The previous handlers come
    back on exit."""
    clear()
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return
    previous = {name: signal.signal(getattr(signal, name), _on_signal) for name in SIGNALS}
    if "TORCHELASTIC_RUN_ID" in os.environ:
        threading.Thread(target=_watch_launcher, args=(os.getppid(),), name="launcher-watchdog", daemon=True).start()
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def flag_tensor(device: torch.device) -> torch.Tensor:
    """1 when this process was asked to stop, else 0 (float64, to sum with other statistics in one all-reduce)."""
    return torch.tensor([0.0 if _reason is None else 1.0], dtype=torch.float64, device=device)


def preempted(where: str, saved: str) -> Preempted:
    """The stop every rank agreed on (`where`: what was running; `saved`: what a resume continues from). Every rank
    calls it: the line names the first rank's reason, also where rank 0 itself was not asked (yet)."""
    reason = next(r for r in [_reason, *all_gather_objects(_reason), "a stop was asked"] if r is not None)
    return Preempted(f"preempted at {where} ({reason}); {saved}: continue with --resume")


def stop_if_requested(device: torch.device, where: str, saved: str) -> None:
    """A point where every rank can stop: raise Preempted on every rank when any rank was asked."""
    if all_reduce_sum(flag_tensor(device)).item() > 0:
        raise preempted(where, saved)

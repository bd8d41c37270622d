"""The rolling state of the task in progress, written after every epoch of every phase: what the method trains, the
optimizers, scheduler and loss scaler, the epoch, every rank's RNG states and the task's finished phases. `--resume`
continues the task from the epoch after the last one saved and ends bit-identical to a run that was never stopped
(the data order depends on the seed and the epoch alone). Removed once the task's checkpoint is written.

Rank 0 writes it in a background thread from copies taken at the end of the epoch, so training goes on meanwhile.
"""
from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config.resolved import Config
from run_files import check_same_settings, checkpoint_path, load_checkpoint
from utils import all_gather_objects, atomic_torch_save, get_rank, is_main_process, log

FILENAME = "rolling_state.pth"


def rolling_state_path(output_dir: str | Path) -> Path:
    return checkpoint_path(output_dir, 0).parent / FILENAME


def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective: every rank calls it)."""
    return all_gather_objects(capture_rng())


def snapshot(obj: Any) -> Any:
    """A copy on the CPU of every tensor in `obj` (nested dicts, lists, tuples): the training may change the originals
    while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class RollingWriter:
    """Writes rolling states one at a time in a background thread (rank 0); a failed write is raised at the next
    `submit` or `wait`."""

    def __init__(self, output_dir: str | Path):
        self.path = rolling_state_path(output_dir)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _write(self, state: dict[str, Any]) -> None:
        try:
            atomic_torch_save(state, self.path)
        except BaseException as err:  # raised in the main thread by wait()
            self._error = err

    def submit(self, state: dict[str, Any]) -> None:
        """Write `state` (rank 0's, made of copies) once the previous write is done."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(state,), name="rolling-state", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def remove(self) -> None:
        """Once the task checkpoint holds everything (rank 0)."""
        self.wait()
        if is_main_process():
            self.path.unlink(missing_ok=True)


def load_rolling_state(cfg: Config, task: int) -> dict[str, Any] | None:
    """The rolling state of `task` in `cfg.run.output_dir` (the first task a --resume trains), once shown to continue
    this run with its settings; None when there is none. One of an earlier task (its checkpoint was written before the
    rolling state could be removed) is stale: ignored, and replaced or removed as this task goes on."""
    path = rolling_state_path(cfg.run.output_dir)
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if state["task"] != task:
        return None
    check_same_settings(state["config"], cfg)
    log(f"resuming task {task + 1} from {path}: after epoch {state['epoch']} of phase {state['phase']}")
    return state


def rank_rng(state: dict[str, Any]) -> dict[str, Any]:
    return state["rng"][get_rank()]

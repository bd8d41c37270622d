"""Weights & Biases for a run (--wandb): the scalars, images and text the engine logs to TensorBoard, and the config
with the provenance. Imported only with --wandb: wandb is no requirement of the project.

wandb keeps one step counter per run that only grows, while our tags count tasks or epochs over tasks: each tag is
drawn against a step metric of its own family (`step/train/tii` for `train/tii/loss`, `step/task` for untagged
values), logged in the same row.
"""
from __future__ import annotations

import html
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from config.settings import RunSettings
from plots import figure_pixels
from run_logger import RunLogger
from utils import UserError

WANDB_HOST = ("api.wandb.ai", 443)
MISSING = "--wandb needs the wandb package (pip install wandb), or drop --wandb"


def require_wandb() -> None:
    """Before any work: the package is there (rank 0 logs, so rank 0 asks)."""
    try:
        import wandb  # noqa: F401, PLC0415
    except ImportError as err:
        raise UserError(MISSING) from err


def resolve_mode(mode: str, timeout: float = 2.0) -> str:
    """--wandb_mode auto: WANDB_MODE when set, else online when wandb's server answers, offline when not (a compute
    node without network; `wandb sync` uploads the run later)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        socket.create_connection(WANDB_HOST, timeout=timeout).close()
    except OSError:
        return "offline"
    return "online"


def step_metric(tag: str) -> str:
    family = tag.rpartition("/")[0]
    return f"step/{family}" if family else "step/task"


def run_name(settings: RunSettings) -> str:
    return settings.wandb_name or Path(settings.output_dir).resolve().name


class WandbLogger(RunLogger):
    """One wandb run per launch, started at the first use (a refused run starts none) in `folder`/wandb."""

    records = True

    def __init__(self, settings: RunSettings, folder: str | Path):
        self.settings, self.folder = settings, Path(folder)
        self.config: dict[str, Any] = {}
        self._run: Any = None
        self._defined: set[str] = set()

    @property
    def run(self) -> Any:
        if self._run is None:
            import wandb  # noqa: PLC0415

            s = self.settings
            self._run = wandb.init(project=s.wandb_project, entity=s.wandb_entity, name=run_name(s),
                                   mode=resolve_mode(s.wandb_mode), dir=str(self.folder), config=self.config)
        return self._run

    def _log(self, values: Mapping[str, Any], step: int) -> None:
        row = dict(values)
        for tag in values:
            if tag not in self._defined:
                self.run.define_metric(tag, step_metric=step_metric(tag))
                self._defined.add(tag)
            row[step_metric(tag)] = step
        self.run.log(row)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self._log({tag: float(value) for tag, value in values.items()}, step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        import wandb  # noqa: PLC0415

        pixels = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else figure_pixels(image)
        self._log({tag: wandb.Image(pixels)}, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Under text/<tag>: in wandb a key holds one kind of value, and the engine gives an image and its text one
        tag, as TensorBoard keeps them apart."""
        import wandb  # noqa: PLC0415

        self._log({f"text/{tag}": wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        if self._run is not None:
            self._run.config.update(self.config, allow_val_change=True)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

"""Where a run's curves go: `RunLogger`, the interface the engine logs through (scalars by tag and step, images, text,
the config), its TensorBoard implementation and a fan-out to several. The base class drops everything: ranks other
than 0, and runs that log nowhere, get one. Weights & Biases is `wandb_logger.WandbLogger`, imported only with
--wandb.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


class RunLogger:
    """Logs nothing; implementations override what they record. `step` is the x axis of the values: each tag keeps
    one meaning of it (a task, or an epoch counted over tasks)."""

    records = False  # whether anything logged is kept: callers skip drawing a figure nobody will see

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Each value under its tag."""

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """A CHW float tensor in [0, 1], or a matplotlib figure."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Preformatted text (shown in a fixed-width font)."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The run's settings and provenance, once per launch."""

    def flush(self) -> None:
        """Make what was logged visible to readers now."""

    def close(self) -> None:
        """At the run's end; a closed logger is not used again."""


class TensorBoardLogger(RunLogger):
    """Event files in `folder`, opened at the first value logged: a run refused or stopped before its first epoch
    ends writes none (the config waits for that value)."""

    records = True

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._writer: Any = None
        self._config: str | None = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (its import takes a second)
            self._writer = SummaryWriter(str(self.folder))
            if self._config is not None:
                self.log_text("config", self._config, 0)
        return self._writer

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        if isinstance(image, torch.Tensor):
            self.writer.add_image(tag, image, step)
        else:
            self.writer.add_figure(tag, image, step, close=False)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._config = json.dumps(config, indent=2)
        if self._writer is not None:
            self.log_text("config", self._config, 0)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MultiLogger(RunLogger):
    """Every call goes to each of `loggers`, in order."""

    def __init__(self, loggers: Sequence[RunLogger]):
        self.loggers = list(loggers)
        self.records = any(logger.records for logger in self.loggers)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_scalars(values, step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        for logger in self.loggers:
            logger.log_image(tag, image, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.log_text(tag, text, step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

"""The divergence guard: a non-finite loss, statistic or trained tensor stops the run with one line naming where and
the flag to lower, before anything holding it is saved; a loss that explodes without becoming infinite gets one
warning. Every rank holds the same values where these checks run, so every rank stops together."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from utils import UserError, warn

GROWTH_FACTOR = 100.0  # a loss this many times its first value in a task is diverging, not just noisy


class Diverged(UserError):
    """A non-finite value where training must not go on."""


def check_loss(value: float, what: str, where: str, fix: str) -> None:
    """`what`: which loss (training, task-adaptive-prediction); `where`: task, phase, epoch, step."""
    if not math.isfinite(value):
        raise Diverged(f"the {what} loss became {value} at {where}; {fix}")


def check_tensors(tensors: Mapping[str, torch.Tensor], where: str, fix: str) -> None:
    """Every floating-point tensor is finite; `where` names what holds them."""
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    if not floats:
        return
    finite = torch.stack([torch.isfinite(v).all().cpu() for v in floats.values()])
    if bool(finite.all()):
        return
    bad = [k for k, ok in zip(floats, finite.tolist(), strict=True) if not ok]
    raise Diverged(f"{where}: {bad[0]} holds NaN or inf" + (f" (and {len(bad) - 1} more tensors)" if bad[1:] else "")
                   + f"; nothing was saved from it; {fix}")


class LossWatch:
    """Warns once when a task's running loss grows past GROWTH_FACTOR times its first reported value."""

    def __init__(self, where: str, fix: str):
        self.where, self.fix = where, fix
        self.first: float | None = None
        self.warned = False

    def update(self, loss: float, at: str) -> None:
        if self.first is None:
            self.first = loss
        elif not self.warned and self.first > 0 and loss > GROWTH_FACTOR * self.first:
            self.warned = True
            warn(f"the {self.where} loss grew from {self.first:.4g} to {loss:.4g} ({at}): the run is probably "
                 f"diverging; {self.fix}")

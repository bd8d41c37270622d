"""A continual learner driven from Python, over the code the command line runs: the same settings resolution, methods,
optimizer step, mixed precision and distributed wrapping.

    from learner import create_learner
    learner = create_learner("l2p", num_classes=10, task_mask=[[0, 1], [2, 3]], backbone="vit_tiny_patch16_224",
                             pretrained=False, input_size=32, lr=0.01)
    learner.on_task_start(0)
    learner.train_batch(images, labels)
    predictions = learner.predict(images)

Importing it parses no arguments, starts no process group and prints nothing; what the methods say goes to the
`logging` logger "hide_cl".
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from config.cli import field_index, method_groups, resolve
from config.resolved import Config
from config.settings import COMMON_GROUPS
from datasets.scenario import Scenario, make_class_order
from engine import create_optimizer, mask_logits, optimizer_step, wrap_for_training
from models import METHODS, create_method
from models.base import ContinualMethod
from utils import DistContext, UserError, init_distributed, maybe_autocast, resolve_device, seed_everything

LOGGER = logging.getLogger("hide_cl")


class _LoggerWriter(io.TextIOBase):
    """A text stream whose complete lines go to `LOGGER` at `level` (what the methods print, in a notebook)."""

    def __init__(self, level: int):
        self.level, self.pending = level, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                LOGGER.log(self.level, line)
        return len(text)


@contextlib.contextmanager
def to_logger() -> Iterator[None]:
    """Standard output to LOGGER.info and standard error to LOGGER.warning, for the duration."""
    with contextlib.redirect_stdout(_LoggerWriter(logging.INFO)), \
            contextlib.redirect_stderr(_LoggerWriter(logging.WARNING)):
        yield


class Learner:
    """One continual method with its optimizer: `on_task_start(t)`, then `train_batch` / `predict` in any order,
    then `on_task_end(t)`. Single-phase methods only (HiDe's stages run from the command line)."""

    def __init__(self, method: ContinualMethod, cfg: Config, ctx: DistContext):
        if len(method.phases) > 1:
            raise UserError(f"{cfg.method} trains each task in phases {method.phases}; run it from the command line")
        self.method, self.cfg, self.ctx = method, cfg, ctx
        self.task: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.model: torch.nn.Module = method
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.run.amp == "fp16")
        self.seen = torch.zeros(method.num_classes, dtype=torch.bool, device=ctx.device)
        self.params: list[torch.nn.Parameter] = []

    def on_task_start(self, t: int) -> None:
        """Enter task t: its class mask joins the classes that can be predicted; a fresh optimizer unless
        --reinit_optimizer False keeps the last one."""
        if not 0 <= t < self.method.num_tasks:
            raise UserError(f"task {t} does not exist: the learner was built with {self.method.num_tasks} task masks")
        method = self.method
        method.set_phase(method.phases[0])
        method.invalidate_state_cache()
        with to_logger():
            groups = [g for g in method.begin_task(t) if g["params"]]
        self.task = t
        self.seen |= method.class_mask(t).to(self.seen.device)
        self.params = [p for p in method.parameters() if p.requires_grad]
        if not method.trains or not groups:
            return
        if self.optimizer is None or self.cfg.optim.reinit_optimizer:
            self.optimizer = create_optimizer(groups, self.cfg)
        self.model = wrap_for_training(method, self.ctx)

    def _current_task(self) -> int:
        if self.task is None:
            raise UserError("call on_task_start(t) before training or predicting")
        return self.task

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """One optimizer step on a batch of task t's images; `weight` scales the loss (a process holding a smaller
        share of a distributed batch). Returns the loss, on the device, without a host synchronisation."""
        t = self._current_task()
        if self.optimizer is None:
            raise UserError(f"{self.cfg.method} takes no gradient steps on task {t}")
        self.method.train()
        images = images.to(self.ctx.device, non_blocking=True)
        targets = targets.to(self.ctx.device, non_blocking=True)
        with maybe_autocast(self.ctx.device, self.cfg.run.amp):
            loss, _ = self.model(images, targets, t)
        optimizer_step(loss * weight if weight != 1.0 else loss, self.optimizer, self.scaler, self.params,
                       self.cfg.optim.clip_grad)
        return loss.detach()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        """The predicted class of each image among the classes of the tasks started so far (every class with
        --eval_all_classes). `batch_key` names a batch of a deterministic loader: frozen features are then computed
        once (see ContinualMethod.cached)."""
        self._current_task()
        self.method.eval()
        with maybe_autocast(self.ctx.device, self.cfg.run.amp):
            logits = self.method.predict(images.to(self.ctx.device, non_blocking=True), batch_key=batch_key)
        return mask_logits(logits, None if self.cfg.data.eval_all_classes else self.seen).argmax(1)

    def on_task_end(self, t: int, data: Iterable | None = None) -> None:
        """After task t: the method's end of task (class statistics, for the methods that keep them, from `data`:
        batches of the task's training images under the test transform) and its task-adaptive prediction."""
        with to_logger():
            self.method.end_task(t, data)
            self.method.align(t)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.method.checkpoint_state(), "task": self.task, "seen": self.seen.cpu(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_checkpoint_state(state["model"], "the learner's state")
        self.task, self.seen = state["task"], state["seen"].to(self.seen.device)
        if state.get("optimizer") is not None and self.task is not None:
            self.on_task_start(self.task)
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])


def _check_setting_names(method: str, settings: dict[str, Any]) -> None:
    known = {f.name for group in (*COMMON_GROUPS, *method_groups(method)) for f in group.__dataclass_fields__.values()}
    unknown = sorted(set(settings) - known)
    if unknown:
        other = [name for name in unknown if name in field_index()]
        why = f" ({', '.join(other)} belong to other methods)" if other else ""
        raise UserError(f"{method} has no setting {', '.join(unknown)}{why}; its settings are its command-line flags "
                        f"with underscores (python main.py digits_{method} --help)")


def learner_config(method: str, num_classes: int, task_mask: Sequence[Sequence[int]], backbone: str | None = None,
                   **settings: Any) -> Config:
    """The resolved settings of a learner: the command line's resolution (defaults, method presets, checks) of the
    given settings, by flag name."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if backbone is not None:
        settings["model"] = backbone
    _check_setting_names(method, settings)
    explicit = {"num_classes": num_classes, "num_tasks": len(task_mask), "dataset": "python", "output_dir": "",
                "tensorboard": False, **settings}
    return resolve(f"python_{method}", "python", method, explicit)


def create_learner(method: str, num_classes: int, task_mask: Sequence[Sequence[int]], backbone: str | None = None,
                   distributed: bool = False, **settings: Any) -> Learner:
    """A learner of `method` ("l2p", "dualprompt", "linear", ...) over `num_classes` classes whose task t may
    predict the classes `task_mask[t]`; `backbone` is --model (any backbone table or timm ViT name), `settings` any
    other flag of the method by its underscored name (lr=0.01, pretrained=False, amp="none", ...). `distributed`:
    join the process group a launcher (torchrun) set up, as main.py does; otherwise this process alone."""
    cfg = learner_config(method, num_classes, task_mask, backbone, **settings)
    ctx = init_distributed(cfg.run.device, cfg.dist.dist_url, None, cfg.dist.dist_timeout) if distributed \
        else DistContext(device=resolve_device(cfg.run.device))
    order = make_class_order(num_classes, False, cfg.run.seed)
    masks = [sorted(int(c) for c in classes) for classes in task_mask]
    bad = [c for classes in masks for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"task_mask holds class {bad[0]}, outside 0..{num_classes - 1}")
    scenario = Scenario(class_order=order, task_classes=masks, num_classes=num_classes)
    seed_everything(cfg.run.seed)
    with to_logger():
        method_module = create_method(cfg, scenario).to_run_device(ctx.device, cfg.run.amp)
    return Learner(method_module, cfg, ctx)

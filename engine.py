"""The continual loop shared by every method: per task, train, let the method finish the task, evaluate every seen
task, then log and checkpoint.

`run` trains (or resumes); `evaluate_checkpoints` re-evaluates a finished run from its task checkpoints.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel

import compilation
import metrics
import preemption
from config.resolved import Config, config_to_dict
from datasets.scenario import Scenario
from divergence import LossWatch, check_loss, check_tensors
from models.base import ContinualMethod
from provenance import Provenance
from rolling_state import (
    RollingWriter,
    gather_rng,
    load_rolling_state,
    rank_rng,
    restore_rng,
    rolling_state_path,
    snapshot,
)
from run_files import (
    check_same_experiment,
    check_same_settings,
    checkpoint_path,
    completed_tasks,
    load_checkpoint,
    read_run_json,
)
from run_logger import MultiLogger, RunLogger, TensorBoardLogger
from utils import (
    DistContext,
    UserError,
    all_reduce_sum,
    atomic_torch_save,
    atomic_write_json,
    broadcast_object,
    is_main_process,
    log,
    maybe_autocast,
    remove_stale_temporaries,
    seed_everything,
    seed_rank_streams,
)


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------
def create_optimizer(param_groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    optim = cfg.optim
    kwargs: dict[str, Any] = dict(opt=optim.opt, lr=cfg.context.effective_lr, weight_decay=optim.weight_decay,
                                  momentum=optim.momentum)
    if "adam" in optim.opt.lower() or "lamb" in optim.opt.lower():
        kwargs.update(eps=optim.opt_eps, betas=tuple(optim.opt_betas))
    try:
        return create_optimizer_v2(param_groups, **kwargs)
    except (ValueError, AssertionError) as err:
        raise UserError(f"--opt {optim.opt}: {err}") from err


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    """None for `constant` (the reference's default). The scheduler is stepped after each epoch with that epoch's
    index, as in the reference (the LR of epoch e+1 is the schedule's value at e)."""
    o = cfg.optim
    if o.sched == "constant":
        return None
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=o.sched, num_epochs=o.epochs, decay_epochs=o.decay_epochs, decay_rate=o.decay_rate,
            min_lr=o.min_lr, warmup_lr=o.warmup_lr, warmup_epochs=o.warmup_epochs, cooldown_epochs=o.cooldown_epochs,
            patience_epochs=o.patience_epochs, noise=list(o.lr_noise) if o.lr_noise else None,
            noise_pct=o.lr_noise_pct, noise_std=o.lr_noise_std, noise_seed=cfg.run.seed)
    except (ValueError, AssertionError) as err:
        raise UserError(f"--sched {o.sched}: {err}") from err
    return scheduler


class Progress:
    """A tqdm bar in a terminal; otherwise a log line every `print_freq` steps (rank 0 only)."""

    def __init__(self, total: int, desc: str, print_freq: int):
        self.total, self.desc, self.print_freq = total, desc, max(print_freq, 1)
        self.bar = None
        if is_main_process() and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, step: int, stats: dict[str, float]) -> None:
        text = " ".join(f"{k} {v:.4g}" for k, v in stats.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.print_freq == 0 and step != self.total:  # the epoch's own line follows its last step
            log(f"{self.desc} step {step}/{self.total} {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list[torch.nn.Parameter], clip_grad: float | None) -> None:
    """Backward, gradient-norm clipping (when clip_grad > 0) and the optimizer step, fp16 loss scaling included."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad and clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()


def mask_logits(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return logits if mask is None else logits.detach().float().masked_fill(~mask, float("-inf"))


class TaskInProgress:
    """Task t as it runs: its finished phases, the optimizers, what to say when it stops, and its rolling state (the
    one a --resume continues from, and the one written after every epoch)."""

    def __init__(self, t: int, method: ContinualMethod, cfg: Config, optimizers: dict[str, Any],
                 writer: RollingWriter, record: RunRecord, resumed: dict[str, Any] | None = None):
        self.t, self.method, self.cfg, self.optimizers, self.writer = t, method, cfg, optimizers, writer
        self.record = record
        self.resumed = resumed
        self.started = time.perf_counter()
        self.phases: dict[str, Any] = dict(resumed["phases"]) if resumed else {}
        # the seconds each finished phase spent on its parts (train, statistics, evaluate, align)
        self.seconds: dict[str, dict[str, float]] = dict(resumed.get("seconds", {})) if resumed else {}
        self.earlier_seconds = sum(sum(parts.values()) for parts in self.seconds.values())  # by an earlier launch
        self.watches: dict[str, LossWatch] = {}
        if resumed:
            self.saved = f"task {t + 1} continues after epoch {resumed['epoch']}{self._of(resumed['phase'])}"
        else:
            self.saved = f"tasks 1..{t} are saved" if t else "no task is finished yet"

    def eta(self, phase: str, epochs_done: int, epochs: int) -> str:
        """Time left to the task and to the run, extrapolated from this launch's pace so far (statistics and
        evaluation count as training does, so the estimate is rough: say so with ~)."""
        order, now = self.method.phases, time.perf_counter()
        task_part = (order.index(phase) + epochs_done / epochs) / len(order)
        clock = self.record.clock
        run_done = self.t + task_part - clock.first_task
        task_left = (now - self.started) * (1 - task_part) / task_part
        run_left = (now - clock.started) * (clock.last_task + 1 - self.t - task_part) / run_done
        return f"ETA task ~{duration(task_left)}, run ~{duration(run_left)}"

    def _of(self, phase: str) -> str:
        return f" of phase {phase}" if len(self.method.phases) > 1 else ""

    def where(self, phase: str, detail: str = "") -> str:
        return f"task {self.t + 1}" + (f" phase {phase}" if len(self.method.phases) > 1 else "") + detail

    def fix(self, phase: str) -> str:
        return f"lower {self.method.lr_flag(phase)}, or use --amp none"

    def watch(self, phase: str) -> LossWatch:
        return self.watches.setdefault(phase, LossWatch("training", self.fix(phase)))

    def stop_if_requested(self, device: torch.device, phase: str, detail: str) -> None:
        preemption.stop_if_requested(device, self.where(phase, detail), self.saved)

    def skips(self, phase: str) -> bool:
        """Finished before the run stopped: its trained state is in the rolling state, its results in `phases`."""
        order = self.method.phases
        return self.resumed is not None and order.index(phase) < order.index(self.resumed["phase"])

    def carried_seconds(self, phase: str | None = None) -> float:
        """Seconds the launch that saved the rolling state spent on `phase`'s finished epochs, or (None) on the task's
        finished phases and epochs: a resumed task's timings count them."""
        state = self.resumed
        if state is None:
            return 0.0
        training = float(state["train"]["seconds"]) if phase in (None, state["phase"]) else 0.0
        return training + (self.earlier_seconds if phase is None else 0.0)

    def restore(self, phase: str, optimizer: torch.optim.Optimizer, scheduler, scaler) -> dict[str, float]:
        """Continue `phase` where the rolling state left it (after begin_task, which it overrides); returns the epochs
        done and the training totals so far."""
        state = self.resumed
        if state is None or state["phase"] != phase:
            return {"epoch": 0, "images": 0.0, "seconds": 0.0}
        self.method.load_checkpoint_state(state["model"], str(rolling_state_path(self.cfg.run.output_dir)))
        optimizer.load_state_dict(state["optimizers"][phase])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(rank_rng(state))
        return {"epoch": state["epoch"], **state["train"]}

    def save(self, phase: str, epoch: int, optimizer: torch.optim.Optimizer, scheduler, scaler,
             train: dict[str, float]) -> None:
        """After `epoch` epochs of `phase` (every rank calls it: the RNG states are gathered)."""
        tensors = self.method.trained_tensors()
        check_tensors(tensors, self.where(phase, f" after epoch {epoch}"), self.fix(phase))
        rng = gather_rng()
        self.saved = f"task {self.t + 1} continues after epoch {epoch}{self._of(phase)}"
        if not is_main_process():
            return
        optimizers = {k: v.state_dict() for k, v in self.optimizers.items() if v is not None}
        optimizers[phase] = optimizer.state_dict()
        self.writer.submit(snapshot({
            "task": self.t, "phase": phase, "epoch": epoch, "model": tensors, "optimizers": optimizers,
            "scheduler": scheduler.state_dict() if scheduler is not None else None, "scaler": scaler.state_dict(),
            "rng": rng, "phases": self.phases, "seconds": self.seconds, "train": train, "config": self.record.config}))


def _checkpoint_step(totals: torch.Tensor, images: int, ctx: DistContext, task: TaskInProgress, phase: str,
                     at: str) -> tuple[list[float], bool]:
    """One all-reduce of the running totals and the preemption flags: ([loss sum, correct, images] over all ranks,
    whether any rank was asked to stop). A non-finite loss anywhere stops every rank here; an exploding one warns."""
    local = torch.cat([totals, totals.new_tensor([float(images)]), preemption.flag_tensor(ctx.device)])
    *reduced, stop = all_reduce_sum(local).tolist()
    check_loss(reduced[0], "training", at, task.fix(phase))
    task.watch(phase).update(reduced[0] / reduced[2], at)
    return reduced, stop > 0


def train_one_epoch(model: Callable[..., tuple[torch.Tensor, torch.Tensor]], method: ContinualMethod, loader,
                    optimizer, scaler, epoch: int, cfg: Config, ctx: DistContext, task: TaskInProgress,
                    phase: str) -> dict[str, float]:
    """One epoch. Every `print_freq` steps (and at a phase's first step, the loss later ones are compared with) one
    all-reduce gives the progress line its global values and every rank the divergence and preemption verdicts: no
    other host synchronisation per step."""
    method.train()
    t = task.t
    params = [p for p in method.parameters() if p.requires_grad]
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, correct
    images_seen = 0
    mask = method.train_mask(t)
    progress = Progress(len(loader), f"task {t + 1} epoch {epoch + 1}/{cfg.optim.epochs}", cfg.run.print_freq)
    start = time.perf_counter()
    reduced = [0.0, 0.0, 0.0]
    for step, (images, targets) in enumerate(loader, 1):
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        with compilation.timed(model):  # the step, not the forward alone: the first backward compiles too
            with maybe_autocast(ctx.device, cfg.run.amp):
                loss, logits = model(images, targets, t)
            optimizer_step(loss, optimizer, scaler, params, cfg.optim.clip_grad)
        totals += torch.stack([loss.detach().double() * len(targets),
                               (mask_logits(logits, mask).argmax(1) == targets).sum().double()])
        images_seen += len(targets)
        report = step % progress.print_freq == 0 or step == len(loader)
        if not report and task.watch(phase).first is not None:
            progress.update(step, {})
            continue
        at = task.where(phase, f" epoch {epoch + 1}/{cfg.optim.epochs} step {step}/{len(loader)}")
        reduced, stop = _checkpoint_step(totals, images_seen, ctx, task, phase, at)
        if stop and step < len(loader):  # at the last step the epoch ends and is saved first
            raise preemption.preempted(at, task.saved)
        loss_sum, correct, seen = reduced
        progress.update(step, {"loss": loss_sum / seen, "acc": 100 * correct / seen,
                               "lr": optimizer.param_groups[0]["lr"],
                               "img/s": seen / (time.perf_counter() - start)} if report else {})
    progress.close()
    loss_sum, correct, seen = reduced
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / seen, "acc": 100 * correct / seen, "lr": optimizer.param_groups[0]["lr"],
            "lrs": [group["lr"] for group in optimizer.param_groups], "images": seen, "seconds": seconds,
            "images_per_second": seen / seconds}


def wrap_for_training(method: ContinualMethod, ctx: DistContext, compile_forward: bool = False) -> torch.nn.Module:
    """DDP under a process group (re-wrapped per task: the trainable set may change between tasks, e.g. fix).
    Buffers are synchronised once here, not at every step: class statistics, masks and maps are identical on every
    rank by construction (HiDe's statistics alone would be 23 MiB per step, 902 MiB with full covariances).
    `compile_forward` compiles the method's forward first: the inner module, then DDP, as PyTorch recommends."""
    if compile_forward:
        compilation.compile_forward(method)
    if not ctx.distributed:
        return method
    return DistributedDataParallel(method, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                   find_unused_parameters=method.find_unused_parameters, forward_sync_buffers=False)


def train_task(method: ContinualMethod, scenario: Scenario, cfg: Config, ctx: DistContext,
               task: TaskInProgress, phase: str) -> tuple[torch.optim.Optimizer | None, dict[str, float]]:
    """Train `phase` of the task (from where its rolling state left it); a rolling state after every epoch."""
    t, optimizer = task.t, task.optimizers.get(phase)
    param_groups = [g for g in method.begin_task(t) if g["params"]]
    if not method.trains or cfg.optim.epochs == 0 or not param_groups:
        return optimizer, {}
    if optimizer is None or cfg.optim.reinit_optimizer:
        optimizer = create_optimizer(param_groups, cfg)
    scheduler = create_scheduler(optimizer, cfg)
    compiling = compilation.enabled(cfg.run.compile, ctx.device)
    model = wrap_for_training(method, ctx, compiling)
    if compiling:
        what = "training step" + (f" of phase {phase}" if len(method.phases) > 1 else "")
        model = compilation.training_forward(method, model, what, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.run.amp == "fp16")
    loader = scenario.train_loader(t)
    seed_rank_streams(cfg.run.seed, t, method.phases.index(phase))
    done = task.restore(phase, optimizer, scheduler, scaler)
    train = {k: v for k, v in done.items() if k != "epoch"}
    for epoch in range(int(done["epoch"]), cfg.optim.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, method, loader, optimizer, scaler, epoch, cfg, ctx, task, phase)
        train = {"images": train["images"] + stats["images"], "seconds": train["seconds"] + stats["seconds"],
                 "loss": stats["loss"], "acc": stats["acc"]}
        log(f"task {t + 1} epoch {epoch + 1}/{cfg.optim.epochs}: loss {stats['loss']:.4f} acc {stats['acc']:.2f} "
            f"lr {stats['lr']:.3g} ({stats['images_per_second']:.1f} img/s) | "
            f"{task.eta(phase, epoch + 1, cfg.optim.epochs)}")
        task.record.log_epoch(phase, t * cfg.optim.epochs + epoch + 1, stats)
        if scheduler is not None:
            scheduler.step(epoch)
        task.save(phase, epoch + 1, optimizer, scheduler, scaler, train)
        task.stop_if_requested(ctx.device, phase, f" after epoch {epoch + 1}/{cfg.optim.epochs}")
    seconds = train["seconds"]
    return optimizer, {"train_loss": train["loss"], "train_acc": train["acc"], "train_seconds": seconds,
                       "train_images_per_second": train["images"] / seconds if seconds else 0.0}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
def predict_batch(method: ContinualMethod, images: torch.Tensor,
                  batch_key: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The evaluation forward of one test batch: logits, and the task each image is inferred to belong to (None:
    the task of the predicted class)."""
    return method.predict(images, batch_key=batch_key), method.predict_task(images, batch_key=batch_key)


def evaluation_forward(method: ContinualMethod, cfg: Config, ctx: DistContext) -> Callable:
    """`predict_batch`, compiled when --compile asks for it."""
    if compilation.enabled(cfg.run.compile, ctx.device):
        return compilation.evaluation_forward(method, predict_batch, ctx.device)
    return predict_batch


@torch.no_grad()
def count_test_set(method: ContinualMethod, forward: Callable, loader, i: int, allowed: torch.Tensor | None,
                   class_to_task: torch.Tensor | None, amp: str, device: torch.device) -> torch.Tensor:
    """This rank's [correct, task inferred right, images] over test set i; `allowed` masks the classes that can be
    predicted, `class_to_task` (None: no task identity) gives a predicted class's task when the method infers none."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for batch, (images, targets) in enumerate(loader):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with maybe_autocast(device, amp), compilation.timed(forward):
            logits, inferred_task = forward(method, images, ("test", i, batch))
        predicted = mask_logits(logits, allowed).argmax(1)
        if inferred_task is None and class_to_task is not None:
            inferred_task = class_to_task[predicted]
        task_right = (inferred_task == i).sum() if inferred_task is not None else targets.new_zeros(())
        counts += torch.stack([(predicted == targets).sum(), task_right, targets.new_tensor(len(targets))]).double()
    return counts


@torch.no_grad()
def evaluate(method: ContinualMethod, scenario: Scenario, t: int, cfg: Config, ctx: DistContext,
             sets: Sequence[int] | None = None) -> dict:
    """Accuracy on each test set evaluated after task t (`sets`, default: those of the tasks seen so far, or the
    common one), and task-identity accuracy where a class tells its task (the share of each test set's images whose
    inferred task is right: the method's own inference, or the task of the predicted class). Each rank takes a
    disjoint shard and the counts are summed over ranks, so every test image is counted exactly once whatever the
    world size."""
    method.eval()
    sets = scenario.evaluated_sets(t) if sets is None else list(sets)
    # --eval_all_classes: the argmax over every class of the head, as the reference (untrained rows included)
    seen = None if cfg.data.eval_all_classes else scenario.seen_mask(t).to(ctx.device)
    class_to_task = scenario.class_to_task.to(ctx.device) if scenario.has_task_identity else None
    forward = evaluation_forward(method, cfg, ctx)
    start = time.perf_counter()
    counts = torch.stack([
        count_test_set(method, forward, scenario.test_loader(i), i,
                       scenario.class_mask(i).to(ctx.device) if cfg.data.task_inc else seen, class_to_task,
                       cfg.run.amp, ctx.device) for i in sets])
    correct, task_right, total = all_reduce_sum(counts).T.tolist()
    task_acc = [100.0 * c / max(n, 1.0) for c, n in zip(correct, total, strict=True)]
    tii_acc = [100.0 * r / max(n, 1.0) for r, n in zip(task_right, total, strict=True)]
    n = sum(total)
    seconds = time.perf_counter() - start
    return {"task_acc": task_acc, "tii_acc": tii_acc if class_to_task is not None else None,
            "overall_acc": 100.0 * sum(correct) / max(n, 1.0), "test_images": int(n), "eval_seconds": seconds,
            "eval_images_per_second": n / seconds if seconds else 0.0}


# ----------------------------------------------------------------------------------------------------------------
# Results: stdout, TensorBoard, results.json
# ----------------------------------------------------------------------------------------------------------------
# the per-task summary values logged under eval/; avg_acc and forgetting also untagged, with accuracy_<n>
EVAL_KEYS = ("avg_acc", "avg_incremental_acc", "forgetting", "forgetting_standard", "bwt", "overall_acc", "avg_tii_acc")
UNTAGGED_KEYS = ("avg_acc", "forgetting")  # the tags the L2P README names


def create_logger(cfg: Config, output_dir: Path) -> RunLogger:
    """Rank 0's curves: TensorBoard events in output_dir/tensorboard (--tensorboard) and W&B (--wandb); the other
    ranks log nothing."""
    if not is_main_process():
        return RunLogger()
    loggers: list[RunLogger] = [TensorBoardLogger(output_dir / "tensorboard")] if cfg.run.tensorboard else []
    if cfg.run.wandb:
        from wandb_logger import WandbLogger  # noqa: PLC0415 (only with --wandb)
        loggers.append(WandbLogger(cfg.run, output_dir))
    return MultiLogger(loggers)


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class RunClock:
    """When this launch started, and the tasks it runs (0-based, last included), for the ETA."""
    first_task: int = 0
    last_task: int = 0
    started: float = field(default_factory=time.perf_counter)


class RunRecord:
    """The accuracy matrix and per-task metrics of one run, written atomically to a JSON file after each task with the
    run's provenance, and its curves (through `logger`: per epoch, per phase, per task)."""

    def __init__(self, cfg: Config, scenario: Scenario, output_dir: Path, filename: str = "results.json",
                 logger: RunLogger | None = None, provenance: Provenance | None = None):
        self.cfg, self.scenario = cfg, scenario
        self.config = config_to_dict(cfg)  # on a resume, the run's own: a resume changes nothing of a result
        self.path = output_dir / filename
        num_tasks = scenario.num_tasks
        self.acc = np.zeros((scenario.num_test_sets, num_tasks))  # [test set, after task]
        self.tasks: list[dict[str, Any]] = []
        self.logger = logger if logger is not None else RunLogger()
        self.provenance = provenance
        self.clock = RunClock(last_task=num_tasks - 1)

    def add(self, t: int, evaluation: dict, extra: dict[str, Any]) -> dict[str, Any]:
        """Task t's results (every rank calls it: the provenance gathers over the ranks)."""
        common = self.scenario.common_test_set
        self.acc[self.scenario.evaluated_sets(t), t] = evaluation["task_acc"]
        tii = evaluation["tii_acc"]
        entry = {"task": t + 1, **metrics.summarize(self.acc, t, common), "overall_acc": evaluation["overall_acc"],
                 "tii_acc": tii, "avg_tii_acc": float(np.mean(tii)) if tii is not None else None,
                 "test_images": evaluation["test_images"], "eval_seconds": evaluation["eval_seconds"],
                 "eval_images_per_second": evaluation["eval_images_per_second"], **extra}
        del self.tasks[t:]
        self.tasks.append(entry)
        if self.provenance is not None:
            self.provenance.update(t)
        log(metrics.format_matrix(self.acc, t, common))
        identity = f" | task identity {entry['avg_tii_acc']:.2f}" if tii is not None else ""
        log(metrics.format_summary(entry, t, self.scenario.num_tasks) + f" | overall {entry['overall_acc']:.2f}"
            + identity)
        self._log_task(t, entry)
        return entry

    def _log_task(self, t: int, entry: dict[str, Any]) -> None:
        accuracies = {f"accuracy_{i + 1}": float(self.acc[i, t]) for i in self.scenario.evaluated_sets(t)}
        summary = {key: entry[key] for key in EVAL_KEYS if entry[key] is not None}
        values = {**accuracies, **{key: summary[key] for key in UNTAGGED_KEYS if key in summary}}
        values.update({f"eval/{key}": value for key, value in {**accuracies, **summary}.items()})
        for phase, result in entry.get("phases", {}).items():  # earlier phases and the pre-alignment results
            values.update({f"eval/{phase}/{key}": result[key] for key in ("avg_acc", "avg_tii_acc")})
        if "wall_seconds" in entry:
            values["time/task_seconds"] = entry["wall_seconds"]
        self.logger.log_scalars(values, t + 1)
        if self.logger.records:  # the matrix with its numbers, axes and colour scale, as the report draws it
            import plots  # matplotlib only where a figure is drawn: not at every process's start-up
            self.logger.log_image("acc_matrix", plots.run_matrix_figure(self.acc, t, self.cfg.subcommand), t + 1)
        self.logger.log_text("acc_matrix", metrics.format_matrix(self.acc, t, self.scenario.common_test_set), t + 1)
        self.logger.flush()

    def log_epoch(self, phase: str, step: int, stats: dict[str, Any]) -> None:
        """One training epoch of `phase`; `step` counts its epochs over the tasks, so successive tasks' curves follow
        each other."""
        head = f"train/{phase}"
        self.logger.log_scalars({f"{head}/loss": stats["loss"], f"{head}/acc": stats["acc"], f"{head}/lr": stats["lr"],
                                 **{f"{head}/lr_group{k}": lr for k, lr in enumerate(stats["lrs"])},
                                 f"{head}/images_per_second": stats["images_per_second"]}, step)

    def log_phase(self, t: int, phase: str, seconds: dict[str, float], alignment_losses: Sequence[float],
                  statistics: dict[str, float]) -> None:
        """What the phase of task t spent on each part, its class statistics' sizes and its task-adaptive-prediction
        losses (a point per alignment epoch, counted over the tasks, and the last)."""
        values = {f"time/{phase}/{part}_seconds": value for part, value in seconds.items()}
        if statistics:
            values.update({f"stats/{phase}/seconds": seconds["statistics"],
                           **{f"stats/{phase}/{key}": value for key, value in statistics.items()}})
        if alignment_losses:
            values[f"tap/{phase}/final_loss"] = alignment_losses[-1]
            epochs = len(alignment_losses)
            for epoch, loss in enumerate(alignment_losses):
                self.logger.log_scalars({f"tap/{phase}/loss": loss}, t * epochs + epoch + 1)
        self.logger.log_scalars(values, t + 1)

    def as_dict(self) -> dict[str, Any]:
        done = len(self.tasks)
        first = self.scenario.first_evaluation
        matrix = [[float(self.acc[i, c]) if first(i) <= c < done else None for c in range(self.scenario.num_tasks)]
                  for i in range(self.scenario.num_test_sets)]
        return {"subcommand": self.cfg.subcommand, "method": self.cfg.method, "dataset": self.cfg.data.dataset,
                "model": self.cfg.backbone.model, "num_tasks": self.scenario.num_tasks, "completed_tasks": done,
                "class_order": self.scenario.class_order, "task_classes": self.scenario.task_classes,
                "acc_matrix": matrix, "tasks": self.tasks, "final": self.tasks[-1] if self.tasks else None,
                "provenance": self.provenance.as_dict() if self.provenance is not None else None,
                "config": self.config}

    def restore(self, saved: dict[str, Any], completed: int) -> None:
        for i, row in enumerate(saved["acc_matrix"]):
            for c, value in enumerate(row):
                if value is not None and c < completed:
                    self.acc[i, c] = value
        self.tasks = saved["tasks"][:completed]
        self.config = saved.get("config", self.config)
        if self.provenance is not None:  # the launches that wrote these results stay on record
            self.provenance.continue_from(saved.get("provenance"))

    def save(self) -> None:
        if is_main_process():
            atomic_write_json(self.as_dict(), self.path)

    def close(self) -> None:
        self.logger.close()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def restore_task(method: ContinualMethod, cfg: Config, t: int) -> dict[str, Any]:
    """Load into `method` what it saved after task t in `cfg.run.output_dir`, once the checkpoint is shown to belong to
    this experiment; returns the whole checkpoint."""
    path = checkpoint_path(cfg.run.output_dir, t)
    saved = load_checkpoint(path)
    check_same_experiment(saved["config"], cfg, path)
    method.load_checkpoint_state(saved["model"], str(path))
    return saved


def evaluation_summary(evaluation: dict, train_stats: dict[str, float] | None = None) -> dict[str, Any]:
    """What results.json keeps of an evaluation that is not the run's main one (an earlier phase, pre-alignment)."""
    return {"task_acc": evaluation["task_acc"], "avg_acc": float(np.mean(evaluation["task_acc"])),
            "tii_acc": evaluation["tii_acc"], "avg_tii_acc": float(np.mean(evaluation["tii_acc"])),
            **(train_stats or {})}


class Stopwatch:
    """Seconds between successive laps (time.perf_counter)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def run_phase(method: ContinualMethod, phase: str, scenario: Scenario, cfg: Config, ctx: DistContext,
              task: TaskInProgress) -> tuple[dict, dict]:
    """One phase of the task: train, finish (statistics), evaluate; with task-adaptive prediction, evaluate again
    (the first result goes to the task's phases as `<phase>_pre_alignment`). Returns (evaluation, train stats); the
    seconds of each part go to `task.seconds[phase]`."""
    t = task.t
    seed_everything(cfg.run.seed + t)  # each task (and phase) is reproducible on its own, so a resumed run matches
    phase_cfg = method.set_phase(phase)
    method.invalidate_state_cache()
    task.stop_if_requested(ctx.device, phase, " before training")
    clock = Stopwatch()
    task.optimizers[phase], train_stats = train_task(method, scenario, phase_cfg, ctx, task, phase)
    seconds = {"train": clock.lap() + task.carried_seconds(phase)}
    method.end_task(t, scenario.stats_loader(t, per_class=cfg.data.stats_per_class))
    statistics = method.statistics_summary()
    seconds["statistics"] = clock.lap()
    task.stop_if_requested(ctx.device, phase, " after its class statistics")
    evaluation = evaluate(method, scenario, t, cfg, ctx)
    task.stop_if_requested(ctx.device, phase, " after its evaluation")
    seconds["evaluate"] = clock.lap()
    aligned = method.align(t)
    if aligned:
        seconds["align"] = clock.lap()
        task.phases[f"{phase}_pre_alignment"] = evaluation_summary(evaluation)
        before = task.phases[f"{phase}_pre_alignment"]
        log(f"task {t + 1} {phase} before alignment: A_t {before['avg_acc']:.2f} | task identity "
            f"{before['avg_tii_acc']:.2f}")
        evaluation = evaluate(method, scenario, t, cfg, ctx)
        seconds["evaluate"] += clock.lap()
    task.seconds[phase] = seconds
    task.record.log_phase(t, phase, seconds, method.alignment_losses if aligned else (), statistics)
    return evaluation, train_stats


def _restore_optimizers(method: ContinualMethod, states: dict[str, Any], t: int) -> dict[str, Any]:
    """The optimizers of `states` (by phase), over the parameter groups of task t, for those that carry over."""
    optimizers: dict[str, Any] = {}
    for phase, state in states.items():
        phase_cfg = method.set_phase(phase)
        optimizers[phase] = create_optimizer([g for g in method.begin_task(t) if g["params"]], phase_cfg)
        optimizers[phase].load_state_dict(state)
    return optimizers


def _resume(method: ContinualMethod, cfg: Config, record: RunRecord,
            num_tasks: int) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    """With --resume: the tasks already done (their last checkpoint loaded into `method` and `record`), the optimizers
    that carry over between tasks, and the rolling state of the task in progress (None: it starts afresh)."""
    output_dir = Path(cfg.run.output_dir)
    # rank 0 decides, so that every rank starts at the same task whatever it sees on disk
    start = broadcast_object(completed_tasks(output_dir, num_tasks) if cfg.run.resume and is_main_process() else 0)
    optimizers: dict[str, Any] = {}
    if start:
        saved = restore_task(method, cfg, start - 1)
        check_same_settings(saved["config"], cfg)
        record.restore(saved["results"], start)
        log(f"resuming from {checkpoint_path(output_dir, start - 1)}: tasks 1..{start} done")
        log(metrics.format_matrix(record.acc, start - 1))
        carried = {} if cfg.optim.reinit_optimizer else saved.get("optimizers") or {}
        optimizers = _restore_optimizers(method, carried, start)
    rolling = load_rolling_state(cfg, start) if cfg.run.resume and start < num_tasks else None
    if rolling is not None and not start:
        record.config = rolling["config"]
    elif cfg.run.resume and not start and (output_dir / "config.json").is_file():  # stopped before any epoch ended
        record.config = read_run_json(output_dir / "config.json", "delete it to start the run afresh")
        check_same_settings(record.config, cfg)
    return start, optimizers, rolling


def _run_task(method: ContinualMethod, scenario: Scenario, cfg: Config, ctx: DistContext,
              task: TaskInProgress) -> tuple[dict, dict[str, Any]]:
    """Every phase of the task not done yet; returns the last phase's evaluation and what results.json keeps."""
    t, start = task.t, time.perf_counter()
    if task.resumed is not None:  # the finished phases' optimizers, as the task checkpoint keeps them
        finished = {k: v for k, v in task.resumed["optimizers"].items() if task.skips(k)}
        task.optimizers.update(_restore_optimizers(method, finished, t))
    for phase in method.phases:
        if task.skips(phase):
            continue
        if len(method.phases) > 1:
            log(f"--- task {t + 1} phase {phase}")
        evaluation, train_stats = run_phase(method, phase, scenario, cfg, ctx, task)
        if phase != method.phases[-1]:
            task.phases[phase] = evaluation_summary(evaluation, train_stats)
            log(f"task {t + 1} {phase}: A_t {task.phases[phase]['avg_acc']:.2f} | task identity "
                f"{task.phases[phase]['avg_tii_acc']:.2f}")
    timings = {"wall_seconds": time.perf_counter() - start + task.carried_seconds(), "phase_seconds": task.seconds}
    return evaluation, {**train_stats, **timings, **({"phases": task.phases} if task.phases else {})}


def _save_task(method: ContinualMethod, task: TaskInProgress, cfg: Config) -> None:
    """The task checkpoint (never holding NaN), then results.json, then the rolling state goes: results never claim a
    task whose checkpoint is absent, and a resume never continues a task that is done."""
    t = task.t
    check_tensors(method.trained_tensors(), f"task {t + 1}", task.fix(method.phases[-1]))
    task.writer.wait()
    if is_main_process():
        atomic_torch_save({"model": method.checkpoint_state(),
                           "optimizers": {k: v.state_dict() for k, v in task.optimizers.items() if v is not None},
                           "task": t, "results": task.record.as_dict(), "config": task.record.config},
                          checkpoint_path(cfg.run.output_dir, t))
        task.record.save()
    task.writer.remove()


def run(method: ContinualMethod, scenario: Scenario, cfg: Config, ctx: DistContext) -> dict[str, Any]:
    output_dir = Path(cfg.run.output_dir)
    record = RunRecord(cfg, scenario, output_dir, logger=create_logger(cfg, output_dir),
                       provenance=Provenance(cfg, ctx.device))
    if is_main_process():
        for folder in (output_dir, checkpoint_path(output_dir, 0).parent):
            remove_stale_temporaries(folder)
    start, optimizers, rolling = _resume(method, cfg, record, scenario.num_tasks)
    record.logger.log_config({**record.config, "provenance": record.provenance.as_dict()})
    if is_main_process() and not (output_dir / "config.json").is_file():  # a resume keeps the run's own
        atomic_write_json(record.config, output_dir / "config.json")
    stop_after = cfg.run.stop_after_task
    stop = scenario.num_tasks if stop_after is None else min(stop_after, scenario.num_tasks)
    record.clock = RunClock(first_task=start, last_task=stop - 1)
    writer = RollingWriter(output_dir)
    try:
        for t in range(start, stop):
            log(f"=== task {t + 1}/{scenario.num_tasks}: classes {scenario.task_classes[t]}")
            task = TaskInProgress(t, method, cfg, optimizers, writer, record, rolling if t == start else None)
            evaluation, extra = _run_task(method, scenario, cfg, ctx, task)
            record.add(t, evaluation, extra)
            _save_task(method, task, cfg)
    finally:
        record.close()
        writer.wait()  # a preempted or failing run leaves its last rolling state whole
    if stop < scenario.num_tasks:
        log(f"stopped after task {stop} as asked; continue with --resume")
    return record.as_dict()


def evaluate_checkpoints(method: ContinualMethod, scenario: Scenario, cfg: Config, ctx: DistContext) -> dict:
    """--eval: reload each task's checkpoint and evaluate the tasks seen by then; writes eval_results.json."""
    output_dir = Path(cfg.run.output_dir)
    # re-evaluation must not add a second set of curves to the training run's TensorBoard events (nor W&B's)
    record = RunRecord(cfg, scenario, output_dir, filename="eval_results.json", provenance=Provenance(cfg, ctx.device))
    phase = method.phases[-1]
    method.set_phase(phase)
    for t in range(scenario.num_tasks):
        clock = Stopwatch()
        preemption.stop_if_requested(ctx.device, f"the evaluation of task {t + 1}", "nothing of --eval is written")
        restore_task(method, cfg, t)
        method.load_task_context(t)
        log(f"=== evaluating {checkpoint_path(output_dir, t)}")
        evaluation = evaluate(method, scenario, t, cfg, ctx)
        record.add(t, evaluation, {"wall_seconds": clock.lap(),
                                   "phase_seconds": {phase: {"evaluate": evaluation["eval_seconds"]}}})
    record.save()  # once every task is evaluated: a failed --eval leaves no partial file
    return record.as_dict()

"""What the rolling state costs: the time of an epoch with and without it, measured side by side (alternating which
goes first), on a task of random images as large as a CIFAR-100 task (5000 images) unless --images says otherwise.

    python benchmarks/rolling_state.py cifar100_hideprompt --model vit_tiny_patch16_224 --input-size 32 \
        --device cpu [--images 5000] [--repeats 3] [--json PATH]

Every flag other than --images, --repeats and --json is a main.py flag, resolved with the subcommand's presets;
here `--epochs` (and HiDe's `--tii_epochs`) default to 2 and `--pretrained` to False (weights make no difference to
speed). Each row is one training phase of
the method (HiDe: tii, wtp). "with" includes everything the rolling state adds: the non-finite check, gathering the
RNG states, the copies, and waiting for the previous background write (and the last one); "waited" is that time
alone, per epoch and as a share of the epoch without it (the difference of two epoch times is noisier than the cost
when the cost is small). CPU numbers are only
meaningful on an otherwise idle machine; the header shows the 1-minute load average. One untimed run per phase
comes first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
from config.cli import parse_args  # noqa: E402
from config.resolved import Config  # noqa: E402
from datasets import build_scenario  # noqa: E402
from datasets.base import Benchmark, TransformedDataset  # noqa: E402
from datasets.scenario import LoaderSettings, Scenario  # noqa: E402
from models import create_method  # noqa: E402
from models.base import ContinualMethod  # noqa: E402
from rolling_state import RollingWriter, rolling_state_path  # noqa: E402
from utils import DistContext, UserError, atomic_write_json, resolve_device, seed_everything  # noqa: E402


class RandomImages:
    """Image i: normal noise seeded by i, made when loaded (no memory for the whole set)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, index: int) -> torch.Tensor:
        return torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(index))


def random_scenario(cfg: Config, images: int) -> Scenario:
    """Task 1 holds `images` training images; the other tasks a handful (they are never trained here)."""
    scenario = build_scenario(cfg.data.num_classes, cfg.data.num_tasks, False, cfg.run.seed, cfg.data.dataset)
    first = scenario.task_classes[0]
    targets = np.array([first[i % len(first)] for i in range(images)] + list(range(cfg.data.num_classes)))
    data = TransformedDataset(RandomImages(cfg.backbone.input_size), targets, None)
    scenario.benchmark = Benchmark("random", cfg.data.num_classes, data, data, data, targets, targets)
    scenario.loader = LoaderSettings(batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers,
                                     seed=cfg.run.seed)
    return scenario


class WithoutRollingState(engine.TaskInProgress):
    def save(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the run as it was before rolling states."""


class TimedRollingState(engine.TaskInProgress):
    """The real rolling state, with the time the training waits for it (checks, copies, the previous write)."""

    blocked = 0.0

    def save(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().save(*args, **kwargs)
        self.blocked += time.perf_counter() - start


def time_phase(method: ContinualMethod, scenario: Scenario, phase: str, ctx: DistContext, with_state: bool,
               output_dir: Path) -> tuple[float, float]:
    """(seconds per epoch of `phase` on task 1, of which the training waited for the rolling state), the last
    background write included."""
    phase_cfg = method.set_phase(phase)
    writer = RollingWriter(output_dir)
    kind = TimedRollingState if with_state else WithoutRollingState
    record = engine.RunRecord(phase_cfg, scenario, output_dir)
    task = kind(0, method, phase_cfg, {}, writer, record)
    start = time.perf_counter()
    engine.train_task(method, scenario, phase_cfg, ctx, task, phase)
    waited = time.perf_counter()
    writer.wait()
    end = time.perf_counter()
    blocked = task.blocked + end - waited if with_state else 0.0
    return (end - start) / phase_cfg.optim.epochs, blocked / phase_cfg.optim.epochs


def measure(method: ContinualMethod, scenario: Scenario, phase: str, ctx: DistContext, repeats: int,
            output_dir: Path) -> dict[str, Any]:
    times: dict[bool, list[float]] = {False: [], True: []}
    blocked: list[float] = []
    time_phase(method, scenario, phase, ctx, True, output_dir)  # warm-up: allocator, caches, first-call costs
    for r in range(repeats):
        for with_state in ((False, True) if r % 2 == 0 else (True, False)):
            seconds, waited = time_phase(method, scenario, phase, ctx, with_state, output_dir)
            times[with_state].append(seconds)
            if with_state:
                blocked.append(waited)
    without, with_state = statistics.median(times[False]), statistics.median(times[True])
    size = rolling_state_path(output_dir).stat().st_size
    return {"phase": phase, "state_mb": size / 2**20, "epoch_seconds_without": without,
            "epoch_seconds_with": with_state, "overhead_percent": 100.0 * (with_state - without) / without,
            "blocked_seconds_per_epoch": statistics.median(blocked),
            "blocked_percent": 100.0 * statistics.median(blocked) / without}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'phase':6} {'state MB':>9} {'epoch s (without)':>18} {'epoch s (with)':>15} {'difference':>11} "
             f"{'waited s':>9} {'waited':>8}"]
    for row in rows:
        lines.append(f"{row['phase']:6} {row['state_mb']:9.2f} {row['epoch_seconds_without']:18.3f} "
                     f"{row['epoch_seconds_with']:15.3f} {row['overhead_percent']:10.2f}% "
                     f"{row['blocked_seconds_per_epoch']:9.4f} {row['blocked_percent']:7.2f}%")
    return "\n".join(lines)


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    if args.images < 1 or args.repeats < 1:
        raise UserError("--images and --repeats must be at least 1")
    if "--epochs" not in rest:
        rest = [*rest, "--epochs", "2"]
    if "hide" in rest[0] and "--tii_epochs" not in rest and not {"--train_inference_task_only", "--stage"} & set(rest):
        rest = [*rest, "--tii_epochs", "2"]  # stage 1 within the one-launch HiDe run
    if not any(a.startswith(("--pretrained=", "--pretrained_checkpoint")) or a == "--pretrained" for a in rest):
        rest = [*rest, "--pretrained", "False"]
    with tempfile.TemporaryDirectory(prefix="rolling-state-") as folder:
        cfg = parse_args([*rest, "--output_dir", folder])
        ctx = DistContext(device=resolve_device(cfg.run.device))
        seed_everything(cfg.run.seed)
        scenario = random_scenario(cfg, args.images)
        method = create_method(cfg, scenario).to(ctx.device)
        print(f"{cfg.subcommand} | model {cfg.backbone.model} | input {cfg.backbone.input_size} | batch "
              f"{cfg.optim.batch_size} | {args.images} images, median of {args.repeats} | "
              f"device {ctx.device} | threads {torch.get_num_threads()} | amp {cfg.run.amp} | load avg "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        rows = [measure(method, scenario, phase, ctx, args.repeats, Path(folder)) for phase in method.phases]
    print(format_table(rows), flush=True)
    if args.json is not None:
        atomic_write_json({"subcommand": cfg.subcommand, "model": cfg.backbone.model, "images": args.images,
                           "epochs": cfg.optim.epochs, "repeats": args.repeats, "device": str(ctx.device),
                           "threads": torch.get_num_threads(), "amp": cfg.run.amp, "results": rows}, args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rolling_state.py", allow_abbrev=False, usage="%(prog)s <subcommand> [main.py flags] [options]",
        description="Epoch time with and without the rolling state of a main.py subcommand, on random images.")
    parser.add_argument("--images", type=int, default=5000, help="training images of the task (CIFAR-100: 5000)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each variant (the median is shown)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if not rest or rest[0].startswith("-"):
        parser.error("the first argument is a main.py subcommand, e.g. cifar100_hideprompt")
    try:
        return _run(args, rest)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

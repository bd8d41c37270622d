"""Training and evaluation throughput (images/s) of any subcommand and model config, on random inputs.

    python benchmarks/throughput.py cifar100_linear --model vit_tiny_patch16_224 --input-size 224 --batch-size 8 \
        [--steps 10] [--warmup 3] [--precisions none bf16] [--json PATH]

Every flag other than --steps, --warmup, --precisions and --json is a main.py flag, resolved with the subcommand's
presets. Training is one optimizer step (autocast forward, backward, gradient clipping as in engine.py, step);
evaluation is `method.predict` under no_grad, uncached (the first evaluation of a run; later ones reuse frozen
features). Methods with several phases per task (HiDe-Prompt: stage 1 `tii`, stage 2 `wtp`) get rows per phase.
Data loading is excluded: the same random batch is reused. Each row is batch / median step time over --steps timed
steps, after --warmup untimed ones. `--pretrained` defaults to False here (the weights make no difference to
speed and need the network), unless it is given explicitly.
CPU numbers are only meaningful on an otherwise idle machine: another busy process slows the OpenMP threads many
times over, so the header shows the 1-minute load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from timm.layers import PatchEmbed  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import engine  # noqa: E402
from config.cli import parse_args  # noqa: E402
from config.resolved import Config  # noqa: E402
from datasets import build_scenario  # noqa: E402
from models import create_method  # noqa: E402
from models.base import ContinualMethod  # noqa: E402
from text_table import aligned_table  # noqa: E402
from utils import (  # noqa: E402
    AMP_DTYPES,
    UserError,
    atomic_write_json,
    maybe_autocast,
    resolve_device,
    seed_everything,
    synchronize,
)


@contextmanager
def count_vit_passes(method: torch.nn.Module) -> Iterator[list[int]]:
    """Counts whole-batch ViT passes (plain or prompted, any ViT inside the method): each starts with a patch
    embedding, so a hook there sees every one exactly once."""
    passes = [0]
    hooks = [m.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
             for m in method.modules() if isinstance(m, PatchEmbed)]
    try:
        yield passes
    finally:
        for hook in hooks:
            hook.remove()


def median_seconds(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bf16_matmul_flops(device: torch.device, size: int) -> float:
    """The FLOP/s of a size^3 bf16 matmul on `device`: the rate each row's FLOP/s is a share of."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / median_seconds(lambda: torch.mm(a, b), 10, 3, device)


def flops_per_image(method: ContinualMethod, images: torch.Tensor, targets: torch.Tensor, device: torch.device,
                    precision: str, train: bool) -> float:
    """One step's FLOPs per image, op by op: a training step's forward and backward (gradients of activations, and
    of weights only where they train), or a prediction. The CPU's fused attention kernel is not counted."""
    method.train(train)
    with FlopCounterMode(display=False) as counter:
        with maybe_autocast(device, precision), torch.set_grad_enabled(train):
            out = method(images, targets, 0)[0] if train else method.predict(images)
        if train:
            out.backward()
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images)


def _train_row(method: ContinualMethod, images: torch.Tensor, targets: torch.Tensor, cfg: Config,
               device: torch.device, precision: str, steps: int, warmup: int) -> dict[str, Any]:
    """Training images/s, ViT passes per image and the forward's and backward's (with the step's) median times."""
    param_groups = [g for g in method.begin_task(0) if g["params"]]
    if not (method.trains and param_groups):
        return {}
    optimizer = engine.create_optimizer(param_groups, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for g in param_groups for p in g["params"]]
    split: dict[str, list[float]] = {"forward": [], "backward": []}

    def train_step() -> None:
        start = time.perf_counter()
        with maybe_autocast(device, precision):
            loss, _ = method(images, targets, 0)
        synchronize(device)
        middle = time.perf_counter()
        engine.optimizer_step(loss, optimizer, scaler, params, cfg.optim.clip_grad)
        synchronize(device)
        split["forward"].append(middle - start)
        split["backward"].append(time.perf_counter() - middle)

    method.train()
    with count_vit_passes(method) as passes:
        seconds = median_seconds(train_step, steps, warmup, device)
    optimizer.zero_grad(set_to_none=True)
    forward, backward = (statistics.median(split[k][warmup:]) for k in ("forward", "backward"))
    return {"train_images_per_second": len(images) / seconds, "train_vit_passes_per_image": passes[0] /
            (steps + warmup), "train_forward_ms": 1e3 * forward, "train_backward_ms": 1e3 * backward}


def measure(method: ContinualMethod, classes: list[int], cfg: Config, device: torch.device, precision: str,
            steps: int, warmup: int, peak_flops: float | None = None) -> dict[str, Any]:
    """One table row: train and eval images/s (train None when the method takes no gradient step), the training
    step's forward and backward times, and, given the machine's bf16 matmul rate, the FLOPs per image and the share
    of that rate each reaches."""
    cfg = cfg.with_settings(amp=precision)
    method.cfg = cfg  # what the method's own hooks (e.g. ncm's end_task) autocast to
    method.store_frozen_weights(AMP_DTYPES.get(precision, torch.float32))  # as a run in this precision keeps them
    images = torch.randn(cfg.optim.batch_size, 3, cfg.backbone.input_size, cfg.backbone.input_size, device=device)
    targets = torch.tensor(classes, device=device)[torch.randint(len(classes), (cfg.optim.batch_size,), device=device)]
    row: dict[str, Any] = {"precision": precision, "train_images_per_second": None,
                           "train_vit_passes_per_image": None, "train_forward_ms": None, "train_backward_ms": None}
    row.update(_train_row(method, images, targets, cfg, device, precision, steps, warmup))

    method.eval()
    @torch.no_grad()
    def eval_step() -> None:
        with maybe_autocast(device, precision):
            method.predict(images)

    with count_vit_passes(method) as passes:
        row["eval_images_per_second"] = cfg.optim.batch_size / median_seconds(eval_step, steps, warmup, device)
    row["eval_vit_passes_per_image"] = passes[0] / (steps + warmup)
    for kind in ("train", "eval"):
        rate = row[f"{kind}_images_per_second"]
        flops = None if rate is None or peak_flops is None else flops_per_image(
            method, images, targets, device, precision, kind == "train")
        row[f"{kind}_flops_per_image"] = flops
        row[f"{kind}_peak_percent"] = None if flops is None else 100 * rate * flops / peak_flops
    method.eval()
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def format_table(rows: list[dict[str, Any]]) -> str:
    def num(value: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    cells = [["phase", "precision", "train img/s", "eval img/s", "ViT passes/img train", "eval", "fwd ms",
              "bwd+step ms", "bwd/fwd", "% bf16 mm train", "eval"]]
    cells += [[r["phase"], r["precision"], num(r["train_images_per_second"]), num(r["eval_images_per_second"]),
               num(r["train_vit_passes_per_image"], "{:g}"), num(r["eval_vit_passes_per_image"], "{:g}"),
               num(r.get("train_forward_ms")), num(r.get("train_backward_ms")),
               num(_ratio(r.get("train_backward_ms"), r.get("train_forward_ms")), "{:.2f}"),
               num(r.get("train_peak_percent")), num(r.get("eval_peak_percent"))]
              for r in rows]
    return aligned_table(cells)


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    """Build the method from the config alone (no data), measure every precision, print and save."""
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    if not any(a.startswith(("--pretrained=", "--pretrained_checkpoint")) or a == "--pretrained" for a in rest):
        rest = [*rest, "--pretrained", "False"]  # random weights unless asked: the speed is the same
    cfg = parse_args(rest)
    device = resolve_device(cfg.run.device)
    if "fp16" in args.precisions and device.type != "cuda":
        raise UserError("--precisions fp16 needs CUDA; on CPU use none or bf16")
    seed_everything(cfg.run.seed)
    scenario = build_scenario(cfg.data.num_classes, cfg.data.num_tasks, False, cfg.run.seed, cfg.data.dataset)
    method = create_method(cfg, scenario).to(device)

    peak = bf16_matmul_flops(device, args.matmul_size)
    header = (f"{cfg.subcommand} | model {cfg.backbone.model} | input {cfg.backbone.input_size} | batch "
              f"{cfg.optim.batch_size} | "
              f"device {device} | threads {torch.get_num_threads()} | torch {torch.__version__} | "
              f"median of {args.steps} steps after {args.warmup} warm-up | load avg {os.getloadavg()[0]:.2f} | "
              f"bf16 matmul {args.matmul_size}^3: {peak / 1e9:.0f} GFLOP/s (% columns: FLOPs of forward + backward "
              f"per image x img/s, as a share of it)")
    print(header, flush=True)
    rows = []
    for phase in method.phases:  # e.g. HiDe-Prompt's stage 1 (tii) and stage 2 (wtp)
        phase_cfg = method.set_phase(phase)
        for precision in args.precisions:
            row = measure(method, scenario.task_classes[0], phase_cfg, device, precision, args.steps, args.warmup,
                          peak)
            rows.append({"phase": phase, **row})
    print(format_table(rows), flush=True)
    if args.json is not None:
        atomic_write_json({"subcommand": cfg.subcommand, "model": cfg.backbone.model,
                           "input_size": cfg.backbone.input_size, "batch_size": cfg.optim.batch_size,
                           "device": str(device), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
                           "bf16_matmul_flops": peak, "results": rows}, args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="throughput.py", allow_abbrev=False, usage="%(prog)s <subcommand> [main.py flags] [options]",
        description="Train and eval images/s of a main.py subcommand on random inputs.",
        epilog="All other flags are main.py's (see `python main.py <subcommand> --help`).")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--precisions", nargs="+", choices=["none", "bf16", "fp16"], default=["none", "bf16"],
                        help="autocast precisions, one row each (none = fp32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--matmul_size", type=int, default=2048,
                        help="side of the bf16 matmul that measures the machine's rate (8192 on a GPU)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return _run(args, rest)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

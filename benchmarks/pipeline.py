"""Whole-run benchmark: where real short runs spend their time, phase by phase, and how often each phase runs the ViT.

    python benchmarks/pipeline.py [--methods hideprompt l2p dualprompt] [--epochs 1] [--tasks 2]
        [--loader_workers 0 2] [--json PATH] [main.py flags, e.g. --device cpu --input-size 64]

Each method is one run of `main.main`, in this process, on `digits_<method>` (Split Digits: scikit-learn's bundled
digits, no download) with the tiny ViT at 224 px unless main.py flags say otherwise, the first --tasks of its 5 tasks
(--stop_after_task), --epochs epochs (HiDe-Prompt: both stages in one run, --tii_epochs too), in a temporary folder;
its log goes to that folder. engine's functions are wrapped in-process and timed exclusively: a phase nested in
another stops the outer one's clock, so the phases add up to engine.run's wall time and nothing counts twice:

- data loading: waiting for the next training batch (the DataLoader's iterator)
- training: the rest of engine.train_task
- rolling state: the state written after every epoch (inside train_task)
- class statistics: method.end_task;  task-adaptive prediction: method.align
- evaluation: engine.evaluate; `evaluation after alignment` when task-adaptive prediction changed the model
- checkpointing: engine._save_task;  rest of engine.run: results, logs, TensorBoard

HiDe-Prompt's phases are split by stage (tii, wtp). `ViT passes/img` is the number of whole ViT passes (plain or
prompted: see throughput.count_vit_passes) per image of the phase, weighted by the size of the batch each pass ran
on, so the frozen features a run caches show as fewer passes (the test sets' query features are computed once per
run; HiDe's instructed test features are reused by the evaluation after alignment).

After each run the training loader of task 1 is iterated alone for one epoch with each of --loader_workers (and the
run's --num_workers), worker start-up included as in every epoch of a run, and compared with the run's training
step rate: a loader slower than the step starves it. The loader is timed on an otherwise idle process, so on a
machine with few cores its rate during a run, competing with the step, is lower.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import engine  # noqa: E402
import main as entry  # noqa: E402
from benchmarks.gpu_check import environment  # noqa: E402
from benchmarks.throughput import count_vit_passes  # noqa: E402
from config.settings import TaskIdentitySettings  # noqa: E402
from datasets.scenario import Scenario  # noqa: E402
from models import METHODS  # noqa: E402
from text_table import aligned_table  # noqa: E402
from utils import UserError, atomic_write_json, cpu_bf16_flags  # noqa: E402

DATASET = "digits"
METHOD_CHOICES = ("hideprompt", "l2p", "dualprompt", "sprompt", "continual_lora", "hidelora", "linear", "ncm",
                  "finetune", "fix")
DEFAULT_FLAGS = ("--model", "vit_tiny_patch16_224", "--pretrained", "False", "--input-size", "224")
REST = "rest of engine.run"
LOADING = "data loading"


# ----------------------------------------------------------------------------------------------------------------
# Exclusive phase timing
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tally:
    seconds: float = 0.0
    images: int = 0
    image_passes: int = 0  # over the phase's batches: batch size x ViT passes while that batch was in use


class PhaseClock:
    """Seconds, images and ViT passes per phase. Entering a phase stops the clock of the one it is nested in."""

    def __init__(self) -> None:
        self.tallies: dict[str, Tally] = {}
        self.stack: list[str] = []
        self.since = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        if self.stack:
            self.tallies[self.stack[-1]].seconds += now - self.since
        self.since = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Tally]:
        self._charge()
        self.stack.append(name)
        tally = self.tallies.setdefault(name, Tally())
        try:
            yield tally
        finally:
            self._charge()
            self.stack.pop()

    def credit(self, images: int, passes: int) -> None:
        """A batch of `images` that took `passes` ViT passes, to the phase that iterates its loader."""
        tally = self.tallies[self.stack[-1]]
        tally.images += images
        tally.image_passes += images * passes


class CountedLoader:
    """A DataLoader whose batches are credited to the phase iterating it; with `wait`, the time spent waiting for
    each batch is that phase's instead (the training loader's data loading)."""

    def __init__(self, loader: Any, clock: PhaseClock, passes: list[int], wait: str | None):
        self.loader, self.clock, self.passes, self.wait = loader, clock, passes, wait

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return self.loader.sampler  # the engine calls its set_epoch

    def _next(self, iterator: Iterator) -> Any:
        if self.wait is None:
            return next(iterator)
        with self.clock.phase(self.wait) as tally:
            batch = next(iterator)
            tally.images += len(batch[1])
        return batch

    def __iter__(self) -> Iterator:
        iterator, size, mark = iter(self.loader), 0, self.passes[0]
        while True:
            # the passes since the previous batch was handed out ran on that batch
            self.clock.credit(size, self.passes[0] - mark)
            try:
                batch = self._next(iterator)
            except StopIteration:
                return
            size, mark = len(batch[1]), self.passes[0]
            yield batch


class RunProbe:
    """Wraps engine.run for one run of main.main: while it runs, engine's phases, the method's hooks and the
    scenario's loaders report to the clock."""

    def __init__(self) -> None:
        self.clock = PhaseClock()
        self.stage, self.staged, self.aligned = "", False, False
        self.evaluations: list[dict[str, Any]] = []
        self.wall = 0.0
        self.scenario: Scenario | None = None

    def label(self, kind: str) -> str:
        return f"{kind} [{self.stage}]" if self.staged else kind

    def wrap_run(self, run: Callable) -> Callable:
        @functools.wraps(run)
        def probed(method: Any, scenario: Scenario, cfg: Any, ctx: Any) -> dict[str, Any]:
            self.scenario, self.staged = scenario, len(method.phases) > 1
            start = time.perf_counter()
            with count_vit_passes(method) as passes, contextlib.ExitStack() as patches:
                for target, name, wrapper in self._wrappers(method, scenario, passes):
                    patches.enter_context(mock.patch.object(target, name, wrapper))
                with self.clock.phase(REST):
                    results = run(method, scenario, cfg, ctx)
            self.wall = time.perf_counter() - start
            return results
        return probed

    def _wrappers(self, method: Any, scenario: Scenario, passes: list[int]) -> list[tuple[Any, str, Callable]]:
        return [(engine, "run_phase", self._entering_stage(engine.run_phase)),
                (engine, "train_task", self._timed("training", engine.train_task)),
                (engine.TaskInProgress, "save", self._timed("rolling state", engine.TaskInProgress.save)),
                (engine, "evaluate", self._evaluation(engine.evaluate)),
                (engine, "_save_task", self._timed("checkpointing", engine._save_task, staged=False)),
                (method, "end_task", self._timed("class statistics", method.end_task)),
                (method, "align", self._alignment(method.align)),
                (scenario, "train_loader", self._counted(scenario.train_loader, passes, LOADING)),
                (scenario, "stats_loader", self._counted(scenario.stats_loader, passes)),
                (scenario, "test_loader", self._counted(scenario.test_loader, passes))]

    def _timed(self, kind: str, fn: Callable, staged: bool = True) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.clock.phase(self.label(kind) if staged else kind):
                return fn(*args, **kwargs)
        return timed

    def _entering_stage(self, run_phase: Callable) -> Callable:
        @functools.wraps(run_phase)
        def entering(method: Any, phase: str, *args: Any, **kwargs: Any) -> Any:
            self.stage, self.aligned = phase, False
            return run_phase(method, phase, *args, **kwargs)
        return entering

    def _alignment(self, align: Callable) -> Callable:
        @functools.wraps(align)
        def aligning(t: int) -> bool:
            with self.clock.phase(self.label("task-adaptive prediction")):
                self.aligned = align(t)
            return self.aligned
        return aligning

    def _evaluation(self, evaluate: Callable) -> Callable:
        @functools.wraps(evaluate)
        def evaluating(*args: Any, **kwargs: Any) -> dict:
            with self.clock.phase(self.label("evaluation after alignment" if self.aligned else "evaluation")) as tally:
                before = dataclasses.replace(tally)
                result = evaluate(*args, **kwargs)
            images = tally.images - before.images
            self.evaluations.append({
                "task": len(result["task_acc"]), "stage": self.stage, "after_alignment": self.aligned,
                "images": images, "seconds": tally.seconds - before.seconds,
                "vit_passes_per_image": (tally.image_passes - before.image_passes) / images if images else None})
            return result
        return evaluating

    def _counted(self, make: Callable[..., Any], passes: list[int], wait: str | None = None) -> Callable:
        @functools.wraps(make)
        def counted(t: int, **options: Any) -> CountedLoader:
            return CountedLoader(make(t, **options), self.clock, passes, self.label(wait) if wait else None)
        return counted


# ----------------------------------------------------------------------------------------------------------------
# One method's run
# ----------------------------------------------------------------------------------------------------------------
def run_arguments(method: str, epochs: int, tasks: int, extra: Sequence[str], output_dir: Path) -> list[str]:
    """main.py's arguments: our defaults, then the caller's flags (argparse keeps the last of a repeated flag)."""
    short = ["--epochs", str(epochs), "--stop_after_task", str(tasks)]
    if TaskIdentitySettings in METHODS[method].settings_groups:  # HiDe: both stages in one run
        short += ["--stage", "both", "--tii_epochs", str(epochs)]
    return [f"{DATASET}_{method}", *DEFAULT_FLAGS, *short, *extra, "--output_dir", str(output_dir)]


def probe_run(argv: list[str], log_path: Path) -> tuple[RunProbe, float]:
    """main.main(argv) with engine.run probed; returns the probe and main's whole wall time. Its output and errors
    go to `log_path`; a failed run raises with the log's end."""
    probe = RunProbe()
    start = time.perf_counter()
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            mock.patch.object(engine, "run", probe.wrap_run(engine.run)):
        code = entry.main(argv)
    seconds = time.perf_counter() - start
    if code != 0 or probe.scenario is None:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise UserError(f"`main.py {' '.join(argv)}` failed (exit {code}); the end of its log:\n{tail}")
    return probe, seconds


def phase_rows(probe: RunProbe) -> list[dict[str, Any]]:
    """In the order the phases first ran, the rest of engine.run last."""
    tallies = {name: t for name, t in probe.clock.tallies.items() if name != REST}
    tallies[REST] = probe.clock.tallies[REST]
    total = sum(t.seconds for t in tallies.values())
    return [{"phase": name, "seconds": t.seconds, "share": t.seconds / total if total else 0.0, "images": t.images,
             "vit_passes_per_image": t.image_passes / t.images if t.images else None}
            for name, t in tallies.items()]


def loader_images_per_second(scenario: Scenario, workers: int, t: int = 0) -> float:
    """One epoch of task t's training loader alone, with `workers` loading processes."""
    settings = dataclasses.replace(scenario.loader, num_workers=workers)
    loader = dataclasses.replace(scenario, loader=settings).train_loader(t)
    start = time.perf_counter()
    images = sum(len(targets) for _, targets in loader)
    return images / (time.perf_counter() - start)


def starvation(rows: list[dict[str, Any]], loader_rates: dict[int, float]) -> list[dict[str, Any]]:
    """Each training stage's step rate (images / training seconds, data loading excluded) against each loader."""
    by_phase = {r["phase"]: r for r in rows}
    verdicts = []
    for name, row in by_phase.items():
        if not name.startswith("training") or not row["images"] or not row["seconds"]:
            continue
        step = row["images"] / row["seconds"]
        verdicts += [{"stage": name, "workers": w, "loader_images_per_second": rate, "step_images_per_second": step,
                      "starves": rate < step} for w, rate in loader_rates.items()]
    return verdicts


def benchmark_method(method: str, args: argparse.Namespace, extra: Sequence[str], out: Path) -> dict[str, Any]:
    subcommand = f"{DATASET}_{method}"
    argv = run_arguments(method, args.epochs, args.tasks, extra, out / subcommand)
    probe, main_seconds = probe_run(argv, out / f"{subcommand}.log")
    rows = phase_rows(probe)
    workers = dict.fromkeys([probe.scenario.loader.num_workers, *args.loader_workers])
    rates = {w: loader_images_per_second(probe.scenario, w) for w in workers}
    return {"subcommand": subcommand, "argv": argv, "run_seconds": probe.wall,
            "setup_seconds": main_seconds - probe.wall, "phases": rows, "evaluations": probe.evaluations,
            "run_workers": probe.scenario.loader.num_workers, "loader": starvation(rows, rates)}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    env = environment("cpu")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": env["cpu"], "cpus": env["cpus"], "bf16_flags": cpu_bf16_flags(),
            "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": os.getloadavg()[0]}


def header(env: dict[str, Any], args: argparse.Namespace, extra: Sequence[str]) -> str:
    flags = ", ".join(env["bf16_flags"]) or "neither avx512_bf16 nor amx_bf16"
    gpu = f" | GPU {env['gpu']}" if env["gpu"] else ""
    return (f"CPU {env['cpu']} ({env['cpus']} cores; {flags}){gpu} | torch {env['torch']}, {env['threads']} threads "
            f"| load avg {env['load_average']:.2f} (1 min, before the runs)\n"
            f"{DATASET}_<method> {' '.join([*DEFAULT_FLAGS, *extra])} | {args.tasks} tasks x {args.epochs} epoch(s)")


def method_table(result: dict[str, Any]) -> str:
    cells = [["phase", "seconds", "share", "images", "ViT passes/img"]]
    cells += [[r["phase"], f"{r['seconds']:.2f}", f"{100 * r['share']:.1f}%", str(r["images"] or "-"),
               "-" if r["vit_passes_per_image"] is None else f"{r['vit_passes_per_image']:.3g}"]
              for r in result["phases"]]
    cells.append(["total (engine.run)", f"{sum(r['seconds'] for r in result['phases']):.2f}", "100%", "", ""])
    loader = [f"loader {v['loader_images_per_second']:.0f} img/s ({v['workers']} workers) vs step "
              f"{v['step_images_per_second']:.0f} img/s ({v['stage']}) per process: "
              f"{'starves' if v['starves'] else 'OK'}" for v in result["loader"]]
    title = (f"{result['subcommand']}: engine.run {result['run_seconds']:.1f} s (before it, main.py's setup: data, "
             f"model {result['setup_seconds']:.1f} s); the run's loader: {result['run_workers']} workers")
    return "\n".join([title, aligned_table(cells), *loader])


# ----------------------------------------------------------------------------------------------------------------
# Entry
# ----------------------------------------------------------------------------------------------------------------
def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="pipeline.py", allow_abbrev=False, usage="%(prog)s [options] [main.py flags]",
        description="Seconds and ViT passes per phase of real short runs on Split Digits (see the module docstring).",
        epilog="Other flags are main.py's, given to every run after the defaults "
               f"({' '.join(DEFAULT_FLAGS)}).")
    parser.add_argument("--methods", nargs="+", choices=METHOD_CHOICES, default=["hideprompt", "l2p", "dualprompt"],
                        metavar="METHOD", help=f"digits_<METHOD> runs, of: {', '.join(METHOD_CHOICES)}")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per task (HiDe: of each stage)")
    parser.add_argument("--tasks", type=int, default=2, help="tasks run, of the 5 (--stop_after_task)")
    parser.add_argument("--loader_workers", type=int, nargs="*", default=[2, 0],
                        help="loading processes to time the training loader with, besides the run's own")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    if args.epochs < 1 or not 1 <= args.tasks <= 5:
        print("error: --epochs must be at least 1 and --tasks 1 to 5", file=sys.stderr)
        return 2
    env = machine()
    print(header(env, args, extra), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="pipeline_") as tmp:
        for method in args.methods:
            try:
                results.append(benchmark_method(method, args, extra, Path(tmp)))
            except UserError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                return 2
            print("\n" + method_table(results[-1]), flush=True)
    if args.json is not None:
        atomic_write_json({"machine": env, "load_average_after": os.getloadavg()[0], "epochs": args.epochs,
                           "tasks": args.tasks, "flags": [*DEFAULT_FLAGS, *extra], "methods": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

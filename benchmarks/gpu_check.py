"""End-to-end check of every method on one device, offline: Split Digits on a tiny randomly initialised ViT.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--run_timeout S] [OUTPUT_DIR]
    (bash benchmarks/gpu_check.sh ... runs it)

Each run is its own process with its own folder under OUTPUT_DIR (default ./output/gpu_check_<date-time>): every
continual method with bf16 autocast (fp32 on a CPU without native bf16), one method with fp16 (CUDA only), HiDe-Prompt
with covariance statistics, the few-shot LoRA flow, HiDe-Prompt's two launches under `torchrun --nproc_per_node=1` (so
every collective goes through NCCL on CUDA, gloo on CPU), and one short HiDe-Prompt run twice with --deterministic,
whose accuracy matrices, final metrics and trained tensors must be identical. The table gives each run's status, exit
code, wall time, final average accuracy and peak memory (GPU: torch.cuda.max_memory_allocated of the run's process;
CPU: its peak resident set); it is printed and written to OUTPUT_DIR/gpu_check.md and gpu_check.json.
The exit code is 1 when a run failed, the deterministic pair differs or the throughput section failed. `--quick`
keeps two of the per-method runs and shortens every run to one epoch (what the test suite runs on CPU).

Then, in this process, a throughput table (a second table in gpu_check.md, `throughput` in gpu_check.json): on CUDA,
benchmarks/throughput.py's measurement of every prompt and LoRA method (`cifar100_<method>`, built from the config
alone, random weights and inputs) with the paper's ViT-B/16 at 224 px and per-GPU batch 24, bf16 and fp32 (none),
one row per phase (HiDe: tii, wtp) and precision: train and eval images/s, the peak GPU memory of the row's steps,
the FLOPs per image (counted op by op on one step) and the row's FLOP/s as a share of the bf16 rate a large matmul
achieves on this GPU; then, from the hideprompt rows, an estimate of the paper's Split CIFAR-100 HiDe-Prompt run on 8
such GPUs (its formula is printed). Its steps are few (5 timed after 2 warm-up) so that the whole check fits in 8
minutes on one H200. On CPU the same section runs at a tiny size (tiny ViT, 32 px, batch 4, 2 steps after 1
warm-up; with --quick two methods) only to keep it working.

Internally `gpu_check.py --child main.py ARGS...` runs main.py's main in-process and then writes the process's
peak memory to the file named by $GPU_CHECK_PEAK_FILE (one file per rank).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.throughput import bf16_matmul_flops, measure  # noqa: E402
from config.cli import parse_args, split_subcommand_name, subcommands  # noqa: E402
from config.resolved import Config  # noqa: E402
from config.settings import (  # noqa: E402
    COMMON_GROUPS,
    FewShotSettings,
    OptimSettings,
    QueryModelSettings,
    TaskAdaptiveSettings,
    TaskIdentitySettings,
)
from datasets import build_scenario  # noqa: E402
from models import METHODS, create_method  # noqa: E402
from models.base import ContinualMethod  # noqa: E402
from utils import (  # noqa: E402
    atomic_write_json,
    cpu_has_native_bf16,
    resolve_amp,
    resolve_device,
    seed_everything,
)

PEAK_ENV = "GPU_CHECK_PEAK_FILE"
DATASET = "digits"
HIDE = f"{DATASET}_hideprompt"
FP16_METHOD = f"{DATASET}_dualprompt"  # prompts: the backward runs through every attention block under the scaler
QUICK_METHODS = (f"{DATASET}_ncm", f"{DATASET}_linear")
# (settings group, flag, value) of a short run; a flag is given only to the methods whose groups hold it
SHORT = ((OptimSettings, "epochs", "1"), (TaskIdentitySettings, "tii_epochs", "1"),
         (TaskAdaptiveSettings, "crct_epochs", "1"), (FewShotSettings, "num_episodes", "2"),
         (FewShotSettings, "num_fs_epochs", "5"))
# the final metrics of results.json the deterministic pair must agree on, besides the accuracy matrix
COMPARED_METRICS = ("avg_acc", "avg_incremental_acc", "forgetting", "bwt", "overall_acc", "avg_tii_acc", "train_loss",
                    "train_acc")


# ----------------------------------------------------------------------------------------------------------------
# The child: one run of main.py in this process, then its peak memory
# ----------------------------------------------------------------------------------------------------------------
def peak_memory_mib() -> float:
    """This process's peak: memory allocated by torch on its GPU when it used one, else its resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def run_child(argv: list[str]) -> int:
    """`SCRIPT ARGS...`: the entry script's main(ARGS), then the peak written where $GPU_CHECK_PEAK_FILE says."""
    script, *args = argv
    sys.argv = [script, *args]
    entry = importlib.import_module(Path(script).stem)
    try:
        return entry.main(args)
    finally:
        target = os.environ.get(PEAK_ENV)
        if target:
            rank = os.environ.get("RANK", "0")
            Path(f"{target}.rank{rank}").write_text(json.dumps({"peak_mib": peak_memory_mib()}))


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    key: str  # its folder under OUTPUT_DIR
    what: str
    args: tuple[str, ...] = ()
    torchrun: bool = False
    skip: str = ""


def _method_groups(subcommand: str) -> set[type]:
    return {*COMMON_GROUPS, *METHODS[split_subcommand_name(subcommand)[1]].settings_groups}


def _is_flow(subcommand: str) -> bool:
    return FewShotSettings in _method_groups(subcommand)


def dataset_subcommands() -> list[str]:
    """Every subcommand the registry and the presets offer for the dataset, continual methods first."""
    own = [s for s in subcommands() if split_subcommand_name(s)[0] == DATASET]
    return [s for s in own if not _is_flow(s)] + [s for s in own if _is_flow(s)]


def run_precision(device: str) -> str:
    """bf16 on a GPU (what the check is for) and on a CPU that has it natively; elsewhere fp32, since emulated bf16
    only slows the runs down many times (the check then keeps the script working, as on CPU it is for)."""
    return "bf16" if device == "cuda" or cpu_has_native_bf16() else "none"


def base_args(subcommand: str, device: str, short: bool, amp: str | None = None, one_stage: bool = False
              ) -> tuple[str, ...]:
    """main.py's arguments; `short`: one epoch of everything; `one_stage`: a HiDe launch of one stage, which takes
    its stage-1 epochs as --epochs; `amp` defaults to `run_precision`."""
    flags = [subcommand, "--device", device, "--amp", amp or run_precision(device)]
    if short:
        groups = _method_groups(subcommand) - ({TaskIdentitySettings} if one_stage else set())
        flags += [part for group, name, value in SHORT if group in groups for part in (f"--{name}", value)]
    return tuple(flags)


def method_runs(device: str, quick: bool) -> list[Run]:
    continual = [s for s in dataset_subcommands() if not _is_flow(s)]
    chosen = [s for s in continual if s in QUICK_METHODS] if quick else continual
    precision = run_precision(device)
    return [Run(s, f"{s.removeprefix(DATASET + '_')}, {precision}", base_args(s, device, quick)) for s in chosen]


def fp16_run(device: str, quick: bool) -> Run:
    skip = "" if device == "cuda" else "skipped: fp16 needs CUDA"
    return Run(f"{FP16_METHOD}_fp16", f"{FP16_METHOD.removeprefix(DATASET + '_')}, fp16 with loss scaling",
               base_args(FP16_METHOD, device, quick, amp="fp16"), skip=skip)


def few_shot_run(device: str, quick: bool) -> Run:
    flows = [s for s in dataset_subcommands() if _is_flow(s)]
    if not flows:
        return Run(f"{DATASET}_few_shot", "few-shot flow", skip=f"skipped: no few-shot subcommand for {DATASET}")
    return Run(f"{flows[0]}_flow", "few-shot flow: vanilla + shared upstream runs, episodes",
               base_args(flows[0], device, quick))


def hide_launch_runs(device: str, quick: bool, out: Path) -> list[Run]:
    """HiDe-Prompt's two launches as training_script/demo.sh runs them, each under torchrun with one process."""
    args = base_args(HIDE, device, quick, one_stage=True)
    stage1 = Run(f"{HIDE}_stage1_torchrun", "HiDe-Prompt stage 1 (task identity), torchrun",
                 (*args, "--train_inference_task_only", "--lr", "0.01"), torchrun=True)
    stage2 = Run(f"{HIDE}_stage2_torchrun", "HiDe-Prompt stage 2 reading stage 1, torchrun",
                 (*args, "--trained_original_model", str(out / stage1.key)), torchrun=True)
    return [stage1, stage2]


def deterministic_runs(device: str) -> list[Run]:
    args = (*base_args(HIDE, device, short=True), "--deterministic")
    return [Run(f"deterministic_{i}", f"HiDe-Prompt both stages, --deterministic ({i} of 2)", args)
            for i in (1, 2)]


def plan(device: str, quick: bool, out: Path) -> list[Run]:
    covariance = Run(f"{HIDE}_covariance", "HiDe-Prompt both stages, covariance statistics",
                     (*base_args(HIDE, device, quick), "--ca_storage_efficient_method", "covariance"))
    return [*method_runs(device, quick), fp16_run(device, quick), covariance, few_shot_run(device, quick),
            *hide_launch_runs(device, quick, out), *deterministic_runs(device)]


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    key: str
    what: str
    status: str
    exit_code: int | None = None
    seconds: float | None = None
    final_acc: float | None = None
    peak_mib: float | None = None
    command: list[str] = field(default_factory=list)
    log: str = ""


def command(run: Run, out: Path) -> list[str]:
    child = [str(Path(__file__).resolve()), "--child", "main.py", *run.args, "--output_dir", str(out / run.key)]
    if run.torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *child]
    return [sys.executable, *child]


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None after stopping a run that took longer than `timeout` (SIGTERM, which torchrun
    forwards to its workers, then SIGKILL)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            with suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=grace)
                return None
            except subprocess.TimeoutExpired:
                continue
        return None


def final_accuracy(folder: Path) -> float | None:
    """A continual run's final average accuracy (results.json), or the few-shot flow's mean episode accuracy."""
    results = folder / "results.json"
    if results.is_file():
        final = json.loads(results.read_text())["final"]
        return final["avg_acc"] if final else None
    episodes = sorted(folder.glob("few_shot_*.json"))
    return json.loads(episodes[0].read_text())["summary"]["mean_acc"] if episodes else None


def read_peak(peak_file: Path) -> float | None:
    peaks = [json.loads(p.read_text())["peak_mib"] for p in peak_file.parent.glob(f"{peak_file.name}.rank*")]
    return max(peaks) if peaks else None


def execute(run: Run, out: Path, timeout: float) -> Outcome:
    outcome = Outcome(run.key, run.what, run.skip)
    if run.skip:
        return outcome
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    outcome.command, outcome.log = command(run, out), str(logs / f"{run.key}.log")
    peak_file = logs / f"{run.key}.peak"
    start = time.perf_counter()
    with open(outcome.log, "w") as log:
        proc = subprocess.Popen(outcome.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, PEAK_ENV: str(peak_file), "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)
        outcome.exit_code = _wait(proc, timeout)
    outcome.seconds = time.perf_counter() - start
    outcome.final_acc, outcome.peak_mib = final_accuracy(out / run.key), read_peak(peak_file)
    outcome.status = _status(outcome, timeout)
    return outcome


def _status(outcome: Outcome, timeout: float) -> str:
    if outcome.exit_code is None:
        return f"FAILED (stopped after {timeout:g} s)"
    if outcome.exit_code:
        return f"FAILED (exit {outcome.exit_code})"
    return "ok" if outcome.final_acc is not None else "FAILED (no results)"


def failure_excerpt(log: str) -> list[str]:
    """The run's own error lines (what main.py prints for a problem it knows), else the end of its log."""
    lines = Path(log).read_text(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return errors or lines[-25:]


def _progress(i: int, total: int, outcome: Outcome) -> None:
    if outcome.status.startswith("FAILED"):
        print("\n".join(f"    | {line}" for line in failure_excerpt(outcome.log)) + f"\n    (whole log: {outcome.log})")
    numbers = f"  {outcome.seconds:.1f} s, final acc {_fmt(outcome.final_acc)}" if outcome.seconds else ""
    print(f"[{i}/{total}] {outcome.key}: {outcome.status}{numbers}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The deterministic pair
# ----------------------------------------------------------------------------------------------------------------
def _last_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    paths = sorted((folder / "checkpoint").glob("task*_checkpoint.pth"), key=lambda p: int(p.stem[4:-11]))
    return torch.load(paths[-1], map_location="cpu", weights_only=False)["model"] if paths else {}


def _max_difference(a: list[float | None], b: list[float | None]) -> float:
    if len(a) != len(b) or [x is None for x in a] != [y is None for y in b]:
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b, strict=True) if x is not None), default=0.0)


def _metrics(folder: Path) -> list[float | None]:
    results = json.loads((folder / "results.json").read_text())
    final = results["final"] or {}
    return [v for row in results["acc_matrix"] for v in row] + [final.get(k) for k in COMPARED_METRICS]


def _tensor_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def compare_pair(first: Outcome, second: Outcome, out: Path) -> dict[str, Any]:
    """Whether the two deterministic runs agree bit for bit: accuracy matrix and final metrics of results.json, and
    every tensor of the last task checkpoint."""
    if "ok" not in (first.status, second.status) or first.status != second.status:
        return {"identical": False, "text": "not compared: a run of the pair failed"}
    a, b = out / first.key, out / second.key
    metrics = _max_difference(_metrics(a), _metrics(b))
    tensors = _tensor_difference(_last_checkpoint(a), _last_checkpoint(b))
    identical = metrics == 0 and tensors == 0
    text = ("identical (accuracy matrix, final metrics, trained tensors)" if identical else
            f"DIFFER: max |difference| {metrics:.3g} points in the metrics, {tensors:.3g} in the trained tensors")
    return {"identical": identical, "metrics_max_difference": metrics, "tensors_max_difference": tensors,
            "text": text}


# ----------------------------------------------------------------------------------------------------------------
# Throughput of the prompt and LoRA methods (in this process, after the runs)
# ----------------------------------------------------------------------------------------------------------------
THROUGHPUT_METHODS = ("l2p", "dualprompt", "sprompt", "hideprompt", "continual_lora", "hidelora")
QUICK_THROUGHPUT_METHODS = ("l2p", "hideprompt")  # hideprompt's rows feed the estimate
THROUGHPUT_PRECISIONS = ("bf16", "none")
# The paper's Split CIFAR-100 HiDe-Prompt run: 8 GPUs; stage 1 (tii) 20 and stage 2 (wtp) 50 epochs over the 50,000
# training images; each stage's launch evaluates the test images seen so far (1,000 per task) after each of 10 tasks.
PAPER_GPUS, PAPER_TRAIN_IMAGES, PAPER_EPOCHS = 8, 50_000, {"tii": 20, "wtp": 50}
PAPER_EVAL_IMAGES = sum((t + 1) * 1_000 for t in range(10))
ESTIMATE_FORMULA = (f"{PAPER_EPOCHS['tii']} x {PAPER_TRAIN_IMAGES:,} / ({PAPER_GPUS} x tii train img/s) + "
                    f"{PAPER_EPOCHS['wtp']} x {PAPER_TRAIN_IMAGES:,} / ({PAPER_GPUS} x wtp train img/s) + "
                    f"{PAPER_EVAL_IMAGES:,} / ({PAPER_GPUS} x tii eval img/s) + {PAPER_EVAL_IMAGES:,} / "
                    f"({PAPER_GPUS} x wtp eval img/s), with {PAPER_EVAL_IMAGES:,} = sum over the 10 tasks t of "
                    f"(t+1) x 1,000 test images")


@dataclass(frozen=True)
class ThroughputPlan:
    model: str
    input_size: int
    batch_size: int
    steps: int
    warmup: int
    methods: tuple[str, ...]
    matmul_size: int  # the side of the bf16 matmul whose achieved rate the rows are a share of


def throughput_plan(device: str, quick: bool) -> ThroughputPlan:
    """CUDA: the paper's ViT-B/16 at 224 px and per-GPU batch 24, every prompt and LoRA method, few steps so that the
    whole check stays within its 8 minutes on one H200. CPU: a tiny size, so that CI keeps the section working."""
    if device == "cuda":
        return ThroughputPlan("vit_base_patch16_224", 224, 24, 5, 2, THROUGHPUT_METHODS, 8192)
    return ThroughputPlan("vit_tiny_patch16_224", 32, 4, 2, 1, QUICK_THROUGHPUT_METHODS if quick else
                          THROUGHPUT_METHODS, 512)


def throughput_flags(method: str, plan: ThroughputPlan, device: str) -> list[str]:
    flags = [f"cifar100_{method}", "--device", device, "--model", plan.model, "--pretrained", "False",
             "--input-size", str(plan.input_size), "--batch-size", str(plan.batch_size)]
    if QueryModelSettings in METHODS[method].settings_groups:  # one ViT for the query and the prompts, as the paper
        flags += ["--original_model", plan.model]
    return flags


def throughput_row(method: ContinualMethod, classes: list[int], cfg: Config, device: torch.device, precision: str,
                   plan: ThroughputPlan, peak_flops: float) -> dict[str, Any]:
    """throughput.measure's row (with FLOPs per image and their share of the bf16 matmul rate), with the peak GPU
    memory of its steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = measure(method, classes, cfg, device, precision, plan.steps, plan.warmup, peak_flops)
    row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return row


def method_throughput(name: str, plan: ThroughputPlan, device: torch.device, peak_flops: float
                      ) -> list[dict[str, Any]]:
    """Rows per phase (HiDe: tii, wtp) and precision; the method is built from the config alone (no data)."""
    cfg = parse_args(throughput_flags(name, plan, device.type))
    seed_everything(cfg.run.seed)
    scenario = build_scenario(cfg.data.num_classes, cfg.data.num_tasks, False, cfg.run.seed, cfg.data.dataset)
    method = create_method(cfg, scenario).to(device)
    rows = []
    for phase in method.phases:
        phase_cfg = method.set_phase(phase)
        rows += [{"method": name, "phase": phase, **throughput_row(method, scenario.task_classes[0], phase_cfg,
                                                                   device, precision, plan, peak_flops)}
                 for precision in THROUGHPUT_PRECISIONS]
    return rows


def paper_estimate(rows: list[dict[str, Any]]) -> list[dict[str, float | str]]:
    """Per precision, the wall time of the paper's HiDe-Prompt run on PAPER_GPUS devices like this one (see
    ESTIMATE_FORMULA): training and uncached evaluation only (no data loading, statistics, alignment or checkpoints),
    the processes scaling perfectly."""
    estimates: list[dict[str, float | str]] = []
    for precision in THROUGHPUT_PRECISIONS:
        rate = {r["phase"]: r for r in rows if r["method"] == "hideprompt" and r["precision"] == precision}
        if set(rate) != set(PAPER_EPOCHS):
            continue
        seconds = {f"stage{i}_train_seconds": PAPER_EPOCHS[s] * PAPER_TRAIN_IMAGES /
                   (PAPER_GPUS * rate[s]["train_images_per_second"]) for i, s in enumerate(("tii", "wtp"), 1)}
        seconds["eval_seconds"] = sum(PAPER_EVAL_IMAGES / (PAPER_GPUS * rate[s]["eval_images_per_second"])
                                      for s in PAPER_EPOCHS)
        estimates.append({"precision": precision, **seconds, "total_seconds": sum(seconds.values())})
    return estimates


def throughput_section(device: str, quick: bool) -> dict[str, Any]:
    """Every row of the plan; a failure is reported in the result (and fails the check), not raised."""
    plan, start = throughput_plan(device, quick), time.perf_counter()
    section: dict[str, Any] = {"plan": asdict(plan), "rows": [], "estimate": [], "error": None}
    try:
        dev = resolve_device(device)
        section["bf16_matmul_flops"] = bf16_matmul_flops(dev, plan.matmul_size)
        for name in plan.methods:
            section["rows"] += method_throughput(name, plan, dev, section["bf16_matmul_flops"])
        section["estimate"] = paper_estimate(section["rows"])
    except Exception as err:  # the runs' table is still written
        section["error"] = f"{type(err).__name__}: {err}"
    section["seconds"] = time.perf_counter() - start
    return section


def throughput_lines(section: dict[str, Any], device: str) -> list[str]:
    plan = section["plan"]
    lines = [f"## Throughput: {plan['model']}, {plan['input_size']} px, batch {plan['batch_size']} per device, "
             f"median of {plan['steps']} steps after {plan['warmup']} warm-up (random inputs, data loading excluded)",
             ""]
    if section["error"]:
        return [*lines, f"FAILED: {section['error']}"]
    lines += ["| method | phase | precision | train img/s | eval img/s | peak GPU MiB | train GFLOP/img | eval "
              "GFLOP/img | train % of bf16 peak | eval % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        gflops = [None if r[k] is None else r[k] / 1e9 for k in ("train_flops_per_image", "eval_flops_per_image")]
        lines.append(f"| {r['method']} | {r['phase']} | {r['precision']} | {_fmt(r['train_images_per_second'], 1)} "
                     f"| {_fmt(r['eval_images_per_second'], 1)} | {_fmt(r['peak_mib'], 0)} | {_fmt(gflops[0])} "
                     f"| {_fmt(gflops[1])} | {_fmt(r['train_peak_percent'], 1)} | {_fmt(r['eval_peak_percent'], 1)} |")
    side = plan["matmul_size"]
    lines += ["", f"bf16 peak: {section['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s achieved by a {side}x{side}x{side} "
              f"bf16 matmul; a row's share is its img/s x FLOP/img (counted op by op on one step) over that.", "",
              f"Paper-run estimate (Split CIFAR-100 HiDe-Prompt, both stages, {PAPER_GPUS} devices like this one"
              f"{'' if device == 'cuda' else ', at this tiny CPU size: meaningless'}) = {ESTIMATE_FORMULA}:"]
    lines += [f"- {e['precision']}: {e['total_seconds'] / 60:.1f} min (stage 1 {e['stage1_train_seconds'] / 60:.1f}, "
              f"stage 2 {e['stage2_train_seconds'] / 60:.1f}, evaluation {e['eval_seconds'] / 60:.1f}); training and "
              f"uncached evaluation only, perfect scaling" for e in section["estimate"]]
    return [*lines, "", f"Section time: {section['seconds']:.1f} s."]


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if device == "cuda":
        capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env.update(gpu=torch.cuda.get_device_name(0), capability=capability, cudnn=torch.backends.cudnn.version(),
                   bf16_native=resolve_amp("auto", "cuda:0") == "bf16")
    else:
        env.update(cpu=_cpu_name(), bf16_native=cpu_has_native_bf16())
    return env


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def header_lines(env: dict[str, Any]) -> list[str]:
    hardware = (f"GPU {env['gpu']} (compute capability {env['capability']})" if env["device"] == "cuda"
                else f"CPU {env['cpu']}, {env['cpus']} cores, OMP_NUM_THREADS={env['omp_num_threads'] or 'unset'}")
    software = f"torch {env['torch']}, CUDA {env['cuda'] or 'none'}" + (
        f", cuDNN {env['cudnn']}" if env["device"] == "cuda" else "")
    return [f"# gpu_check: every method end to end on Split Digits, {env['device']}", "", f"- {hardware}",
            f"- {software}", f"- bf16 native: {'yes' if env['bf16_native'] else 'no (emulated: slow)'}"]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_lines(outcomes: list[Outcome], device: str) -> list[str]:
    memory = "peak GPU MiB" if device == "cuda" else "peak RSS MiB"
    lines = [f"| run | what | status | exit | wall s | final acc % | {memory} |", "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        exit_code = "-" if o.exit_code is None else str(o.exit_code)
        lines.append(f"| {o.key} | {o.what} | {o.status} | {exit_code} | {_fmt(o.seconds, 1)} | {_fmt(o.final_acc)} "
                     f"| {_fmt(o.peak_mib, 0)} |")
    return lines


def report(env: dict[str, Any], outcomes: list[Outcome], pair: dict[str, Any], throughput: dict[str, Any],
           seconds: float) -> tuple[str, bool]:
    failed = [o.key for o in outcomes if o.status.startswith("FAILED")]
    ok = not failed and pair["identical"] and not throughput["error"]
    problems = [f"{len(failed)} run(s) failed", *([] if pair["identical"] else ["pair differs"]),
                *(["throughput failed"] if throughput["error"] else [])]
    verdict = "PASSED" if ok else f"FAILED ({', '.join(problems)})"
    lines = [*header_lines(env), "", *table_lines(outcomes, env["device"]), "",
             f"Deterministic pair: {pair['text']}", "", *throughput_lines(throughput, env["device"]), "",
             f"{verdict}; {len(outcomes)} runs and the throughput section in {seconds / 60:.1f} min. Final acc: the "
             f"last average accuracy (the few-shot flow: the episodes' mean); logs in logs/."]
    return "\n".join(lines) + "\n", ok


# ----------------------------------------------------------------------------------------------------------------
# Entry
# ----------------------------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="End-to-end check of every method on one device (Split Digits, "
                                     "offline). See the module docstring.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="two per-method runs and one epoch each")
    parser.add_argument("--run_timeout", type=float, default=600, help="seconds before a run is stopped")
    parser.add_argument("output_dir", nargs="?", help="default ./output/gpu_check_<date-time>")
    return parser.parse_args(argv)


def _output_dir(given: str | None) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(given or REPO / "output" / f"gpu_check_{stamp}").resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; give a new OUTPUT_DIR (each run needs a fresh folder)")
    return out


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU; use --device cpu")
    out = _output_dir(args.output_dir)
    env = environment(args.device)
    print("\n".join(header_lines(env)) + f"\n\noutput: {out}\n", flush=True)
    runs, outcomes, start = plan(args.device, args.quick, out), [], time.perf_counter()
    for i, run in enumerate(runs, 1):
        outcomes.append(execute(run, out, args.run_timeout))
        _progress(i, len(runs), outcomes[-1])
    pair = compare_pair(*(o for o in outcomes if o.key.startswith("deterministic_")), out)
    print("[throughput] measuring in this process ...", flush=True)
    throughput = throughput_section(args.device, args.quick)
    text, ok = report(env, outcomes, pair, throughput, time.perf_counter() - start)
    print("\n" + text, end="")
    (out / "gpu_check.md").write_text(text)
    atomic_write_json({"environment": env, "runs": [asdict(o) for o in outcomes], "deterministic_pair": pair,
                       "throughput": throughput, "passed": ok, "seconds": time.perf_counter() - start},
                      out / "gpu_check.json")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(run_child(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))

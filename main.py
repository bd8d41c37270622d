"""Entry point: `python main.py <dataset>_<method> [flags]`, alone or under torchrun / torch.distributed.launch.

    torchrun --nproc_per_node=8 main.py cifar100_linear --data-path ./data --output_dir ./output/c100_linear
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import engine
import few_shot
import metrics
import online
import preemption
from config.cli import parse_args
from config.resolved import Config, config_json
from config.settings import QueryModelSettings
from datasets import build_scenario, check_domains, load_benchmark
from datasets.scenario import LoaderSettings, StreamShape
from learner import Learner
from models import METHODS, create_method
from models.backbones import check_input_size, resolve_backbone, weights_file
from run_files import check_output_dir, held_run, lock_output_dir, release_output_dirs, run_folder_for
from utils import (
    AbortedOnOtherRank,
    UserError,
    cleanup_distributed,
    init_distributed,
    is_dist,
    is_main_process,
    launcher_ranks,
    log,
    lost_contact_cause,
    run_on_main_only,
    seed_everything,
    set_cpu_threads,
    use_deterministic_algorithms,
    warn,
)


def check_backbones(cfg: Config) -> None:
    """Every backbone takes --input-size as whole patches, and every weight file the backbones will load exists (a
    self-supervised name needs its file in checkpoints/)."""
    models = [(cfg.backbone.model, cfg.backbone.pretrained_checkpoint, "--model")]
    if cfg.has(QueryModelSettings):
        query = cfg.group(QueryModelSettings)
        models.append((query.original_model, query.original_model_checkpoint, "--original_model"))
    for name, checkpoint, flag in models:
        backbone = resolve_backbone(name, flag)
        check_input_size(backbone, cfg.backbone.input_size, flag)
        if cfg.backbone.pretrained or checkpoint:
            weights_file(backbone, checkpoint)


def check_before_data(cfg: Config) -> None:
    """Every check that needs no data: the class split, the backbones' patch grid and weight files, the files the
    method reads (HiDe's stage-1 run) and the output folder. All run before the dataset is touched, so they fail in a
    second and together: more than one problem is one line, "N problems: (1) ... (2) ..."."""
    data = cfg.data
    checks = (lambda: build_scenario(data.num_classes, data.num_tasks, data.shuffle, cfg.run.seed, data.dataset,
                                     shape=StreamShape.of(cfg.stream)),
              lambda: check_domains(data.dataset, data.num_tasks) if cfg.stream.scenario == "domain" else None,
              lambda: check_backbones(cfg),
              lambda: METHODS[cfg.method].check_before_data(cfg),
              lambda: check_output_dir(cfg.run.output_dir, data.num_tasks, cfg.run.eval, cfg.run.resume,
                                       suggestion=run_folder_for(cfg.subcommand, cfg.run.seed)))
    problems: list[UserError] = []
    for check in checks:  # every one runs, on every rank: check_output_dir is a collective
        try:
            check()
        except UserError as err:
            problems.append(err)
    aborted = [err for err in problems if isinstance(err, AbortedOnOtherRank)]  # rank 0 tells the problems
    messages = list(dict.fromkeys(str(err) for err in problems))  # --model and --original_model may agree
    if aborted or len(messages) == 1:
        raise (aborted or problems)[0]
    if messages:
        raise UserError(f"{len(messages)} problems: " + " ".join(f"({i}) {m}" for i, m in enumerate(messages, 1)))


def main(argv: Sequence[str] | None = None) -> int:
    peers_lost = False
    try:
        cfg = parse_args(argv)
        if cfg.run.print_config:
            print(config_json(cfg))
            return 0
        with preemption.handling_signals():
            return _run(cfg)
    except preemption.Preempted as stop:
        if is_main_process():
            print(stop, file=sys.stderr, flush=True)
        return preemption.EXIT_CODE
    except UserError as err:
        if not isinstance(err, AbortedOnOtherRank) and speaks_for_the_run():
            record_for_launcher(f"error: {err}")
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:  # only a lost process (the check below); any other error raises as it would
        cause = lost_contact_cause(err)
        if cause is None:
            raise
        peers_lost = True
        print(f"error: lost contact with another process of the run ({cause}); its files up to the last saved "
              f"epoch are intact: --resume", file=sys.stderr, flush=True)
        return 1
    except BrokenPipeError:  # help piped into `head` or a pager that closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        release_output_dirs()
        cleanup_distributed(peers_lost)


def speaks_for_the_run() -> bool:
    """Rank 0 alone prints a run's verdict, also before the process group exists (a command line refused at once
    under torchrun would otherwise be printed by every process)."""
    if is_dist():
        return is_main_process()
    ranks = launcher_ranks()
    return ranks is None or ranks[0] == 0


def record_for_launcher(message: str) -> None:
    """Under torchrun, the error file it gives each worker: its failure summary then shows this line as the root
    cause instead of `error_file: <N/A>` (the file format of torch.distributed.elastic's error handler)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):  # the launcher's summary is a courtesy; the exit code already tells
            Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": str(int(time.time()))}}}))


def _log_run(cfg: Config, method, scenario, ctx) -> None:
    """A short summary of what runs where; every setting is in config.json."""
    o, c = cfg.optim, cfg.context
    log(f"{cfg.subcommand}: {cfg.method} on {cfg.data.dataset}, {scenario.num_tasks} tasks x "
        f"{len(scenario.task_classes[0])} classes, seed {cfg.run.seed} -> {cfg.run.output_dir} (every setting in "
        f"its config.json)")
    for role, module in method.named_children():  # the backbone, and a query/original model of its own if any
        if hasattr(module, "weights_summary"):
            log(f"{role}: {module.weights_summary}, {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M "
                f"parameters")
    if c.original_backbone is not None:
        log(f"backbones: --model {c.backbone}, --original_model (query / task identity) {c.original_backbone}")
    log(f"{ctx.world_size} process(es) x batch {o.batch_size} = global batch {c.global_batch_size} | device "
        f"{ctx.device} | amp {cfg.run.amp} | {torch.get_num_threads()} CPU thread(s) per process | effective LR "
        f"{c.effective_lr:.6g} = {o.lr:g} x {o.batch_size if o.unscale_lr else c.global_batch_size}/256 | "
        f"{o.epochs} epoch(s) per task")


def _run(cfg: Config) -> int:
    ctx = init_distributed(cfg.run.device, cfg.dist.dist_url, cfg.dist.local_rank, cfg.dist.dist_timeout)
    if cfg.run.wandb:  # rank 0 logs, so rank 0 needs the package; before any work, so nothing is written
        from wandb_logger import require_wandb
        run_on_main_only(require_wandb)
    use_deterministic_algorithms(cfg.run.deterministic)  # before any CUDA work, for the few-shot flow too
    set_cpu_threads(cfg.run.threads, ctx.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.run.reference_mode:
        switches = ", ".join(cfg.context.reference_switches) or "nothing: every setting it covers is already so"
        log(f"--reference_mode: the reference's behaviour where ours differs: {switches}")
    for flag in cfg.context.no_effect_flags:
        warn(f"--{flag} has no effect in {cfg.subcommand}; it is accepted for compatibility with the reference")
    if few_shot.is_flow(cfg):  # not one continual run but a flow of them (few_shot.py)
        check_backbones(cfg)
        return few_shot.run(cfg, ctx)
    data = cfg.data
    check_before_data(cfg)
    lock_output_dir(cfg.run.output_dir, create=False)  # a folder in use stops a second launch here, at once
    if cfg.run.resume and not cfg.run.eval and is_main_process() and held_run(Path(cfg.run.output_dir)) is None:
        warn(f"--resume: {cfg.run.output_dir} holds no run to resume; the run starts at task 1")

    seed_everything(cfg.run.seed)
    benchmark = load_benchmark(data.dataset, data.data_path, cfg.backbone.input_size)
    loader = LoaderSettings(batch_size=cfg.optim.batch_size, num_workers=data.num_workers,
                            pin_memory=data.pin_mem and ctx.device.type == "cuda", seed=cfg.run.seed)
    scenario = build_scenario(benchmark.num_classes, data.num_tasks, data.shuffle, cfg.run.seed, data.dataset,
                              benchmark=benchmark, loader=loader, shape=StreamShape.of(cfg.stream))
    seed_everything(cfg.run.seed)
    method = create_method(cfg, scenario).to_run_device(ctx.device, cfg.run.amp)
    _log_run(cfg, method, scenario, ctx)
    lock_output_dir(cfg.run.output_dir)  # a new folder: made only now, once every check passed, before any write
    if cfg.stream.protocol == "online":
        results = online.run_protocol(Learner(method, cfg, ctx), scenario, cfg, ctx,
                                      engine.create_logger(cfg, Path(cfg.run.output_dir)))
        log(f"final: online, {results['completed_tasks']} tasks | results in {cfg.run.output_dir}")
        return 0
    if cfg.run.eval:
        results = engine.evaluate_checkpoints(method, scenario, cfg, ctx)
    else:
        results = engine.run(method, scenario, cfg, ctx)
    final = results["final"]
    if final is not None and results["completed_tasks"] == scenario.num_tasks:
        log(f"final: {metrics.format_summary(final, scenario.num_tasks - 1, scenario.num_tasks)} | results in "
            f"{cfg.run.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Entry point: `python main.py <dataset>_<method> [flags]`, alone or under torchrun / torch.distributed.launch.

    torchrun --nproc_per_node=8 main.py cifar100_linear --data-path ./data --output_dir ./output/c100_linear
"""
from __future__ import annotations

import sys
from argparse import Namespace
from typing import Sequence

from utils import AbortedOnOtherRank, UserError, is_main_process


def check_weight_files(cfg: Namespace) -> None:
    """Every weight file the backbones will load exists (a self-supervised name needs its file in checkpoints/)."""
    from models.backbones import resolve_backbone, weights_file

    models = [(cfg.model, cfg.pretrained_checkpoint, "--model")]
    if cfg.original_backbone is not None:
        models.append((cfg.original_model, cfg.original_model_checkpoint, "--original_model"))
    for name, checkpoint, flag in models:
        if cfg.pretrained or checkpoint:
            weights_file(resolve_backbone(name, flag), checkpoint)


def main(argv: Sequence[str] | None = None) -> int:
    from config import config_json, parse_args

    try:
        cfg = parse_args(argv)
        if cfg.print_config:
            print(config_json(cfg))
            return 0
        return _run(cfg)
    except UserError as err:
        if not isinstance(err, AbortedOnOtherRank) and is_main_process():
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        from utils import cleanup_distributed
        cleanup_distributed()


def _run(cfg: Namespace) -> int:
    import engine
    import metrics
    from config import FEW_SHOT_METHOD, config_to_dict
    from datasets import build_scenario, load_benchmark
    from datasets.scenario import LoaderSettings
    from models import create_method
    from utils import barrier, init_distributed, log, seed_everything, warn

    ctx = init_distributed(cfg.device, cfg.dist_url, cfg.local_rank)
    cfg.world_size = ctx.world_size
    for flag in cfg.no_effect_flags:
        warn(f"--{flag} has no effect in {cfg.subcommand}; it is accepted for compatibility with the reference")
    if cfg.method == FEW_SHOT_METHOD:  # not one continual run but a flow of them (few_shot.py)
        check_weight_files(cfg)
        import few_shot
        return few_shot.run(cfg, ctx)
    # the class split and the weight files are checked before any data is read, so these fail in a second
    build_scenario(cfg.num_classes, cfg.num_tasks, cfg.shuffle, cfg.seed, cfg.dataset)
    check_weight_files(cfg)
    engine.check_output_dir(cfg, cfg.num_tasks)
    barrier()  # every rank has looked at output_dir before rank 0 writes into it

    seed_everything(cfg.seed)
    benchmark = load_benchmark(cfg.dataset, cfg.data_path, cfg.input_size)
    loader = LoaderSettings(batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                            pin_memory=cfg.pin_mem and ctx.device.type == "cuda", seed=cfg.seed)
    scenario = build_scenario(benchmark.num_classes, cfg.num_tasks, cfg.shuffle, cfg.seed, cfg.dataset,
                              benchmark=benchmark, loader=loader)
    cfg.class_order = scenario.class_order
    seed_everything(cfg.seed)
    method = create_method(cfg, scenario).to(ctx.device)

    log(f"config: {config_to_dict(cfg)}")
    for role, module in method.named_children():  # the backbone, and a query/original model of its own if any
        if hasattr(module, "weights_summary"):
            log(f"{role}: {module.weights_summary}, {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M "
                f"parameters")
    log(f"{cfg.subcommand}: {scenario.num_tasks} tasks x {len(scenario.task_classes[0])} classes | device "
        f"{ctx.device} | {ctx.world_size} process(es) x batch {cfg.batch_size} = global batch "
        f"{cfg.global_batch_size} | effective LR {cfg.effective_lr:.6g} = {cfg.lr:g} x "
        f"{cfg.batch_size if cfg.unscale_lr else cfg.global_batch_size}/256 | amp {cfg.amp}")
    if cfg.eval:
        results = engine.evaluate_checkpoints(method, scenario, cfg, ctx)
    else:
        results = engine.run(method, scenario, cfg, ctx)
    final = results["final"]
    if final is not None and results["completed_tasks"] == scenario.num_tasks:
        log(f"final: {metrics.format_summary(final, scenario.num_tasks - 1, scenario.num_tasks)} | results in "
            f"{cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

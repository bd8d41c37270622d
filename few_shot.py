"""Few-shot LoRA: `main.py <key>_few_shot_lora`, or the reference's `fsl.py <key>_few_shot_lora`.

Three parts, chosen by the reference's switches (with none of them, all three run in turn):
- `--train_vanilla`: the linear probe (`models.linear`) learnt continually over the upstream tasks (the continual
  classes of `--datasets`), an ordinary engine run in `--vanilla_model_output_dir`.
- `--train_shared`: the shared model (`models.few_shot_lora`, a LoRA slot per dataset), the same way, in
  `--shared_model_output_dir`; with several datasets its test images take the slot the vanilla run predicts.
- `--train_few_shot`: `--num_episodes` episodes of `--num_ways`-way `--num_shots`-shot classification on held-out
  classes of `--datasets[--few_shot_dataset_idx]`: a fresh linear head on the frozen `--fs_backbone` features,
  `--num_fs_epochs` full-batch Adam epochs on the augmented support images, top-1 on up to `--num_queries` test
  images per class. Mean accuracy and its 95% interval go to `<output_dir>/few_shot_*.json`.

Upstream runs are distributed as every other run (one model, gradients averaged over ranks; the reference trained an
independent replica per rank). Episodes are shared out among the ranks, each a function of (seed, episode) alone, so
the results do not depend on the number of processes; the results file is rewritten after every round of episodes
and `--resume` continues it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import engine
import metrics
import preemption
from config.resolved import Config, config_to_dict
from config.settings import FewShotSettings
from datasets import load_benchmark
from datasets.base import Benchmark, TransformedDataset
from datasets.few_shot import EpisodeSampler, build_upstream_scenario, check_class_split, upstream_benchmark
from datasets.scenario import LoaderSettings, Scenario
from divergence import check_loss
from models import METHODS
from models.base import create_backbone_from
from models.few_shot_lora import VANILLA_HINT, SharedLoRA
from models.lora import forward_lora
from models.vit import freeze
from run_files import check_output_dir, check_run_complete, check_same_experiment, lock_output_dir, read_run_json
from utils import (
    DistContext,
    UserError,
    all_gather_rows,
    atomic_write_json,
    is_main_process,
    log,
    maybe_autocast,
    run_on_main_only,
    seed_everything,
)

# a results file continued with --resume must come from the same episodes (their number may grow)
EPISODE_KEYS = ("datasets", "continual_classes_per_dataset", "few_shot_classes_per_dataset", "few_shot_dataset_idx",
                "few_class_idx", "num_ways", "num_shots", "num_queries", "num_fs_epochs", "fs_lr", "fs_backbone",
                "backbone", "pretrained_checkpoint", "pretrained", "input_size", "seed", "amp")
SHARED_HINT = VANILLA_HINT.replace("--train_vanilla", "--train_shared")


def is_flow(cfg: Config) -> bool:
    """The few-shot subcommands run a flow of runs, not one continual run."""
    return cfg.has(FewShotSettings)


def upstream_config(cfg: Config, part: str) -> Config:
    """The config of the `vanilla` or `shared` upstream run: its own folder, and `part` telling the two apart."""
    fs = cfg.group(FewShotSettings)
    output_dir = fs.vanilla_model_output_dir if part == "vanilla" else fs.shared_model_output_dir
    return replace(cfg.with_settings(output_dir=output_dir), part=part)


def results_path(cfg: Config) -> Path:
    fs = cfg.group(FewShotSettings)
    dataset = fs.datasets[fs.few_shot_dataset_idx]
    return Path(cfg.run.output_dir) / f"few_shot_{fs.fs_backbone}_{dataset}_{fs.num_ways}way_{fs.num_shots}shot.json"


def _needs_shared(cfg: Config) -> bool:
    fs = cfg.group(FewShotSettings)
    return fs.fs_backbone != "vanilla"


def _needs_vanilla(cfg: Config) -> bool:
    """The vanilla run picks LoRA slots only when there are several datasets to pick from."""
    fs = cfg.group(FewShotSettings)
    return len(fs.datasets) > 1 and (fs.train_shared or (fs.train_few_shot and fs.fs_backbone == "vanilla+shared"))


def check_plan(cfg: Config, scenario: Scenario) -> None:
    """Before anything is read or written: every folder written is free (or resumed), every run read is complete."""
    fs = cfg.group(FewShotSettings)
    num_tasks = scenario.num_tasks
    for part, switch in (("vanilla", fs.train_vanilla), ("shared", fs.train_shared)):
        if switch:
            part_dir = upstream_config(cfg, part).run.output_dir
            check_output_dir(part_dir, num_tasks, cfg.run.eval, cfg.run.resume, f"--{part}_model_output_dir")
    run_on_main_only(lambda: _check_inputs(cfg, num_tasks))  # rank 0 decides for every rank


def _check_inputs(cfg: Config, num_tasks: int) -> None:
    """The flow's results file is new (or resumed) and every upstream run it reads but does not train is complete."""
    fs = cfg.group(FewShotSettings)
    if fs.train_few_shot:
        path = results_path(cfg)
        if path.exists() and not cfg.run.resume:
            raise UserError(f"{path} exists; pass --resume to continue its episodes, or choose another --output_dir")
        if _needs_shared(cfg) and not fs.train_shared:
            check_run_complete(fs.shared_model_output_dir, num_tasks, "--shared_model_output_dir", SHARED_HINT)
    if not fs.train_vanilla and _needs_vanilla(cfg):
        check_run_complete(fs.vanilla_model_output_dir, num_tasks, "--vanilla_model_output_dir", VANILLA_HINT)


def lock_folders(cfg: Config, create: bool = True) -> None:
    """Rank 0 locks the flow's folder and the upstream folders it trains in (they may lie outside --output_dir);
    `create` as in `run_files.lock_output_dir`."""
    fs = cfg.group(FewShotSettings)
    lock_output_dir(cfg.run.output_dir, create=create)
    for part, switch in (("vanilla", fs.train_vanilla), ("shared", fs.train_shared)):
        if switch:
            lock_output_dir(upstream_config(cfg, part).run.output_dir, f"--{part}_model_output_dir", create)


def run(cfg: Config, ctx: DistContext) -> int:
    fs = cfg.group(FewShotSettings)
    scenario = build_upstream_scenario(list(fs.continual_classes_per_dataset), list(fs.tasks_per_dataset),
                                       cfg.data.shuffle, cfg.run.seed, list(fs.datasets))
    check_plan(cfg, scenario)
    lock_folders(cfg, create=False)  # folders in use stop a second launch here, at once

    # the upstream runs read every dataset, the episodes only theirs
    used = range(len(fs.datasets)) if fs.train_vanilla or fs.train_shared else [fs.few_shot_dataset_idx]
    members: dict[int, Benchmark] = {}
    for i in used:
        members[i] = load_benchmark(fs.datasets[i], cfg.data.data_path, cfg.backbone.input_size)
        check_class_split(members[i], fs.continual_classes_per_dataset[i], fs.few_shot_classes_per_dataset[i])
    lock_folders(cfg)  # new folders: made only now, once the data is checked, before any write
    log(f"{cfg.subcommand}: upstream {scenario.num_tasks} tasks over {scenario.num_classes} continual classes of "
        f"{cfg.data.dataset}; vanilla {fs.train_vanilla}, shared {fs.train_shared}, few-shot {fs.train_few_shot}")
    if fs.train_vanilla or fs.train_shared:
        scenario.benchmark = upstream_benchmark(list(members.values()), fs.continual_classes_per_dataset)
        scenario.loader = LoaderSettings(batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers,
                                         pin_memory=cfg.data.pin_mem and ctx.device.type == "cuda", seed=cfg.run.seed)
        for part, switch in (("vanilla", fs.train_vanilla), ("shared", fs.train_shared)):
            if switch:
                _run_upstream(part, upstream_config(cfg, part), scenario, ctx)
                if cfg.run.stop_after_task is not None and cfg.run.stop_after_task < scenario.num_tasks:
                    log(f"stopped the {part} run after task {cfg.run.stop_after_task} as asked; the parts after it "
                        f"need it whole: continue with --resume")  # `--resume` skips the finished runs' tasks
                    return 0
    if fs.train_few_shot:
        run_episodes(cfg, members[fs.few_shot_dataset_idx], scenario, ctx)
    return 0


def _run_upstream(part: str, cfg: Config, scenario: Scenario, ctx: DistContext) -> None:
    log(f"=== upstream {part} model -> {cfg.run.output_dir}")
    seed_everything(cfg.run.seed)
    method = (METHODS["linear"] if part == "vanilla" else SharedLoRA)(cfg, scenario)
    method.to_run_device(ctx.device, cfg.run.amp)
    if isinstance(method, SharedLoRA):
        method.check_vanilla_run()
    results = (engine.evaluate_checkpoints if cfg.run.eval else engine.run)(method, scenario, cfg, ctx)
    if results["final"] is not None and results["completed_tasks"] == scenario.num_tasks:
        log(f"upstream {part}: {metrics.format_summary(results['final'], scenario.num_tasks - 1, scenario.num_tasks)}")


# ----------------------------------------------------------------------------------------------------------------
# Episodes
# ----------------------------------------------------------------------------------------------------------------
class EpisodeBackbone:
    """The frozen feature extractor of the episodes: the pre-trained ViT, or the shared run's final model with one
    LoRA slot (`slot_for` picks it: the few-shot dataset's own, or the vanilla run's vote on the support images).
    Test-image features are kept per (slot, image): episodes drawing the same query images reuse them."""

    def __init__(self, cfg: Config, scenario: Scenario, device: torch.device):
        self.cfg, self.device = cfg, device
        self.fs = fs = cfg.group(FewShotSettings)
        self.shared: SharedLoRA | None = None
        seed_everything(cfg.run.seed)  # as before the upstream runs: an untrained (--pretrained False) ViT is theirs
        if _needs_shared(cfg):
            shared_cfg = upstream_config(cfg, "shared")
            self.shared = SharedLoRA(shared_cfg, scenario).to(device)
            last = scenario.num_tasks - 1
            engine.restore_task(self.shared, shared_cfg, last)
            if fs.fs_backbone == "vanilla+shared":
                self.shared.load_task_context(last)  # the vanilla head over every continual class votes
            self.shared.eval()
            self.backbone = self.shared.backbone
        else:
            self.backbone = create_backbone_from(cfg, with_dropout=False).to(device).eval()
            freeze(self.backbone)
        self.query_features: dict[tuple[int | None, int], torch.Tensor] = {}

    @torch.no_grad()
    def features(self, images: torch.Tensor, slot: int | None) -> torch.Tensor:
        with maybe_autocast(self.device, self.cfg.run.amp):
            if slot is None:
                return self.backbone(images).float()
            return forward_lora(self.backbone, images, self.shared.lora, slot).float()

    @torch.no_grad()
    def slot_for(self, support: SupportImages) -> int | None:
        """None (no LoRA), the few-shot dataset's slot, or the vanilla run's majority vote over the support images
        (seen without augmentation; a tie goes to the lower slot, as in the reference)."""
        if self.shared is None:
            return None
        if self.fs.fs_backbone == "shared":
            return self.fs.few_shot_dataset_idx
        with maybe_autocast(self.device, self.cfg.run.amp):
            votes = self.shared.predict_dataset(support.plain().to(self.device))
        return int(torch.bincount(votes).argmax())

    def test_features(self, test: Any, indices: np.ndarray, slot: int | None) -> torch.Tensor:
        missing = [int(i) for i in indices if (slot, int(i)) not in self.query_features]
        if missing:
            loader = DataLoader(Subset(test, missing), batch_size=self.cfg.optim.batch_size,
                                num_workers=self.cfg.data.num_workers)
            done = 0
            for images, _ in loader:
                for row in self.features(images.to(self.device, non_blocking=True), slot):
                    self.query_features[(slot, missing[done])] = row
                    done += 1
        return torch.stack([self.query_features[(slot, int(i))] for i in indices])


class SupportImages:
    """An episode's support images, decoded once: augmented afresh at every epoch (the reference re-read them from
    disk), and under the test transform for the slot vote. `train_eval` holds the same items as `train`
    (`Benchmark`), so one decoded copy serves both."""

    def __init__(self, member: Benchmark, indices: np.ndarray):
        self.member, self.indices = member, [int(i) for i in indices]
        decoded = isinstance(member.train, TransformedDataset) and isinstance(member.train_eval, TransformedDataset)
        self.raw = [member.train.load(i) for i in self.indices] if decoded else None

    def _draw(self, dataset: Any) -> torch.Tensor:
        if self.raw is None:
            return torch.stack([dataset[i][0] for i in self.indices])
        transform = dataset.transform or (lambda sample: sample)
        return torch.stack([transform(x) for x in self.raw])

    def augmented(self) -> torch.Tensor:
        return self._draw(self.member.train)

    def plain(self) -> torch.Tensor:
        return self._draw(self.member.train_eval)


def run_episode(e: int, sampler: EpisodeSampler, member: Benchmark, backbone: EpisodeBackbone, cfg: Config,
                device: torch.device) -> tuple[float, int]:
    """(accuracy in %, slot or -1) of episode e; its head, augmentations and draws depend on (seed, e) only."""
    fs = cfg.group(FewShotSettings)
    episode = sampler.episode(e)
    labels = torch.as_tensor(member.train_targets[episode.support], device=device)
    positions = torch.as_tensor(episode.classes, device=device)
    targets = torch.searchsorted(positions, labels)  # class k of the head = the k-th smallest label
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed * 100_003 + e)
        support = SupportImages(member, episode.support)
        slot = backbone.slot_for(support)
        head = nn.Linear(backbone.backbone.num_features, fs.num_ways).to(device)
        optimizer = torch.optim.Adam(head.parameters(), lr=fs.fs_lr)
        for _ in range(fs.num_fs_epochs):
            features = backbone.features(support.augmented().to(device, non_blocking=True), slot)
            loss = F.cross_entropy(head(features), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        check_loss(loss.item(), "few-shot head", f"episode {e + 1}, its epoch {fs.num_fs_epochs}", "lower --fs_lr")
    query_targets = torch.searchsorted(positions, torch.as_tensor(member.test_targets[episode.query], device=device))
    with torch.no_grad():
        predicted = head(backbone.test_features(member.test, episode.query, slot)).argmax(1)
    accuracy = 100.0 * (predicted == query_targets).double().mean().item()
    return accuracy, -1 if slot is None else slot


def run_episodes(cfg: Config, member: Benchmark, scenario: Scenario, ctx: DistContext) -> dict[str, Any]:
    fs = cfg.group(FewShotSettings)
    path = results_path(cfg)
    episodes: list[dict[str, Any]] = []
    if cfg.run.resume and path.is_file():
        saved = read_run_json(path, "delete it to start the episodes afresh")
        check_same_experiment(saved.get("config", {}), cfg, path, EPISODE_KEYS)
        episodes = saved["episodes"][: fs.num_episodes]
    sampler = EpisodeSampler(member, fs.few_class_idx, fs.num_ways, fs.num_shots, fs.num_queries, cfg.run.seed)
    backbone = EpisodeBackbone(cfg, scenario, ctx.device)
    record = _results(cfg, member, episodes)
    log(f"=== few-shot: {fs.num_episodes} episodes, {fs.num_ways}-way {fs.num_shots}-shot on {member.name} "
        f"classes {fs.few_class_idx}, backbone {fs.fs_backbone}" + (f" ({len(episodes)} done)" if episodes else ""))
    for start in range(len(episodes), fs.num_episodes, ctx.world_size):
        preemption.stop_if_requested(ctx.device, f"few-shot episode {start + 1}", f"{start} episodes are saved")
        e = start + ctx.rank
        mine = torch.zeros(0, 3, dtype=torch.float64, device=ctx.device)
        if e < fs.num_episodes:
            accuracy, slot = run_episode(e, sampler, member, backbone, cfg, ctx.device)
            mine = torch.tensor([[e, accuracy, slot]], dtype=torch.float64, device=ctx.device)
        for e_done, accuracy, slot in sorted(all_gather_rows(mine).tolist()):
            entry = {"episode": int(e_done), "classes": sampler.episode(int(e_done)).classes, "accuracy": accuracy}
            if slot >= 0:
                entry["slot"] = int(slot)
            episodes.append(entry)
            log(f"episode {int(e_done) + 1}/{fs.num_episodes}: accuracy {accuracy:.2f}"
                + (f" (LoRA slot {int(slot)})" if slot >= 0 else ""))
        record = _results(cfg, member, episodes)
        if is_main_process():
            atomic_write_json(record, path)
    summary = record["summary"]
    interval = "-" if summary["ci95"] is None else f"{summary['ci95']:.2f}"
    log(f"few-shot {fs.num_ways}-way {fs.num_shots}-shot on {member.name} ({fs.fs_backbone}): mean accuracy "
        f"{summary['mean_acc']:.2f} +- {interval} (95% interval over {summary['episodes']} episodes) | results in "
        f"{path}")
    return record


def _results(cfg: Config, member: Benchmark, episodes: list[dict[str, Any]]) -> dict[str, Any]:
    fs = cfg.group(FewShotSettings)
    return {"subcommand": cfg.subcommand, "dataset": member.name, "fs_backbone": fs.fs_backbone,
            "num_ways": fs.num_ways, "num_shots": fs.num_shots, "classes": fs.few_class_idx,
            "summary": metrics.episode_summary([e["accuracy"] for e in episodes]), "episodes": episodes,
            "config": config_to_dict(cfg)}

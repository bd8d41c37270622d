"""The few-shot LoRA subcommands (`<key>_few_shot_lora`, spec §13): their flags, and the upstream "shared" model.

The flow itself (vanilla upstream run, shared upstream run, episodes) is `few_shot.py`. The shared model is a frozen
ViT with one LoRA slot of the keys and values per upstream dataset, and a head over all continual classes: task t
trains the slot of its dataset (LoRA at LR x 0.1, the head at LR, as the reference) with the masked cross-entropy.
At test time each image uses the slot of the dataset the vanilla run's head (a linear probe on the same frozen
backbone, after the same task) predicts; with a single dataset there is nothing to predict and no vanilla run is read.
"""
from __future__ import annotations

from argparse import Namespace

import torch

from config import FEW_SHOT_FLAGS
from datasets.scenario import Scenario
from utils import UserError

from .base import (ContinualMethod, check_run_complete, classifier_head, load_prefixed, masked_cross_entropy,
                   read_run_checkpoint)
from .hidelora import LORA_READS_FLAGS
from .lora import build_lora_pool, check_lora_flags, forward_lora
from .vit import create_backbone, freeze

# the shared model reads the LoRA flags but --lora_type (its pool is always one slot per dataset)
FEW_SHOT_READS_FLAGS = frozenset(FEW_SHOT_FLAGS) | (LORA_READS_FLAGS - {"lora_type"})
# the vanilla run the shared run reads must agree with it on these
UPSTREAM_KEYS = ("datasets", "continual_classes_per_dataset", "tasks_per_dataset", "backbone",
                 "pretrained_checkpoint", "class_order", "input_size", "pretrained")
VANILLA_HINT = "train it first: the same command with --train_vanilla (or --resume it)"


class SharedLoRA(ContinualMethod):
    checkpoint_prefixes = ("lora.", "head.")
    reads_flags = FEW_SHOT_READS_FLAGS

    @classmethod
    def finalize_config(cls, cfg: Namespace) -> None:
        given = set(cfg.explicit_flags)
        lists = {name: getattr(cfg, name) for name in ("continual_classes_per_dataset", "few_shot_classes_per_dataset",
                                                       "tasks_per_dataset")}
        for name, values in lists.items():
            if len(values) != len(cfg.datasets):
                raise UserError(f"--{name} has {len(values)} entries for the {len(cfg.datasets)} --datasets "
                                f"({' '.join(cfg.datasets)}); give one per dataset")
            if min(values) < 1:
                raise UserError(f"--{name} {' '.join(map(str, values))}: every entry must be at least 1")
        from datasets import BENCHMARKS  # noqa: PLC0415
        unknown = [name for name in cfg.datasets if name not in BENCHMARKS]
        if unknown:
            raise UserError(f"unknown --datasets entry {unknown[0]!r}; choose from: {', '.join(BENCHMARKS)}")
        if "dataset" in given:
            raise UserError("few_shot_lora reads the upstream datasets from --datasets (a list), not --dataset")
        num_tasks = sum(cfg.tasks_per_dataset)
        if "num_tasks" in given and cfg.num_tasks != num_tasks:
            raise UserError(f"--num_tasks {cfg.num_tasks} contradicts --tasks_per_dataset "
                            f"{' '.join(map(str, cfg.tasks_per_dataset))} (= {num_tasks} tasks); drop --num_tasks")
        cfg.num_tasks, cfg.num_classes = num_tasks, sum(cfg.continual_classes_per_dataset)
        cfg.dataset = "+".join(cfg.datasets)
        if not 0 <= cfg.few_shot_dataset_idx < len(cfg.datasets):
            raise UserError(f"--few_shot_dataset_idx {cfg.few_shot_dataset_idx}: choose 0..{len(cfg.datasets) - 1} "
                            f"(of {' '.join(cfg.datasets)})")
        if not (cfg.train_vanilla or cfg.train_shared or cfg.train_few_shot):
            cfg.train_vanilla = cfg.train_shared = cfg.train_few_shot = True
        first = cfg.continual_classes_per_dataset[cfg.few_shot_dataset_idx]
        held_out = range(first, first + cfg.few_shot_classes_per_dataset[cfg.few_shot_dataset_idx])
        if cfg.few_class_idx is None:
            cfg.few_class_idx = list(held_out[: cfg.num_ways])
        if cfg.train_few_shot:  # the episode settings are checked where episodes run
            cls._check_episode_flags(cfg, held_out)
        if cfg.eval and cfg.train_few_shot:
            raise UserError("--eval re-evaluates the upstream runs (--train_vanilla / --train_shared); the episodes "
                            "always train their heads: pass --eval with those switches only")
        cfg.vanilla_model_output_dir = cfg.vanilla_model_output_dir or f"{cfg.output_dir.rstrip('/')}/vanilla_model"
        cfg.shared_model_output_dir = cfg.shared_model_output_dir or f"{cfg.output_dir.rstrip('/')}/shared_model"
        if cfg.vanilla_model_output_dir == cfg.shared_model_output_dir:
            raise UserError("--vanilla_model_output_dir and --shared_model_output_dir are the same folder; the two "
                            "upstream runs need one each")
        cfg.lora_type = "hide"  # a pool of slots, one per dataset, whatever the reference's ignored flag says
        check_lora_flags(cfg, "hide")

    @staticmethod
    def _check_episode_flags(cfg: Namespace, held_out: range) -> None:
        for name, minimum in (("num_ways", 2), ("num_shots", 1), ("num_queries", 1), ("num_episodes", 1),
                              ("num_fs_epochs", 1)):
            if getattr(cfg, name) < minimum:
                raise UserError(f"--{name} must be at least {minimum}, got {getattr(cfg, name)}")
        outside = [c for c in cfg.few_class_idx if c not in held_out]
        if outside:
            raise UserError(f"--few_class_idx {outside[0]} is not a few-shot class of "
                            f"{cfg.datasets[cfg.few_shot_dataset_idx]} (those are {held_out.start}.."
                            f"{held_out.stop - 1}; the labels before are learnt upstream)")
        if len(set(cfg.few_class_idx)) < cfg.num_ways:
            raise UserError(f"--num_ways {cfg.num_ways} needs at least as many distinct --few_class_idx, got "
                            f"{len(set(cfg.few_class_idx))} (the dataset has {len(held_out)} few-shot classes)")

    def __init__(self, cfg: Namespace, scenario: Scenario):
        super().__init__(cfg, scenario)
        self.backbone = create_backbone(cfg.model, cfg.pretrained, cfg.input_size, cfg.drop, cfg.drop_path,
                                        checkpoint=cfg.pretrained_checkpoint)
        freeze(self.backbone)
        num_datasets = len(cfg.datasets)
        self.lora = build_lora_pool(self.backbone, num_datasets, cfg)
        self.head = classifier_head(self.backbone.num_features, scenario.num_classes)
        task_datasets = scenario.task_datasets or [0] * scenario.num_tasks  # none given: one dataset
        self.register_buffer("task_dataset", torch.tensor(task_datasets), persistent=False)
        class_to_dataset = self.task_dataset[scenario.class_to_task]
        self.register_buffer("class_to_dataset", class_to_dataset, persistent=False)
        # the vanilla run's head after the current task: the dataset predictor (not saved here: it is that run's)
        self.dataset_head = classifier_head(self.backbone.num_features, scenario.num_classes) if num_datasets > 1 \
            else None
        self.vanilla_task: int | None = None
        self.task = 0

    def check_vanilla_run(self) -> None:
        """Before anything trains: the vanilla run it reads, if any, is complete (few_shot.py calls it)."""
        if self.dataset_head is not None:
            check_run_complete(self.cfg.vanilla_model_output_dir, len(self.task_dataset), "--vanilla_model_output_dir",
                               VANILLA_HINT)
            self.load_task_context(0)

    def load_task_context(self, t: int) -> None:
        """The vanilla run's head after task t (the reference's per-task dataset predictor)."""
        self.task = t
        if self.dataset_head is None or self.vanilla_task == t:
            return
        state = read_run_checkpoint(self.cfg.vanilla_model_output_dir, t, self.cfg, "a vanilla upstream run",
                                    lambda c: c.get("method") == self.cfg.method and c.get("stage") == "vanilla",
                                    UPSTREAM_KEYS, VANILLA_HINT)
        load_prefixed(self.dataset_head, state, "head.", self.cfg.vanilla_model_output_dir)
        freeze(self.dataset_head)
        self.vanilla_task = t
        self.invalidate_state_cache()

    def begin_task(self, t: int) -> list[dict]:
        self.load_task_context(t)
        return [{"params": [self.lora.a, self.lora.b], "lr": self.cfg.effective_lr * 0.1},
                {"params": list(self.head.parameters())}]

    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(forward_lora(self.backbone, images, self.lora, int(self.task_dataset[t])))
        return masked_cross_entropy(logits, targets, self.train_mask(t)), logits

    @torch.no_grad()
    def predict_dataset(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        """Each image's dataset as the vanilla head sees it among the classes seen so far (all zeros: one dataset)."""
        if self.dataset_head is None:
            return torch.zeros(len(images), dtype=torch.long, device=images.device)

        def infer() -> torch.Tensor:
            logits = self.dataset_head(self.frozen_forward("backbone", self.backbone, images, batch_key)).float()
            seen = self._task_masks[: self.task + 1].any(0)
            return self.class_to_dataset[logits.masked_fill(~seen, float("-inf")).argmax(1)]
        return self.cached("dataset", batch_key, infer, until_state_changes=True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        return self.head(forward_lora(self.backbone, images, self.lora, self.predict_dataset(images, batch_key)))

"""The few-shot LoRA subcommands (`<key>_few_shot_lora`): their settings, and the upstream "shared" model.

The flow itself (vanilla upstream run, shared upstream run, episodes) is `few_shot.py`. The shared model is a frozen
ViT with one LoRA slot of the keys and values per upstream dataset, and a head over all continual classes: task t
trains the slot of its dataset (LoRA at LR x 0.1, the head at LR, as the reference) with the masked cross-entropy.
At test time each image uses the slot of the dataset the vanilla run's head (a linear probe on the same frozen
backbone, after the same task) predicts; with a single dataset there is nothing to predict and no vanilla run is read.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from config.resolved import Config
from config.settings import FewShotSettings, LoRASettings
from datasets import BENCHMARKS
from datasets.few_shot import build_upstream_scenario
from datasets.scenario import Scenario
from run_files import check_run_complete, read_run_checkpoint
from utils import UserError

from .base import ContinualMethod, classifier_head, create_backbone_from, load_prefixed, masked_cross_entropy
from .lora import build_lora_pool, forward_lora
from .vit import freeze

# the vanilla run the shared run reads must agree with it on these
UPSTREAM_KEYS = ("datasets", "continual_classes_per_dataset", "tasks_per_dataset", "backbone",
                 "pretrained_checkpoint", "class_order", "input_size", "pretrained")
VANILLA_HINT = "train it first: the same command with --train_vanilla (or --resume it)"


class SharedLoRA(ContinualMethod):
    checkpoint_prefixes = ("lora.", "head.")
    # the LoRA settings but --lora_type: its pool is always one slot per dataset
    settings_groups = (LoRASettings, FewShotSettings)
    stream_refusal = "its upstream runs and few-shot episodes are a flow of their own"
    own_datasets = True

    @classmethod
    def class_order(cls, draft: Any) -> list[int]:
        return build_upstream_scenario(list(draft.continual_classes_per_dataset), list(draft.tasks_per_dataset),
                                       draft.shuffle, draft.seed, list(draft.datasets)).class_order

    @classmethod
    def resolve_settings(cls, draft: Any) -> None:
        cls._check_lists(draft)
        given = draft.given
        if "dataset" in given:
            raise UserError("few_shot_lora reads the upstream datasets from --datasets (a list), not --dataset")
        num_tasks = sum(draft.tasks_per_dataset)
        if "num_tasks" in given and draft.num_tasks != num_tasks:
            raise UserError(f"--num_tasks {draft.num_tasks} contradicts --tasks_per_dataset "
                            f"{' '.join(map(str, draft.tasks_per_dataset))} (= {num_tasks} tasks); drop --num_tasks")
        draft.num_tasks, draft.num_classes = num_tasks, sum(draft.continual_classes_per_dataset)
        draft.dataset = "+".join(draft.datasets)
        if not 0 <= draft.few_shot_dataset_idx < len(draft.datasets):
            raise UserError(f"--few_shot_dataset_idx {draft.few_shot_dataset_idx}: choose 0..{len(draft.datasets) - 1} "
                            f"(of {' '.join(draft.datasets)})")
        if not (draft.train_vanilla or draft.train_shared or draft.train_few_shot):
            draft.train_vanilla = draft.train_shared = draft.train_few_shot = True
        cls._resolve_episodes(draft)
        draft.vanilla_model_output_dir = (draft.vanilla_model_output_dir
                                          or f"{draft.output_dir.rstrip('/')}/vanilla_model")
        draft.shared_model_output_dir = draft.shared_model_output_dir or f"{draft.output_dir.rstrip('/')}/shared_model"
        if draft.vanilla_model_output_dir == draft.shared_model_output_dir:
            raise UserError("--vanilla_model_output_dir and --shared_model_output_dir are the same folder; the two "
                            "upstream runs need one each")

    @staticmethod
    def _check_lists(draft: Any) -> None:
        lists = {name: draft[name] for name in ("continual_classes_per_dataset", "few_shot_classes_per_dataset",
                                                "tasks_per_dataset")}
        for name, values in lists.items():
            if len(values) != len(draft.datasets):
                raise UserError(f"--{name} has {len(values)} entries for the {len(draft.datasets)} --datasets "
                                f"({' '.join(draft.datasets)}); give one per dataset")
            if min(values) < 1:
                raise UserError(f"--{name} {' '.join(map(str, values))}: every entry must be at least 1")
        unknown = [name for name in draft.datasets if name not in BENCHMARKS]
        if unknown:
            raise UserError(f"unknown --datasets entry {unknown[0]!r}; choose from: {', '.join(BENCHMARKS)}")

    @classmethod
    def _resolve_episodes(cls, draft: Any) -> None:
        first = draft.continual_classes_per_dataset[draft.few_shot_dataset_idx]
        held_out = range(first, first + draft.few_shot_classes_per_dataset[draft.few_shot_dataset_idx])
        if draft.few_class_idx is None:
            draft.few_class_idx = list(held_out[: draft.num_ways])
        if draft.train_few_shot:  # the episode settings are checked where episodes run
            cls._check_episode_flags(draft, held_out)
        if draft.eval and draft.train_few_shot:
            raise UserError("--eval re-evaluates the upstream runs (--train_vanilla / --train_shared); the episodes "
                            "always train their heads: pass --eval with those switches only")

    @staticmethod
    def _check_episode_flags(draft: Any, held_out: range) -> None:
        for name, minimum in (("num_ways", 2), ("num_shots", 1), ("num_queries", 1), ("num_episodes", 1),
                              ("num_fs_epochs", 1)):
            if getattr(draft, name) < minimum:
                raise UserError(f"--{name} must be at least {minimum}, got {getattr(draft, name)}")
        outside = [c for c in draft.few_class_idx if c not in held_out]
        if outside:
            raise UserError(f"--few_class_idx {outside[0]} is not a few-shot class of "
                            f"{draft.datasets[draft.few_shot_dataset_idx]} (those are {held_out.start}.."
                            f"{held_out.stop - 1}; the labels before are learnt upstream)")
        if len(set(draft.few_class_idx)) < draft.num_ways:
            raise UserError(f"--num_ways {draft.num_ways} needs at least as many distinct --few_class_idx, got "
                            f"{len(set(draft.few_class_idx))} (the dataset has {len(held_out)} few-shot classes)")

    def __init__(self, cfg: Config, scenario: Scenario):
        super().__init__(cfg, scenario)
        self.few_shot = cfg.group(FewShotSettings)
        self.backbone = create_backbone_from(cfg)
        freeze(self.backbone)
        num_datasets = len(self.few_shot.datasets)
        self.lora = build_lora_pool(self.backbone, num_datasets, cfg.group(LoRASettings))
        self.head = classifier_head(self.backbone.num_features, scenario.num_classes)
        task_datasets = scenario.task_datasets or [0] * scenario.num_tasks  # none given: one dataset
        self.task_dataset_list = list(task_datasets)  # what a training step reads: a buffer would sync with the device
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
            check_run_complete(self.few_shot.vanilla_model_output_dir, len(self.task_dataset),
                               "--vanilla_model_output_dir", VANILLA_HINT)
            self.load_task_context(0)

    def load_task_context(self, t: int) -> None:
        """The vanilla run's head after task t (the reference's per-task dataset predictor)."""
        self.task = t
        if self.dataset_head is None or self.vanilla_task == t:
            return
        directory = self.few_shot.vanilla_model_output_dir
        state = read_run_checkpoint(directory, t, self.cfg, "a vanilla upstream run",
                                    lambda c: c.get("method") == self.cfg.method
                                    and c.get("part", c.get("stage")) == "vanilla", UPSTREAM_KEYS, VANILLA_HINT)
        load_prefixed(self.dataset_head, state, "head.", directory)
        freeze(self.dataset_head)
        self.vanilla_task = t
        self.invalidate_state_cache()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def begin_task(self, t: int) -> list[dict]:
        self.load_task_context(t)
        lora_lr = self.cfg.context.effective_lr * self.few_shot.shared_lora_lr_scale
        return [{"params": [self.lora.a, self.lora.b], "lr": lora_lr},
                {"params": list(self.head.parameters())}]

    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(forward_lora(self.backbone, images, self.lora, self.task_dataset_list[t]))
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

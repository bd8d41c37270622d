"""HiDe: hierarchical decomposition into task-identity inference (TII), within-task prediction (WTP) and
task-adaptive prediction (TAP), shared by HiDe-Prompt and HiDe-LoRA.

Each task runs one or two phases, each an object that owns its trainable parts, its feature function, its class
statistics and its task-adaptive-prediction settings:
- `TaskIdentityPhase` (stage 1): the original model, frozen ViT -> residual MLP -> head, learns to predict classes
  from the uninstructed [CLS] feature; then statistics of that feature per class and, from task 2 on, alignment of
  MLP + head on pseudo-features.
- `InstructedPhase` (stage 2): one instruction slot per task (an `Instruction`: prefix E-prompts or a LoRA of the keys
  and values; slot t from slot t-1, optional momentum), masked CE plus the contrastive regularisation; then statistics
  of the instructed feature (slot t) and alignment of the head. At test time the TII model of the current task picks
  each image's slot.
The two phases run as separate launches (the reference's two command lines: `--stage tii`, then `--stage wtp` reading
stage 1's files) or task by task in one (`--stage both`). Frozen features are cached (test sets for the whole run;
the instructed test features until the next training phase, so the evaluation after alignment only re-runs the head).
HiDe-Prompt and HiDe-LoRA differ only in their `Instruction`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from config.resolved import Config, flat_settings
from config.settings import HiDeSettings, QueryModelSettings, SlotSettings, TaskAdaptiveSettings, TaskIdentitySettings
from datasets.scenario import Scenario
from divergence import check_tensors
from run_files import check_run_complete, checkpoint_path, read_run_checkpoint
from utils import UserError, log, maybe_autocast

from .base import (
    ContinualMethod,
    classifier_head,
    create_backbone_from,
    load_prefixed,
    masked_cross_entropy,
    shares_query_backbone,
)
from .class_statistics import ClassStatistics, ContrastiveRegularizer, task_adaptive_prediction
from .original_model import TaskIdentityHead
from .vit import check_promptable, create_backbone, freeze, pretrained_features

# a stage-1 run that stage 2 reads must agree with it on these (the TII model's input, structure and classes)
STAGE1_KEYS = ("dataset", "original_backbone", "original_model_checkpoint", "original_model_mlp_structure",
               "num_tasks", "class_order", "input_size", "pretrained")
STAGE1_HINT = "point --trained_original_model at a finished stage-1 run (--train_inference_task_only; --resume one)"
# methods whose stage 1 is this one (the same TII model), so either's stage-1 run feeds either's stage 2
HIDE_METHODS = ("hideprompt", "hidelora")
STAGE_PHASES = {"tii": ("tii",), "wtp": ("wtp",), "both": ("tii", "wtp")}
HIDE_GROUPS = (QueryModelSettings, SlotSettings, HiDeSettings, TaskIdentitySettings, TaskAdaptiveSettings)


def hide_stage(values: dict[str, Any]) -> str:
    """--stage, with auto resolved: tii with --train_inference_task_only, wtp with --trained_original_model, else
    both."""
    if values["stage"] != "auto":
        return values["stage"]
    if values["train_inference_task_only"]:
        return "tii"
    return "wtp" if values["trained_original_model"] else "both"


class Instruction:
    """How stage 2 instructs the frozen ViT with one slot per task (prompts, LoRA): a subclass builds the slots
    (`module`, registered on the method as `slots_name`, so checkpoints keep their keys) and computes features."""

    slots_name = ""
    display_name, slot_kind = "", ""  # in messages: "HiDe-Prompt", "prompt slot"

    def __init__(self, cfg: Config, backbone: nn.Module):
        self.cfg, self.backbone = cfg, backbone
        self.module: nn.Module = nn.Identity()

    def init_slot_from_previous(self, t: int) -> None:
        raise NotImplementedError

    def param_groups(self, head_params: list[nn.Parameter]) -> list[dict]:
        """The optimizer's parameter groups of stage 2 (the slots and the head)."""
        raise NotImplementedError

    def features(self, images: torch.Tensor, slots: int | torch.Tensor) -> torch.Tensor:
        """Features with one slot for the whole batch (int) or each sample's own (a tensor of slot indices)."""
        raise NotImplementedError

    def training_features(self, images: torch.Tensor, t: int) -> torch.Tensor:
        return self.features(images, t)

    def after_training(self, t: int) -> None:
        """After task t's epochs (e.g. momentum)."""

    def test_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """The slots used at test time, from the per-image task predictions."""
        return slots


class HiDePhase:
    """One phase of a HiDe task: what it trains, its features, statistics and task-adaptive prediction."""

    name = ""
    checkpoint_prefixes: tuple[str, ...] = ()

    def __init__(self, method: HiDeMethod, cfg: Config, stats: ClassStatistics):
        self.method, self.cfg, self.stats = method, cfg, stats
        self.tap = cfg.group(TaskAdaptiveSettings)

    def begin_task(self, t: int) -> list[dict]:
        raise NotImplementedError

    def loss(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def after_training(self, t: int) -> None:
        """After task t's epochs, before its statistics."""

    def statistics_features(self, images: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError

    def alignment(self) -> tuple[list[nn.Parameter], Callable[[torch.Tensor], torch.Tensor], int, float]:
        """(parameters, classifier, pseudo-features per centroid per step, LR) of task-adaptive prediction."""
        raise NotImplementedError

    def predict_task(self, images: torch.Tensor, batch_key: tuple | None) -> torch.Tensor | None:
        raise NotImplementedError

    def predict(self, images: torch.Tensor, batch_key: tuple | None) -> torch.Tensor:
        raise NotImplementedError


class TaskIdentityPhase(HiDePhase):
    """Stage 1: mapping + head on the uninstructed feature, predicting the class (hence the task)."""

    name = "tii"
    checkpoint_prefixes = ("tii.", "tii_stats.")

    def __init__(self, method: HiDeMethod, cfg: Config, model: TaskIdentityHead, stats: ClassStatistics):
        super().__init__(method, cfg, stats)
        self.model = model

    def begin_task(self, t: int) -> list[dict]:
        freeze(self.model, False)
        return [{"params": list(self.model.parameters())}]

    def loss(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = self.method.uninstructed(images)
        logits = self.model(features)
        return masked_cross_entropy(logits, targets, self.method.train_mask(t)), logits

    def statistics_features(self, images: torch.Tensor, t: int) -> torch.Tensor:
        return self.method.uninstructed(images)  # before the MLP mapping

    def alignment(self) -> tuple[list[nn.Parameter], Callable[[torch.Tensor], torch.Tensor], int, float]:
        batch = self.cfg.optim.batch_size  # B pseudo-features per centroid, LR scaled by B/256, as the reference
        return list(self.model.parameters()), self.model, batch, self.tap.ca_lr * batch / 256.0

    def predict_task(self, images: torch.Tensor, batch_key: tuple | None) -> torch.Tensor | None:
        return None  # the task of the predicted class is the TII model's answer

    def predict(self, images: torch.Tensor, batch_key: tuple | None) -> torch.Tensor:
        return self.model(self.method.original_features(images, batch_key))


class InstructedPhase(HiDePhase):
    """Stage 2: the per-task slots and a head on the instructed feature; the stage-1 model picks test slots."""

    name = "wtp"

    def __init__(self, method: HiDeMethod, cfg: Config, instruction: Instruction, stats: ClassStatistics,
                 head: nn.Module, fc_norm: nn.Module):
        super().__init__(method, cfg, stats)
        self.instruction, self.head, self.fc_norm = instruction, head, fc_norm
        self.reg = cfg.group(HiDeSettings).reg
        self.regularizer = ContrastiveRegularizer()
        self.checkpoint_prefixes = (f"{instruction.slots_name}.", "head.", "wtp_fc_norm.", "wtp_stats.")

    def head_params(self) -> list[nn.Parameter]:
        """The non-slot parameters: the head (and MoCo v3's fresh fc_norm), what alignment trains."""
        return [*self.head.parameters(), *self.fc_norm.parameters()]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(features))

    def begin_task(self, t: int) -> list[dict]:
        self.instruction.init_slot_from_previous(t)
        for trained in (self.instruction.module, self.head, self.fc_norm):
            freeze(trained, False)
        self.regularizer.set_prototypes(self.stats.prototypes() if self.reg else torch.zeros(0, 1))
        return self.instruction.param_groups(self.head_params())

    def loss(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.instruction.training_features(images, t)
        logits = self.classify(features)
        loss = masked_cross_entropy(logits, targets, self.method.train_mask(t))
        if self.reg:
            loss = loss + self.reg * self.regularizer(features)
        return loss, logits

    def after_training(self, t: int) -> None:
        self.instruction.after_training(t)

    def statistics_features(self, images: torch.Tensor, t: int) -> torch.Tensor:
        return self.instruction.features(images, t)  # with the task's own slot

    def alignment(self) -> tuple[list[nn.Parameter], Callable[[torch.Tensor], torch.Tensor], int, float]:
        per_component = self.tap.ca_stage2_batches_per_centroid * self.cfg.optim.batch_size
        return self.head_params(), self.classify, per_component, self.tap.ca_lr

    def predict_task(self, images: torch.Tensor, batch_key: tuple | None) -> torch.Tensor | None:
        method = self.method

        def infer() -> torch.Tensor:
            logits = method.tii(method.original_features(images, batch_key)).float()
            seen = method._task_masks[: method.task + 1].any(0)
            return method.class_to_task[logits.masked_fill(~seen, float("-inf")).argmax(1)]
        return method.cached("tii", batch_key, infer, until_state_changes=True)

    def predict(self, images: torch.Tensor, batch_key: tuple | None) -> torch.Tensor:
        def instructed() -> torch.Tensor:
            slots = self.instruction.test_slots(self.predict_task(images, batch_key))
            return self.instruction.features(images, slots)
        return self.classify(self.method.cached("instructed", batch_key, instructed, until_state_changes=True))


class InRunTaskIdentity:
    """Stage 1 trained in this run (--stage both, or a stage-1 run): its model of task t is already in place."""

    def check(self, num_tasks: int) -> None:
        """Nothing to check: no other run is read."""

    def ensure(self, t: int) -> None:
        """Nothing to load: this run trains it."""


class StoredTaskIdentity:
    """Stage 1 read from another run's task checkpoints (--trained_original_model): for task t its model after task
    t, trained on tasks <= t, never a later one. Every key must fit (the reference's HiDe-LoRA loads it with
    strict=False and silently ignores what does not)."""

    def __init__(self, method: HiDeMethod, directory: str):
        self.method, self.directory = method, directory
        self.loaded: int | None = None

    @staticmethod
    def check_run(directory: str, num_tasks: int, cfg: Config) -> None:
        """The run in `directory` has every task checkpoint, and its first is a stage-1 one made with `cfg`'s
        settings (HiDe's `check_before_data`, before any data or model)."""
        _refuse_continual_lora(directory, cfg)
        check_run_complete(directory, num_tasks, "--trained_original_model", STAGE1_HINT)
        _read_stage1(directory, 0, cfg)

    def check(self, num_tasks: int) -> None:
        _refuse_continual_lora(self.directory, self.method.cfg)
        check_run_complete(self.directory, num_tasks, "--trained_original_model", STAGE1_HINT)
        self.ensure(0)

    def ensure(self, t: int) -> None:
        if self.loaded == t:  # stage 2 never changes the TII model: task t's is still in place
            return
        state = _read_stage1(self.directory, t, self.method.cfg)
        load_prefixed(self.method.tii, state, "tii.", str(checkpoint_path(self.directory, t)))
        self.loaded = t


def _refuse_continual_lora(directory: str, cfg: Config) -> None:
    """The reference's README feeds HiDe-LoRA a continual-LoRA run: its loader (strict=False) takes only that run's
    backbone and head and leaves the task-identity MLP untrained. Say so, and what to run instead."""
    try:
        method = flat_settings(json.loads((Path(directory) / "config.json").read_text())).get("method")
    except (OSError, ValueError, AttributeError):
        return  # no readable config: the checks of its checkpoints say what is wrong
    if method != "continual_lora":
        return
    stage1 = f"./output/{cfg.dataset_key}_hideprompt_seed{cfg.run.seed}"
    raise UserError(f"--trained_original_model {directory} is a continual-LoRA run: the reference would load only its "
                    f"backbone and head and leave the task-identity model's MLP untrained, so it is refused; train "
                    f"the task-identity stage with `python main.py {cfg.dataset_key}_hideprompt "
                    f"--train_inference_task_only --seed {cfg.run.seed} --output_dir {stage1}` and pass "
                    f"--trained_original_model {stage1}")


STAGE2_NAMES = {"hideprompt": "HiDe-Prompt", "hidelora": "HiDe-LoRA"}


def _read_stage1(directory: str, t: int, cfg: Config) -> dict[str, torch.Tensor]:
    """Task t's model state of the stage-1 run in `directory`, once its config shows it is one that agrees with
    `cfg`."""
    return read_run_checkpoint(
        directory, t, cfg, f"a stage-1 (task-identity) checkpoint of HiDe-Prompt or HiDe-LoRA, which "
                           f"{STAGE2_NAMES.get(cfg.method, cfg.method)} reads",
        lambda c: c.get("method") in HIDE_METHODS and c.get("stage") in ("tii", "both"), STAGE1_KEYS, STAGE1_HINT)


class HiDeMethod(ContinualMethod):
    instruction_class: type[Instruction] = Instruction
    stream_refusal = ("its stages, class statistics and task-adaptive prediction need task boundaries, several epochs "
                      "per task and the task of every class")

    @classmethod
    def preset_stage(cls, values: dict[str, Any]) -> str | None:
        return hide_stage(values)

    @classmethod
    def resolve_settings(cls, draft: Any) -> None:
        if draft.train_inference_task_only and draft.trained_original_model:
            raise UserError("--train_inference_task_only trains stage 1, --trained_original_model feeds stage 2: "
                            "they contradict each other; pass one of them")
        if draft.stage != "auto" and draft.train_inference_task_only and draft.stage != "tii":
            raise UserError(f"--train_inference_task_only contradicts --stage {draft.stage}; pass one of them")
        draft.stage = hide_stage(draft)
        if draft.stage == "wtp" and not draft.trained_original_model:
            raise UserError("--stage wtp needs --trained_original_model (the --output_dir of a stage-1 run)")
        if draft.stage != "wtp" and draft.trained_original_model:
            raise UserError(f"--trained_original_model is read by stage 2 alone; drop it with --stage {draft.stage}")
        if draft.stage != "both" and draft.given & {"tii_epochs", "tii_lr", "tii_clip_grad"}:
            raise UserError("--tii_epochs/--tii_lr/--tii_clip_grad set stage 1 within --stage both; in a separate "
                            "stage-1 run use --epochs/--lr/--clip-grad")
        if any(ratio < 1 for ratio in draft.original_model_mlp_structure):
            raise UserError(f"--original_model_mlp_structure {list(draft.original_model_mlp_structure)}: widths are "
                            f"positive multiples of the feature size, e.g. 2 or 4 4")
        if draft.stage != "tii" and draft.size < draft.num_tasks:
            instruction = cls.instruction_class
            raise UserError(f"{instruction.display_name} keeps a {instruction.slot_kind} per task: --size "
                            f"{draft.size} < {draft.num_tasks} tasks")

    @classmethod
    def check_before_data(cls, cfg: Config) -> None:
        hide = cfg.group(HiDeSettings)
        if hide.stage == "wtp":
            StoredTaskIdentity.check_run(hide.trained_original_model, cfg.data.num_tasks, cfg)

    def __init__(self, cfg: Config, scenario: Scenario):
        super().__init__(cfg, scenario)
        hide, tap = cfg.group(HiDeSettings), cfg.group(TaskAdaptiveSettings)
        query = cfg.group(QueryModelSettings)
        self.tap = tap
        self.phases = STAGE_PHASES[hide.stage]
        self.task_classes = scenario.task_classes
        self.register_buffer("class_to_task", scenario.class_to_task, persistent=False)
        self.original_vit = create_backbone(query.original_model, cfg.backbone.pretrained, cfg.backbone.input_size,
                                            checkpoint=query.original_model_checkpoint, flag="--original_model")
        freeze(self.original_vit)
        dim = self.original_vit.num_features
        # each trained part starts from its own seed, so the parts a stage builds do not depend on the other stage
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            self.tii = TaskIdentityHead(dim, scenario.num_classes, list(hide.original_model_mlp_structure),
                                        fresh_norm=bool(self.original_vit.fresh_keys))
        self.tii_stats = ClassStatistics(tap.ca_storage_efficient_method, scenario.num_classes, dim, tap.n_centroids)
        phases: dict[str, HiDePhase] = {"tii": TaskIdentityPhase(self, self._stage1_config(cfg), self.tii,
                                                                 self.tii_stats)}
        if "wtp" in self.phases:
            phases["wtp"] = self._build_instructed(cfg, scenario)
        self._phase_objects = {name: phases[name] for name in self.phases}
        self.checkpoint_prefixes = tuple(p for name in self.phases for p in phases[name].checkpoint_prefixes)
        self.current: HiDePhase = self._phase_objects[self.phases[0]]
        self.task = 0
        self.stage1 = (InRunTaskIdentity() if "tii" in self.phases
                       else StoredTaskIdentity(self, hide.trained_original_model))
        self.stage1.check(scenario.num_tasks)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.original_vit, *([self.backbone] if "wtp" in self.phases else [])]

    def _stage1_config(self, cfg: Config) -> Config:
        """Stage 1's training settings: the run's own in a stage-1 run; --tii_* and a constant LR when it shares the
        run with stage 2."""
        if "wtp" not in self.phases:
            return cfg
        tii = cfg.group(TaskIdentitySettings)
        clip = cfg.optim.clip_grad if tii.tii_clip_grad is None else tii.tii_clip_grad
        return cfg.with_settings(epochs=tii.tii_epochs, lr=tii.tii_lr, sched="constant", clip_grad=clip)

    def _build_instructed(self, cfg: Config, scenario: Scenario) -> InstructedPhase:
        self.backbone = self.original_vit if shares_query_backbone(cfg) else create_backbone_from(cfg)
        check_promptable(self.backbone)
        freeze(self.backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed + 1)
            instruction = self.instruction_class(cfg, self.backbone)
            self.add_module(instruction.slots_name, instruction.module)
            self.head = classifier_head(self.backbone.num_features, scenario.num_classes)
        # MoCo v3: the reference trains a fresh fc_norm between the instructed feature and the head
        self.wtp_fc_norm = nn.LayerNorm(self.backbone.num_features) if self.backbone.fresh_keys else nn.Identity()
        self.wtp_stats = ClassStatistics(self.tap.ca_storage_efficient_method, scenario.num_classes,
                                         self.backbone.num_features, self.tap.n_centroids)
        phase = InstructedPhase(self, cfg, instruction, self.wtp_stats, self.head, self.wtp_fc_norm)
        self.regularizer = phase.regularizer
        return phase

    # --- features shared by the phases -------------------------------------------------------------------------
    def uninstructed(self, images: torch.Tensor) -> torch.Tensor:
        """The original model's frozen feature (for MoCo v3 before its fresh fc_norm: the reference's pre_logits)."""
        return pretrained_features(self.original_vit, images)

    def original_features(self, images: torch.Tensor, batch_key: tuple | None) -> torch.Tensor:
        return self.frozen_forward("original", self.uninstructed, images, batch_key)

    # --- hooks called by engine.py -----------------------------------------------------------------------------
    def set_phase(self, phase: str) -> Config:
        self.current = self._phase_objects[phase]
        return self.current.cfg

    def lr_flag(self, phase: str) -> str:
        return "--tii_lr" if phase == "tii" and len(self.phases) > 1 else "--lr"

    def load_task_context(self, t: int) -> None:
        self.task = t
        self.stage1.ensure(t)
        self.invalidate_state_cache()

    def begin_task(self, t: int) -> list[dict]:
        self.task = t
        freeze(self, True)
        self.stage1.ensure(t)
        return self.current.begin_task(t)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.current.loss(images, targets, t)

    @torch.no_grad()
    def end_task(self, t: int, stats_loader: DataLoader) -> None:
        self.eval()
        self.current.after_training(t)
        feats, labels = [], []
        device = self._task_masks.device
        for images, targets in stats_loader:
            images = images.to(device, non_blocking=True)
            with maybe_autocast(device, self.cfg.run.amp):
                feats.append(self.current.statistics_features(images, t).float())
            labels.append(targets.to(device))
        self.current.stats.update(torch.cat(feats), torch.cat(labels), self.task_classes[t], seed=self.cfg.run.seed)
        name = self.current.name
        check_tensors(dict(self.current.stats.named_buffers()), f"task {t + 1} phase {name}: its class statistics",
                      f"the trained model gives non-finite features: lower {self.lr_flag(name)}")
        log(f"task {t + 1} {self.current.name}: class statistics ({self.tap.ca_storage_efficient_method}) of "
            f"{len(self.task_classes[t])} classes")

    def statistics_summary(self) -> dict[str, float]:
        present = self.current.stats.present
        return {"classes": float(present.any(1).sum()), "components": float(present.sum())}

    def align(self, t: int) -> bool:
        if t == 0 or self.tap.not_train_ca or self.tap.crct_epochs == 0:
            return False
        seen = [c for classes in self.task_classes[: t + 1] for c in classes]
        iterations = sum(len(classes) for classes in self.task_classes[:t])  # classes of the earlier tasks
        params, classify, per_component, lr = self.current.alignment()
        freeze(self, True)
        for p in params:
            p.requires_grad_(True)
        self.train()
        with torch.enable_grad():
            self.alignment_losses = task_adaptive_prediction(
                params, classify, self.current.stats, seen, self._task_masks[: t + 1].any(0), iterations,
                per_component, self.tap.crct_epochs, lr, self.cfg.optim.weight_decay, seed=self.cfg.run.seed + t,
                where=f"task {t + 1} phase {self.current.name}")
        freeze(self, True)
        self.eval()
        return True

    @torch.no_grad()
    def predict_task(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor | None:
        return self.current.predict_task(images, batch_key)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        return self.current.predict(images, batch_key)

"""HiDe (spec §2.3, §2.5, §3, §4): hierarchical decomposition into task-identity inference (TII), within-task
prediction (WTP) and task-adaptive prediction (TAP), shared by HiDe-Prompt and HiDe-LoRA.

Two phases per task, run as separate launches (the reference's two command lines) or in one (`--stage both`):
- `tii` (stage 1): the original model, frozen ViT -> residual MLP -> head, learns to predict classes from the
  uninstructed [CLS] feature; then statistics of that feature per class and, from task 2 on, alignment of MLP + head
  on pseudo-features.
- `wtp` (stage 2): one instruction slot per task (a prefix E-prompt, or a LoRA of the keys and values; slot t from
  slot t-1, optional momentum), masked CE plus the contrastive regularisation; then statistics of the instructed
  feature (slot t) and alignment of the head. At test time the TII model of the current task picks each image's slot.
Frozen features are cached (test sets for the whole run; the instructed test features until the next training
phase, so the evaluation after alignment only re-runs the head).

A subclass says how the slots are built and applied (`_build_slots`, `_instructed_features`) and what trains.
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from datasets.scenario import Scenario
from utils import UserError, log, maybe_autocast

from .base import (ContinualMethod, check_run_complete, classifier_head, load_prefixed, masked_cross_entropy,
                   read_run_checkpoint)
from .class_statistics import ClassStatistics, ContrastiveRegularizer, task_adaptive_prediction
from .original_model import TaskIdentityHead
from .vit import check_promptable, create_backbone, freeze, pretrained_features

# a stage-1 run that stage 2 reads must agree with it on these (the TII model's input, structure and classes)
STAGE1_KEYS = ("dataset", "original_backbone", "original_model_checkpoint", "original_model_mlp_structure",
               "num_tasks", "class_order", "input_size", "pretrained")
STAGE1_HINT = "point --trained_original_model at a finished stage-1 run (--train_inference_task_only; --resume one)"
# methods whose stage 1 is this one (the same TII model), so either's stage-1 run feeds either's stage 2
HIDE_METHODS = ("hideprompt", "hidelora")
HIDE_READS_FLAGS = frozenset({"original_model", "size", "stage", "train_inference_task_only",
                              "trained_original_model", "original_model_mlp_structure", "tii_epochs", "tii_lr",
                              "ca_storage_efficient_method", "n_centroids", "crct_epochs", "ca_lr", "not_train_ca",
                              "reg"})


def stage1_checkpoint(directory: str, t: int) -> Path:
    from engine import checkpoint_path  # noqa: PLC0415 (engine imports models)
    return checkpoint_path(directory, t)


class HiDeMethod(ContinualMethod):
    slots_name = ""  # the attribute (and checkpoint prefix) of the per-task instruction slots
    display_name, slot_kind = "", ""  # in messages: "HiDe-Prompt", "prompt slot"
    tii_clip_grad: float | None = None  # stage 1's clipping in --stage both, when it is not the run's

    @classmethod
    def finalize_config(cls, cfg: Namespace) -> None:
        given = set(cfg.explicit_flags)
        if cfg.train_inference_task_only and cfg.trained_original_model:
            raise UserError("--train_inference_task_only trains stage 1, --trained_original_model feeds stage 2: "
                            "they contradict each other; pass one of them")
        if cfg.stage == "auto":
            cfg.stage = ("tii" if cfg.train_inference_task_only else "wtp" if cfg.trained_original_model else "both")
        elif cfg.train_inference_task_only and cfg.stage != "tii":
            raise UserError(f"--train_inference_task_only contradicts --stage {cfg.stage}; pass one of them")
        if cfg.stage == "wtp" and not cfg.trained_original_model:
            raise UserError("--stage wtp needs --trained_original_model (the --output_dir of a stage-1 run)")
        if cfg.stage != "wtp" and cfg.trained_original_model:
            raise UserError(f"--trained_original_model is read by stage 2 alone; drop it with --stage {cfg.stage}")
        if cfg.stage != "both" and given & {"tii_epochs", "tii_lr"}:
            raise UserError("--tii_epochs/--tii_lr set stage 1 within --stage both; in a separate stage-1 run "
                            "use --epochs/--lr")
        if any(ratio < 1 for ratio in cfg.original_model_mlp_structure):
            raise UserError(f"--original_model_mlp_structure {cfg.original_model_mlp_structure}: widths are "
                            f"positive multiples of the feature size, e.g. 2 or 4 4")
        if cfg.stage != "tii" and cfg.size < cfg.num_tasks:
            raise UserError(f"{cls.display_name} keeps a {cls.slot_kind} per task: --size {cfg.size} < "
                            f"{cfg.num_tasks} tasks")

    def __init__(self, cfg: Namespace, scenario: Scenario):
        super().__init__(cfg, scenario)
        self.stage = cfg.stage
        self.phases = {"tii": ("tii",), "wtp": ("wtp",), "both": ("tii", "wtp")}[cfg.stage]
        self.task_classes = scenario.task_classes
        self.register_buffer("class_to_task", scenario.class_to_task, persistent=False)
        self.original_vit = create_backbone(cfg.original_model, cfg.pretrained, cfg.input_size,
                                            checkpoint=cfg.original_model_checkpoint, flag="--original_model")
        freeze(self.original_vit)
        dim = self.original_vit.num_features
        # each trained part starts from its own seed, so the parts a stage builds do not depend on the other stage
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.tii = TaskIdentityHead(dim, scenario.num_classes, list(cfg.original_model_mlp_structure),
                                        fresh_norm=bool(self.original_vit.fresh_keys))
        self.tii_stats = ClassStatistics(cfg.ca_storage_efficient_method, scenario.num_classes, dim,
                                         cfg.n_centroids)
        prefixes = ["tii.", "tii_stats."]
        if "wtp" in self.phases:
            self._build_instructed(cfg, scenario)
            prefixes = [f"{self.slots_name}.", "head.", "wtp_fc_norm.", "wtp_stats."] + (
                prefixes if "tii" in self.phases else [])
        self.checkpoint_prefixes = tuple(prefixes)
        self.task = 0
        self.stage1_task: int | None = None  # whose stage-1 TII model is loaded (stage wtp)
        self.phase = self.phases[0]
        if self.stage == "wtp":
            self._check_stage1_run(scenario.num_tasks)

    def _build_instructed(self, cfg: Namespace, scenario: Scenario) -> None:
        same = (cfg.backbone, cfg.pretrained_checkpoint) == (cfg.original_backbone, cfg.original_model_checkpoint)
        self.backbone = (self.original_vit if same
                         else create_backbone(cfg.model, cfg.pretrained, cfg.input_size, cfg.drop, cfg.drop_path,
                                              checkpoint=cfg.pretrained_checkpoint))
        check_promptable(self.backbone)
        freeze(self.backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self._build_slots(cfg)
            self.head = classifier_head(self.backbone.num_features, scenario.num_classes)
        # MoCo v3: the reference trains a fresh fc_norm between the instructed feature and the head (spec Q11)
        self.wtp_fc_norm = nn.LayerNorm(self.backbone.num_features) if self.backbone.fresh_keys else nn.Identity()
        self.wtp_stats = ClassStatistics(cfg.ca_storage_efficient_method, scenario.num_classes,
                                         self.backbone.num_features, cfg.n_centroids)
        self.regularizer = ContrastiveRegularizer()

    # --- what a subclass provides ----------------------------------------------------------------------------
    def _build_slots(self, cfg: Namespace) -> None:
        """Create `self.<slots_name>` (one slot per task) from the seeded RNG, for `self.backbone`."""
        raise NotImplementedError

    def _init_slot_from_previous(self, t: int) -> None:
        raise NotImplementedError

    def _slot_param_groups(self, head_params: list[nn.Parameter]) -> list[dict]:
        """The optimizer's parameter groups of stage 2 (the slots and the head)."""
        raise NotImplementedError

    def _instructed_features(self, images: torch.Tensor, slots: int | torch.Tensor) -> torch.Tensor:
        """Features with one slot for the whole batch (int) or each sample's own (a tensor of slot indices)."""
        raise NotImplementedError

    def _training_features(self, images: torch.Tensor, t: int) -> torch.Tensor:
        return self._instructed_features(images, t)

    def _after_training(self, t: int) -> None:
        """Stage 2, after task t's epochs (e.g. momentum)."""

    def _test_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """The slots used at test time, from the per-image task predictions."""
        return slots

    # --- stage 1 files ---------------------------------------------------------------------------------------
    def _check_stage1_run(self, num_tasks: int) -> None:
        check_run_complete(self.cfg.trained_original_model, num_tasks, "--trained_original_model", STAGE1_HINT)
        self._load_stage1(0)

    def _load_stage1(self, t: int) -> None:
        """Stage 1's model after task t: the TII model trained on tasks <= t, never a later one. Every key must
        fit (the reference's HiDe-LoRA loads with strict=False and silently ignores what does not, Q18)."""
        if self.stage1_task == t:  # stage 2 never changes the TII model: task t's is still in place
            return
        state = read_run_checkpoint(
            self.cfg.trained_original_model, t, self.cfg, "a HiDe-Prompt stage-1 checkpoint, the TII model "
            "HiDe-LoRA shares", lambda c: c.get("method") in HIDE_METHODS and c.get("stage") in ("tii", "both"),
            STAGE1_KEYS, STAGE1_HINT)
        load_prefixed(self.tii, state, "tii.", str(stage1_checkpoint(self.cfg.trained_original_model, t)))
        self.task = self.stage1_task = t

    def load_task_context(self, t: int) -> None:
        self.task = t
        if self.stage == "wtp":
            self._load_stage1(t)
        self.invalidate_state_cache()

    # --- phases ----------------------------------------------------------------------------------------------
    def set_phase(self, phase: str) -> Namespace:
        self.phase = phase
        if phase == "tii" and self.stage == "both":
            cfg = Namespace(**vars(self.cfg))
            cfg.epochs, cfg.lr, cfg.sched = self.cfg.tii_epochs, self.cfg.tii_lr, "constant"
            cfg.clip_grad = self.tii_clip_grad or self.cfg.clip_grad
            cfg.effective_lr = self.cfg.effective_lr * self.cfg.tii_lr / self.cfg.lr
            return cfg
        return self.cfg

    def begin_task(self, t: int) -> list[dict]:
        self.task = t
        freeze(self, True)
        if self.phase == "tii":
            freeze(self.tii, False)
            return [{"params": list(self.tii.parameters())}]
        if self.stage == "wtp":
            self._load_stage1(t)
        self._init_slot_from_previous(t)
        for trained in (getattr(self, self.slots_name), self.head, self.wtp_fc_norm):
            freeze(trained, False)
        self.regularizer.set_prototypes(self.wtp_stats.prototypes() if self.cfg.reg else torch.zeros(0, 1))
        return self._slot_param_groups(self._head_params())

    # --- training ----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.train_mask(t)
        if self.phase == "tii":
            with torch.no_grad():
                features = self._uninstructed(images)
            logits = self.tii(features)
            return masked_cross_entropy(logits, targets, mask), logits
        features = self._training_features(images, t)
        logits = self._classify(features)
        loss = masked_cross_entropy(logits, targets, mask)
        if self.cfg.reg:
            loss = loss + self.cfg.reg * self.regularizer(features)
        return loss, logits

    @torch.no_grad()
    def end_task(self, t: int, stats_loader: DataLoader) -> None:
        self.eval()
        if self.phase == "wtp":
            self._after_training(t)
        feats, labels = [], []
        device = self._task_masks.device
        for images, targets in stats_loader:
            images = images.to(device, non_blocking=True)
            with maybe_autocast(device, self.cfg.amp):
                if self.phase == "tii":  # the uninstructed feature, before the MLP mapping
                    feats.append(self._uninstructed(images).float())
                else:  # the instructed feature, with the task's own slot
                    feats.append(self._instructed_features(images, t).float())
            labels.append(targets.to(device))
        stats = self.tii_stats if self.phase == "tii" else self.wtp_stats
        stats.update(torch.cat(feats), torch.cat(labels), self.task_classes[t], seed=self.cfg.seed)
        log(f"task {t + 1} {self.phase}: class statistics ({self.cfg.ca_storage_efficient_method}) of "
            f"{len(self.task_classes[t])} classes")

    def align(self, t: int) -> bool:
        if t == 0 or self.cfg.not_train_ca or self.cfg.crct_epochs == 0:
            return False
        seen = [c for classes in self.task_classes[: t + 1] for c in classes]
        iterations = sum(len(classes) for classes in self.task_classes[:t])  # classes of the earlier tasks (Q6)
        if self.phase == "tii":  # stage 1: MLP + head, B pseudo-features per centroid, LR scaled by B/256 (Q7, Q8)
            params, classify, stats = list(self.tii.parameters()), self.tii, self.tii_stats
            per_component = self.cfg.batch_size
            lr = self.cfg.ca_lr * self.cfg.batch_size / 256.0
        else:  # stage 2: the head only, 5B per centroid, LR as given
            params, classify, stats = self._head_params(), self._classify, self.wtp_stats
            per_component = 5 * self.cfg.batch_size
            lr = self.cfg.ca_lr
        freeze(self, True)
        for p in params:
            p.requires_grad_(True)
        self.train()
        with torch.enable_grad():
            task_adaptive_prediction(params, classify, stats, seen, self._task_masks[: t + 1].any(0),
                                     iterations, per_component, self.cfg.crct_epochs, lr, self.cfg.weight_decay,
                                     seed=self.cfg.seed + t)
        freeze(self, True)
        self.eval()
        return True

    def _classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.wtp_fc_norm(features))

    def _head_params(self) -> list[nn.Parameter]:
        """Stage 2's non-slot parameters: the head (and MoCo v3's fresh fc_norm), what alignment trains."""
        return [*self.head.parameters(), *self.wtp_fc_norm.parameters()]

    def _uninstructed(self, images: torch.Tensor) -> torch.Tensor:
        """The original model's frozen feature (for MoCo v3 before its fresh fc_norm: the reference's pre_logits)."""
        return pretrained_features(self.original_vit, images)

    # --- evaluation --------------------------------------------------------------------------------------------
    def _original_features(self, images: torch.Tensor, batch_key: tuple | None) -> torch.Tensor:
        return self.frozen_forward("original", self._uninstructed, images, batch_key)

    @torch.no_grad()
    def predict_task(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor | None:
        if self.phase == "tii":
            return None  # the task of the predicted class is the TII model's answer

        def infer() -> torch.Tensor:
            logits = self.tii(self._original_features(images, batch_key)).float()
            seen = self._task_masks[: self.task + 1].any(0)
            return self.class_to_task[logits.masked_fill(~seen, float("-inf")).argmax(1)]
        return self.cached("tii", batch_key, infer, until_state_changes=True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        if self.phase == "tii":
            return self.tii(self._original_features(images, batch_key))

        def instructed() -> torch.Tensor:
            return self._instructed_features(images, self._test_slots(self.predict_task(images, batch_key)))
        return self._classify(self.cached("instructed", batch_key, instructed, until_state_changes=True))

"""The small interface every continual method implements; `engine.py` drives it.

A method is an `nn.Module` whose `forward` is one training step, so that DistributedDataParallel can wrap it
whatever the method trains.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from config.resolved import Config
from config.settings import QueryModelSettings, StreamSettings
from datasets.scenario import Scenario, make_class_order
from utils import AMP_DTYPES, UserError, log

from .vit import create_backbone, freeze


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy where the classes outside `mask` are set to -inf (the reference's `train_mask`)."""
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    return F.cross_entropy(logits.float(), targets)


def classifier_head(dim: int, num_classes: int) -> nn.Linear:
    """A linear head over all classes, initialised as timm initialises its ViT heads (trunc. normal 0.02, zero bias)."""
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def create_backbone_from(cfg: Config, with_dropout: bool = True) -> nn.Module:
    """The ViT of --model with its weights (--pretrained, --pretrained_checkpoint) at --input-size."""
    settings = cfg.backbone
    drop, drop_path = (settings.drop, settings.drop_path) if with_dropout else (0.0, 0.0)
    return create_backbone(settings.model, settings.pretrained, settings.input_size, drop, drop_path,
                           checkpoint=settings.pretrained_checkpoint)


def shares_query_backbone(cfg: Config) -> bool:
    """--model and --original_model resolve to the same name and weight file: one module can serve both."""
    query = cfg.group(QueryModelSettings)
    return (cfg.context.original_backbone, query.original_model_checkpoint) == (
        cfg.context.backbone, cfg.backbone.pretrained_checkpoint)


def create_query_model(cfg: Config, backbone: nn.Module) -> nn.Module:
    """The frozen query / task-identity ViT of --original_model: `backbone` itself when it is the same (one copy in
    memory, identical weights), else its own."""
    if shares_query_backbone(cfg):
        return backbone
    query = cfg.group(QueryModelSettings)
    model = create_backbone(query.original_model, cfg.backbone.pretrained, cfg.backbone.input_size,
                            checkpoint=query.original_model_checkpoint, flag="--original_model")
    freeze(model)
    return model


def load_prefixed(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Load the entries of `state` under `prefix` into `module`; every key must fit."""
    try:
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]  # the keys at fault, on the one line an error gets
        raise UserError(f"{source}: its {prefix.rstrip('.')} does not fit this model ({detail})") from err


class ContinualMethod(nn.Module):
    """Subclasses set `checkpoint_prefixes` (the state they train, the only state saved) and implement the hooks."""

    phases: tuple[str, ...] = ("train",)  # per task, the engine trains, finishes and evaluates each phase in turn
    trains: bool = True                  # False: no gradient steps at all (e.g. nearest class mean)
    find_unused_parameters: bool = False  # for DDP, when a step leaves some trainable parameters unused
    num_tasks_override: int | None = None
    checkpoint_prefixes: tuple[str, ...] = ()
    settings_groups: tuple[type, ...] = ()  # the settings dataclasses it reads beyond the common ones
    own_datasets = False  # True: its subcommands are the dataset keys of its own preset rows only
    # why it cannot run the online protocol or a task-free / domain-incremental scenario (methods that can read
    # StreamSettings instead)
    stream_refusal = "it needs task boundaries and several epochs per task"

    def __init__(self, cfg: Config, scenario: Scenario):
        super().__init__()
        self.cfg = cfg
        self.num_classes = scenario.num_classes
        self.register_buffer("_task_masks", torch.stack([scenario.class_mask(t) for t in range(scenario.num_tasks)]),
                             persistent=False)
        self._run_cache: dict[tuple, torch.Tensor] = {}    # outputs of models frozen for the whole run
        self._state_cache: dict[tuple, torch.Tensor] = {}  # outputs valid until the trained state changes

    def cached(self, name: str, batch_key: tuple | None, compute: Callable[[], torch.Tensor],
               until_state_changes: bool = False) -> torch.Tensor:
        """`compute()`, remembered under `batch_key` when one is given. The engine gives keys for batches of
        deterministic loaders (the same images in the same order every time): the result is then computed once and
        reused, for the whole run, or (`until_state_changes`) until `invalidate_state_cache` (the engine calls it
        before each training phase and after loading a checkpoint)."""
        if batch_key is None:
            return compute()
        cache = self._state_cache if until_state_changes else self._run_cache
        key = (name, *batch_key)
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def invalidate_state_cache(self) -> None:
        self._state_cache.clear()

    @torch.no_grad()
    def frozen_forward(self, name: str, model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       batch_key: tuple | None) -> torch.Tensor:
        """`model(images)` for a model that stays frozen for the whole run, computed once per batch key (e.g. the
        test set's query features, used after every task)."""
        return self.cached(name, batch_key, lambda: model(images))

    def frozen_modules(self) -> list[nn.Module]:
        """The modules no task trains (a frozen backbone, a query model): `store_frozen_weights` keeps their matrix
        weights in the run's compute dtype."""
        return []

    def to_run_device(self, device: torch.device, amp: str) -> ContinualMethod:
        """On `device`, with the frozen weights in the compute dtype of `amp` (fp32 runs keep them as they are)."""
        self.to(device)
        dtype = AMP_DTYPES.get(amp)
        if dtype is not None:
            stored = self.store_frozen_weights(dtype)
            log(f"frozen weights kept in {str(dtype).removeprefix('torch.')}: {stored / 2**20:.1f} MiB "
                f"(fp32: {stored * 4 / dtype.itemsize / 2**20:.1f} MiB)")
        return self

    def store_frozen_weights(self, dtype: torch.dtype) -> int:
        """Keep the weights of the linear and convolution layers of `frozen_modules` in `dtype`, the dtype autocast
        computes them in: autocast caches only the casts of tensors that require grad, so a frozen fp32 weight was
        cast again at every use. The cast is autocast's own rounding, so results do not change; normalisation layers,
        embeddings and every trained tensor keep fp32. Returns the bytes the weights take now."""
        stored = 0
        for module in {id(m): m for m in self.frozen_modules()}.values():
            for layer in module.modules():
                if not isinstance(layer, nn.Linear | nn.Conv2d):
                    continue
                for param in layer.parameters(recurse=False):
                    param.requires_grad_(False)  # (a method may freeze them only at its first task)
                    param.data = param.data.to(dtype)
                    stored += param.numel() * param.element_size()
        return stored

    # --- parse time: the settings, before they are frozen ------------------------------------------------------
    @classmethod
    def resolve_settings(cls, draft: Any) -> None:
        """Method-specific checks and derived values on the settings being resolved (`draft`: by flag name, as
        attributes; `draft.given` holds the flags the command line set)."""

    @classmethod
    def preset_stage(cls, values: dict[str, Any]) -> str | None:
        """The stage preset rows select on (HiDe: tii, wtp or both), from the values before the presets that
        depend on it."""
        return None

    @classmethod
    def task_free_refusal(cls, draft: Any) -> str:
        """Why this configuration needs task boundaries, which the task-free stream does not give ("" = it runs)."""
        return ""

    @classmethod
    def class_order(cls, draft: Any) -> list[int]:
        return make_class_order(draft.num_classes, draft.shuffle, draft.seed)

    # --- run time, before the data is loaded ----------------------------------------------------------------------
    @classmethod
    def check_before_data(cls, cfg: Config) -> None:
        """Checks of the files this method reads besides the data and the backbones (HiDe: the stage-1 run), made
        before the data is loaded, so that a command line's problems show at once; none by default."""

    def train_mask(self, t: int) -> torch.Tensor | None:
        return self._task_masks[t] if self.cfg.optim.train_mask else None

    def class_mask(self, t: int) -> torch.Tensor:
        """True for the classes of task t."""
        return self._task_masks[t]

    @property
    def num_tasks(self) -> int:
        return int(self._task_masks.shape[0])

    # --- hooks called by engine.py -----------------------------------------------------------------------------
    def set_phase(self, phase: str) -> Config:
        """Enter one of `phases`; returns the config that phase trains with (the run's, unless it differs)."""
        return self.cfg

    def lr_flag(self, phase: str) -> str:
        """The flag that sets the learning rate of `phase` (named when its training diverges)."""
        return "--lr"

    def load_task_context(self, t: int) -> None:
        """Before evaluating a checkpoint of task t with --eval: load anything it depends on but does not hold."""

    def begin_task(self, t: int) -> list[dict]:
        """Set up task t; return the optimizer's parameter groups (empty: nothing to train)."""
        return []

    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's forward: (loss, logits)."""
        raise NotImplementedError

    def end_task(self, t: int, stats_loader: DataLoader) -> None:
        """After training task t (class statistics, prompt momentum, ...)."""

    def align(self, t: int) -> bool:
        """After end_task and a first evaluation: task-adaptive prediction. True when it changed the model (the
        engine then evaluates again and reports both) and left each alignment epoch's mean loss in
        `alignment_losses`."""
        return False

    alignment_losses: Sequence[float] = ()  # of the last `align`, for the run's curves

    def statistics_summary(self) -> dict[str, float]:
        """After end_task: sizes of the class statistics of the current phase, for the run's curves (e.g. classes
        with statistics); empty when it keeps none."""
        return {}

    @torch.no_grad()
    def predict_task(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor | None:
        """The task each image is inferred to belong to, for methods that infer it before classifying (HiDe);
        None: the engine takes the task of the predicted class."""
        return None

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        """Logits over all classes; the engine masks the classes not seen yet. `batch_key` names a batch of a
        deterministic loader (see `frozen_forward`)."""
        raise NotImplementedError

    # --- checkpoints -------------------------------------------------------------------------------------------
    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """The state it trains (the only state saved), where it lives."""
        return {k: v.detach() for k, v in self.state_dict().items() if k.startswith(self.checkpoint_prefixes)}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.trained_tensors().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        expected = set(self.checkpoint_state())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise UserError(f"{source} does not match method {self.cfg.method!r}: missing keys {missing[:5]}, "
                            f"unexpected keys {unexpected[:5]}; was it written by another method or model?")
        own = self.state_dict()
        shapes = [k for k in state if own[k].shape != state[k].shape]
        if shapes:
            k = shapes[0]
            raise UserError(f"{source}: {k} has shape {tuple(state[k].shape)}, the model needs {tuple(own[k].shape)}")
        self.load_state_dict(state, strict=False)
        self.invalidate_state_cache()


class BackboneHeadMethod(ContinualMethod):
    """A timm ViT and a linear head over all classes; subclasses only say when the backbone trains."""

    checkpoint_prefixes = ("head.",)
    settings_groups = (StreamSettings,)

    def __init__(self, cfg: Config, scenario: Scenario):
        super().__init__(cfg, scenario)
        self.backbone = create_backbone_from(cfg)
        self.head = classifier_head(self.backbone.num_features, scenario.num_classes)

    backbone_frozen_for_run = False  # True: its test features never change, so evaluation caches them

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone] if self.backbone_frozen_for_run else []

    def backbone_trains(self, t: int) -> bool:
        raise NotImplementedError

    def begin_task(self, t: int) -> list[dict]:
        trains = self.backbone_trains(t)
        freeze(self.backbone, not trains)
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone(images)
        with torch.no_grad():  # a frozen backbone needs no autograd graph
            return self.backbone(images)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.features(images))
        return masked_cross_entropy(logits, targets, self.train_mask(t)), logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        if self.backbone_frozen_for_run:
            return self.head(self.frozen_forward("backbone", self.backbone, images, batch_key))
        return self.head(self.backbone(images))

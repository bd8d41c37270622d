"""Nearest class mean on frozen features (SimpleCIL): no gradient step; each class is the mean of its frozen
training features, and a test image goes to the class mean with the highest cosine similarity."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from config.resolved import Config
from datasets.scenario import Scenario
from utils import all_reduce_sum, maybe_autocast

from .base import ContinualMethod, create_backbone_from
from .vit import freeze


class NCM(ContinualMethod):
    trains = False
    stream_refusal = "it takes no gradient steps: it averages each task's features once the task has ended"
    checkpoint_prefixes = ("class_sums", "class_counts")

    def __init__(self, cfg: Config, scenario: Scenario):
        super().__init__(cfg, scenario)
        self.backbone = create_backbone_from(cfg, with_dropout=False)
        freeze(self.backbone)
        # sums and counts, not means: they add up exactly across ranks and tasks
        self.register_buffer("class_sums", torch.zeros(scenario.num_classes, self.backbone.num_features,
                                                       dtype=torch.float64))
        self.register_buffer("class_counts", torch.zeros(scenario.num_classes, dtype=torch.float64))

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]

    @torch.no_grad()
    def end_task(self, t: int, stats_loader: DataLoader) -> None:
        sums, counts = torch.zeros_like(self.class_sums), torch.zeros_like(self.class_counts)
        device = self.class_sums.device
        for images, targets in stats_loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with maybe_autocast(device, self.cfg.run.amp):
                feats = self.backbone(images)
            sums.index_add_(0, targets, feats.double())
            counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
        self.class_sums += all_reduce_sum(sums)
        self.class_counts += all_reduce_sum(counts)

    def statistics_summary(self) -> dict[str, float]:
        return {"classes": float((self.class_counts > 0).sum())}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        means = F.normalize((self.class_sums / self.class_counts.clamp(min=1).unsqueeze(1)).float(), dim=1)
        features = self.frozen_forward("backbone", self.backbone, images, batch_key)
        logits = F.normalize(features.float(), dim=1) @ means.T
        return logits.masked_fill(self.class_counts == 0, float("-inf"))

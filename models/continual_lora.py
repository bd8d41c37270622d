"""Continual LoRA: one LoRA of the keys and values of blocks 0..--lora_depth-1, shared by every task and
trained on each in turn with the masked cross-entropy, and a linear head; no task inference, no statistics."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from config.resolved import Config
from config.settings import LoRASettings, LoRATypeSettings, StreamSettings
from datasets.scenario import Scenario

from .base import ContinualMethod, classifier_head, create_backbone_from, masked_cross_entropy
from .lora import build_lora_pool, check_lora_type, forward_lora
from .vit import freeze


class ContinualLoRA(ContinualMethod):
    checkpoint_prefixes = ("lora.", "head.")
    settings_groups = (LoRATypeSettings, LoRASettings, StreamSettings)

    @classmethod
    def resolve_settings(cls, draft: Any) -> None:
        check_lora_type(draft, "continual")

    def __init__(self, cfg: Config, scenario: Scenario):
        super().__init__(cfg, scenario)
        self.backbone = create_backbone_from(cfg)
        freeze(self.backbone)
        self.lora = build_lora_pool(self.backbone, 1, cfg.group(LoRASettings))
        self.head = classifier_head(self.backbone.num_features, scenario.num_classes)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def begin_task(self, t: int) -> list[dict]:
        return [{"params": [self.lora.a, self.lora.b, *self.head.parameters()]}]

    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(forward_lora(self.backbone, images, self.lora, 0))
        return masked_cross_entropy(logits, targets, self.train_mask(t)), logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        return self.head(forward_lora(self.backbone, images, self.lora, 0))

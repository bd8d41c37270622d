"""Continual LoRA (spec §2.4): one LoRA of the keys and values of blocks 0..--lora_depth-1, shared by every task and
trained on each in turn with the masked cross-entropy, and a linear head; no task inference, no statistics."""
from __future__ import annotations

from argparse import Namespace

import torch

from datasets.scenario import Scenario

from .base import ContinualMethod, classifier_head, masked_cross_entropy
from .hidelora import LORA_READS_FLAGS
from .lora import build_lora_pool, check_lora_flags, forward_lora
from .vit import create_backbone, freeze


class ContinualLoRA(ContinualMethod):
    checkpoint_prefixes = ("lora.", "head.")
    reads_flags = LORA_READS_FLAGS

    @classmethod
    def finalize_config(cls, cfg: Namespace) -> None:
        check_lora_flags(cfg, "continual")

    def __init__(self, cfg: Namespace, scenario: Scenario):
        super().__init__(cfg, scenario)
        self.backbone = create_backbone(cfg.model, cfg.pretrained, cfg.input_size, cfg.drop, cfg.drop_path,
                                        checkpoint=cfg.pretrained_checkpoint)
        freeze(self.backbone)
        self.lora = build_lora_pool(self.backbone, 1, cfg)
        self.head = classifier_head(self.backbone.num_features, scenario.num_classes)

    def begin_task(self, t: int) -> list[dict]:
        return [{"params": [self.lora.a, self.lora.b, *self.head.parameters()]}]

    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(forward_lora(self.backbone, images, self.lora, 0))
        return masked_cross_entropy(logits, targets, self.train_mask(t)), logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        return self.head(forward_lora(self.backbone, images, self.lora, 0))

"""HiDe-LoRA: HiDe (`models.hide`) instructed by a LoRA of the keys and values of blocks 0..--lora_depth-1, one slot
per task. One Adam group for the slots and the head (no --larger_prompt_lr). `--lora_momentum` mixes slot t with the
mean of the earlier slots after task t's training only, as the reference does (unlike prompt momentum, the reference
does not mix during training, so the slot trained is not the slot evaluated when it is set)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from config.resolved import Config
from config.settings import HiDeLoRASettings, LoRASettings, LoRATypeSettings, SlotSettings
from utils import UserError

from .hide import HIDE_GROUPS, HiDeMethod, Instruction
from .lora import build_lora_pool, check_lora_type, forward_lora


class LoRASlots(Instruction):
    slots_name, display_name, slot_kind = "lora", "HiDe-LoRA", "LoRA slot"

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__(cfg, backbone)
        self.momentum = cfg.group(HiDeLoRASettings).lora_momentum
        self.pool = build_lora_pool(backbone, cfg.group(SlotSettings).size, cfg.group(LoRASettings))
        self.module = self.pool

    def init_slot_from_previous(self, t: int) -> None:
        self.pool.init_slot_from_previous(t)

    def param_groups(self, head_params: list[nn.Parameter]) -> list[dict]:
        return [{"params": [self.pool.a, self.pool.b, *head_params]}]

    def features(self, images: torch.Tensor, slots: int | torch.Tensor) -> torch.Tensor:
        return forward_lora(self.backbone, images, self.pool, slots, pre_fc_norm=True)

    def after_training(self, t: int) -> None:
        if t > 0 and self.momentum > 0:
            self.pool.apply_momentum(t, self.momentum)


class HiDeLoRA(HiDeMethod):
    instruction_class = LoRASlots
    settings_groups = (*HIDE_GROUPS, LoRATypeSettings, LoRASettings, HiDeLoRASettings)

    @classmethod
    def resolve_settings(cls, draft: Any) -> None:
        super().resolve_settings(draft)
        check_lora_type(draft, "hide")
        if not 0.0 <= draft.lora_momentum < 1.0:
            raise UserError(f"--lora_momentum is a mixing weight in [0, 1), got {draft.lora_momentum}")

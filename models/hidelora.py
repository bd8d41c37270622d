"""HiDe-LoRA (spec §2.5): HiDe (`models.hide`) with a LoRA of the keys and values of blocks 0..--lora_depth-1 as the
per-task slots. One Adam group for the slots and the head (no --larger_prompt_lr). `--lora_momentum` mixes slot t
with the mean of the earlier slots after task t's training only, as the reference does (unlike prompt momentum, the
reference does not mix during training, so the slot trained is not the slot evaluated when it is set)."""
from __future__ import annotations

from argparse import Namespace

import torch
import torch.nn as nn

from .hide import HIDE_READS_FLAGS, HiDeMethod
from .lora import build_lora_pool, check_lora_flags, forward_lora

LORA_READS_FLAGS = frozenset({"lora_type", "lora_rank", "lora_depth", "lora_init"})


class HiDeLoRA(HiDeMethod):
    slots_name, display_name, slot_kind = "lora", "HiDe-LoRA", "LoRA slot"
    reads_flags = HIDE_READS_FLAGS | LORA_READS_FLAGS | {"lora_momentum"}
    # the reference trains HiDe-LoRA's stage 1 with HiDe-Prompt's config, which clips at 1.0 (its LoRA configs: 2.0)
    tii_clip_grad = 1.0

    @classmethod
    def finalize_config(cls, cfg: Namespace) -> None:
        super().finalize_config(cfg)
        check_lora_flags(cfg, "hide")

    def _build_slots(self, cfg: Namespace) -> None:
        self.lora = build_lora_pool(self.backbone, cfg.size, cfg)

    def _init_slot_from_previous(self, t: int) -> None:
        self.lora.init_slot_from_previous(t)

    def _slot_param_groups(self, head_params: list[nn.Parameter]) -> list[dict]:
        return [{"params": [self.lora.a, self.lora.b, *head_params]}]

    def _instructed_features(self, images: torch.Tensor, slots: int | torch.Tensor) -> torch.Tensor:
        return forward_lora(self.backbone, images, self.lora, slots, pre_fc_norm=True)

    def _after_training(self, t: int) -> None:
        if t > 0 and self.cfg.lora_momentum > 0:
            self.lora.apply_momentum(t, self.cfg.lora_momentum)

"""HiDe-Prompt: HiDe (`models.hide`) instructed by prefix E-prompts at blocks 0-4, one slot per task, with prompt
momentum during training and after it, and `--larger_prompt_lr`."""
from __future__ import annotations

import torch
import torch.nn as nn

from config.resolved import Config
from config.settings import EPromptSettings, HiDePromptSettings, SlotSettings
from utils import UserError, warn

from .hide import HIDE_GROUPS, HiDeMethod, Instruction
from .prompts import PromptPool, batch_majority
from .vit import forward_prompted


class PromptSlots(Instruction):
    slots_name, display_name, slot_kind = "e_prompt", "HiDe-Prompt", "prompt slot"

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__(cfg, backbone)
        self.prompts, self.settings = cfg.group(EPromptSettings), cfg.group(HiDePromptSettings)
        p = self.prompts
        if not (p.use_e_prompt and p.use_prefix_tune_for_e_prompt and p.use_prompt_mask and p.shared_prompt_pool):
            raise UserError("HiDe-Prompt's prompts are prefix E-prompts, slot t trained on task t from slot t-1: keep "
                            "--use_e_prompt, --use_prefix_tune_for_e_prompt, --use_prompt_mask, --shared_prompt_pool")
        self.e_layers = list(p.e_prompt_layer_idx)
        dim, heads = backbone.embed_dim, backbone.blocks[0].attn.num_heads
        self.pool = PromptPool(len(self.e_layers), cfg.group(SlotSettings).size, p.length, dim, heads, prefix=True,
                               top_k=1, learn_keys=False)
        self.module = self.pool
        if p.batchwise_prompt_eval:
            warn("--batchwise_prompt_eval gives each test batch the majority of its predicted tasks; test batches "
                 "hold one task, so this leaks near-oracle task identity (the reference's 5-datasets evaluation)")

    def init_slot_from_previous(self, t: int) -> None:
        self.pool.init_slots_from_previous(t)

    def param_groups(self, head_params: list[nn.Parameter]) -> list[dict]:
        if self.settings.larger_prompt_lr:  # the reference's name for lowering the LR of everything but the prompts
            head_lr = self.cfg.context.effective_lr * self.settings.head_lr_scale
            return [{"params": [self.pool.prompt]}, {"params": head_params, "lr": head_lr}]
        return [{"params": [self.pool.prompt, *head_params]}]

    def features(self, images: torch.Tensor, slots: int | torch.Tensor,
                 pool: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(slots, int):
            slots = torch.full((images.shape[0],), slots, device=images.device)
        chosen = self.pool.gather(slots.view(-1, 1), legacy_reshape=self.prompts.legacy_prefix_reshape, pool=pool)
        return forward_prompted(self.backbone, images, {layer: chosen[j] for j, layer in enumerate(self.e_layers)},
                                pre_fc_norm=True)

    def training_features(self, images: torch.Tensor, t: int) -> torch.Tensor:
        momentum = self.settings.prompt_momentum if t > 0 else 0.0
        pool = self.pool.with_momentum(t, momentum) if momentum > 0 else None
        return self.features(images, t, pool)

    def after_training(self, t: int) -> None:
        if t > 0 and self.settings.prompt_momentum > 0:
            self.pool.apply_momentum(t, self.settings.prompt_momentum)

    def test_slots(self, slots: torch.Tensor) -> torch.Tensor:
        if self.prompts.batchwise_prompt_eval:
            return batch_majority(slots.view(-1, 1), self.pool.pool_size, 1).view(-1)
        return slots


class HiDePrompt(HiDeMethod):
    instruction_class = PromptSlots
    settings_groups = (*HIDE_GROUPS, EPromptSettings, HiDePromptSettings)

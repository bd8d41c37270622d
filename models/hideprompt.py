"""HiDe-Prompt (spec §2.3): HiDe (`models.hide`) with prefix E-prompts at blocks 0-4 as the per-task slots, prompt
momentum during training and after it, and `--larger_prompt_lr`."""
from __future__ import annotations

from argparse import Namespace

import torch
import torch.nn as nn

from utils import UserError, warn

from .hide import HIDE_READS_FLAGS, HiDeMethod
from .prompts import PromptPool, batch_majority
from .vit import forward_prompted


class HiDePrompt(HiDeMethod):
    slots_name, display_name, slot_kind = "e_prompt", "HiDe-Prompt", "prompt slot"
    reads_flags = HIDE_READS_FLAGS | {"use_e_prompt", "e_prompt_layer_idx", "use_prefix_tune_for_e_prompt", "length",
                                      "use_prompt_mask", "shared_prompt_pool", "batchwise_prompt_eval",
                                      "legacy_prefix_reshape", "prompt_momentum", "larger_prompt_lr"}

    def _build_slots(self, cfg: Namespace) -> None:
        if not (cfg.use_e_prompt and cfg.use_prefix_tune_for_e_prompt and cfg.use_prompt_mask
                and cfg.shared_prompt_pool):
            raise UserError("HiDe-Prompt's prompts are prefix E-prompts, slot t trained on task t from slot t-1: keep "
                            "--use_e_prompt, --use_prefix_tune_for_e_prompt, --use_prompt_mask, --shared_prompt_pool")
        self.e_layers = list(cfg.e_prompt_layer_idx)
        dim, heads = self.backbone.embed_dim, self.backbone.blocks[0].attn.num_heads
        self.e_prompt = PromptPool(len(self.e_layers), cfg.size, cfg.length, dim, heads, prefix=True, top_k=1,
                                   learn_keys=False)
        if cfg.batchwise_prompt_eval:
            warn("--batchwise_prompt_eval gives each test batch the majority of its predicted tasks; test batches "
                 "hold one task, so this leaks near-oracle task identity (the reference's 5-datasets evaluation)")

    def _init_slot_from_previous(self, t: int) -> None:
        self.e_prompt.init_slots_from_previous(t)

    def _slot_param_groups(self, head_params: list[nn.Parameter]) -> list[dict]:
        if self.cfg.larger_prompt_lr:  # the reference's name for lowering the LR of everything but the prompts
            return [{"params": [self.e_prompt.prompt]}, {"params": head_params, "lr": self.cfg.effective_lr * 0.1}]
        return [{"params": [self.e_prompt.prompt, *head_params]}]

    def _instructed_features(self, images: torch.Tensor, slots: int | torch.Tensor,
                             pool: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(slots, int):
            slots = torch.full((images.shape[0],), slots, device=images.device)
        chosen = self.e_prompt.gather(slots.view(-1, 1), legacy_reshape=self.cfg.legacy_prefix_reshape, pool=pool)
        return forward_prompted(self.backbone, images, {layer: chosen[j] for j, layer in enumerate(self.e_layers)},
                                pre_fc_norm=True)

    def _training_features(self, images: torch.Tensor, t: int) -> torch.Tensor:
        momentum = self.cfg.prompt_momentum if t > 0 else 0.0
        pool = self.e_prompt.with_momentum(t, momentum) if momentum > 0 else None
        return self._instructed_features(images, t, pool)

    def _after_training(self, t: int) -> None:
        if t > 0 and self.cfg.prompt_momentum > 0:
            self.e_prompt.apply_momentum(t, self.cfg.prompt_momentum)

    def _test_slots(self, slots: torch.Tensor) -> torch.Tensor:
        if self.cfg.batchwise_prompt_eval:
            return batch_majority(slots.view(-1, 1), self.e_prompt.pool_size, 1).view(-1)
        return slots

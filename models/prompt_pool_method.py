"""L2P, DualPrompt and S-Prompt++: a frozen ViT instructed by prompts chosen from a pool by key-query matching.

The three are one mechanism with different presets (config/presets.py):
- L2P: prompt tuning (tokens prepended before block 0), top-4 of 10 slots chosen by key matching in training too,
  pull constraint 0.1.
- DualPrompt: a task-shared G-prompt (prefix, blocks 0-1) and E-prompts (prefix, blocks 2-4); training uses task t's
  slot (prompt mask), initialised from slot t-1.
- S-Prompt++: E-prompts only, prefix at blocks 0-4, otherwise as DualPrompt.
The query is the frozen pre-trained ViT's [CLS] feature; at test time each sample takes its own best-matching slot
unless `--batchwise_prompt_eval` asks for the reference's batch-majority vote.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from config.resolved import Config
from config.settings import EPromptSettings, PromptPoolSettings, QueryModelSettings, SlotSettings, StreamSettings
from datasets.scenario import Scenario
from utils import UserError, warn

from .base import ContinualMethod, classifier_head, create_backbone_from, create_query_model, masked_cross_entropy
from .prompts import PromptPool
from .vit import check_promptable, forward_prompted, freeze_pretrained, pretrained_features


class PromptPoolMethod(ContinualMethod):
    settings_groups = (QueryModelSettings, SlotSettings, EPromptSettings, PromptPoolSettings, StreamSettings)
    checkpoint_prefixes = ("e_prompt.", "g_prompt", "head.")

    def __init__(self, cfg: Config, scenario: Scenario):
        super().__init__(cfg, scenario)
        self.slots, self.prompts = cfg.group(SlotSettings), cfg.group(EPromptSettings)
        self.pool = cfg.group(PromptPoolSettings)
        self.backbone = create_backbone_from(cfg)
        check_promptable(self.backbone)
        freeze_pretrained(self.backbone)
        # a fresh fc_norm (MoCo v3) trains with the prompts, as in the reference, so it is saved with them
        self.checkpoint_prefixes = type(self).checkpoint_prefixes + tuple(f"backbone.{k}"
                                                                         for k in self.backbone.fresh_keys)
        self.query_model = create_query_model(cfg, self.backbone)
        dim, heads = self.backbone.embed_dim, self.backbone.blocks[0].attn.num_heads
        self._check_config(cfg.method, self.slots.size, self.prompts, self.pool, scenario)
        self.e_layers = list(self.prompts.e_prompt_layer_idx) if self.prompts.use_e_prompt else []
        self.g_layers = list(self.pool.g_prompt_layer_idx) if self.pool.use_g_prompt else []
        self.e_prompt = PromptPool(len(self.e_layers), self.slots.size, self.prompts.length, dim, heads,
                                   prefix=self.prompts.use_prefix_tune_for_e_prompt, top_k=self.pool.top_k,
                                   learn_keys=self.pool.prompt_key, key_dim=self.query_model.num_features)
        self.g_prompt = (nn.Parameter(torch.empty(len(self.g_layers), 2, self.pool.g_prompt_length, heads,
                                                  dim // heads).uniform_(-1, 1)) if self.g_layers else None)
        self.head = classifier_head(self.backbone.num_features, scenario.num_classes)
        if self.prompts.batchwise_prompt_eval:
            warn("--batchwise_prompt_eval selects one prompt per test batch by majority vote; test batches hold one "
                 "task, so this leaks near-oracle task identity (the reference's evaluation)")

    @classmethod
    def task_free_refusal(cls, draft: Any) -> str:
        if draft.use_prompt_mask:
            return ("it trains slot t on task t (--use_prompt_mask); pass --use_prompt_mask False to choose the slots "
                    "by key matching, as L2P does")
        return ""

    @staticmethod
    def _check_config(method: str, size: int, prompts: EPromptSettings, pool: PromptPoolSettings,
                      scenario: Scenario) -> None:
        if not prompts.use_e_prompt:
            raise UserError(f"{method} needs E-prompts; drop --use_e_prompt False")
        if pool.use_g_prompt and not pool.use_prefix_tune_for_g_prompt:
            raise UserError("G-prompts are implemented as prefixes only; drop --use_prefix_tune_for_g_prompt False")
        if prompts.use_prompt_mask and scenario.num_tasks * pool.top_k > size:
            raise UserError(f"--use_prompt_mask needs a slot per task: --size {size} < {scenario.num_tasks} tasks "
                            f"x --top_k {pool.top_k}")
        if not prompts.use_prompt_mask and not pool.prompt_key:
            raise UserError("without --use_prompt_mask the slots are chosen by key matching; keep --prompt_key")

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone, self.query_model]

    def begin_task(self, t: int) -> list[dict]:
        if self.prompts.shared_prompt_pool and self.e_prompt is not None:
            self.e_prompt.init_slots_from_previous(t, copy_keys=self.pool.shared_prompt_key)
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def _query(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        return self.frozen_forward("query", lambda x: pretrained_features(self.query_model, x), images, batch_key)

    def _needs_query_in_training(self) -> bool:
        """With the prompt mask the slot is task t's; the query then only feeds the pull constraint."""
        if not self.prompts.use_prompt_mask:
            return True
        return bool(self.pool.pull_constraint and self.pool.pull_constraint_coeff and self.e_prompt.key is not None)

    @property
    def find_unused_parameters(self) -> bool:
        """Only the keys can sit out a step: with the prompt mask and no pull constraint the query is not computed.
        Every slot takes part (the gather's backward gives unselected slots a zero gradient), so DDP need not search
        the graph, and warns when told to and finds nothing."""
        return self.e_prompt.key is not None and not self._needs_query_in_training()

    def _features(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        prefixes: dict[int, torch.Tensor] = {}
        prompt_tokens: dict[int, torch.Tensor] = {}
        for j, layer in enumerate(self.g_layers):
            prefixes[layer] = self.g_prompt[j].unsqueeze(0).expand(batch, -1, -1, -1, -1)
        chosen = self.e_prompt.gather(idx, legacy_reshape=self.prompts.legacy_prefix_reshape)
        for j, layer in enumerate(self.e_layers):
            if self.e_prompt.prefix:
                prefixes[layer] = torch.cat([prefixes[layer], chosen[j]], dim=2) if layer in prefixes else chosen[j]
            else:
                prompt_tokens[layer] = chosen[j]
        return forward_prompted(self.backbone, images, prefixes, prompt_tokens)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        query = self._query(images) if self._needs_query_in_training() else None
        if self.prompts.use_prompt_mask:
            idx = self.e_prompt.task_slots(t, images.shape[0])
            sim = self.e_prompt.similarity(query) if query is not None else None
        else:
            idx, sim = self.e_prompt.select(query, batchwise=self.pool.batchwise_prompt)
        logits = self.head(self._features(images, idx))
        loss = masked_cross_entropy(logits, targets, self.train_mask(t))
        if self.pool.pull_constraint and sim is not None:
            loss = loss - self.pool.pull_constraint_coeff * PromptPool.pull_term(sim, idx)
        return loss, logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_key: tuple | None = None) -> torch.Tensor:
        idx, _ = self.e_prompt.select(self._query(images, batch_key), batchwise=self.prompts.batchwise_prompt_eval)
        return self.head(self._features(images, idx))

"""Low-rank adapters of the key and value projections: a pool of slots, each holding, for each adapted
block, A (dim x r) and B (r x dim) for the keys and for the values. The queries are never adapted.

The update of block i is k += (x A_k) B_k / r and v += (x A_v) B_v / r (the reference's alpha = 1), computed at rank r
by `models.vit.lora_kv_delta` instead of through a dense dim x 3dim matrix as the reference does. A slot is either
shared by the whole batch (training: slot t; continual LoRA: its only slot) or chosen per sample (HiDe-LoRA's test
time), gathered here and applied with batched matrix products.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from config.settings import LoRASettings
from utils import UserError

from .vit import check_promptable, forward_prompted

LORA_INITS = ("reference", "standard")


class LoraPool(nn.Module):
    """`a`: (pool, layers, 2, dim, rank), `b`: (pool, layers, 2, rank, dim); index 0/1 of dim 2 = keys/values.

    B starts at zero, so every slot starts as the identity. A is uniform: `reference` within +-1/sqrt(rank), what the
    reference's kaiming_uniform_(a=sqrt(5)) gives on a (dim x rank) matrix, whose fan-in it takes to be the rank;
    `standard` within +-1/sqrt(dim), the usual LoRA scale (fan-in = the input width).
    """

    def __init__(self, pool_size: int, num_layers: int, dim: int, rank: int, init: str = "reference"):
        super().__init__()
        if init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {init!r}")
        self.pool_size, self.num_layers, self.rank = pool_size, num_layers, rank
        self.scale = 1.0 / rank
        bound = 1.0 / math.sqrt(rank if init == "reference" else dim)
        self.a = nn.Parameter(torch.empty(pool_size, num_layers, 2, dim, rank).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(pool_size, num_layers, 2, rank, dim))

    def adapters(self, slots: int | torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per adapted block index, (A, B / r): (2, dim, r) and (2, r, dim) for one slot shared by the batch, or
        (batch, 2, dim, r) and (batch, 2, r, dim) for a tensor of per-sample slots."""
        return {layer: (self.a[slots, layer], self.b[slots, layer] * self.scale) for layer in range(self.num_layers)}

    @torch.no_grad()
    def init_slot_from_previous(self, t: int) -> None:
        """Slot t starts where slot t-1 ended (HiDe-LoRA)."""
        if t > 0:
            self.a[t] = self.a[t - 1]
            self.b[t] = self.b[t - 1]

    @torch.no_grad()
    def apply_momentum(self, t: int, momentum: float) -> None:
        """slot t <- (1 - m) slot t + m mean(slots 0..t-1), on A and B separately, as the reference does."""
        for weight in (self.a, self.b):
            weight[t] = (1 - momentum) * weight[t] + momentum * weight[:t].mean(0)


def build_lora_pool(backbone: VisionTransformer, pool_size: int, settings: LoRASettings) -> LoraPool:
    """A pool for blocks 0..--lora_depth-1 of `backbone` with --lora_rank and --lora_init."""
    check_promptable(backbone)
    if not 1 <= settings.lora_depth <= len(backbone.blocks):
        raise UserError(f"--lora_depth {settings.lora_depth}: this model has {len(backbone.blocks)} blocks; adapt 1 "
                        f"to {len(backbone.blocks)} of them")
    return LoraPool(pool_size, settings.lora_depth, backbone.embed_dim, settings.lora_rank, settings.lora_init)


def forward_lora(backbone: VisionTransformer, images: torch.Tensor, pool: LoraPool,
                 slots: int | torch.Tensor, pre_fc_norm: bool = False) -> torch.Tensor:
    """The backbone's pooled feature with one slot for the batch (int) or each sample's own (tensor of indices)."""
    return forward_prompted(backbone, images, lora=pool.adapters(slots), pre_fc_norm=pre_fc_norm)


def check_lora_type(draft: Any, lora_type: str) -> None:
    """Parse time: --lora_type, the reference's switch between the two LoRA methods, names this method's module."""
    if draft.lora_type != lora_type:
        method = {"continual": "continual_lora", "hide": "hidelora"}[draft.lora_type]
        raise UserError(f"--lora_type {draft.lora_type} is the {method} method; {draft.subcommand} takes --lora_type "
                        f"{lora_type} (or run <dataset>_{method})")

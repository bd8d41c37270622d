"""HiDe's "original model": the frozen ViT's uninstructed [CLS] feature -> residual MLP mapping ->
linear head over all classes. Stage 1 trains the mapping and the head to infer task identity; stage 2 uses them,
frozen, to pick each test image's prompt."""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import classifier_head


class MlpMapping(nn.Module):
    """z = LayerNorm(h + f(h)); f is len(hidden)+1 linear layers of widths dim*hidden[i], GELU after the first and
    after every middle layer except the one at index len(hidden)//2, which has a LayerNorm instead (the reference's
    layout: `[2]` is Linear(d,2d)-GELU-Linear(2d,d); `[4, 4]` is Linear(d,4d)-GELU-Linear(4d,4d)-LayerNorm-
    Linear(4d,d)). The reference's zero-probability dropouts are left out: they do nothing."""

    def __init__(self, dim: int, hidden: list[int], norm: bool = True):
        super().__init__()
        widths = [dim, *(dim * ratio for ratio in hidden), dim]
        layers: list[nn.Module] = []
        last = len(widths) - 2
        for i in range(last + 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i == last:
                break
            if 0 < i == len(hidden) // 2:
                layers.append(nn.LayerNorm(widths[i + 1]))
            else:
                layers.append(nn.GELU())
        self.f = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.f(h))


class TaskIdentityHead(nn.Module):
    """Mapping + head on top of frozen features (the trainable part of the original model). An empty structure
    means no mapping at all (the reference's `[]`). `fresh_norm` (MoCo v3, whose final norm the reference replaces
    by a fresh `fc_norm`): the mapping has no norm of its own and a trainable LayerNorm sits before the head."""

    def __init__(self, dim: int, num_classes: int, mlp_structure: list[int], fresh_norm: bool = False):
        super().__init__()
        self.mlp = MlpMapping(dim, mlp_structure, norm=not fresh_norm) if mlp_structure else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim) if fresh_norm else nn.Identity()
        self.head = classifier_head(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.mlp(features)))

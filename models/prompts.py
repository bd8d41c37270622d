"""Prompt pools (L2P / DualPrompt / S-Prompt++ E-prompts): learnable slots, optional learnable keys, key-query
selection, and the per-layer prompts handed to `models.vit.forward_prompted`.

Shapes follow the reference: prefix pools are (layers, 2, pool, length, heads, head_dim) with index 0/1
of dim 1 = keys/values; prompt-tuning pools are (layers, pool, length, dim).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def batch_majority(idx: torch.Tensor, pool_size: int, top_k: int) -> torch.Tensor:
    """The reference's `batchwise_prompt`: the top_k slots chosen most often in the batch, used for every sample.

    Ties and short lists follow the reference: unique ids in ascending order, padded up to the pool size with the
    smallest chosen id at count 0, then torch.topk on the counts.
    """
    flat = idx.flatten().long()  # scatter indices are int64
    counts = torch.zeros(pool_size, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    # the reference's list, built without reading anything back to the host (torch.unique and bincount would): a
    # stable sort puts the chosen ids first, then the others, both ascending; counts in that order are its counts
    # followed by its count-0 padding, so torch.topk sees the same tensor and breaks ties the same way
    order = torch.sort((counts == 0).to(torch.uint8), stable=True).indices
    counts = counts[order]
    ids = torch.where(counts > 0, order, order[0]).to(idx.dtype)  # padding stands for the smallest chosen id
    major = ids[torch.topk(counts, k=top_k).indices]
    return major.unsqueeze(0).expand(idx.shape[0], -1)


class PromptPool(nn.Module):
    def __init__(self, num_layers: int, pool_size: int, length: int, embed_dim: int, num_heads: int,
                 prefix: bool, top_k: int, learn_keys: bool = True, key_dim: int | None = None):
        """`key_dim`: the query model's feature size, when it differs from the prompted model's `embed_dim`."""
        super().__init__()
        self.num_layers, self.pool_size, self.length, self.top_k = num_layers, pool_size, length, top_k
        self.prefix = prefix
        if prefix:
            shape = (num_layers, 2, pool_size, length, num_heads, embed_dim // num_heads)
        else:
            shape = (num_layers, pool_size, length, embed_dim)
        self.prompt = nn.Parameter(torch.empty(shape).uniform_(-1, 1))  # the reference's 'uniform' init
        self.key = nn.Parameter(torch.empty(pool_size, key_dim or embed_dim).uniform_(-1, 1)) if learn_keys else None

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """(B, pool) cosine similarity between each query and each key (l2-normalised with eps 1e-12)."""
        if self.key is None:
            raise RuntimeError("this pool has no keys; select slots with a mask or a predicted task")
        return F.normalize(query, dim=-1, eps=1e-12) @ F.normalize(self.key, dim=-1, eps=1e-12).T

    def select(self, query: torch.Tensor, batchwise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k slots per sample by key matching (or the batch-majority vote): (idx (B, top_k), similarity)."""
        sim = self.similarity(query)
        idx = torch.topk(sim, k=self.top_k, dim=1).indices
        if batchwise:
            idx = batch_majority(idx, self.pool_size, self.top_k)
        return idx, sim

    @staticmethod
    def pull_term(sim: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The reference's `reduce_sim`: sum over samples and chosen slots of cos(key, query), divided by B."""
        return sim.gather(1, idx).sum() / sim.shape[0]

    def task_slots(self, task: int, batch: int) -> torch.Tensor:
        """The training prompt mask: slots [t*k, (t+1)*k) for every sample."""
        first = task * self.top_k
        return torch.arange(first, first + self.top_k, device=self.prompt.device).expand(batch, -1)

    @torch.no_grad()
    def init_slots_from_previous(self, task: int, copy_keys: bool = False) -> None:
        """`shared_prompt_pool`: task t's slots start from task t-1's (keys too with `shared_prompt_key`)."""
        if task == 0 or (task + 1) * self.top_k > self.pool_size:
            return
        new, old = slice(task * self.top_k, (task + 1) * self.top_k), slice((task - 1) * self.top_k, task * self.top_k)
        if self.prefix:
            self.prompt[:, :, new] = self.prompt[:, :, old]
        else:
            self.prompt[:, new] = self.prompt[:, old]
        if copy_keys and self.key is not None:
            self.key[new] = self.key[old]

    @property
    def slot_dim(self) -> int:
        return 2 if self.prefix else 1

    def with_momentum(self, task: int, momentum: float) -> torch.Tensor:
        """The pool with slot `task` replaced by (1 - m) * slot + m * mean of the earlier slots (detached): the
        prompt HiDe trains with prompt momentum (top_k 1, slot t = task t). Gradients reach slot t only."""
        slots = self.prompt.unbind(self.slot_dim)
        earlier = torch.stack(slots[:task], self.slot_dim).detach().mean(self.slot_dim)
        mixed = (1 - momentum) * slots[task] + momentum * earlier
        return torch.stack([*slots[:task], mixed, *slots[task + 1:]], self.slot_dim)

    @torch.no_grad()
    def apply_momentum(self, task: int, momentum: float) -> None:
        """After training task t: store the momentum-mixed slot, so evaluation uses the prompt that was trained."""
        self.prompt.copy_(self.with_momentum(task, momentum))

    def gather(self, idx: torch.Tensor, legacy_reshape: bool = False, pool: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen slots per sample, top_k slots joined along the token axis.

        Prefix: (layers, B, 2, top_k*length, heads, head_dim). Prompt tuning: (layers, B, top_k*length, dim).
        `legacy_reshape` reproduces the reference's reshape of (2, B, ...) to (B, 2, ...) without a permute, which
        mixes key/value halves and samples; only for matching its published numbers. `pool` replaces the stored
        slots (e.g. a slot mixed with the earlier ones by prompt momentum).
        """
        batch = idx.shape[0]
        pool = self.prompt if pool is None else pool
        chosen = _rows(pool, self.slot_dim, idx)
        if not self.prefix:  # (layers, B, top_k, length, dim)
            return chosen.reshape(self.num_layers, batch, self.top_k * self.length, -1)
        # (layers, 2, B, top_k, length, heads, head_dim)
        if not legacy_reshape:
            chosen = chosen.permute(0, 2, 1, 3, 4, 5, 6)
        return chosen.reshape(self.num_layers, batch, 2, self.top_k * self.length, *chosen.shape[-2:])


def _rows(pool: torch.Tensor, slot_dim: int, idx: torch.Tensor) -> torch.Tensor:
    """`pool` indexed by `idx` (B, top_k) along `slot_dim`, the indexed axes in its place: `pool[:, idx]` or
    `pool[:, :, idx]`. By index_select, whose backward adds each sample's gradient into its slot in a fixed order and
    in the parameter's own layout; advanced indexing's backward (an accumulating index_put) adds them in
    thread-dependent order on CPU, so identical runs differed in the last bits."""
    rows = torch.index_select(pool, slot_dim, idx.reshape(-1))
    return rows.unflatten(slot_dim, tuple(idx.shape))

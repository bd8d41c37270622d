"""The frozen pre-trained backbone: any timm VisionTransformer, returning the pooled [CLS] feature, and a
block-by-block forward that injects prompts into it.

Two kinds of prompt: prompt tokens prepended to the sequence before a block (prompt tuning, L2P), which then stay for
all later blocks; and key/value prefixes given to one block's attention (prefix tuning, DualPrompt's G-/E-prompts),
which leave the sequence length unchanged. Low-rank adapters (LoRA, `models.lora`) add (x A) B to a block's keys
and values. Attention always runs through `torch.nn.functional.scaled_dot_product_attention`, as timm's own does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from utils import UserError

from .backbones import build_backbone, resolve_backbone


def create_backbone(name: str, pretrained: bool, input_size: int, drop: float = 0.0, drop_path: float = 0.0,
                    checkpoint: str | None = None, flag: str = "--model") -> VisionTransformer:
    """The backbone a name of the table in `models/backbones.py` (or any timm ViT name) stands for, with no
    classifier (`num_classes=0`), so its output is the pooled, normalised feature. `checkpoint` is a weight file
    that replaces the name's own weights; `flag` names the option the name came from, for errors."""
    return build_backbone(resolve_backbone(name, flag), pretrained, input_size, drop, drop_path, checkpoint)


def freeze(module: nn.Module, frozen: bool = True) -> None:
    for param in module.parameters():
        param.requires_grad_(not frozen)


def freeze_pretrained(model: VisionTransformer) -> None:
    """Freeze every pre-trained weight; parameters no checkpoint supplies (MoCo v3's fresh fc_norm, see
    `Backbone.fresh_fc_norm`) stay trainable, as in the reference."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in model.fresh_keys)


def pretrained_features(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The pooled feature of the pre-trained network alone, before a fresh fc_norm: the reference's query
    (`pre_logits`) skips that norm too. Without one this is `model(images)`."""
    if model.fresh_keys:
        return model.pool(model.forward_features(images))
    return model(images)


Lora = tuple[torch.Tensor, torch.Tensor]


def lora_kv_delta(x: torch.Tensor, lora: Lora) -> torch.Tensor:
    """(B, N, 2, D): the key and value updates (x A) B at rank r. `lora` = (A, B) shared by the batch, shapes
    (2, D, r) and (2, r, D), or per sample, (B, 2, D, r) and (B, 2, r, D) (batched products: one pass for a batch
    mixing slots)."""
    a, b = lora
    if a.dim() == 3:
        return torch.einsum("bnjr,jre->bnje", torch.einsum("bnd,jdr->bnjr", x, a), b)
    return torch.einsum("bnjr,bjre->bnje", torch.einsum("bnd,bjdr->bnjr", x, a), b)


def adapted_attention(attn: Attention, x: torch.Tensor, prefix: torch.Tensor | None = None,
                      lora: Lora | None = None) -> torch.Tensor:
    """timm's `Attention.forward` with learned key/value prefixes and/or low-rank key/value updates.

    `prefix` is (B, 2, L_p, H, d_h): index 0 along dim 1 holds the keys, 1 the values. They are put in front of the
    block's own keys and values (no positional embedding, no q/k norm: they are learned directly in key space);
    the queries are the sequence's own, so the output keeps the input's length. `lora` (see `lora_kv_delta`) is
    added to the keys and values of the fused qkv projection's output, before the q/k norms; the queries are left as
    they are.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x)
    if lora is not None:
        qkv = qkv.view(batch, tokens, 3, -1)
        qkv = torch.cat([qkv[:, :, :1], qkv[:, :, 1:] + lora_kv_delta(x, lora).to(qkv.dtype)], dim=2)
    qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None:
        prefix_k, prefix_v = prefix.to(k.dtype).permute(1, 0, 3, 2, 4).unbind(0)  # each (B, H, L_p, d_h)
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = attn.norm(x.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    return attn.proj_drop(attn.proj(x))


def block_forward(block: Block, x: torch.Tensor, prefix: torch.Tensor | None = None,
                  lora: Lora | None = None) -> torch.Tensor:
    """One timm `Block`, with `adapted_attention` in place of its attention when a prefix or a LoRA is given."""
    if prefix is None and lora is None:
        return block(x)
    x = x + block.drop_path1(block.ls1(adapted_attention(block.attn, block.norm1(x), prefix, lora)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def check_promptable(model: VisionTransformer) -> None:
    """Prompts need timm's plain pre-norm blocks; other block types (parallel, gated attention) are refused."""
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention or block.attn.gate is not None:
            raise UserError(f"block {i} of this model is a {type(block).__name__}; prompts need timm's plain "
                            f"ViT Block with its Attention")


def forward_prompted(model: VisionTransformer, images: torch.Tensor,
                     prefixes: dict[int, torch.Tensor] | None = None,
                     prompt_tokens: dict[int, torch.Tensor] | None = None,
                     lora: dict[int, Lora] | None = None, pre_fc_norm: bool = False) -> torch.Tensor:
    """The pooled feature of `model` (built with num_classes=0) with prompts or low-rank adapters injected
    (`pre_fc_norm`: before the model's fc_norm, as the reference's `pre_logits`; the same unless one is fresh).

    `prefixes[i]`: a (B, 2, L_p, H, d_h) key/value prefix for block i. `prompt_tokens[i]`: (B, L, D) tokens put in
    front of the sequence before block i. `lora[i]`: block i's key/value adapters (`lora_kv_delta`). Pooling is
    timm's own over the sequence without the prompt tokens, so the [CLS] feature is read at its position after them,
    and with nothing injected this is exactly `model(images)`.
    """
    prefixes, prompt_tokens, lora = prefixes or {}, prompt_tokens or {}, lora or {}
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    num_prompt_tokens = 0
    for i, block in enumerate(model.blocks):
        if i in prompt_tokens:
            x = torch.cat([prompt_tokens[i].to(x.dtype), x], dim=1)
            num_prompt_tokens += prompt_tokens[i].shape[1]
        x = block_forward(block, x, prefixes.get(i), lora.get(i))
    x = model.norm(x)[:, num_prompt_tokens:]
    return model.pool(x) if pre_fc_norm else model.forward_head(x)

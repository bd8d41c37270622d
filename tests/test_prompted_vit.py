"""The block-by-block ViT forward that prompt methods use (issue 3's foundation)."""
import math

import pytest
import timm
import torch

from models.vit import adapted_attention, block_forward, check_promptable, forward_prompted
from utils import UserError


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **kwargs).eval()


def test_without_prompts_it_is_exactly_timm():
    model = _vit()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(forward_prompted(model, images), model(images))
    assert all(block.attn.fused_attn for block in model.blocks)  # timm's path is SDPA too


def _softmax_attention_float64(attn, x, prefix):
    """softmax(Q [K_p; K]^T / sqrt(d_h)) [V_p; V], written out by hand."""
    batch, tokens, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = (attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim)).unbind(2)  # each (B, N, H, d_h)
    k = torch.cat([prefix[:, 0], k], dim=1)
    v = torch.cat([prefix[:, 1], v], dim=1)
    out = torch.empty(batch, tokens, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            scores = q[b, :, h] @ k[b, :, h].T / math.sqrt(head_dim)
            out[b, :, h] = torch.softmax(scores, dim=-1) @ v[b, :, h]
    return attn.proj(out.reshape(batch, tokens, dim))


def test_prefix_attention_equals_a_plain_softmax_in_float64():
    model = _vit().double()
    attn = model.blocks[2].attn
    x = torch.randn(2, 5, 192, dtype=torch.float64)
    prefix = torch.randn(2, 2, 4, attn.num_heads, attn.head_dim, dtype=torch.float64)
    with torch.no_grad():
        ours = adapted_attention(attn, x, prefix)
        expected = _softmax_attention_float64(attn, x, prefix)
    assert ours.shape == x.shape
    assert torch.allclose(ours, expected, atol=1e-12, rtol=0)


def test_empty_prefix_is_the_plain_block_and_a_prefix_changes_only_its_sample():
    model = _vit()
    block = model.blocks[0]
    x = torch.randn(2, 5, 192)
    empty = torch.zeros(2, 2, 0, block.attn.num_heads, block.attn.head_dim)
    with torch.no_grad():
        assert torch.allclose(block_forward(block, x, empty), block(x), atol=1e-6)
        prefix = torch.zeros(2, 2, 3, block.attn.num_heads, block.attn.head_dim)
        prefix[1].normal_()
        out = block_forward(block, x, prefix)
    # zero keys score 0 and draw weight onto zero values, so even sample 0 changes; sample 1 gets its own prefix
    assert not torch.allclose(out[0], block(x)[0], atol=1e-4)
    assert not torch.allclose(out[1], block(x)[1], atol=1e-4)
    assert not torch.allclose(out[0], out[1])


def test_prompt_tokens_stay_in_the_sequence_and_pooling_skips_them():
    model = _vit()
    images = torch.randn(2, 3, 32, 32)
    prompts = torch.randn(2, 4, 192, requires_grad=True)
    pooled = forward_prompted(model, images, prompt_tokens={0: prompts})
    assert pooled.shape == (2, 192)
    pooled.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    # the [CLS] feature read after the 4 prompt tokens equals a manual run of the same sequence
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        x = model.blocks(torch.cat([prompts, x], dim=1))
        assert torch.allclose(pooled, model.fc_norm(model.norm(x)[:, 4]), atol=1e-6)


def test_models_without_plain_blocks_are_refused():
    check_promptable(_vit())
    parallel = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, num_classes=0, img_size=32)
    with pytest.raises(UserError, match="prompts need timm's plain ViT Block"):
        check_promptable(parallel)

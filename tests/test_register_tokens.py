"""DINOv2-style ViTs (register tokens, LayerScale, 14-pixel patches) as backbones of the prompt and LoRA methods: the
prompted forward against hand-written computations, Meta's published file layout, the table and a whole run."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from config.cli import parse_args
from conftest import fails_with_one_line, read_json, run_main
from models.backbones import BACKBONES, Backbone, build_backbone, load_weights_file, resolve_backbone
from models.vit import block_forward, check_promptable, forward_prompted

ARCHS = {True: "vit_small_patch14_reg4_dinov2", False: "vit_small_patch14_dinov2"}
TINY_DIMS = {"depth": 2, "embed_dim": 48, "num_heads": 2}
SIZE = 28  # a 2x2 grid of 14-pixel patches


def tiny_dinov2(registers: bool, size: int = SIZE, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A two-block DINOv2 ViT with random weights. timm starts LayerScale at 1e-5 and the [CLS] and register tokens
    at ~1e-6, which would hide a wrong attention (scaled away) or a register read for the [CLS] (all nearly equal):
    they are redrawn at scale 1."""
    torch.manual_seed(0)
    model = timm.create_model(ARCHS[registers], pretrained=False, num_classes=0, img_size=size, **TINY_DIMS)
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
        model.cls_token.normal_()
        if model.reg_token is not None:
            model.reg_token.normal_()
    return model.to(dtype).eval()


def images(size: int = SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dtype)


def embed_by_hand(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[CLS], the registers, then the patches: positions on the patches alone when the model embeds no [CLS]
    position (DINOv2 with registers), else on [CLS] and patches."""
    patches = model.patch_embed(x)
    tokens = [model.cls_token.expand(len(x), -1, -1)]
    if model.reg_token is not None:
        tokens.append(model.reg_token.expand(len(x), -1, -1))
    if model.no_embed_class:
        return torch.cat([*tokens, patches + model.pos_embed], dim=1)
    return torch.cat([*tokens, patches], dim=1) + model.pos_embed


def block_by_hand(block: nn.Module, x: torch.Tensor, prefix: torch.Tensor | None = None,
                  lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x + ls1 * proj(softmax(Q [K_p; K + h A_k B_k]^T / sqrt(d_h)) [V_p; V + h A_v B_v]) with h = norm1(x), then
    x + ls2 * mlp(norm2(x)), written out with explicit LayerScale factors."""
    attn = block.attn
    assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    batch, tokens, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    h = block.norm1(x)
    q, k, v = attn.qkv(h).reshape(batch, tokens, 3, dim).unbind(2)
    if lora is not None:
        a, b = lora
        k, v = k + h @ a[0] @ b[0], v + h @ a[1] @ b[1]
    q, k, v = (t.reshape(batch, tokens, heads, head_dim) for t in (q, k, v))
    if prefix is not None:
        k, v = torch.cat([prefix[:, 0], k], dim=1), torch.cat([prefix[:, 1], v], dim=1)
    weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(head_dim), dim=-1)
    out = torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(batch, tokens, dim)
    x = x + block.ls1.gamma * attn.proj(out)
    return x + block.ls2.gamma * block.mlp(block.norm2(x))


def features_by_hand(model: nn.Module, sequence: torch.Tensor, position: int) -> torch.Tensor:
    return model.head(model.fc_norm(model.norm(sequence)[:, position]))


# --- the prompted forward -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registers", [True, False])
def test_without_prompts_it_is_exactly_timm(registers):
    model = tiny_dinov2(registers)
    check_promptable(model)  # LayerScale blocks are timm's plain Block
    assert model.num_prefix_tokens == (5 if registers else 1) and not model.dynamic_img_size
    with torch.no_grad():
        assert torch.equal(forward_prompted(model, images()), model(images()))
        assert torch.equal(forward_prompted(model, images(), {}, {}, {}), model(images()))


@pytest.mark.parametrize("registers", [True, False])
def test_prompt_tokens_go_in_front_and_the_class_token_is_read_after_them(registers):
    model = tiny_dinov2(registers, dtype=torch.float64)
    prompts = torch.randn(2, 3, 48, dtype=torch.float64)
    with torch.no_grad():
        ours = forward_prompted(model, images(dtype=torch.float64), prompt_tokens={0: prompts})
        embedded = embed_by_hand(model, images(dtype=torch.float64))
        assert embedded.shape[1] == model.num_prefix_tokens + 4  # [CLS], registers, 2x2 patches
        sequence = model.blocks(torch.cat([prompts, embedded], dim=1))
        expected = features_by_hand(model, sequence, 3)
        assert torch.allclose(ours, expected, atol=1e-12, rtol=0)
        # the last prompt and the token after the [CLS] (a register, or the first patch) give other features
        for other in (2, 4):
            assert not torch.allclose(ours, features_by_hand(model, sequence, other), atol=1e-3)


@pytest.mark.parametrize("injected", ["prefix", "lora"])
def test_a_prefix_or_lora_at_a_block_equals_the_attention_written_out(injected):
    model = tiny_dinov2(registers=True, dtype=torch.float64)
    block = model.blocks[1]
    generator = torch.Generator().manual_seed(2)
    prefix = torch.randn(2, 2, 3, block.attn.num_heads, block.attn.head_dim, generator=generator, dtype=torch.float64)
    lora = (torch.randn(2, 48, 4, generator=generator, dtype=torch.float64),
            torch.randn(2, 4, 48, generator=generator, dtype=torch.float64))
    given = {"prefix": prefix} if injected == "prefix" else {"lora": lora}
    with torch.no_grad():
        x = torch.randn(2, 9, 48, generator=generator, dtype=torch.float64)
        assert torch.allclose(block_forward(block, x, **given), block_by_hand(block, x, **given), atol=1e-12, rtol=0)
        assert not torch.allclose(block_by_hand(block, x, **given), block(x), atol=1e-3)  # it does change the block
        # through the whole model: block 0 plain, block 1 with the prefix or adapter, [CLS] at index 0
        at_block_1 = {"prefixes": {1: prefix}} if injected == "prefix" else {"lora": {1: lora}}
        ours = forward_prompted(model, images(dtype=torch.float64), **at_block_1)
        sequence = block_by_hand(block, model.blocks[0](embed_by_hand(model, images(dtype=torch.float64))), **given)
        assert torch.allclose(ours, features_by_hand(model, sequence, 0), atol=1e-12, rtol=0)


# --- weights: Meta's published layout -----------------------------------------------------------------------------
def meta_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm DINOv2 state dict as Meta publishes it: a [CLS] position in pos_embed (with registers, timm folds it
    into the [CLS] token), the registers as `register_tokens`, and the masked-image-modelling `mask_token`."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.reg_token is not None:
        cls_position = torch.randn(1, 1, model.embed_dim, generator=torch.Generator().manual_seed(3))
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
        state["cls_token"] = state["cls_token"] - cls_position
        state["register_tokens"] = state.pop("reg_token")
    return {**state, "mask_token": torch.zeros(1, model.embed_dim)}


@pytest.mark.parametrize("registers", [True, False])
def test_metas_file_layout_loads_at_its_size_and_resampled_to_ours(tmp_path, registers):
    source = tiny_dinov2(registers, size=56)  # 4x4 patches
    torch.save(meta_layout(source), tmp_path / "dinov2_vits14_pretrain.pth")
    entry = resolve_backbone(ARCHS[registers] + ".lvd142m")
    same_size = tiny_dinov2(registers, size=56)
    with torch.no_grad():
        same_size.pos_embed.zero_()
    report = load_weights_file(same_size, tmp_path / "dinov2_vits14_pretrain.pth", entry)
    assert report.dropped == {"masked-image-modelling token": 1}
    with torch.no_grad():
        assert torch.allclose(same_size(images(56)), source(images(56)), atol=1e-5, rtol=0)
    smaller = tiny_dinov2(registers, size=SIZE)
    report = load_weights_file(smaller, tmp_path / "dinov2_vits14_pretrain.pth", entry)
    prefix = 0 if registers else 1
    assert torch.equal(smaller.pos_embed, resample_abs_pos_embed(source.pos_embed, [2, 2], num_prefix_tokens=prefix))
    assert report.resampled == f"pos_embed resampled from 4x4+1 to 2x2+{prefix}"
    if registers:
        assert torch.equal(smaller.reg_token, source.reg_token)


# --- the table, the input size, a run ------------------------------------------------------------------------------
def test_the_table_names_dinov2_with_and_without_registers_at_the_requested_size():
    names = {b.name: b for b in BACKBONES}
    for size, letter in (("small", "s"), ("base", "b")):
        for reg in ("", "_reg4"):
            entry = names[f"vit_{size}_patch14{reg}_dinov2.lvd142m"]
            assert entry.hub and entry.hub_id == f"timm/{entry.name}"
            assert entry.files == (f"dinov2_vit{letter}14{reg}_pretrain.pth", f"{entry.name}.safetensors")
    assert parse_args(["digits_l2p", "--model", ARCHS[True]]).context.backbone == ARCHS[True] + ".lvd142m"
    for registers in (True, False):
        model = build_backbone(resolve_backbone(ARCHS[registers]), pretrained=False, input_size=SIZE)
        assert tuple(model.patch_embed.grid_size) == (2, 2) and not model.dynamic_img_size
        assert model.pos_embed.shape == (1, 4 if registers else 5, 384)
        assert model(images()).shape == (2, 384)


def test_an_input_size_that_is_not_whole_patches_is_refused_before_the_data(capsys, tmp_path):
    err = fails_with_one_line(capsys, "digits_l2p", "--model", ARCHS[True], "--device", "cpu",
                              "--output_dir", str(tmp_path / "out"))  # the preset's 32 pixels
    assert "--input-size 32 is not a multiple of the patch size 14 of --model" in err and "e.g. 42" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_l2p_runs_end_to_end_on_a_dinov2_with_registers(tmp_path, monkeypatch, capsys):
    """The real run with DINOv2-S/14 + 4 registers, its depth and width cut to TINY_DIMS so it runs in seconds."""
    monkeypatch.setattr(Backbone, "model_kwargs", property(lambda self: TINY_DIMS))
    out = tmp_path / "out"
    assert run_main("digits_l2p", "--model", ARCHS[True], "--pretrained", "False", "--input-size", str(SIZE),
                    "--num_workers", "0", "--device", "cpu", "--num_tasks", "2", "--epochs", "1",
                    "--output_dir", str(out)) == 0
    assert "architecture vit_small_patch14_reg4_dinov2" in capsys.readouterr().out
    results = read_json(out / "results.json")
    assert results["completed_tasks"] == 2
    accuracies = [acc for row in results["acc_matrix"] for acc in row if acc is not None]
    assert len(accuracies) == 3 and all(math.isfinite(acc) and 0 <= acc <= 100 for acc in accuracies)

"""The backbone table and the weight loader: every file layout the suite reads, written here from a tiny timm ViT
in that exact foreign layout (with the extra keys the real files carry), must give back the same network."""
import argparse
import fractions
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from config.cli import parse_args
from conftest import REPO, TINY, read_json, run_main, script_commands
from datasets import build_scenario
from models import create_method
from models.backbones import ALIASES, BACKBONES, CHECKPOINTS_DIR, build_backbone, load_weights_file, resolve_backbone
from models.vit import pretrained_features
from utils import UserError

ARCH, SIZE = "vit_tiny_patch16_224", 32
IMAGES = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path, no_hub_network):
    """No test may reach the network: the hub check finds no connection and timm's hub fetch fails as it does
    offline. Each test runs in its own folder, so `./checkpoints` is empty unless the test fills it."""
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.")
    monkeypatch.setattr(builder, "load_state_dict_from_hf", no_network)
    monkeypatch.setattr(builder, "load_state_dict_from_url", no_network)
    monkeypatch.chdir(tmp_path)


def tiny(**kwargs) -> torch.nn.Module:
    """A tiny ViT with random weights (seeded): the network the files below are written from."""
    torch.manual_seed(0)
    return timm.create_model(ARCH, num_classes=0, img_size=SIZE, **kwargs).eval()


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """The network every file is written from (never loaded into)."""
    return tiny()


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    """A network that files which must be refused are checked against."""
    return tiny()


def tiny_entry(name: str):
    """The table entry of `name` with the tiny architecture in place of ViT-B: same files, layouts, head handling."""
    return replace(resolve_backbone(name), arch=ARCH)


def build(name: str, **kwargs) -> torch.nn.Module:
    return build_backbone(tiny_entry(name), pretrained=True, input_size=SIZE, **kwargs).eval()


def same_outputs(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(model(IMAGES), reference(IMAGES))


# --- the foreign layouts, as the published files lay them out ----------------------------------------------------
def ibot_training_checkpoint(sd: dict) -> dict:
    dim = sd["cls_token"].shape[-1]
    head = {"head.mlp.0.weight": torch.randn(32, dim), "head.mlp.0.bias": torch.randn(32),
            "head.last_layer.weight_g": torch.randn(64, 1), "head.last_layer.weight_v": torch.randn(64, 32),
            "head.last_layer2.weight_g": torch.randn(64, 1), "head.last_layer2.weight_v": torch.randn(64, 32)}
    teacher = {**{f"backbone.{k}": v for k, v in sd.items()}, "backbone.masked_embed": torch.zeros(dim), **head}
    return {"student": {f"module.{k}": v.clone() for k, v in teacher.items()}, "teacher": teacher,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, "epoch": 80,
            "args": argparse.Namespace(arch="vit_base", patch_size=16, out_dim=8192),
            "ibot_loss": {"center": torch.zeros(1, 64), "center2": torch.zeros(1, 64)}}


def moco_v3_training_checkpoint(sd: dict) -> dict:
    dim = sd["cls_token"].shape[-1]
    projector = {"head.0.weight": torch.randn(64, dim), "head.1.weight": torch.ones(64), "head.1.bias": torch.zeros(64),
                 "head.1.running_mean": torch.zeros(64), "head.1.running_var": torch.ones(64),
                 "head.1.num_batches_tracked": torch.tensor(5), "head.3.weight": torch.randn(16, 64)}
    encoder = {**sd, **projector}
    state = {**{f"module.base_encoder.{k}": v for k, v in encoder.items()},
             **{f"module.momentum_encoder.{k}": v + 1 for k, v in encoder.items()},
             "module.predictor.0.weight": torch.randn(64, 16), "module.predictor.3.weight": torch.randn(16, 64)}
    return {"epoch": 300, "arch": "vit_base", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0]}]}, "scaler": {"scale": 65536.0}}


def google_npz(model: torch.nn.Module, path: Path) -> None:
    """The original Google ViT layout (JAX names and axes), with its 21k-class head and representation layer."""
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    arrays = {"embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),
              "embedding/bias": model.patch_embed.proj.bias, "cls": model.cls_token,
              "Transformer/posembed_input/pos_embedding": model.pos_embed,
              "Transformer/encoder_norm/scale": model.norm.weight, "Transformer/encoder_norm/bias": model.norm.bias,
              "pre_logits/kernel": torch.randn(dim, dim), "pre_logits/bias": torch.randn(dim),
              "head/kernel": torch.randn(dim, 11), "head/bias": torch.randn(11)}
    for i, block in enumerate(model.blocks):
        prefix = f"Transformer/encoderblock_{i}/"
        mha = prefix + "MultiHeadDotProductAttention_1/"
        for name, weight, bias in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3),
                                      block.attn.qkv.bias.chunk(3), strict=True):
            arrays[f"{mha}{name}/kernel"] = weight.T.reshape(dim, heads, -1)
            arrays[f"{mha}{name}/bias"] = bias.reshape(heads, -1)
        arrays[f"{mha}out/kernel"] = block.attn.proj.weight.reshape(dim, heads, -1).permute(1, 2, 0)
        arrays[f"{mha}out/bias"] = block.attn.proj.bias
        for norm, ln in ((block.norm1, "LayerNorm_0"), (block.norm2, "LayerNorm_2")):
            arrays[f"{prefix}{ln}/scale"], arrays[f"{prefix}{ln}/bias"] = norm.weight, norm.bias
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            arrays[f"{prefix}MlpBlock_3/Dense_{r}/kernel"] = fc.weight.T
            arrays[f"{prefix}MlpBlock_3/Dense_{r}/bias"] = fc.bias
    np.savez(path, **{k: v.detach().numpy() for k, v in arrays.items()})


def write_checkpoint(name: str, obj: dict) -> Path:
    CHECKPOINTS_DIR.mkdir(exist_ok=True)
    torch.save(obj, CHECKPOINTS_DIR / name)
    return CHECKPOINTS_DIR / name


# --- every layout through the table ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, file_name, layout, dropped", [
    ("vit_base_patch16_224_21k_ibot", "checkpoint.pth", ibot_training_checkpoint,
     "projection head (6 keys), masked-image-modelling token (1 keys)"),
    ("vit_base_patch16_224_ibot", "checkpoint_teacher.pth", lambda sd: {"state_dict": sd}, None),
    ("vit_base_patch16_224_ibot", "ibot_vitbase16_pretrain.pth", lambda sd: {"state_dict": sd}, None),
    ("vit_base_patch16_224_dino", "dino_vitbase16_pretrain.pth", dict, None),
])
def test_self_supervised_files_load_into_the_same_network(name, file_name, layout, dropped, source):
    path = write_checkpoint(file_name, layout(source.state_dict()))
    model = build(name)
    assert same_outputs(model, source)
    assert f"{len(source.state_dict())} tensors from {path}" in model.weights_summary
    assert model.weights_summary.startswith(f"{name} = {resolve_backbone(name).name}, ")
    if dropped:
        assert f"dropped as expected: {dropped}" in model.weights_summary
    else:
        assert "dropped" not in model.weights_summary


@pytest.mark.parametrize("file_name, layout, dropped", [
    # the tiny encoder has 150 tensors: 150 + 7 in the momentum encoder, 2 in the predictor; 7 in the projector
    ("vit-b-300ep.pth.tar", moco_v3_training_checkpoint,
     ("momentum encoder and predictor (159 keys)", "classifier or projection head (7 keys)")),
    ("mocov3-vit-base-300ep.pth", lambda sd: {"model": sd}, ()),  # moco-v3's convert_to_deit.py output
])
def test_moco_v3_files_get_the_reference_head_a_fresh_fc_norm(file_name, layout, dropped, source):
    write_checkpoint(file_name, layout(source.state_dict()))
    model = build("vit_base_patch16_224_mocov3")
    # the reference's MoCo model: blocks from the file, no final norm, a fresh LayerNorm after pooling
    expected = timm.create_model(ARCH, num_classes=0, img_size=SIZE, fc_norm=True).eval()
    expected.load_state_dict({**{k: v for k, v in source.state_dict().items() if not k.startswith("norm.")},
                              "fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192)})
    assert isinstance(model.norm, torch.nn.Identity)
    assert torch.equal(model.fc_norm.weight, torch.ones(192)) and torch.equal(model.fc_norm.bias, torch.zeros(192))
    assert same_outputs(model, expected)
    with torch.no_grad():  # what the query reads: the final [CLS] token before that norm
        assert torch.equal(pretrained_features(model, IMAGES), expected.pool(expected.forward_features(IMAGES)))
    for part in (*dropped, "final norm, replaced by a fresh fc_norm (2 keys)", "fresh: fc_norm.weight, fc_norm.bias"):
        assert part in model.weights_summary


def test_google_npz_round_trips_through_timms_reader(source):
    CHECKPOINTS_DIR.mkdir()
    google_npz(source, CHECKPOINTS_DIR / "ViT-B_16.npz")
    model = build("vit_base_patch16_224")  # a file in checkpoints/ wins over timm's hub
    assert same_outputs(model, source)
    assert "Google ViT .npz" in model.weights_summary
    assert "classifier or projection head (2 keys), representation layer (2 keys)" in model.weights_summary


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".pth.tar"])
def test_any_timm_name_takes_a_weight_file_in_timm_layout(tmp_path, suffix, source):
    state = {**source.state_dict(), "head.weight": torch.randn(5, 192), "head.bias": torch.randn(5)}  # a classifier
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state} if suffix == ".pth.tar" else state, path)
    model = build_backbone(resolve_backbone(ARCH), pretrained=True, input_size=SIZE, checkpoint=str(path)).eval()
    assert same_outputs(model, source)
    assert "classifier or projection head (2 keys)" in model.weights_summary


def test_pos_embed_is_resampled_with_timm_for_another_input_size(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_backbone(resolve_backbone(ARCH), pretrained=True, input_size=48, checkpoint=str(tmp_path / "w.pth"))
    assert torch.equal(model.pos_embed, resample_abs_pos_embed(source.pos_embed, [3, 3], num_prefix_tokens=1))
    assert torch.equal(model.blocks[3].mlp.fc2.weight, source.blocks[3].mlp.fc2.weight)
    assert "pos_embed resampled from 2x2+1 to 3x3+1" in model.weights_summary


def test_a_class_position_the_model_does_not_embed_is_folded_into_the_class_token(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = tiny(no_embed_class=True)  # position embeddings for the patches only
    report = load_weights_file(model, tmp_path / "w.pth", resolve_backbone(ARCH))
    assert same_outputs(model, source)
    assert report.resampled == "pos_embed resampled from 2x2+1 to 2x2+0"


# --- errors ---------------------------------------------------------------------------------------------------------
def load_error(state: dict, tmp_path: Path, target: torch.nn.Module) -> str:
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError) as err:
        load_weights_file(target, tmp_path / "w.pth", resolve_backbone(ARCH))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_missing_key_an_unknown_key_and_a_wrong_shape_are_named(tmp_path, source, target):
    state = dict(source.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    assert "missing keys: blocks.1.mlp.fc2.bias" in load_error(state, tmp_path, target)
    state = {**source.state_dict(), "blocks.0.attn.gate.weight": torch.zeros(3)}
    assert "unexpected keys: blocks.0.attn.gate.weight" in load_error(state, tmp_path, target)
    small = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=SIZE).state_dict()  # width 384
    err = load_error(small, tmp_path, target)
    assert "shape mismatches: blocks.0.attn.proj.bias (file (384,), model (192,))" in err and "and " in err


@pytest.mark.parametrize("suffix", [".pth", ".npz", ".safetensors"])
def test_a_truncated_file_is_one_line_not_a_traceback(tmp_path, suffix, source, target):
    path = tmp_path / f"w{suffix}"
    if suffix == ".npz":
        google_npz(source, path)
    elif suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=f"cannot read {path}: the file is truncated or corrupt .*; download it again"):
        load_weights_file(target, path, resolve_backbone(ARCH))


def test_pickled_objects_and_unknown_layouts_are_refused(tmp_path, source, target):
    err = load_error({"model": source.state_dict(), "note": fractions.Fraction(1, 3)}, tmp_path, target)
    assert "pickled Python objects besides tensors (fractions.Fraction)" in err
    assert "not a ViT checkpoint this loader knows (top level: ['epoch', 'weights'])" in load_error(
        {"weights": [1, 2], "epoch": 3}, tmp_path, target)


def _fails_with_one_line(capsys, *args: str) -> str:
    assert run_main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_self_supervised_name_without_its_file_says_which_file_goes_where(capsys, tmp_path):
    err = _fails_with_one_line(capsys, "digits_linear", "--model", "vit_base_patch16_224_mocov3", "--pretrained",
                               "True", "--output_dir", str(tmp_path / "out"))
    assert ("vit_base_patch16_224_mocov3 = vit_base_patch16_224.mocov3_in1k needs its weights file: put "
            "mocov3-vit-base-300ep.pth or vit-b-300ep.pth.tar (published at "
            "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar) in "
            f"{tmp_path / 'checkpoints'}") in err
    assert not (tmp_path / "out").exists()
    err = _fails_with_one_line(capsys, "digits_linear", "--pretrained_checkpoint", str(tmp_path / "nope.pth"))
    assert f"weights file {tmp_path / 'nope.pth'} does not exist" in err


def test_a_hub_name_offline_says_how_to_place_the_file(capsys, tmp_path):
    err = _fails_with_one_line(capsys, "digits_ncm", *TINY, "--pretrained", "True",
                               "--output_dir", str(tmp_path / "out"))
    assert ("could not fetch timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k from the Hugging Face hub "
            "(no connection to huggingface.co:443: Connection refused); ") in err
    assert (f"offline, put vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors (from "
            f"https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k) in {tmp_path / 'checkpoints'}, "
            f"or pass --pretrained_checkpoint PATH") in err


def test_contradicting_and_unknown_names(capsys):
    err = _fails_with_one_line(capsys, "digits_linear", "--pretrained", "False", "--pretrained_checkpoint", "x.pth")
    assert "--pretrained False contradicts --pretrained_checkpoint" in err
    err = _fails_with_one_line(capsys, "digits_linear", "--model", "vit_base_patch16_224.ibot")
    assert "timm has no weights tagged 'ibot' for vit_base_patch16_224" in err and "orig_in21k" in err
    err = _fails_with_one_line(capsys, "cifar100_l2p", "--original_model", "vit_base_patch16_224_ibot21k")
    assert "unknown --original_model 'vit_base_patch16_224_ibot21k'" in err
    assert "(did you mean vit_base_patch16_224_ibot, " in err


# --- the table, aliases, --list_backbones ------------------------------------------------------------------------
def test_every_reference_name_resolves_to_its_pinned_weights():
    expected = {"vit_base_patch16_224": "vit_base_patch16_224.orig_in21k",
                "vit_base_patch16_224_21k_ibot": "vit_base_patch16_224.ibot_in22k",
                "vit_base_patch16_224_ibot": "vit_base_patch16_224.ibot_in1k",
                "vit_base_patch16_224_dino": "vit_base_patch16_224.dino",
                "vit_base_patch16_224_mocov3": "vit_base_patch16_224.mocov3_in1k"}
    assert expected == ALIASES
    for alias, name in expected.items():
        entry = resolve_backbone(alias)
        assert (entry.name, entry.alias_used, entry.arch) == (name, alias, "vit_base_patch16_224")
        # one experiment, either spelling
        assert parse_args(["cifar100_l2p", "--model", alias]).context.backbone == name
    # the file names the reference reads from ./checkpoints, then the published ones
    files = {b.name: b.files for b in BACKBONES}
    assert files["vit_base_patch16_224.ibot_in22k"] == ("checkpoint.pth",)
    assert files["vit_base_patch16_224.ibot_in1k"] == ("ibot_vitbase16_pretrain.pth", "checkpoint_teacher.pth")
    assert files["vit_base_patch16_224.dino"] == ("dino_vitbase16_pretrain.pth",)
    assert files["vit_base_patch16_224.mocov3_in1k"] == ("mocov3-vit-base-300ep.pth", "vit-b-300ep.pth.tar")
    # timm's own weights keep timm's names; the LoRA code's backbone has its own explicit name
    for entry in BACKBONES:
        if entry.hub:
            assert timm.models.get_pretrained_cfg(entry.name).hf_hub_id == entry.hub_id
    assert resolve_backbone("vit_base_patch16_224.augreg_in21k_ft_in1k").hub
    assert resolve_backbone(ARCH).name == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # pinned to timm's default


def test_list_backbones_shows_names_sources_files_and_presence(capsys):
    CHECKPOINTS_DIR.mkdir()
    (CHECKPOINTS_DIR / "dino_vitbase16_pretrain.pth").write_bytes(b"")
    for argv in (["--list_backbones"], ["cifar100_l2p", "--list_backbones"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        blocks = {block.split()[0]: block for block in out.split("\n\n")[1:-1]}
        assert set(blocks) == {b.name for b in BACKBONES}
        for entry in BACKBONES:
            block = blocks[entry.name]
            assert all(alias in block for alias in entry.aliases) and entry.url in block and entry.arch in block
            assert all(f in block for f in entry.files)
            assert ("PRESENT (dino_vitbase16_pretrain.pth)" if entry.name.endswith(".dino") else "absent") in block
        assert "local file only" in blocks["vit_base_patch16_224.ibot_in22k"]
        assert "timm hub timm/vit_base_patch16_224.orig_in21k" in blocks["vit_base_patch16_224.orig_in21k"]
        assert "fresh trainable fc_norm" in blocks["vit_base_patch16_224.mocov3_in1k"]


# --- through the run -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_loads_the_file_given_and_prints_what_the_name_resolved_to(tmp_path, capsys, source):
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    assert run_main("digits_ncm", "--model", ARCH, "--device", "cpu", "--stop_after_task", "1",
                    "--pretrained_checkpoint", str(tmp_path / "w.safetensors"), "--output_dir", str(out)) == 0
    log = capsys.readouterr().out
    assert (f"backbone: vit_tiny_patch16_224.augreg_in21k_ft_in1k, architecture vit_tiny_patch16_224, weights: "
            f"{len(source.state_dict())} tensors from {tmp_path / 'w.safetensors'} (flat state dict)") in log
    config = read_json(out / "config.json")
    assert (config["backbone"]["pretrained"], config["backbone"]["pretrained_checkpoint"]) == (
        True, str(tmp_path / "w.safetensors"))
    assert config["context"]["backbone"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def _prompt_method(*flags: str, subcommand: str = "digits_sprompt"):
    cfg = parse_args([subcommand, "--device", "cpu", *flags])
    return create_method(cfg, build_scenario(cfg.num_classes, cfg.num_tasks, False, cfg.seed, cfg.dataset))


@pytest.mark.parametrize("subcommand, original", [("digits_sprompt", "query_model"),
                                                  ("digits_hideprompt", "original_vit")])
def test_the_original_model_shares_the_backbone_only_when_names_and_files_agree(tmp_path, source, subcommand,
                                                                                 original):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    method = _prompt_method("--model", ARCH, "--original_model", "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                            "--pretrained_checkpoint", str(tmp_path / "w.pth"), subcommand=subcommand)
    assert getattr(method, original) is method.backbone
    assert method.cfg.original_model_checkpoint == str(tmp_path / "w.pth")
    assert same_outputs(method.backbone, source)
    method = _prompt_method("--model", ARCH, "--original_model", ARCH,
                            "--original_model_checkpoint", str(tmp_path / "w.pth"), subcommand=subcommand)
    assert getattr(method, original) is not method.backbone
    assert same_outputs(getattr(method, original), source) and not same_outputs(method.backbone, source)


def test_moco_v3_in_a_prompt_method_trains_its_fresh_fc_norm_and_queries_before_it():
    method = _prompt_method("--model", "vit_base_patch16_224_mocov3", "--original_model",
                            "vit_base_patch16_224_mocov3", "--pretrained", "False", "--input-size", "32")
    trainable = {k for k, v in method.named_parameters() if v.requires_grad}
    assert trainable == {"e_prompt.prompt", "e_prompt.key", "head.weight", "head.bias", "backbone.fc_norm.weight",
                         "backbone.fc_norm.bias"}
    assert {"backbone.fc_norm.weight", "backbone.fc_norm.bias"} <= set(method.checkpoint_state())
    before = method.backbone.fc_norm.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1.0)
    loss, _ = method(IMAGES, torch.tensor([0, 1]), 0)
    loss.backward()
    optimizer.step()
    assert not torch.equal(method.backbone.fc_norm.weight, before)
    with torch.no_grad():  # the query skips the fresh norm: it did not move with it
        backbone = method.backbone
        assert torch.equal(method._query(IMAGES), backbone.pool(backbone.forward_features(IMAGES)))


# --- training scripts ----------------------------------------------------------------------------------------------
SCRIPT_MODELS = {"ibot21k": "vit_base_patch16_224.ibot_in22k", "ibot": "vit_base_patch16_224.ibot_in1k",
                 "dino": "vit_base_patch16_224.dino", "mocov3": "vit_base_patch16_224.mocov3_in1k"}
SCRIPTS = [(f"train_{d}_{b}.sh", d, b) for d in ("cifar100", "imr") for b in SCRIPT_MODELS]
SCRIPTS += [("train_cub_ibot21k.sh", "cub", "ibot21k"), ("train_5datasets_ibot21k.sh", "five_datasets", "ibot21k")]


def test_backbone_scripts_launch_both_stages_with_the_reference_settings(tmp_path):
    for script, dataset, backbone in SCRIPTS:
        assert subprocess.run(["bash", "-n", f"training_script/{script}"], cwd=REPO).returncode == 0
        commands = script_commands(script, "--num_workers", "2", tmp_path=tmp_path, env={"SEEDS": "7 8"})
        configs = [parse_args(argv) for argv in commands]
        assert [c.stage for c in configs] == ["tii", "tii", "wtp", "wtp"], script
        name = f"{dataset.replace('five_datasets', '5datasets')}_{backbone}"
        for first, second, seed in zip(configs[:2], configs[2:], (7, 8), strict=True):
            assert first.seed == second.seed == seed and first.num_workers == second.num_workers == 2
            assert first.output_dir == f"./output/{name}_multi_centroid_mlp_2_seed{seed}"
            assert second.trained_original_model == first.output_dir
            assert second.output_dir == f"./output/{name}_pe_seed{seed}"
            for cfg in (first, second):
                assert cfg.subcommand == f"{dataset}_hideprompt"
                assert cfg.model == cfg.original_model == cfg.context.backbone == SCRIPT_MODELS[backbone]
        stage1, stage2 = configs[0], configs[2]
        if dataset == "five_datasets":
            assert (stage1.batch_size, stage1.lr, stage1.sched) == (32, 0.001, "constant")
            assert (stage2.lr, stage2.clip_grad, stage2.reg, stage2.prompt_momentum) == (0.03, 2.0, 0.1, 0.01)
        else:
            assert (stage1.batch_size, stage1.epochs, stage1.lr, stage1.ca_lr, stage1.crct_epochs) == (
                24, 20, 0.0005, 0.005, 30)
            expected = {"cifar100": (20, 5, 0.1, 0.1, "step"), "imr": (50, 20, 0.5, 0.01, "constant"),
                        "cub": (50, 20, 0.01, 0.01, "step")}[dataset]
            assert (stage2.epochs, stage2.length, stage2.reg, stage2.prompt_momentum, stage2.sched) == expected
        assert stage2.larger_prompt_lr
    default_seeds = {s: len(script_commands(s, tmp_path=tmp_path)) // 2 for s in
                     ("train_cifar100_dino.sh", "train_cub_ibot21k.sh", "train_5datasets_ibot21k.sh")}
    assert default_seeds == {"train_cifar100_dino.sh": 3, "train_cub_ibot21k.sh": 1, "train_5datasets_ibot21k.sh": 3}

"""The LoRA family (issue 6): the rank-r key/value update against a dense computation, per-sample slots, the
initialisation, momentum, what trains, continual LoRA and HiDe-LoRA end to end (one process and 2-process gloo),
their checks, presets and training scripts."""
import math
import shutil

import pytest
import timm
import torch

from config.cli import parse_args
from conftest import read_json, run_cli, run_main, script_commands
from models.lora import LoraPool
from models.vit import block_forward, forward_prompted
from test_hideprompt import _fails
from utils import UserError

FAST = ["--num_tasks", "2", "--device", "cpu", "--epochs", "1"]
HIDE_FAST = [*FAST, "--crct_epochs", "2"]


def _vit(dtype=torch.float32):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    return model.to(dtype).eval()


def _random_pool(slots: int, layers: int, dim: int, rank: int, dtype=torch.float32) -> LoraPool:
    pool = LoraPool(slots, layers, dim, rank).to(dtype)
    with torch.no_grad():
        pool.b.normal_()  # B = 0 at init would make every check trivially pass
    return pool


def test_lora_equals_a_dense_update_of_the_key_and_value_weights_in_float64():
    model = _vit(torch.float64)
    block, dim, rank = model.blocks[1], model.embed_dim, 3
    pool = _random_pool(2, 1, dim, rank, torch.float64)
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).double().eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = pool.a[1, 0], pool.b[1, 0]  # slot 1, first adapted block: (2, D, r), (2, r, D)
        weight = dense.blocks[1].attn.qkv.weight  # (3D, D), rows q | k | v; y = x W^T
        weight[dim:2 * dim] += (a[0] @ b[0] / rank).T
        weight[2 * dim:] += (a[1] @ b[1] / rank).T
        expected = dense.blocks[1](x)
        ours = block_forward(block, x, lora=pool.adapters(1)[0])
        per_sample = block_forward(block, x, lora=pool.adapters(torch.tensor([1, 1]))[0])
        # the queries are untouched: the fused projection's q third is the frozen one
        q_rows = dense.blocks[1].attn.qkv.weight[:dim]
        assert torch.equal(q_rows, model.blocks[1].attn.qkv.weight[:dim])
        assert not torch.allclose(block(x), expected)  # the update does change the block
    assert torch.allclose(ours, expected, atol=1e-12, rtol=0)
    assert torch.allclose(per_sample, expected, atol=1e-12, rtol=0)


def test_each_sample_uses_its_own_slot_in_one_batched_pass():
    model = _vit(torch.float64)
    pool = _random_pool(3, 2, model.embed_dim, 4, torch.float64)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    slots = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        batched = forward_prompted(model, images, lora=pool.adapters(slots))
        alone = torch.cat([forward_prompted(model, images[i:i + 1], lora=pool.adapters(int(s)))
                           for i, s in enumerate(slots)])
        plain = model(images)
    assert torch.allclose(batched, alone, atol=1e-12, rtol=0)
    assert not torch.allclose(batched, plain)
    # B = 0 at initialisation: a fresh pool is the identity
    with torch.no_grad():
        fresh = LoraPool(3, 2, model.embed_dim, 4).double()
        assert torch.allclose(forward_prompted(model, images, lora=fresh.adapters(slots)), plain, atol=1e-12)


def test_reference_init_takes_the_rank_as_fan_in_and_standard_the_width():
    dim, rank = 768, 5
    torch.manual_seed(0)
    reference, standard = LoraPool(10, 5, dim, rank, "reference"), LoraPool(10, 5, dim, rank, "standard")
    # the reference: kaiming_uniform_(a=sqrt(5)) on a (dim x rank) matrix, bound = sqrt(6 / (1 + 5) / rank)
    matrix = torch.empty(dim, rank)
    torch.nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
    assert matrix.abs().max() <= 1 / math.sqrt(rank)
    for pool, bound in ((reference, 1 / math.sqrt(rank)), (standard, 1 / math.sqrt(dim))):
        assert pool.a.abs().max() <= bound
        assert pool.a.abs().max() > 0.99 * bound  # 192k draws fill the interval
        assert torch.count_nonzero(pool.b) == 0


def test_slot_init_and_momentum_follow_the_reference():
    pool = _random_pool(4, 1, 6, 2)
    with torch.no_grad():
        pool.a.normal_()
    before_a, before_b = pool.a.detach().clone(), pool.b.detach().clone()
    pool.apply_momentum(2, 0.25)
    for weight, old in ((pool.a, before_a), (pool.b, before_b)):
        assert torch.allclose(weight[2], 0.75 * old[2] + 0.25 * (old[0] + old[1]) / 2)
        assert torch.equal(weight[[0, 1, 3]], old[[0, 1, 3]])
    pool.init_slot_from_previous(3)
    assert torch.equal(pool.a[3], pool.a[2]) and torch.equal(pool.b[3], pool.b[2])


def _trained_state(subcommand: str, task: int) -> tuple[dict, dict]:
    """The method's state after begin_task(task) and after three optimizer steps on one batch of the task."""
    import engine
    from datasets import build_scenario
    from models import create_method
    cfg = parse_args([subcommand, "--device", "cpu", "--num_tasks", "2", "--lr", "1.0"])
    scenario = build_scenario(10, 2, False, 0, "digits")
    method = create_method(cfg, scenario)
    method.set_phase(method.phases[-1])
    groups = method.begin_task(task)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    optimizer = engine.create_optimizer(groups, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = torch.randn(8, 3, 32, 32)
    targets = torch.tensor(scenario.task_classes[task]).repeat(2)[:8]
    method.train()
    for _ in range(3):
        loss, _ = method(images, targets, task)
        engine.optimizer_step(loss, optimizer, scaler, [p for g in groups for p in g["params"]], cfg.clip_grad)
    return before, method.state_dict()


@pytest.mark.parametrize("subcommand, task", [("digits_continual_lora", 1), ("digits_hidelora", 1)])
def test_only_the_lora_and_the_head_change_in_training(subcommand, task):
    before, after = _trained_state(subcommand, task)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lora.a", "lora.b", "head.weight", "head.bias"}
    if subcommand == "digits_hidelora":  # only the task's own slot moves
        for name in ("lora.a", "lora.b"):
            assert torch.equal(before[name][0], after[name][0])
            assert not torch.equal(before[name][1], after[name][1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Continual LoRA; HiDe-LoRA's stage 1 (HiDe-Prompt's), its stage 2, and the one-command run."""
    root = tmp_path_factory.mktemp("lora")
    launches = {"continual": ["digits_continual_lora", *FAST],
                "tii": ["digits_hideprompt", "--train_inference_task_only", *HIDE_FAST, "--lr", "0.01"],
                "wtp": ["digits_hidelora", "--trained_original_model", str(root / "tii"), *HIDE_FAST],
                "both": ["digits_hidelora", *HIDE_FAST, "--tii_epochs", "1", "--tii_lr", "0.01"]}
    for name, args in launches.items():
        assert run_main(*args, "--output_dir", str(root / name)) == 0, name
    return root


@pytest.mark.slow
def test_continual_lora_trains_one_shared_lora(runs):
    results = read_json(runs / "continual" / "results.json")
    assert results["completed_tasks"] == 2 and results["final"]["test_images"] == 540
    saved = torch.load(runs / "continual" / "checkpoint" / "task2_checkpoint.pth", weights_only=False)["model"]
    assert set(saved) == {"lora.a", "lora.b", "head.weight", "head.bias"}
    assert saved["lora.a"].shape == (1, 5, 2, 192, 4) and saved["lora.b"].abs().sum() > 0
    first = torch.load(runs / "continual" / "checkpoint" / "task1_checkpoint.pth", weights_only=False)["model"]
    assert not torch.equal(first["lora.b"], saved["lora.b"])  # the one LoRA keeps training on task 2


@pytest.mark.slow
def test_hidelora_reads_a_hideprompt_stage_one_and_equals_the_one_command_run(runs):
    tii, wtp, both = (read_json(runs / name / "results.json") for name in ("tii", "wtp", "both"))
    assert wtp["config"]["hide"]["stage"] == "wtp" and both["config"]["hide"]["stage"] == "both"
    assert both["acc_matrix"] == wtp["acc_matrix"]
    assert [t["tii_acc"] for t in wtp["tasks"]] == [t["tii_acc"] for t in tii["tasks"]]
    assert "wtp_pre_alignment" in wtp["final"]["phases"]
    saved = torch.load(runs / "wtp" / "checkpoint" / "task2_checkpoint.pth", weights_only=False)["model"]
    assert {k.split(".")[0] for k in saved} == {"lora", "head", "wtp_stats"}
    assert saved["lora.a"].shape == (10, 5, 2, 192, 4)  # --size slots
    assert saved["wtp_stats.present"][:, 0].all()
    # slot 2 started from slot 1 and trained on task 2; the slots after it are untouched
    assert not torch.equal(saved["lora.b"][1], saved["lora.b"][0]) and saved["lora.b"][2:].abs().sum() == 0


@pytest.mark.slow
def test_hidelora_refuses_what_the_reference_silently_loaded(runs, tmp_path, capsys):
    # the reference's README points HiDe-LoRA at a continual-LoRA run; its strict=False load drops the LoRA weights
    err = _fails(capsys, "digits_hidelora", "--trained_original_model", str(runs / "continual"), "--output_dir",
                 str(tmp_path / "a"), *HIDE_FAST)
    stage1 = "./output/digits_hideprompt_seed42"
    assert err == (f"error: --trained_original_model {runs / 'continual'} is a continual-LoRA run: the reference would "
                   f"load only its backbone and head and leave the task-identity model's MLP untrained, so it is "
                   f"refused; train the task-identity stage with `python main.py digits_hideprompt "
                   f"--train_inference_task_only --seed 42 --output_dir {stage1}` and pass --trained_original_model "
                   f"{stage1}")
    # a run of any other kind: its method and stage, and what the stage-2 method reads
    err = _fails(capsys, "digits_hideprompt", "--trained_original_model", str(runs / "wtp"), "--output_dir",
                 str(tmp_path / "c"), *HIDE_FAST)
    assert "is not a stage-1 (task-identity) checkpoint of HiDe-Prompt or HiDe-LoRA, which HiDe-Prompt reads " \
           "(method 'hidelora', stage 'wtp')" in err
    broken = tmp_path / "broken"
    shutil.copytree(runs / "tii", broken)
    for t in (1, 2):
        path = broken / "checkpoint" / f"task{t}_checkpoint.pth"
        saved = torch.load(path, weights_only=False)
        del saved["model"]["tii.head.bias"]
        torch.save(saved, path)
    err = _fails(capsys, "digits_hidelora", "--trained_original_model", str(broken), "--output_dir",
                 str(tmp_path / "b"), *HIDE_FAST)
    assert "does not fit" in err and "head.bias" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lora_momentum_mixes_the_earlier_slots_after_training():
    from datasets import build_scenario
    from models import create_method
    cfg = parse_args(["digits_hidelora", *HIDE_FAST, "--lora_momentum", "0.5"])
    method = create_method(cfg, build_scenario(10, 2, False, 0, "digits"))
    with torch.no_grad():
        method.lora.a.normal_()
        method.lora.b.normal_()
    slots = method.lora.a.detach().clone()
    method.set_phase("wtp")
    method.current.after_training(1)
    assert torch.allclose(method.lora.a[1], 0.5 * slots[1] + 0.5 * slots[0])
    assert torch.equal(method.lora.a[0], slots[0])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("subcommand, extra", [
    ("digits_continual_lora", []), ("digits_hidelora", ["--crct_epochs", "2", "--tii_epochs", "1"])])
def test_two_gloo_processes(tmp_path, subcommand, extra):
    out = tmp_path / "ddp"
    result = run_cli([subcommand, "--output_dir", str(out), *FAST, *extra], nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = read_json(out / "results.json")
    assert results["completed_tasks"] == 2 and results["final"]["test_images"] == 540
    assert results["acc_matrix"][1][0] is None and all(0 <= a <= 100 for a in results["acc_matrix"][0])
    saved = torch.load(out / "checkpoint" / "task2_checkpoint.pth", weights_only=False)["model"]
    assert {"lora.a", "lora.b", "head.weight"} <= set(saved)


def test_subcommands_presets_and_flag_checks():
    cfg = parse_args(["five_datasets_continual_lora"])
    assert (cfg.dataset_key, cfg.method, cfg.lora_type, cfg.clip_grad) == ("five_datasets", "continual_lora",
                                                                          "continual", 2.0)
    hide = parse_args(["imr_hidelora", "--dataset", "Split-Imagenet-R", "--lora_momentum", "0.1",
                       "--original_model_mlp_structure", "2", "--lora_type", "hide"])
    assert (hide.dataset, hide.lora_momentum, hide.original_model_mlp_structure, hide.lora_rank, hide.lora_depth,
            hide.lora_init, hide.stage) == ("Split-Imagenet-R", 0.1, (2,), 5, 5, "reference", "both")
    # the mapping of the stage-1 run it reads (the reference's script passes 2 over its config's [])
    assert parse_args(["cifar100_hidelora"]).original_model_mlp_structure == (2,)
    assert not hasattr(parse_args(["cifar100_hideprompt"]), "lora_momentum")  # not in HiDe-Prompt's config at all
    assert parse_args(["imr_hidelora", "--prompt_momentum", "0.1"]).no_effect_flags == ("prompt_momentum",)
    assert parse_args(["imr_hideprompt", "--lora_rank", "8"]).no_effect_flags == ("lora_rank",)
    for bad in (["digits_hidelora", "--lora_type", "continual"], ["digits_continual_lora", "--lora_type", "hide"],
                ["digits_hidelora", "--lora_rank", "0"], ["digits_hidelora", "--lora_momentum", "1"],
                ["digits_hidelora", "--size", "3"]):
        with pytest.raises(UserError):
            parse_args(bad)


def test_lora_depth_beyond_the_model_fails(capsys, tmp_path):
    err = _fails(capsys, "digits_continual_lora", "--lora_depth", "13", "--output_dir", str(tmp_path / "x"), *FAST)
    assert "--lora_depth 13: this model has 12 blocks" in err


@pytest.mark.parametrize("script, dataset, seeds", [("train_cifar100_lora.sh", "cifar100", 1),
                                                    ("train_imr_lora.sh", "imr", 1)])
def test_the_lora_scripts_launch_continual_lora_then_stage_one_then_hidelora(tmp_path, script, dataset, seeds):
    commands = script_commands(script, tmp_path=tmp_path)
    assert len(commands) == 3 * seeds
    continual, stage1, stage2 = (parse_args(argv) for argv in commands)
    augreg = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert continual.method == "continual_lora" and continual.model == augreg
    assert stage1.subcommand == f"{dataset}_hideprompt" and stage1.stage == "tii"
    assert stage1.model == stage1.original_model == "vit_base_patch16_224.orig_in21k"
    assert stage2.method == "hidelora" and stage2.stage == "wtp" and stage2.model == augreg
    assert stage2.trained_original_model == stage1.output_dir and stage2.original_model == stage1.original_model
    assert stage2.original_model_mlp_structure == stage1.original_model_mlp_structure == (2,)
    assert stage2.no_effect_flags == () and continual.no_effect_flags == ()
    if dataset == "cifar100":
        assert (continual.epochs, continual.lr, continual.lora_rank) == (20, 0.01, 8)
        assert (stage2.epochs, stage2.lr, stage2.lora_rank) == (20, 0.01, 8)
        assert (stage1.epochs, stage1.lr, stage1.sched) == (20, 0.0005, "constant")
    else:
        assert (stage1.epochs, stage1.lr) == (50, 0.0005)
        assert (stage2.epochs, stage2.lr, stage2.lora_rank, stage2.reg, stage2.sched, stage2.lora_momentum,
                stage2.dataset) == (50, 0.03, 5, 0.001, "cosine", 0.1, "Split-Imagenet-R")

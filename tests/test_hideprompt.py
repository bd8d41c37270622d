"""HiDe-Prompt end to end on Split Digits (2 tasks): the two-launch flow of the reference, the one-command flow, their
equality, stage 2's checks on stage 1's files, resume and --eval from saved statistics, and 2-process gloo."""
import shutil

import pytest
import torch

from config.cli import parse_args
from conftest import read_json, run_cli, run_main
from utils import UserError

FAST = ["--num_tasks", "2", "--device", "cpu", "--crct_epochs", "2", "--epochs", "1"]


def _stage1(out, *extra):
    return run_main("digits_hideprompt", "--train_inference_task_only", "--output_dir", str(out), *FAST,
                    "--lr", "0.01", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1, stage 2 reading it, and the one-command run with stage 1's settings."""
    root = tmp_path_factory.mktemp("hide")
    assert _stage1(root / "tii") == 0
    assert run_main("digits_hideprompt", "--trained_original_model", str(root / "tii"), "--output_dir",
                    str(root / "wtp"), *FAST) == 0
    assert run_main("digits_hideprompt", "--output_dir", str(root / "both"), *FAST, "--tii_epochs", "1",
                    "--tii_lr", "0.01") == 0
    return root


@pytest.mark.slow
def test_the_two_launch_flow_equals_the_one_command_flow(runs):
    tii, wtp, both = (read_json(runs / name / "results.json") for name in ("tii", "wtp", "both"))
    assert tii["config"]["hide"]["stage"] == "tii" and wtp["config"]["hide"]["stage"] == "wtp"
    assert both["config"]["hide"]["stage"] == "both"
    assert both["acc_matrix"] == wtp["acc_matrix"]
    for mine, theirs in zip(both["tasks"], wtp["tasks"], strict=True):
        assert mine["tii_acc"] == theirs["tii_acc"]
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)  # float summation order
    # the one-command run reports stage 1 as its first phase, equal to the stage-1 run's own results
    for t in range(2):
        column = [tii["acc_matrix"][i][t] for i in range(t + 1)]
        assert both["tasks"][t]["phases"]["tii"]["task_acc"] == column


@pytest.mark.slow
def test_stage_two_uses_stage_one_task_identity_and_reports_it(runs):
    wtp, tii = read_json(runs / "wtp" / "results.json"), read_json(runs / "tii" / "results.json")
    # the TII model's task-identity accuracy is what stage 2 reports: it predicts the prompt slot
    assert [t["tii_acc"] for t in wtp["tasks"]] == [t["tii_acc"] for t in tii["tasks"]]
    final = wtp["final"]
    assert final["test_images"] == 540 and len(final["tii_acc"]) == 2
    assert "wtp_pre_alignment" in final["phases"] and len(final["phases"]["wtp_pre_alignment"]["task_acc"]) == 2
    assert "wtp_pre_alignment" not in wtp["tasks"][0].get("phases", {})  # no alignment after the first task
    assert "tii_pre_alignment" in tii["final"]["phases"]


@pytest.mark.slow
def test_checkpoints_hold_what_each_stage_trained_and_its_statistics(runs):
    tii = torch.load(runs / "tii" / "checkpoint" / "task2_checkpoint.pth", weights_only=False)["model"]
    assert {k.split(".")[0] for k in tii} == {"tii", "tii_stats"}
    assert tii["tii_stats.present"][:, 0].all()  # both tasks' classes have statistics
    wtp = torch.load(runs / "wtp" / "checkpoint" / "task2_checkpoint.pth", weights_only=False)["model"]
    assert {k.split(".")[0] for k in wtp} == {"e_prompt", "head", "wtp_stats"}
    both = torch.load(runs / "both" / "checkpoint" / "task2_checkpoint.pth", weights_only=False)["model"]
    assert set(both) == set(tii) | set(wtp)
    for key in tii:
        assert torch.equal(both[key], tii[key]), key


@pytest.mark.slow
def test_eval_and_resume_reuse_the_saved_statistics(runs, tmp_path):
    both = read_json(runs / "both" / "results.json")
    assert run_main("digits_hideprompt", "--output_dir", str(runs / "both"), *FAST, "--tii_epochs", "1",
                    "--tii_lr", "0.01", "--eval") == 0
    assert read_json(runs / "both" / "eval_results.json")["acc_matrix"] == both["acc_matrix"]
    out = tmp_path / "resumed"
    common = ["--output_dir", str(out), *FAST, "--tii_epochs", "1", "--tii_lr", "0.01"]
    assert run_main("digits_hideprompt", *common, "--stop_after_task", "1") == 0
    assert run_main("digits_hideprompt", *common, "--resume") == 0
    assert read_json(out / "results.json")["acc_matrix"] == both["acc_matrix"]


def _fails(capsys, *args) -> str:
    assert run_main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.slow
def test_stage_two_refuses_a_stage_one_run_that_does_not_fit(runs, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(runs / "tii", partial)
    (partial / "checkpoint" / "task2_checkpoint.pth").unlink()
    err = _fails(capsys, "digits_hideprompt", "--trained_original_model", str(partial), "--output_dir",
                 str(tmp_path / "a"), *FAST)
    assert "task2_checkpoint.pth is missing" in err
    err = _fails(capsys, "digits_hideprompt", "--trained_original_model", str(runs / "tii"), "--output_dir",
                 str(tmp_path / "b"), *FAST, "--original_model_mlp_structure", "4", "4")
    assert "original_model_mlp_structure: [2] there, [4, 4] here" in err
    err = _fails(capsys, "digits_hideprompt", "--trained_original_model", str(runs / "wtp"), "--output_dir",
                 str(tmp_path / "c"), *FAST)
    assert "not a stage-1 (task-identity) checkpoint of HiDe-Prompt or HiDe-LoRA, which HiDe-Prompt reads" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_stage_flags_resolve_and_contradictions_fail():
    assert parse_args(["digits_hideprompt"]).stage == "both"
    assert parse_args(["digits_hideprompt", "--train_inference_task_only"]).stage == "tii"
    assert parse_args(["digits_hideprompt", "--trained_original_model", "x"]).stage == "wtp"
    assert parse_args(["cifar100_hideprompt_5e"]).subcommand == "cifar100_hideprompt"
    for bad in (["--train_inference_task_only", "--trained_original_model", "x"], ["--stage", "wtp"],
                ["--stage", "tii", "--tii_epochs", "3"], ["--stage", "both", "--trained_original_model", "x"]):
        with pytest.raises(UserError):
            parse_args(["digits_hideprompt", *bad])


def test_presets_follow_the_reference_configs_and_scripts():
    # a bare subcommand is the paper's stage 2 (the settings of the reference's training script)
    c100 = parse_args(["cifar100_hideprompt"])
    assert (c100.original_model_mlp_structure, c100.e_prompt_layer_idx, c100.length, c100.size, c100.prompt_momentum,
            c100.reg, c100.larger_prompt_lr, c100.epochs, c100.sched, c100.ca_storage_efficient_method,
            c100.n_centroids, c100.crct_epochs, c100.ca_lr) == ((2,), (0, 1, 2, 3, 4), 5, 10, 0.01, 0.1, True, 50,
                                                                "step", "multi-centroid", 10, 30, 0.005)
    # and its stage-1 launch the paper's stage 1
    stage1 = parse_args(["cifar100_hideprompt", "--train_inference_task_only"])
    assert (stage1.stage, stage1.epochs, stage1.lr, stage1.sched) == ("tii", 20, 0.0005, "constant")
    five = parse_args(["five_datasets_hideprompt"])
    assert (five.original_model_mlp_structure, five.size, five.length, five.reg, five.batch_size, five.clip_grad) == (
        (4, 4), 5, 40, 0.1, 32, 2.0)


def test_larger_prompt_lr_lowers_the_head_lr_as_the_reference(tmp_path):
    from datasets import build_scenario
    from models import create_method
    cfg = parse_args(["digits_hideprompt", "--device", "cpu", "--larger_prompt_lr", "--num_tasks", "2"])
    method = create_method(cfg, build_scenario(10, 2, False, 0, "digits"))
    method.set_phase("wtp")
    groups = method.begin_task(0)
    assert groups[0]["params"] == [method.e_prompt.prompt] and "lr" not in groups[0]
    assert groups[1]["lr"] == pytest.approx(cfg.effective_lr * 0.1)
    assert {id(p) for p in groups[1]["params"]} == {id(method.head.weight), id(method.head.bias)}


@pytest.mark.slow
@pytest.mark.distributed
def test_both_stages_under_two_gloo_processes_match_one_process(runs, tmp_path):
    out = tmp_path / "ddp"
    result = run_cli(["digits_hideprompt", "--output_dir", str(out), *FAST, "--tii_epochs", "1", "--tii_lr", "0.01"],
                     nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = read_json(out / "results.json")
    assert results["completed_tasks"] == 2 and results["final"]["test_images"] == 540
    assert all(0 <= a <= 100 for a in results["final"]["tii_acc"])


@pytest.mark.parametrize("script, dataset, nproc, seeds", [
    ("train_cifar100_vit.sh", "cifar100", "8", 3), ("train_imr_vit.sh", "imr", "8", 3),
    ("train_cub_vit.sh", "cub", "8", 1), ("train_5datasets_vit.sh", "five_datasets", "4", 3)])
def test_the_reference_scripts_launch_stage_one_then_stage_two_on_its_output(tmp_path, script, dataset, nproc, seeds):
    from conftest import script_commands
    commands = script_commands(script, tmp_path=tmp_path)
    assert len(commands) == 2 * seeds
    configs = [parse_args(argv) for argv in commands]
    stage1, stage2 = configs[:seeds], configs[seeds:]
    assert all(c.stage == "tii" and c.subcommand == f"{dataset}_hideprompt" for c in stage1)
    for first, second in zip(stage1, stage2, strict=True):
        assert second.stage == "wtp" and second.trained_original_model == first.output_dir
        assert first.seed == second.seed and first.output_dir.endswith(f"_multi_centroid_mlp_2_seed{first.seed}")
        assert second.output_dir.endswith(f"_pe_seed{first.seed}") and second.larger_prompt_lr
        assert first.model == second.model == first.original_model == "vit_base_patch16_224.orig_in21k"
    if dataset == "cifar100":
        assert (stage1[0].epochs, stage1[0].lr, stage1[0].sched) == (20, 0.0005, "constant")
        assert (stage2[0].epochs, stage2[0].length, stage2[0].reg, stage2[0].prompt_momentum, stage2[0].sched) == (
            50, 5, 0.1, 0.01, "step")
    if dataset == "five_datasets":
        assert (stage2[0].batch_size, stage2[0].clip_grad, stage2[0].original_model_mlp_structure) == (32, 2.0, (4, 4))


@pytest.mark.slow
def test_five_datasets_gets_statistics_for_every_member(tmp_path):
    # the reference compares raw member labels with offset class ids here and finds no images from task 2 on
    from conftest import TINY
    from test_more_benchmarks import write_fake_five_datasets
    data = tmp_path / "five"
    labels = write_fake_five_datasets(data)
    out = tmp_path / "out"
    assert run_main("five_datasets_hideprompt", "--data-path", str(data), "--output_dir", str(out), *TINY,
                    "--original_model", "vit_tiny_patch16_224", "--epochs", "1", "--tii_epochs", "1",
                    "--crct_epochs", "1", "--batch-size", "4") == 0
    saved = torch.load(out / "checkpoint" / "task5_checkpoint.pth", weights_only=False)["model"]
    members = ["SVHN", "MNIST", "CIFAR10", "notMNIST", "FashionMNIST"]
    for offset, member in enumerate(members):
        raw = {0 if (member == "SVHN" and y == 10) else y for y in labels[member]["train"]}
        expected = sorted(10 * offset + y for y in raw)
        for stats in ("tii_stats", "wtp_stats"):
            present = saved[f"{stats}.present"].any(1).nonzero().flatten().tolist()
            assert [c for c in present if 10 * offset <= c < 10 * offset + 10] == expected, (member, stats)


def test_moco_v3_trains_its_fresh_fc_norm_in_both_stages_as_the_reference():
    # the reference's MoCo v3 model: final norm replaced by a fresh fc_norm; HiDe feeds the un-normalised [CLS] to
    # the TII mapping (which then has no norm of its own) and trains an fc_norm before each head
    from datasets import build_scenario
    from models import create_method
    cfg = parse_args(["digits_hideprompt", "--device", "cpu", "--num_tasks", "2", "--model",
                      "vit_base_patch16_224_mocov3", "--original_model", "vit_base_patch16_224_mocov3"])
    method = create_method(cfg, build_scenario(10, 2, False, 0, "digits"))
    assert isinstance(method.tii.mlp.norm, torch.nn.Identity) and isinstance(method.tii.fc_norm, torch.nn.LayerNorm)
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for phase, expected in (("tii", {"tii.fc_norm.weight", "tii.fc_norm.bias"}),
                            ("wtp", {"wtp_fc_norm.weight", "wtp_fc_norm.bias", "e_prompt.prompt"})):
        method.set_phase(phase)
        groups = method.begin_task(0)
        trainable = {k for k, v in method.named_parameters() if v.requires_grad}
        assert expected <= trainable and not any(k.startswith(("original_vit.", "backbone.")) for k in trainable)
        before = {k: v.detach().clone() for k, v in method.named_parameters() if k in expected}
        optimizer = torch.optim.SGD([p for g in groups for p in g["params"]], lr=1.0)
        loss, _ = method(images, targets, 0)
        loss.backward()
        optimizer.step()
        assert all(not torch.equal(v, dict(method.named_parameters())[k]) for k, v in before.items()), phase
    assert {"wtp_fc_norm.weight", "tii.fc_norm.weight"} <= set(method.checkpoint_state())
    with torch.no_grad():  # the uninstructed feature skips the fresh norm
        vit = method.original_vit
        assert torch.equal(method.uninstructed(images), vit.pool(vit.forward_features(images)))

"""L2P, DualPrompt and S-Prompt++ (one mechanism, three presets) on tiny data."""
import dataclasses

import pytest
import torch

from config.cli import parse_args
from conftest import read_json, run_main
from datasets import build_scenario
from models import create_method


def _method(subcommand: str, *flags: str):
    cfg = parse_args([subcommand, "--device", "cpu", *flags])
    scenario = build_scenario(cfg.num_classes, cfg.num_tasks, False, cfg.seed, cfg.dataset)
    torch.manual_seed(0)
    return create_method(cfg, scenario), cfg


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l2p", "dualprompt", "sprompt"])
def test_prompt_methods_run_end_to_end_and_save_only_what_they_train(tmp_path, method):
    out = tmp_path / method
    assert run_main(f"digits_{method}", "--output_dir", str(out), "--epochs", "1", "--num_tasks", "2",
                    "--device", "cpu") == 0
    results = read_json(out / "results.json")
    assert results["completed_tasks"] == 2 and results["final"]["test_images"] == 540
    saved = torch.load(out / "checkpoint" / "task2_checkpoint.pth", weights_only=False)["model"]
    expected = {"e_prompt.prompt", "e_prompt.key", "head.weight", "head.bias"}
    assert set(saved) == (expected | {"g_prompt"} if method == "dualprompt" else expected)


def test_presets_match_the_reference_table():
    l2p = parse_args(["cifar100_l2p"])
    assert (l2p.e_prompt_layer_idx, l2p.use_prefix_tune_for_e_prompt, l2p.length, l2p.top_k, l2p.use_prompt_mask,
            l2p.batchwise_prompt, l2p.pull_constraint_coeff) == ((0,), False, 5, 4, False, True, 0.1)
    dp = parse_args(["cifar100_dualprompt"])
    assert (dp.use_g_prompt, dp.g_prompt_layer_idx, dp.e_prompt_layer_idx, dp.length, dp.top_k,
            dp.use_prompt_mask, dp.shared_prompt_pool, dp.batchwise_prompt) == (
        True, (0, 1), (2, 3, 4), 20, 1, True, True, False)
    sp = parse_args(["cifar100_sprompt"])
    assert (sp.use_g_prompt, sp.e_prompt_layer_idx, sp.batchwise_prompt) == (False, (0, 1, 2, 3, 4), True)
    assert sp.batchwise_prompt_eval is False  # per-sample selection at test time unless asked


def test_a_training_step_moves_prompts_keys_and_head_but_never_the_backbone():
    method, cfg = _method("digits_dualprompt", "--lr", "1.0")
    frozen = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    trained = {k: v.detach().clone() for k, v in method.named_parameters() if v.requires_grad}
    assert set(trained) == {"e_prompt.prompt", "e_prompt.key", "g_prompt", "head.weight", "head.bias"}
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1.0)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    loss, logits = method(images, targets, 0)
    loss.backward()
    optimizer.step()
    assert logits.shape == (4, 10)
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in frozen.items())
    changed = {k for k, v in method.named_parameters() if v.requires_grad and not torch.equal(v, trained[k])}
    assert changed == set(trained)
    # task 0 trains slot 0 only: every other slot of the pool is untouched
    assert torch.equal(method.e_prompt.prompt[:, :, 1:], trained["e_prompt.prompt"][:, :, 1:])


def test_the_query_model_runs_once_per_image_in_training_and_at_test():
    method, _ = _method("digits_sprompt")
    calls = []
    method.query_model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    method(images, targets, 0)
    assert calls == [4]
    method.predict(images)
    assert calls == [4, 4]


def _count_query_images(monkeypatch) -> list[int]:
    """Patch method creation so that every batch through the frozen query model is recorded (its size)."""
    import main
    calls: list[int] = []
    create = main.create_method

    def counting_create(cfg, scenario):
        method = create(cfg, scenario)
        method.query_model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        return method

    monkeypatch.setattr(main, "create_method", counting_create)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("flags, train_passes", [([], 1), (["--pull_constraint", "False"], 0)])
def test_a_run_puts_each_image_through_the_query_model_at_most_once(tmp_path, monkeypatch, flags, train_passes):
    # 2 tasks x 1 epoch over Split Digits: 1257 training and 540 test images. The test features are cached, so
    # task 1's test images are not recomputed after task 2; with the prompt mask and no pull constraint the
    # query has no use in training and is not computed there at all.
    calls = _count_query_images(monkeypatch)
    out = tmp_path / "run"
    assert run_main("digits_dualprompt", "--output_dir", str(out), "--epochs", "1", "--num_tasks", "2",
                    "--device", "cpu", *flags) == 0
    assert sum(calls) == 1257 * train_passes + 540
    calls.clear()
    assert run_main("digits_dualprompt", "--output_dir", str(out), "--num_tasks", "2", "--device", "cpu",
                    "--eval", *flags) == 0
    assert sum(calls) == 540  # both checkpoints re-evaluated, each test image through the query model once
    assert read_json(out / "eval_results.json")["acc_matrix"] == read_json(out / "results.json")["acc_matrix"]


def test_test_time_selection_is_per_sample_unless_the_vote_is_asked_for():
    method, _ = _method("digits_sprompt")
    with torch.no_grad():
        method.e_prompt.key.zero_()
        method.e_prompt.key[0, 0] = method.e_prompt.key[1, 1] = 1.0
    features = {}

    def fake_query(images, batch_key=None):  # sample 0 matches key 0, samples 1-2 match key 1
        return torch.eye(192)[[0, 1, 1]]

    def fake_features(images, idx):
        features["idx"] = idx
        return torch.zeros(3, 192)

    method._query = fake_query
    method._features = fake_features
    method.predict(torch.randn(3, 3, 32, 32))
    assert features["idx"].tolist() == [[0], [1], [1]]
    method.prompts = dataclasses.replace(method.prompts, batchwise_prompt_eval=True)
    features.clear()
    method.predict(torch.randn(3, 3, 32, 32))
    assert features["idx"].tolist() == [[1], [1], [1]]


def test_prompt_flags_warn_on_baselines_and_contradictions_fail():
    assert parse_args(["digits_linear", "--top_k", "2", "--original_model", "x"]).no_effect_flags == (
        "original_model", "top_k",)
    assert parse_args(["digits_l2p", "--top_k", "2"]).no_effect_flags == ()
    from utils import UserError
    with pytest.raises(UserError, match="--size 3 < 5 tasks"):
        _method("digits_dualprompt", "--size", "3")


@pytest.mark.slow
def test_new_benchmarks_run_end_to_end_with_prompt_methods(tmp_path):
    from conftest import TINY
    from test_more_benchmarks import write_fake_five_datasets, write_fake_imagenet_r

    tiny = [*TINY, "--original_model", "vit_tiny_patch16_224", "--epochs", "1", "--batch-size", "8"]
    imr = write_fake_imagenet_r(tmp_path / "imr")
    out = tmp_path / "imr_out"
    # the reference's config name (`*_sprompt_5e`) is an alias
    assert run_main("imr_sprompt_5e", "--data-path", str(imr), "--output_dir", str(out), "--num_tasks", "1",
                    *tiny) == 0
    assert read_json(out / "results.json")["subcommand"] == "imr_sprompt"
    five = tmp_path / "five"
    write_fake_five_datasets(five)
    out = tmp_path / "five_out"
    assert run_main("five_datasets_l2p", "--data-path", str(five), "--output_dir", str(out), *tiny) == 0
    results = read_json(out / "results.json")
    assert results["completed_tasks"] == 5
    assert results["task_classes"][1] == list(range(10, 20))  # MNIST's labels, offset by 10


# The reference README's command lines for these methods, as `main.py` receives them under
# `python -m torch.distributed.launch --nproc_per_node=8 --master_port='29503' --use_env main.py ...`
REFERENCE_COMMANDS = {
    "cifar100_l2p": "cifar100_l2p --model vit_base_patch16_224 --original_model vit_base_patch16_224 --batch-size 24 "
                    "--data-path ./datasets --output_dir ./output --seed 42 --epochs 5",
    "cifar100_sprompt": "cifar100_sprompt_5e --model vit_base_patch16_224 --original_model vit_base_patch16_224 "
                        "--batch-size 24 --data-path ./datasets --output_dir ./output --seed 42 --epochs 40",
    "cifar100_dualprompt": "cifar100_dualprompt --model vit_base_patch16_224 --original_model vit_base_patch16_224 "
                           "--batch-size 24 --data-path ./datasets --output_dir ./output --seed 42 --epochs 40",
}


@pytest.mark.parametrize("subcommand", sorted(REFERENCE_COMMANDS))
def test_the_reference_readme_command_lines_parse(subcommand):
    cfg = parse_args(REFERENCE_COMMANDS[subcommand].split())
    assert (cfg.subcommand, cfg.batch_size, cfg.data_path, cfg.seed) == (subcommand, 24, "./datasets", 42)
    assert cfg.epochs == (5 if subcommand == "cifar100_l2p" else 40) and cfg.no_effect_flags == ()


@pytest.mark.slow
def test_every_flag_of_the_reference_prompt_configs_parses_and_the_unread_ones_warn_once(tmp_path, capsys):
    # the flags of configs/{cifar100,imr,cub,five_datasets}_{l2p,dualprompt,sprompt_5e}.py with values as written
    # there; those this suite has no use for warn once each, before anything runs
    reference_only = ["--prompt_pool", "True", "--prompt_key_init", "uniform", "--embedding_key", "cls",
                      "--same_key_value", "False", "--head_type", "token", "--world_size", "8",
                      "--freeze", "blocks", "patch_embed", "cls_token", "norm", "pos_embed", "--initializer",
                      "uniform", "--predefined_key", "", "--global_pool", "token", "--separated_head", "False",
                      "--color-jitter", "0.4", "--aa", "rand-m9-mstd0.5-inc1", "--smoothing", "0.1",
                      "--train-interpolation", "bicubic", "--reprob", "0.0", "--remode", "pixel", "--recount", "1"]
    read = ["--use_g_prompt", "--g_prompt_length", "5", "--g_prompt_layer_idx", "0", "1",
            "--use_prefix_tune_for_g_prompt", "--use_e_prompt", "--e_prompt_layer_idx", "2", "3", "4",
            "--use_prefix_tune_for_e_prompt", "--size", "10", "--length", "5", "--top_k", "1", "--prompt_key",
            "--use_prompt_mask", "--shared_prompt_pool", "--shared_prompt_key", "False", "--batchwise_prompt",
            "False", "--pull_constraint", "--pull_constraint_coeff", "1.0", "--dataset", "Split-Digits",
            "--num_tasks", "5", "--train_mask", "True", "--task_inc", "False", "--pin-mem", "--dist_url", "env://",
            "--sched", "constant", "--opt", "adam", "--opt-eps", "1e-8", "--opt-betas", "0.9", "0.999",
            "--momentum", "0.9", "--weight-decay", "0.0", "--clip-grad", "1.0", "--reinit_optimizer", "True",
            "--warmup-lr", "1e-6", "--min-lr", "1e-5", "--decay-epochs", "30", "--warmup-epochs", "5",
            "--cooldown-epochs", "10", "--patience-epochs", "10", "--decay-rate", "0.1", "--unscale_lr", "True",
            "--drop", "0.0", "--drop-path", "0.0", "--shuffle", "False", "--print_freq", "10"]
    out = tmp_path / "run"
    assert run_main("digits_dualprompt", *read, *reference_only, "--output_dir", str(out), "--epochs", "0",
                    "--device", "cpu") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "has no effect" in line]
    expected = ["aa", "color_jitter", "embedding_key", "freeze", "global_pool", "head_type", "initializer",
                "predefined_key", "prompt_key_init", "prompt_pool", "recount", "remode", "reprob", "same_key_value",
                "separated_head", "smoothing", "train_interpolation", "world_size"]
    assert len(warnings) == len(expected) and all(f"--{flag} " in w for flag, w in zip(expected, warnings, strict=True))
    assert read_json(out / "results.json")["completed_tasks"] == 5


@pytest.mark.parametrize("dataset", ["cifar100", "imr", "cub", "five_datasets"])
def test_the_training_script_launches_each_method_with_the_reference_settings(tmp_path, dataset):
    from conftest import script_commands
    commands = script_commands("train_prompt_methods.sh", dataset, tmp_path=tmp_path,
                               env={"NPROC": "2", "DATA_PATH": "/data", "SEEDS": "42 40"})
    assert [c[0] for c in commands] == [f"{dataset}_{m}" for m in ("l2p", "sprompt", "dualprompt")] * 2
    for argv in commands:
        cfg = parse_args(argv)
        assert (cfg.data_path, cfg.model, cfg.original_model) == ("/data", *["vit_base_patch16_224.orig_in21k"] * 2)
        reference_epochs = {"cifar100": {"l2p": 5, "sprompt": 40, "dualprompt": 40}}.get(dataset)
        expected_epochs = reference_epochs[cfg.method] if reference_epochs else (50 if dataset == "imr" else 5)
        assert cfg.epochs == expected_epochs
        assert cfg.batch_size == (16 if dataset == "five_datasets" else 24)
        assert cfg.lr == (0.005 if dataset == "imr" else 0.03)
        assert cfg.output_dir == f"./output/{dataset}_vit_{cfg.method}_seed{cfg.seed}"

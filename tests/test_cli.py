import argparse
import json

import pytest

from config.cli import parse_args, str2bool, subcommands
from config.presets import preset_values
from conftest import TINY, run_cli, run_main
from utils import UserError


def test_booleans_parse_as_switches_and_with_explicit_values():
    assert parse_args(["digits_linear"]).train_mask is True
    assert parse_args(["digits_linear", "--train_mask", "False"]).train_mask is False
    assert parse_args(["digits_linear", "--train_mask", "false", "--shuffle"]).shuffle is True
    assert parse_args(["digits_linear", "--shuffle", "0"]).shuffle is False
    assert parse_args(["digits_linear", "--pretrained", "no"]).pretrained is False
    assert parse_args(["digits_linear", "--unscale_lr=False"]).unscale_lr is False
    with pytest.raises(argparse.ArgumentTypeError, match="expected a boolean"):
        str2bool("maybe")


def test_local_rank_from_either_launcher_style():
    # torch.distributed.launch without --use_env puts --local-rank=N before the script's own arguments
    assert parse_args(["--local-rank=1", "digits_linear"]).local_rank == 1
    assert parse_args(["digits_linear", "--local_rank", "0"]).local_rank == 0
    assert parse_args(["digits_linear", "--local-rank=3"]).local_rank == 3


def test_presets_layer_dataset_method_pair_and_command_line():
    cfg = parse_args(["cifar100_linear"])
    assert (cfg.dataset, cfg.num_tasks, cfg.batch_size, cfg.lr, cfg.model) == (
        "Split-CIFAR100", 10, 24, 0.03, "vit_base_patch16_224.orig_in21k")
    assert parse_args(["cifar100_finetune"]).lr == preset_values({"method": "finetune"})["lr"] == 0.001
    assert parse_args(["digits_linear"]).lr == 0.3  # the (digits, linear) cell
    assert parse_args(["digits_linear", "--lr", "0.5"]).lr == 0.5
    assert parse_args(["cifar100_ncm", "--epochs", "3"]).epochs == 0  # nothing to train


def test_effective_lr_and_global_batch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "16")  # a plain process inside an allocation runs alone
    assert parse_args(["cifar100_linear"]).global_batch_size == 24
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")  # srun's 16 tasks
    assert parse_args(["cifar100_linear"]).global_batch_size == 384
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun's
    cfg = parse_args(["cifar100_linear"])
    assert cfg.global_batch_size == 192 and cfg.effective_lr == pytest.approx(0.03 * 24 / 256)
    cfg = parse_args(["cifar100_linear", "--unscale_lr", "False"])
    assert cfg.effective_lr == pytest.approx(0.03 * 192 / 256)


def test_reference_spellings_and_no_effect_flags():
    cfg = parse_args(["cifar100_linear", "--weight_decay", "0.1", "--clip-grad", "2", "--smoothing", "0.1",
                      "--no-pin-mem", "--decay-rate", "0.5"])
    assert (cfg.weight_decay, cfg.clip_grad, cfg.pin_mem, cfg.decay_rate) == (0.1, 2.0, False, 0.5)
    assert cfg.no_effect_flags == ("smoothing",)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in subcommands()) and "cifar100_l" in out


def test_unknown_subcommand_fails_with_the_closest_names(capsys):
    assert run_main("cifar100_nope") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: unknown subcommand cifar100_nope; did you mean cifar100_ncm or cifar100_l2p or "
                   "cifar100_linear?")


def test_print_config_is_a_dry_run(tmp_path, capsys):
    out_dir = tmp_path / "never"
    assert run_main("cifar100_linear", "--data-path", str(tmp_path / "nodata"), "--output_dir", str(out_dir),
                    "--print_config", "--lr", "0.01") == 0
    config = json.loads(capsys.readouterr().out)
    assert config["optim"]["lr"] == 0.01 and config["method"] == "linear"
    assert config["data"]["dataset"] == "Split-CIFAR100"
    assert not out_dir.exists() and not (tmp_path / "nodata").exists()


def _fails_with_one_line(capsys, *args) -> str:
    assert run_main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_contradicting_flags(capsys, tmp_path):
    assert "contradict" in _fails_with_one_line(capsys, "digits_linear", "--eval", "--resume")
    assert "drop --num_tasks 5" in _fails_with_one_line(capsys, "digits_joint", "--num_tasks", "5")


def test_errors_name_the_problem_and_write_nothing(capsys, tmp_path, monkeypatch):
    out = tmp_path / "out"
    common = ["--output_dir", str(out)]
    err = _fails_with_one_line(capsys, "digits_linear", *common, "--model", "vit_tiny_patch17_224")
    assert "unknown --model 'vit_tiny_patch17_224'" in err and "vit_tiny_patch16_224" in err
    err = _fails_with_one_line(capsys, "digits_linear", *common, "--num_tasks", "3")
    assert "--num_tasks 3" in err and "[1, 2, 5, 10]" in err
    # missing data (the download is made to fail as it does offline)
    import torchvision.datasets.utils as tv_utils
    monkeypatch.setattr(tv_utils, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    err = _fails_with_one_line(capsys, "cifar100_linear", *common, *TINY, "--data-path", str(tmp_path / "d"))
    assert "CIFAR-100 not found in" in err and str(tmp_path / "d") in err
    assert not out.exists()
    # a file where the output folder should go
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _fails_with_one_line(capsys, "digits_linear", "--output_dir", str(blocker / "out"))
    assert "not writable" in err
    # --eval with no checkpoints
    err = _fails_with_one_line(capsys, "digits_linear", "--eval", *common)
    assert "--eval needs the checkpoint of every task" in err and "task1_checkpoint.pth" in err
    assert not out.exists()
    # a folder holding a run is never overwritten
    out.mkdir()
    (out / "results.json").write_text("{}")
    err = _fails_with_one_line(capsys, "digits_linear", *common)
    assert f"--output_dir {out} holds a run; pass --resume to continue it, or choose another folder, e.g. " \
           f"output/digits_linear_seed42" in err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"] and (out / "results.json").read_text() == "{}"


def test_optimizer_and_scheduler_follow_the_reference():
    import torch

    from engine import create_optimizer, create_scheduler
    cfg = parse_args(["cifar100_linear", "--sched", "step", "--decay-epochs", "1", "--warmup-epochs", "0",
                      "--epochs", "3"])
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = create_optimizer([{"params": [param]}], cfg)
    assert type(optimizer).__name__ == "Adam" and optimizer.defaults["eps"] == 1e-8
    lr = 0.03 * 24 / 256
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    scheduler = create_scheduler(optimizer, cfg)
    scheduler.step(0)  # after epoch 0: the LR of epoch 1 is the schedule at t=0 (the reference's one-epoch lag)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    scheduler.step(1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.1)
    assert create_scheduler(optimizer, parse_args(["cifar100_linear"])) is None  # constant: no scheduler
    with pytest.raises(UserError, match="unknown --sched 'wobble'; use one of constant, step, cosine"):
        parse_args(["cifar100_linear", "--sched", "wobble"])
    with pytest.raises(UserError, match="unknown --opt 'adamm'"):
        parse_args(["cifar100_linear", "--opt", "adamm"])


def test_the_baselines_script_launches_every_baseline_per_seed(tmp_path):
    from conftest import script_commands
    commands = script_commands("train_cifar100_baselines.sh", tmp_path=tmp_path, env={"SEEDS": "1"})
    assert [c[0] for c in commands] == [f"cifar100_{m}" for m in ("ncm", "linear", "fix", "finetune", "joint")]
    assert all(parse_args(c).output_dir == f"./output/{c[0]}_seed1" for c in commands)


# --- --original_model follows --model ------------------------------------------------------------------------------
SMALL, SMALL_PINNED = "vit_small_patch16_224", "vit_small_patch16_224.augreg_in21k_ft_in1k"
DINO, SUP21K = "vit_base_patch16_224.dino", "vit_base_patch16_224.orig_in21k"


def _printed_config(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert run_main(*args, "--print_config") == 0
    return json.loads(capsys.readouterr().out)


def test_every_query_or_task_identity_model_follows_model(capsys, tmp_path):
    from config.settings import QueryModelSettings
    from models import METHODS
    with_query = sorted(m for m, cls in METHODS.items() if QueryModelSettings in cls.settings_groups)
    assert with_query == ["dualprompt", "hidelora", "hideprompt", "l2p", "sprompt"]
    weights = str(tmp_path / "w.pth")  # never read by --print_config
    for method in with_query:  # digits' presets set both models to the tiny ViT
        config = _printed_config(capsys, f"digits_{method}", "--model", SMALL, "--pretrained_checkpoint", weights)
        assert config["query"] == {"original_model": SMALL, "original_model_checkpoint": weights}, method
        assert (config["context"]["backbone"], config["context"]["original_backbone"]) == (SMALL_PINNED, SMALL_PINNED)
    for method in ("continual_lora", "few_shot_lora", "linear"):  # no second model: nothing to follow
        config = _printed_config(capsys, f"digits_{method}", "--model", SMALL)
        assert "query" not in config and config["context"]["original_backbone"] is None
    assert not any(tmp_path.iterdir())


def test_the_backbone_swap_of_the_entry_point_moves_the_task_identity_model_too():
    done = run_cli(["cifar100_hideprompt", "--model", "vit_base_patch16_224_dino", "--print_config"])
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert config["query"]["original_model"] == config["backbone"]["model"] == "vit_base_patch16_224_dino"
    assert config["context"]["backbone"] == config["context"]["original_backbone"] == DINO
    assert config["hideprompt"]["prompt_momentum"] == 0.1  # and the self-supervised preset rows apply


def test_an_explicit_original_model_always_wins(capsys, tmp_path):
    weights = str(tmp_path / "w.pth")
    config = _printed_config(capsys, "cifar100_hideprompt", "--model", "vit_base_patch16_224_dino",
                             "--original_model", "vit_base_patch16_224", "--pretrained_checkpoint", weights)
    assert config["query"] == {"original_model": "vit_base_patch16_224", "original_model_checkpoint": None}
    assert (config["context"]["backbone"], config["context"]["original_backbone"]) == (DINO, SUP21K)
    assert config["context"]["explicit_flags"] == ["model", "original_model", "pretrained_checkpoint", "print_config"]
    config = _printed_config(capsys, "digits_l2p", "--original_model", SMALL)  # the preset's --model stays
    assert (config["backbone"]["model"], config["query"]["original_model"]) == ("vit_tiny_patch16_224", SMALL)
    config = _printed_config(capsys, "digits_l2p", "--model", SMALL, "--pretrained_checkpoint", weights,
                             "--original_model_checkpoint", str(tmp_path / "q.pth"))
    assert config["query"] == {"original_model": SMALL, "original_model_checkpoint": str(tmp_path / "q.pth")}


def test_a_preset_original_model_apart_from_the_presets_model_stays(capsys, monkeypatch):
    from config import presets
    monkeypatch.setattr(presets, "PRESETS", [*presets.PRESETS, presets._p("digits", "l2p", original_model=SMALL)])
    config = _printed_config(capsys, "digits_l2p", "--model", "vit_base_patch16_224_dino")
    assert (config["context"]["backbone"], config["context"]["original_backbone"]) == (DINO, SMALL_PINNED)
    assert _printed_config(capsys, "digits_dualprompt", "--model", SMALL)["query"]["original_model"] == SMALL


def test_a_run_started_before_original_model_followed_model_compares_by_what_it_recorded(tmp_path):
    from config.resolved import config_to_dict
    from run_files import check_same_experiment
    # what `--model <dino>` resolved to before: the Sup-21K task-identity model, recorded in its config.json
    before = config_to_dict(parse_args(["cifar100_hideprompt", "--model", DINO, "--original_model", SUP21K]))
    assert before["context"]["original_backbone"] == SUP21K
    with pytest.raises(UserError, match=f"original_backbone: '{SUP21K}' there, '{DINO}' here"):
        check_same_experiment(before, parse_args(["cifar100_hideprompt", "--model", DINO]), tmp_path)
    check_same_experiment(before, parse_args(["cifar100_hideprompt", "--model", DINO, "--original_model",
                                              "vit_base_patch16_224"]), tmp_path)  # the alias: the same backbone
    default = config_to_dict(parse_args(["cifar100_l2p"]))  # no --model: nothing moved
    check_same_experiment(default, parse_args(["cifar100_l2p"]), tmp_path)


# --- help and one-line errors --------------------------------------------------------------------------------------
def _help(capsys, *args: str) -> list[str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        parse_args([*args])
    assert done.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_method_help_is_one_line_per_flag_it_reads_with_this_subcommands_defaults(capsys):
    from dataclasses import fields

    from config.cli import method_groups
    from config.settings import COMMON_GROUPS
    lines = _help(capsys, "cifar100_hideprompt", "--help")
    assert lines[0] == "usage: main.py cifar100_hideprompt [flags]"
    groups = [*COMMON_GROUPS, *method_groups("hideprompt")]
    flags = sum(len(fields(g)) for g in groups)
    assert (len(groups), flags) == (12, 89)
    # 2 header lines, a blank and a title per group, one line per flag, a blank and 2 footer lines: 118 today; the
    # method that reads the most flags stays under 120 (the reference's parser printed 335 lines for it)
    assert len(lines) == 2 + 2 * len(groups) + flags + 3 < 120
    assert "  --epochs INT  (default: 50)  epochs per task" in lines
    assert "  --epochs INT  (default: 5)  epochs per task" in _help(capsys, "cifar100_l2p", "--help")
    assert "  --epochs INT  (default: 40)  epochs per task" in _help(capsys, "cifar100_dualprompt", "--help")
    assert "  --epochs INT  (default: 20)  epochs per task" in _help(capsys, "cifar100_hideprompt",
                                                                      "--train_inference_task_only", "--help")
    shown = [line for line in _help(capsys, "digits_l2p", "--model", SMALL, "--help") if "--original_model STR" in line]
    assert shown[0].startswith(f"  --original_model STR  (default: {SMALL})  query / task-identity model; follows")
    for method in ("linear", "l2p", "continual_lora", "hidelora", "few_shot_lora"):
        assert len(_help(capsys, f"digits_{method}", "--help")) < len(lines)
    every = _help(capsys, "cifar100_hideprompt", "--help-all")
    assert len(every) > len(lines) and "  --lora_rank INT  (default: 4)  rank r of the key and value updates" in every


def test_method_help_wraps_to_a_terminal(capsys, monkeypatch):
    import sys
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    lines = _help(capsys, "cifar100_hideprompt", "--help")
    assert max(map(len, lines)) <= 79 and len(lines) > 118
    at = lines.index("  --dist_timeout FLOAT  (default: 30.0)  minutes a process waits for the others")
    assert lines[at + 1] == "      in a collective before the run stops (a dead or hung process ends the run"


def test_top_level_help_lists_the_subcommands_by_dataset(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    lines = _help(capsys, "--help")
    methods = "finetune fix linear ncm joint l2p dualprompt sprompt hideprompt continual_lora hidelora"
    assert f"  {'cifar100:':<18}{' '.join(f'cifar100_{m}' for m in methods.split())}" in lines
    assert f"  {'imr:':<18}{' '.join(f'imr_{m}' for m in methods.split())} imr_few_shot_lora" in lines
    assert f"  {'cub_cars:':<18}cub_cars_few_shot_lora" in lines
    monkeypatch.setenv("COLUMNS", "81")
    lines = _help(capsys, "--help")
    assert max(map(len, lines)) <= 80
    start = lines.index("subcommands, by dataset:") + 1
    listed = " ".join(lines[start:lines.index("", start)]).split()
    assert sorted(n for n in listed if not n.endswith(":")) == sorted(subcommands())  # each once, all of them
    assert len(lines) < 60  # 9 benchmarks (4 of them streams) with their methods, wrapped at 80 columns


def test_a_mistyped_flag_or_subcommand_is_one_line_with_the_closest_name(capsys, tmp_path):
    def fails(*args: str) -> str:
        capsys.readouterr()
        assert run_main(*args, "--output_dir", str(tmp_path / "out"), "--data-path", str(tmp_path / "data")) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1
        return err.strip()

    assert fails("cifar100_hideprompt", "--epoch", "3") == "error: unrecognized flag --epoch; did you mean --epochs?"
    assert fails("cifar100_hideprompt", "--lora_rnak=3") == ("error: unrecognized flag --lora_rnak; did you mean "
                                                             "--lora_rank?")
    assert fails("cifar100_l2p", "--zzzz") == ("error: unrecognized flag --zzzz; `python main.py cifar100_l2p --help` "
                                              "lists the flags")
    assert fails("cifar100_hidepromt") == ("error: unknown subcommand cifar100_hidepromt; did you mean "
                                           "cifar100_hideprompt?")
    assert fails("cifar100_hidepromt", "--help") == ("error: unknown subcommand cifar100_hidepromt; did you mean "
                                                     "cifar100_hideprompt?")
    assert fails("foo") == "error: unknown subcommand foo; `python main.py --help` lists the subcommands"
    assert fails() == "error: no subcommand given (e.g. python main.py digits_l2p); `python main.py --help` lists them"
    assert not any(tmp_path.iterdir())

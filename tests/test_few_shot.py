"""Few-shot LoRA: the upstream data and scenario, the episodes, the interval, the three-part flow on Split
Digits, ImageNet-R and Cars + CUB fake trees (one process and two), the reference's command lines and script."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

import metrics
from config.cli import parse_args, subcommands
from conftest import TINY, read_json, run_cli, run_main, script_commands
from datasets.base import Benchmark, TransformedDataset
from datasets.cub import load_cub200
from datasets.few_shot import EpisodeSampler, build_upstream_scenario, check_class_split, upstream_benchmark
from models.vit import create_backbone
from test_hideprompt import _fails
from test_more_benchmarks import write_fake_cars, write_fake_cub, write_fake_imagenet_r
from utils import UserError, seed_everything

DIGITS_FS = ["--num_episodes", "4", "--epochs", "1", "--num_fs_epochs", "5"]
RESULTS = "few_shot_shared_Split-Digits_4way_5shot.json"


def _member(name: str, num_classes: int, train: list[int], test: list[int]) -> Benchmark:
    def split(targets: list[int], base: int) -> TransformedDataset:
        return TransformedDataset(lambda i: torch.tensor([float(base + i)]), np.array(targets), None)
    return Benchmark(name=name, num_classes=num_classes, train=split(train, 0), train_eval=split(train, 0),
                     test=split(test, 1000), train_targets=np.array(train), test_targets=np.array(test))


def test_episode_summary_is_the_interval_of_the_mean():
    summary = metrics.episode_summary([50.0, 60.0, 70.0, 80.0])
    # mean 65; sample std sqrt((15^2 + 5^2 + 5^2 + 15^2) / 3) = sqrt(500 / 3); 1.96 s / sqrt(4)
    assert summary["mean_acc"] == pytest.approx(65.0)
    assert summary["std_acc"] == pytest.approx(math.sqrt(500 / 3))
    assert summary["ci95"] == pytest.approx(1.96 * math.sqrt(500 / 3) / 2)
    assert summary["reference_interval"] == pytest.approx(1.96 * math.sqrt(125))  # population std, no sqrt(n)
    single = metrics.episode_summary([70.0])
    assert single["mean_acc"] == 70.0 and single["ci95"] is None and single["episodes"] == 1


def test_upstream_benchmark_relabels_each_dataset_after_the_previous_ones():
    first = _member("A", 5, train=[0, 1, 2, 3, 4, 0, 1], test=[1, 4, 0])
    second = _member("B", 4, train=[3, 0, 1, 2, 2], test=[2, 3, 0])
    bench = upstream_benchmark([first, second], continual=[2, 3])
    # A keeps labels 0, 1; B's 0, 1, 2 become 2, 3, 4; few-shot labels (A 2..4, B 3) are left out
    assert bench.num_classes == 5 and bench.name == "A+B"
    assert bench.train_targets.tolist() == [0, 1, 0, 1, 2, 3, 4, 4]
    assert bench.test_targets.tolist() == [1, 0, 4, 2]
    assert [bench.train[i] for i in range(len(bench.train))] == [
        (torch.tensor([0.0]), 0), (torch.tensor([1.0]), 1), (torch.tensor([5.0]), 0), (torch.tensor([6.0]), 1),
        (torch.tensor([1.0]), 2), (torch.tensor([2.0]), 3), (torch.tensor([3.0]), 4), (torch.tensor([4.0]), 4)]
    assert bench.test[3] == (torch.tensor([1002.0]), 2)  # B's test item 2 (label 0) -> 2
    scenario = build_upstream_scenario([2, 3], [1, 3], False, 0, ["A", "B"])
    assert scenario.task_classes == [[0, 1], [2], [3], [4]] and scenario.task_datasets == [0, 1, 1, 1]
    assert scenario.num_classes == 5
    with pytest.raises(UserError, match="fewer than the 4 continual"):
        check_class_split(first, 4, 2)
    with pytest.raises(UserError, match="does not split"):
        build_upstream_scenario([2, 3], [1, 2], False, 0, ["A", "B"])


def test_episodes_depend_on_seed_and_index_only():
    member = _member("A", 6, train=[4, 5, 4, 3, 5, 4, 5, 3, 4, 5], test=[4, 4, 5, 3, 5, 5, 4])
    sampler = EpisodeSampler(member, [3, 4, 5], num_ways=2, num_shots=2, num_queries=2, seed=7)
    episodes = [sampler.episode(e) for e in range(6)]
    for episode in episodes:
        assert len(episode.classes) == 2 and episode.classes == sorted(episode.classes)
        assert set(episode.classes) <= {3, 4, 5}
        assert member.train_targets[episode.support].tolist() == [c for c in episode.classes for _ in range(2)]
        assert len(set(episode.support.tolist())) == 4  # without replacement
        queries = member.test_targets[episode.query].tolist()
        assert queries == [c for c in episode.classes for _ in range(min(2, (member.test_targets == c).sum()))]
    again = EpisodeSampler(member, [3, 4, 5], num_ways=2, num_shots=2, num_queries=2, seed=7)
    for e in (5, 0, 3):  # any order
        assert np.array_equal(again.episode(e).support, episodes[e].support)
        assert np.array_equal(again.episode(e).query, episodes[e].query)
    assert len({tuple(ep.support.tolist()) for ep in episodes}) > 1
    with pytest.raises(UserError, match="class 3 of A has 2 training"):
        EpisodeSampler(member, [3, 4, 5], num_ways=2, num_shots=3, num_queries=2, seed=7)


def test_subcommands_flags_and_contradictions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output_dir depends on what ./output holds
    assert {"imr_few_shot_lora", "cub_cars_few_shot_lora", "digits_few_shot_lora"} <= set(subcommands())
    assert "cub_cars_l2p" not in subcommands() and "cifar100_few_shot_lora" not in subcommands()
    imr = parse_args(["imr_few_shot_lora"])
    assert (imr.datasets, imr.num_tasks, imr.num_classes, imr.few_class_idx) == (
        ("Split-Imagenet-R",), 8, 160, (160, 161, 162, 163, 164))
    # the reference script's settings: 50 upstream epochs at lr 0.01, rank 8; 50 episodes of 50 epochs
    assert (imr.epochs, imr.lr, imr.num_episodes, imr.num_fs_epochs, imr.fs_backbone, imr.fs_lr, imr.clip_grad,
            imr.lora_rank) == (50, 0.01, 50, 50, "shared", 0.001, 2.0, 8)
    assert imr.train_vanilla and imr.train_shared and imr.train_few_shot  # no switch: all three
    assert (imr.vanilla_model_output_dir, imr.shared_model_output_dir) == (
        "output/imr_few_shot_lora_seed42/vanilla_model", "output/imr_few_shot_lora_seed42/shared_model")
    cars = parse_args(["cub_cars_few_shot_lora", "--few_shot_dataset_idx", "1", "--output_dir", "o"])
    assert cars.dataset == "Split-Cars196+Split-CUB200" and cars.num_tasks == 16 and cars.num_classes == 320
    assert cars.few_class_idx == (160, 161, 162, 163, 164) and cars.fs_backbone == "vanilla+shared"
    assert cars.vanilla_model_output_dir == "o/vanilla_model"
    only = parse_args(["imr_few_shot_lora", "--train_shared"])
    assert only.train_shared and not only.train_vanilla and not only.train_few_shot
    for bad, needle in ((["--tasks_per_dataset", "8", "2"], "--tasks_per_dataset has 2 entries"),
                        (["--few_class_idx", "3", "161", "162", "163", "164"], "3 is not a few-shot class"),
                        (["--num_ways", "6", "--few_class_idx", "160", "161", "162", "163", "164"], "--num_ways 6"),
                        (["--num_tasks", "10"], "contradicts --tasks_per_dataset"),
                        (["--dataset", "Split-CUB200"], "not --dataset"),
                        (["--datasets", "Split-Nothing"], "unknown --datasets entry 'Split-Nothing'"),
                        (["--few_shot_dataset_idx", "1"], "--few_shot_dataset_idx 1"),
                        (["--eval"], "--eval re-evaluates the upstream runs"),
                        (["--vanilla_model_output_dir", "x", "--shared_model_output_dir", "x"], "same folder")):
        with pytest.raises(UserError, match=needle.replace("(", r"\(")):
            parse_args(["imr_few_shot_lora", *bad])


def test_the_reference_command_lines_parse_with_their_meaning():
    common = ["imr_few_shot_lora", "--model", "vit_base_patch16_224_21k_ibot", "--original_model",
              "vit_base_patch16_224_21k_ibot", "--batch-size", "24", "--data-path", "./datasets", "--output_dir",
              "./output/", "--seed", "42", "--epochs", "50", "--lr", "0.01", "--lora_type", "hide", "--num_tasks", "8",
              "--vanilla_model_output_dir", "./output/imr_ibot21k_vanilla_model", "--shared_model_output_dir",
              "./output/imr_ibot21k_shared_model", "--lora_rank", "8"]
    vanilla = parse_args([*common, "--fs_backbone", "vanilla", "--train_vanilla"])
    shared = parse_args([*common, "--fs_backbone", "shared", "--train_shared"])
    episodes = parse_args([*common, "--num_fs_epochs", "50", "--num_shots", "5", "--train_few_shot", "--fs_backbone",
                           "shared", "--num_episodes", "50"])
    assert (vanilla.train_vanilla, vanilla.train_shared, vanilla.train_few_shot) == (True, False, False)
    assert (shared.train_vanilla, shared.train_shared, shared.train_few_shot) == (False, True, False)
    assert (episodes.num_fs_epochs, episodes.num_shots, episodes.num_episodes) == (50, 5, 50)
    assert episodes.shared_model_output_dir == "./output/imr_ibot21k_shared_model"
    assert shared.context.backbone == "vit_base_patch16_224.ibot_in22k" and shared.lora_rank == 8
    assert shared.no_effect_flags == ("lora_type", "original_model")  # read by nothing here: warned about


@pytest.mark.slow
@pytest.mark.distributed
def test_digits_flow_resumes_and_gives_the_same_episodes_on_two_processes(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main("digits_few_shot_lora", "--output_dir", str(out), *DIGITS_FS) == 0
    for part in ("vanilla_model", "shared_model"):
        assert [p.name for p in sorted((out / part / "checkpoint").iterdir())] == [
            f"task{t}_checkpoint.pth" for t in (1, 2, 3)]
        assert read_json(out / part / "results.json")["task_classes"] == [[0, 1], [2, 3], [4, 5]]
    shared = torch.load(out / "shared_model" / "checkpoint" / "task3_checkpoint.pth", weights_only=False)
    assert set(shared["model"]) == {"lora.a", "lora.b", "head.weight", "head.bias"}
    assert shared["model"]["lora.a"].shape == (1, 5, 2, 192, 4) and shared["model"]["head.weight"].shape == (6, 192)
    assert shared["config"]["part"] == "shared" and shared["model"]["lora.b"].abs().sum() > 0
    vanilla = torch.load(out / "vanilla_model" / "checkpoint" / "task3_checkpoint.pth", weights_only=False)
    assert set(vanilla["model"]) == {"head.weight", "head.bias"} and vanilla["config"]["part"] == "vanilla"

    record = read_json(out / RESULTS)
    accuracies = [e["accuracy"] for e in record["episodes"]]
    assert [e["episode"] for e in record["episodes"]] == [0, 1, 2, 3]
    assert all(e["classes"] == [6, 7, 8, 9] and e["slot"] == 0 for e in record["episodes"])
    assert record["summary"]["mean_acc"] == pytest.approx(np.mean(accuracies))
    assert record["summary"]["ci95"] == pytest.approx(1.96 * np.std(accuracies, ddof=1) / 2)
    assert all(0 <= a <= 100 and round(a * 120 / 100, 6).is_integer() for a in accuracies)  # 4 x 30 queries
    assert len(set(accuracies)) > 1  # each episode its own draw
    assert "mean accuracy" in capsys.readouterr().out

    # the finished upstream runs are read, not redone; the results file is continued only with --resume
    err = _fails(capsys, "digits_few_shot_lora", "--output_dir", str(out), "--train_few_shot", *DIGITS_FS)
    assert RESULTS in err and "--resume" in err
    assert run_main("digits_few_shot_lora", "--output_dir", str(out), "--train_few_shot", "--resume",
                    *DIGITS_FS[:1], "6", *DIGITS_FS[2:]) == 0
    resumed = [e["accuracy"] for e in read_json(out / RESULTS)["episodes"]]
    assert resumed[:4] == accuracies and len(resumed) == 6

    # the same six episodes spread over two processes, reading the same upstream runs
    two = tmp_path / "two"
    proc = run_cli(["digits_few_shot_lora", "--output_dir", str(two), "--train_few_shot", "--num_episodes", "6",
                    "--num_fs_epochs", "5", "--vanilla_model_output_dir", str(out / "vanilla_model"),
                    "--shared_model_output_dir", str(out / "shared_model"), "--device", "cpu"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [e["accuracy"] for e in read_json(two / RESULTS)["episodes"]] == pytest.approx(resumed, abs=1e-9)


@pytest.mark.slow
@pytest.mark.distributed
def test_shared_model_trains_under_ddp_counting_each_test_image_once(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    flags = ["digits_few_shot_lora", "--train_shared", "--epochs", "1", "--device", "cpu"]
    for out, nproc in ((single, 0), (double, 2)):
        proc = run_cli([*flags, "--output_dir", str(out)], nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (read_json(out / "shared_model" / "results.json") for out in (single, double))
    assert [t["test_images"] for t in two["tasks"]] == [t["test_images"] for t in one["tasks"]]
    assert not (single / "vanilla_model").exists()  # one dataset: nothing to pick a slot for


@pytest.mark.slow
def test_stop_after_task_stops_the_flow_and_resume_finishes_it(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["digits_few_shot_lora", "--output_dir", str(out), "--epochs", "1", "--num_episodes", "2",
             "--num_fs_epochs", "2"]
    assert run_main(*flags, "--stop_after_task", "2") == 0
    assert "continue with --resume" in capsys.readouterr().out
    assert read_json(out / "vanilla_model" / "results.json")["completed_tasks"] == 2
    # the shared run's folder is locked for this launch but holds nothing of a run
    assert [p.name for p in (out / "shared_model").iterdir()] == [".lock"] and not (out / RESULTS).exists()
    assert run_main(*flags, "--resume") == 0
    assert read_json(out / "vanilla_model" / "results.json")["completed_tasks"] == 3
    assert read_json(out / "shared_model" / "results.json")["completed_tasks"] == 3
    assert len(read_json(out / RESULTS)["episodes"]) == 2


def _fake_imr(root):
    counts = {f"n{i:08d}": 6 for i in range(7)}  # 7 classes: 4 continual (2 tasks), 3 held out
    return write_fake_imagenet_r(root, counts)


@pytest.mark.slow
def test_fsl_entry_point_runs_the_reference_three_launches_on_imagenet_r(tmp_path):
    data = _fake_imr(tmp_path / "data")
    common = ["imr_few_shot_lora", *TINY, "--data-path", str(data), "--batch-size", "4", "--epochs", "1",
              "--lora_type", "hide", "--num_tasks", "2", "--lora_rank", "2", "--output_dir", str(tmp_path / "out"),
              "--continual_classes_per_dataset", "4", "--few_shot_classes_per_dataset", "3",
              "--tasks_per_dataset", "2", "--vanilla_model_output_dir", str(tmp_path / "vanilla"),
              "--shared_model_output_dir", str(tmp_path / "shared")]
    launches = (["--fs_backbone", "vanilla", "--train_vanilla"], ["--fs_backbone", "shared", "--train_shared"],
                ["--num_fs_epochs", "3", "--num_shots", "2", "--num_ways", "3", "--train_few_shot", "--fs_backbone",
                 "shared", "--num_episodes", "3"])
    for launch in launches:
        proc = run_cli([*common, *launch], script="fsl.py")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_json(tmp_path / "vanilla" / "results.json")["completed_tasks"] == 2
    record = read_json(tmp_path / "out" / "few_shot_shared_Split-Imagenet-R_3way_2shot.json")
    assert [e["classes"] for e in record["episodes"]] == [[4, 5, 6]] * 3 and record["summary"]["episodes"] == 3
    # a few-shot launch before its shared run exists is refused, writing nothing
    proc = run_cli([*common[:-2], "--shared_model_output_dir", str(tmp_path / "none"), *launches[2],
                    "--output_dir", str(tmp_path / "out2")], script="fsl.py")
    assert proc.returncode == 2 and "none/checkpoint/task1_checkpoint.pth is missing" in proc.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_cars_and_cub_each_train_their_own_slot_picked_by_the_vanilla_model(tmp_path, capsys):
    data = tmp_path / "data"
    write_fake_cars(data, classes=[f"car {i}" for i in range(4)], train=[1, 2, 3, 4] * 3, test=[1, 2, 3, 4] * 2)
    write_fake_cub(data, classes=[f"{i:03d}.bird_{i}" for i in range(1, 5)],
                   images=[(c, 1) for c in range(1, 5)] * 3 + [(c, 0) for c in range(1, 5)] * 2)
    out = tmp_path / "out"
    flags = ["cub_cars_few_shot_lora", *TINY, "--data-path", str(data), "--batch-size", "4", "--epochs", "2",
             "--continual_classes_per_dataset", "2", "2", "--few_shot_classes_per_dataset", "2", "2",
             "--tasks_per_dataset", "1", "1", "--output_dir", str(out)]
    # the shared run of two datasets needs the vanilla run that picks the slots
    err = _fails(capsys, *flags, "--train_shared")
    assert "vanilla_model/checkpoint/task1_checkpoint.pth is missing" in err and not out.exists()
    episodes = ["--few_shot_dataset_idx", "1", "--num_ways", "2", "--num_shots", "2", "--num_episodes", "3",
                "--num_fs_epochs", "2"]
    assert run_main(*flags, *episodes) == 0
    assert read_json(out / "vanilla_model" / "results.json")["task_classes"] == [[0, 1], [2, 3]]
    first, second = (torch.load(out / "shared_model" / "checkpoint" / f"task{t}_checkpoint.pth",
                                weights_only=False)["model"]["lora.b"] for t in (1, 2))
    # task 1 (Cars) trains slot 0 only, task 2 (CUB) slot 1 only
    assert first[0].abs().sum() > 0 and first[1].abs().sum() == 0
    assert torch.equal(second[0], first[0]) and second[1].abs().sum() > 0
    record = read_json(out / "few_shot_vanilla+shared_Split-CUB200_2way_2shot.json")
    assert [e["classes"] for e in record["episodes"]] == [[2, 3]] * 3
    # each episode's slot is the majority of the datasets of the vanilla head's classes for its support images
    cfg = parse_args([*flags, *episodes])
    seed_everything(cfg.seed)
    backbone = create_backbone(cfg.model, False, 32).eval()  # the untrained ViT every part of the run built
    vanilla = torch.load(out / "vanilla_model" / "checkpoint" / "task2_checkpoint.pth", weights_only=False)["model"]
    cub = load_cub200(str(data), 32)
    sampler = EpisodeSampler(cub, [2, 3], num_ways=2, num_shots=2, num_queries=100, seed=cfg.seed)
    for entry in record["episodes"]:
        images = torch.stack([cub.train_eval[int(i)][0] for i in sampler.episode(entry["episode"]).support])
        with torch.no_grad():
            classes = (backbone(images) @ vanilla["head.weight"].T + vanilla["head.bias"]).argmax(1)
        assert entry["slot"] == int(torch.bincount((classes >= 2).long(), minlength=2).argmax())
    shared = read_json(out / "shared_model" / "results.json")
    assert shared["completed_tasks"] == 2 and len(shared["final"]["tii_acc"]) == 2
    shutil.rmtree(out / "vanilla_model")  # the episodes' slot vote needs it too
    err = _fails(capsys, *flags, *episodes, "--train_few_shot", "--output_dir", str(tmp_path / "other"),
                 "--vanilla_model_output_dir", str(out / "vanilla_model"),
                 "--shared_model_output_dir", str(out / "shared_model"))
    assert "vanilla_model/checkpoint/task1_checkpoint.pth is missing" in err


def test_few_shot_script_launches_the_reference_runs(tmp_path):
    commands = script_commands("train_imr_ibot21k_few_shot.sh", tmp_path=tmp_path, env={"SEEDS": "42"})
    assert len(commands) == 3
    vanilla, shared, episodes = (parse_args(command) for command in commands)
    assert (vanilla.train_vanilla, shared.train_shared, episodes.train_few_shot) == (True, True, True)
    assert not (vanilla.train_shared or vanilla.train_few_shot or episodes.train_vanilla)
    for cfg in (vanilla, shared, episodes):
        assert (cfg.context.backbone, cfg.batch_size, cfg.epochs, cfg.lr, cfg.lora_rank, cfg.seed) == (
            "vit_base_patch16_224.ibot_in22k", 24, 50, 0.01, 8, 42)
        assert cfg.shared_model_output_dir == "./output/imr_ibot21k_shared_model_seed42"
    assert (episodes.fs_backbone, episodes.num_fs_epochs, episodes.num_shots, episodes.num_episodes) == (
        "shared", 50, 5, 50)

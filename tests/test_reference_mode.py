"""--reference_mode and the two behaviours it adds: class statistics in one-class batches, evaluation over every
class of the head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import engine
from config.cli import parse_args
from conftest import run_main
from datasets.base import Benchmark
from datasets.scenario import ClassBatches, LoaderSettings, Scenario
from utils import DistContext


def test_reference_mode_switches_what_the_method_reads_and_a_given_flag_wins():
    cfg = parse_args(["digits_hideprompt", "--reference_mode"])
    assert (cfg.legacy_prefix_reshape, cfg.stats_per_class, cfg.eval_all_classes, cfg.amp) == (True, True, True,
                                                                                                  "none")
    assert cfg.context.reference_switches == ("--legacy_prefix_reshape True", "--stats_per_class True",
                                              "--eval_all_classes True", "--amp none")
    given = parse_args(["digits_hideprompt", "--reference_mode", "--amp", "bf16", "--eval_all_classes", "False"])
    assert (given.amp, given.eval_all_classes) == ("bf16", False)
    assert given.context.reference_switches == ("--legacy_prefix_reshape True", "--stats_per_class True")
    # the test-time vote where the reference's configs vote: L2P's batchwise presets, HiDe-Prompt on 5-datasets only
    assert parse_args(["cifar100_l2p", "--reference_mode"]).batchwise_prompt_eval
    assert parse_args(["five_datasets_hideprompt", "--reference_mode"]).batchwise_prompt_eval
    assert not parse_args(["cifar100_hideprompt", "--reference_mode"]).batchwise_prompt_eval
    linear = parse_args(["digits_linear", "--reference_mode"])  # no prompts: only what it reads
    assert linear.context.reference_switches == ("--stats_per_class True", "--eval_all_classes True", "--amp none")
    plain = parse_args(["digits_hideprompt"])
    assert (plain.legacy_prefix_reshape, plain.stats_per_class, plain.eval_all_classes) == (False, False, False)
    assert plain.context.reference_switches == ()


@pytest.mark.slow
def test_reference_mode_runs_offline_and_says_what_it_switched_on(tmp_path, capsys):
    assert run_main("digits_hideprompt", "--reference_mode", "--device", "cpu", "--output_dir", str(tmp_path / "r"),
                    "--epochs", "1", "--num_tasks", "2") == 0
    out = capsys.readouterr()
    assert ("--reference_mode: the reference's behaviour where ours differs: --legacy_prefix_reshape True, "
            "--stats_per_class True, --eval_all_classes True, --amp none") in out.out + out.err


@pytest.mark.parametrize("world", [1, 2])
def test_one_class_batches_hold_each_image_once_over_the_ranks(world):
    targets = np.array([3, 1, 3, 3, 1, 3, 1, 3, 3])  # class 3 at 0,2,3,5,7,8; class 1 at 1,4,6
    classes = [np.flatnonzero(targets == c) for c in (3, 1)]
    batches = [b for rank in range(world) for b in ClassBatches(classes, 2, rank, world)]
    assert all(len({int(targets[i]) for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(9))
    if world == 1:
        assert batches == [[0, 2], [3, 5], [7, 8], [1, 4], [6]]
        assert len(ClassBatches(classes, 2, 0, 1)) == 5


def _scenario(train_targets: np.ndarray, test_targets: np.ndarray, num_classes: int, tasks: list[list[int]],
              batch_size: int = 4) -> Scenario:
    def dataset(targets: np.ndarray) -> TensorDataset:  # image i is the number i: batches show which images
        ids = torch.arange(len(targets), dtype=torch.float32)
        return TensorDataset(ids[:, None], torch.as_tensor(targets))
    benchmark = Benchmark("toy", num_classes, dataset(train_targets), dataset(train_targets), dataset(test_targets),
                          train_targets, test_targets)
    return Scenario(class_order=list(range(num_classes)), task_classes=tasks, num_classes=num_classes,
                    benchmark=benchmark, loader=LoaderSettings(batch_size=batch_size))


def test_statistics_per_class_are_each_class_alone_and_mixed_batches_otherwise():
    train = np.array([0, 1, 0, 1, 0, 1, 2, 2])
    scenario = _scenario(train, np.array([0, 1, 2]), 3, [[0, 1], [2]])
    per_class = [(ids.flatten().int().tolist(), labels.tolist()) for ids, labels in scenario.stats_loader(0, True)]
    # class 0's images 0, 2, 4 alone (as a loader of class 0 alone gives them), then class 1's 1, 3, 5
    assert per_class == [([0, 2, 4], [0, 0, 0]), ([1, 3, 5], [1, 1, 1])]
    mixed = [ids.flatten().int().tolist() for ids, _ in scenario.stats_loader(0)]
    assert mixed == [[0, 1, 2, 3], [4, 5]]


class _HandBuiltHead(torch.nn.Module):
    """Logits by test image: class 2 (task 2, not trained yet after task 1) beats the best seen class on image 1
    only."""

    def __init__(self):
        super().__init__()
        self.logits = torch.tensor([[5.0, 1.0, 4.0],   # image 0, class 0: seen best, class 2 below it
                                    [0.5, 2.0, 3.0]])  # image 1, class 1: class 2 above the seen best

    def predict(self, images, batch_key=None):
        return self.logits[images.flatten().long()]

    def predict_task(self, images, batch_key=None):
        return None


@pytest.mark.parametrize("all_classes, expected", [(False, [100.0]), (True, [50.0])])
def test_evaluation_over_all_classes_differs_only_where_an_untrained_row_wins(all_classes, expected):
    scenario = _scenario(np.array([0, 1, 2]), np.array([0, 1]), 3, [[0, 1], [2]])
    cfg = parse_args(["digits_linear", "--amp", "none", "--compile", "off", "--eval_all_classes", str(all_classes)])
    result = engine.evaluate(_HandBuiltHead(), scenario, 0, cfg, DistContext())
    assert result["task_acc"] == expected  # masked: both right; all classes: image 1 goes to class 2

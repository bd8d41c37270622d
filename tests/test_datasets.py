import random

import numpy as np
import pytest
import torch

from conftest import write_fake_cifar100
from datasets import build_scenario, load_benchmark
from datasets.cifar import load_cifar100
from datasets.scenario import LoaderSettings, ShardSampler, make_class_order, split_into_tasks
from utils import UserError


def test_natural_order_and_equal_tasks():
    scenario = build_scenario(10, 5, shuffle=False, seed=0, dataset="x")
    assert scenario.task_classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert scenario.class_to_task.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert scenario.class_mask(1).nonzero().flatten().tolist() == [2, 3]
    assert scenario.seen_mask(1).nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_shuffle_matches_the_reference_and_depends_only_on_the_seed():
    expected = list(range(100))
    random.seed(7)
    random.shuffle(expected)  # the reference: random.seed(seed); random.shuffle(class_order)
    assert make_class_order(100, True, 7) == expected
    assert make_class_order(100, True, 7) == make_class_order(100, True, 7)
    assert make_class_order(100, True, 8) != expected
    scenario = build_scenario(100, 10, shuffle=True, seed=7, dataset="x")
    assert sorted(sum(scenario.task_classes, [])) == list(range(100))
    assert scenario.task_classes[0] == expected[:10]


def test_uneven_split_is_an_error_with_the_numbers():
    with pytest.raises(UserError, match=r"--num_tasks 7 .* 100 classes .*100 = 7 x 14 \+ 2.*\[1, 2, 4, 5, 10"):
        split_into_tasks(list(range(100)), 7, "Split-CIFAR100")


@pytest.mark.parametrize("num_items,world", [(75, 2), (7, 3), (2, 4)])
def test_shard_sampler_covers_every_item_exactly_once(num_items, world):
    shards = [list(ShardSampler(num_items, r, world)) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(num_items))


def test_fake_cifar100_tree_loads_in_the_real_format(tmp_path):
    root = write_fake_cifar100(tmp_path, train_per_class=2, test_per_class=3)
    bench = load_cifar100(str(root), input_size=32, download=False)
    assert bench.num_classes == 100 and len(bench.train) == 200 and len(bench.test) == 300
    image, label = bench.test[5]
    assert image.shape == (3, 32, 32) and label == 1
    # the test transform is deterministic, the train one is random
    assert torch.equal(bench.test[5][0], bench.test[5][0])
    assert torch.equal(bench.train_eval[0][0], bench.train_eval[0][0])
    scenario = build_scenario(100, 10, False, 0, "Split-CIFAR100", benchmark=bench,
                              loader=LoaderSettings(batch_size=8))
    images, targets = next(iter(scenario.test_loader(3)))
    assert set(targets.tolist()) <= set(range(30, 40))
    assert sum(len(b[1]) for b in scenario.test_loader(3)) == 30
    assert sum(len(b[1]) for b in scenario.train_loader(3)) == 20


def test_missing_cifar_gives_one_line_naming_the_folder(tmp_path):
    with pytest.raises(UserError) as err:
        load_cifar100(str(tmp_path), input_size=32, download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "cifar-100-python") in message
    assert "cifar-100-python.tar.gz" in message


def test_failed_download_gives_one_line(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", no_network)
    with pytest.raises(UserError, match="download from https://www.cs.toronto.edu/.* failed \\(URLError\\)"):
        load_cifar100(str(tmp_path), input_size=32, download=True)


def test_truncated_cifar_pickle_is_a_clear_error(tmp_path):
    root = write_fake_cifar100(tmp_path)
    path = root / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable CIFAR pickle"):
        load_cifar100(str(root), input_size=32, download=False)


def test_digits_split_is_fixed_stratified_and_resized():
    a = load_benchmark("Split-Digits", "unused", 32)
    b = load_benchmark("Split-Digits", "unused", 48)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 540
    assert np.array_equal(a.test_targets, b.test_targets)
    per_class = np.bincount(a.train_targets) + np.bincount(a.test_targets)
    assert np.all(np.abs(np.bincount(a.test_targets) - 0.3 * per_class) <= 1)  # stratified: 30% of every class
    assert a.test[0][0].shape == (3, 32, 32) and b.test[0][0].shape == (3, 48, 48)
    assert a.test[0][0].min() >= -1.0 and a.test[0][0].max() <= 1.0


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UserError, match="Split-CIFAR100, Split-Digits"):
        load_benchmark("Split-Nope", "x", 32)

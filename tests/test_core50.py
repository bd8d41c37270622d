"""Domain-incremental data: CORe50 on a tiny fake tree in the official layout, and the offline Digits-Domains."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import IMAGES_PER_OBJECT, TRAIN_ORDER, raises_one_line, write_fake_core50
from datasets import BENCHMARKS, load_benchmark
from datasets.core50 import CORE50_URL, load_core50
from datasets.digits import COLOUR_SHIFT, NUM_DOMAINS, load_digits


@pytest.fixture(scope="module")
def core50_root(tmp_path_factory) -> Path:
    return write_fake_core50(tmp_path_factory.mktemp("core50"))


def test_core50_counts_labels_and_domains(core50_root):
    bench = load_benchmark("CORe50", str(core50_root), 16, download=False)
    assert bench.name == "CORe50" and bench.num_classes == 50 and BENCHMARKS["CORe50"] is load_core50
    assert len(bench.train) == len(bench.train_eval) == 50 * (7 * 1 + 2) and len(bench.test) == 50 * (1 + 2 + 1)
    # training sessions 1, 2, 4, 5, 6, 8, 9, 11 are domains 0..7 in that order; session 2 holds 2 images per object
    expected_domains = np.repeat(np.arange(8), [50 * IMAGES_PER_OBJECT[s] for s in TRAIN_ORDER])
    assert np.array_equal(bench.train_domains, expected_domains)
    assert bench.test_domains is None
    # objects o1..o50 in numeric order within each session: labels 0..49
    assert np.array_equal(bench.train_targets[:50], np.arange(50))
    assert np.array_equal(bench.train_targets[50:150], np.repeat(np.arange(50), 2))
    assert np.array_equal(bench.test_targets, np.concatenate([np.arange(50), np.repeat(np.arange(50), 2),
                                                              np.arange(50)]))
    assert np.array_equal(bench.train.targets, bench.train_targets)


def test_core50_files_come_from_the_right_sessions_in_sorted_order(core50_root):
    bench = load_core50(str(core50_root), 16)
    train_files, test_files = bench.train.load.relpaths, bench.test.load.relpaths
    train_sessions = [int(path.split("/")[0][1:]) for path in train_files]
    assert sorted(set(train_sessions), key=TRAIN_ORDER.index) == list(TRAIN_ORDER)
    assert [TRAIN_ORDER[d] for d in bench.train_domains] == train_sessions
    assert {int(path.split("/")[0][1:]) for path in test_files} == {3, 7, 10}
    assert train_files[50:52] == ["s2/o1/C_02_01_8.png", "s2/o1/C_02_01_9.png"]
    assert all(int(path.split("/")[1][1:]) - 1 == label for path, label in zip(train_files, bench.train_targets,
                                                                                strict=True))


def test_core50_sample_is_loaded_at_the_input_size(core50_root):
    bench = load_core50(str(core50_root), 16)
    image, label = bench.test[50]  # session 7, object 1, first file (k = 1)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0
    assert torch.allclose(image[0], torch.full((16, 16), 7 * 20 / 255))
    assert torch.allclose(image[2], torch.full((16, 16), 100 / 255))
    train_image, train_label = bench.train[100 + 49]  # session 4, object 50
    assert train_image.shape == (3, 16, 16) and train_label == 49


def test_core50_accepts_the_folder_itself(core50_root):
    direct = load_core50(str(core50_root / "core50_128x128"), 16)
    nested = load_core50(str(core50_root), 16)
    assert direct.train.load.relpaths == nested.train.load.relpaths
    assert np.array_equal(direct.train_domains, nested.train_domains)
    assert torch.equal(direct.test[0][0], nested.test[0][0])


def test_missing_core50_is_one_line_with_the_layout_and_the_url(tmp_path):
    raises_one_line(lambda: load_core50(str(tmp_path / "nowhere"), 16), "core50_128x128", "s1..s11/o1..o50",
                    CORE50_URL, "--data-path")


def test_missing_core50_session_is_one_line(tmp_path, core50_root):
    copy = tmp_path / "copy"
    shutil.copytree(core50_root, copy)
    shutil.rmtree(copy / "core50_128x128" / "s7")
    message = raises_one_line(lambda: load_core50(str(copy), 16), "core50_128x128", "s1..s11/o1..o50", CORE50_URL)
    assert "s7/o1" in message and "50 session/object folders" in message


# ----------------------------------------------------------------------------------------------------------------
# Digits-Domains
# ----------------------------------------------------------------------------------------------------------------
def test_digits_domains_deal_the_split_digits_split_into_three_domains():
    plain = load_digits("unused", 16)
    bench = load_benchmark("Digits-Domains", "unused", 16)
    n_train, n_test = len(plain.train), len(plain.test)
    assert bench.name == "Digits-Domains" and bench.num_classes == 10 and NUM_DOMAINS == 3
    assert len(bench.train) == n_train and len(bench.test) == n_test  # each image in one domain
    assert np.array_equal(bench.train_domains, np.arange(n_train) % 3)
    assert np.array_equal(bench.test_domains, np.arange(n_test) % 3)
    assert np.array_equal(bench.train_targets, plain.train_targets)
    assert np.array_equal(bench.test_targets, plain.test_targets)
    for domain in range(3):  # every class in every domain
        assert set(bench.train_targets[bench.train_domains == domain]) == set(range(10))


def test_digits_domains_images_rotated_and_colour_shifted():
    plain = load_digits("unused", 16)
    bench = load_benchmark("Digits-Domains", "unused", 16)
    for i in (0, 7, 8, len(plain.test) - 1):  # image i is in domain i % 3
        (original, label), (seen, label_domain) = plain.test[i], bench.test[i]
        assert label == label_domain and seen.shape == (3, 16, 16)
        if i % 3 == 0:
            assert torch.equal(seen, original)
        elif i % 3 == 1:
            assert torch.equal(seen, torch.rot90(original, 1, dims=(1, 2))) and not torch.equal(seen, original)
        else:
            assert torch.equal(seen, original * COLOUR_SHIFT)
            assert torch.equal(seen[0], -original[0]) and torch.equal(seen[1], original[1] / 2)
            assert torch.equal(bench.test[i][0], seen)  # the same every time
            assert seen.min() >= -1 and seen.max() <= 1
    assert torch.equal(bench.train[4][0], torch.rot90(plain.train[4][0], 1, dims=(1, 2)))

"""The Gaussian (task-free) class schedule: peak positions, presence, label sets drawn from it, and its errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from datasets.gaussian import (
    GAUSSIAN_WIDTH,
    class_peaks,
    episode_positions,
    gaussian_schedule,
    presence,
)
from utils import UserError


def test_peaks_of_the_split_cifar100_schedule_are_the_odd_episodes():
    # 200 episodes, one position each: peak_every = 200 // 100 = 2, peaks 1, 3, ..., 199
    assert class_peaks(100, 200, -1) == list(range(1, 200, 2))


@pytest.mark.parametrize("num_classes, num_episodes, steps, expected", [
    (3, 11, 1, [1, 4, 7]),        # L = 11, peak_every 3: range(1, 11, 3) gives 1, 4, 7, 10; only the first 3 count
    (3, 5, 7, [5, 16, 27]),       # L = 35, peak_every 11, first peak at 11 // 2 = 5
    (4, 13, 3, [4, 13, 22, 31]),  # L = 39, peak_every 9
])
def test_peaks_when_the_length_is_not_a_multiple_of_the_classes(num_classes, num_episodes, steps, expected):
    assert class_peaks(num_classes, num_episodes, steps) == expected


def test_episode_positions_count_batches_or_episodes():
    assert episode_positions(4, 25) == [0, 25, 50, 75]
    assert episode_positions(3, -1) == [0, 1, 2]


def test_presence_follows_the_gaussian_formula():
    assert GAUSSIAN_WIDTH == 50.0
    assert presence(120.0, 120.0, 50.0) == 1.0
    assert presence(170.0, 120.0, 50.0) == pytest.approx(math.exp(-0.5))
    assert presence(70.0, 120.0, 50.0) == pytest.approx(math.exp(-0.5))
    assert presence(20.0, 120.0, 50.0) == pytest.approx(math.exp(-2.0))
    assert presence(3.0, 0.0, 2.0) == pytest.approx(math.exp(-9 / 8))


def test_every_label_set_is_sorted_non_empty_and_within_the_classes():
    schedule = gaussian_schedule(100, 200, -1, GAUSSIAN_WIDTH, seed=0)
    assert len(schedule) == 200
    for labels in schedule:
        assert labels and labels == sorted(set(labels))
        assert labels[0] >= 0 and labels[-1] < 100


def test_same_seed_same_schedule_other_seed_other_schedule():
    first = gaussian_schedule(100, 200, -1, GAUSSIAN_WIDTH, seed=3)
    assert gaussian_schedule(100, 200, -1, GAUSSIAN_WIDTH, seed=3) == first
    assert gaussian_schedule(100, 200, -1, GAUSSIAN_WIDTH, seed=4) != first


def test_inclusion_frequency_matches_the_presence_probability():
    # 2 classes, episodes at 0, 25, 50, 75, peaks at 25 and 75, width 25
    assert class_peaks(2, 4, 25) == [25, 75]
    runs = [gaussian_schedule(2, 4, 25, 25.0, seed=seed) for seed in range(4000)]

    def frequency(episode: int, label: int) -> float:
        return float(np.mean([label in run[episode] for run in runs]))

    # episode 1 sits on class 0's peak (always in, so never empty): class 1, two widths away, is in with exp(-2)
    assert frequency(1, 0) == 1.0
    assert frequency(1, 1) == pytest.approx(math.exp(-2.0), abs=0.03)
    # episode 0 can draw an empty set, which is drawn again: P(j | non-empty) = p_j / (1 - (1 - p_0)(1 - p_1))
    p0, p1 = math.exp(-0.5), math.exp(-4.5)
    non_empty = 1 - (1 - p0) * (1 - p1)
    assert frequency(0, 0) == pytest.approx(p0 / non_empty, abs=0.03)  # ~0.99, near its peak
    assert frequency(0, 1) == pytest.approx(p1 / non_empty, abs=0.03)  # ~0.02, far from its peak


def test_each_class_appears_around_its_peak():
    # 10 classes over 500 episodes: peaks 25, 75, ..., 475, well apart compared with the width of 20
    schedule = gaussian_schedule(10, 500, -1, 20.0, seed=0)
    mean_positions = []
    for label in range(10):
        where = [episode for episode, labels in enumerate(schedule) if label in labels]
        assert where and max(where) - min(where) < 200  # never seen far from its peak
        mean_positions.append(np.mean(where))
    assert all(np.diff(mean_positions) > 0)
    assert np.abs(np.array(mean_positions) - np.arange(25, 500, 50)).max() < 10


def test_episodes_far_from_every_peak_take_the_nearest_class():
    # peaks at 750 and 2250, episodes at 0, 1000, 2000 with width 20: every probability is ~0 or 0 exactly
    assert gaussian_schedule(2, 3, 1000, 20.0, seed=0) == [[0], [0], [1]]


def test_a_schedule_shorter_than_the_classes_is_a_one_line_error():
    with pytest.raises(UserError) as err:
        gaussian_schedule(100, 10, 5, GAUSSIAN_WIDTH, seed=0)
    message = str(err.value)
    assert "\n" not in message
    for needle in ("10 episodes x 5 batches = 50 positions", "(100)", "--num_tasks", "--steps_per_task"):
        assert needle in message, (needle, message)


def test_a_width_that_is_not_positive_is_an_error():
    with pytest.raises(UserError, match="width must be positive"):
        gaussian_schedule(2, 4, 25, 0.0, seed=0)

"""The Gaussian (task-free) class schedule: classes fade in and out along a stream of episodes instead of arriving in
disjoint tasks.

Each class j peaks at one position of the stream; an episode at position x holds class j with probability
exp(-(x - peak_j)^2 / (2 width^2)), so neighbouring episodes share classes and no task boundary exists.
"""
from __future__ import annotations

import math

import numpy as np

from utils import UserError

GAUSSIAN_WIDTH: float = 50.0  # standard deviation of a class's presence, in batches (or episodes when s = -1)
MAX_REDRAWS = 1000  # empty draws before an episode far from every peak takes its most present class alone


def _position_step(steps_per_episode: int) -> int:
    """Batches between episode starts; -1 (every sample of the episode's label set) counts episodes instead."""
    return steps_per_episode if steps_per_episode > 0 else 1


def episode_positions(num_episodes: int, steps_per_episode: int) -> list[int]:
    """Position of each episode's start on the schedule, in batches."""
    step = _position_step(steps_per_episode)
    return [episode * step for episode in range(num_episodes)]


def class_peaks(num_classes: int, num_episodes: int, steps_per_episode: int) -> list[int]:
    """Position where each class (natural order) is most present: evenly spaced, each mid-way in its own stretch."""
    step = _position_step(steps_per_episode)
    length = num_episodes * step
    peak_every = length // num_classes
    if peak_every == 0:
        raise UserError(f"the Gaussian schedule ({num_episodes} episodes x {step} batches = {length} positions) needs "
                        f"at least one position per class ({num_classes}); raise --num_tasks or --steps_per_task")
    return list(range(peak_every // 2, length, peak_every))[:num_classes]


def presence(x: float, peak: float, width: float) -> float:
    """Probability that a class peaking at `peak` is in the episode at position `x`."""
    return math.exp(-((x - peak) ** 2) / (2 * width ** 2))


def _draw_label_set(probabilities: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Each class in independently with its probability (one uniform draw per class, in class order); an empty set is
    drawn again, and after MAX_REDRAWS empty draws (all probabilities ~0) the most present class is taken alone."""
    for _ in range(MAX_REDRAWS):
        included = np.flatnonzero(rng.random(len(probabilities)) < probabilities)
        if len(included):
            return included.tolist()
    return [int(np.argmax(probabilities))]


def gaussian_schedule(num_classes: int, num_episodes: int, steps_per_episode: int, width: float,
                      seed: int) -> list[list[int]]:
    """The sorted, non-empty label set of each episode, a function of the arguments alone."""
    if width <= 0:
        raise UserError(f"the Gaussian schedule's width must be positive, got {width}")
    peaks = class_peaks(num_classes, num_episodes, steps_per_episode)
    rng = np.random.default_rng(seed)
    schedule = []
    for x in episode_positions(num_episodes, steps_per_episode):
        probabilities = np.array([presence(x, peak, width) for peak in peaks])
        schedule.append(_draw_label_set(probabilities, rng))
    return schedule

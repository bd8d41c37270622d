import numpy as np
import pytest

import online_metrics

# R[i, j]: accuracy on task j after training tasks 1..i (future tasks included, above the diagonal)
R = np.array([[80.0, 20.0, 10.0],
              [70.0, 85.0, 30.0],
              [60.0, 75.0, 90.0]])
# the mid-task evaluation (h = 0) of each task; h = 1 is the end of the task, R's row
MID = np.array([[40.0, 10.0, 5.0],
                [75.0, 50.0, 20.0],
                [65.0, 80.0, 45.0]])
A = np.stack([MID, R], axis=1)  # T x H x T with H = 2


def test_end_of_task_accuracies_on_a_hand_computed_matrix():
    s = online_metrics.online_summary(R, A)
    assert s["n_tasks"] == 3 and s["n_continual_evaluations"] == 2
    assert s["accuracy_all"] == pytest.approx([(80 + 20 + 10) / 3, (70 + 85 + 30) / 3, (60 + 75 + 90) / 3])
    assert s["accuracy_seen"] == pytest.approx([80, (70 + 85) / 2, (60 + 75 + 90) / 3])
    assert s["accuracy_all_avg"] == pytest.approx((110 / 3 + 185 / 3 + 225 / 3) / 3)
    assert s["accuracy_seen_avg"] == pytest.approx((80 + 77.5 + 75) / 3)
    assert s["accuracy_final"] == pytest.approx(75.0)
    assert s["accuracy_matrix"] == R.tolist() and s["anytime_accuracy_matrix"] == A.tolist()


def test_transfers_average_over_the_task_pairs():
    s = online_metrics.online_summary(R, A)
    # forward: the future tasks' accuracy, R01 + R02 + R12 over the 3 pairs
    assert s["forward_transfer"] == pytest.approx((20 + 10 + 30) / 3)
    # backward: (R10 - R00) + (R20 - R00) + (R21 - R11) over the 3 pairs
    assert s["backward_transfer"] == pytest.approx(((70 - 80) + (60 - 80) + (75 - 85)) / 3)


def test_anytime_accuracies_interleave_the_mid_and_end_evaluations():
    s = online_metrics.online_summary(R, A)
    all_ = [(40 + 10 + 5) / 3, 110 / 3, (75 + 50 + 20) / 3, 185 / 3, (65 + 80 + 45) / 3, 225 / 3]
    seen = [40, 80, (75 + 50) / 2, (70 + 85) / 2, (65 + 80 + 45) / 3, 75]
    assert s["anytime_accuracy_all"] == pytest.approx(all_)
    assert s["anytime_accuracy_seen"] == pytest.approx(seen)
    assert s["anytime_accuracy_all_avg"] == pytest.approx(sum(all_) / 6)
    assert s["anytime_accuracy_seen_avg"] == pytest.approx(sum(seen) / 6)
    assert s["anytime_task_index"] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])


def test_a_single_task_has_no_transfer():
    s = online_metrics.online_summary(np.array([[64.0]]), np.array([[[50.0]], [[64.0]]]).reshape(1, 2, 1))
    assert s["forward_transfer"] is None and s["backward_transfer"] is None
    assert s["accuracy_final"] == 64.0 and s["anytime_accuracy_all"] == [50.0, 64.0]
    assert s["anytime_task_index"] == [0.5, 1.0]


def test_mismatched_a_and_r_are_refused():
    wrong_end = A.copy()
    wrong_end[1, -1, 2] += 1.0
    with pytest.raises(ValueError, match=r"A\[:, -1, :\] must equal R"):
        online_metrics.online_summary(R, wrong_end)
    with pytest.raises(ValueError, match="T x H x T"):
        online_metrics.online_summary(R, A[:2])
    with pytest.raises(ValueError, match="square"):
        online_metrics.online_summary(R[:2], A)


# 10 samples, task 0 = samples 0..5, task 1 = samples 6..9
CORRECT = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=bool)
BOUNDARIES = [0, 6, 10]


def test_prequential_cumulative_per_task_and_windowed():
    p = online_metrics.prequential_summary(CORRECT, BOUNDARIES, window=4)
    assert p["prequential_accuracy"] == pytest.approx(100 * 6 / 10)
    assert p["prequential_task_accuracy"] == pytest.approx([100 * 3 / 6, 100 * 3 / 4])
    assert p["n_windows"] == 2 and p["n_samples"] == 10 and p["window"] == 4
    # windows [1,1,0,1] and [0,0,1,1]; the last 2 samples make no full window
    assert p["windowed_accuracy"] == pytest.approx([75.0, 50.0])
    # window 1 ends at 4: 4/6 of task 0; window 2 ends at 8: task 1 at (8 - 6) / 4
    assert p["window_task_index"] == pytest.approx([4 / 6, 1.5])


def test_a_window_ending_on_a_boundary_belongs_to_the_task_it_closes():
    p = online_metrics.prequential_summary(CORRECT, BOUNDARIES, window=3)
    assert p["windowed_accuracy"] == pytest.approx([100 * 2 / 3, 100 * 1 / 3, 100.0])
    assert p["window_task_index"] == pytest.approx([0.5, 1.0, 1.75])


def test_a_window_longer_than_the_stream_gives_no_windows():
    p = online_metrics.prequential_summary(CORRECT, BOUNDARIES, window=20)
    assert p["n_windows"] == 0 and p["windowed_accuracy"] == [] and p["window_task_index"] == []
    assert p["prequential_accuracy"] == pytest.approx(60.0)


def test_bad_boundaries_or_window_are_refused():
    with pytest.raises(ValueError, match="from 0 to 10"):
        online_metrics.prequential_summary(CORRECT, [0, 6, 9], window=4)
    with pytest.raises(ValueError, match="strictly increasing"):
        online_metrics.prequential_summary(CORRECT, [0, 6, 6, 10], window=4)
    with pytest.raises(ValueError, match="positive"):
        online_metrics.prequential_summary(CORRECT, BOUNDARIES, window=0)


def test_format_shows_the_headline_numbers_and_the_matrix_rows():
    s = online_metrics.online_summary(R, A)
    text = online_metrics.format_online_summary(s, online_metrics.prequential_summary(CORRECT, BOUNDARIES, 4))
    assert "final accuracy 75.00" in text
    assert "forward transfer 20.00 | backward transfer -13.33" in text
    assert "prequential accuracy 60.00 (2 windows of 4 samples)" in text
    assert "   after T2   70.00   85.00   30.00" in text.splitlines()
    assert text.splitlines()[-4] == "after\\test      T1      T2      T3"


def test_format_without_transfers_or_prequential_prints_dashes():
    s = online_metrics.online_summary(np.array([[64.0]]), np.array([[[64.0]]]))
    text = online_metrics.format_online_summary(s, None)
    assert "forward transfer - | backward transfer -" in text and "prequential" not in text
    assert text.splitlines()[-1] == "   after T1   64.00"

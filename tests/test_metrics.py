import numpy as np
import pytest

import metrics

# acc[i, t]: accuracy on task i after training task t
ACC = np.array([[90.0, 80.0, 70.0],
                [0.0, 85.0, 60.0],
                [0.0, 0.0, 95.0]])


def test_average_accuracy_is_the_unweighted_mean_of_the_seen_column():
    assert metrics.average_accuracy(ACC, 0) == 90.0
    assert metrics.average_accuracy(ACC, 1) == pytest.approx((80 + 85) / 2)
    assert metrics.average_accuracy(ACC, 2) == pytest.approx((70 + 60 + 95) / 3)


def test_average_incremental_accuracy_is_the_mean_of_the_a_t():
    assert metrics.average_incremental_accuracy(ACC, 2) == pytest.approx((90 + 82.5 + 75) / 3)


def test_forgetting_and_bwt_on_a_decaying_matrix():
    # task 0 drops 90 -> 70, task 1 drops 85 -> 60: both conventions agree when nothing improves
    assert metrics.forgetting_reference(ACC, 2) == pytest.approx((20 + 25) / 2)
    assert metrics.forgetting_standard(ACC, 2) == pytest.approx((20 + 25) / 2)
    assert metrics.backward_transfer(ACC, 2) == pytest.approx(((70 - 90) + (60 - 85)) / 2)
    assert metrics.forgetting_reference(ACC, 0) is None and metrics.backward_transfer(ACC, 0) is None


def test_conventions_differ_when_an_old_task_improves():
    acc = np.array([[50.0, 60.0], [0.0, 80.0]])
    # the reference includes the current column in the max, so an improvement counts as 0 forgetting ...
    assert metrics.forgetting_reference(acc, 1) == 0.0
    # ... the standard definition looks only at earlier columns and gives a negative value
    assert metrics.forgetting_standard(acc, 1) == -10.0
    assert metrics.backward_transfer(acc, 1) == 10.0


def test_standard_forgetting_ignores_columns_before_the_task_was_learned():
    acc = np.array([[40.0, 30.0, 35.0], [0.0, 90.0, 50.0], [0.0, 0.0, 70.0]])
    # task 1: best earlier value is 90 (column 1), not the 0 placeholder of column 0
    assert metrics.forgetting_standard(acc, 2) == pytest.approx(((40 - 35) + (90 - 50)) / 2)
    assert metrics.forgetting_reference(acc, 2) == pytest.approx(((40 - 35) + (90 - 50)) / 2)


def test_format_matrix_shows_only_the_seen_upper_triangle():
    text = metrics.format_matrix(ACC, 1).splitlines()
    assert text[0].split()[-2:] == ["T1", "T2"]
    assert text[1].split() == ["T1", "90.00", "80.00"]
    assert text[2].split() == ["T2", "85.00"]

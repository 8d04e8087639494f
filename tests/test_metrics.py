"""The metrics (README, Protocol and metrics) against hand-computed matrices, and their identities as properties."""
import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metrics import (accuracy_curve, average_incremental_accuracy, backward_transfer, forgetting,
                   forgetting_pilot, last_accuracy, summary)

# after task 1: 90; after task 2: 70 / 80; after task 3: 75 / 60 / 50, with 100, 100 and 200 test images
ACC = [[90.0], [70.0, 80.0], [75.0, 60.0, 50.0]]
N = [100, 100, 200]


def test_hand_computed():
    assert accuracy_curve(ACC, N) == pytest.approx([90.0, 75.0, (75 + 60 + 100) / 4])
    assert last_accuracy(ACC, N) == pytest.approx(58.75)
    assert average_incremental_accuracy(ACC, N) == pytest.approx((90 + 75 + 58.75) / 3)
    # F_1 = max(90, 70) - 75 = 15, F_2 = 80 - 60 = 20
    assert forgetting(ACC) == pytest.approx(17.5)
    assert forgetting_pilot(ACC) == pytest.approx(17.5)
    # BWT = ((75 - 90) + (60 - 80)) / 2
    assert backward_transfer(ACC) == pytest.approx(-17.5)


def test_backward_transfer_case():
    acc = [[50.0], [70.0, 80.0]]  # task 1 improved after task 2
    assert forgetting(acc) == pytest.approx(-20.0)
    assert forgetting_pilot(acc) == 0.0
    assert backward_transfer(acc) == pytest.approx(20.0)


def matrices():
    return st.integers(1, 8).flatmap(lambda T: st.tuples(
        st.lists(st.lists(st.floats(0, 100), min_size=T, max_size=T), min_size=T, max_size=T),
        st.lists(st.integers(1, 500), min_size=T, max_size=T)))


@given(matrices())
def test_identities(mn):
    full, n = mn
    T = len(n)
    acc = [row[: t + 1] for t, row in enumerate(full)]
    before = copy.deepcopy(acc), list(n)
    a = np.full((T, T), np.nan)
    for t, row in enumerate(acc):
        a[t, : t + 1] = row
    curve = accuracy_curve(acc, n)
    # 1. the curve is recoverable from the matrix and the counts
    for t in range(T):
        assert curve[t] == pytest.approx(np.dot(a[t, : t + 1], n[: t + 1]) / sum(n[: t + 1]))
    # 2. min <= mean <= max, A_T = a_T
    assert min(curve) - 1e-9 <= average_incremental_accuracy(acc, n) <= max(curve) + 1e-9
    assert last_accuracy(acc, n) == curve[-1]
    F, FP, B = forgetting(acc), forgetting_pilot(acc), backward_transfer(acc)
    if T == 1:  # 7. joint training
        assert F == FP == B == 0.0 and average_incremental_accuracy(acc, n) == last_accuracy(acc, n)
        return
    # 3. F_PILOT = mean_j max(F_j, 0) >= max(F, 0)
    Fj = [a[j : T - 1, j].max() - a[T - 1, j] for j in range(T - 1)]
    assert FP == pytest.approx(np.mean([max(f, 0) for f in Fj]))
    assert FP >= max(F, 0) - 1e-9
    # 4. F >= -BWT
    assert F >= -B - 1e-9
    # 5. metric functions do not mutate their inputs
    summary(acc, n)
    assert (acc, n) == before


@given(st.integers(2, 8), st.floats(0, 100))
def test_constant_and_diagonal_matrices(T, v):
    const = [[v] * (t + 1) for t in range(T)]
    assert forgetting(const) == forgetting_pilot(const) == backward_transfer(const) == 0.0
    diag = [[0.0] * t + [v] for t in range(T)]  # 6. forgets everything at once
    assert forgetting_pilot(diag) == pytest.approx(v)
    # 4. with equality when the best accuracy before T is reached right after learning
    assert forgetting(diag) == pytest.approx(-backward_transfer(diag))

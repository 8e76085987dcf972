"""The few-shot regression: the closed form against numpy's least squares, and the K-shot choice."""

from __future__ import annotations

import numpy as np
import pytest

from vitcli.objectives.fewshot import (BIAS_CONSTANT, DEFAULT_L2, STD_EPS, augment, fewshot_accuracy, fewshot_results,
                                   fit_fewshot, needed_images, select_shots, targets)


def _data(n, d, c, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    y = np.arange(n) % c
    return x, y


def _augmented(x):
    return augment(x, x.mean(0), x.std(0) + STD_EPS)


@pytest.mark.parametrize("n,d", [(60, 8), (12, 40)])  # more images than dims, and fewer (the dual form)
def test_fit_equals_lstsq_of_the_ridge_system(n, d):
    c, l2 = 4, 3.0
    x, y = _data(n, d, c)
    W, b = fit_fewshot(x, y, c, l2)
    xa, t = _augmented(x), targets(y, c)
    # ridge = ordinary least squares on [X; sqrt(l2) I] -> [Y; 0]
    stacked = np.vstack([xa, np.sqrt(l2) * np.eye(xa.shape[1])])
    w, *_ = np.linalg.lstsq(stacked, np.vstack([t, np.zeros((xa.shape[1], c))]), rcond=None)
    closed = np.linalg.solve(xa.T @ xa + l2 * np.eye(xa.shape[1]), xa.T @ t)
    np.testing.assert_allclose(w, closed, rtol=1e-6, atol=1e-9)
    # (W, b) on raw features give the same scores as w on augmented features
    np.testing.assert_allclose(x @ W + b, xa @ w, rtol=1e-6, atol=1e-8)
    x_new = _data(5, d, c, seed=1)[0]
    xn = augment(x_new, x.mean(0), x.std(0) + STD_EPS)
    np.testing.assert_allclose(x_new @ W + b, xn @ w, rtol=1e-6, atol=1e-8)


def test_tiny_l2_is_plain_least_squares():
    x, y = _data(80, 6, 3)
    W, b = fit_fewshot(x, y, 3, l2=1e-9)
    xa, t = _augmented(x), targets(y, 3)
    w, *_ = np.linalg.lstsq(xa, t, rcond=None)
    np.testing.assert_allclose(x @ W + b, xa @ w, rtol=1e-6, atol=1e-6)


def test_targets_are_plus_minus_one_and_bias_column_is_constant():
    assert targets(np.array([2, 0]), 3).tolist() == [[-1, -1, 1], [1, -1, -1]]
    xa = augment(np.ones((3, 2)), np.zeros(2), np.ones(2))
    assert xa[:, -1].tolist() == [BIAS_CONSTANT] * 3 and DEFAULT_L2 == 1024.0


def test_l2_must_be_positive():
    with pytest.raises(ValueError):
        fit_fewshot(np.zeros((2, 2)), np.array([0, 1]), 2, l2=0.0)


def test_separable_classes_are_learned_from_few_shots():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32)) * 4
    y_train, y_test = np.repeat(np.arange(5), 3), np.repeat(np.arange(5), 40)
    x_train = centres[y_train] + rng.normal(size=(15, 32))
    x_test = centres[y_test] + rng.normal(size=(200, 32))
    assert fewshot_accuracy(x_train, y_train, x_test, y_test, 5) > 0.95


def test_select_shots_is_seeded_nested_and_per_class():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 3)
    five = select_shots(labels, 3, 5, seed=0)
    one = select_shots(labels, 3, 1, seed=0)
    assert np.bincount(labels[five]).tolist() == [5, 5, 3]  # class 2 has only 3
    assert set(one) <= set(five) and np.bincount(labels[one]).tolist() == [1, 1, 1]
    assert np.array_equal(five, select_shots(labels, 3, 5, seed=0))
    assert not np.array_equal(five, select_shots(labels, 3, 5, seed=1))


def test_fewshot_results_use_only_the_needed_rows():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 20)
    all_feats = rng.normal(size=(80, 6)) + labels[:, None]
    ev_x, ev_y = rng.normal(size=(40, 6)) + np.repeat(np.arange(4), 10)[:, None], np.repeat(np.arange(4), 10)
    need = needed_images(labels, 4, [2, 5], [0, 1])
    got = fewshot_results(all_feats[need], need, labels, ev_x, ev_y, 4, [2, 5], [0, 1])
    for k in (2, 5):
        want = np.mean([fewshot_accuracy(all_feats[i], labels[i], ev_x, ev_y, 4)
                        for i in (select_shots(labels, 4, k, s) for s in (0, 1))])
        assert got[str(k)] == pytest.approx(want)

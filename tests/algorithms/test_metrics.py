"""Pearson against scipy, the concept correlation table, and linear CKA's invariances."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from rsvc_cli.algorithms.metrics import concept_correlation, linear_cka, mean_max_correlation, pearson

PEARSON_ATOL = 1e-10
CKA_ATOL = 1e-10


def scipy_pearson(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN
        return pearsonr(x, y)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pearson_matches_scipy_batched(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 40, 5))
    y = 0.7 * x + rng.standard_normal((2, 3, 40, 5)) + 5.0
    r = pearson(torch.from_numpy(x), torch.from_numpy(y))
    assert r.shape == (2, 3, 5) and r.dtype == torch.float64
    expected = np.array(
        [[[scipy_pearson(x[a, b, :, c], y[a, b, :, c]) for c in range(5)] for b in range(3)] for a in range(2)]
    )
    np.testing.assert_allclose(r.numpy(), expected, rtol=0, atol=PEARSON_ATOL)


def test_pearson_other_dim_and_float32_inputs():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 30)), rng.standard_normal((4, 30))
    r = pearson(torch.from_numpy(x).float(), torch.from_numpy(y).float(), dim=-1)
    expected = [scipy_pearson(x[i].astype(np.float32), y[i].astype(np.float32)) for i in range(4)]
    np.testing.assert_allclose(r.numpy(), expected, atol=1e-6)


def test_pearson_is_nan_for_constant_columns_never_zero():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 3))
    y = rng.standard_normal((20, 3))
    x[:, 0] = 0.1  # constant (and not exactly representable: centering leaves rounding noise)
    y[:, 1] = 0.0
    r = pearson(torch.from_numpy(x), torch.from_numpy(y))
    assert torch.isnan(r[0]) and torch.isnan(r[1]) and not torch.isnan(r[2])
    assert np.isnan(scipy_pearson(x[:, 0], y[:, 0]))
    single = pearson(torch.ones(1, 2), torch.ones(1, 2))
    assert torch.isnan(single).all()


def test_concept_correlation_table_and_mean_max():
    rng = np.random.default_rng(5)
    first = rng.standard_normal((3, 50, 4))
    second = rng.standard_normal((3, 50, 6))
    second[:, :, 0] = first[:, :, 2]  # concept 2 of model 1 is concept 0 of model 2
    second[:, :, 5] = 1.0  # a constant concept
    table = concept_correlation(torch.from_numpy(first), torch.from_numpy(second))
    assert table.shape == (3, 4, 6)
    for i in range(4):
        for j in range(5):
            expected = scipy_pearson(first[1, :, i], second[1, :, j])
            assert float(table[1, i, j]) == pytest.approx(expected, abs=PEARSON_ATOL)
    assert torch.isnan(table[..., 5]).all()
    assert torch.allclose(table[:, 2, 0], torch.ones(3, dtype=torch.float64))
    rows, columns = mean_max_correlation(table)
    assert rows.shape == (3,)
    expected_rows = np.nanmax(table.numpy(), axis=-1).mean(-1)
    expected_columns = np.nanmean(np.nanmax(table.numpy()[..., :5], axis=-2), axis=-1)  # NaN column left out
    np.testing.assert_allclose(rows.numpy(), expected_rows, atol=1e-12)
    np.testing.assert_allclose(columns.numpy(), expected_columns, atol=1e-12)


def test_mean_max_correlation_small_table_by_hand():
    nan = float("nan")
    table = torch.tensor([[0.2, 0.9, nan], [nan, nan, nan], [-0.5, 0.1, nan]])
    rows, columns = mean_max_correlation(table)
    assert float(rows) == pytest.approx((0.9 + 0.1) / 2)
    assert float(columns) == pytest.approx((0.2 + 0.9) / 2)
    all_nan = mean_max_correlation(torch.full((2, 2), nan))
    assert torch.isnan(all_nan[0]) and torch.isnan(all_nan[1])


def song_unbiased_cka(x, y):
    """CKA from n x n Gram matrices with Song et al.'s unbiased HSIC estimator: an independent oracle."""

    def hsic(k, l):
        n = len(k)
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        ones = np.ones(n)
        return (
            np.trace(k @ l)
            + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (ones @ k @ l @ ones)
        ) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_cka_identity_invariances_and_oracle(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((80, 12))
    y = x[:, :5] @ rng.standard_normal((5, 9)) + rng.standard_normal((80, 9))
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    for debiased in (True, False):
        assert float(linear_cka(x_t, x_t, debiased=debiased)) == pytest.approx(1.0, abs=CKA_ATOL)
        base = float(linear_cka(x_t, y_t, debiased=debiased))
        rotated = float(linear_cka(torch.from_numpy(x @ rotation), y_t, debiased=debiased))
        scaled = float(linear_cka(3.5 * x_t + 2.0, y_t, debiased=debiased))
        assert rotated == pytest.approx(base, abs=CKA_ATOL) and scaled == pytest.approx(base, abs=CKA_ATOL)
    assert float(linear_cka(x_t, y_t)) == pytest.approx(song_unbiased_cka(x, y), abs=CKA_ATOL)


def test_debiased_cka_is_near_zero_for_independent_data():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((4, 300, 50)))
    y = torch.from_numpy(rng.standard_normal((4, 300, 60)))
    debiased = linear_cka(x, y)
    biased = linear_cka(x, y, debiased=False)
    assert debiased.shape == (4,)
    assert float(debiased.abs().max()) < 0.02
    assert float(biased.min()) > 0.1  # the biased estimator grows with the feature counts

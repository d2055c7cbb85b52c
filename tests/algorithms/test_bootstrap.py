"""The image bootstrap: agreement with scipy on explicit resamples, coverage by simulation, calls."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from rsvc_cli.algorithms.bootstrap import ImageBootstrap, concept_calls, percentile_interval
from rsvc_cli.algorithms.metrics import concept_correlation, pearson

PEARSON_ATOL = 1e-10
# Coverage of a nominal 95 % interval over N_DRAWS simulated draws must fall in this window.
COVERAGE_WINDOW = (0.93, 0.97)
N_DRAWS = 400


def clustered_draws(rng, n_draws, n_images, per_image, rho, icc):
    """x, y (n_images * per_image, n_draws): Pearson rho between x and y on every patch, and
    within-image correlation icc (an image effect shared by its patches); image index per patch."""
    chol = np.linalg.cholesky(np.array([[1.0, rho], [rho, 1.0]]))
    image_effect = rng.standard_normal((n_images, 1, n_draws, 2)) @ chol.T
    patch_effect = rng.standard_normal((n_images, per_image, n_draws, 2)) @ chol.T
    values = (np.sqrt(icc) * image_effect + np.sqrt(1 - icc) * patch_effect).reshape(-1, n_draws, 2)
    return values[..., 0], values[..., 1], np.repeat(np.arange(n_images), per_image)


def coverage(unit: str, rho=0.5, n_images=120, per_image=6, icc=0.5, n_chunks=4, seed=0):
    """Share of N_DRAWS draws whose 95 % interval covers rho. Draws are the concept axis (all
    resampled at once); each chunk of draws gets its own resamples."""
    rng = np.random.default_rng(seed)
    hits = []
    for chunk in range(n_chunks):
        x, y, image_index = clustered_draws(rng, N_DRAWS // n_chunks, n_images, per_image, rho, icc)
        groups = image_index if unit == "image" else np.arange(len(image_index))
        low, high, _ = percentile_interval(ImageBootstrap(1000, seed=(seed, chunk)).fit(groups).pearson(x, y))
        hits.append((low <= rho) & (rho <= high))
    return float(np.concatenate(hits).mean())


def test_image_bootstrap_covers_the_true_correlation():
    observed = coverage("image")
    assert COVERAGE_WINDOW[0] <= observed <= COVERAGE_WINDOW[1], observed


def test_resampling_patches_as_independent_undercovers():
    # Same simulation, each patch its own unit: the intervals ignore within-image correlation and
    # are too narrow: 0.81 here against 0.95 nominal (image resampling: 0.95; with 200 images of 8
    # patches, 0.75 against 0.93).
    observed = coverage("patch")
    assert observed < 0.88, observed


def scipy_pearson(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pearsonr(x, y)[0]


def explicit_rows(counts, image_of_patch):
    """Patch rows of one resample: each image's patches repeated as often as it was drawn."""
    return np.concatenate([np.flatnonzero(image_of_patch == i) for i, c in enumerate(counts) for _ in range(int(c))])


@pytest.mark.parametrize("seed", [0, 1])
def test_resampled_pearson_matches_scipy_on_explicit_resamples(seed):
    rng = np.random.default_rng(seed)
    image_index = rng.integers(100, 140, size=300)  # uneven patch counts, ids not 0..n-1
    x = rng.standard_normal((300, 4)) + 3.0
    y = 0.6 * x + rng.standard_normal((300, 4))
    x[:, 3] = np.where(image_index < 103, x[:, 3], 0.0)  # sparse: constant on some resamples
    boot = ImageBootstrap(50, seed=seed).fit(image_index)
    r = boot.pearson(x, y).numpy()
    for b in range(5):
        rows = explicit_rows(boot.counts_[b], boot.image_of_patch_)
        expected = [scipy_pearson(x[rows, j], y[rows, j]) for j in range(4)]
        np.testing.assert_allclose(r[b], expected, rtol=0, atol=PEARSON_ATOL)
    all_once = ImageBootstrap(1, seed=0).fit(image_index)
    all_once.counts_[:] = 1.0
    all_once._counts[:] = 1.0
    np.testing.assert_allclose(all_once.pearson(x, y).numpy()[0], pearson(x, y).numpy(), atol=PEARSON_ATOL)


def test_constant_truth_is_undefined_and_constant_prediction_is_zero():
    rng = np.random.default_rng(3)
    image_index = np.repeat(np.arange(30), 5)
    x = rng.standard_normal((150, 3))
    y = rng.standard_normal((150, 3))
    x[:, 0] = 0.1  # constant truth: undefined on every resample
    y[:, 1] = 0.3  # constant prediction: 0 on every resample
    x[:, 2] = np.where(image_index == 0, 1.0, 0.0)  # constant exactly on resamples missing image 0
    boot = ImageBootstrap(400, seed=1).fit(image_index)
    r = boot.pearson(x, y).numpy()
    assert np.isnan(r[:, 0]).all()
    assert (r[:, 1] == 0).all()
    missing = boot.counts_[:, 0] == 0
    assert 0 < missing.sum() < 400
    np.testing.assert_array_equal(np.isnan(r[:, 2]), missing)
    low, high, undefined = percentile_interval(r)
    assert np.isnan(low[0]) and undefined[0] == 400 and undefined[2] == missing.sum()
    assert low[1] == high[1] == 0


def test_resampled_concept_correlation_matches_the_table():
    rng = np.random.default_rng(4)
    image_index = np.repeat(np.arange(20), 6)
    u1, u2 = rng.random((120, 3)), rng.random((120, 4))
    u2[:, 0] = u1[:, 0] + 0.1 * rng.random(120)
    boot = ImageBootstrap(6, seed=2).fit(image_index)
    tables = boot.concept_correlation(u1, u2).numpy()
    for b in range(3):
        rows = explicit_rows(boot.counts_[b], boot.image_of_patch_)
        np.testing.assert_allclose(tables[b], concept_correlation(u1[rows], u2[rows]).numpy(), atol=PEARSON_ATOL)


def test_seeded_resamples_repeat():
    image_index = np.repeat(np.arange(10), 3)
    a, b = ImageBootstrap(20, seed=(0, 1)).fit(image_index), ImageBootstrap(20, seed=(0, 1)).fit(image_index)
    np.testing.assert_array_equal(a.counts_, b.counts_)
    assert (a.counts_.sum(1) == 10).all()
    assert not np.array_equal(a.counts_, ImageBootstrap(20, seed=(0, 2)).fit(image_index).counts_)


def test_calls_follow_the_intervals():
    #                       specific  shared  unreliable  uncertain  low self but shared gap  undefined
    gap_low = np.array([0.45, -0.05, 0.30, 0.05, -0.02, np.nan])
    gap_high = np.array([0.60, 0.08, 0.60, 0.40, 0.05, np.nan])
    self_low = np.array([0.80, 0.90, 0.10, 0.90, 0.20, np.nan])
    self_high = np.array([0.95, 0.95, 0.45, 0.95, 0.40, np.nan])
    defined = np.array([True, True, True, True, True, False])
    calls = concept_calls(gap_low, gap_high, self_low, self_high, defined)
    assert list(calls) == ["model-specific", "shared", "unreliable", "uncertain", "unreliable", "undefined"]
    # A weak self baseline (lower bound 0.45) blocks the model-specific call however big the gap.
    assert concept_calls([0.5], [0.6], [0.45], [0.9])[0] == "uncertain"
    # A gap surely above 0.2 but not 0.4 (two similar trained models) is no call by default.
    assert concept_calls([0.3], [0.5], [0.9], [0.95])[0] == "uncertain"

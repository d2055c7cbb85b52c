"""Batched regressors against scikit-learn; grouped folds; leak-free cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso as SklearnLasso
from sklearn.linear_model import LinearRegression as SklearnLinearRegression
from sklearn.linear_model import Ridge as SklearnRidge
from sklearn.preprocessing import StandardScaler

from rsvc_cli.algorithms.regression import (
    ALPHA_GRID,
    Lasso,
    LinearRegression,
    Ridge,
    choose_alpha,
    cross_validate,
    grouped_kfold,
    held_out_error,
    make_regressor,
)
from rsvc_cli.errors import RsvcError

# Lasso objective relative to scikit-learn's optimum (its tol=1e-10, unlimited iterations).
OBJECTIVE_RTOL = 1e-6
# Closed-form regressors and cross-validated predictions against scikit-learn.
COEF_ATOL = 1e-8
# Cross-validated predictions from float32 inputs, whose second moments are float32 products,
# relative to each target's spread.
FLOAT32_PREDICTION_RTOL = 1e-5


def lasso_objective(X, y, coef, intercept, alpha):
    return 0.5 * np.mean((y - X @ coef - intercept) ** 2) + alpha * np.abs(coef).sum()


def correlated_problem(seed, n=200, p=40, t=3, standardized=True):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 6))
    X = latent @ rng.standard_normal((6, p)) + 0.5 * rng.standard_normal((n, p)) + 3.0
    Y = X[:, :4] @ rng.standard_normal((4, t)) + rng.standard_normal((n, t))
    if standardized:
        X, Y = StandardScaler().fit_transform(X), StandardScaler().fit_transform(Y)
    return X, Y


def sklearn_lasso(X, y, alpha, tol=1e-10):
    return SklearnLasso(alpha=alpha, tol=tol, max_iter=1_000_000).fit(X, y)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_lasso_objective_matches_sklearn_multi_target(alpha, seed, solver_path):
    X, Y = correlated_problem(seed)
    ours = Lasso(alpha=alpha).fit(torch.from_numpy(X), torch.from_numpy(Y))
    assert ours.coef_.shape == (3, 40) and ours.intercept_.shape == (3,)
    for target in range(Y.shape[1]):
        reference = sklearn_lasso(X, Y[:, target], alpha)
        ours_objective = lasso_objective(
            X, Y[:, target], ours.coef_[target].numpy(), float(ours.intercept_[target]), alpha
        )
        reference_objective = lasso_objective(X, Y[:, target], reference.coef_, reference.intercept_, alpha)
        assert ours_objective <= reference_objective * (1 + OBJECTIVE_RTOL)


def test_lasso_batched_over_leading_dimensions_and_unstandardized_data(solver_path):
    problems = [correlated_problem(seed, standardized=False) for seed in (2, 3, 4, 5)]
    X = torch.from_numpy(np.stack([x for x, _ in problems]).reshape(2, 2, 200, 40))
    Y = torch.from_numpy(np.stack([y for _, y in problems]).reshape(2, 2, 200, 3))
    ours = Lasso(alpha=0.05).fit(X, Y)
    assert ours.coef_.shape == (2, 2, 3, 40) and ours.dual_gap_.shape == (2, 2, 3)
    for index, (x, y) in enumerate(problems):
        i, j = divmod(index, 2)
        for target in range(3):
            reference = sklearn_lasso(x, y[:, target], 0.05)
            coef, intercept = ours.coef_[i, j, target].numpy(), float(ours.intercept_[i, j, target])
            mine = lasso_objective(x, y[:, target], coef, intercept, 0.05)
            theirs = lasso_objective(x, y[:, target], reference.coef_, reference.intercept_, 0.05)
            assert mine <= theirs * (1 + OBJECTIVE_RTOL)
        np.testing.assert_allclose(
            ours.predict(X)[i, j].numpy(), x @ ours.coef_[i, j].numpy().T + ours.intercept_[i, j].numpy(), atol=1e-10
        )


def test_lasso_handles_constant_features_and_targets(solver_path):
    X, Y = correlated_problem(6)
    X[:, 5] = 2.0  # a constant feature
    Y[:, 1] = -1.0  # a constant target
    ours = Lasso(alpha=0.1).fit(torch.from_numpy(X), torch.from_numpy(Y))
    assert torch.all(ours.coef_[:, 5] == 0)
    assert torch.all(ours.coef_[1] == 0) and float(ours.intercept_[1]) == pytest.approx(-1.0)
    assert torch.isfinite(ours.coef_).all()


def test_ridge_and_linear_regression_match_sklearn():
    X, Y = correlated_problem(7, standardized=False)
    for ours, reference in (
        (Ridge(alpha=3.0), SklearnRidge(alpha=3.0)),
        (LinearRegression(), SklearnLinearRegression()),
    ):
        ours.fit(torch.from_numpy(X), torch.from_numpy(Y))
        reference.fit(X, Y)
        np.testing.assert_allclose(ours.coef_.numpy(), reference.coef_, atol=COEF_ATOL)
        np.testing.assert_allclose(ours.intercept_.numpy(), reference.intercept_, atol=COEF_ATOL)
        np.testing.assert_allclose(ours.predict(torch.from_numpy(X)).numpy(), reference.predict(X), atol=COEF_ATOL)


def test_sample_mask_fits_only_the_masked_rows():
    X, Y = correlated_problem(8)
    mask = np.random.default_rng(8).random(200) < 0.7
    masked = Ridge(alpha=2.0).fit(torch.from_numpy(X), torch.from_numpy(Y), sample_mask=torch.from_numpy(mask))
    subset = Ridge(alpha=2.0).fit(torch.from_numpy(X[mask]), torch.from_numpy(Y[mask]))
    torch.testing.assert_close(masked.coef_, subset.coef_)
    torch.testing.assert_close(masked.intercept_, subset.intercept_)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_kfold_never_splits_a_group_and_balances(seed):
    rng = np.random.default_rng(seed)
    groups = torch.from_numpy(rng.permutation(np.repeat(np.arange(53), 16)))
    fold_of_row = grouped_kfold(groups, n_folds=5, seed=seed)
    for group in torch.unique(groups):
        assert len(torch.unique(fold_of_row[groups == group])) == 1
    sizes = torch.bincount(fold_of_row, minlength=5)
    assert len(sizes) == 5 and int(sizes.max() - sizes.min()) <= 16
    assert torch.equal(fold_of_row, grouped_kfold(groups, n_folds=5, seed=seed))
    assert not torch.equal(fold_of_row, grouped_kfold(groups, n_folds=5, seed=seed + 10))


def test_grouped_kfold_balances_unequal_groups_and_refuses_too_few():
    sizes = np.array([30, 1, 2, 3, 25, 4, 5, 6, 20, 7, 8, 9, 3, 3])
    groups = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes))
    fold_sizes = torch.bincount(grouped_kfold(groups, n_folds=3, seed=0), minlength=3)
    assert int(fold_sizes.max() - fold_sizes.min()) <= int(sizes.max())
    with pytest.raises(RsvcError, match="folds"):
        grouped_kfold(torch.arange(4), n_folds=5)


def manual_cross_validation(X, Y, fold_of_row, alpha):
    """The protocol with scikit-learn: per fold, scalers fitted on the training rows only.
    Returns the held-out predictions, each fold's x means and scales, and each fold's model and
    standardized training data (for objectives)."""
    predictions = np.zeros_like(Y)
    x_means, x_scales, fits = [], [], []
    for fold in range(int(fold_of_row.max()) + 1):
        train = fold_of_row != fold
        x_scaler, y_scaler = StandardScaler().fit(X[train]), StandardScaler().fit(Y[train])
        x_means.append(x_scaler.mean_)
        x_scales.append(x_scaler.scale_)
        model = SklearnLasso(alpha=alpha, tol=1e-12, max_iter=1_000_000)
        model.fit(x_scaler.transform(X[train]), y_scaler.transform(Y[train]))
        standardized = model.predict(x_scaler.transform(X[~train])).reshape(-1, Y.shape[1])
        predictions[~train] = y_scaler.inverse_transform(standardized)
        fits.append((model, x_scaler.transform(X[train]), y_scaler.transform(Y[train])))
    return predictions, np.array(x_means), np.array(x_scales), fits


def protocol_problem():
    problems = [correlated_problem(seed, n=168, p=20, standardized=False) for seed in (9, 10)]
    X = np.stack([x for x, _ in problems])
    Y = np.stack([y for _, y in problems])
    groups = np.repeat(np.arange(21), 8)  # 21 images in 4 folds: unequal fold sizes
    folds = torch.stack([grouped_kfold(torch.from_numpy(groups), 4, seed=s) for s in (0, 1)])  # (B, n)
    assert len(torch.unique(torch.bincount(folds[0]))) == 2
    return X, Y, folds


def test_cross_validate_matches_the_sklearn_protocol_per_batch_entry(solver_path):
    X, Y, folds = protocol_problem()
    result = cross_validate(torch.from_numpy(X), torch.from_numpy(Y), folds, Lasso(alpha=0.1))
    assert result.coef_.shape == (2, 4, 3, 20) and result.held_out_prediction.shape == (2, 168, 3)
    for index in range(2):
        expected, x_means, x_scales, _ = manual_cross_validation(X[index], Y[index], folds[index].numpy(), 0.1)
        np.testing.assert_allclose(result.held_out_prediction[index].numpy(), expected, atol=COEF_ATOL)
        np.testing.assert_allclose(result.x_mean_[index].numpy(), x_means, atol=1e-10)
        np.testing.assert_allclose(result.x_scale_[index].numpy(), x_scales, rtol=1e-10)


def test_alpha_cv_picks_the_alpha_of_the_sklearn_protocol_on_grouped_folds():
    """regression.alpha=cv: per batch entry, the grid alpha of least held-out error (LassoCV's
    criterion: mean over folds of each fold's mean squared error) under the same grouped folds."""
    X, Y, folds = protocol_problem()
    X = X + 3.0 * np.random.default_rng(0).standard_normal(X.shape)  # noisy inputs: a middle alpha wins
    errors = torch.stack([held_out_error(torch.from_numpy(Y), cross_validate(
        torch.from_numpy(X), torch.from_numpy(Y), folds, Lasso(alpha=a)).held_out_prediction, folds) for a in ALPHA_GRID])
    chosen = choose_alpha(errors, ALPHA_GRID)
    for index in range(2):
        fold_of_row = folds[index].numpy()
        expected_errors = []
        for alpha in ALPHA_GRID:
            predictions = manual_cross_validation(X[index], Y[index], fold_of_row, alpha)[0]
            per_fold = [((Y[index][fold_of_row == f] - predictions[fold_of_row == f]) ** 2).mean(0) for f in range(4)]
            expected_errors.append((np.mean(per_fold, 0) / Y[index].var(0)).sum())
        np.testing.assert_allclose(errors[:, index].numpy(), expected_errors, rtol=1e-6)
        best = ALPHA_GRID[int(np.argmin(expected_errors))]
        assert chosen[index].item() == best
        assert ALPHA_GRID[0] < best < ALPHA_GRID[-1], "the simulation should not pick a grid edge"
    # ties go to the sparsest model, as LassoCV
    assert choose_alpha(torch.tensor([[1.0], [1.0], [2.0]]), (0.1, 1.0, 0.01)).item() == 1.0


def test_cross_validate_in_chunks_of_batch_entries_gives_the_same_result(monkeypatch):
    """Batch entries go through in chunks (bounded memory); the result, and the lasso's per-problem
    diagnostics, must be those of one pass over everything."""
    import rsvc_cli.algorithms.regression as regression

    X, Y, folds = protocol_problem()
    X, Y = torch.from_numpy(X), torch.from_numpy(Y)
    whole_lasso = Lasso(alpha=0.1)
    whole = cross_validate(X, Y, folds, whole_lasso)
    monkeypatch.setattr(regression, "_GRAM_CHUNK_ELEMENTS", 1)  # one batch entry per chunk
    chunked_lasso = Lasso(alpha=0.1)
    chunked = cross_validate(X, Y, folds, chunked_lasso)
    for field in ("coef_", "intercept_", "x_mean_", "x_scale_", "y_mean_", "y_scale_", "held_out_prediction"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked.fold_of_row, whole.fold_of_row)
    assert chunked_lasso.n_iter_.shape == whole_lasso.n_iter_.shape == (2, 4, 3)
    torch.testing.assert_close(chunked_lasso.dual_gap_, whole_lasso.dual_gap_, rtol=0, atol=1e-12)


def test_cross_validate_on_float32_inputs_reaches_the_same_optimum(solver_path):
    """Float32 activations get float32 products: the held-out predictions move by far less than
    the stored float32 precision matters for, and every fold's lasso objective stays within the
    tolerance of scikit-learn's on the same (float32-held) values."""
    X, Y, folds = protocol_problem()
    result = cross_validate(torch.from_numpy(X).float(), torch.from_numpy(Y), folds, Lasso(alpha=0.1))
    X = X.astype(np.float32).astype(np.float64)  # what the float32 input holds
    for index in range(2):
        expected, x_means, _, fits = manual_cross_validation(X[index], Y[index], folds[index].numpy(), 0.1)
        np.testing.assert_allclose(result.held_out_prediction[index].numpy(), expected,
                                   atol=FLOAT32_PREDICTION_RTOL * Y[index].std(0).min())
        np.testing.assert_allclose(result.x_mean_[index].numpy(), x_means, rtol=1e-7)
        for fold, (model, x_train, y_train) in enumerate(fits):
            for target in range(3):
                ours = result.coef_[index, fold, target].numpy(), float(result.intercept_[index, fold, target])
                mine = lasso_objective(x_train, y_train[:, target], *ours, 0.1)
                theirs = lasso_objective(x_train, y_train[:, target], model.coef_[target], model.intercept_[target], 0.1)
                assert mine <= theirs * (1 + OBJECTIVE_RTOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_columns_constant_on_a_fold_s_training_rows_get_scale_one(dtype, solver_path):
    """A ReLU channel silent on every training row of a fold but active on a held-out row: its
    training variance is exactly 0, so StandardScaler gives it scale 1, and so must we (a
    variance computed from sums would leave rounding noise and blow the column up)."""
    X, Y, folds = protocol_problem()
    X, Y, folds = X[:1], Y[:1], folds[:1]
    held_out_of_fold_2 = np.flatnonzero(folds[0].numpy() == 2)
    X[0, :, 7] = 0.0
    X[0, held_out_of_fold_2[:3], 7] = [4.0, 0.5, 2.5]  # only fold 2's rows are non-zero
    X[0, :, 8] = 3.25  # constant everywhere
    Y[0, :, 2] = 0.0
    Y[0, held_out_of_fold_2[0], 2] = 1.0  # a concept seen only in fold 2's rows
    result = cross_validate(torch.from_numpy(X).to(dtype), torch.from_numpy(Y), folds, Lasso(alpha=0.1))
    X = X.astype(np.float32).astype(np.float64) if dtype == torch.float32 else X
    expected, x_means, x_scales, _ = manual_cross_validation(X[0], Y[0], folds[0].numpy(), 0.1)
    assert x_scales[2, 7] == 1.0 and x_scales[:, 8].tolist() == [1.0] * 4  # what scikit-learn does
    np.testing.assert_array_equal(result.x_scale_[0, :, 8].numpy(), 1.0)
    assert float(result.x_scale_[0, 2, 7]) == 1.0 and float(result.y_scale_[0, 2, 2]) == 1.0
    assert float(result.x_mean_[0, 2, 7]) == 0.0 and float(result.x_mean_[0, 0, 8]) == 3.25
    assert torch.all(result.coef_[0, 2, :, 7] == 0) and torch.all(result.coef_[0, 2, 2] == 0)
    np.testing.assert_allclose(result.held_out_prediction[0].numpy(), expected,
                               atol=COEF_ATOL if dtype == torch.float64 else FLOAT32_PREDICTION_RTOL * Y[0].std(0).max())


def test_lasso_falls_back_on_coordinate_descent_when_newton_steps_run_out(monkeypatch, solver_path):
    """With a single active-set Newton step per round most problems are not solved by Newton; the
    coordinate descent must still reach scikit-learn's optimum."""
    import rsvc_cli.algorithms.regression as regression

    monkeypatch.setattr(regression, "_NEWTON_STEPS", 1)
    monkeypatch.setattr(regression, "_SWEEPS_PER_NEWTON", 1)
    X, Y = correlated_problem(14)
    ours = Lasso(alpha=0.02).fit(torch.from_numpy(X), torch.from_numpy(Y))
    assert int(ours.n_iter_.max()) > 3  # the sweeps, not the first Newton step, did the work
    for target in range(Y.shape[1]):
        reference = sklearn_lasso(X, Y[:, target], 0.02)
        mine = lasso_objective(X, Y[:, target], ours.coef_[target].numpy(), float(ours.intercept_[target]), 0.02)
        theirs = lasso_objective(X, Y[:, target], reference.coef_, reference.intercept_, 0.02)
        assert mine <= theirs * (1 + OBJECTIVE_RTOL)


def test_compiled_and_batched_lasso_solvers_agree(monkeypatch):
    """Same algorithm on both paths: the same optimum to rounding and the same sweep counts, on
    problems that need several working-set rounds (p > the initial working set) and targets of
    different difficulty."""
    from rsvc_cli.algorithms import compiled, regression

    assert compiled.enabled(), "numba is missing: the compiled kernels are a dependency of rsvc"
    rng = np.random.default_rng(21)
    latent = rng.standard_normal((4, 300, 10))
    X = latent @ rng.standard_normal((4, 10, 150)) + rng.standard_normal((4, 300, 150))
    Y = latent @ rng.standard_normal((4, 10, 5)) + rng.standard_normal((4, 300, 5))
    X, Y = torch.from_numpy(X), torch.from_numpy(Y)
    results = {}
    for path in ("1", "0"):
        monkeypatch.setenv("RSVC_COMPILED_KERNELS", path)
        results[path] = Lasso(alpha=0.02).fit(X, Y)
    compiled_fit, batched_fit = results["1"], results["0"]
    assert int((compiled_fit.coef_ != 0).sum(-1).max()) > regression._INITIAL_WORKING_SET // 2
    torch.testing.assert_close(compiled_fit.coef_, batched_fit.coef_, rtol=0, atol=1e-10)
    assert torch.equal(compiled_fit.n_iter_, batched_fit.n_iter_)
    assert float(compiled_fit.dual_gap_.max()) <= 1e-8 * float(Y.var(-2).min())


def test_cross_validated_predict_averages_the_fold_models():
    X, Y = correlated_problem(11, n=160, p=20, standardized=False)
    folds = grouped_kfold(torch.from_numpy(np.repeat(np.arange(20), 8)), 5, seed=0)
    result = cross_validate(torch.from_numpy(X)[None], torch.from_numpy(Y)[None], folds, Ridge(alpha=1.0))
    X_new = np.random.default_rng(11).standard_normal((30, 20)) + 3.0
    expected = np.zeros((30, 3))
    for fold in range(5):
        train = folds.numpy() != fold
        x_scaler, y_scaler = StandardScaler().fit(X[train]), StandardScaler().fit(Y[train])
        model = SklearnRidge(alpha=1.0).fit(x_scaler.transform(X[train]), y_scaler.transform(Y[train]))
        expected += y_scaler.inverse_transform(model.predict(x_scaler.transform(X_new))) / 5
    np.testing.assert_allclose(result.predict(torch.from_numpy(X_new)[None])[0].numpy(), expected, atol=COEF_ATOL)


def test_standardization_statistics_never_see_held_out_rows(solver_path):
    """Fold 0's rows live on a wildly different scale; a leaky implementation would fold them into
    every model's statistics. Each fold's statistics and predictions must equal a train-only
    computation and differ from the leaky one."""
    rng = np.random.default_rng(12)
    groups = np.repeat(np.arange(25), 8)
    folds = grouped_kfold(torch.from_numpy(groups), 5, seed=0).numpy()
    X = rng.standard_normal((200, 6))
    Y = X @ rng.standard_normal((6, 2)) + 0.1 * rng.standard_normal((200, 2))
    X[folds == 0] = 50.0 * X[folds == 0] + 1000.0
    Y[folds == 0] = 20.0 * Y[folds == 0] - 300.0
    result = cross_validate(torch.from_numpy(X)[None], torch.from_numpy(Y)[None], torch.from_numpy(folds), Ridge(1.0))
    for fold in range(5):
        train = folds != fold
        np.testing.assert_allclose(result.x_mean_[0, fold].numpy(), X[train].mean(0), atol=1e-9)
        np.testing.assert_allclose(result.x_scale_[0, fold].numpy(), X[train].std(0), rtol=1e-9)
        np.testing.assert_allclose(result.y_mean_[0, fold].numpy(), Y[train].mean(0), atol=1e-9)
        np.testing.assert_allclose(result.y_scale_[0, fold].numpy(), Y[train].std(0), rtol=1e-9)
        if fold != 0:  # the leaky statistics (all rows) are far from the train-only ones
            assert np.abs(result.x_mean_[0, fold].numpy() - X.mean(0)).min() > 10
    # Held-out predictions of fold 1 from the train-only pipeline, and from a leaky one.
    train = folds != 1
    model = SklearnRidge(1.0)
    x_scaler, y_scaler = StandardScaler().fit(X[train]), StandardScaler().fit(Y[train])
    model.fit(x_scaler.transform(X[train]), y_scaler.transform(Y[train]))
    honest = y_scaler.inverse_transform(model.predict(x_scaler.transform(X[~train])))
    leaky_x, leaky_y = StandardScaler().fit(X), StandardScaler().fit(Y)
    model.fit(leaky_x.transform(X[train]), leaky_y.transform(Y[train]))
    leaky = leaky_y.inverse_transform(model.predict(leaky_x.transform(X[~train])))
    ours = result.held_out_prediction[0].numpy()[~train]
    np.testing.assert_allclose(ours, honest, atol=COEF_ATOL)
    assert np.abs(ours - leaky).max() > 1e-3


def test_cross_validate_without_standardization_fits_raw_training_rows():
    X, Y = correlated_problem(13, n=120, p=10, standardized=False)
    folds = grouped_kfold(torch.from_numpy(np.repeat(np.arange(15), 8)), 3, seed=0)
    result = cross_validate(torch.from_numpy(X)[None], torch.from_numpy(Y)[None], folds, Lasso(0.05), standardize=False)
    assert torch.all(result.x_scale_ == 1) and torch.all(result.x_mean_ == 0)
    train = folds.numpy() != 2
    for target in range(3):
        reference = sklearn_lasso(X[train], Y[train, target], 0.05, tol=1e-12)
        np.testing.assert_allclose(result.coef_[0, 2, target].numpy(), reference.coef_, atol=1e-7)
        assert float(result.intercept_[0, 2, target]) == pytest.approx(reference.intercept_, abs=1e-7)


def test_regression_input_errors():
    X, Y = torch.rand(2, 50, 4), torch.rand(2, 50, 3)
    bad = X.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(RsvcError, match="NaN"):
        cross_validate(bad, Y, torch.arange(50) % 5, Lasso())
    with pytest.raises(RsvcError, match="same rows"):
        Lasso().fit(X, Y[:, :40])
    with pytest.raises(RsvcError, match="fold"):
        cross_validate(X, Y, torch.zeros(50, dtype=torch.long), Lasso())
    with pytest.raises(RsvcError, match="alpha"):
        Lasso(alpha=-1.0).fit(X, Y)
    with pytest.raises(RsvcError, match="regressors"):
        cross_validate(X, Y, torch.arange(50) % 5, SklearnRidge())
    with pytest.raises(RsvcError, match="lasso"):
        make_regressor("elasticnet")
    assert isinstance(make_regressor("lasso", alpha=0.2), Lasso)


@pytest.mark.parametrize("n_features", [1, 2, 7, 64])
def test_symmetric_gram_equals_the_full_product(n_features):
    from rsvc_cli.algorithms.regression import _symmetric_gram

    x = torch.randn(2, 3, 11, n_features, dtype=torch.float64)
    out = torch.full((2, 3, n_features, n_features), torch.nan, dtype=torch.float64)
    torch.testing.assert_close(_symmetric_gram(x, out=out), x.mT @ x, rtol=1e-14, atol=1e-14)
    assert out.data_ptr() == _symmetric_gram(x, out=out).data_ptr()

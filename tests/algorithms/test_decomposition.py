"""Concept extraction: NMF against scikit-learn, Semi-NMF, PCA, k-means, sign treatments."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SklearnKMeans
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.decomposition import PCA as SklearnPCA
from sklearn.exceptions import ConvergenceWarning

from rsvc_cli.algorithms.decomposition import (
    NMF,
    PCA,
    KMeans,
    SemiNMF,
    apply_sign_treatment,
    make_decomposition,
)
from rsvc_cli.algorithms.stability import matched_cosines
from rsvc_cli.errors import RsvcError

# Our NMF's reconstruction error may exceed scikit-learn's (same init, max_iter) by at most this:
# solver="hals_accelerated" follows another path (other optima); solver="cd" makes its iterates.
NMF_ERROR_RTOL = 0.02
# solver="cd" against scikit-learn's cd run to convergence from the same NNDSVD start.
CD_ERROR_RTOL = 1e-6
CD_MIN_MATCHED_COSINE = 0.99
# NNLS coefficients of the training data against the fitted basis vs the fitted coefficients.
TRANSFORM_RTOL = 1e-2
PCA_ATOL = 1e-8


def random_nonnegative(seed, n=300, d=40):
    return np.abs(np.random.default_rng(seed).standard_normal((n, d)))


def planted_low_rank(seed, n=300, d=40, rank=5, noise=0.0):
    rng = np.random.default_rng(seed)
    coefficients = rng.exponential(1.0, (n, rank)) * (rng.random((n, rank)) < 0.5)
    basis = rng.exponential(1.0, (rank, d)) * (rng.random((rank, d)) < 0.4)
    return coefficients @ basis + noise * np.abs(rng.standard_normal((n, d)))


def min_matched_cosine(basis, reference):
    """The smallest cosine between concepts paired one-to-one (Hungarian) for the largest summed cosine."""
    return float(matched_cosines(basis, reference).min())


def activation_like(seed, n_classes=3, n=400, d=48):
    """Sparse non-negative parts mixed, plus noise, through a ReLU (as scripts/bench_nmf.py)."""
    rng = np.random.default_rng(seed)
    parts = rng.exponential(1.0, (n_classes, 15, d)) * (rng.random((n_classes, 15, d)) < 0.25)
    mixing = rng.exponential(1.0, (n_classes, n, 15)) * (rng.random((n_classes, n, 15)) < 0.3)
    pre_activation = mixing @ parts
    pre_activation += 0.5 * rng.standard_normal(pre_activation.shape) - 0.4 * pre_activation.mean()
    return np.maximum(pre_activation, 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_default_nmf_reaches_sklearns_converged_cd_solution(seed, solver_path):
    """The default solver makes scikit-learn's cd iterates: from the same NNDSVD start, sklearn run to
    convergence (its own stopping rule, no iteration cap reached) has the same basis and error, and
    stops at the same iteration. A batch of classes, each compared alone."""
    from rsvc_cli.algorithms.decomposition import _nndsvd

    activations = activation_like(seed)
    ours = NMF(n_concepts=8, init="nndsvd", max_iter=2000, seed=0).fit(torch.from_numpy(activations))
    assert ours.solver == "cd" and ours.converged_.all()
    start_coefficients, start_basis = _nndsvd(torch.from_numpy(activations), 8, "nndsvd", 0)
    for index, class_activations in enumerate(activations):
        reference = SklearnNMF(8, init="custom", solver="cd", tol=ours.tol, max_iter=100_000)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            reference.fit(class_activations, W=start_coefficients[index].numpy().copy(),
                          H=start_basis[index].numpy().copy())
        assert min_matched_cosine(ours.concept_basis_[index].numpy(), reference.components_) >= CD_MIN_MATCHED_COSINE
        assert float(ours.reconstruction_error_[index]) == pytest.approx(reference.reconstruction_err_, rel=CD_ERROR_RTOL)
        assert int(ours.n_iter_[index]) == reference.n_iter_


def test_nmf_reports_a_fit_stopped_at_max_iter_as_not_converged(solver_path):
    activations = torch.from_numpy(activation_like(2, n_classes=2))
    for solver in ("cd", "hals_accelerated"):
        capped = NMF(8, solver=solver, max_iter=3, tol=1e-12).fit(activations)
        assert capped.n_iter_.tolist() == [3, 3] and not capped.converged_.any()
        free = NMF(8, solver=solver, max_iter=2000).fit(activations)
        assert free.converged_.all() and (free.n_iter_ < 2000).all()
    with pytest.raises(RsvcError, match="solver=cd"):
        NMF(3, solver="mu").fit(activations)


def sklearn_nmf_error(activations, n_concepts, max_iter=200):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = SklearnNMF(n_concepts, init="nndsvd", solver="cd", max_iter=max_iter, random_state=0)
        model.fit(activations)
    return model.reconstruction_err_


@pytest.mark.parametrize(
    "make_data",
    [
        lambda seed: random_nonnegative(seed),
        lambda seed: planted_low_rank(seed),
        lambda seed: planted_low_rank(seed, noise=0.05),
    ],
    ids=["random", "planted", "planted_noisy"],
)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("solver", ["cd", "hals_accelerated"])
def test_nmf_reconstruction_matches_sklearn(make_data, seed, solver, solver_path):
    activations = make_data(seed)
    ours = NMF(n_concepts=5, init="nndsvd", solver=solver, max_iter=200, seed=0).fit(torch.from_numpy(activations))
    reference = sklearn_nmf_error(activations, 5)
    scale = np.linalg.norm(activations)
    assert float(ours.reconstruction_error_) <= reference * (1 + NMF_ERROR_RTOL) + 1e-9 * scale
    # The reported error is the Frobenius norm of the residual, like sklearn's reconstruction_err_.
    residual = activations - ours.coefficients_.numpy() @ ours.concept_basis_.numpy()
    assert float(ours.reconstruction_error_) == pytest.approx(np.linalg.norm(residual), rel=1e-10)
    assert (ours.coefficients_ >= 0).all() and (ours.concept_basis_ >= 0).all()


def test_nmf_recovers_planted_low_rank_matrix(solver_path):
    activations = planted_low_rank(2)
    ours = NMF(n_concepts=5, max_iter=500, tol=1e-8).fit(torch.from_numpy(activations))
    assert float(ours.reconstruction_error_) < 1e-3 * np.linalg.norm(activations)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar"])
def test_nmf_is_deterministic_for_a_seed(init, solver_path):
    activations = torch.from_numpy(random_nonnegative(3))
    first = NMF(4, init=init, max_iter=50, seed=7).fit(activations)
    second = NMF(4, init=init, max_iter=50, seed=7).fit(activations)
    assert torch.equal(first.concept_basis_, second.concept_basis_)
    assert torch.equal(first.coefficients_, second.coefficients_)


def test_nmf_batch_entries_are_independent(solver_path):
    data = np.stack([random_nonnegative(4), planted_low_rank(5), random_nonnegative(6)])
    batched = NMF(4, max_iter=40).fit(torch.from_numpy(data))
    assert batched.concept_basis_.shape == (3, 4, 40)
    assert batched.coefficients_.shape == (3, 300, 4)
    assert batched.reconstruction_error_.shape == (3,) and batched.n_iter_.shape == (3,)
    for index in range(3):
        alone = NMF(4, max_iter=40).fit(torch.from_numpy(data[index]))
        assert int(alone.n_iter_) == int(batched.n_iter_[index])
        torch.testing.assert_close(batched.concept_basis_[index], alone.concept_basis_, rtol=1e-6, atol=1e-9)


def test_nmf_transform_of_training_data_matches_fitted_coefficients(solver_path):
    activations = torch.from_numpy(planted_low_rank(7, noise=0.01))
    model = NMF(5, max_iter=400, tol=1e-6).fit(activations)
    coefficients = model.transform(activations)
    difference = (coefficients - model.coefficients_).norm() / model.coefficients_.norm()
    assert float(difference) < TRANSFORM_RTOL
    rebuilt = model.inverse_transform(coefficients)
    assert rebuilt.shape == activations.shape


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_compiled_and_torch_hals_sweeps_agree(dtype, tolerance, monkeypatch):
    """The compiled kernel makes the torch sweeps' updates in the same order: the same factor to
    rounding and the same violation, over several column blocks, a concept stuck at zero (zero
    curvature: left as it is) and entries whose updates hit the bound."""
    from rsvc_cli.algorithms import compiled, decomposition

    assert compiled.enabled(), "numba is missing: the compiled kernels are a dependency of rsvc"
    rng = np.random.default_rng(10)
    activations = torch.from_numpy(rng.exponential(1.0, (3, 1300, 24))).to(dtype)
    basis = torch.from_numpy(rng.exponential(1.0, (3, 6, 24)) * (rng.random((3, 6, 24)) < 0.5)).to(dtype)
    basis[1, 2] = 0
    factor = torch.from_numpy(rng.exponential(1.0, (3, 6, 1300))).to(dtype)
    gram, cross = basis @ basis.mT, basis @ activations.mT
    results = {}
    for path in ("1", "0"):
        monkeypatch.setenv("RSVC_COMPILED_KERNELS", path)
        updated = factor.clone()
        violation = decomposition._hals_sweeps(updated, gram, cross, n_sweeps=2)
        results[path] = updated, violation
    (compiled_factor, compiled_violation), (torch_factor, torch_violation) = results["1"], results["0"]
    assert (torch_factor == 0).float().mean() > 0.1 and torch.equal(torch_factor[1, 2], factor[1, 2])
    scale = float(torch_factor.abs().max())
    torch.testing.assert_close(compiled_factor, torch_factor, rtol=0, atol=tolerance * scale)
    torch.testing.assert_close(compiled_violation, torch_violation, rtol=tolerance, atol=0)


def test_nmf_refuses_bad_input_with_a_fix():
    with pytest.raises(RsvcError, match="signed=clamp") as error:
        NMF(3).fit(torch.randn(50, 10))
    assert "semi_nmf" in str(error.value)
    with pytest.raises(RsvcError, match="concepts"):
        NMF(10).fit(torch.rand(5, 20))
    for bad_value in (float("nan"), float("inf")):
        activations = torch.rand(50, 10)
        activations[3, 4] = bad_value
        with pytest.raises(RsvcError, match="NaN or infinite"):
            NMF(3).fit(activations)
    with pytest.raises(RsvcError, match="init"):
        NMF(3, init="random").fit(torch.rand(50, 10))


def test_semi_nmf_beats_clamped_nmf_on_signed_data():
    rng = np.random.default_rng(8)
    coefficients = rng.exponential(1.0, (300, 5))
    basis = rng.standard_normal((5, 30))  # signed concepts
    activations = torch.from_numpy(coefficients @ basis + 0.05 * rng.standard_normal((300, 30)))
    semi = SemiNMF(5, seed=0).fit(activations)
    assert (semi.coefficients_ >= 0).all() and (semi.concept_basis_ < 0).any()
    clamped = NMF(5).fit(apply_sign_treatment(activations, "clamp"))
    clamped_error = (activations - clamped.inverse_transform(clamped.coefficients_)).norm()
    assert float(semi.reconstruction_error_) < 0.5 * float(clamped_error)
    residual = activations - semi.coefficients_ @ semi.concept_basis_
    assert float(semi.reconstruction_error_) == pytest.approx(float(residual.norm()), rel=1e-8)
    transformed = semi.transform(activations)
    assert (transformed >= 0).all()
    transformed_error = float((activations - transformed @ semi.concept_basis_).norm())
    assert transformed_error <= float(semi.reconstruction_error_) * (1 + 1e-9)


def test_pca_matches_sklearn():
    rng = np.random.default_rng(9)
    activations = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    ours = PCA(4).fit(torch.from_numpy(activations))
    reference = SklearnPCA(4).fit(activations)
    np.testing.assert_allclose(ours.concept_basis_.numpy(), reference.components_, atol=PCA_ATOL)
    np.testing.assert_allclose(ours.explained_variance_.numpy(), reference.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(ours.coefficients_.numpy(), reference.transform(activations), atol=PCA_ATOL)
    np.testing.assert_allclose(ours.transform(torch.from_numpy(activations)).numpy(), ours.coefficients_.numpy())
    rebuilt = ours.inverse_transform(ours.coefficients_).numpy()
    np.testing.assert_allclose(rebuilt, reference.inverse_transform(reference.transform(activations)), atol=PCA_ATOL)
    assert float(ours.reconstruction_error_) == pytest.approx(np.linalg.norm(activations - rebuilt), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_recovers_planted_clusters_and_matches_sklearn_inertia(seed):
    rng = np.random.default_rng(seed)
    centers = 10 * rng.standard_normal((4, 8))
    labels = rng.integers(0, 4, 400)
    activations = centers[labels] + rng.standard_normal((400, 8))
    ours = KMeans(4, seed=seed).fit(torch.from_numpy(activations))
    found = ours.labels_.numpy()
    # Each planted cluster is one found cluster (a bijection between the partitions).
    assert len({(a, b) for a, b in zip(labels, found)}) == 4
    assert torch.equal(ours.coefficients_.sum(-1), torch.ones(400, dtype=ours.coefficients_.dtype))
    reference = SklearnKMeans(4, n_init=1, random_state=seed).fit(activations)
    assert float(ours.inertia_) <= reference.inertia_ * (1 + 1e-6)
    assert float(ours.reconstruction_error_) == pytest.approx(np.sqrt(float(ours.inertia_)))
    torch.testing.assert_close(ours.transform(torch.from_numpy(activations)), ours.coefficients_)
    again = KMeans(4, seed=seed).fit(torch.from_numpy(activations))
    assert torch.equal(again.concept_basis_, ours.concept_basis_)


def test_make_decomposition_and_its_errors():
    assert isinstance(make_decomposition("nmf", n_concepts=3, seed=1), NMF)
    assert isinstance(make_decomposition("semi_nmf", n_concepts=3), SemiNMF)
    assert isinstance(make_decomposition("pca", n_concepts=3), PCA)
    assert isinstance(make_decomposition("kmeans", n_concepts=3, seed=0), KMeans)
    with pytest.raises(RsvcError, match="ica"):
        make_decomposition("ica")
    with pytest.raises(RsvcError, match="n_components"):
        make_decomposition("nmf", n_components=3)


def test_sign_treatments():
    activations = torch.tensor([[1.0, -2.0], [-0.5, 0.0]])
    torch.testing.assert_close(apply_sign_treatment(activations, "clamp"), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    split = apply_sign_treatment(activations, "split")
    torch.testing.assert_close(split, torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.5, 0.0]]))
    torch.testing.assert_close(split[:, :2] - split[:, 2:], activations)  # nothing lost
    with pytest.raises(RsvcError, match="signed"):
        apply_sign_treatment(activations, "error")
    assert torch.equal(apply_sign_treatment(activations.abs(), "error"), activations.abs())
    with pytest.raises(RsvcError, match="clamp"):
        apply_sign_treatment(activations, "abs")


def test_a_solver_for_a_method_without_one_is_an_error():
    from rsvc_cli.stages.decompose import make_estimator

    params = {"method": "semi_nmf", "n_concepts": 3, "solver": "cd", "max_iter": 10, "tol": 1e-4, "seed": 0}
    with pytest.raises(RsvcError, match="decomposition.solver=cd") as error:
        make_estimator(params)
    assert "decomposition=nmf" in error.value.fix
    assert make_estimator({**params, "method": "nmf"}).solver == "cd"
    assert isinstance(make_estimator({**params, "solver": None}), SemiNMF)

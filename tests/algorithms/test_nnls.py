"""Batched NNLS against scipy.optimize.nnls, row by row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from rsvc_cli.algorithms.nnls import nnls
from rsvc_cli.errors import RsvcError

# The contract: coefficients within this relative distance of scipy's (relative to the largest).
RELATIVE_TOL = 1e-5
# Where the solution is not unique (rank-deficient basis), the residual norms must agree this closely.
RESIDUAL_RTOL = 1e-9


# Every test runs on both paths: the compiled CPU kernel (rows it cannot finish go to the torch
# solver) and the torch solver alone, as on GPUs.
pytestmark = pytest.mark.usefixtures("solver_path")


def scipy_rows(activations, basis):
    return np.stack([scipy_nnls(basis.T, row)[0] for row in activations])


def assert_matches_scipy(activations, basis, **kwargs):
    ours = nnls(torch.from_numpy(activations), torch.from_numpy(basis), **kwargs).numpy()
    reference = scipy_rows(activations, basis)
    assert np.all(ours >= 0)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=RELATIVE_TOL * scale)
    return ours, reference


def residual_norms(activations, basis, coefficients):
    return np.linalg.norm(activations - coefficients @ basis, axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_data_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((8, 40))
    activations = rng.standard_normal((300, 40))
    _, reference = assert_matches_scipy(activations, basis)
    assert 0.2 < np.mean(reference == 0) < 0.8  # the constraints are active on many rows


@pytest.mark.parametrize("seed", [0, 1])
def test_nonnegative_nmf_like_data_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    basis = rng.exponential(1.0, (12, 64)) * (rng.random((12, 64)) < 0.4)
    truth = rng.exponential(1.0, (400, 12)) * (rng.random((400, 12)) < 0.5)
    activations = np.maximum(truth @ basis + 0.3 * rng.standard_normal((400, 64)), 0)
    assert_matches_scipy(activations, basis)


def test_ill_conditioned_basis_matches_scipy():
    rng = np.random.default_rng(3)
    left, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    right, _ = np.linalg.qr(rng.standard_normal((50, 10)))
    basis = (left * np.logspace(0, -4, 10)) @ right.T  # condition number 1e4
    activations = 3 * rng.standard_normal((300, 10)) @ basis + 0.01 * rng.standard_normal((300, 50))
    assert np.linalg.cond(basis) > 0.9e4
    assert_matches_scipy(activations, basis)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_rank_deficient_basis_reaches_scipys_residual(nonnegative):
    rng = np.random.default_rng(4)

    def draw(*shape):
        values = rng.standard_normal(shape)
        return np.abs(values) if nonnegative else values

    basis = draw(8, 5) @ draw(5, 40)  # 8 concepts spanning only 5 dimensions
    activations = draw(300, 40)
    ours = nnls(torch.from_numpy(activations), torch.from_numpy(basis)).numpy()
    reference = scipy_rows(activations, basis)
    assert np.all(ours >= 0)
    np.testing.assert_allclose(
        residual_norms(activations, basis, ours), residual_norms(activations, basis, reference), rtol=RESIDUAL_RTOL
    )


def test_planted_solution_with_exact_zeros_is_recovered():
    rng = np.random.default_rng(5)
    basis = rng.standard_normal((6, 30))
    truth = np.abs(rng.standard_normal((200, 6))) * (rng.random((200, 6)) < 0.5)
    # Noise orthogonal to the basis rows leaves the planted coefficients the exact (unique) optimum,
    # with a zero gradient at the zero coefficients: the degenerate case for active-set methods.
    noise = rng.standard_normal((200, 30))
    projector = basis.T @ np.linalg.solve(basis @ basis.T, basis)
    activations = truth @ basis + noise @ (np.eye(30) - projector)
    ours = nnls(torch.from_numpy(activations), torch.from_numpy(basis)).numpy()
    np.testing.assert_allclose(ours, truth, rtol=0, atol=RELATIVE_TOL * truth.max())
    assert np.all(ours[truth == 0] <= 1e-12 * truth.max())
    # scipy 1.17 stops early on a few of these rows (a larger residual than the planted optimum);
    # ours is never worse than scipy's.
    reference = scipy_rows(activations, basis)
    assert np.all(
        residual_norms(activations, basis, ours) <= residual_norms(activations, basis, reference) * (1 + 1e-12)
    )


def test_fallback_active_set_path_matches_scipy():
    """With no pivoting allowed, every open row goes through the Lawson-Hanson fallback."""
    rng = np.random.default_rng(6)
    basis = rng.standard_normal((7, 30))
    activations = rng.standard_normal((150, 30))
    assert_matches_scipy(activations, basis, max_iter=0)


def test_compiled_kernel_and_torch_solver_agree_on_float32_activations(monkeypatch):
    """Both paths solve the same rows exactly: the same coefficients to rounding, on NMF-like float32
    data where most rows need pivoting, and on a rank-deficient basis whose rows the kernel hands
    to the torch solver."""
    import rsvc_cli.algorithms.nnls as nnls_module

    rng = np.random.default_rng(12)
    basis = rng.exponential(1.0, (10, 96)) * (rng.random((10, 96)) < 0.3)
    truth = rng.exponential(1.0, (2000, 10)) * (rng.random((2000, 10)) < 0.4)
    activations = np.maximum(truth @ basis + 0.5 * rng.standard_normal((2000, 96)) - 0.3, 0).astype(np.float32)
    deficient = np.vstack([basis[:6], rng.random((4, 6)) @ basis[:6]])  # 10 concepts spanning 6 dimensions
    assert np.linalg.matrix_rank(deficient) == 6
    handed_over = []
    torch_solver = nnls_module.solve_nnls_gram
    monkeypatch.setattr(nnls_module, "solve_nnls_gram",
                        lambda gram, rhs, *args, **kwargs: handed_over.append(rhs.shape[-2])
                        or torch_solver(gram, rhs, *args, **kwargs))
    results = {}
    for path in ("1", "0"):
        monkeypatch.setenv("RSVC_COMPILED_KERNELS", path)
        handed_over.clear()
        results[path] = [nnls(torch.from_numpy(activations), torch.from_numpy(b)).double() for b in (basis, deficient)]
        if path == "1":
            assert 0 < sum(handed_over) < 2000  # only the rows of the singular passive sets
    torch.testing.assert_close(results["1"][0], results["0"][0], rtol=0, atol=1e-10 * float(results["0"][0].max()))
    residual = [residual_norms(activations.astype(np.float64), deficient, r[1].numpy()) for r in results.values()]
    np.testing.assert_allclose(residual[0], residual[1], rtol=RESIDUAL_RTOL)


def test_batched_equals_one_at_a_time_and_shared_basis_broadcasts():
    rng = np.random.default_rng(7)
    activations = torch.from_numpy(rng.standard_normal((3, 2, 50, 20)))
    bases = torch.from_numpy(rng.standard_normal((3, 1, 5, 20)))
    batched = nnls(activations, bases)
    assert batched.shape == (3, 2, 50, 5)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(batched[i, j], nnls(activations[i, j], bases[i, 0]), rtol=0, atol=1e-12)
    shared = nnls(activations, bases[0, 0])
    torch.testing.assert_close(shared[1, 1], nnls(activations[1, 1], bases[0, 0]), rtol=0, atol=1e-12)


def test_dtype_is_kept_and_degenerate_rows_and_concepts_are_handled():
    rng = np.random.default_rng(8)
    basis = rng.standard_normal((4, 16))
    basis[2] = 0.0  # a dead concept
    activations = rng.standard_normal((40, 16))
    activations[0] = 0.0  # an all-zero row
    ours = nnls(torch.from_numpy(activations).float(), torch.from_numpy(basis).float())
    assert ours.dtype == torch.float32
    assert torch.all(ours[0] == 0) and torch.all(ours[:, 2] == 0)
    reference = scipy_rows(activations, basis)
    np.testing.assert_allclose(
        residual_norms(activations, basis, ours.double().numpy()),
        residual_norms(activations, basis, reference),
        rtol=1e-5,
    )


def test_bad_inputs_raise_rsvc_errors():
    basis = torch.rand(3, 10)
    with pytest.raises(RsvcError, match="features"):
        nnls(torch.rand(5, 11), basis)
    bad = torch.rand(5, 10)
    bad[2, 3] = float("nan")
    with pytest.raises(RsvcError, match="NaN"):
        nnls(bad, basis)
    with pytest.raises(RsvcError, match="batch"):
        nnls(torch.rand(2, 5, 10), torch.rand(3, 3, 10))

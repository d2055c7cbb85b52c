"""Concept extraction: factorize activations A (..., n, d) ~ U W, batched over leading dimensions.

Notation (as everywhere in rsvc): activations A (..., n_samples, n_features), coefficients U
(..., n_samples, n_concepts), concept_basis W (..., n_concepts, n_features). Leading dimensions are a
batch (e.g. classes): every entry is factorized independently, all at once, and its result does not
depend on the other entries (converged entries are frozen, not iterated further).

Estimators follow scikit-learn: ``__init__`` stores parameters, ``fit(activations)`` returns self and
sets ``concept_basis_``, ``coefficients_``, ``reconstruction_error_`` (Frobenius norm of A - U W per
batch entry, like sklearn's ``NMF.reconstruction_err_``), ``n_iter_`` and ``converged_`` (per batch
entry: whether the stopping rule was met before ``max_iter``; always True for PCA).

- ``NMF``: NNDSVD initialization and the coordinate-descent (HALS) updates of scikit-learn's
  ``solver="cd"``, vectorized over batch entries and samples (``solver="cd"``: the same iterates,
  so the same fixed point; ``solver="hals_accelerated"``: extra sweeps and extrapolation, faster,
  other optima); transform is exact NNLS.
- ``SemiNMF``: non-negative U, signed W, the multiplicative updates of Ding, Li & Jordan (2010).
- ``PCA``: coefficients are projections of the centered activations on the principal axes.
- ``KMeans``: Lloyd's algorithm from a seeded greedy k-means++; W = centroids, U = one-hot.
"""

from __future__ import annotations

import math
import numbers

import torch

from rsvc_cli.algorithms import compiled
from rsvc_cli.algorithms.nnls import nnls
from rsvc_cli.errors import RsvcError

__all__ = [
    "NMF",
    "SemiNMF",
    "PCA",
    "KMeans",
    "make_decomposition",
    "apply_sign_treatment",
]

SIGN_TREATMENTS = ("error", "clamp", "split")
# NNDSVD: entries below this are zero, as in scikit-learn's _initialize_nmf (eps=1e-6).
_NNDSVD_EPS = 1e-6
# NMF solvers: "cd" makes scikit-learn's iterates (its fixed point from the same start), the default;
# "hals_accelerated" is faster but settles elsewhere (see NMF's docstring and the README).
NMF_SOLVERS = ("cd", "hals_accelerated")
# Accelerated HALS: sweeps per factor update on one pair of products with the activations. With
# k = 10 the subproblem is nearly solved after 2 or 3 (scikit-learn's 1 sweep: 159 iterations on
# the benchmark data, 3 sweeps: 107). 2, because on exactly low-rank data, where both solvers
# reach a near-zero error, 3 stopped at an error up to 8% above scikit-learn's (the tests allow 2%).
_INNER_SWEEPS = 2
# Extrapolation (Ang & Gillis 2019): the starting beta, its shrink factor on a restart, its growth
# factor after a decrease and the growth of its cap. 0.25 measured best of 0.1-0.5 on the benchmark
# data (0.5 restarts so often that it saves almost nothing); the factors are the paper's.
_EXTRAPOLATION_START = 0.25
_EXTRAPOLATION_SHRINK = 1.5
_EXTRAPOLATION_GROW = 1.05
_EXTRAPOLATION_CAP_GROW = 1.01
_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64}


class _Decomposition:
    """Shared plumbing: input checks, the fitted-guard, transform by NNLS, inverse transform."""

    _name = "decomposition"
    _needs_nonnegative = False
    # Factorizations need n_concepts <= min(n_samples, n_features); k-means only <= n_samples.
    _concepts_bounded_by_features = True

    def fit_transform(self, activations) -> torch.Tensor:
        return self.fit(activations).coefficients_

    def transform(self, activations) -> torch.Tensor:
        """Coefficients of new activations: exact NNLS against the fixed concept_basis_."""
        self._check_fitted()
        activations = _as_float_tensor(activations, self.concept_basis_.device)
        return nnls(activations, self.concept_basis_)

    def inverse_transform(self, coefficients) -> torch.Tensor:
        """Activations rebuilt from coefficients: U W."""
        self._check_fitted()
        coefficients = _as_float_tensor(coefficients, self.concept_basis_.device)
        return coefficients.to(self.concept_basis_.dtype) @ self.concept_basis_

    def _check_fitted(self) -> None:
        if not hasattr(self, "concept_basis_"):
            raise RuntimeError(f"This {type(self).__name__} is not fitted yet: call fit(activations) first.")

    def _validated(self, activations) -> torch.Tensor:
        n_concepts = self.n_concepts
        if not isinstance(n_concepts, numbers.Integral) or isinstance(n_concepts, bool) or n_concepts < 1:
            raise RsvcError(
                problem=f"decomposition.n_concepts must be a positive integer, got {n_concepts!r}.",
                fix="Set decomposition.n_concepts to the number of concepts to extract (10 by default).",
            )
        activations = _as_float_tensor(activations)
        dtype = _DTYPES.get(getattr(self, "dtype", None), "invalid")
        if dtype == "invalid":
            raise RsvcError(
                problem=f"Unknown dtype {self.dtype!r} for {self._name}.",
                fix="Use dtype=None (the activations' own), 'float32' or 'float64'.",
            )
        if dtype is not None:
            activations = activations.to(dtype)
        if activations.ndim < 2:
            raise RsvcError(
                problem=f"{self._name} needs activations shaped (..., n_samples, n_features), got "
                f"shape {tuple(activations.shape)}.",
                fix="Pass one row per patch (and optionally leading batch dimensions such as classes).",
            )
        n_samples, n_features = activations.shape[-2:]
        bounded = self._concepts_bounded_by_features
        if n_concepts > (min(n_samples, n_features) if bounded else n_samples):
            raise RsvcError(
                problem=f"{self._name} cannot extract {n_concepts} concepts from {n_samples} samples "
                f"with {n_features} features: it needs at least as many "
                f"{'samples and features' if bounded else 'samples'} as concepts.",
                fix="Lower decomposition.n_concepts, or use more images (patches) in the concept set.",
            )
        if not _all_finite(activations):
            raise RsvcError(
                problem=f"The activations given to {self._name} contain NaN or infinite values.",
                fix="Check the extracted activations of this layer (a diverged checkpoint or a broken "
                "image); re-extract them once the cause is fixed.",
            )
        if self._needs_nonnegative and activations.numel() and float(activations.min()) < 0:
            fraction = float((activations < 0).double().mean())
            raise RsvcError(
                problem=f"{self._name} needs non-negative activations, but {fraction:.1%} of these are "
                f"negative (minimum {float(activations.min()):.3g}).",
                fix="Declare a treatment for signed activations: decomposition.signed=clamp or "
                "decomposition.signed=split, or use decomposition=semi_nmf (signed concept basis).",
            )
        return activations

    def _store(self, batch_shape, flat, coefficients, concept_basis, n_iter, converged):
        """Learned attributes of a factorization of the flattened batch ``flat`` (B, n, d)."""
        self.coefficients_ = coefficients.reshape(*batch_shape, *coefficients.shape[-2:])
        self.concept_basis_ = concept_basis.reshape(*batch_shape, *concept_basis.shape[-2:])
        self.reconstruction_error_ = _reconstruction_error(flat, coefficients, concept_basis).reshape(batch_shape)
        self.n_iter_ = n_iter.reshape(batch_shape)
        self.converged_ = converged.reshape(batch_shape)


class NMF(_Decomposition):
    """Non-negative matrix factorization A ~ U W with U, W >= 0.

    The algorithm of ``sklearn.decomposition.NMF(solver="cd", beta_loss="frobenius")``: NNDSVD
    initialization from a seeded randomized SVD, then per iteration coordinate-descent (HALS)
    sweeps over the concepts for U and then for W, stopping when the summed projected-gradient
    violation falls below ``tol`` times that of the first iteration (scikit-learn's rule).

    ``solver``:

    - "cd" (default): one sweep per factor, concepts in order, as scikit-learn's cd solver with
      ``shuffle=False``: the same iterates, so from the same start the same solution (bases and
      errors agree to rounding), the fixed point the method is defined by.
    - "hals_accelerated": two sweeps per factor from extrapolated factors (Ang & Gillis 2019);
      about a third of the iterations and a lower error on average, but a non-monotone path that
      can settle in another local optimum than scikit-learn's (other concepts, sometimes a higher
      error).

    ``init``: "nndsvd", "nndsvda" (zeros filled with the mean activation) or "nndsvdar" (small random
    fill). ``dtype``: None computes in the activations' floating dtype, or "float32"/"float64".
    """

    _name = "NMF"
    _needs_nonnegative = True

    def __init__(self, n_concepts=10, init="nndsvd", solver="cd", max_iter=200, tol=1e-4, seed=0, dtype=None):
        self.n_concepts = n_concepts
        self.init = init
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.dtype = dtype

    def fit(self, activations) -> NMF:
        activations = self._validated(activations)
        if self.init not in ("nndsvd", "nndsvda", "nndsvdar"):
            raise RsvcError(
                problem=f"Unknown NMF init {self.init!r}.",
                fix="Use decomposition.init=nndsvd, nndsvda or nndsvdar.",
            )
        if self.solver not in NMF_SOLVERS:
            raise RsvcError(
                problem=f"Unknown NMF solver {self.solver!r}.",
                fix=f"Use decomposition.solver=cd (scikit-learn's fixed point, the default) or "
                "decomposition.solver=hals_accelerated (faster, other optima).",
            )
        batch_shape, flat = _flatten_batch(activations)
        coefficients, concept_basis = _nndsvd(flat, self.n_concepts, self.init, self.seed)
        fit = _fit_nmf_coordinate_descent if self.solver == "cd" else _fit_nmf_accelerated_hals
        coefficients, concept_basis, n_iter, converged = fit(flat, coefficients, concept_basis, self.max_iter, self.tol)
        self._store(batch_shape, flat, coefficients, concept_basis, n_iter, converged)
        return self


class SemiNMF(_Decomposition):
    """Semi-NMF A ~ U W with U >= 0 and a signed concept basis W, for signed activations.

    Ding, Li & Jordan, "Convex and semi-nonnegative matrix factorizations" (TPAMI 2010): W is the
    least-squares basis for the current U, then U <- U * sqrt(([A W^T]+ + U [W W^T]-) /
    ([A W^T]- + U [W W^T]+)). Initialized like the paper, from k-means: U = one-hot + 0.2. Stops when
    the relative decrease of the reconstruction error falls below ``tol``.
    """

    _name = "SemiNMF"

    def __init__(self, n_concepts=10, max_iter=500, tol=1e-5, seed=0, dtype=None):
        self.n_concepts = n_concepts
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.dtype = dtype

    def fit(self, activations) -> SemiNMF:
        activations = self._validated(activations)
        batch_shape, flat = _flatten_batch(activations)
        kmeans = KMeans(self.n_concepts, seed=self.seed, max_iter=20).fit(flat)
        coefficients = kmeans.coefficients_ + 0.2
        coefficients, n_iter, converged = _fit_semi_nmf(flat, coefficients, self.max_iter, self.tol)
        concept_basis = _least_squares_basis(flat, coefficients)
        self._store(batch_shape, flat, coefficients, concept_basis, n_iter, converged)
        return self


class PCA(_Decomposition):
    """Principal components: W = the top principal axes, U = projections of the centered activations.

    Axis signs follow scikit-learn (the largest-magnitude entry of each axis is positive).
    ``mean_`` (..., d) and ``explained_variance_`` (..., k) are stored; inverse_transform adds the mean.
    """

    _name = "PCA"

    def __init__(self, n_concepts=10, dtype=None):
        self.n_concepts = n_concepts
        self.dtype = dtype

    def fit(self, activations) -> PCA:
        activations = self._validated(activations)
        n_samples = activations.shape[-2]
        mean = activations.mean(dim=-2, keepdim=True)
        _, singular_values, axes = torch.linalg.svd(activations - mean, full_matrices=False)
        axes = axes[..., : self.n_concepts, :]
        largest = axes.gather(-1, axes.abs().argmax(dim=-1, keepdim=True))
        axes = axes * torch.where(largest < 0, -1.0, 1.0).to(axes.dtype)
        self.mean_ = mean.squeeze(-2)
        self.concept_basis_ = axes
        self.explained_variance_ = singular_values[..., : self.n_concepts] ** 2 / max(n_samples - 1, 1)
        self.coefficients_ = (activations - mean) @ axes.mT
        self.reconstruction_error_ = _frobenius(activations - mean - self.coefficients_ @ axes)
        self.n_iter_ = torch.ones(activations.shape[:-2], dtype=torch.long, device=activations.device)
        self.converged_ = torch.ones(activations.shape[:-2], dtype=torch.bool, device=activations.device)
        return self

    def transform(self, activations) -> torch.Tensor:
        self._check_fitted()
        activations = _as_float_tensor(activations, self.concept_basis_.device).to(self.concept_basis_.dtype)
        return (activations - self.mean_.unsqueeze(-2)) @ self.concept_basis_.mT

    def inverse_transform(self, coefficients) -> torch.Tensor:
        return super().inverse_transform(coefficients) + self.mean_.unsqueeze(-2)


class KMeans(_Decomposition):
    """k-means: W = centroids, U = one-hot of each sample's nearest centroid.

    Batched Lloyd iterations from a seeded greedy k-means++ start (as scikit-learn's: 2 + log(k)
    candidates per new centroid, the one that lowers the potential most is kept). Converges when no
    label changes or the centroids move less than ``tol`` times the mean feature variance; empty
    clusters keep their previous centroid.
    """

    _name = "KMeans"
    _concepts_bounded_by_features = False

    def __init__(self, n_concepts=10, seed=0, max_iter=300, tol=1e-4, dtype=None):
        self.n_concepts = n_concepts
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.dtype = dtype

    def fit(self, activations) -> KMeans:
        activations = self._validated(activations)
        batch_shape, flat = _flatten_batch(activations)
        centroids = _kmeans_plus_plus(flat, self.n_concepts, self.seed)
        centroids, n_iter, converged = _lloyd(flat, centroids, self.max_iter, self.tol)
        labels, squared_distance = _nearest(flat, centroids)
        self.concept_basis_ = centroids.reshape(*batch_shape, *centroids.shape[-2:])
        self.labels_ = labels.reshape(*batch_shape, labels.shape[-1])
        self.coefficients_ = _one_hot(self.labels_, self.n_concepts, flat.dtype)
        self.inertia_ = squared_distance.sum(-1, dtype=torch.float64).reshape(batch_shape)
        self.reconstruction_error_ = self.inertia_.sqrt()
        self.n_iter_ = n_iter.reshape(batch_shape)
        self.converged_ = converged.reshape(batch_shape)
        return self

    def transform(self, activations) -> torch.Tensor:
        self._check_fitted()
        activations = _as_float_tensor(activations, self.concept_basis_.device).to(self.concept_basis_.dtype)
        labels, _ = _nearest(activations, self.concept_basis_)
        return _one_hot(labels, self.concept_basis_.shape[-2], activations.dtype)


_METHODS = {"nmf": NMF, "semi_nmf": SemiNMF, "pca": PCA, "kmeans": KMeans}


def make_decomposition(method: str, **params) -> _Decomposition:
    """The estimator for ``method`` ("nmf", "semi_nmf", "pca", "kmeans") with these parameters."""
    if method not in _METHODS:
        raise RsvcError(
            problem=f"Unknown decomposition method {method!r}.",
            fix=f"Use decomposition=one of {', '.join(sorted(_METHODS))}.",
        )
    estimator_class = _METHODS[method]
    try:
        return estimator_class(**params)
    except TypeError:
        import inspect

        accepted = [name for name in inspect.signature(estimator_class).parameters]
        unknown = sorted(set(params) - set(accepted))
        raise RsvcError(
            problem=f"decomposition={method} does not take the parameter(s) {', '.join(unknown)}.",
            fix=f"Its parameters are: {', '.join(accepted)}.",
        ) from None


def apply_sign_treatment(activations, signed: str = "error") -> torch.Tensor:
    """Make activations non-negative for NMF: "error" (refuse negatives), "clamp" (ReLU) or
    "split" ([relu(x), relu(-x)] side by side: 2 d features, nothing lost)."""
    activations = _as_float_tensor(activations)
    if signed == "clamp":
        return activations.clamp_min(0)
    if signed == "split":
        return torch.cat([activations.clamp_min(0), (-activations).clamp_min(0)], dim=-1)
    if signed == "error":
        if activations.numel() and float(activations.min()) < 0:
            raise RsvcError(
                problem=f"The activations have negative values ({float((activations < 0).double().mean()):.1%} "
                "of entries) but no treatment for signed activations is set.",
                fix="Set decomposition.signed=clamp or decomposition.signed=split, or use "
                "decomposition=semi_nmf.",
            )
        return activations
    raise RsvcError(
        problem=f"Unknown treatment for signed activations {signed!r}.",
        fix=f"Use decomposition.signed=one of {', '.join(SIGN_TREATMENTS)}.",
    )


# ---------------------------------------------------------------------------------------------
# NMF: NNDSVD initialization and coordinate descent (HALS)


def _nndsvd(activations, n_concepts, variant, seed):
    """Boutsidis & Gallopoulos (2008) NNDSVD, all batch entries and concepts at once.

    Mirrors scikit-learn's _initialize_nmf (leading triplet as is, then per concept the dominant of
    the positive and negative parts of the singular vectors), but vectorized and with our own
    seeded randomized SVD.
    """
    left, singular_values, right = _randomized_svd(activations, n_concepts, seed)
    left_pos, left_neg = left.clamp_min(0), (-left).clamp_min(0)
    right_pos, right_neg = right.clamp_min(0), (-right).clamp_min(0)
    left_pos_norm, left_neg_norm = left_pos.norm(dim=-2), left_neg.norm(dim=-2)
    right_pos_norm, right_neg_norm = right_pos.norm(dim=-1), right_neg.norm(dim=-1)
    mass_pos, mass_neg = left_pos_norm * right_pos_norm, left_neg_norm * right_neg_norm
    use_pos = mass_pos > mass_neg
    tiny = torch.finfo(activations.dtype).tiny
    u = torch.where(
        use_pos[:, None, :], left_pos / left_pos_norm.clamp_min(tiny)[:, None, :],
        left_neg / left_neg_norm.clamp_min(tiny)[:, None, :],
    )
    v = torch.where(
        use_pos[:, :, None], right_pos / right_pos_norm.clamp_min(tiny)[:, :, None],
        right_neg / right_neg_norm.clamp_min(tiny)[:, :, None],
    )
    weight = (singular_values * torch.where(use_pos, mass_pos, mass_neg)).sqrt()
    coefficients = u * weight[:, None, :]
    concept_basis = v * weight[:, :, None]
    # The leading singular pair is non-negative up to sign (Perron-Frobenius): use it as is.
    lead = singular_values[:, :1].sqrt()
    coefficients[:, :, 0] = lead * left[:, :, 0].abs()
    concept_basis[:, 0, :] = lead * right[:, 0, :].abs()
    coefficients = torch.where(coefficients < _NNDSVD_EPS, 0.0, coefficients)
    concept_basis = torch.where(concept_basis < _NNDSVD_EPS, 0.0, concept_basis)
    if variant == "nndsvd":
        return coefficients, concept_basis
    mean = activations.mean(dim=(-2, -1))[:, None, None]
    if variant == "nndsvda":
        fill_u, fill_w = mean.expand_as(coefficients), mean.expand_as(concept_basis)
    else:  # nndsvdar
        generator = torch.Generator().manual_seed(int(seed))
        noise_u = torch.randn(coefficients.shape, generator=generator, dtype=torch.float64)
        noise_w = torch.randn(concept_basis.shape, generator=generator, dtype=torch.float64)
        fill_u = (mean * noise_u.to(mean) / 100).abs()
        fill_w = (mean * noise_w.to(mean) / 100).abs()
    return (
        torch.where(coefficients == 0, fill_u, coefficients),
        torch.where(concept_basis == 0, fill_w, concept_basis),
    )


def _randomized_svd(matrix, rank, seed, n_oversamples=10):
    """Top-``rank`` SVD of each (n, d) matrix of a batch (Halko et al. 2011), seeded on the CPU
    so results do not depend on the device; power iterations as scikit-learn's n_iter="auto"."""
    n_batch, n_rows, n_cols = matrix.shape
    width = min(rank + n_oversamples, n_rows, n_cols)
    n_power_iter = 7 if rank < 0.1 * min(n_rows, n_cols) else 4
    generator = torch.Generator().manual_seed(int(seed))
    # One probe for every batch entry: an entry's result does not depend on its position in the batch.
    probe = torch.randn(n_cols, width, generator=generator, dtype=torch.float64).to(matrix)
    basis = torch.linalg.qr(matrix @ probe).Q
    # A^T Q is formed as (Q^T A)^T: a product that reads A row-major is the faster one.
    for _ in range(n_power_iter):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr((basis.mT @ matrix).mT).Q).Q
    # SVD of the tall (d, width) transpose: LAPACK is much faster on tall than on wide matrices.
    right_t, singular_values, small_left_t = torch.linalg.svd((basis.mT @ matrix).mT, full_matrices=False)
    left = basis @ small_left_t.mT
    right = right_t.mT
    return left[..., :rank], singular_values[..., :rank], right[..., :rank, :]


def _fit_nmf_coordinate_descent(activations, coefficients, concept_basis, max_iter, tol):
    """scikit-learn's NMF coordinate descent (``_fit_coordinate_descent`` with ``shuffle=False``, no
    regularization), batched: its iterates, so its solution from the same start.

    Per iteration, as scikit-learn: one HALS sweep of U (its "update W") against W W^T and A W^T, then
    one sweep of W against the updated U^T U and U^T A; concepts in order 0..k-1, each update using
    the ones before it (Gauss-Seidel: what makes the iteration monotone, so that loop cannot be
    vectorized without changing the algorithm). The violation is the summed |projected gradient| of
    both sweeps; an entry stops at the first iteration where it is at most ``tol`` times the first
    iteration's (or the first one's is 0), its factors as they are then (no extra update).

    Factors are kept concept-major, coefficients as U^T (B, k, n), so that the update of concept t
    touches one contiguous row for every batch entry and sample at once. Returns (U, W, n_iter,
    converged).
    """
    coefficients_t = coefficients.mT.contiguous()
    concept_basis = concept_basis.contiguous()
    tracker = _BatchConvergence((coefficients_t, concept_basis))
    violation_init = None
    iteration = 0
    for iteration in range(1, max_iter + 1):
        # W A^T is (B, k, n), the concept-major layout of U^T, and the fastest form of this product.
        violation = _hals_sweeps(coefficients_t, concept_basis @ concept_basis.mT, concept_basis @ activations.mT)
        violation += _hals_sweeps(concept_basis, coefficients_t @ coefficients_t.mT, coefficients_t @ activations)
        if violation_init is None:
            violation_init = violation
        converged = (violation_init == 0) | (violation <= tol * violation_init)
        keep = tracker.update((coefficients_t, concept_basis), converged, iteration)
        if keep is not None:
            if keep.numel() == 0:
                break
            activations, coefficients_t, concept_basis = activations[keep], coefficients_t[keep], concept_basis[keep]
            violation_init = violation_init[keep]
    coefficients_t, concept_basis = tracker.finish((coefficients_t, concept_basis), iteration)
    return coefficients_t.mT.contiguous(), concept_basis, tracker.n_iter, tracker.converged


def _fit_nmf_accelerated_hals(activations, coefficients, concept_basis, max_iter, tol):
    """scikit-learn's NMF coordinate descent, batched and accelerated (``solver="hals_accelerated"``).

    The layout and the sweeps of _fit_nmf_coordinate_descent, with two accelerations, each measured to reach the same or a lower error in fewer iterations:

    - Accelerated HALS (Gillis & Glineur, Neural Computation 2012): the products with the
      activations (A W^T, U^T A: n d k flops each) dominate an iteration, while a HALS sweep on the
      Gram matrices costs n k^2 (d k^2). So each factor gets ``_INNER_SWEEPS`` sweeps per product.
    - Extrapolation with restarts (Ang & Gillis, "Accelerating nonnegative matrix factorization
      algorithms using extrapolation", Neural Computation 2019): each factor update starts from,
      and the other factor is fitted against, the last update pushed further along its last step,
      U + beta (U - U_previous), clipped at 0. Where the error of an iteration goes up, that entry
      restarts from its plain iterates with a smaller beta; while it goes down, beta grows. On the
      benchmark data (100 classes): 54 iterations instead of 124 (scikit-learn: 153), the error
      3.7e-4 below scikit-learn's on average and at most 4.1e-3 above it (one class). The path is
      not scikit-learn's: on real activations it often ends in another local optimum.

    The stopping rule is scikit-learn's: the summed projected-gradient violation, measured in the
    first sweep of each factor, below ``tol`` times that of the first iteration. A last U update
    against the final basis makes the returned coefficients a best response to it.
    """
    dtype, all_activations = activations.dtype, activations
    squared_norm = activations.pow(2).sum(dim=(-2, -1), dtype=torch.float64)
    coefficients_t = coefficients.mT.contiguous()
    concept_basis = concept_basis.contiguous()
    # The points the next updates start from and are fitted against (the extrapolated factors).
    ahead_t, ahead_basis = coefficients_t.clone(), concept_basis.clone()
    n_batch = activations.shape[0]
    beta = torch.full((n_batch,), _EXTRAPOLATION_START, dtype=torch.float64, device=activations.device)
    beta_cap = torch.ones_like(beta)
    previous_error = torch.full_like(beta, torch.inf)
    tracker = _BatchConvergence((coefficients_t, concept_basis))
    violation_init = None
    iteration = 0
    for iteration in range(1, max_iter + 1):
        step = beta.to(dtype)[:, None, None]
        # U step (sklearn's "update W"): gradient of 1/2 ||A - U W||^2 in U is U (W W^T) - A W^T.
        # W A^T is (B, k, n), the concept-major layout of U^T, and the fastest form of this product.
        gram, cross = ahead_basis @ ahead_basis.mT, ahead_basis @ activations.mT
        previous_t, coefficients_t = coefficients_t, ahead_t
        violation = _hals_sweeps(coefficients_t, gram, cross, _INNER_SWEEPS)
        ahead_t = torch.addcmul(coefficients_t, step, coefficients_t - previous_t).clamp_(min=0)
        # W step: gradient in W is (U^T U) W - U^T A.
        gram, cross = ahead_t @ ahead_t.mT, ahead_t @ activations
        previous_basis, concept_basis = concept_basis, ahead_basis
        violation += _hals_sweeps(concept_basis, gram, cross, _INNER_SWEEPS)
        ahead_basis = torch.addcmul(concept_basis, step, concept_basis - previous_basis).clamp_(min=0)
        # ||A - U_ahead W||^2 from the products at hand: ||A||^2 - 2 <W, U^T A> + <U^T U, W W^T>.
        error = (
            squared_norm
            - 2 * (concept_basis * cross).sum(dim=(-2, -1), dtype=torch.float64)
            + (gram * (concept_basis @ concept_basis.mT)).sum(dim=(-2, -1), dtype=torch.float64)
        )
        worse = error > previous_error
        restart = worse[:, None, None]
        ahead_t = torch.where(restart, coefficients_t, ahead_t)
        ahead_basis = torch.where(restart, concept_basis, ahead_basis)
        beta = torch.where(worse, beta / _EXTRAPOLATION_SHRINK, torch.minimum(beta_cap, beta * _EXTRAPOLATION_GROW))
        beta_cap = torch.where(worse, beta_cap, (beta_cap * _EXTRAPOLATION_CAP_GROW).clamp_(max=1))
        previous_error = torch.where(worse, previous_error, error)
        if violation_init is None:
            violation_init = violation
        converged = (violation_init == 0) | (violation <= tol * violation_init)
        keep = tracker.update((coefficients_t, concept_basis), converged, iteration)
        if keep is not None:
            if keep.numel() == 0:
                break
            activations, squared_norm = activations[keep], squared_norm[keep]
            coefficients_t, concept_basis, ahead_t, ahead_basis = (
                coefficients_t[keep], concept_basis[keep], ahead_t[keep], ahead_basis[keep])
            beta, beta_cap, previous_error, violation_init = (
                beta[keep], beta_cap[keep], previous_error[keep], violation_init[keep])
    coefficients_t, concept_basis = tracker.finish((coefficients_t, concept_basis), iteration)
    # The basis was last fitted against the extrapolated coefficients: update U against it.
    gram, cross = concept_basis @ concept_basis.mT, concept_basis @ all_activations.mT
    _hals_sweeps(coefficients_t, gram, cross, _INNER_SWEEPS)
    return coefficients_t.mT.contiguous(), concept_basis, tracker.n_iter, tracker.converged


def _hals_sweeps(factor, gram, cross, n_sweeps=1):
    """``n_sweeps`` HALS sweeps of ``factor`` in place; returns the violation of the first.

    On CPUs a compiled kernel runs them (compiled.hals_sweeps): each column's updates are
    independent of the other columns', so it works through blocks of columns in cache instead of
    making one pass over the whole batch per concept (2-3 small tensor operations each, over 40
    per sweep at k = 10). GPUs, and CPUs without the kernels, take the torch sweeps below.
    """
    if compiled.handles(factor) and factor.is_contiguous():
        violation = compiled.hals_sweeps(factor.numpy(), gram.numpy(), cross.numpy(), n_sweeps)
        return torch.from_numpy(violation)
    violation = _coordinate_descent_sweep(factor, gram, cross, track_violation=True)
    for _ in range(n_sweeps - 1):
        _coordinate_descent_sweep(factor, gram, cross)
    return violation


def _coordinate_descent_sweep(factor, gram, cross, track_violation=False):
    """One HALS sweep, in place: for each concept t, factor[t] <- max(0, factor[t] - grad_t / gram_tt)
    with grad_t = gram[t] @ factor - cross[t]. Returns the summed |projected gradient| per batch
    entry (scikit-learn's violation) when ``track_violation``."""
    n_concepts = factor.shape[-2]
    violation = torch.zeros_like(factor[:, :1, :]) if track_violation else None
    curvature = gram.diagonal(dim1=-2, dim2=-1)
    # A concept with zero curvature (all zeros) stays as it is, as in scikit-learn.
    curvature = torch.where(curvature > 0, curvature, torch.inf)[:, :, None]
    for t in range(n_concepts):
        row = factor[:, t : t + 1, :]
        gradient = torch.baddbmm(cross[:, t : t + 1, :], gram[:, t : t + 1, :], factor, beta=-1)
        if track_violation:
            # |projected gradient|: the gradient, but only its negative part where the entry is 0.
            violation.add_(torch.where(row > 0, gradient, gradient.clamp(max=0)).abs_())
        row.addcdiv_(gradient, curvature[:, t : t + 1], value=-1).clamp_(min=0)
    if track_violation:
        return violation.sum(dim=(-2, -1), dtype=torch.float64)
    return None


# ---------------------------------------------------------------------------------------------
# Semi-NMF (Ding, Li & Jordan 2010)


def _fit_semi_nmf(activations, coefficients, max_iter, tol):
    squared_norm = activations.pow(2).sum(dim=(-2, -1), dtype=torch.float64)
    tracker = _BatchConvergence((coefficients,))
    previous_error = None
    iteration = 0
    for iteration in range(1, max_iter + 1):
        concept_basis = _least_squares_basis(activations, coefficients)
        cross = activations @ concept_basis.mT  # A W^T (B, n, k)
        gram = concept_basis @ concept_basis.mT  # W W^T (B, k, k)
        # ||A - U W||^2 with W the least-squares basis for U equals ||A||^2 - <U, A W^T>.
        error = (squared_norm - (coefficients * cross).sum(dim=(-2, -1), dtype=torch.float64)).clamp_min(0)
        if previous_error is not None:
            keep = tracker.update((coefficients,), previous_error - error <= tol * previous_error, iteration)
            if keep is not None:
                if keep.numel() == 0:
                    break
                activations, coefficients, squared_norm = activations[keep], coefficients[keep], squared_norm[keep]
                cross, gram, error = cross[keep], gram[keep], error[keep]
        previous_error = error
        numerator = cross.clamp_min(0) + coefficients @ (-gram).clamp_min(0)
        denominator = (-cross).clamp_min(0) + coefficients @ gram.clamp_min(0)
        tiny = torch.finfo(activations.dtype).tiny
        coefficients.mul_((numerator / denominator.clamp_min(tiny)).sqrt())
    (coefficients,) = tracker.finish((coefficients,), iteration)
    return coefficients, tracker.n_iter, tracker.converged


def _least_squares_basis(activations, coefficients):
    """W = (U^T U)^-1 U^T A, with a relative ridge of 1e-12 so a dead concept cannot make it singular."""
    gram = (coefficients.mT @ coefficients).to(torch.float64)
    ridge = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    gram = gram + ridge[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    cross = (coefficients.mT @ activations).to(torch.float64)
    return torch.linalg.solve(gram, cross).to(activations.dtype)


# ---------------------------------------------------------------------------------------------
# k-means


def _kmeans_plus_plus(activations, n_concepts, seed):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, scikit-learn's variant), batched.

    Random draws come from a seeded CPU generator, so the result does not depend on the device.
    Each new centroid depends on the previous ones, so the loop over centroids is inherent.
    """
    n_batch, n_samples, _ = activations.shape
    device, dtype = activations.device, activations.dtype
    n_trials = 2 + int(math.log(n_concepts))
    generator = torch.Generator().manual_seed(int(seed))
    batch = torch.arange(n_batch, device=device)
    first = torch.randint(n_samples, (n_batch,), generator=generator).to(device)
    centroids = [activations[batch, first]]
    closest = (activations - centroids[0][:, None, :]).pow(2).sum(-1)
    for _ in range(1, n_concepts):
        draws = torch.rand(n_batch, n_trials, generator=generator, dtype=torch.float64).to(device)
        cumulative = closest.to(torch.float64).cumsum(-1)
        candidates = torch.searchsorted(cumulative, draws * cumulative[:, -1:]).clamp_max(n_samples - 1)
        candidate_points = activations[batch[:, None], candidates]  # (B, L, d)
        distance = torch.cdist(candidate_points, activations).pow(2)  # (B, L, n)
        potential = torch.minimum(closest[:, None, :], distance).sum(-1, dtype=torch.float64)
        best = potential.argmin(-1)
        centroids.append(candidate_points[batch, best])
        closest = torch.minimum(closest, distance[batch, best])
    return torch.stack(centroids, dim=1).to(dtype)


def _lloyd(activations, centroids, max_iter, tol):
    variance_scale = activations.var(dim=-2, unbiased=False).mean(-1) * tol
    tracker = _BatchConvergence((centroids,))
    labels, _ = _nearest(activations, centroids)
    n_concepts = centroids.shape[-2]
    iteration = 0
    for iteration in range(1, max_iter + 1):
        membership = _one_hot(labels, n_concepts, activations.dtype)
        counts = membership.sum(-2)
        sums = membership.mT @ activations
        updated = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centroids)
        shift = (updated - centroids).pow(2).sum(dim=(-2, -1))
        centroids = updated
        new_labels, _ = _nearest(activations, centroids)
        converged = (new_labels == labels).all(-1) | (shift <= variance_scale)
        labels = new_labels
        keep = tracker.update((centroids,), converged, iteration)
        if keep is not None:
            if keep.numel() == 0:
                break
            activations, centroids, labels = activations[keep], centroids[keep], labels[keep]
            variance_scale = variance_scale[keep]
    (centroids,) = tracker.finish((centroids,), iteration)
    return centroids, tracker.n_iter, tracker.converged


def _nearest(activations, centroids):
    """Index of and squared distance to the nearest centroid of each row."""
    squared = (
        activations.pow(2).sum(-1, keepdim=True)
        - 2 * activations @ centroids.mT
        + centroids.pow(2).sum(-1).unsqueeze(-2)
    ).clamp_min(0)
    distance, labels = squared.min(dim=-1)
    return labels, distance


def _one_hot(labels, n_concepts, dtype):
    return torch.nn.functional.one_hot(labels, n_concepts).to(dtype)


# ---------------------------------------------------------------------------------------------
# helpers


class _BatchConvergence:
    """Per-entry convergence of a batched iteration.

    An entry's result is its state at the iteration it converged, so it never depends on how long
    the other entries of the batch keep iterating. Finished entries are dropped from the live
    batch once they are 1/8 of it (dropping copies the live tensors, so not one at a time): the work
    then follows each entry's own iteration count, as a loop over entries would.
    """

    def __init__(self, state):
        self.results = tuple(tensor.clone() for tensor in state)
        n_batch = state[0].shape[0]
        device = state[0].device
        self.n_iter = torch.zeros(n_batch, dtype=torch.long, device=device)
        self.origin = torch.arange(n_batch, device=device)  # original index of each live entry
        self.finished = torch.zeros(n_batch, dtype=torch.bool, device=device)
        # Per original entry: whether its stopping rule was met (False: it stopped at max_iter).
        self.converged = torch.zeros(n_batch, dtype=torch.bool, device=device)

    def update(self, state, converged, iteration):
        """Record the live entries converged at ``iteration``. Returns None to go on with the same
        live batch, or the live positions to keep (empty once every entry has converged)."""
        newly = converged & ~self.finished
        if bool(newly.any()):
            self._save(state, newly.nonzero().squeeze(-1), iteration)
            self.converged[self.origin[newly]] = True
            self.finished |= newly
        n_finished = int(self.finished.sum())
        if n_finished < max(1, len(self.finished) // 8):
            return None
        keep = (~self.finished).nonzero().squeeze(-1)
        self.origin, self.finished = self.origin[keep], self.finished[keep]
        return keep

    def finish(self, state, iteration):
        """The results: entries that never converged keep their last state (n_iter = iteration)."""
        still_open = (~self.finished).nonzero().squeeze(-1)
        if still_open.numel() > 0:
            self._save(state, still_open, iteration)
        return self.results

    def _save(self, state, live_index, iteration):
        for result, live in zip(self.results, state):
            result[self.origin[live_index]] = live[live_index]
        self.n_iter[self.origin[live_index]] = iteration


def _flatten_batch(activations):
    batch_shape = activations.shape[:-2]
    return batch_shape, activations.reshape(-1, *activations.shape[-2:])


def _reconstruction_error(activations, coefficients, concept_basis):
    """||A - U W||_F per batch entry, from the residual itself (no cancellation), a few batch
    entries at a time through one reused buffer; row sums in the working dtype, totals in float64."""
    n_batch, n_samples, n_features = activations.shape
    per_chunk = max(1, min(n_batch, 2**24 // max(1, n_samples * n_features)))
    buffer = torch.empty(per_chunk, n_samples, n_features, dtype=activations.dtype, device=activations.device)
    errors = torch.empty(n_batch, dtype=torch.float64, device=activations.device)
    for start in range(0, n_batch, per_chunk):
        chunk = slice(start, start + per_chunk)
        count = activations[chunk].shape[0]
        residual = torch.baddbmm(
            activations[chunk], coefficients[chunk].to(activations.dtype), concept_basis[chunk].to(activations.dtype),
            alpha=-1, out=buffer[:count],
        )
        errors[chunk] = residual.mul_(residual).sum(-1).to(torch.float64).sum(-1).sqrt()
    return errors


def _frobenius(residual):
    return residual.pow(2).sum(dim=(-2, -1), dtype=torch.float64).sqrt()


def _as_float_tensor(values, device=None) -> torch.Tensor:
    tensor = torch.as_tensor(values, device=device)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def _all_finite(tensor) -> bool:
    """Cheap first: the sum of finite values is finite unless it overflows; check element-wise if not."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())

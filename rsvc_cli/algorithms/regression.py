"""Linear read-outs batched over leading dimensions and targets: lasso, ridge, least squares, and the
grouped, leak-free cross-validation protocol of RSVC.

Shapes: X (..., n_samples, n_features), Y (..., n_samples, n_targets); learned ``coef_``
(..., n_targets, n_features) and ``intercept_`` (..., n_targets), as in scikit-learn. Every batch
entry and every target is an independent problem, and all of them are solved together.

All three regressors work on sufficient statistics: the centered Gram matrix Q = Xc^T Xc / n, the
cross products C = Xc^T Yc / n and the target variances ||Yc||^2 / n. So cross-validation computes
each fold's statistics from per-fold sums (each row is touched once, not once per fold) and hands
every fold of every batch entry to one batched solve. The products behind the sums run in float32
for float32 activations (in float64 for float64 inputs); everything from the sums on is float64.

Lasso minimizes scikit-learn's objective 1/(2n) ||y - X w - b||^2 + alpha ||w||_1 per target on Q
restricted to a working set (the support plus the worst KKT violators, grown until no feature
outside violates, as in Celer, Massias et al. 2018). On the working set, a few coordinate-descent
sweeps (each update vectorized over all (batch entry, target) problems) find a nearby support, and
primal-dual active-set Newton steps finish: once the support and signs are right,
w_S = Q_SS^-1 (C_S - alpha sign(w_S)) solves the problem exactly, so the result reaches
scikit-learn's optimum to machine precision instead of to a tolerance. Stops on scikit-learn's
duality gap, ``gap <= tol * ||y - mean(y)||^2 / n``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from rsvc_cli.algorithms import compiled
from rsvc_cli.errors import RsvcError

__all__ = [
    "Lasso",
    "Ridge",
    "LinearRegression",
    "grouped_kfold",
    "cross_validate",
    "CrossValidated",
    "make_regressor",
    "ALPHA_GRID",
    "held_out_error",
    "choose_alpha",
]

# Grid of `regression.alpha=cv` (lasso on standardized inputs and targets; the authors' 0.1 in the middle).
ALPHA_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)

# Working sets start at this many features and at least double with the support (Celer's p0; its
# default of 10 cost two extra rounds on 512 features with supports of about 35).
_INITIAL_WORKING_SET = 64
# Coordinate-descent sweeps before each round of active-set Newton steps, and the steps per round.
# Both solver paths (batched torch, compiled CPU kernel) take these.
_SWEEPS_PER_NEWTON = 4
_NEWTON_STEPS = 8
# Elements of the float64 Gram matrices of the batch entries cross-validated together (128 MB).
_GRAM_CHUNK_ELEMENTS = 2**24
# Elements of the gathered working-set Gram matrices per chunk of problems (float64: 256 MB).
_WORKING_SET_CHUNK_ELEMENTS = 2**25
# Elements of activations laid out by fold at once when summing (at most 512 MB, in float64).
_STATISTICS_CHUNK_ELEMENTS = 2**26
# A standard deviation this small relative to the mean marks a constant column (scale 1).
_CONSTANT_RELATIVE_STD = 1e-12


class _Regressor:
    """fit(X, Y, sample_mask=None) -> self on batched data; predict(X) -> Y."""

    # Per-problem attributes that _solve_gram sets (batch first), gathered across chunks.
    _fit_diagnostics: tuple[str, ...] = ()

    def fit(self, X, Y, sample_mask=None):
        X, Y = _check_xy(X, Y)
        statistics = _centered_statistics(X, Y, sample_mask)
        coef = self._solve_gram(statistics.gram, statistics.cross, statistics.target_variance, statistics.n_samples)
        self.coef_ = coef.mT.contiguous()
        self.intercept_ = statistics.y_mean - (statistics.x_mean.unsqueeze(-2) @ coef).squeeze(-2)
        return self

    def predict(self, X) -> torch.Tensor:
        if not hasattr(self, "coef_"):
            raise RuntimeError(f"This {type(self).__name__} is not fitted yet: call fit(X, Y) first.")
        X = _as_float64(X, self.coef_.device)
        return X @ self.coef_.mT + self.intercept_.unsqueeze(-2)

    def _solve_gram(self, gram, cross, target_variance, n_samples):
        """coef (..., p, t) from Q (..., p, p), C (..., p, t), ||Yc||^2/n (..., t), n (...)."""
        raise NotImplementedError


class LinearRegression(_Regressor):
    """Ordinary least squares with intercept; the minimum-norm solution when X is rank deficient."""

    def _solve_gram(self, gram, cross, target_variance, n_samples):
        return torch.linalg.pinv(gram, hermitian=True) @ cross


class Ridge(_Regressor):
    """scikit-learn's Ridge: ||y - X w - b||^2 + alpha ||w||^2 per target (not divided by n)."""

    def __init__(self, alpha=1.0):
        self.alpha = alpha

    def _solve_gram(self, gram, cross, target_variance, n_samples):
        _check_alpha(self.alpha, "Ridge")
        identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        penalty = (self.alpha / n_samples.to(gram.dtype))[..., None, None] * identity
        if self.alpha == 0:
            return torch.linalg.pinv(gram, hermitian=True) @ cross
        # gram + penalty is symmetric positive definite: Cholesky is exact here, and it avoids the
        # batched LU solve, which MKL rejects (DLASWP parameter error, then a hang) on some shapes.
        factor, info = torch.linalg.cholesky_ex(gram + penalty)
        if bool((info != 0).any()):
            return torch.linalg.lstsq(gram + penalty, cross).solution
        return torch.cholesky_solve(cross, factor)


class Lasso(_Regressor):
    """scikit-learn's Lasso, 1/(2n) ||y - X w - b||^2 + alpha ||w||_1 per target, batched.

    ``max_iter`` bounds the coordinate-descent sweeps per problem; ``tol`` is scikit-learn's (duality
    gap relative to the target variance). Sets ``dual_gap_`` (..., t) and ``n_iter_`` (..., t).
    """

    _fit_diagnostics = ("dual_gap_", "n_iter_")

    def __init__(self, alpha=0.1, max_iter=1000, tol=1e-8):
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol

    def _solve_gram(self, gram, cross, target_variance, n_samples):
        _check_alpha(self.alpha, "Lasso")
        batch_shape = cross.shape[:-2]
        p, t = cross.shape[-2:]
        coef, gap, n_iter = solve_lasso_gram(
            gram.reshape(-1, p, p), cross.reshape(-1, p, t), target_variance.reshape(-1, t),
            self.alpha, self.max_iter, self.tol,
        )
        self.dual_gap_ = gap.reshape(*batch_shape, t)
        self.n_iter_ = n_iter.reshape(*batch_shape, t)
        return coef.reshape(*batch_shape, p, t)


_REGRESSORS = {"lasso": Lasso, "ridge": Ridge, "linear": LinearRegression}


def make_regressor(method: str, **params) -> _Regressor:
    """The regressor for ``method`` ("lasso", "ridge", "linear") with these parameters."""
    if method not in _REGRESSORS:
        raise RsvcError(
            problem=f"Unknown regression method {method!r}.",
            fix=f"Use regression=one of {', '.join(sorted(_REGRESSORS))}.",
        )
    try:
        return _REGRESSORS[method](**params)
    except TypeError:
        import inspect

        accepted = list(inspect.signature(_REGRESSORS[method]).parameters)
        raise RsvcError(
            problem=f"regression={method} does not take the parameter(s) "
            f"{', '.join(sorted(set(params) - set(accepted)))}.",
            fix=f"Its parameters are: {', '.join(accepted) or 'none'}.",
        ) from None


# ---------------------------------------------------------------------------------------------
# Lasso on the Gram matrix


def solve_lasso_gram(gram, cross, target_variance, alpha, max_iter, tol):
    """min_w 1/2 w^T Q w - C^T w + alpha ||w||_1 for every column of C, batched.

    gram (B, p, p), cross (B, p, t), target_variance (B, t) = ||Yc||^2/n (for the duality gap);
    float64. Returns coef (B, p, t), duality gap (B, t) and coordinate-descent sweeps (B, t).
    CPU tensors go to the compiled kernel (compiled.lasso_gram, the same algorithm one problem at a
    time: about 6x faster there), others to the batched torch solver.
    """
    if compiled.handles(gram):
        coef, gap, n_iter = (
            torch.from_numpy(array)
            for array in compiled.lasso_gram(
                gram.numpy(), cross.numpy(), target_variance.numpy(), alpha, max_iter, tol,
                _INITIAL_WORKING_SET, _SWEEPS_PER_NEWTON, _NEWTON_STEPS,
            )
        )
    else:
        coef, gap, n_iter = _solve_lasso_gram_batched(gram, cross, target_variance, alpha, max_iter, tol)
    threshold = tol * target_variance
    if bool((gap > threshold).any()):
        worst = float((gap / target_variance.clamp_min(torch.finfo(gap.dtype).tiny)).max())
        warnings.warn(
            f"Lasso did not converge in {max_iter} sweeps (relative duality gap {worst:.1e} > tol {tol:.1e}); "
            "raise max_iter.",
            RuntimeWarning,
            stacklevel=3,
        )
    return coef, gap, n_iter


def _solve_lasso_gram_batched(gram, cross, target_variance, alpha, max_iter, tol):
    """solve_lasso_gram in batched torch operations over all problems (the GPU path)."""
    n_batch, n_features, n_targets = cross.shape
    coef = torch.zeros_like(cross)
    n_iter = torch.zeros(n_batch, n_targets, dtype=torch.long, device=cross.device)
    threshold = tol * target_variance
    # C - Q w, the negative gradient of the smooth part: C itself at the start (w = 0), then
    # recomputed for the batch entries whose problems were just re-solved.
    gradient = cross.clone()
    changed = None
    for _ in range(max(1, max_iter)):
        if changed is not None and len(changed) == n_batch:
            gradient = cross - gram @ coef
        elif changed is not None:
            gradient[changed] = cross[changed] - gram[changed] @ coef[changed]
        gap = _duality_gap(coef, gradient, cross, target_variance, alpha)
        unsolved = (gap > threshold) & (n_iter < max_iter)
        if not bool(unsolved.any()):
            break
        batch_index, target_index = unsolved.nonzero(as_tuple=True)
        changed = torch.unique(batch_index)
        weights = coef[batch_index, :, target_index]
        descent = gradient[batch_index, :, target_index]
        in_support = weights != 0
        # Working set: the support first, then the features whose KKT condition fails the most.
        priority = torch.where(in_support, torch.inf, descent.abs())
        largest_support = int(in_support.sum(-1).max())
        # At least twice the support: once a subproblem is solved, the features ranked after the
        # support are exactly the remaining violators, so every round admits some of them.
        size = min(n_features, max(_INITIAL_WORKING_SET, 2 * largest_support))
        # Sorted, so that gathering each problem's Q_ws walks the Gram matrix in memory order.
        working_set = priority.topk(size, dim=-1).indices.sort(dim=-1).values
        chunk = max(1, _WORKING_SET_CHUNK_ELEMENTS // (size * size))
        for start in range(0, len(batch_index), chunk):
            rows = slice(start, start + chunk)
            b, ws = batch_index[rows], working_set[rows]
            flat_index = (b * n_features * n_features)[:, None, None] + ws[:, :, None] * n_features + ws[:, None, :]
            sub_gram = torch.take(gram, flat_index)  # Q_ws per problem (P, m, m)
            sub_cross = cross[b[:, None], ws, target_index[rows][:, None]]
            sub_weights, sweeps = _solve_lasso_subproblem(
                sub_gram, sub_cross, weights[rows].gather(1, ws), alpha, max_iter - n_iter[b, target_index[rows]]
            )
            weights[rows] = torch.zeros_like(weights[rows]).scatter_(1, ws, sub_weights)
            n_iter[b, target_index[rows]] += sweeps
        coef[batch_index, :, target_index] = weights
    else:
        gradient = cross - gram @ coef
        gap = _duality_gap(coef, gradient, cross, target_variance, alpha)
    return coef, gap, n_iter


def _solve_lasso_subproblem(gram, cross, weights, alpha, sweep_budget):
    """Lasso restricted to a working set, for P problems at once: gram (P, m, m), cross (P, m).

    Coordinate descent (the loop over the m coordinates is inherent to the method; each update is
    vectorized over the problems) alternates with a few active-set Newton steps started from the
    support and signs the sweeps reached (``_active_set_newton``). A problem is done when a Newton
    step lands on a point that satisfies the KKT conditions; the others keep their sweep iterate,
    so the coordinate descent, which always converges, is never set back by a Newton step.
    """
    n_problems, size = cross.shape
    weights = weights.clone()
    sweeps = torch.zeros(n_problems, dtype=torch.long, device=cross.device)
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    inverse_diagonal = torch.where(diagonal > 0, 1 / diagonal, 0.0)
    open_rows = torch.arange(n_problems, device=cross.device)
    budget = sweep_budget.clone()
    while open_rows.numel() > 0:
        everything = open_rows.numel() == n_problems
        g = gram if everything else gram[open_rows]
        c, w = cross[open_rows], weights[open_rows]
        d, inv_d = diagonal[open_rows], inverse_diagonal[open_rows]
        n_sweeps = int(min(_SWEEPS_PER_NEWTON, int(budget[open_rows].max())))
        residual = c - (g @ w.unsqueeze(-1)).squeeze(-1)  # C - Q w
        for _ in range(n_sweeps):
            for j in range(size):
                old = w[:, j].clone()
                new = torch.nn.functional.softshrink(torch.addcmul(residual[:, j], d[:, j], old), alpha)
                new.mul_(inv_d[:, j])
                residual.addcmul_(g[:, j, :], (old - new).unsqueeze(-1))  # rows of Q: symmetric
                w[:, j] = new
        sweeps[open_rows] += n_sweeps
        budget[open_rows] -= n_sweeps
        exact, solved = _active_set_newton(g, c, w, alpha, _NEWTON_STEPS)
        weights[open_rows] = torch.where(solved[:, None], exact, w)
        open_rows = open_rows[~solved & (budget[open_rows] > 0)]
    return weights, sweeps


def _active_set_newton(gram, cross, weights, alpha, n_steps):
    """Primal-dual active-set steps for P lasso problems: gram (P, m, m), cross (P, m).

    Each step solves the KKT system on the current active set A with signs s exactly,
    w_A = Q_AA^-1 (C_A - alpha s_A), then keeps the features of A whose sign held and admits those
    outside with |C_j - Q_j w| > alpha (signed by their gradient). A step whose solution keeps its
    signs and admits nobody is the lasso optimum. Started from a nearby support this takes a few
    steps, each one batched Cholesky solve; it may cycle from a poor start, hence the cap and the
    coordinate-descent fallback in the caller. Returns (solution (P, m), solved (P,)).
    """
    n_problems = cross.shape[0]
    solution = torch.zeros_like(cross)
    solved = torch.zeros(n_problems, dtype=torch.bool, device=cross.device)
    slack = 1e-9 * alpha + 1e-12 * cross.abs().amax(-1, keepdim=True)
    gradient = cross - (gram @ weights.unsqueeze(-1)).squeeze(-1)
    violating = (weights == 0) & (gradient.abs() > alpha + slack)
    active = (weights != 0) | violating
    signs = torch.where(violating, torch.sign(gradient), torch.sign(weights))
    rows = torch.arange(n_problems, device=cross.device)
    size = cross.shape[-1]
    coordinate = torch.arange(size, device=cross.device)
    for _ in range(n_steps):
        c, a, s = cross[rows], active[rows], signs[rows]
        # The systems are only as large as the largest active set: its features first (sorted, so
        # the gathers walk Q in memory order), padded with inactive ones that get identity rows.
        n_active = max(1, int(a.sum(-1).max()))
        index = (a.to(c.dtype) * 2 * size - coordinate).topk(n_active, -1).indices.sort(-1).values
        in_set = a.gather(1, index)
        # Q's columns of the set (P, m, n_active), taken straight from the stacked matrices: the
        # system is their rows of the set, and they give the gradient on every coordinate.
        flat = (rows * size * size)[:, None, None] + coordinate[None, :, None] * size + index[:, None, :]
        columns = torch.take(gram, flat)
        system = columns.gather(1, index.unsqueeze(-1).expand(-1, -1, n_active))
        system = torch.where(in_set[:, :, None] & in_set[:, None, :], system, 0.0)
        system.diagonal(dim1=-2, dim2=-1).add_((~in_set).to(c.dtype))
        factor, info = torch.linalg.cholesky_ex(system)
        rhs = torch.where(in_set, (c - alpha * s).gather(1, index), 0.0)
        w_set = torch.where(in_set, torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1), 0.0)
        w = torch.zeros_like(c).scatter_(1, index, w_set)
        gradient = c - (columns @ w_set.unsqueeze(-1)).squeeze(-1)
        keep = a & (w * s > 0)
        enter = ~a & (gradient.abs() > alpha + slack[rows])
        done = (keep == a).all(-1) & ~enter.any(-1) & (info == 0) & torch.isfinite(w).all(-1)
        solution[rows[done]] = w[done]
        solved[rows[done]] = True
        active[rows] = keep | enter
        signs[rows] = torch.where(keep, s, torch.sign(gradient))
        rows = rows[~done & (info == 0)]
        if rows.numel() == 0:
            break
    return solution, solved


def _duality_gap(coef, gradient, cross, target_variance, alpha):
    """scikit-learn's lasso duality gap (enet_coordinate_descent_gram), divided by n.

    With g = C - Q w: ||y - Xw||^2/n = ||y||^2/n - C.w - w.g, and X^T R / n = g.
    """
    c_dot_w = (cross * coef).sum(-2)
    residual = (target_variance - c_dot_w - (coef * gradient).sum(-2)).clamp_min(0)
    dual_norm = gradient.abs().amax(-2)
    scale = torch.where(dual_norm > alpha, alpha / dual_norm.clamp_min(torch.finfo(coef.dtype).tiny), 1.0)
    return (
        0.5 * residual * (1 + scale**2)
        + alpha * coef.abs().sum(-2)
        - scale * (target_variance - c_dot_w)
    ).clamp_min(0)


# ---------------------------------------------------------------------------------------------
# Sufficient statistics


@dataclass
class _Statistics:
    x_mean: torch.Tensor  # (..., p)
    y_mean: torch.Tensor  # (..., t)
    gram: torch.Tensor  # (..., p, p) Xc^T Xc / n
    cross: torch.Tensor  # (..., p, t) Xc^T Yc / n
    target_variance: torch.Tensor  # (..., t) ||Yc||^2 / n
    n_samples: torch.Tensor  # (...,)


def _centered_statistics(X, Y, sample_mask=None):
    if sample_mask is None:
        weight = torch.ones(X.shape[:-1], dtype=X.dtype, device=X.device)
    else:
        weight = torch.as_tensor(sample_mask, device=X.device).to(X.dtype).expand(X.shape[:-1])
    n_samples = weight.sum(-1)
    if bool((n_samples < 1).any()):
        raise RsvcError(problem="A regression has no training rows.", fix="Use more images per class.")
    x_mean = (weight.unsqueeze(-2) @ X).squeeze(-2) / n_samples[..., None]
    y_mean = (weight.unsqueeze(-2) @ Y).squeeze(-2) / n_samples[..., None]
    x_centered = (X - x_mean.unsqueeze(-2)) * weight.unsqueeze(-1)
    y_centered = (Y - y_mean.unsqueeze(-2)) * weight.unsqueeze(-1)
    normalizer = n_samples[..., None, None]
    return _Statistics(
        x_mean=x_mean,
        y_mean=y_mean,
        gram=x_centered.mT @ x_centered / normalizer,
        cross=x_centered.mT @ y_centered / normalizer,
        target_variance=y_centered.pow(2).sum(-2) / n_samples[..., None],
        n_samples=n_samples,
    )


# ---------------------------------------------------------------------------------------------
# Cross-validation


def grouped_kfold(groups, n_folds: int = 5, seed: int = 0) -> torch.Tensor:
    """fold_of_row (n,): the rows of one group (e.g. one source image) always share a fold.

    Groups are shuffled with ``seed``, ordered by size (largest first, ties in shuffled order) and
    dealt to folds in snake order (0..F-1, F-1..0, ...): equal-sized groups give fold sizes that
    differ by at most one group.
    """
    groups = torch.as_tensor(groups)
    if groups.ndim != 1 or groups.is_floating_point():
        raise RsvcError(
            problem=f"grouped_kfold needs one integer group label per row, got a tensor of shape "
            f"{tuple(groups.shape)} and dtype {groups.dtype}.",
            fix="Pass the source-image index of each patch.",
        )
    _, group_of_row, group_size = torch.unique(groups, return_inverse=True, return_counts=True)
    n_groups = len(group_size)
    if not isinstance(n_folds, int) or n_folds < 2:
        raise RsvcError(problem=f"regression.n_folds must be an integer >= 2, got {n_folds!r}.",
                        fix="Set regression.n_folds=5 (the method's default).")
    if n_groups < n_folds:
        raise RsvcError(
            problem=f"Cannot split {n_groups} source images into {n_folds} folds without splitting an image.",
            fix="Use more images in the regression set or lower regression.n_folds.",
        )
    generator = torch.Generator().manual_seed(int(seed))
    shuffled = torch.randperm(n_groups, generator=generator)
    order = shuffled[torch.argsort(-group_size.cpu()[shuffled], stable=True)]
    position = torch.arange(n_groups)
    lap, offset = position // n_folds, position % n_folds
    fold_of_group = torch.empty(n_groups, dtype=torch.long)
    fold_of_group[order] = torch.where(lap % 2 == 0, offset, n_folds - 1 - offset)
    return fold_of_group.to(groups.device)[group_of_row]


@dataclass
class CrossValidated:
    """Per-fold models fitted on standardized training rows, and their held-out predictions.

    Shapes: B batch entries, F folds, p features, t targets. ``coef_`` (B, F, t, p) and
    ``intercept_`` (B, F, t) are in standardized units; ``x_mean_``/``x_scale_`` (B, F, p) and
    ``y_mean_``/``y_scale_`` (B, F, t) are the training-row statistics of each fold (mean 0 and
    scale 1 without standardization). ``held_out_prediction`` (B, n, t) is each row's prediction by
    the fold model that did not see it, in original units.
    """

    coef_: torch.Tensor
    intercept_: torch.Tensor
    x_mean_: torch.Tensor
    x_scale_: torch.Tensor
    y_mean_: torch.Tensor
    y_scale_: torch.Tensor
    fold_of_row: torch.Tensor
    held_out_prediction: torch.Tensor

    @property
    def n_folds(self) -> int:
        return self.coef_.shape[-3]

    def unstandardized(self):
        """(weights (B, F, p, t), offsets (B, F, t)) with prediction = X @ weights + offsets."""
        weights = self.coef_.mT / self.x_scale_.unsqueeze(-1) * self.y_scale_.unsqueeze(-2)
        offsets = (
            self.y_mean_
            + self.y_scale_ * self.intercept_
            - (self.x_mean_.unsqueeze(-2) @ weights).squeeze(-2)
        )
        return weights, offsets

    def predict(self, X_new) -> torch.Tensor:
        """(B, n_new, t): the average of the F fold models' predictions, in original units."""
        X_new = _as_float64(X_new, self.coef_.device)
        weights, offsets = self.unstandardized()
        # The models are linear, so averaging predictions is predicting with the averaged model.
        return X_new @ weights.mean(-3) + offsets.mean(-2).unsqueeze(-2)


def cross_validate(X, Y, fold_of_row, regressor, standardize: bool = True) -> CrossValidated:
    """Fit one model per fold on the other folds' rows, all folds, targets and batch entries at once.

    X (B, n, p), Y (B, n, t); fold_of_row (n,) or (B, n), values 0..F-1. With ``standardize``, each
    fold's X and Y are standardized with the mean and (population) standard deviation of that fold's
    training rows only (constant columns get scale 1, like StandardScaler); held-out rows never
    enter a fold's statistics.
    """
    if not isinstance(regressor, _Regressor):
        raise RsvcError(
            problem=f"cross_validate needs one of rsvc's regressors, got {type(regressor).__name__}.",
            fix="Pass Lasso(...), Ridge(...) or LinearRegression() from rsvc_cli.algorithms.regression.",
        )
    X, Y = _check_xy(X, Y, to_float64=False)
    if X.ndim != 3:
        raise RsvcError(
            problem=f"cross_validate needs X shaped (batch, n_samples, n_features), got {tuple(X.shape)}.",
            fix="Stack one matrix per class along a leading dimension.",
        )
    n_batch, n_samples, _ = X.shape
    fold_of_row = torch.as_tensor(fold_of_row, device=X.device)
    if fold_of_row.is_floating_point() or fold_of_row.shape[-1] != n_samples or fold_of_row.ndim not in (1, 2):
        raise RsvcError(
            problem=f"fold_of_row must hold one integer fold per row ({n_samples} rows), shaped (n,) or "
            f"(batch, n); got shape {tuple(fold_of_row.shape)}.",
            fix="Build it with grouped_kfold(groups, n_folds, seed).",
        )
    fold_of_row = fold_of_row.long().expand(n_batch, n_samples)
    n_folds = int(fold_of_row.max()) + 1
    if int(fold_of_row.min()) < 0 or n_folds < 2:
        raise RsvcError(problem="fold_of_row must number folds 0..F-1 with F >= 2.",
                        fix="Build it with grouped_kfold(groups, n_folds, seed).")

    # A chunk of batch entries at a time, end to end: bounded memory (the float64 Gram matrices of
    # 1000 classes of 2048 features would take 168 GB at once), and every pass stays small enough to
    # run near cache speed (100 classes of 512 features: about 1.2x faster than all at once).
    n_features = X.shape[-1]
    per_chunk = max(1, _GRAM_CHUNK_ELEMENTS // (n_folds * n_features * n_features))
    parts, diagnostics = [], {name: [] for name in regressor._fit_diagnostics}
    for begin in range(0, n_batch, per_chunk):
        chunk = slice(begin, begin + per_chunk)
        parts.append(_cross_validate_chunk(X[chunk], Y[chunk], fold_of_row[chunk], n_folds, regressor, standardize))
        for name, values in diagnostics.items():
            values.append(getattr(regressor, name))
    for name, values in diagnostics.items():
        setattr(regressor, name, torch.cat(values))
    if len(parts) == 1:
        return parts[0]
    return CrossValidated(**{field.name: torch.cat([getattr(part, field.name) for part in parts])
                             for field in dataclasses.fields(CrossValidated)})


def _cross_validate_chunk(X, Y, fold_of_row, n_folds, regressor, standardize) -> CrossValidated:
    """cross_validate on a chunk of batch entries (checked inputs, fold_of_row (B, n))."""
    n_samples = X.shape[1]
    sums = _per_fold_sums(X, Y, fold_of_row, n_folds)
    n_train = (n_samples - sums.count)  # (B, F)
    if bool((n_train < 2).any()):
        raise RsvcError(problem="A cross-validation fold leaves fewer than 2 training rows.",
                        fix="Use more images per class or fewer folds.")
    denominator = n_train.to(torch.float64)

    def train_only(per_fold):
        """Sums over every fold but one, in place: (sum over all folds) - (this fold's sum)."""
        total = per_fold.sum(1, keepdim=True)
        return per_fold.neg_().add_(total)

    # Rows were shifted by their batch entry's overall mean (sums.x_shift) before summing, so the
    # second moments below do not cancel catastrophically.
    x_mean_shifted = train_only(sums.x_sum).div_(denominator[..., None])
    y_mean_shifted = train_only(sums.y_sum).div_(denominator[..., None])
    xy_cov = _subtract_outer(train_only(sums.xy).div_(denominator[..., None, None]), x_mean_shifted, y_mean_shifted)
    y_var = (train_only(sums.yy).div_(denominator[..., None]) - y_mean_shifted.pow(2)).clamp_min(0)
    xx_diagonal = sums.xx.diagonal(dim1=-2, dim2=-1).to(torch.float64, copy=True)  # train_only is in place
    x_var = (train_only(xx_diagonal).div_(denominator[..., None]) - x_mean_shifted.pow(2)).clamp_min(0)
    x_train_mean = x_mean_shifted + sums.x_shift.unsqueeze(1)
    y_train_mean = y_mean_shifted + sums.y_shift.unsqueeze(1)
    # A column holding one value on a fold's training rows (a channel silent on every training
    # image) has variance exactly 0 there, as StandardScaler computes it; moments from sums leave
    # rounding noise instead, which standardization would blow up. Such columns are found exactly,
    # from the per-fold extremes, and given their exact statistics (their rows of the Gram matrix
    # and cross products are zeroed below).
    x_constant, x_value = _training_constants(sums.x_min, sums.x_max)
    x_var.masked_fill_(x_constant, 0.0)
    x_train_mean = torch.where(x_constant, x_value, x_train_mean)
    y_constant, y_value = _training_constants(sums.y_min, sums.y_max)
    y_var.masked_fill_(y_constant, 0.0)
    y_train_mean = torch.where(y_constant, y_value, y_train_mean)

    if standardize:
        x_mean, x_scale = x_train_mean, _scale(x_var, x_train_mean)
        y_mean, y_scale = y_train_mean, _scale(y_var, y_train_mean)
    else:
        x_mean, x_scale = torch.zeros_like(x_train_mean), torch.ones_like(x_train_mean)
        y_mean, y_scale = torch.zeros_like(y_train_mean), torch.ones_like(y_train_mean)
    # Standardizing factors, 0 for the constant columns (their covariances are exactly 0).
    x_factor = torch.where(x_constant, 0.0, 1 / x_scale)
    y_factor = torch.where(y_constant, 0.0, 1 / y_scale)

    if compiled.handles(sums.xx):
        gram = torch.from_numpy(compiled.standardized_gram(sums.xx.numpy(), denominator.numpy(),
                                                           x_mean_shifted.numpy(), x_factor.numpy()))
    else:
        gram = _standardized_gram(sums.xx, denominator, x_mean_shifted, x_factor)
    cross = xy_cov.mul_(x_factor.unsqueeze(-1) * y_factor.unsqueeze(-2))
    target_variance = y_var / y_scale.pow(2)
    coef = regressor._solve_gram(gram, cross, target_variance, n_train)  # (B, F, p, t)
    # The regressor's own intercept on the (standardized) training rows; 0 when standardized.
    z_x_mean = (x_train_mean - x_mean) / x_scale
    z_y_mean = (y_train_mean - y_mean) / y_scale
    intercept = z_y_mean - (z_x_mean.unsqueeze(-2) @ coef).squeeze(-2)

    result = CrossValidated(
        coef_=coef.mT.contiguous(),
        intercept_=intercept,
        x_mean_=x_mean,
        x_scale_=x_scale,
        y_mean_=y_mean,
        y_scale_=y_scale,
        fold_of_row=fold_of_row,
        held_out_prediction=torch.empty(0),
    )
    result.held_out_prediction = _held_out_prediction(X, fold_of_row, *result.unstandardized())
    return result


def _held_out_prediction(X, fold_of_row, weights, offsets):
    """Each row predicted by its own fold's model: all folds' predictions for a few batch entries at
    a time, then the held-out one picked per row.

    The products run in X's precision (float64 stays float64): predictions of float32 activations
    are stored in float32, and a float64 copy of X would cost more than the products themselves.
    """
    n_batch, n_samples, n_features = X.shape
    n_folds, n_targets = offsets.shape[-2:]
    product_dtype = _product_dtype(X)
    stacked = weights.permute(0, 2, 1, 3).reshape(n_batch, n_features, n_folds * n_targets).to(product_dtype)
    per_chunk = max(1, min(n_batch, _STATISTICS_CHUNK_ELEMENTS // max(1, n_samples * n_features)))
    parts = []
    for i in range(0, n_batch, per_chunk):
        chunk = slice(i, i + per_chunk)
        every_fold = (X[chunk].to(product_dtype) @ stacked[chunk]).to(torch.float64)
        every_fold = every_fold.reshape(-1, n_samples, n_folds, n_targets) + offsets[chunk].unsqueeze(1)
        index = fold_of_row[chunk][:, :, None, None].expand(-1, -1, 1, n_targets)
        parts.append(every_fold.gather(2, index).squeeze(2))
    return torch.cat(parts)


@dataclass
class _FoldSums:
    count: torch.Tensor  # (B, F) rows per fold
    x_shift: torch.Tensor  # (B, p) the overall means subtracted before summing
    y_shift: torch.Tensor  # (B, t)
    x_sum: torch.Tensor  # (B, F, p)
    y_sum: torch.Tensor  # (B, F, t)
    xx: torch.Tensor  # (B, F, p, p), in the products' dtype (float32 for float32 activations)
    xy: torch.Tensor  # (B, F, p, t)
    yy: torch.Tensor  # (B, F, t)
    x_min: torch.Tensor  # (B, F, p) per-fold extremes of the raw values (+inf/-inf for an empty fold)
    x_max: torch.Tensor
    y_min: torch.Tensor  # (B, F, t)
    y_max: torch.Tensor


def _per_fold_sums(X, Y, fold_of_row, n_folds):
    """Sums over each fold's rows, every row used once: float64, except X^T X (see Precision).

    Rows are gathered by fold into a (B, F, longest fold, .) layout (padding rows zeroed), so one
    batched product per statistic covers every fold of every batch entry. Each batch entry is
    shifted by its own mean first (by the exact value for a constant column) so that the second
    moments do not cancel catastrophically when they become covariances. A few batch entries at a
    time go through reused buffers: bounded memory and no fresh multi-GB allocations.

    Precision: the products X^T X and X^T Y, nearly all of the work, run in float32 when X is not
    float64 (float32 activations), in float64 otherwise, and X^T X is returned in that dtype; the
    covariances built from them are float64. Float32 products put a relative error of about 1e-6
    on the covariances, which moves the lasso objective by far less than its 1e-6 tolerance (the
    error enters it squared at the optimum), at twice the speed of float64 products on CPUs.
    """
    n_batch, n_samples, n_features = X.shape
    n_targets = Y.shape[-1]
    device = X.device
    count = torch.nn.functional.one_hot(fold_of_row, n_folds).sum(1)  # (B, F)
    longest = int(count.max())
    order = torch.argsort(fold_of_row, dim=-1, stable=True)  # rows sorted by fold
    slot = torch.arange(longest, device=device)
    valid = slot < count.unsqueeze(-1)  # (B, F, longest)
    # A padding slot repeats its fold's first row, so per-fold extremes are unaffected; it is
    # zeroed (or skipped) before summing.
    position = (torch.cumsum(count, dim=-1) - count).unsqueeze(-1) + torch.where(valid, slot, 0)
    source = order.gather(1, position.clamp_max(n_samples - 1).reshape(n_batch, -1))  # (B, F * longest)
    valid_slot = valid.reshape(n_batch, -1)
    padding_mask = None if bool(valid.all()) else valid_slot.unsqueeze(-1)
    empty_fold = (count == 0).unsqueeze(-1)

    product_dtype = _product_dtype(X)
    float64 = dict(dtype=torch.float64, device=device)
    sums = _FoldSums(
        count=count,
        x_shift=torch.empty(n_batch, n_features, **float64),
        y_shift=torch.empty(n_batch, n_targets, **float64),
        x_sum=torch.empty(n_batch, n_folds, n_features, **float64),
        y_sum=torch.empty(n_batch, n_folds, n_targets, **float64),
        xx=torch.empty(n_batch, n_folds, n_features, n_features, dtype=product_dtype, device=device),
        xy=torch.empty(n_batch, n_folds, n_features, n_targets, **float64),
        yy=torch.empty(n_batch, n_folds, n_targets, **float64),
        x_min=torch.empty(n_batch, n_folds, n_features, **float64),
        x_max=torch.empty(n_batch, n_folds, n_features, **float64),
        y_min=torch.empty(n_batch, n_folds, n_targets, **float64),
        y_max=torch.empty(n_batch, n_folds, n_targets, **float64),
    )
    per_chunk = max(1, min(n_batch, _STATISTICS_CHUNK_ELEMENTS // max(1, n_samples * (n_features + n_targets))))
    x_layout = _LayoutBuffers(per_chunk, n_folds, longest, n_features, X.dtype, product_dtype, device)
    y_layout = _LayoutBuffers(per_chunk, n_folds, longest, n_targets, Y.dtype, torch.float64, device)
    for begin in range(0, n_batch, per_chunk):
        chunk = slice(begin, begin + per_chunk)
        mask = None if padding_mask is None else padding_mask[chunk]
        x = x_layout.fill(X[chunk], source[chunk], valid_slot[chunk], mask, empty_fold[chunk],
                          sums.x_shift[chunk], sums.x_min[chunk], sums.x_max[chunk])
        y = y_layout.fill(Y[chunk], source[chunk], valid_slot[chunk], mask, empty_fold[chunk],
                          sums.y_shift[chunk], sums.y_min[chunk], sums.y_max[chunk])
        # In the layout's dtype: a float64 sum would first copy the whole float32 layout to float64.
        sums.x_sum[chunk].copy_(x.sum(dim=-2))
        torch.sum(y, dim=-2, out=sums.y_sum[chunk])
        torch.sum(y * y, dim=-2, out=sums.yy[chunk])
        # Y^T X rather than X^T Y: the few targets make it the faster product (about 3x on CPUs).
        sums.xy[chunk].mT.copy_(torch.matmul(y.to(product_dtype).mT, x))
        _symmetric_gram(x, out=sums.xx[chunk])
    return sums


def _product_dtype(X):
    """The dtype of the big products over activations: float64 inputs stay float64, anything else
    (float32 or float16 activations) is multiplied in float32."""
    return torch.float64 if X.dtype == torch.float64 else torch.float32


def _symmetric_gram(x, out):
    """out = x^T x over the last two dimensions, computing each off-diagonal block once (3/4 of
    the multiplications; about 1.2x faster on CPUs than one product)."""
    half = x.shape[-1] // 2
    if half == 0:
        return torch.matmul(x.mT, x, out=out)
    top = x[..., :half].mT @ x  # rows [0, half): the upper-left and upper-right blocks
    out[..., :half, :] = top
    out[..., half:, :half] = top[..., half:].mT
    out[..., half:, half:] = x[..., half:].mT @ x[..., half:]
    return out


class _LayoutBuffers:
    """Reused buffers that take a chunk of rows to the (B, F, longest fold, columns) layout, shifted."""

    def __init__(self, n_batch, n_folds, longest, n_columns, dtype, layout_dtype, device):
        shape = (n_batch, n_folds * longest, n_columns)
        self.n_folds, self.longest = n_folds, longest
        self.gathered = None if dtype == layout_dtype else torch.empty(shape, dtype=dtype, device=device)
        self.layout = torch.empty(shape, dtype=layout_dtype, device=device)

    def fill(self, values, source, valid, padding_mask, empty_fold, out_shift, out_min, out_max):
        n = values.shape[0]
        layout = self.layout[:n]
        if compiled.handles(values):
            compiled.fold_layout(values.numpy(), source.numpy(), valid.numpy(), self.n_folds, layout.numpy(),
                                 out_shift.numpy(), out_min.numpy(), out_max.numpy())
            return layout.view(n, self.n_folds, self.longest, -1)
        gathered = layout if self.gathered is None else self.gathered[:n]
        # Whole rows per batch entry: several times faster than one gather over every element.
        for entry in range(n):
            torch.index_select(values[entry], 0, source[entry], out=gathered[entry])
        by_fold = gathered.view(n, self.n_folds, self.longest, -1)
        fold_min, fold_max = by_fold.amin(-2), by_fold.amax(-2)
        out_min.copy_(fold_min.masked_fill(empty_fold, torch.inf))
        out_max.copy_(fold_max.masked_fill(empty_fold, -torch.inf))
        # Any shift near the mean serves, if the layout's dtype holds it exactly; a constant column
        # is shifted by its own value, so that its shifted values are exactly zero.
        lowest, highest = out_min.amin(1), out_max.amax(1)
        out_shift.copy_(torch.where(lowest == highest, lowest, values.mean(-2, dtype=self.layout.dtype).to(lowest.dtype)))
        if gathered is not layout:
            layout.copy_(gathered)
        layout.sub_(out_shift.unsqueeze(1).to(layout.dtype))
        if padding_mask is not None:
            layout.mul_(padding_mask)
        return layout.view(n, self.n_folds, self.longest, -1)


def _standardized_gram(per_fold_xx, n_train, shifted_mean, factor):
    """Each fold's standardized training Gram matrix (B, F, p, p) in float64 from the per-fold sums
    X_f^T X_f (B, F, p, p): ((total - own fold) / n - m m^T) scaled by factor_i factor_j.

    The sums are the largest arrays of the cross-validation, so this makes four passes over them
    (the subtraction, the outer product, one scaling per side) instead of one per operation and a
    temporary; the 1/n is folded into the outer product and the scaling.
    """
    total = per_fold_xx.sum(1, keepdim=True)
    gram = per_fold_xx if per_fold_xx.dtype == torch.float64 else torch.empty_like(per_fold_xx, dtype=torch.float64)
    torch.sub(total, per_fold_xx, out=gram)  # the training rows' sums, float32 ones converted on the way
    _subtract_outer(gram, shifted_mean * n_train.unsqueeze(-1), shifted_mean)
    gram.mul_(factor.unsqueeze(-1))
    return gram.mul_((factor / n_train.unsqueeze(-1)).unsqueeze(-2))


def _training_constants(fold_min, fold_max):
    """Which columns hold a single value on each fold's training rows (every fold but that one),
    and the value: (constant (B, F, c), value (B, F, c)) from per-fold extremes (B, F, c)."""
    n_folds = fold_min.shape[1]
    others = ~torch.eye(n_folds, dtype=torch.bool, device=fold_min.device)[None, :, :, None]
    lowest = torch.where(others, fold_min.unsqueeze(1), torch.inf).amin(2)
    highest = torch.where(others, fold_max.unsqueeze(1), -torch.inf).amax(2)
    return lowest == highest, lowest


def _subtract_outer(matrix, left, right):
    """matrix - left right^T over the last two dimensions, in place."""
    flat = matrix.view(-1, *matrix.shape[-2:])
    flat.baddbmm_(left.reshape(-1, left.shape[-1], 1), right.reshape(-1, 1, right.shape[-1]), alpha=-1)
    return matrix


def _scale(variance, mean):
    """Standard deviation, 1 for constant columns (StandardScaler's convention)."""
    std = variance.sqrt()
    constant = std <= _CONSTANT_RELATIVE_STD * mean.abs()
    return torch.where(constant | (std == 0), torch.ones_like(std), std)


# ---------------------------------------------------------------------------------------------
# Checks


def _as_float64(values, device=None) -> torch.Tensor:
    return torch.as_tensor(values, device=device).to(torch.float64)


def _check_xy(X, Y, to_float64=True):
    X = torch.as_tensor(X)
    Y = torch.as_tensor(Y, device=X.device)
    if to_float64:
        X, Y = X.to(torch.float64), Y.to(torch.float64)
    else:
        X = X if X.is_floating_point() else X.to(torch.float64)
        Y = Y if Y.is_floating_point() else Y.to(torch.float64)
    if X.ndim < 2 or Y.ndim != X.ndim or X.shape[-2] != Y.shape[-2] or X.shape[:-2] != Y.shape[:-2]:
        raise RsvcError(
            problem=f"Regression needs X (..., n, p) and Y (..., n, t) with the same rows; got shapes "
            f"{tuple(X.shape)} and {tuple(Y.shape)}.",
            fix="Pass the predictor activations and the target coefficients of the same patches.",
        )
    for name, tensor in (("inputs", X), ("targets", Y)):
        if not _all_finite(tensor):
            raise RsvcError(
                problem=f"The regression {name} contain NaN or infinite values.",
                fix="Check the activations and coefficients of this class (re-extract or re-decompose).",
            )
    return X, Y


def _all_finite(tensor) -> bool:
    """Cheap first: the sum of finite values is finite unless it overflows; check element-wise if not."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _check_alpha(alpha, name):
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
        raise RsvcError(problem=f"{name} needs regression.alpha >= 0, got {alpha!r}.",
                        fix="Set regression.alpha to a non-negative number (0.1 for the method's lasso).")


def held_out_error(Y, held_out_prediction, fold_of_row) -> torch.Tensor:
    """(B,) cross-validation error of held-out predictions, LassoCV's criterion: per fold the mean
    squared error over its rows, averaged over folds; summed over targets, each divided by its
    variance over all rows (so every concept weighs alike; one target: LassoCV's number up to that
    constant). Y, held_out_prediction (B, n, t); fold_of_row (n,) or (B, n)."""
    Y, prediction = _as_float64(Y), _as_float64(held_out_prediction)
    fold_of_row = torch.as_tensor(fold_of_row, device=Y.device).long().expand(Y.shape[:2])
    n_folds = int(fold_of_row.max()) + 1
    squared = (Y - prediction).pow(2) / Y.var(-2, unbiased=False, keepdim=True).clamp_min(torch.finfo(Y.dtype).tiny)
    one_hot = torch.nn.functional.one_hot(fold_of_row, n_folds).to(Y.dtype)  # (B, n, F)
    per_fold = (one_hot.mT @ squared) / one_hot.sum(-2).unsqueeze(-1)  # (B, F, t)
    return per_fold.mean(-2).sum(-1)


def choose_alpha(errors, alphas) -> torch.Tensor:
    """(B,) the alpha of least error per batch entry from errors (n_alphas, B); ties go to the
    largest alpha (the sparsest model), as LassoCV, which scans alphas from large to small."""
    errors = _as_float64(errors)
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    order = torch.argsort(alphas, descending=True)
    best = errors[order].argmin(0)  # first minimum in descending-alpha order
    return alphas[order][best]

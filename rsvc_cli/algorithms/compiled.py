"""Compiled CPU kernels (numba) for the solvers whose work is many small independent problems.

Why: the lasso of cross-validation is thousands of problems of a few dozen active features each. The
batched torch solver (regression.py) runs every coordinate update as a tensor operation over all
problems, which is what a GPU wants; on a CPU its time goes to dispatch and to gathering each
problem's sub-matrices through memory. Compiled, one problem is tens of microseconds of arithmetic
in cache, and the problems are spread over the cores (``prange``). Same algorithm, same stopping
rules, same results to rounding: the tests run both paths on the same inputs. Two passes of the
cross-validation's statistics are fused here too (rows grouped by fold, the standardized Gram
matrices): several torch passes over the largest arrays become one or two. NNLS coefficients of
many rows against one concept basis are the same kind of work: a 10-variable problem per row. So
are the NMF's HALS sweeps: the update of one column of a factor (one sample's coefficients, one
feature's basis weights) never reads another column, so each block of columns runs all its concept
updates in cache, in place of one tensor operation per concept over the whole batch.

The kernels compile on first use and are cached on disk next to this file (numba's ``cache=True``:
about a minute once per installation on 2 cores, about a second to load after that). ``enabled()``
says whether they are used: numba importable and not switched off with ``RSVC_COMPILED_KERNELS=0``.
Callers fall back to the torch code otherwise, and always on GPUs.
"""

from __future__ import annotations

import os

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    njit = prange = None

# NNLS rows per parallel task.
_NNLS_ROWS_PER_BLOCK = 256
# Columns per parallel task of the NMF's HALS sweeps: a block's buffers (2 k + 1 rows) stay in L2.
_HALS_COLUMNS_PER_BLOCK = 512


def enabled() -> bool:
    """Whether the compiled kernels are used for CPU tensors."""
    return njit is not None and os.environ.get("RSVC_COMPILED_KERNELS", "1") != "0"


def handles(tensor) -> bool:
    """Whether the kernels take this tensor: enabled, on the CPU, float32 or float64 (numba reads
    neither float16 nor bfloat16; those, and GPU tensors, stay with the torch code)."""
    return tensor.device.type == "cpu" and str(tensor.dtype) in ("torch.float32", "torch.float64") and enabled()


def lasso_gram(gram: np.ndarray, cross: np.ndarray, target_variance: np.ndarray, alpha: float,
               max_iter: int, tol: float, initial_working_set: int, sweeps_per_newton: int,
               newton_steps: int):
    """min_w 1/2 w^T Q w - C^T w + alpha ||w||_1 for every column of C; see regression.solve_lasso_gram.

    gram (B, p, p), cross (B, p, t), target_variance (B, t), float64. The last three arguments are
    the working-set and Newton schedule of regression.py. Returns coef (B, p, t), duality gap (B, t)
    and coordinate-descent sweeps (B, t).
    """
    gram = np.ascontiguousarray(gram, dtype=np.float64)
    cross = np.ascontiguousarray(cross, dtype=np.float64)
    target_variance = np.ascontiguousarray(target_variance, dtype=np.float64)
    coef = np.zeros_like(cross)
    gap = np.zeros_like(target_variance)
    n_iter = np.zeros(target_variance.shape, dtype=np.int64)
    schedule = np.array([initial_working_set, sweeps_per_newton, newton_steps], dtype=np.int64)
    _lasso_all(gram, cross, target_variance, float(alpha), int(max_iter), float(tol), schedule, coef, gap, n_iter)
    return coef, gap, n_iter


def standardized_gram(per_fold_xx: np.ndarray, n_train: np.ndarray, shifted_mean: np.ndarray,
                      factor: np.ndarray) -> np.ndarray:
    """Each fold's standardized training Gram matrix (B, F, p, p), float64, in one pass over the
    per-fold sums X_f^T X_f (B, F, p, p; float32 or float64); see regression._standardized_gram.

    Five torch passes over the largest arrays of the cross-validation become one: the training sums
    (total - own fold, summed in float64), the mean correction and both scalings per element.
    """
    per_fold_xx = np.ascontiguousarray(per_fold_xx)
    out = np.empty(per_fold_xx.shape, dtype=np.float64)
    _standardized_gram_all(
        per_fold_xx, np.ascontiguousarray(n_train, dtype=np.float64),
        np.ascontiguousarray(shifted_mean, dtype=np.float64), np.ascontiguousarray(factor, dtype=np.float64), out,
    )
    return out


def fold_layout(values: np.ndarray, source: np.ndarray, valid: np.ndarray, n_folds: int, layout: np.ndarray,
                shift: np.ndarray, fold_min: np.ndarray, fold_max: np.ndarray) -> None:
    """Rows grouped by fold and shifted, with per-fold extremes, in two passes over the rows; see
    regression._LayoutBuffers.fill (the same outputs; the torch version makes seven passes).

    values (B, n, c); source and valid (B, F * longest) say which row fills each slot. Writes layout
    (B, F * longest, c) (padding slots zero), shift (B, c) (float64 values that layout's dtype holds
    exactly) and fold_min, fold_max (B, F, c) (+inf and -inf for an empty fold).
    """
    _fold_layout_all(values, source, valid, n_folds, layout, shift, fold_min, fold_max)


def nnls_rows(activations: np.ndarray, basis: np.ndarray, scale: np.ndarray, gram: np.ndarray,
              gram_pinv: np.ndarray, max_iter: int, tol: float, full_exchange_budget: int, min_pivot: float):
    """Exact NNLS of every row of activations (n, d) against one basis (k, d): nnls.nnls's path for
    one batch entry on CPUs, b = a W^T computed and solved row by row in one pass.

    ``gram`` is the Jacobi-scaled W W^T (k, k) and ``scale`` its scaling (k), ``gram_pinv`` the
    pseudo-inverse of ``gram``. Returns (coefficients (n, k) in the scaled variables, rhs (n, k) the
    scaled b, open (n,) the rows this kernel left to the torch solver: a passive set whose Gram
    block is numerically singular, or no solution within ``max_iter`` pivots). The last two
    arguments are nnls.py's backup-rule budget and smallest squared Cholesky pivot.
    """
    n_rows = activations.shape[0]
    n_concepts = basis.shape[0]
    coefficients = np.zeros((n_rows, n_concepts))
    rhs = np.empty((n_rows, n_concepts))
    still_open = np.zeros(n_rows, dtype=np.bool_)
    _nnls_rows(activations, np.ascontiguousarray(basis), scale, gram, gram_pinv, int(max_iter), float(tol),
               int(full_exchange_budget), float(min_pivot), coefficients, rhs, still_open)
    return coefficients, rhs, still_open


def hals_sweeps(factor: np.ndarray, gram: np.ndarray, cross: np.ndarray, n_sweeps: int) -> np.ndarray:
    """``n_sweeps`` HALS sweeps of a concept-major factor (B, k, m), in place; see
    decomposition._coordinate_descent_sweep (the same updates in the same order per column).

    Per sweep and concept t: factor[t] <- max(0, factor[t] - (gram[t] @ factor - cross[t]) / gram[t, t]),
    a concept with gram[t, t] = 0 left as it is. ``gram`` (B, k, k) and ``cross`` (B, k, m) have the
    factor's dtype. Returns scikit-learn's violation of the first sweep, the summed |projected
    gradient| per batch entry (float64).
    """
    n_batch, _, n_columns = factor.shape
    n_blocks = (n_columns + _HALS_COLUMNS_PER_BLOCK - 1) // _HALS_COLUMNS_PER_BLOCK
    violation = np.zeros((n_batch, n_blocks))
    _hals_all(factor, np.ascontiguousarray(gram), np.ascontiguousarray(cross), int(n_sweeps), violation)
    # Summed per entry in a fixed order: the result does not depend on how tasks met the threads.
    return violation.sum(axis=1)


def _jit(parallel=False, fastmath=False, inline="never"):
    def decorate(function):
        if njit is None:
            return function
        return njit(cache=True, parallel=parallel, nogil=True, fastmath=fastmath, inline=inline)(function)
    return decorate


@_jit(parallel=True)
def _lasso_all(gram, cross, target_variance, alpha, max_iter, tol, schedule, coef, gap, n_iter):
    n_batch, n_features, _ = gram.shape
    n_targets = cross.shape[2]
    for problem in prange(n_batch * n_targets):
        entry = problem // n_targets
        target = problem - entry * n_targets
        c = np.ascontiguousarray(cross[entry, :, target])
        weights = np.zeros(n_features)
        gradient, sweeps = _lasso_one(gram[entry], c, target_variance[entry, target], alpha, max_iter, tol,
                                      schedule, weights)
        coef[entry, :, target] = weights
        gap[entry, target] = _duality_gap(weights, gradient, c, target_variance[entry, target], alpha)
        n_iter[entry, target] = sweeps


@_jit(parallel=True)
def _standardized_gram_all(per_fold_xx, n_train, shifted_mean, factor, out):
    n_batch, n_folds, n_features, _ = per_fold_xx.shape
    for task in prange(n_batch * n_features):
        entry = task // n_features
        i = task - entry * n_features
        total = np.zeros(n_features)
        for fold in range(n_folds):
            row = per_fold_xx[entry, fold, i]
            for j in range(n_features):
                total[j] += row[j]
        for fold in range(n_folds):
            row = per_fold_xx[entry, fold, i]
            mean = shifted_mean[entry, fold]
            scale = factor[entry, fold]
            n = n_train[entry, fold]
            # (training sum - n m_i m_j) f_i f_j / n
            left = n * mean[i]
            row_scale = scale[i] / n
            target = out[entry, fold, i]
            for j in range(n_features):
                target[j] = ((total[j] - row[j]) - left * mean[j]) * (row_scale * scale[j])


@_jit(parallel=True)
def _fold_layout_all(values, source, valid, n_folds, layout, shift, fold_min, fold_max):
    n_batch, n_slots, n_columns = layout.shape
    longest = n_slots // n_folds
    for entry in prange(n_batch):
        lowest, highest = fold_min[entry], fold_max[entry]
        lowest[:] = np.inf
        highest[:] = -np.inf
        total = np.zeros(n_columns)
        n_rows = 0
        for slot in range(n_slots):
            if not valid[entry, slot]:
                continue
            n_rows += 1
            fold = slot // longest
            row = values[entry, source[entry, slot]]
            for j in range(n_columns):
                value = row[j]
                total[j] += value
                if value < lowest[fold, j]:
                    lowest[fold, j] = value
                if value > highest[fold, j]:
                    highest[fold, j] = value
        # Any shift near the mean serves, if the layout's dtype holds it exactly; a constant column
        # is shifted by its own value, so that its shifted values are exactly zero.
        layout_shift = np.empty(n_columns, dtype=layout.dtype)
        for j in range(n_columns):
            low, high = np.inf, -np.inf
            for fold in range(n_folds):
                low = min(low, lowest[fold, j])
                high = max(high, highest[fold, j])
            layout_shift[j] = low if low == high else total[j] / max(n_rows, 1)
            shift[entry, j] = layout_shift[j]
        for slot in range(n_slots):
            target = layout[entry, slot]
            if valid[entry, slot]:
                row = values[entry, source[entry, slot]]
                for j in range(n_columns):
                    target[j] = row[j] - layout_shift[j]
            else:
                target[:] = 0


@_jit()
def _duality_gap(weights, gradient, cross, target_variance, alpha):
    """scikit-learn's lasso duality gap divided by n, from g = C - Q w (regression._duality_gap)."""
    c_dot_w = 0.0
    w_dot_g = 0.0
    l1_norm = 0.0
    dual_norm = 0.0
    for i in range(weights.shape[0]):
        c_dot_w += cross[i] * weights[i]
        w_dot_g += weights[i] * gradient[i]
        l1_norm += abs(weights[i])
        dual_norm = max(dual_norm, abs(gradient[i]))
    residual = max(target_variance - c_dot_w - w_dot_g, 0.0)
    scale = alpha / dual_norm if dual_norm > alpha else 1.0
    gap = 0.5 * residual * (1 + scale * scale) + alpha * l1_norm - scale * (target_variance - c_dot_w)
    return max(gap, 0.0)


@_jit()
def _lasso_one(gram, cross, target_variance, alpha, max_iter, tol, schedule, weights):
    """One problem, working sets as in regression.solve_lasso_gram; returns (C - Q w, sweeps)."""
    n_features = cross.shape[0]
    gradient = cross.copy()
    threshold = tol * target_variance
    sweeps = 0
    priority = np.empty(n_features)
    while _duality_gap(weights, gradient, cross, target_variance, alpha) > threshold and sweeps < max_iter:
        # Working set: the support first, then the features whose KKT condition fails the most.
        n_support = 0
        for i in range(n_features):
            if weights[i] != 0:
                priority[i] = np.inf
                n_support += 1
            else:
                priority[i] = abs(gradient[i])
        size = min(n_features, max(schedule[0], 2 * n_support))
        working_set = _largest(priority, size)
        sub_gram = np.empty((size, size))
        for a in range(size):
            for b in range(size):
                sub_gram[a, b] = gram[working_set[a], working_set[b]]
        sub_weights = weights[working_set]
        sweeps += _lasso_subproblem(sub_gram, cross[working_set], sub_weights, alpha, max_iter - sweeps,
                                    schedule[1], schedule[2])
        for a in range(size):
            weights[working_set[a]] = sub_weights[a]
        # C - Q w on every feature, from the rows of Q of the support (Q is symmetric).
        gradient[:] = cross
        for k in range(n_features):
            if weights[k] != 0:
                row, value = gram[k], weights[k]
                for i in range(n_features):
                    gradient[i] -= row[i] * value
    return gradient, sweeps


@_jit()
def _largest(values, count):
    """Indices of the ``count`` largest values, in increasing order (ties broken by index). A
    partition finds the cut-off: 6x faster than sorting 512 values, a tenth of a lasso problem's time."""
    cutoff = -np.partition(-values, count - 1)[count - 1]
    chosen = np.empty(count, np.int64)
    n_above = 0
    for i in range(values.shape[0]):
        if values[i] > cutoff:
            n_above += 1
    n_ties = count - n_above
    n_chosen = 0
    for i in range(values.shape[0]):
        if values[i] > cutoff or (values[i] == cutoff and n_ties > 0):
            if values[i] == cutoff:
                n_ties -= 1
            chosen[n_chosen] = i
            n_chosen += 1
    return chosen


@_jit()
def _lasso_subproblem(gram, cross, weights, alpha, sweep_budget, sweeps_per_newton, newton_steps):
    """Coordinate-descent sweeps alternating with active-set Newton steps until a Newton step is exact
    (regression._solve_lasso_subproblem); ``weights`` is updated in place. Returns the sweeps run."""
    size = cross.shape[0]
    residual = cross.copy()  # C - Q w on the working set
    for a in range(size):
        if weights[a] != 0:
            residual -= gram[a] * weights[a]
    exact = np.empty(size)
    sweeps = 0
    while sweeps < sweep_budget:
        n_sweeps = min(sweeps_per_newton, sweep_budget - sweeps)
        for _ in range(n_sweeps):
            for a in range(size):
                diagonal = gram[a, a]
                old = weights[a]
                z = residual[a] + diagonal * old
                new = 0.0
                if diagonal > 0:
                    if z > alpha:
                        new = (z - alpha) / diagonal
                    elif z < -alpha:
                        new = (z + alpha) / diagonal
                if new != old:
                    change = old - new
                    row = gram[a]
                    for i in range(size):
                        residual[i] += row[i] * change
                    weights[a] = new
        sweeps += n_sweeps
        if _active_set_newton(gram, cross, weights, residual, alpha, newton_steps, exact):
            weights[:] = exact
            return sweeps
    return sweeps


@_jit()
def _active_set_newton(gram, cross, weights, residual, alpha, n_steps, solution):
    """regression._active_set_newton for one problem: True (and the optimum in ``solution``) when a
    step keeps its signs and admits no feature."""
    size = cross.shape[0]
    slack = 1e-9 * alpha + 1e-12 * np.abs(cross).max()
    active = np.empty(size, np.bool_)
    signs = np.empty(size)
    for a in range(size):
        violating = weights[a] == 0 and abs(residual[a]) > alpha + slack
        active[a] = weights[a] != 0 or violating
        signs[a] = np.sign(residual[a]) if violating else np.sign(weights[a])
    index = np.empty(size, np.int64)
    system = np.empty((size, size))
    packed = np.empty(size)
    target = np.empty(size)
    gradient = np.empty(size)
    for _ in range(n_steps):
        for a in range(size):
            target[a] = cross[a] - alpha * signs[a]
        if not _solve_on_set(gram, target, active, 0.0, index, system, packed, solution):
            return False
        gradient[:] = cross
        for a in range(size):
            if active[a]:
                if not np.isfinite(solution[a]):
                    return False
                row = gram[a]
                for i in range(size):
                    gradient[i] -= row[i] * solution[a]
        done = True
        for a in range(size):
            if active[a]:
                if not solution[a] * signs[a] > 0:
                    active[a] = False
                    done = False
            elif abs(gradient[a]) > alpha + slack:
                active[a] = True
                signs[a] = np.sign(gradient[a])
                done = False
        if done:
            return True
    return False


@_jit(parallel=True)
def _nnls_rows(activations, basis, scale, gram, gram_pinv, max_iter, tol, budget, min_pivot, coefficients, rhs,
               still_open):
    n_rows = activations.shape[0]
    n_concepts = basis.shape[0]
    n_blocks = (n_rows + _NNLS_ROWS_PER_BLOCK - 1) // _NNLS_ROWS_PER_BLOCK
    for block in prange(n_blocks):
        index = np.empty(n_concepts, np.int64)
        passive = np.empty(n_concepts, np.bool_)
        infeasible = np.empty(n_concepts, np.bool_)
        x = np.empty(n_concepts)
        system = np.empty((n_concepts, n_concepts))
        solution = np.empty(n_concepts)
        for row in range(block * _NNLS_ROWS_PER_BLOCK, min(n_rows, (block + 1) * _NNLS_ROWS_PER_BLOCK)):
            b = rhs[row]
            _times_basis_row(activations[row], basis, b)
            for j in range(n_concepts):
                b[j] /= scale[j]
            still_open[row] = not _nnls_one(gram, gram_pinv, b, max_iter, tol, budget, min_pivot, index, passive,
                                            infeasible, x, system, solution)
            coefficients[row] = x


@_jit(parallel=True)
def _hals_all(factor, gram, cross, n_sweeps, violation):
    n_batch, n_concepts, n_columns = factor.shape
    n_blocks = violation.shape[1]
    for task in prange(n_batch * n_blocks):
        entry = task // n_blocks
        block = task - entry * n_blocks
        start = block * _HALS_COLUMNS_PER_BLOCK
        width = min(n_columns, start + _HALS_COLUMNS_PER_BLOCK) - start
        # The block in contiguous buffers: loops over slices of the batch arrays do not vectorize
        # (numba cannot tell that their rows are contiguous); 1.8x faster sweeps with the copies.
        local = np.empty((n_concepts, width), dtype=factor.dtype)
        local_cross = np.empty((n_concepts, width), dtype=factor.dtype)
        for s in range(n_concepts):
            for j in range(width):
                local[s, j] = factor[entry, s, start + j]
                local_cross[s, j] = cross[entry, s, start + j]
        gradient = np.empty(width, dtype=factor.dtype)
        total = 0.0
        for sweep in range(n_sweeps):
            for t in range(n_concepts):
                _hals_gradient(local, gram[entry, t], local_cross[t], gradient)
                row = local[t]
                if sweep == 0:
                    # |projected gradient|: the gradient, but only its negative part where the entry is 0.
                    for j in range(width):
                        g = gradient[j]
                        total += abs(g) if row[j] > 0 else max(-g, 0.0)
                curvature = gram[entry, t, t]
                if curvature > 0:  # a concept with zero curvature (all zeros) stays as it is
                    for j in range(width):
                        value = row[j] - gradient[j] / curvature
                        row[j] = value if value > 0 else 0
        for s in range(n_concepts):
            for j in range(width):
                factor[entry, s, start + j] = local[s, j]
        violation[entry, block] = total


@_jit(fastmath={"contract"}, inline="always")
def _hals_gradient(factor, gram_row, cross_row, out):
    """out = gram_row @ factor - cross_row over a block of columns (contiguous buffers), concept by
    concept, so that each pass runs along contiguous rows."""
    for j in range(out.shape[0]):
        out[j] = -cross_row[j]
    for s in range(factor.shape[0]):
        weight = gram_row[s]
        source = factor[s]
        for j in range(out.shape[0]):
            out[j] += weight * source[j]


@_jit(fastmath={"reassoc", "contract"})
def _times_basis_row(activation, basis, out):
    """out = a W^T for one row in float64: one contiguous dot product per concept, each element
    converted on the fly (reassociated, so the sums vectorize; 25% faster than converting the row
    into a float64 buffer first)."""
    for j in range(basis.shape[0]):
        total = 0.0
        concept = basis[j]
        for i in range(activation.shape[0]):
            total += np.float64(activation[i]) * concept[i]
        out[j] = total


@_jit(inline="always")  # inlined into the row loop: 20% less time in the solver
def _nnls_one(gram, gram_pinv, b, max_iter, tol, budget, min_pivot, index, passive, infeasible, x, system, solution):
    """Block principal pivoting for one row (nnls._block_principal_pivoting); True when solved."""
    n = b.shape[0]
    # The unconstrained solution: done if positive, else its positive entries start the passive set.
    all_positive = True
    for j in range(n):  # both matrices are symmetric: rows, read contiguously
        value = 0.0
        pinv_row = gram_pinv[j]
        for i in range(n):
            value += pinv_row[i] * b[i]
        x[j] = value
        passive[j] = value > 0
        all_positive = all_positive and value > 0
    if all_positive:
        return True
    fewest_infeasible = n + 1
    exchange_budget = budget
    for _ in range(max_iter):
        if not _solve_on_set(gram, b, passive, min_pivot, index, system, solution, x):
            return False
        slack = 0.0
        largest_b = 0.0
        for j in range(n):
            slack += abs(x[j])
            largest_b = max(largest_b, abs(b[j]))
        slack = tol * (slack + largest_b)
        n_infeasible = 0
        last = -1
        for j in range(n):
            if passive[j]:
                bad = x[j] < 0
            else:
                gradient = -b[j]
                gram_row = gram[j]
                for i in range(n):
                    gradient += gram_row[i] * x[i]
                bad = gradient < -slack
            infeasible[j] = bad
            if bad:
                n_infeasible += 1
                last = j
        if n_infeasible == 0:
            return True
        if n_infeasible < fewest_infeasible:
            fewest_infeasible = n_infeasible
            exchange_budget = budget
            full_exchange = True
        else:
            full_exchange = exchange_budget >= 1
            exchange_budget -= 1
        if full_exchange:
            for j in range(n):
                if infeasible[j]:
                    passive[j] = not passive[j]
        else:  # Kim & Park's backup rule: swap only the infeasible variable with the largest index.
            passive[last] = not passive[last]
    return False


@_jit(inline="always")
def _solve_on_set(gram, b, in_set, min_pivot, index, system, packed, x):
    """x_F = G_FF^-1 b_F on the set F, x = 0 elsewhere, by Cholesky; False when G_FF is (nearly)
    singular. ``index``, ``system`` and ``packed`` are work space."""
    size = 0
    for j in range(b.shape[0]):
        if in_set[j]:
            index[size] = j
            size += 1
    for r in range(size):
        for c in range(size):
            system[r, c] = gram[index[r], index[c]]
        packed[r] = b[index[r]]
    if not _cholesky_solve(system, packed, size, min_pivot):
        return False
    x[:] = 0.0
    for r in range(size):
        x[index[r]] = packed[r]
    return True


@_jit()
def _cholesky_solve(matrix, rhs, n, min_pivot):
    """Solves matrix[:n, :n] x = rhs[:n] in place (the factor overwrites the lower triangle, x the
    right-hand side). False, leaving both half-done, when a squared pivot is not above ``min_pivot``
    (0: the matrix is not positive definite)."""
    for j in range(n):
        pivot = matrix[j, j]
        for k in range(j):
            pivot -= matrix[j, k] * matrix[j, k]
        if not pivot > min_pivot:
            return False
        pivot = np.sqrt(pivot)
        matrix[j, j] = pivot
        for i in range(j + 1, n):
            value = matrix[i, j]
            for k in range(j):
                value -= matrix[i, k] * matrix[j, k]
            matrix[i, j] = value / pivot
    for i in range(n):
        value = rhs[i]
        for k in range(i):
            value -= matrix[i, k] * rhs[k]
        rhs[i] = value / matrix[i, i]
    for i in range(n - 1, -1, -1):
        value = rhs[i]
        for k in range(i + 1, n):
            value -= matrix[k, i] * rhs[k]
        rhs[i] = value / matrix[i, i]
    return True

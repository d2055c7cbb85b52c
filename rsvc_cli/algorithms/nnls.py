"""Non-negative least squares of many rows against one fixed concept basis, batched.

Notation: activations A (..., n, d), concept_basis W (..., k, d), coefficients U (..., n, k). Each row
u of U solves

    min_u ||a - u W||^2   subject to   u >= 0.

k is small (tens) and n large (hundreds of thousands), so everything runs on the k x k Gram matrix
G = W W^T and the right-hand sides b = a W^T in float64: per row, min_u 1/2 u G u^T - u b^T, u >= 0,
a problem whose size does not depend on d. The solver is exact, not iterative-approximate: it stops
on a passive set whose least-squares solution meets the KKT conditions.

1. The unconstrained solution b G^+ (one shared pseudo-inverse per basis). Rows where it is
   positive are done; for the others its positive entries are the first guess of the passive set.
2. Block principal pivoting (Kim & Park, "Fast nonnegative matrix factorization: an active-set-like
   method and comparisons", SIAM J. Sci. Comput. 2011), in lockstep over all rows: solve on the
   passive set, swap every KKT-infeasible variable at once, fall back to one swap at a time when the
   count of infeasible variables stops falling (their backup rule), so it terminates.
3. Rows still open after ``max_iter`` pivots (rare, e.g. a rank-deficient basis) finish with
   Lawson-Hanson's active set method, also in lockstep.

Solves on a passive set are grouped: rows sharing a (basis, passive set) pattern share one
pseudo-inverse of the masked Gram matrix, so the number of k x k factorizations is the number of
distinct patterns, not of rows. Pseudo-inverses keep it exact when the basis is rank deficient
(b lies in the range of every G_FF, so G_FF^+ b_F solves the passive system).

On CPUs the same pivoting runs row by row in a compiled kernel (compiled.nnls_rows), which also
computes b row by row in float64 from float32 activations: no float64 copy of A, no gathers of
per-row k x k inverses (100,000 rows: 0.22 -> 0.10 s). Rows it cannot finish (a numerically
singular passive block, or out of pivots) come back to the torch solver here.

Accuracy: working on G squares the condition number of W (relative error ~ cond(W)^2 * 1e-16); at
cond(W) = 1e4 (tested) the result agrees with scipy.optimize.nnls, which works on W itself, to ~1e-10.
"""

from __future__ import annotations

import torch

from rsvc_cli.algorithms import compiled
from rsvc_cli.errors import RsvcError

# Row chunks: float64 copies of activations (4 MB: 1024 rows of 512 ran fastest), per-row k x k gathers (128 MB).
_ACTIVATION_CHUNK_ELEMENTS = 2**19
_GATHER_CHUNK_ELEMENTS = 2**24
# Kim & Park's backup rule: full exchanges allowed without progress before single exchanges.
_FULL_EXCHANGE_BUDGET = 3
# Smallest squared Cholesky pivot of a unit-diagonal Gram matrix inverted by Cholesky. Every squared
# pivot is at least the smallest eigenvalue, so a smaller one proves a condition number beyond ~1e11:
# such matrices (a rank-deficient basis) go to pinv.
_CHOLESKY_MIN_PIVOT = 1e-11


def nnls(
    activations: torch.Tensor,
    concept_basis: torch.Tensor,
    max_iter: int | None = None,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Non-negative coefficients U (..., n, k) with A ~ U W, row by row exact NNLS.

    activations (..., n, d) and concept_basis (..., k, d) broadcast over their leading batch
    dimensions. ``max_iter`` bounds the pivots of each phase (default 5 k + 10); ``tol`` is the
    relative slack on the KKT gradient test (the optimality certificate), in units of the size of
    the terms whose difference is that gradient. Computes in float64 and returns the activations'
    floating dtype.
    """
    activations, concept_basis = _check_inputs(activations, concept_basis)
    n_samples, n_features = activations.shape[-2:]
    n_concepts = concept_basis.shape[-2]
    batch_shape = torch.broadcast_shapes(activations.shape[:-2], concept_basis.shape[:-2])
    out_dtype = activations.dtype
    if n_samples == 0 or batch_shape.numel() == 0:
        return activations.new_zeros(*batch_shape, n_samples, n_concepts)
    activations = activations.expand(*batch_shape, n_samples, n_features).reshape(-1, n_samples, n_features)
    basis = concept_basis.to(torch.float64).expand(*batch_shape, n_concepts, n_features)
    basis = basis.reshape(-1, n_concepts, n_features)
    n_batch = basis.shape[0]
    if max_iter is None:
        max_iter = 5 * n_concepts + 10

    gram = basis @ basis.mT
    # Jacobi scaling: the solution set is invariant under positive rescaling of the variables,
    # and unit diagonals make pseudo-inverse thresholds and tolerances scale-free.
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    scale = torch.where(diagonal > 0, diagonal.sqrt(), torch.ones_like(diagonal))
    gram = gram / (scale[:, :, None] * scale[:, None, :])

    if compiled.handles(activations):
        coefficients = _nnls_compiled(activations, basis, gram, scale, max_iter, tol)
    else:
        rhs = _times_basis(activations, basis)
        _check_finite(rhs)
        coefficients = solve_nnls_gram(gram, rhs / scale[:, None, :], max_iter=max_iter, tol=tol)
    coefficients = coefficients / scale[:, None, :]
    return coefficients.to(out_dtype).reshape(*batch_shape, n_samples, n_concepts)


def _check_finite(rhs):
    # Any NaN or infinite activation reaches its row of b = A W^T (W is finite); checking b is far
    # cheaper than checking A.
    if not bool(torch.isfinite(rhs).all()):
        raise RsvcError(
            problem="The activations contain NaN or infinite values.",
            fix="Check the activations extracted for this layer (a diverged model or a broken image).",
        )


def _nnls_compiled(activations, basis, gram, scale, max_iter, tol):
    """The CPU path: per batch entry, the compiled kernel computes b and runs the same block principal
    pivoting row by row (compiled.nnls_rows: no per-pattern gathers of k x k inverses). The rare rows
    it leaves open (a singular passive block, or out of pivots) get this module's solver, with its
    pseudo-inverses and Lawson-Hanson fallback."""
    n_batch, n_samples, _ = activations.shape
    gram_pinv = torch.linalg.pinv(gram, hermitian=True)
    coefficients = torch.empty(n_batch, n_samples, gram.shape[-1], dtype=torch.float64)
    for entry in range(n_batch):
        solution, rhs, still_open = compiled.nnls_rows(
            activations[entry].numpy(), basis[entry].numpy(), scale[entry].numpy(), gram[entry].numpy(),
            gram_pinv[entry].numpy(), max_iter, tol, _FULL_EXCHANGE_BUDGET, _CHOLESKY_MIN_PIVOT,
        )
        rhs = torch.from_numpy(rhs)
        _check_finite(rhs)
        solution = torch.from_numpy(solution)
        if still_open.any():
            rows = torch.from_numpy(still_open.nonzero()[0])
            solution[rows] = solve_nnls_gram(gram[entry : entry + 1], rhs[rows][None], max_iter, tol)[0]
        coefficients[entry] = solution
    return coefficients


def _times_basis(activations, basis):
    """b = A W^T in float64. Float32 activations are converted a chunk of rows at a time into one
    reused buffer: bounded memory, and no page faults from a fresh float64 copy of A per chunk.
    Computed as W A^T (k x rows per chunk): with k in the tens that orientation ran 25% faster than
    A W^T here (MKL, 2 cores), and it is most of NNLS's time. One batch entry (class) at a time, so a
    chunk keeps its 1024 rows: chunks shared by 100 classes held 10 rows each and ran 7x slower."""
    n_batch, n_samples, n_features = activations.shape
    if activations.dtype == torch.float64:
        return activations @ basis.mT
    rows_per_chunk = max(1, min(n_samples, _ACTIVATION_CHUNK_ELEMENTS // max(1, n_features)))
    buffer = torch.empty(rows_per_chunk, n_features, dtype=torch.float64, device=activations.device)
    rhs_t = torch.empty(n_batch, basis.shape[-2], n_samples, dtype=torch.float64, device=activations.device)
    for entry in range(n_batch):
        for start in range(0, n_samples, rows_per_chunk):
            stop = min(n_samples, start + rows_per_chunk)
            part = buffer[: stop - start]
            part.copy_(activations[entry, start:stop])
            torch.mm(basis[entry], part.T, out=rhs_t[entry, :, start:stop])
    return rhs_t.mT.contiguous()


def solve_nnls_gram(gram: torch.Tensor, rhs: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """min_x 1/2 x G x^T - x b^T, x >= 0, for every row b of rhs (B, n, k), G = gram (B, k, k).

    G must be symmetric positive semi-definite with b in its range (true for G = W W^T, b = a W^T).
    """
    n_batch, n_samples, n_concepts = rhs.shape
    unconstrained = rhs @ torch.linalg.pinv(gram, hermitian=True)
    solution = unconstrained.clamp_min(0).reshape(-1, n_concepts)
    open_rows = (unconstrained <= 0).any(-1).reshape(-1).nonzero().squeeze(-1)
    if open_rows.numel() == 0:
        return solution.reshape(n_batch, n_samples, n_concepts)

    flat_rhs = rhs.reshape(-1, n_concepts)
    batch_index = torch.arange(n_batch, device=rhs.device).repeat_interleave(n_samples)
    rows_per_chunk = max(1, _GATHER_CHUNK_ELEMENTS // (n_concepts * n_concepts))
    for rows in open_rows.split(rows_per_chunk):
        passive = unconstrained.reshape(-1, n_concepts)[rows] > 0
        solved, open_mask = _block_principal_pivoting(
            gram, flat_rhs[rows], batch_index[rows], passive, max_iter, tol
        )
        if open_mask.any():
            stuck = open_mask.nonzero().squeeze(-1)
            solved[stuck] = _lawson_hanson(
                gram, flat_rhs[rows[stuck]], batch_index[rows[stuck]], max(3 * max_iter, 6 * n_concepts + 20), tol
            )
        solution[rows] = solved
    return solution.reshape(n_batch, n_samples, n_concepts)


def _block_principal_pivoting(gram, rhs, batch_index, passive, max_iter, tol):
    """Lockstep block principal pivoting; returns (solution, rows still open after max_iter)."""
    n_rows, n_concepts = rhs.shape
    solution = torch.zeros_like(rhs)
    still_open = torch.zeros(n_rows, dtype=torch.bool, device=rhs.device)
    rows = torch.arange(n_rows, device=rhs.device)
    fewest_infeasible = torch.full((n_rows,), n_concepts + 1, device=rhs.device)
    exchange_budget = torch.full((n_rows,), _FULL_EXCHANGE_BUDGET, device=rhs.device)
    position = torch.arange(1, n_concepts + 1, device=rhs.device)
    for _ in range(max_iter):
        b = rhs[rows]
        x = _solve_on_passive_sets(gram, b, passive, batch_index[rows])
        gradient = _times_gram(gram, x, batch_index[rows]) - b
        infeasible = (passive & (x < 0)) | (~passive & (gradient < -_gradient_slack(x, b, tol)))
        n_infeasible = infeasible.sum(-1)
        done = n_infeasible == 0
        solution[rows[done]] = x[done]
        keep = ~done
        rows, passive, infeasible, n_infeasible = rows[keep], passive[keep], infeasible[keep], n_infeasible[keep]
        fewest_infeasible, exchange_budget = fewest_infeasible[keep], exchange_budget[keep]
        if rows.numel() == 0:
            return solution, still_open
        improved = n_infeasible < fewest_infeasible
        full_exchange = improved | (exchange_budget >= 1)
        exchange_budget = torch.where(
            improved, torch.full_like(exchange_budget, _FULL_EXCHANGE_BUDGET), exchange_budget - (~improved).long()
        )
        fewest_infeasible = torch.minimum(fewest_infeasible, n_infeasible)
        # Backup rule: swap only the infeasible variable with the largest index.
        last = (infeasible * position).argmax(-1)
        single = torch.nn.functional.one_hot(last, n_concepts).bool()
        passive = passive ^ torch.where(full_exchange[:, None], infeasible, single)
    still_open[rows] = True
    return solution, still_open


def _lawson_hanson(gram, rhs, batch_index, max_iter, tol):
    """Lockstep Lawson-Hanson active set from x = 0; the robust fallback."""
    n_rows, n_concepts = rhs.shape
    solution = torch.zeros_like(rhs)
    x = torch.zeros_like(rhs)
    passive = torch.zeros_like(rhs, dtype=torch.bool)
    inner = torch.zeros(n_rows, dtype=torch.bool, device=rhs.device)
    rows = torch.arange(n_rows, device=rhs.device)
    for _ in range(max_iter):
        # Outer step (rows at a feasible passive-set optimum): add the most violated variable.
        outer = ~inner
        if outer.any():
            b = rhs[rows[outer]]
            descent = b - _times_gram(gram, x[outer], batch_index[rows[outer]])
            candidates = ~passive[outer] & (descent > _gradient_slack(x[outer], b, tol))
            has_candidate = candidates.any(-1)
            finished = outer.clone()
            finished[outer] = ~has_candidate
            solution[rows[finished]] = x[finished]
            entering = torch.where(candidates, descent, -torch.inf).argmax(-1)
            grow = outer.nonzero().squeeze(-1)[has_candidate]
            passive[grow, entering[has_candidate]] = True
            inner[grow] = True
            keep = ~finished
            rows, x, passive, inner = rows[keep], x[keep], passive[keep], inner[keep]
            if rows.numel() == 0:
                return solution
        # Inner step: solve on the passive set; step back to feasibility if needed.
        solving = inner.nonzero().squeeze(-1)
        p = passive[solving]
        s = _solve_on_passive_sets(gram, rhs[rows[solving]], p, batch_index[rows[solving]])
        feasible = (~p | (s > 0)).all(-1)
        x_now = x[solving]
        # Step from x toward s until the first passive variable reaches 0 (x >= 0 >= s there, and
        # x = s = 0 gives a zero step, not 0/0).
        step = x_now / (x_now - s).clamp_min(torch.finfo(s.dtype).tiny)
        step = torch.where(p & (s <= 0), step, torch.inf)
        ratio, blocking = step.min(-1)
        stepped = x_now + ratio.clamp(0, 1)[:, None] * (s - x_now)
        stepped_passive = p & (stepped > 0)
        stepped_passive[torch.arange(len(p), device=p.device), blocking] = False
        x[solving] = torch.where(feasible[:, None], s, torch.where(stepped_passive, stepped, 0.0))
        passive[solving] = torch.where(feasible[:, None], p, stepped_passive)
        inner[solving[feasible]] = False
    # Out of iterations: the current feasible iterate is the best available.
    solution[rows] = x
    return solution


def _solve_on_passive_sets(gram, rhs, passive, batch_index):
    """x with x_F = G_FF^+ b_F and x = 0 off the passive set F, one pseudo-inverse per pattern."""
    n_rows, n_concepts = rhs.shape
    if n_concepts + int(gram.shape[0]).bit_length() <= 52:
        # Bit codes summed by a float64 matrix product: exact below 2^53, and much faster than an
        # integer reduction.
        weights = 2.0 ** torch.arange(n_concepts, device=rhs.device, dtype=torch.float64)
        codes = passive.to(torch.float64) @ weights + batch_index.to(torch.float64) * 2.0**n_concepts
        _, pattern = torch.unique(codes, return_inverse=True)
    else:
        keys = torch.cat([batch_index[:, None], passive.long()], dim=1)
        _, pattern = torch.unique(keys, dim=0, return_inverse=True)
    n_patterns = int(pattern.max()) + 1
    representative = torch.full((n_patterns,), n_rows, device=rhs.device).scatter_reduce(
        0, pattern, torch.arange(n_rows, device=rhs.device), reduce="amin"
    )
    mask = passive[representative]
    # Identity off the passive set keeps those eigenvalues at 1, far from G_FF's smallest ones, so
    # the eigensolver cannot mix the two blocks (a zero block would, and cost accuracy).
    masked_gram = gram[batch_index[representative]] * (mask[:, :, None] & mask[:, None, :])
    masked_gram = masked_gram + torch.diag_embed((~mask).to(gram.dtype))
    inverse = _symmetric_inverse(masked_gram)
    x = (inverse[pattern] @ rhs[:, :, None]).squeeze(-1)
    return torch.where(passive, x, 0.0)


def _symmetric_inverse(matrices):
    """Pseudo-inverses of symmetric PSD matrices with unit-or-less diagonals: by Cholesky where every
    pivot is clearly positive (cheaper than the eigendecomposition pinv needs: the solver ran 15%
    faster), by pinv where a small pivot reveals a (near) singular matrix, as a rank-deficient basis gives."""
    factor, info = torch.linalg.cholesky_ex(matrices)
    pivots = factor.diagonal(dim1=-2, dim2=-1)
    well_posed = (info == 0) & (pivots.amin(-1) ** 2 > _CHOLESKY_MIN_PIVOT)
    if bool(well_posed.all()):
        return torch.cholesky_inverse(factor)
    inverse = torch.empty_like(matrices)
    inverse[well_posed] = torch.cholesky_inverse(factor[well_posed])
    inverse[~well_posed] = torch.linalg.pinv(matrices[~well_posed], hermitian=True)
    return inverse


def _times_gram(gram, x, batch_index):
    """x G row by row, each row with its own basis' Gram matrix."""
    if gram.shape[0] == 1:
        return x @ gram[0]
    return (x[:, None, :] @ gram[batch_index]).squeeze(-2)


def _gradient_slack(x, b, tol):
    """Rounding scale of the gradient x G - b per row: |G_ij| <= 1 after Jacobi scaling."""
    return (tol * (x.abs().sum(-1) + b.abs().amax(-1)))[:, None]


def _check_inputs(activations, concept_basis):
    activations = torch.as_tensor(activations)
    concept_basis = torch.as_tensor(concept_basis, device=activations.device)
    if not activations.is_floating_point():
        activations = activations.to(torch.get_default_dtype())
    if activations.ndim < 2 or concept_basis.ndim < 2:
        raise RsvcError(
            problem=f"NNLS needs activations (..., n, d) and a concept basis (..., k, d); got shapes "
            f"{tuple(activations.shape)} and {tuple(concept_basis.shape)}.",
            fix="Pass two-dimensional (or batched) tensors.",
        )
    if activations.shape[-1] != concept_basis.shape[-1]:
        raise RsvcError(
            problem=f"The activations have {activations.shape[-1]} features but the concept basis has "
            f"{concept_basis.shape[-1]}.",
            fix="Use the concept basis fitted on the same model layer as these activations.",
        )
    try:
        torch.broadcast_shapes(activations.shape[:-2], concept_basis.shape[:-2])
    except RuntimeError:
        raise RsvcError(
            problem=f"The batch dimensions of the activations {tuple(activations.shape[:-2])} and the "
            f"concept basis {tuple(concept_basis.shape[:-2])} do not match.",
            fix="Pass one concept basis per batch entry (e.g. per class), or one shared basis.",
        ) from None
    if not bool(torch.isfinite(concept_basis).all()):
        raise RsvcError(
            problem="The concept basis contains NaN or infinite values.",
            fix="Re-run the decomposition for this layer; the stored concept basis is corrupt.",
        )
    return activations, concept_basis

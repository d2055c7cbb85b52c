"""Similarity measures, batched over leading dimensions, computed in float64.

- ``pearson``: column-wise Pearson correlation; NaN where it is undefined (a constant column),
  never 0 and never an exception, so an undefined similarity cannot pass for "no similarity".
- ``concept_similarity``: RSVC's per-concept similarity (Pearson r between true and predicted
  coefficients) with the two constant cases told apart: a constant *prediction* of a varying
  concept is 0 and flagged ``unpredictable``; only a constant *truth* is undefined (NaN).
- ``concept_correlation`` / ``mean_max_correlation``: the k1 x k2 Pearson table between two sets of
  concept coefficients on the same patches, and the mean of its row maxima and of its column maxima
  (RSVC's layerwise "mean max correlation" similarity), NaN-aware.
- ``linear_cka``: linear centered kernel alignment (Kornblith et al., ICML 2019), by default with
  the debiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021) that is near 0 for independent
  representations instead of growing with the feature count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rsvc_cli.errors import RsvcError

__all__ = ["pearson", "concept_similarity", "ConceptSimilarity", "concept_correlation", "mean_max_correlation", "linear_cka"]


def pearson(x, y, dim: int = -2) -> torch.Tensor:
    """Pearson r between x and y along ``dim`` (samples), for every other index; float64.

    With x, y (..., n, k) and dim=-2 this is one r per column, shape (..., k). NaN where x or y is
    constant along ``dim`` (or has fewer than 2 samples).
    """
    x, y = _as_float64(x), _as_float64(y)
    try:
        x, y = torch.broadcast_tensors(x, y)
    except RuntimeError:
        raise RsvcError(
            problem=f"Cannot correlate tensors of shapes {tuple(x.shape)} and {tuple(y.shape)}.",
            fix="Pass true and predicted coefficients of the same patches and concepts.",
        ) from None
    x_centered = x - x.mean(dim, keepdim=True)
    y_centered = y - y.mean(dim, keepdim=True)
    x_norm = x_centered.norm(dim=dim)
    y_norm = y_centered.norm(dim=dim)
    # Normalize before the dot product (as scipy does) so scale cannot overflow or underflow.
    r = (
        (x_centered / x_norm.unsqueeze(dim)) * (y_centered / y_norm.unsqueeze(dim))
    ).sum(dim).clamp(-1.0, 1.0)
    undefined = _constant(x, dim) | _constant(y, dim)
    return torch.where(undefined, torch.nan, r)


class ConceptSimilarity(NamedTuple):
    """Per concept (..., k): the similarity and why it is what it is."""

    similarity: torch.Tensor  # float64; 0 where unpredictable, NaN where undefined
    unpredictable: torch.Tensor  # bool: the truth varies, the prediction carries none of it
    undefined: torch.Tensor  # bool: the truth is constant, nothing to predict


def concept_similarity(true, predicted, groups=None) -> ConceptSimilarity:
    """RSVC similarity of each concept: Pearson r between its true coefficients and their prediction.

    true, predicted (..., n, k), samples along -2. A predictor that carries no information (the
    lasso zeroes every weight) predicts a constant: r would be 0/0, but the concept varies and
    the other model cannot follow any of it, the strongest "only this model has it", so the
    similarity is 0 and the concept is flagged ``unpredictable``. With ``groups`` (n,), the fold
    of each sample of a held-out-fold prediction, each fold model predicts separately, and the
    prediction is uninformative when it is constant within every fold (each fold model then
    predicts its training mean, whose correlation with the truth comes from the split alone, not
    from the features); so held-out-fold and evaluation-set scoring agree on which concepts are
    unpredictable. Only a concept whose true coefficients are constant is ``undefined`` (NaN).
    """
    true, predicted = _as_float64(true), _as_float64(predicted)
    if true.shape != predicted.shape or true.ndim < 2:
        raise RsvcError(problem=f"concept_similarity needs true and predicted coefficients (..., n, k) of one shape; "
                        f"got {tuple(true.shape)} and {tuple(predicted.shape)}.",
                        fix="Pass the true and predicted coefficients of the same patches and concepts.")
    undefined = _constant(true, -2)
    if groups is None:
        uninformative = _constant(predicted, -2)
    else:
        groups = torch.as_tensor(groups, device=predicted.device)
        if groups.shape != (true.shape[-2],):
            raise RsvcError(problem=f"concept_similarity needs one group per sample ({true.shape[-2]}), "
                            f"got shape {tuple(groups.shape)}.", fix="Pass the fold of each row.")
        # A group of one sample shows nothing about its model's constancy; with no larger group, the whole.
        sizes = torch.unique(groups, return_counts=True)
        observed = sizes[0][sizes[1] > 1]
        uninformative = _constant(predicted, -2) if not len(observed) else torch.ones_like(undefined)
        for group in observed:
            uninformative &= _constant(predicted[..., groups == group, :], -2)
    unpredictable = uninformative & ~undefined
    r = pearson(true, predicted, dim=-2)
    similarity = torch.where(unpredictable, 0.0, torch.where(undefined, torch.nan, r))
    return ConceptSimilarity(similarity, unpredictable, undefined)


def concept_correlation(coefficients1, coefficients2) -> torch.Tensor:
    """Pearson table (..., k1, k2) between the columns of U1 (..., n, k1) and U2 (..., n, k2).

    Entry (i, j) equals pearson(U1[..., i], U2[..., j]); rows or columns of constant concepts are NaN.
    """
    first, second = _as_float64(coefficients1), _as_float64(coefficients2)
    if first.ndim < 2 or second.ndim < 2 or first.shape[-2] != second.shape[-2]:
        raise RsvcError(
            problem=f"concept_correlation needs coefficients (..., n, k) of the same n patches; got shapes "
            f"{tuple(first.shape)} and {tuple(second.shape)}.",
            fix="Compute both models' coefficients on the same patches.",
        )
    first_unit, first_constant = _unit_columns(first)
    second_unit, second_constant = _unit_columns(second)
    table = (first_unit.mT @ second_unit).clamp(-1.0, 1.0)
    undefined = first_constant.unsqueeze(-1) | second_constant.unsqueeze(-2)
    return torch.where(undefined, torch.nan, table)


def mean_max_correlation(table) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over rows of the row maximum, mean over columns of the column maximum), NaN-aware.

    table (..., k1, k2). NaN entries are ignored; an all-NaN row (column) is left out of the mean;
    the result is NaN only when nothing is defined.
    """
    table = _as_float64(table)
    if table.ndim < 2:
        raise RsvcError(problem=f"mean_max_correlation needs a (..., k1, k2) table, got shape {tuple(table.shape)}.",
                        fix="Pass the output of concept_correlation.")
    return _nanmean(_nanmax(table, -1), -1), _nanmean(_nanmax(table, -2), -1)


def linear_cka(x, y, debiased: bool = True) -> torch.Tensor:
    """Linear CKA between representations x (..., n, p1) and y (..., n, p2) of the same n inputs.

    CKA = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)) with linear kernels, computed in feature space
    (never an n x n matrix). ``debiased`` uses the unbiased HSIC estimator (needs n >= 4); it can be
    slightly negative for unrelated representations. NaN if a representation is constant.
    """
    x, y = _as_float64(x), _as_float64(y)
    if x.ndim < 2 or y.ndim < 2 or x.shape[-2] != y.shape[-2]:
        raise RsvcError(
            problem=f"linear_cka needs representations (..., n, p) of the same n inputs; got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}.",
            fix="Extract both layers' activations on the same images or patches.",
        )
    n = x.shape[-2]
    if debiased and n < 4:
        raise RsvcError(problem=f"Debiased CKA needs at least 4 samples, got {n}.",
                        fix="Use more patches, or debiased=False.")
    x = x - x.mean(-2, keepdim=True)
    y = y - y.mean(-2, keepdim=True)
    cross = (x.mT @ y).pow(2).sum(dim=(-2, -1))  # ||X^T Y||_F^2 = tr(K L), K = X X^T, L = Y Y^T
    self_x = (x.mT @ x).pow(2).sum(dim=(-2, -1))
    self_y = (y.mT @ y).pow(2).sum(dim=(-2, -1))
    if debiased:
        row_x = x.pow(2).sum(-1)  # diag(K)
        row_y = y.pow(2).sum(-1)
        cross = _debiased_hsic(cross, row_x, row_y, n)
        self_x = _debiased_hsic(self_x, row_x, row_x, n)
        self_y = _debiased_hsic(self_y, row_y, row_y, n)
    denominator = (self_x * self_y).sqrt()
    return torch.where(denominator > 0, cross / denominator, torch.nan)


def _debiased_hsic(trace_kl, diag_k, diag_l, n):
    """Unbiased HSIC (up to a factor common to numerator and denominator) from tr(K L) of centered
    features, as in Kornblith et al.'s reference code (_debiased_dot_product_similarity_helper)."""
    return (
        trace_kl
        - n / (n - 2) * (diag_k * diag_l).sum(-1)
        + diag_k.sum(-1) * diag_l.sum(-1) / ((n - 1) * (n - 2))
    )


def _unit_columns(values):
    """Columns centered and scaled to unit norm, and which columns are constant."""
    centered = values - values.mean(-2, keepdim=True)
    norm = centered.norm(dim=-2, keepdim=True)
    constant = _constant(values, -2)
    return centered / torch.where(norm > 0, norm, 1.0), constant


def _constant(values, dim):
    """True where all values along ``dim`` are equal (or there are fewer than 2)."""
    if values.shape[dim] < 2:
        return torch.ones(values.sum(dim).shape, dtype=torch.bool, device=values.device)
    return (values == values.narrow(dim, 0, 1)).all(dim)


def _nanmax(values, dim):
    filled = torch.where(torch.isnan(values), -torch.inf, values)
    maximum = filled.amax(dim)
    return torch.where(torch.isnan(values).all(dim), torch.nan, maximum)


def _nanmean(values, dim):
    return torch.nanmean(values, dim)


def _as_float64(values) -> torch.Tensor:
    return torch.as_tensor(values).to(torch.float64)

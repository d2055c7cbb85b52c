"""Bootstrap over images: how sure each similarity is, from per-image sufficient statistics.

Patches of one image are correlated, so the image is the unit of resampling (DESIGN.md, "Trust").
A resample is a vector of counts over a class's images (multinomial, as many draws as images);
every statistic here is a function of per-image sums (patch count and sums of x, y, xy, x^2, y^2
per concept), so all resamples at once are one matrix product of the (resamples x images) count
matrix with the (images x sums) table: no loop over resamples, no refit of anything.

- ``ImageBootstrap(n_resamples, seed).fit(image_index)`` draws the counts of one class's images.
  The same fitted bootstrap serves every direction, so self and cross similarities of a resample
  come from the same images and their gap is a per-resample difference.
- ``.pearson(true, predicted)``: (n_resamples, k) Pearson per resample. A resample on which the
  true coefficients are constant is undefined (NaN); one on which only the prediction is constant
  is 0, as for the point estimate (a constant prediction is no prediction: "unpredictable").
- ``.concept_correlation(u1, u2)``: (n_resamples, k1, k2) tables, for mean max concept correlation.
- ``percentile_interval`` and ``concept_calls``: intervals and the per-concept call.

Sums are taken of globally centred values (Pearson is shift invariant), which keeps the
one-pass variance formula ``sum x^2 - (sum x)^2 / n`` far from cancellation. Constancy is decided
exactly, from per-image minima and maxima, not by a tolerance on a variance.
"""

from __future__ import annotations

import numpy as np
import torch

from rsvc_cli.errors import RsvcError

__all__ = ["ImageBootstrap", "percentile_interval", "concept_calls", "CALLS", "nanmean_resamples"]

CALLS = ("model-specific", "shared", "unreliable", "uncertain", "undefined")

class ImageBootstrap:
    """Resamples of a set of images (with their patches), drawn once and applied to any statistic.

    Parameters: ``n_resamples`` (default 1000), ``seed`` (an int or a sequence of ints, e.g.
    (seed, class position) so classes are resampled independently and reproducibly).
    Fitted: ``counts_`` (n_resamples, n_images) float64, ``image_of_patch_`` (n_patches,)
    positions into the images, ``n_images_``.
    """

    def __init__(self, n_resamples: int = 1000, seed=0):
        self.n_resamples = n_resamples
        self.seed = seed

    def fit(self, image_index) -> "ImageBootstrap":
        image_index = np.asarray(image_index)
        if image_index.ndim != 1 or len(image_index) == 0:
            raise RsvcError(f"The bootstrap needs one image index per patch; got shape {image_index.shape}.",
                            "Pass the image index of every scored patch.")
        if int(self.n_resamples) < 1:
            raise RsvcError(f"The bootstrap needs at least one resample; got {self.n_resamples}.",
                            "Set score.n_resamples to a positive number (1000 is the default).")
        _, self.image_of_patch_ = np.unique(image_index, return_inverse=True)
        self.n_images_ = int(self.image_of_patch_.max()) + 1
        rng = np.random.default_rng(np.random.SeedSequence(self.seed))
        n, size = self.n_images_, int(self.n_resamples)
        # Multinomial counts (n draws of n images with replacement), tallied from the draws.
        drawn = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        self.counts_ = np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        self._counts = torch.from_numpy(self.counts_)
        self._drawn = (self._counts > 0).to(torch.float64)
        self._n_drawn = self._drawn.sum(1, keepdim=True)
        return self

    # Per-image sums -------------------------------------------------------------------------
    def _image_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` (n_patches, ...) over the patches of each image: (n_images, ...)."""
        index = torch.from_numpy(self.image_of_patch_).to(values.device)
        out = torch.zeros((self.n_images_, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return out.index_add_(0, index, values)

    def _image_range(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(self.image_of_patch_).to(values.device)
        expanded = index.view(-1, *([1] * (values.ndim - 1))).expand_as(values)
        shape = (self.n_images_, *values.shape[1:])
        low = torch.full(shape, torch.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, expanded, values, "amin")
        high = torch.full(shape, -torch.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, expanded, values, "amax")
        return low, high

    def _resampled(self, sums: torch.Tensor) -> torch.Tensor:
        """counts (B, n_images) @ sums (n_images, ...) -> (B, ...)."""
        counts = self._counts.to(sums.device)
        return (counts @ sums.reshape(self.n_images_, -1)).reshape(len(counts), *sums.shape[1:])

    def constant(self, values) -> torch.Tensor:
        """(B, k): True where ``values`` (n_patches, k) takes one value on all patches of a resample.

        Exact, by one matrix product too: a resample is constant iff it draws no image whose values
        vary and the images it draws share one value. Each image's value gets an integer id, and
        ids are equal iff n * sum(id^2) == (sum id)^2 over the drawn images (exact in float64
        for ids and counts far below 2^17).
        """
        values = _float64(values)
        low, high = self._image_range(values)
        _, ids = torch.unique(low, return_inverse=True)
        ids = ids.to(torch.float64)
        per_image = torch.stack([(high > low).to(torch.float64), ids, ids * ids])  # (3, n_images, ...)
        varying, first, second = (self._drawn.to(values.device) @ per_image.transpose(0, 1).reshape(self.n_images_, -1)) \
            .reshape(len(self._drawn), 3, *values.shape[1:]).unbind(1)
        return (varying == 0) & (self._n_drawn.to(values.device).view(-1, *[1] * (values.ndim - 1)) * second == first * first)

    # Statistics -------------------------------------------------------------------------------
    def _resampled_sums(self, *blocks: torch.Tensor) -> list[torch.Tensor]:
        """Per resample, the patch count (B, 1) and the column sums of each block (n_patches, m):
        all in one (resamples x images) @ (images x statistics) product."""
        ones = torch.ones(len(blocks[0]), 1, dtype=blocks[0].dtype, device=blocks[0].device)
        sums = self._resampled(self._image_sums(torch.cat([ones, *blocks], 1)))
        return list(sums.split([1, *(block.shape[1] for block in blocks)], 1))

    def pearson(self, true, predicted) -> torch.Tensor:
        """(B, k) Pearson of true vs predicted coefficients (n_patches, k) on each resample.

        NaN where the true coefficients are constant on the resample (undefined); 0 where only
        the prediction is.
        """
        x, y = _centred(true), _centred(predicted)
        if x.shape != y.shape or x.shape[0] != len(self.image_of_patch_):
            raise RsvcError(f"Bootstrap Pearson needs true and predicted coefficients of the fitted "
                            f"{len(self.image_of_patch_)} patches; got {tuple(x.shape)} and {tuple(y.shape)}.",
                            "Pass both for the same patches as the image index.")
        n, sx, sy, sxx, syy, sxy = self._resampled_sums(x, y, x * x, y * y, x * y)
        r = _pearson_from_sums(n, sx, sy, sxx, syy, sxy)
        x_constant, y_constant = self.constant(true), self.constant(predicted)
        r = torch.where(y_constant, 0.0, r)
        return torch.where(x_constant, torch.nan, r)

    def concept_correlation(self, coefficients1, coefficients2) -> torch.Tensor:
        """(B, k1, k2) Pearson tables between U1 (n, k1) and U2 (n, k2) per resample; NaN rows
        (columns) for concepts constant on the resample, as ``metrics.concept_correlation``."""
        u1, u2 = _centred(coefficients1), _centred(coefficients2)
        products = (u1.unsqueeze(-1) * u2.unsqueeze(-2)).reshape(len(u1), -1)
        n, s1, s2, s11, s22, s12 = self._resampled_sums(u1, u2, u1 * u1, u2 * u2, products)
        n, s12 = n.unsqueeze(-1), s12.reshape(len(s12), u1.shape[1], u2.shape[1])
        table = _pearson_from_sums(n, s1.unsqueeze(-1), s2.unsqueeze(-2), s11.unsqueeze(-1), s22.unsqueeze(-2), s12)
        undefined = self.constant(coefficients1).unsqueeze(-1) | self.constant(coefficients2).unsqueeze(-2)
        return torch.where(undefined, torch.nan, table)


def _pearson_from_sums(n, sx, sy, sxx, syy, sxy):
    covariance = sxy - sx * sy / n
    variance_x = (sxx - sx * sx / n).clamp_min(0.0)
    variance_y = (syy - sy * sy / n).clamp_min(0.0)
    denominator = (variance_x * variance_y).sqrt()
    # Exactly constant columns are overridden by the callers; a zero here is only such a column.
    return torch.where(denominator > 0, covariance / denominator, torch.nan).clamp(-1.0, 1.0)


def nanmean_resamples(values) -> torch.Tensor:
    """Mean over the last axis ignoring NaN, NaN where all are NaN (per resample class means)."""
    values = _float64(values)
    return torch.nanmean(values, -1)


def percentile_interval(samples, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, n_undefined) over the first axis of ``samples`` (resamples, ...).

    Percentile interval of the defined resamples; ``n_undefined`` counts the NaN resamples
    (a concept constant on some resamples). All-NaN positions give a NaN interval.
    """
    if not 0 < confidence < 1:
        raise RsvcError(f"A confidence level must lie between 0 and 1; got {confidence}.",
                        "Use e.g. score.confidence=0.95.")
    samples = np.asarray(samples.cpu() if torch.is_tensor(samples) else samples, dtype=np.float64)
    undefined = np.isnan(samples).sum(0)
    tail = (1 - confidence) / 2
    low = np.full(samples.shape[1:], np.nan)
    high = np.full(samples.shape[1:], np.nan)
    defined = undefined < len(samples)
    if defined.any():
        columns = samples[:, defined]
        low[defined] = np.nanquantile(columns, tail, axis=0)
        high[defined] = np.nanquantile(columns, 1 - tail, axis=0)
    return low, high, undefined


def concept_calls(gap_low, gap_high, self_low, self_high, defined=None, specific_gap: float = 0.4,
                  shared_gap: float = 0.1, min_self: float = 0.5) -> np.ndarray:
    """One call per concept from its gap (self minus cross) and self-baseline intervals.

    ``model-specific``: the gap's interval lies above ``specific_gap`` and the self baseline's
    lower bound is at least ``min_self``. ``unreliable``: the self baseline's upper bound is below
    ``min_self`` (its owner cannot predict it, so the cross similarity says nothing; this wins over
    ``shared``). ``shared``: the gap's interval lies below ``shared_gap``. Otherwise
    ``uncertain``; ``undefined`` where the point similarity is undefined (``defined`` False).
    """
    gap_low, gap_high = np.asarray(gap_low, float), np.asarray(gap_high, float)
    self_low, self_high = np.asarray(self_low, float), np.asarray(self_high, float)
    calls = np.full(gap_low.shape, "uncertain", dtype=object)
    with np.errstate(invalid="ignore"):
        calls[gap_high < shared_gap] = "shared"
        calls[self_high < min_self] = "unreliable"
        calls[(gap_low > specific_gap) & (self_low >= min_self)] = "model-specific"
    if defined is not None:
        calls[~np.asarray(defined, bool)] = "undefined"
    return calls.astype(str)


def _float64(values) -> torch.Tensor:
    return torch.as_tensor(values).to(torch.float64)


def _centred(values) -> torch.Tensor:
    values = _float64(values)
    return values - values.mean(0, keepdim=True)

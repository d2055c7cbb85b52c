"""Concept stability: does a concept come back when its factorization is refitted on other images?

NMF is non-convex and a concept is one optimum; a concept worth reading should reappear when the
concept images are resampled (DESIGN.md, "Trust"). ``concept_stability`` refits the decomposition
on ``n_resamples`` bootstrap resamples of the images (each drawn image brings all its patches),
matches the refit's concepts to the original ones one-to-one by the cosine of their basis rows
(Hungarian matching, ``scipy.optimize.linear_sum_assignment``, maximizing the summed cosine) and
returns, per original concept, the mean matched cosine over the refits: 1 for a concept every refit
finds again, lower for one that splits, merges or moves.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from rsvc_cli.errors import RsvcError

__all__ = ["concept_stability", "matched_cosines", "UNSTABLE_BELOW"]

# Concepts whose mean matched cosine falls below this are flagged `unstable`.
UNSTABLE_BELOW = 0.8


def matched_cosines(basis, other) -> np.ndarray:
    """(k,) cosine of each row of ``basis`` (k, d) with its partner row of ``other`` (k', d) under the
    one-to-one matching that maximizes the summed cosine (0 for rows left without a partner)."""
    a = torch.nn.functional.normalize(torch.as_tensor(basis, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(other, dtype=torch.float64), dim=-1)
    cosine = (a @ b.T).numpy()
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    out = np.zeros(len(cosine))
    out[rows] = cosine[rows, cols]
    return out


def concept_stability(activations, image_index, concept_basis, make_estimator: Callable[[], object],
                      n_resamples: int = 5, seed: int = 0) -> np.ndarray:
    """Mean matched cosine (k,) of ``concept_basis`` (k, d), fitted on ``activations`` (n, d) with
    one image index per row, against refits of ``make_estimator()`` on image resamples.

    Resamples with equal patch counts (every image has as many patches) are fitted as one batch.
    """
    if int(n_resamples) < 1:
        raise RsvcError(f"Concept stability needs at least one refit; got {n_resamples}.",
                        "Set decomposition.stability_resamples to a positive number, or 0 to skip stability.")
    activations = torch.as_tensor(activations)
    image_index = np.asarray(image_index)
    images, image_of_row = np.unique(image_index, return_inverse=True)
    rows_of_image = [np.flatnonzero(image_of_row == i) for i in range(len(images))]
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    resamples = []
    for _ in range(int(n_resamples)):
        drawn = rng.integers(0, len(images), size=len(images))
        resamples.append(np.concatenate([rows_of_image[i] for i in drawn]))
    if len({len(rows) for rows in resamples}) == 1:
        bases = make_estimator().fit(activations[np.stack(resamples)]).concept_basis_
    else:
        bases = [make_estimator().fit(activations[rows]).concept_basis_ for rows in resamples]
    return np.mean([matched_cosines(concept_basis, basis) for basis in bases], axis=0)

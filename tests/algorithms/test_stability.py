"""Concept stability on planted low-rank data, and the matching against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from rsvc_cli.algorithms.decomposition import make_decomposition
from rsvc_cli.algorithms.stability import UNSTABLE_BELOW, concept_stability, matched_cosines


def test_matching_is_the_best_permutation():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 6)), rng.random((4, 6))
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    cosine = unit(a) @ unit(b).T
    best = max(itertools.permutations(range(4)), key=lambda p: sum(cosine[i, p[i]] for i in range(4)))
    np.testing.assert_allclose(matched_cosines(a, b), [cosine[i, best[i]] for i in range(4)], atol=1e-12)
    assert np.allclose(matched_cosines(a, b[[2, 0, 3, 1]]), matched_cosines(a, b))


def test_planted_concepts_are_stable_and_a_surplus_concept_is_not():
    # Rank 3 with disjoint supports: the 3 planted concepts come back in every refit; a 4th concept
    # asked of rank-3 data fits noise and moves between refits (0.70 here).
    rng = np.random.default_rng(0)
    n_images, per_image, n_features = 60, 8, 30
    basis = np.zeros((3, n_features))
    for j in range(3):
        basis[j, 10 * j:10 * (j + 1)] = rng.random(10) + 0.5
    activations = rng.exponential(size=(n_images * per_image, 3)) @ basis + 0.05 * rng.random((n_images * per_image, n_features))
    image_index = np.repeat(np.arange(n_images), per_image)
    make = lambda: make_decomposition("nmf", n_concepts=4, max_iter=300, seed=0)  # noqa: E731
    fitted = make().fit(torch.from_numpy(activations))
    stability = concept_stability(activations, image_index, fitted.concept_basis_, make, n_resamples=5, seed=0)
    planted = [int(np.argmax(matched_cosines(basis, fitted.concept_basis_[[j]]))) for j in range(4)]
    recovered = np.array([np.max(matched_cosines(fitted.concept_basis_[[j]], basis)) for j in range(4)])
    assert (recovered > 0.99).sum() == 3, (planted, recovered)
    assert (stability[recovered > 0.99] > 0.99).all(), stability
    assert stability[recovered <= 0.99].item() < UNSTABLE_BELOW, stability

"""Concept importance (integrated gradients in concept space) and the replacement test.

DESIGN.md steps 6-7. Notation: a layer's output, one d-vector per position, is rebuilt from
concept coefficients U (n, P, k) and the concept basis W (k, d) as U W; a ``head`` maps U to the
model's outputs (n, C) by running the rest of the network on the rebuilt layer output
(:func:`rsvc_cli.models.intervention.make_concept_head` makes one from a model). P is the number of
positions the basis is applied at: 1 for a pooled (n, d) layer, h*w for a feature map, t tokens.

Batching convention for heads: a head is called with r copies of its n rows stacked along the first
axis (copy-major: rows [s n, (s + 1) n) are copy s), r >= 1, so that integration steps and concepts
go through the network in a few large batches; ``batch_size`` bounds r n. A head whose output
depends on fixed per-row inputs (images) must tile them the same way.

This module is pure math: tensors and a callable in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Head = Callable[[torch.Tensor], torch.Tensor]
QUADRATURE_METHODS = ("riemann_trapezoid", "riemann_middle", "gausslegendre")
REPLACEMENT_FIGURES = ("kl", "l2", "logit_l2", "top1_agreement", "target_prob_change")


def quadrature(steps: int, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """Nodes alpha in [0, 1] and weights (summing to 1) for the path integral, float64.

    "gausslegendre" (the default, as in captum): Gauss-Legendre nodes, all inside (0, 1); exact for
    polynomial integrands and by far the fastest to converge on smooth networks (GELU, LayerNorm,
    gating), no worse than the others across ReLU kinks. "riemann_trapezoid": ``steps`` equally
    spaced points including both ends (the authors' rule); it evaluates the gradient *at* the
    baseline, where, from zero, every ReLU of a bias-free path sits on its kink and a following
    LayerNorm divides by sqrt(eps) (gradients of 1e12 on timm's test_vit). "riemann_middle": the
    midpoints of ``steps`` equal intervals.
    """
    if method not in QUADRATURE_METHODS:
        raise ValueError(f"method must be one of {QUADRATURE_METHODS}, got {method!r}")
    minimum_steps = 2 if method == "riemann_trapezoid" else 1
    if steps < minimum_steps:
        raise ValueError(f"{method} needs at least {minimum_steps} steps, got {steps}")
    if method == "riemann_trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
    elif method == "riemann_middle":
        alphas = (np.arange(steps) + 0.5) / steps
        weights = np.full(steps, 1.0 / steps)
    else:
        nodes, node_weights = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (nodes + 1) / 2, node_weights / 2
    return alphas, weights


def _check_coefficients(coefficients: torch.Tensor, name: str = "coefficients") -> None:
    if coefficients.ndim != 3:
        raise ValueError(f"{name} must be (n, P, k), got shape {tuple(coefficients.shape)}")


def _stacked_copies(copies: torch.Tensor) -> torch.Tensor:
    """(r, n, P, k) -> (r n, P, k), copy-major, the layout heads receive."""
    return copies.reshape(-1, *copies.shape[2:])


def _target_scores(outputs: torch.Tensor, target: torch.Tensor, n_copies: int) -> torch.Tensor:
    """outputs (r n, C) -> each row's target column, (r n,)."""
    return outputs.gather(1, target.repeat(n_copies)[:, None])[:, 0]


def integrated_gradients(
    head: Head,
    coefficients: torch.Tensor,
    target: torch.Tensor,
    steps: int = 30,
    baseline: torch.Tensor | None = None,
    method: str = "gausslegendre",
    batch_size: int = 128,
    return_delta: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients of ``head(U)[i, target[i]]`` per concept coefficient, summed over positions.

    attributions[i, j] = sum_p (U - B)[i, p, j] * integral_0^1 d head(B + a (U - B))[i, target_i]
    / dU[i, p, j] da, with B the baseline (zeros by default), the integral by ``quadrature``. Steps
    go through ``head`` in chunks of at most ``batch_size`` rows (at least one step per chunk).
    Completeness: attributions.sum(-1) ~= head(U)[target] - head(B)[target]. It is exact for a
    linear rest of the network (a pooled penultimate layer), but across ReLU kinks the integrand
    is piecewise constant and the error falls only like 1/steps: a trained CIFAR ResNet-20 at its
    layer2 map needs 100-200 steps for 1 % on most images, where 30 steps leave a few percent
    (more on images whose score barely moves along the path).
    From a zero baseline at a layer followed by LayerNorm (transformer blocks) the score jumps
    near alpha = 0 and no rule resolves it; a mean-coefficient baseline makes it smooth. With
    ``return_delta`` the gap (attributions.sum(-1) minus that difference, (n,)) comes back too, at
    the cost of one more head call on 2n rows. Returns float64 (n, k).
    """
    _check_coefficients(coefficients)
    if baseline is None:
        baseline = torch.zeros_like(coefficients)
    if baseline.shape != coefficients.shape:
        raise ValueError(f"baseline {tuple(baseline.shape)} != coefficients {tuple(coefficients.shape)}")
    target = torch.as_tensor(target, device=coefficients.device).long()
    n_rows = coefficients.shape[0]
    alphas, weights = quadrature(steps, method)
    alphas = torch.as_tensor(alphas, dtype=coefficients.dtype, device=coefficients.device)
    weights = torch.as_tensor(weights, dtype=torch.float64, device=coefficients.device)
    difference = coefficients - baseline

    steps_per_chunk = max(1, batch_size // max(n_rows, 1))
    weighted_gradients = torch.zeros(coefficients.shape, dtype=torch.float64, device=coefficients.device)
    for start in range(0, steps, steps_per_chunk):
        chunk_alphas = alphas[start : start + steps_per_chunk]
        path = _stacked_copies(baseline + chunk_alphas[:, None, None, None] * difference).requires_grad_(True)
        with torch.enable_grad():
            scores = _target_scores(head(path), target, len(chunk_alphas))
            (gradients,) = torch.autograd.grad(scores.sum(), path)
        gradients = gradients.reshape(len(chunk_alphas), *coefficients.shape).double()
        weighted_gradients += torch.einsum("s,snpk->npk", weights[start : start + steps_per_chunk], gradients)

    attributions = (difference.double() * weighted_gradients).sum(dim=1)
    if not return_delta:
        return attributions
    with torch.no_grad():
        endpoints = head(_stacked_copies(torch.stack([coefficients, baseline])))
    endpoint_scores = _target_scores(endpoints, target, 2).double().reshape(2, n_rows)
    return attributions, attributions.sum(-1) - (endpoint_scores[0] - endpoint_scores[1])


def concept_importance(attributions: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Mean attribution per concept over rows, (..., n, k) -> (..., k), divided by its largest |value|.

    Call it on one class's rows (attributions to that class's score). Where every mean is 0 the
    normalized importance is undefined: NaN, like the project's other undefined figures.
    """
    importance = attributions.mean(dim=-2)
    if normalize:
        importance = importance / importance.abs().amax(dim=-1, keepdim=True)
    return importance


def _replacement_figures(
    head: Head,
    true_coefficients: torch.Tensor,
    predicted_coefficients: torch.Tensor,
    concepts: torch.Tensor,
    target: torch.Tensor,
    concept_basis: torch.Tensor,
    mix: float,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """The replacement figures for each concept in ``concepts`` and each row: dict of (len(concepts), n)."""
    _check_coefficients(true_coefficients, "true_coefficients")
    if predicted_coefficients.shape != true_coefficients.shape:
        raise ValueError(
            f"predicted_coefficients {tuple(predicted_coefficients.shape)} != "
            f"true_coefficients {tuple(true_coefficients.shape)}"
        )
    target = torch.as_tensor(target, device=true_coefficients.device).long()
    n_rows = true_coefficients.shape[0]
    # Only concept j's column changes, so the rebuilt layer output moves by (delta_j outer W_j) and
    # its L2 distance (the authors' L2, over all positions) is |delta_j| * |W_j|, no network needed.
    mixed = mix * predicted_coefficients + (1 - mix) * true_coefficients
    column_change = (mixed - true_coefficients)[..., concepts].double()  # (n, P, r)
    basis_norms = concept_basis.to(column_change).norm(dim=-1)[concepts]
    l2 = column_change.norm(dim=1).T * basis_norms[:, None]  # (r, n)

    concept_count = len(concepts)
    replaced_outputs = []
    with torch.no_grad():
        original = head(true_coefficients).double()
        concepts_per_chunk = max(1, batch_size // max(n_rows, 1))
        for start in range(0, concept_count, concepts_per_chunk):
            chunk = concepts[start : start + concepts_per_chunk]
            copies = true_coefficients.expand(len(chunk), *true_coefficients.shape).clone()
            copy_index = torch.arange(len(chunk), device=true_coefficients.device)
            copies[copy_index, :, :, chunk] = mixed[..., chunk].permute(2, 0, 1)
            replaced_outputs.append(head(_stacked_copies(copies)).double().reshape(len(chunk), n_rows, -1))
    replaced = torch.cat(replaced_outputs)  # (r, n, C)

    original_log_p = torch.log_softmax(original, dim=-1)  # (n, C)
    replaced_log_p = torch.log_softmax(replaced, dim=-1)  # (r, n, C)
    kl = (original_log_p.exp() * (original_log_p - replaced_log_p)).sum(-1)
    target_index = target[None, :, None].expand(concept_count, n_rows, 1)
    original_target_p = original_log_p.gather(-1, target[:, None]).exp()[:, 0]
    target_prob_change = replaced_log_p.gather(-1, target_index).exp()[..., 0] - original_target_p
    return {
        "kl": kl,
        "l2": l2,
        "logit_l2": (replaced - original).norm(dim=-1),
        "top1_agreement": replaced.argmax(-1) == original.argmax(-1),
        "target_prob_change": target_prob_change,
    }


def replacement_test(
    head: Head,
    true_coefficients: torch.Tensor,
    predicted_coefficients: torch.Tensor,
    concept: int,
    target: torch.Tensor,
    *,
    concept_basis: torch.Tensor,
    mix: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Replace concept ``concept``'s coefficients by mix * predicted + (1 - mix) * true and rerun the head.

    The mixed coefficients are used as they are, negative or not (as the authors do). Per row (n,),
    comparing head(true) ("original") with head(replaced): ``kl`` = KL(original ||
    replaced) of the softmax outputs; ``l2`` = L2 distance between the two rebuilt layer outputs
    (the authors' L2; needs ``concept_basis`` (k, d)); ``logit_l2`` = L2 distance between the
    outputs; ``top1_agreement`` (bool); ``target_prob_change`` = p_replaced - p_original of the
    target class (negative: the class lost probability). Float64.
    """
    concepts = torch.as_tensor([concept], device=true_coefficients.device)
    figures = _replacement_figures(
        head, true_coefficients, predicted_coefficients, concepts, target, concept_basis, mix, batch_size=1
    )
    return {name: values[0] for name, values in figures.items()}


def replacement_test_all(
    head: Head,
    true_coefficients: torch.Tensor,
    predicted_coefficients: torch.Tensor,
    target: torch.Tensor,
    *,
    concept_basis: torch.Tensor,
    mix: float = 0.5,
    batch_size: int = 128,
    reduce: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`replacement_test` for every concept at once: dict of (k,) means over rows.

    Concepts go through ``head`` in chunks of at most ``batch_size`` rows (at least one concept
    per chunk). ``top1_agreement`` becomes the fraction of rows that keep their top-1 class. With
    ``reduce=False`` the (k, n) per-row figures come back instead.
    """
    _check_coefficients(true_coefficients, "true_coefficients")
    concepts = torch.arange(true_coefficients.shape[-1], device=true_coefficients.device)
    figures = _replacement_figures(
        head, true_coefficients, predicted_coefficients, concepts, target, concept_basis, mix, batch_size
    )
    if not reduce:
        return figures
    return {name: values.double().mean(dim=-1) for name, values in figures.items()}


def relative_to_baseline(
    result: dict[str, torch.Tensor], baseline_result: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each replacement figure minus the same figure for the self-regression baseline (float64).

    DESIGN.md step 7: a concept whose replacement from the other model hurts more than its
    replacement from the model's own activations is one the other model does not share.
    """
    if set(result) != set(baseline_result):
        raise ValueError(f"figures differ: {sorted(result)} vs {sorted(baseline_result)}")
    return {name: result[name].double() - baseline_result[name].double() for name in result}

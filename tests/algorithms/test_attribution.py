"""Concept importance (integrated gradients in concept space) and the replacement test.

Oracles: heads with closed-form integrated gradients (linear, homogeneous cubic), scipy's entropy
for the KL divergence, direct rebuilds for the L2 distance; on real networks, completeness
(attributions sum to the change of the target score) and the effect of zeroing concepts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import timm
import torch
from torch import nn

from rsvc_cli.algorithms.attribution import (
    REPLACEMENT_FIGURES,
    concept_importance,
    integrated_gradients,
    quadrature,
    relative_to_baseline,
    replacement_test,
    replacement_test_all,
)
from rsvc_cli.algorithms.nnls import nnls
from rsvc_cli.models.intervention import capture_layer_output, make_concept_head, to_positions
from rsvc_cli.models.registry import make_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXACT_TOL = 1e-10  # float64 heads, where the quadrature is exact
QUADRATURE_TOL = 1e-3  # cubic path integrand, 30 steps, Riemann rules (error ~ 1/steps^2)
COMPLETENESS_TOL = 0.01  # |sum of attributions - score change| / |score change|, per image
SELF_REPLACEMENT_TOL = 1e-5  # a float32 network run twice on the same rebuilt output, in two batches

# Steps for completeness within 1 % on every image, found by sweeping steps (Gauss-Legendre, the
# default): a trained CIFAR ResNet-20 at its layer2 map, where ReLU kinks along the path make the
# integrand piecewise constant, needs 50-100 steps on these ship images and up to 200 on other
# classes; test_vit's first block (seed-0 weights), from a mean-coefficient baseline, 16-30.
INTERMEDIATE_MAP_STEPS = 200
TRANSFORMER_BLOCK_STEPS = 30

METHODS = ("riemann_trapezoid", "riemann_middle", "gausslegendre")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def shared_dir() -> Path:
    path = Path(__file__).resolve().parents[3] / "shared"
    assert path.is_dir(), f"{path} is missing: these tests need the shared CIFAR-10 data and checkpoints"
    return path


def load_cifar_resnet20() -> nn.Module:
    checkpoint = shared_dir() / "models" / "cifar10" / "resnet20-12fca82f.th"
    return make_model("cifar_resnet20", checkpoint=str(checkpoint)).module


def load_cifar_images(class_name: str, n_images: int, start: int = 0) -> torch.Tensor:
    """The first CIFAR-10 test images of a class, normalized as the CIFAR ResNets expect."""
    from PIL import Image

    folder = shared_dir() / "data" / "cifar10" / "test" / class_name
    paths = sorted(folder.glob("*.jpg"))[start : start + n_images]
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (images - mean) / std


def fit_nmf_basis(activations: torch.Tensor, n_concepts: int) -> torch.Tensor:
    """scikit-learn's NMF (the tests need a sensible non-negative basis, not a converged one)."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        nmf = NMF(n_concepts, init="nndsvd", max_iter=500, random_state=0).fit(activations.double().numpy())
    return torch.from_numpy(nmf.components_)


def concept_setup(model, layer_name, images, concept_basis):
    """Coefficients of every position against the basis, and the head rebuilding the layer from them."""
    rows, restore = to_positions(capture_layer_output(model, layer_name, images), concept_basis.shape[1])
    coefficients = nnls(rows.double(), concept_basis)
    return coefficients, make_concept_head(model, layer_name, images, concept_basis, restore)


def target_scores(head, coefficients, target) -> torch.Tensor:
    with torch.no_grad():
        return head(coefficients).double().gather(1, target[:, None])[:, 0]


def relative_completeness_gap(head, coefficients, target, baseline=None, **options) -> torch.Tensor:
    baseline = torch.zeros_like(coefficients) if baseline is None else baseline
    attributions, delta = integrated_gradients(
        head, coefficients, target, baseline=baseline, return_delta=True, **options
    )
    assert torch.isfinite(attributions).all()
    change = target_scores(head, coefficients, target) - target_scores(head, baseline, target)
    return delta.abs() / change.abs()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_problem(seed: int, n=4, n_positions=3, n_concepts=5, n_features=6, n_classes=7):
    generator = torch.Generator().manual_seed(seed)
    coefficients = torch.rand(n, n_positions, n_concepts, generator=generator, dtype=torch.float64)
    concept_basis = torch.randn(n_concepts, n_features, generator=generator, dtype=torch.float64)
    readout = torch.randn(n_features, n_classes, generator=generator, dtype=torch.float64)
    target = torch.randint(n_classes, (n,), generator=generator)
    return coefficients, concept_basis, readout, target


# --------------------------------------------------------------------------------------------
# Quadrature and integrated gradients against closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [2, 7, 30])
def test_quadrature_integrates_polynomials_it_should(method, steps):
    alphas, weights = quadrature(steps, method)
    assert ((alphas >= 0) & (alphas <= 1)).all() and alphas.shape == weights.shape == (steps,)
    exact_degree = 2 * steps - 1 if method == "gausslegendre" else 1
    for degree in range(exact_degree + 1):
        assert np.isclose((weights * alphas**degree).sum(), 1 / (degree + 1), atol=EXACT_TOL)


def test_quadrature_refuses_nonsense():
    with pytest.raises(ValueError, match="method"):
        quadrature(10, "simpson")
    with pytest.raises(ValueError, match="at least 2"):
        quadrature(1, "riemann_trapezoid")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_integrated_gradients_of_a_linear_head_are_exact(method, seed):
    """head(U) = sum_p U_p W R: attribution = sum_p (U - B)_pj (W R)_j,target for any rule and baseline."""
    coefficients, concept_basis, readout, target = random_problem(seed)
    baseline = torch.rand(coefficients.shape, generator=seeded(seed + 10), dtype=torch.float64)

    def head(u):
        return (u @ concept_basis).sum(1) @ readout + 1.0

    attributions = integrated_gradients(head, coefficients, target, steps=3, baseline=baseline, method=method)
    expected = (coefficients - baseline).sum(1) * (concept_basis @ readout)[:, target].T
    assert torch.allclose(attributions, expected, atol=EXACT_TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_integrated_gradients_of_a_cubic_head_match_the_closed_form(method, seed):
    """head(U) = sum_p (U_p A)^3 is 3-homogeneous: IG from 0 is U * grad head(U) / 3 exactly."""
    coefficients, concept_basis, readout, target = random_problem(seed)
    mixing = concept_basis @ readout  # (k, C)

    def head(u):
        return ((u @ mixing) ** 3).sum(1)

    scores = ((coefficients @ mixing) ** 3).sum(1)[torch.arange(len(target)), target]
    per_position = 3 * (coefficients @ mixing)[torch.arange(len(target)), :, target] ** 2  # (n, P)
    gradient = per_position[..., None] * mixing[:, target].T[:, None, :]  # (n, P, k)
    expected = (coefficients * gradient).sum(1) / 3

    attributions, delta = integrated_gradients(
        head, coefficients, target, steps=30, method=method, return_delta=True
    )
    assert torch.allclose(attributions, expected, rtol=QUADRATURE_TOL, atol=EXACT_TOL)
    assert torch.allclose(expected.sum(-1), scores, atol=EXACT_TOL)  # the oracle itself is complete
    assert torch.allclose(delta, attributions.sum(-1) - scores, atol=EXACT_TOL)
    if method == "gausslegendre":  # exact for the quadratic integrand from 2 nodes on
        exact = integrated_gradients(head, coefficients, target, steps=2, method=method)
        assert torch.allclose(exact, expected, atol=EXACT_TOL)


@pytest.mark.parametrize("batch_size", [1, 5, 13])
def test_chunking_steps_does_not_change_integrated_gradients(batch_size):
    coefficients, concept_basis, readout, target = random_problem(3)

    def head(u):
        return torch.tanh(u @ concept_basis).sum(1) @ readout

    reference = integrated_gradients(head, coefficients, target, steps=17, batch_size=10_000)
    chunked = integrated_gradients(head, coefficients, target, steps=17, batch_size=batch_size)
    assert torch.allclose(chunked, reference, atol=EXACT_TOL)


def test_integrated_gradients_refuse_mismatched_shapes():
    coefficients, *_, target = random_problem(0)
    with pytest.raises(ValueError, match=r"\(n, P, k\)"):
        integrated_gradients(lambda u: u.sum(1), coefficients[:, 0], target)
    with pytest.raises(ValueError, match="baseline"):
        integrated_gradients(lambda u: u.sum(1), coefficients, target, baseline=coefficients[:, :1])


# --------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_concept_importance_is_the_mean_over_the_largest_absolute_mean(seed):
    attributions = torch.randn(3, 20, 6, generator=seeded(seed), dtype=torch.float64)
    importance = concept_importance(attributions)
    mean = attributions.numpy().mean(axis=1)
    expected = mean / np.abs(mean).max(axis=1, keepdims=True)
    assert importance.shape == (3, 6)
    assert np.allclose(importance.numpy(), expected, atol=EXACT_TOL)
    assert torch.allclose(importance.abs().amax(-1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(concept_importance(attributions[0], normalize=False), attributions[0].mean(0))


def test_concept_importance_is_nan_when_nothing_matters():
    assert concept_importance(torch.zeros(5, 3)).isnan().all()


# --------------------------------------------------------------------------------------------
# Replacement test against closed forms
# --------------------------------------------------------------------------------------------


def softmax_readout_problem(seed: int):
    coefficients, concept_basis, readout, target = random_problem(seed)

    def head(u):
        return (u @ concept_basis).mean(1) @ readout

    return head, coefficients, concept_basis, target


@pytest.mark.parametrize("seed", [0, 1])
def test_replacing_coefficients_by_themselves_changes_nothing(seed):
    head, coefficients, concept_basis, target = softmax_readout_problem(seed)
    figures = replacement_test_all(
        head, coefficients, coefficients.clone(), target, concept_basis=concept_basis
    )
    assert set(figures) == set(REPLACEMENT_FIGURES)
    for name in ("kl", "l2", "logit_l2", "target_prob_change"):
        assert torch.allclose(figures[name], torch.zeros(5, dtype=torch.float64), atol=EXACT_TOL), name
    assert (figures["top1_agreement"] == 1).all()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mix", [0.5, 1.0])
def test_replacement_figures_match_direct_computation(seed, mix):
    head, coefficients, concept_basis, target = softmax_readout_problem(seed)
    predicted = coefficients + torch.randn(coefficients.shape, generator=seeded(9), dtype=torch.float64)
    concept = 2
    figures = replacement_test(
        head, coefficients, predicted, concept, target, concept_basis=concept_basis, mix=mix
    )

    replaced = coefficients.clone()
    replaced[..., concept] = mix * predicted[..., concept] + (1 - mix) * coefficients[..., concept]
    original_logits, replaced_logits = head(coefficients), head(replaced)
    p, q = torch.softmax(original_logits, -1).numpy(), torch.softmax(replaced_logits, -1).numpy()
    rows = np.arange(len(target))
    rebuilt_change = (replaced @ concept_basis - coefficients @ concept_basis).flatten(1)
    assert np.allclose(figures["kl"].numpy(), scipy.stats.entropy(p, q, axis=-1), atol=EXACT_TOL)
    assert torch.allclose(figures["l2"], rebuilt_change.norm(dim=-1), atol=EXACT_TOL)
    logit_change = (replaced_logits - original_logits).norm(dim=-1)
    assert torch.allclose(figures["logit_l2"], logit_change, atol=EXACT_TOL)
    target_change = q[rows, target] - p[rows, target]
    assert np.allclose(figures["target_prob_change"].numpy(), target_change, atol=EXACT_TOL)
    assert torch.equal(figures["top1_agreement"], replaced_logits.argmax(-1) == original_logits.argmax(-1))
    assert (figures["l2"] > 0).all() and (figures["kl"] > 0).all()


@pytest.mark.parametrize("batch_size", [1, 9, 1000])
def test_replacing_every_concept_at_once_matches_one_at_a_time(batch_size):
    head, coefficients, concept_basis, target = softmax_readout_problem(4)
    predicted = torch.rand(coefficients.shape, generator=seeded(5), dtype=torch.float64)
    per_row = replacement_test_all(
        head, coefficients, predicted, target,
        concept_basis=concept_basis, batch_size=batch_size, reduce=False,
    )
    means = replacement_test_all(head, coefficients, predicted, target, concept_basis=concept_basis)
    for concept in range(coefficients.shape[-1]):
        single = replacement_test(head, coefficients, predicted, concept, target, concept_basis=concept_basis)
        for name in REPLACEMENT_FIGURES:
            one_at_a_time = single[name].double()
            assert torch.allclose(per_row[name][concept].double(), one_at_a_time, atol=EXACT_TOL), name
            assert torch.isclose(means[name][concept], single[name].double().mean(), atol=EXACT_TOL), name


def test_only_the_concept_whose_prediction_differs_moves_the_output():
    head, coefficients, concept_basis, target = softmax_readout_problem(6)
    predicted = coefficients.clone()
    predicted[..., 3] += 1.0
    figures = replacement_test_all(head, coefficients, predicted, target, concept_basis=concept_basis)
    others = torch.arange(5) != 3
    assert torch.allclose(figures["kl"][others], torch.zeros(4, dtype=torch.float64), atol=EXACT_TOL)
    assert figures["kl"][3] > 0 and figures["l2"][3] > 0


def test_relative_to_baseline_subtracts_figure_by_figure():
    result = {"kl": torch.tensor([0.5, 0.2]), "top1_agreement": torch.tensor([True, False])}
    baseline = {"kl": torch.tensor([0.1, 0.2]), "top1_agreement": torch.tensor([True, True])}
    relative = relative_to_baseline(result, baseline)
    assert torch.allclose(relative["kl"], torch.tensor([0.4, 0.0], dtype=torch.float64))
    assert torch.equal(relative["top1_agreement"], torch.tensor([0.0, -1.0], dtype=torch.float64))
    assert all(values.abs().max() == 0 for values in relative_to_baseline(result, result).values())
    with pytest.raises(ValueError, match="figures differ"):
        relative_to_baseline(result, {"kl": baseline["kl"]})


# --------------------------------------------------------------------------------------------
# Real networks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_resnet20() -> nn.Module:
    return load_cifar_resnet20()


@pytest.fixture(scope="module")
def cat_images() -> torch.Tensor:
    return load_cifar_images("cat", 40)


@pytest.fixture(scope="module")
def cat_layer3_basis(cifar_resnet20, cat_images) -> torch.Tensor:
    """NMF concepts of layer3, one spatially pooled vector per image (DESIGN.md step 3), k = 6."""
    layer3 = capture_layer_output(cifar_resnet20, "layer3", cat_images)
    return fit_nmf_basis(layer3.mean(dim=(2, 3)), n_concepts=6)


def test_completeness_at_a_pooled_penultimate_layer_with_30_steps():
    model = timm.create_model("test_resnet").eval()
    images = torch.randn(5, 3, 32, 32, generator=seeded(0))
    pooled = capture_layer_output(model, "global_pool", images)
    concept_basis = fit_nmf_basis(pooled, n_concepts=4)
    coefficients, head = concept_setup(model, "global_pool", images, concept_basis)
    assert coefficients.shape == (5, 1, 4)
    target = head(coefficients).argmax(-1)
    assert (relative_completeness_gap(head, coefficients, target, steps=30) < COMPLETENESS_TOL).all()


def test_completeness_at_cifar_resnet20_pooled_features(cifar_resnet20, cat_images, cat_layer3_basis):
    coefficients, head = concept_setup(cifar_resnet20, "flatten", cat_images[:4], cat_layer3_basis)
    target = torch.full((4,), 3)  # cat
    assert (relative_completeness_gap(head, coefficients, target, steps=30) < COMPLETENESS_TOL).all()


@pytest.mark.slow
def test_completeness_at_an_intermediate_feature_map(cifar_resnet20):
    """layer2 (32 x 16 x 16) of a trained ResNet-20: ReLU kinks along the path need more steps."""
    images = load_cifar_images("ship", 6)
    activations = capture_layer_output(cifar_resnet20, "layer2", images)
    concept_basis = fit_nmf_basis(activations.mean(dim=(2, 3)), n_concepts=5)
    coefficients, head = concept_setup(cifar_resnet20, "layer2", images, concept_basis)
    assert coefficients.shape == (6, 256, 5)
    target = torch.full((6,), 8)  # ship
    gap = relative_completeness_gap(head, coefficients, target, steps=INTERMEDIATE_MAP_STEPS, batch_size=600)
    assert (gap < COMPLETENESS_TOL).all(), gap


def test_importance_at_a_transformer_block_per_token():
    torch.manual_seed(0)  # timm initializes randomly: the same weights whatever ran before
    model = timm.create_model("test_vit", img_size=48).eval()
    images = torch.randn(4, 3, 48, 48, generator=seeded(1))
    tokens = capture_layer_output(model, "blocks.0", images)
    rows, _ = to_positions(tokens)
    # Token activations are signed: a basis of real directions (k tokens), coefficients still >= 0.
    token_rows = rows.reshape(-1, rows.shape[-1])
    concept_basis = token_rows[torch.randperm(len(token_rows), generator=seeded(0))[:6]]
    coefficients, head = concept_setup(model, "blocks.0", images, concept_basis.double())
    assert coefficients.shape == (4, tokens.shape[1], 6)
    target = head(coefficients).argmax(-1)

    importance = concept_importance(integrated_gradients(head, coefficients, target))
    assert importance.shape == (6,) and torch.isfinite(importance).all()
    # From a zero baseline the LayerNorm after the block sees a vanishing input: the path's score
    # jumps within alpha ~ 1e-5 and no uniform rule resolves it. From the mean coefficients it is
    # smooth, and completeness holds.
    mean_baseline = coefficients.mean(dim=(0, 1), keepdim=True).expand_as(coefficients).clone()
    gap = relative_completeness_gap(
        head, coefficients, target,
        baseline=mean_baseline, steps=TRANSFORMER_BLOCK_STEPS, method="gausslegendre",
    )
    assert (gap < COMPLETENESS_TOL).all(), gap


def test_zeroing_the_most_important_concepts_costs_the_class_more(
    cifar_resnet20, cat_images, cat_layer3_basis
):
    cat = 3
    coefficients, head = concept_setup(cifar_resnet20, "layer3", cat_images, cat_layer3_basis)
    target = torch.full((len(cat_images),), cat)
    # After layer3 come average pooling and the linear classifier: the path integrand is constant,
    # so a few Gauss-Legendre nodes give the 30-step result exactly (and the test stays fast).
    importance = concept_importance(integrated_gradients(head, coefficients, target, steps=3))
    order = importance.argsort()

    def cat_probability(zeroed: torch.Tensor) -> torch.Tensor:
        ablated = coefficients.clone()
        ablated[..., zeroed] = 0
        with torch.no_grad():
            return torch.softmax(head(ablated).double(), -1)[:, cat].mean()

    assert cat_probability(order[-2:]) < cat_probability(order[:2])
    assert cat_probability(order[-2:]) < cat_probability(torch.tensor([], dtype=torch.long))


def test_replacement_on_a_network_is_zero_against_itself_and_not_otherwise(
    cifar_resnet20, cat_images, cat_layer3_basis
):
    images = cat_images[:10]
    coefficients, head = concept_setup(cifar_resnet20, "layer3", images, cat_layer3_basis)
    target = torch.full((10,), 3)
    against_itself = replacement_test_all(
        head, coefficients, coefficients.clone(), target, concept_basis=cat_layer3_basis
    )
    for name in ("kl", "l2", "logit_l2", "target_prob_change"):
        assert against_itself[name].abs().max() < SELF_REPLACEMENT_TOL, name
    assert (against_itself["top1_agreement"] == 1).all()

    # Another prediction: the coefficients of other images of the class.
    predicted = coefficients.roll(1, dims=0)
    figures = replacement_test_all(
        head, coefficients, predicted, target, concept_basis=cat_layer3_basis, batch_size=25
    )
    assert (figures["l2"] > 0).all() and (figures["kl"] > 0).all()
    relative = relative_to_baseline(figures, against_itself)
    assert torch.allclose(relative["kl"], figures["kl"], atol=SELF_REPLACEMENT_TOL)

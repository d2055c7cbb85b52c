"""The default NMF on the CIFAR ResNet-20/56 preset reaches scikit-learn's converged cd solution.

Real activations through the normal stages (extract -> decompose) of the preset `cifar_r20_vs_r56`
(layer3 of both models, 10 classes, 100 concept images per class, 16 patches each: 1600 x 64 per
fit, 20 fits). Only the concept set is drawn (dataset.split=[1,0,0]): the NMF never sees the other
sets, and extracting them would cost four times as long.
"""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import torch
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.exceptions import ConvergenceWarning

from conftest import CHECKPOINTS, CIFAR_TEST, PER_CLASS_COUNT, compose
from rsvc_cli.algorithms.decomposition import _nndsvd
from rsvc_cli.stages.common import load_image_sets, load_model
from rsvc_cli.stages.decompose import CONCEPT_SET, activations_for, decompose, read_activations
from rsvc_cli.algorithms.stability import matched_cosines

# The acceptance figures: matched bases (cosine) in at least 19 of the 20 fits, and an
# error never above scikit-learn's by more than this, relative.
MIN_MATCHED_COSINE = 0.99
MIN_MATCHING_FITS = 19
ERROR_RTOL = 1e-6
# scikit-learn "run to convergence": its stopping rule, never its iteration cap.
SKLEARN_MAX_ITER = 100_000


@pytest.fixture(scope="module")
def cifar_fits(tmp_path_factory, shared_dir):
    """Per model and class: the stored concepts of the default NMF, and scikit-learn's cd solution
    from the same NNDSVD start on the same activations (float64, as the stage fits them)."""
    store = tmp_path_factory.mktemp("nmf_cifar_store")
    # The preset's image sets as they were when this was measured: the test images by label, not its
    # train/test split by prediction (which needs whole-image predictions and the evaluation tree).
    cfg = compose("compare", "experiment=cifar_r20_vs_r56", f"store={store}", f"dataset.root={CIFAR_TEST}",
                  "dataset.evaluation_root=null", "dataset.group_by=label", *PER_CLASS_COUNT,
                  "dataset.images_per_class=100", "dataset.split=[1,0,0]")
    images = load_image_sets(cfg.dataset)
    fits = {}
    for slot, name in (("model1", "cifar_resnet20"), ("model2", "cifar_resnet56")):
        model_cfg = cfg[slot].copy()
        model_cfg.checkpoint = str(CHECKPOINTS[name])
        model = load_model(model_cfg, cfg)
        layer = str(cfg[f"layer{slot[-1]}"])
        activations = activations_for(model, images, cfg, layer)
        path = decompose(model, images, cfg, layer, activations=activations)
        values = read_activations(*activations).values
        with h5py.File(path, "r", locking=False) as f:
            for class_name, group in f["classes"].items():
                rows = group["rows"][()]
                fits[name, class_name] = {
                    "basis": group["concept_basis"][()].astype(np.float64),
                    "error": float(group.attrs["reconstruction_error"]),
                    "attrs": dict(group.attrs),
                    "reference": _sklearn_from_same_start(values[rows].astype(np.float64), cfg.decomposition),
                }
    assert len(fits) == 20
    return fits


def _sklearn_from_same_start(class_activations, decomposition):
    k = int(decomposition.n_concepts)
    coefficients, concept_basis = _nndsvd(torch.from_numpy(class_activations)[None], k, "nndsvd",
                                          int(decomposition.seed))
    model = SklearnNMF(k, init="custom", solver="cd", tol=float(decomposition.tol), max_iter=SKLEARN_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # it must converge, not stop at the cap
        model.fit(class_activations, W=coefficients[0].numpy().copy(), H=concept_basis[0].numpy().copy())
    return {"basis": model.components_, "error": model.reconstruction_err_, "n_iter": model.n_iter_}


def _min_matched_cosine(basis, reference):
    """The smallest cosine between concepts paired one-to-one (Hungarian) for the largest summed cosine."""
    return float(matched_cosines(basis, reference).min())


@pytest.mark.slow
def test_default_nmf_reaches_sklearns_converged_cd_solution_on_cifar(cifar_fits):
    cosines = {fit: _min_matched_cosine(v["basis"], v["reference"]["basis"]) for fit, v in cifar_fits.items()}
    relative = {fit: v["error"] / v["reference"]["error"] - 1 for fit, v in cifar_fits.items()}
    matching = [fit for fit, cosine in cosines.items() if cosine >= MIN_MATCHED_COSINE]
    assert len(matching) >= MIN_MATCHING_FITS, {fit: round(c, 3) for fit, c in cosines.items()}
    assert max(relative.values()) <= ERROR_RTOL, relative


@pytest.mark.slow
def test_cifar_concepts_record_iterations_error_and_convergence(cifar_fits):
    for fit, v in cifar_fits.items():
        attrs = v["attrs"]
        assert attrs["converged"], fit
        # scikit-learn's iterates: it stops at the same iteration.
        assert int(attrs["n_iter"]) == v["reference"]["n_iter"], fit
        assert 0 < attrs["relative_reconstruction_error"] < 1

"""Similarity scoring: a concept the other model cannot predict scores 0, is flagged and counted.

A simulated pair (the other model's features predict two concepts and carry nothing of a third),
fitted by rsvc's own cross-validated lasso, then the real comparison path on synthetic images with
a lasso strong enough to keep no weight anywhere.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import CHECKPOINTS, compose
from rsvc_cli.algorithms.regression import Lasso, cross_validate, grouped_kfold
from rsvc_cli.stages.regress import DIRECTIONS, prepare_pair, regress
from rsvc_cli.stages import score as score_stage

PATCHES_PER_IMAGE = 5


def _simulated_pair(seed=0, n_images=120, n_features=4):
    """Features X of 'the other model' and three true concepts: 0 and 1 linear in X, 2 independent of it."""
    rng = np.random.default_rng(seed)
    n = n_images * PATCHES_PER_IMAGE
    X = rng.gamma(2.0, size=(2, n, n_features))  # [regression set, evaluation set]
    weights = rng.uniform(0.5, 1.0, size=(n_features, 2))
    U = np.concatenate([X @ weights + rng.normal(0, 0.5, size=(2, n, 2)), rng.gamma(2.0, size=(2, n, 1))], axis=-1)
    folds = grouped_kfold(torch.arange(n) // PATCHES_PER_IMAGE, n_folds=5, seed=0)
    cv = cross_validate(torch.from_numpy(X[0][None]), torch.from_numpy(U[0][None]), folds, Lasso(alpha=0.2))
    return {"heldout": score_stage.Scored(U[1], cv.predict(torch.from_numpy(X[1][None]))[0].numpy(), None),
            "crossval": score_stage.Scored(U[0], cv.held_out_prediction[0].numpy(), folds.numpy()),
            "weights": cv.coef_[0].numpy()}


def _result(similarity, unpredictable):
    """A one-class scores result with the same figures in every direction."""
    return {"classes": {"c": {"similarity": {d: similarity for d in DIRECTIONS},
                              "unpredictable": {d: unpredictable for d in DIRECTIONS},
                              "mean_max_correlation_1": 0.0, "mean_max_correlation_2": 0.0, "cka": 0.0}}}


@pytest.mark.parametrize("evaluation", ["heldout", "crossval"])
def test_a_concept_the_other_models_features_cannot_predict_scores_zero_is_flagged_and_ranks_first(evaluation):
    pair = _simulated_pair()
    assert (pair["weights"][:, 2] == 0).all() and (pair["weights"][:, :2] != 0).any(-1).all()  # the premise
    similarity, unpredictable, undefined = (v.numpy() for v in score_stage.similarity_of(pair[evaluation]))
    assert unpredictable.tolist() == [False, False, True] and not undefined.any()
    assert similarity[2] == 0.0 and (similarity[:2] > 0.5).all()
    rows = score_stage.lowest_first(score_stage.result_rows(_result(similarity, unpredictable)))
    assert rows[0]["concept"] == 2 and rows[0]["unpredictable"] and rows[0]["similarity"] == 0.0
    summary = score_stage.summary_numbers(_result(similarity, unpredictable))
    assert summary["2->1"] == pytest.approx(similarity.mean(), abs=1e-12)  # counted, as 0
    assert summary["n_unpredictable"]["2->1"] == 1 and summary["n_undefined"]["2->1"] == 0


def test_heldout_and_crossval_agree_on_which_concepts_are_unpredictable():
    pair = _simulated_pair(seed=1)
    heldout, crossval = score_stage.similarity_of(pair["heldout"]), score_stage.similarity_of(pair["crossval"])
    assert torch.equal(heldout.unpredictable, crossval.unpredictable) and heldout.unpredictable.tolist() == [False, False, True]
    # Per fold the held-out prediction of concept 2 is that fold's training mean: not constant overall,
    # so plain Pearson gives a number that comes from the split, not from the features.
    held_out = pair["crossval"].predicted[:, 2]
    assert held_out.std() > 0 and crossval.similarity[2] == 0.0


def test_only_a_constant_truth_is_undefined_and_it_is_counted():
    pair = _simulated_pair()
    true, predicted = pair["heldout"].true.copy(), pair["heldout"].predicted.copy()
    true[:, 0] = 1.5
    similarity, unpredictable, undefined = score_stage.similarity_of(score_stage.Scored(true, predicted, None))
    assert undefined.tolist() == [True, False, False] and np.isnan(similarity[0].item())
    assert not unpredictable[0]  # undefined is not also unpredictable, even where the prediction is constant
    predicted[:, 0] = 0.0
    both_constant = score_stage.similarity_of(score_stage.Scored(true, predicted, None))
    assert both_constant.undefined[0] and not both_constant.unpredictable[0]
    summary = score_stage.summary_numbers(_result(similarity.numpy(), unpredictable.numpy()))
    assert summary["n_undefined"]["1->2"] == 1 and summary["1->2"] == pytest.approx(np.nanmean(similarity.numpy()))
    rows = score_stage.lowest_first(score_stage.result_rows(_result(similarity.numpy(), unpredictable.numpy())))
    assert rows[-1]["concept"] == 0  # undefined last, never "the most model-specific"


SYNTHETIC = ["model1=cifar_resnet20", "model2=tiniest", f"model1.checkpoint={CHECKPOINTS['cifar_resnet20']}",
             f"model2.checkpoint={CHECKPOINTS['tiniest']}", "layer1=layer2", "layer2=l3", "dataset=synthetic",
             "dataset.n_classes=2", "dataset.images_per_class=10", "decomposition=semi_nmf",
             "decomposition.n_concepts=3", "decomposition.max_iter=50", "regression=lasso", "regression.n_folds=2",
             "device=cpu"]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for both evaluations: the regression they score is the same artifact."""
    return tmp_path_factory.mktemp("score-store")


@pytest.mark.parametrize("evaluation", ["heldout", "crossval"])
def test_a_lasso_that_keeps_no_weight_gives_zero_flagged_similarities_through_the_score_stage(shared_store, shared_dir, evaluation):
    """regression.alpha far above every |x_j . y| / n: no concept is predictable in any direction. The
    scores artifact, the results table and the means say 0 and unpredictable, under both evaluations
    (before: NaN everywhere under heldout and means of NaN; under crossval numbers from the fold split)."""
    cfg = compose("score", *SYNTHETIC, "regression.alpha=1000", f"regression.evaluation={evaluation}",
                  f"store={shared_store}")
    pair = prepare_pair(cfg)
    result = score_stage.score(pair, cfg, regress(pair, cfg))
    for c in result["classes"].values():
        for d in DIRECTIONS:
            assert (c["similarity"][d] == 0).all() and c["unpredictable"][d].all(), (d, c["similarity"][d])
    summary = score_stage.summary_numbers(result)
    n_concepts = 2 * 3
    assert all(summary[d] == 0 for d in DIRECTIONS)
    assert summary["n_unpredictable"] == {d: n_concepts for d in DIRECTIONS}
    with open(result["path"].with_suffix(".csv")) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 * n_concepts and all(row["unpredictable"] == "True" for row in table)

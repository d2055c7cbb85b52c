"""Intervals and calls in the score stage: stored, in the results table, rerun from stored artifacts."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import compose
from rsvc_cli.algorithms.bootstrap import CALLS
from rsvc_cli.errors import RsvcError
from rsvc_cli.stages import score as score_stage
from rsvc_cli.stages.regress import prepare_pair, regress

SMALL = ["model1=test_resnet", "model2=test_resnet", "layer1=layer2", "layer2=layer3", "dataset.n_classes=2",
         "dataset.images_per_class=15", "decomposition.n_concepts=3", "regression=ridge", "importance.enabled=false",
         "model1.random_weights_ok=true", "model2.random_weights_ok=true"]


def _score(store, *overrides):
    cfg = compose("score", *SMALL, f"store={store}", *overrides)
    pair = prepare_pair(cfg)
    regression_path = regress(pair, cfg)
    return score_stage.score(pair, cfg, regression_path), regression_path


def test_intervals_and_calls_are_stored_tabled_and_rerun_alone(store):
    result, regression_path = _score(store, "score.n_resamples=200")
    assert result["intervals"]["n_resamples"] == 200
    for c in result["classes"].values():
        for direction in ("2->1", "1->2", "1->1", "2->2"):
            low, high = c["similarity_low"][direction], c["similarity_high"][direction]
            assert (np.isnan(low) | (low <= high)).all() and np.isfinite(high).any()
            lo, hi = c["mean_similarity_interval"][direction]
            assert lo <= hi
        for direction in ("2->1", "1->2"):
            assert set(c["call"][direction]) <= set(CALLS)
            self_direction = "1->1" if direction == "2->1" else "2->2"
            np.testing.assert_allclose(c["gap"][direction],
                                       c["similarity"][self_direction] - c["similarity"][direction])
    rows = list(csv.DictReader(open(result["path"].with_suffix(".csv"))))
    assert {"similarity_low", "similarity_high", "gap", "gap_low", "gap_high", "call", "self_similarity_low"} <= set(rows[0])
    # Only the intervals change: the regression is reused, the scores artifact is another file.
    again, regression_again = _score(store, "score.n_resamples=300", "score.specific_gap=0.3")
    assert regression_again == regression_path
    assert again["path"] != result["path"] and result["path"].exists()
    assert again["intervals"]["specific_gap"] == 0.3
    for name, c in again["classes"].items():
        np.testing.assert_array_equal(c["similarity"]["2->1"], result["classes"][name]["similarity"]["2->1"])


@pytest.mark.parametrize("override, message", [("score.n_resamples=3", "too few resamples"),
                                               ("score.confidence=95", "not a confidence level")])
def test_bad_interval_settings_stop_with_a_fix(store, override, message):
    cfg = compose("score", *SMALL, f"store={store}", override)
    with pytest.raises(RsvcError, match=message):
        score_stage.score(prepare_pair(cfg), cfg, None)


def test_alpha_cv_chooses_on_regression_rows_only_and_is_stored(store, monkeypatch):
    import rsvc_cli.algorithms.regression as regression
    from rsvc_cli.stages.regress import read_regression, regression_content, regression_params

    seen_rows = []
    original = regression.held_out_error

    def recording(Y, prediction, folds):
        seen_rows.append(Y.shape[-2])
        return original(Y, prediction, folds)

    monkeypatch.setattr(regression, "held_out_error", recording)
    lasso = [o for o in SMALL if not o.startswith("regression=")] + ["regression=lasso"]
    cfg = compose("regress", *lasso, f"store={store}", "regression.alpha=cv")
    pair = prepare_pair(cfg)
    path = regress(pair, cfg)
    reg = read_regression(path, regression_content(pair, regression_params(cfg), "label"))
    n_regression_rows = {len(entry["regression_rows"]) for entry in reg.classes.values()}
    assert seen_rows and set(seen_rows) <= n_regression_rows  # the evaluation rows never enter the choice
    name, entry = next(iter(reg.classes.items()))
    chosen = entry["2->1"]["alpha"]
    assert chosen in regression.ALPHA_GRID
    fixed_cfg = compose("regress", *lasso, f"store={store}", f"regression.alpha={chosen}")
    fixed = read_regression(regress(pair, fixed_cfg), regression_content(pair, regression_params(fixed_cfg), "label"))
    for key in ("held_out_prediction", "evaluation_prediction"):
        np.testing.assert_allclose(entry["2->1"][key], fixed.classes[name]["2->1"][key], atol=1e-6)


def test_alpha_cv_refuses_scoring_on_its_own_folds(store):
    from rsvc_cli.stages.regress import regression_params

    with pytest.raises(RsvcError, match="crossval"):
        regression_params(compose("regress", "regression=lasso", "regression.alpha=cv", "regression.evaluation=crossval"))
    with pytest.raises(RsvcError, match="lasso"):
        regression_params(compose("regress", "regression=ridge", "regression.alpha=cv"))

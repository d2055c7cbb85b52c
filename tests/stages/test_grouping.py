"""Image sets on real CIFAR-10 images and checkpoints: a held-out evaluation split (dataset.evaluation_root),
per-set counts, and dataset.group_by=predicted (the paper's protocol) with classes a model never predicts."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CHECKPOINTS, CIFAR_TEST, CIFAR_TRAIN, compose
from rsvc_cli.errors import RsvcError

R20, R56 = CHECKPOINTS["cifar_resnet20"], CHECKPOINTS["cifar_resnet56"]
FOLDERS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Model 2's outputs with output 3 named for no compared class: it never predicts "cat".
NO_CAT = "model2.output_classes=[" + ",".join("not_cat" if name == "cat" else name for name in FOLDERS) + "]"
PREDICTED = ["dataset=cifar10", f"dataset.root={CIFAR_TEST}", "dataset.classes=[cat,ship]",
             "dataset.images_per_class=15", "dataset.group_by=predicted", "model1=cifar_resnet20",
             "model2=cifar_resnet20", f"model1.checkpoint={R20}", f"model2.checkpoint={R20}",
             "decomposition.n_concepts=3", "regression.n_folds=2", "importance.enabled=false"]


def test_class_one_model_never_predicts_is_skipped_and_recorded(store, shared_dir):
    """It used to stop with a KeyError traceback (only model 1's concepts were looked up)."""
    import h5py

    from rsvc_cli.stages.decompose import read_concepts
    from rsvc_cli.stages.regress import prepare_pair, read_regression, regress, regression_content, regression_params

    cfg = compose("regress", *PREDICTED, NO_CAT, f"store={store}")
    pair = prepare_pair(cfg)
    path = regress(pair, cfg)
    result = read_regression(path, regression_content(pair, regression_params(cfg), "predicted"))
    assert list(result.classes) == ["ship"]
    assert list(result.skipped) == ["cat"] and "0 concept-set images" in result.skipped["cat"]
    concepts2 = read_concepts(*pair.concepts2)
    assert list(concepts2.concept_basis) == ["ship"] and list(concepts2.skipped) == ["cat"]
    assert sorted(read_concepts(*pair.concepts1).concept_basis) == ["cat", "ship"]
    with h5py.File(path, "r") as f:
        assert [s.decode() for s in f["skipped_class_names"][()]] == ["cat"]


def test_nothing_left_to_compare_is_a_clear_error(store, shared_dir):
    from rsvc_cli.stages.regress import prepare_pair

    # 3 concept images (48 patches) per class cannot give 60 concepts; model 2 never predicts cat.
    cfg = compose("regress", *PREDICTED, NO_CAT, "decomposition.n_concepts=60", f"store={store}")
    with pytest.raises(RsvcError, match="leaves no class") as error:
        prepare_pair(cfg)
    assert "dataset.group_by=label" in error.value.fix

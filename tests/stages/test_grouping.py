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


@pytest.mark.slow
def test_class_one_model_never_predicts_is_skipped_and_recorded(store, shared_dir, capfd):
    """It used to stop with a KeyError traceback (only model 1's concepts were looked up)."""
    import h5py

    from rsvc_cli.stages.decompose import read_concepts
    from rsvc_cli.stages.regress import prepare_pair, read_regression, regress, regression_content, regression_params

    cfg = compose("regress", *PREDICTED, NO_CAT, f"store={store}")
    for run in ("made", "reused"):
        capfd.readouterr()
        pair = prepare_pair(cfg)
        path = regress(pair, cfg)
        lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("skipped")]
        assert lines == ["skipped class 'cat': cifar_resnet20 predicts it for 0 concept-set images (0 patches); its "
                         "concepts need at least 2 images and 3 patches"], (run, lines)
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


SPLIT = ["dataset=cifar10", f"dataset.root={CIFAR_TRAIN}", f"dataset.evaluation_root={CIFAR_TEST}"]


def _paths(images, image_set):
    return {images.source.paths[i] for i in images.image_index[images.image_set == image_set]}


def test_evaluation_images_come_from_evaluation_root_and_never_overlap(shared_dir, capfd):
    from rsvc_cli.stages.common import load_image_sets

    sets = ["dataset.classes=[cat,ship]", "dataset.images_per_class=null", "dataset.images_per_set.concept=4",
            "dataset.images_per_set.regression=6", "dataset.images_per_set.evaluation=5"]
    images = load_image_sets(compose("extract", *SPLIT, *sets).dataset)
    concept, regression, evaluation = (_paths(images, s) for s in range(3))
    assert (len(concept), len(regression), len(evaluation)) == (8, 12, 10)
    assert all(p.startswith(f"{CIFAR_TRAIN}/") for p in concept | regression)
    assert all(p.startswith(f"{CIFAR_TEST}/") for p in evaluation)
    assert not (concept & regression) and not (evaluation & (concept | regression))
    # Labels follow the folder names in both splits.
    for i, label in zip(images.image_index, images.label):
        assert images.source.paths[i].split("/")[-2] == images.class_names[label]
    # The evaluation split is part of the images' identity: every artifact key changes with it.
    same_root = load_image_sets(compose("extract", "dataset=cifar10", f"dataset.root={CIFAR_TRAIN}", *sets).dataset)
    assert "evaluation_source" in images.identity and "evaluation_source" not in same_root.identity
    assert images.identity != same_root.identity
    # A class with fewer images than asked uses what it has above dataset.min_images_per_set, and says so.
    capfd.readouterr()
    short = load_image_sets(compose("extract", *SPLIT, "dataset.classes=[cat]", "dataset.images_per_class=null",
                                    "dataset.images_per_set.concept=4", "dataset.images_per_set.regression=6",
                                    "dataset.images_per_set.evaluation=1200").dataset)
    assert len(_paths(short, 2)) == 1000
    assert "1000 images, fewer than the 1200 asked: using 1000 evaluation" in capfd.readouterr().err
    with pytest.raises(RsvcError, match="fewer than the 5000 asked.*below the minimum"):
        load_image_sets(compose("extract", *SPLIT, "dataset.classes=[cat]", "dataset.images_per_set.evaluation=5000",
                                "dataset.min_images_per_set=1100").dataset)


def test_image_set_settings_that_cannot_apply_are_errors(shared_dir):
    from rsvc_cli.stages.common import load_image_sets

    def load(*overrides):
        return load_image_sets(compose("extract", *overrides).dataset)

    with pytest.raises(RsvcError, match="not a class-per-folder tree") as error:
        load("dataset=synthetic", f"dataset.evaluation_root={CIFAR_TEST}")
    assert "dataset.evaluation_root" in error.value.fix
    with pytest.raises(RsvcError, match="evaluation_root is dataset.root"):
        load("dataset=cifar10", f"dataset.root={CIFAR_TEST}", f"dataset.evaluation_root={CIFAR_TEST}/")
    with pytest.raises(RsvcError, match="images_per_class=500 would not be used") as error:
        load(*SPLIT, "dataset.images_per_set={concept:1,regression:2,evaluation:3}")
    assert "dataset.images_per_class=null" in error.value.fix


@pytest.mark.subprocess
def test_class_missing_from_evaluation_root_stops_the_cli_with_a_fix(tmp_path, shared_dir):
    import os
    import subprocess

    evaluation_root = tmp_path / "val"
    evaluation_root.mkdir()
    (evaluation_root / "cat").symlink_to(CIFAR_TEST / "cat")
    store = tmp_path / "store"
    r = subprocess.run(["rsvc", "extract", *SPLIT[:2], f"dataset.evaluation_root={evaluation_root}",
                        "dataset.classes=[cat,ship]", "dataset.images_per_class=10", f"store={store}"],
                       cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "ship" in r.stderr and "dataset.evaluation_root" in r.stderr and "dataset.classes" in r.stderr
    assert [p.name for p in store.iterdir()] == [".runs"]  # Hydra's run record, no artifact


@pytest.mark.slow
def test_paper_protocol_on_a_train_and_a_test_split(store, shared_dir):
    """group_by=predicted on CIFAR train (concept, regression) and test (evaluation): a model's concepts
    of class c come from the training images it predicts as c, the regression and evaluation rows of c
    are the images either model predicts as c, and the evaluation rows are all test images."""
    import h5py

    from rsvc_cli.stages.common import predicted_class_positions
    from rsvc_cli.stages.decompose import CONCEPT_SET, EVALUATION_SET, REGRESSION_SET, read_activations
    from rsvc_cli.stages.regress import prepare_pair, read_regression, regress, regression_content, regression_params

    cfg = compose("regress", *SPLIT, "dataset.classes=[cat,dog]", "dataset.images_per_class=null",
                  "dataset.images_per_set.concept=4",
                  "dataset.images_per_set.regression=6", "dataset.images_per_set.evaluation=10",
                  "dataset.min_images_per_set=2", "dataset.group_by=predicted", "model1=cifar_resnet20",
                  "model2=cifar_resnet56", f"model1.checkpoint={R20}", f"model2.checkpoint={R56}",
                  "decomposition.n_concepts=3", "regression.n_folds=2", f"store={store}")
    pair = prepare_pair(cfg)
    path = regress(pair, cfg)
    acts = read_activations(*pair.activations1)
    predicted = [predicted_class_positions(m, pair.images, cfg)[acts.image_row] for m in (pair.model1, pair.model2)]
    # The models mostly agree with the labels, and not everywhere with each other.
    assert all((p == acts.label).mean() > 0.7 for p in predicted)
    assert (predicted[0] != predicted[1]).any()
    for concepts, own in zip((pair.concepts1, pair.concepts2), predicted):
        with h5py.File(concepts[0], "r") as f:
            for c, name in enumerate(acts.class_names):
                expected = np.flatnonzero((acts.image_set == CONCEPT_SET) & (own == c))
                np.testing.assert_array_equal(f[f"classes/{name}/rows"][()], expected)
    result = read_regression(path, regression_content(pair, regression_params(cfg), "predicted"))
    assert sorted(result.classes) == ["cat", "dog"] and not result.skipped
    for name, entry in result.classes.items():
        either = (predicted[0] == acts.class_names.index(name)) | (predicted[1] == acts.class_names.index(name))
        for image_set, key in ((REGRESSION_SET, "regression_rows"), (EVALUATION_SET, "evaluation_rows")):
            np.testing.assert_array_equal(entry[key], np.flatnonzero((acts.image_set == image_set) & either))
        evaluated = {acts.image_path[i] for i in acts.image_row[entry["evaluation_rows"]]}
        assert evaluated and all(p.startswith(f"{CIFAR_TEST}/") for p in evaluated)
        fitted = {acts.image_path[i] for i in acts.image_row[entry["regression_rows"]]}
        assert all(p.startswith(f"{CIFAR_TRAIN}/") for p in fitted) and not (fitted & evaluated)

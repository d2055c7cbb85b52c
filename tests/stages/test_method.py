"""The method on real checkpoints and real images: decompose -> regress -> score (issue 3 sanity)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import CHECKPOINTS, CIFAR_TEST, compose
from rsvc_cli.errors import RsvcError
from rsvc_cli.stages import score as score_stage
from rsvc_cli.stages.regress import prepare_pair, regress

R20, R56 = CHECKPOINTS["cifar_resnet20"], CHECKPOINTS["cifar_resnet56"]
# Small but real: 3 classes x 30 images (6 concept / 12 regression / 12 evaluation), 16 patches each.
# timm's test models and untrained architectures: random weights, compared on purpose.
RANDOM_OK = ["model1.random_weights_ok=true", "model2.random_weights_ok=true"]
CIFAR = ["dataset=cifar10", f"dataset.root={CIFAR_TEST}", "dataset.classes=[cat,dog,ship]",
         "dataset.images_per_class=30", "importance.enabled=false"]


def _score(store, *overrides):
    cfg = compose("score", *CIFAR, f"store={store}", *overrides)
    pair = prepare_pair(cfg)
    return score_stage.score(pair, cfg, regress(pair, cfg))


def _mean(result, direction):
    return float(np.nanmean(np.concatenate([c["similarity"][direction] for c in result["classes"].values()])))


@pytest.mark.slow
def test_a_checkpoint_against_itself_matches_its_self_baseline(store, shared_dir):
    result = _score(store, "model1=cifar_resnet20", "model2=cifar_resnet20", f"model1.checkpoint={R20}",
                    f"model2.checkpoint={R20}", "layer1=layer3", "layer2=layer3")
    for c in result["classes"].values():
        np.testing.assert_allclose(c["similarity"]["2->1"], c["similarity"]["1->1"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(c["similarity"]["1->2"], c["similarity"]["2->2"], rtol=0, atol=1e-9)
    assert _mean(result, "2->1") >= 0.9
    # the concept-correlation table of a model with itself has a unit diagonal
    for c in result["classes"].values():
        np.testing.assert_allclose(np.diag(c["concept_correlation"]), 1.0, atol=1e-6)
        assert c["cka"] == pytest.approx(1.0, abs=1e-6)
        # self and cross come from the same resamples: no concept of a model is specific to it against itself
        for direction in ("2->1", "1->2"):
            assert (c["gap_low"][direction] <= 1e-9).all() and (c["gap_high"][direction] >= -1e-9).all()
            assert "model-specific" not in set(c["call"][direction])


@pytest.mark.slow
def test_trained_pair_is_more_similar_than_a_random_network(store, shared_dir):
    trained = _score(store, "model1=cifar_resnet20", "model2=cifar_resnet56", f"model1.checkpoint={R20}",
                     f"model2.checkpoint={R56}")
    random = _score(store, "model1=cifar_resnet20", "model2=cifar_resnet56", f"model1.checkpoint={R20}",
                    "model2.random_weights_ok=true")
    assert _mean(trained, "2->1") > _mean(random, "2->1") + 0.1
    # ... in every class, with 95 % confidence: the class means' intervals do not overlap
    for name, c in trained["classes"].items():
        assert random["classes"][name]["mean_similarity_interval"]["2->1"][1] < c["mean_similarity_interval"]["2->1"][0]
    # the self baselines bound the cross predictions on average
    assert _mean(trained, "1->1") > _mean(trained, "2->1")
    # the results table has one row per class x concept x direction
    table = trained["path"].with_suffix(".csv")
    n_rows = sum(1 for _ in open(table)) - 1
    assert n_rows == 3 * 2 * 10


@pytest.mark.slow
def test_grouping_by_predicted_class_uses_each_models_whole_image_predictions(store, shared_dir):
    """dataset.group_by=predicted (the authors' grouping): concepts are fitted on the patches of the images
    their model predicts as the class, and a class is compared on the images either model predicts as it."""
    from rsvc_cli.stages.common import predicted_classes_for
    from rsvc_cli.stages.decompose import CONCEPT_SET, EVALUATION_SET, read_activations
    from rsvc_cli.stages.regress import read_regression, regression_content, regression_params

    cfg = compose("regress", "dataset=cifar10", f"dataset.root={CIFAR_TEST}", "dataset.images_per_class=15",
                  "dataset.group_by=predicted", "model1=cifar_resnet20", "model2=cifar_resnet56",
                  f"model1.checkpoint={R20}", f"model2.checkpoint={R56}", "decomposition.n_concepts=2",
                  "regression.n_folds=2", f"store={store}")
    pair = prepare_pair(cfg)
    path = regress(pair, cfg)
    predicted = [predicted_classes_for(m, pair.images, cfg) for m in (pair.model1, pair.model2)]
    assert len(list((store / "predictions").glob("*.h5"))) == 2
    # The pretrained models mostly agree with the labels, and not everywhere with each other.
    assert all((p == pair.images.label).mean() > 0.7 for p in predicted)
    assert (predicted[0] != predicted[1]).any()

    acts = read_activations(*pair.activations1)
    with h5py.File(pair.concepts1[0], "r") as f:
        fitted_rows = {name: g["rows"][()] for name, g in f["classes"].items()}
    for c, name in enumerate(acts.class_names):
        expected = np.nonzero((acts.image_set == CONCEPT_SET) & (predicted[0][acts.image_row] == c))[0]
        np.testing.assert_array_equal(fitted_rows.get(name, np.zeros(0, np.int64)), expected)
    result = read_regression(path, regression_content(pair, regression_params(cfg), "predicted"))
    assert result.classes
    for name, entry in result.classes.items():
        c = acts.class_names.index(name)
        either = (predicted[0][acts.image_row] == c) | (predicted[1][acts.image_row] == c)
        np.testing.assert_array_equal(entry["evaluation_rows"], np.nonzero((acts.image_set == EVALUATION_SET) & either)[0])


@pytest.mark.slow
def test_grouping_by_prediction_reads_model_outputs_as_classes_of_the_root(store, shared_dir):
    """With a subset of classes in another order, a class is grouped by the model output that stands for
    it (its place among all class folders of the root, sorted), not by its position in dataset.classes."""
    from rsvc_cli.stages.common import class_outputs, predicted_class_positions, predicted_classes_for
    from rsvc_cli.stages.decompose import CONCEPT_SET, EVALUATION_SET, read_activations
    from rsvc_cli.stages.regress import read_regression, regression_content, regression_params

    cfg = compose("regress", "dataset=cifar10", f"dataset.root={CIFAR_TEST}", "dataset.classes=[dog,cat]",
                  "dataset.images_per_class=20", "dataset.group_by=predicted", "model1=cifar_resnet20",
                  "model2=cifar_resnet56", f"model1.checkpoint={R20}", f"model2.checkpoint={R56}",
                  "decomposition.n_concepts=2", "regression.n_folds=2", f"store={store}")
    pair = prepare_pair(cfg)
    path = regress(pair, cfg)
    assert class_outputs(pair.model1, pair.images).tolist() == [5, 3]  # CIFAR-10: cat 3, dog 5
    outputs = predicted_classes_for(pair.model1, pair.images, cfg)
    positions = predicted_class_positions(pair.model1, pair.images, cfg)
    np.testing.assert_array_equal(positions, np.select([outputs == 5, outputs == 3], [0, 1], -1))
    # The models call most dogs dogs and most cats cats (25 of these 40 images; they confuse the two):
    # read as positions in dataset.classes, the outputs would name airplanes and automobiles instead.
    assert (positions == pair.images.label).mean() > 0.5
    acts = read_activations(*pair.activations1)
    with h5py.File(pair.concepts1[0], "r") as f:
        fitted_rows = {name: g["rows"][()] for name, g in f["classes"].items()}
    for c, name in enumerate(acts.class_names):
        expected = np.nonzero((acts.image_set == CONCEPT_SET) & (positions[acts.image_row] == c))[0]
        assert len(expected) > 0
        np.testing.assert_array_equal(fitted_rows[name], expected)
    positions2 = predicted_class_positions(pair.model2, pair.images, cfg)
    result = read_regression(path, regression_content(pair, regression_params(cfg), "predicted"))
    for name, entry in result.classes.items():
        c = acts.class_names.index(name)
        either = (positions[acts.image_row] == c) | (positions2[acts.image_row] == c)
        np.testing.assert_array_equal(entry["evaluation_rows"], np.nonzero((acts.image_set == EVALUATION_SET) & either)[0])


def test_model_output_classes_name_the_outputs_or_stop_with_a_fix(tmp_path):
    from rsvc_cli.stages.common import class_outputs, load_image_sets, load_model

    base = ["dataset=cifar10", f"dataset.root={CIFAR_TEST}", "dataset.classes=[dog,cat]", "dataset.images_per_class=5",
            f"model.checkpoint={R20}"]

    def outputs(*overrides):
        cfg = compose("extract", *base, *overrides)
        return class_outputs(load_model(cfg.model, cfg), load_image_sets(cfg.dataset))

    assert outputs().tolist() == [5, 3]
    folders = sorted(p.name for p in CIFAR_TEST.iterdir() if p.is_dir())
    listing = tmp_path / "classes.txt"
    listing.write_text("\n".join(reversed(folders)) + "\n")
    assert outputs(f"model.output_classes={listing}").tolist() == [4, 6]
    assert outputs("model.output_classes=[a,b,c,d,e,f,g,h,cat,dog]").tolist() == [9, 8]
    # Weights rsvc trained: outputs named by the training classes, read once when first needed.
    cfg = compose("extract", *base)
    model, images = load_model(cfg.model, cfg), load_image_sets(cfg.dataset)
    model.training_dataset = {"name": "imagefolder", "root": str(CIFAR_TEST), "classes": list(reversed(folders))}
    assert class_outputs(model, images).tolist() == [4, 6]
    assert model.output_classes == list(reversed(folders))
    # rsvc trains a 10-output ResNet on fewer classes with labels 0..n-1: they name its first outputs.
    model.output_classes, model.training_dataset = None, {"name": "imagefolder", "root": str(CIFAR_TEST),
                                                          "classes": ["dog", "cat", "ship"]}
    assert class_outputs(model, images).tolist() == [0, 1]
    assert class_outputs(model, images).tolist() == [0, 1]  # and again, from the names it kept
    assert model.output_classes == ["dog", "cat", "ship", *[None] * 7]
    # A compared class it was not trained on has no output: importance stops with a fix.
    from rsvc_cli.stages.importance import target_outputs

    model.output_classes, model.training_dataset["classes"] = None, ["dog", "ship"]
    assert class_outputs(model, images).tolist() == [0, -1]
    with pytest.raises(RsvcError, match="no output for class cat"):
        target_outputs(model, images)
    model.output_classes, model.training_dataset = None, {"name": "synthetic", "n_classes": 11}
    with pytest.raises(RsvcError, match="10 outputs as classes, but its training classes give 11"):
        class_outputs(model, images)
    with pytest.raises(RsvcError, match="10 outputs") as error:
        outputs("model.output_classes=[cat,dog]")
    assert "model.output_classes" in error.value.fix
    with pytest.raises(RsvcError, match="None of the compared classes"):
        outputs("model.output_classes=[a,b,c,d,e,f,g,h,i,j]")
    with pytest.raises(RsvcError, match="cannot be read"):
        outputs(f"model.output_classes={tmp_path / 'missing.txt'}")
    with pytest.raises(RsvcError, match="more than once"):
        outputs("model.output_classes=[a,a,c,d,e,f,g,h,cat,dog]")
    # A model whose outputs cannot be read as classes stops a run before anything is extracted.
    from rsvc_cli.stages import decompose

    store = tmp_path / "store"
    with pytest.raises(RsvcError, match="10 outputs"):
        decompose.run(compose("decompose", *base, "dataset.group_by=predicted", "model.output_classes=[cat,dog]",
                              f"store={store}"))
    assert not store.exists()


def test_misaligned_patches_are_refused(store):
    base = ["model1=test_resnet", "model2=test_resnet", "layer1=layer2", "layer2=layer3", "dataset.n_classes=2",
            "dataset.images_per_class=10", "decomposition.n_concepts=3", f"store={store}", *RANDOM_OK]
    cfg = compose("regress", *base, "patch.stride=40")
    pair = prepare_pair(cfg)
    # Swap in model 2's activations from another patch grid: same images, other boxes.
    other = prepare_pair(compose("regress", *base, "patch.stride=51"))
    pair.activations2 = other.activations2
    pair.concepts2 = other.concepts2
    with pytest.raises(RsvcError, match="different patches"):
        regress(pair, cfg)


def test_fewer_samples_than_concepts_is_a_clear_error(store):
    cfg = compose("regress", "model1=test_resnet", "model2=test_resnet", "layer1=layer2", "layer2=layer3",
                  "dataset.n_classes=2", "dataset.images_per_class=5", "patch=whole", "decomposition.n_concepts=10",
                  f"store={store}", *RANDOM_OK)
    with pytest.raises(RsvcError, match="fewer than the 10 concepts"):
        prepare_pair(cfg)


def test_constant_coefficient_column_is_undefined_not_zero(store):
    """k-means coefficients are one-hot: a cluster no evaluation patch falls in is a constant column."""
    result = _score(store, "model1=test_resnet", "model2=test_resnet", "layer1=layer2", "layer2=layer3",
                    "dataset=synthetic", "dataset.n_classes=2", "dataset.images_per_class=15",
                    "decomposition=kmeans", "decomposition.n_concepts=12", "regression=ridge", *RANDOM_OK)
    similarities = np.concatenate([c["similarity"]["2->1"] for c in result["classes"].values()])
    assert np.isnan(similarities).any(), "a constant column must give NaN (undefined), never 0"
    assert np.isfinite(similarities).any()


def test_signed_activations_need_a_declared_treatment(store):
    args = ["model1=test_vit", "model2=test_vit", "layer1=blocks.0", "layer2=blocks.1", "dataset.n_classes=2",
            "dataset.images_per_class=10", "decomposition.n_concepts=3", f"store={store}", *RANDOM_OK]
    with pytest.raises(RsvcError, match="clamp|split|semi_nmf"):
        prepare_pair(compose("regress", *args))
    pair = prepare_pair(compose("regress", *args, "decomposition.signed=split"))
    with h5py.File(pair.concepts1[0], "r") as f:
        name = next(iter(f["classes"]))
        assert f["classes"][name]["concept_basis"].shape[1] == 2 * 64  # [relu(x), relu(-x)]


def test_a_bumped_stage_revision_recomputes_that_stage_and_downstream_beside_the_old_files(store, monkeypatch):
    """Code that computes other numbers never reuses what earlier code stored, and loses none of it."""
    from rsvc_cli.store.keys import REVISIONS

    cfg = compose("regress", "model1=test_resnet", "model2=test_resnet", "layer1=layer2", "layer2=layer3",
                  "dataset.n_classes=2", "dataset.images_per_class=15", "decomposition.n_concepts=3",
                  "regression=ridge", f"store={store}", *RANDOM_OK)
    before = prepare_pair(cfg)
    regression_before = regress(before, cfg)
    monkeypatch.setitem(REVISIONS, "concepts", REVISIONS["concepts"] + 1)
    after = prepare_pair(cfg)
    regression_after = regress(after, cfg)
    assert after.activations1[0] == before.activations1[0], "upstream of the bumped stage: reused"
    assert after.concepts1[0] != before.concepts1[0] and after.concepts2[0] != before.concepts2[0]
    assert regression_after != regression_before, "downstream keys nest the bumped content"
    for path in (before.concepts1[0], before.concepts2[0], regression_before):
        assert path.exists(), f"{path.name} is kept"

"""What the models of a comparison are called: labels for display, never for keys."""

from __future__ import annotations

import numpy as np
import pytest

from rsvc_cli.errors import RsvcError
from rsvc_cli.stages.common import load_untrained_model
from rsvc_cli.stages.naming import direction_text, model_labels
from rsvc_cli.stages.report import best_matches
from tests.conftest import CHECKPOINTS, compose

R20 = str(CHECKPOINTS["cifar_resnet20"])


def test_default_labels_are_the_model_names_when_they_differ():
    cfg = compose("compare", "experiment=cifar_r20_vs_r56")
    labels = model_labels(cfg)
    assert labels == {"model1": "cifar_resnet20", "model2": "cifar_resnet56"}
    assert direction_text(labels, "2->1") == "cifar_resnet56 predicts cifar_resnet20's concepts (2->1)"
    assert direction_text(labels, "1->1") == "cifar_resnet20 predicts its own concepts (1->1, self baseline)"


def test_same_architecture_is_told_apart_by_checkpoint_then_by_position(tmp_path):
    other = tmp_path / "resnet20-seed1.th"
    other.write_bytes(b"")  # only its name is read
    cfg = compose("compare", "model2=cifar_resnet20", f"model1.checkpoint={R20}", f"model2.checkpoint={other}")
    assert model_labels(cfg) == {"model1": "cifar_resnet20 (resnet20-12fca82f)",
                                 "model2": "cifar_resnet20 (resnet20-seed1)"}
    same = compose("compare", "model2=cifar_resnet20", f"model1.checkpoint={R20}", f"model2.checkpoint={R20}")
    assert model_labels(same) == {"model1": "cifar_resnet20 (model 1)", "model2": "cifar_resnet20 (model 2)"}
    # One label given: the other is derived and still different from it.
    mixed = compose("compare", "model2=cifar_resnet20", "model1.label=cifar_resnet20")
    labels = model_labels(mixed)
    assert labels["model1"] == "cifar_resnet20" and labels["model2"] == "cifar_resnet20 (model 2)"


def test_given_labels_are_used_and_must_differ():
    cfg = compose("compare", "model1.label=ResNet-20", "model2.label=ResNet-56")
    assert model_labels(cfg) == {"model1": "ResNet-20", "model2": "ResNet-56"}
    with pytest.raises(RsvcError, match="model1.label and model2.label are both 'x'"):
        model_labels(compose("compare", "model1.label=x", "model2.label=x"))


def test_a_label_changes_no_artifact_key():
    """The identity (what every artifact key hashes) is the same with and without a label."""
    plain = compose("extract", f"model.checkpoint={R20}")
    labelled = compose("extract", f"model.checkpoint={R20}", "model.label=ResNet-20")
    assert load_untrained_model(labelled.model).identity == load_untrained_model(plain.model).identity


def test_best_match_is_the_largest_correlation_of_the_row_or_column():
    table = np.array([[0.1, 0.9, np.nan], [np.nan, np.nan, np.nan], [0.5, -0.2, 0.4]])
    assert best_matches(table, owner=1) == [(1, 0.9), None, (0, 0.5)]
    assert best_matches(table, owner=2) == [(2, 0.5), (0, 0.9), (2, 0.4)]

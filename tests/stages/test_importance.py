"""Importance and the replacement test as stages, on the shared ResNet-20 and a timm test ViT."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import CHECKPOINTS, CIFAR_TEST, compose
from rsvc_cli.algorithms import attribution
from rsvc_cli.stages import importance as importance_stage
from rsvc_cli.stages.regress import prepare_pair, regress
from rsvc_cli.stages.score import score

R20 = CHECKPOINTS["cifar_resnet20"]
R56 = CHECKPOINTS["cifar_resnet56"]
# CIFAR-10's outputs (its sorted class folders): cat is output 3, ship output 8.
CAT_SHIP_OUTPUTS = {"cat": 3, "ship": 8}
CAT_SHIP = ["model1=cifar_resnet20", "model2=cifar_resnet56", f"model1.checkpoint={R20}", f"model2.checkpoint={R56}",
            "dataset=cifar10", f"dataset.root={CIFAR_TEST}", "dataset.classes=[cat,ship]", "dataset.images_per_class=15",
            "decomposition.n_concepts=3", "layer1=layer3", "layer2=layer3", "importance.steps=4",
            "importance.max_patches_per_class=6", "device=cpu"]


def _importance(store, *overrides):
    cfg = compose("importance", *overrides, f"store={store}")
    pair = prepare_pair(cfg)
    result = score(pair, cfg, regress(pair, cfg))
    return importance_stage.importance(pair, cfg, result)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["layer3", "layer2"])  # last stage before the pooled head, and an intermediate one
def test_self_comparison_replacement_deltas_are_zero(store, shared_dir, layer):
    out = _importance(store, "model1=cifar_resnet20", "model2=cifar_resnet20", f"model1.checkpoint={R20}",
                      f"model2.checkpoint={R20}", "dataset=cifar10", f"dataset.root={CIFAR_TEST}",
                      "dataset.classes=[cat,ship]", "dataset.images_per_class=15", "decomposition.n_concepts=4",
                      f"layer1={layer}", f"layer2={layer}", "importance.steps=16", "importance.max_patches_per_class=8")
    assert len(out) == 2 * 2 * 4
    for key, figures in out.items():
        for name in ("relative_kl", "relative_top1_agreement", "relative_target_prob_change"):
            assert abs(figures[name]) <= 1e-12, (key, name, figures[name])
    for owner in ("model1", "model2"):
        for cls in ("cat", "ship"):
            values = np.array([out[(cls, owner, k)]["importance"] for k in range(4)])
            assert np.isfinite(values).all() and np.abs(values).max() == pytest.approx(1.0)


def test_importance_at_a_vit_block(store):
    out = _importance(store, "experiment=smoke", "model1=test_vit", "layer1=blocks.0", "dataset.images_per_class=15")
    vit = {k: v for k, v in out.items() if k[1] == "model1"}
    assert vit and all(np.isfinite(v["importance"]) for v in vit.values())


@pytest.fixture(scope="module")
def cat_ship(tmp_path_factory, shared_dir):
    """ResNet-20 vs ResNet-56 on [cat, ship]: importance as it is (every replacement-test call recorded),
    and with the old position-based targets (outputs 0 and 1) on a copy of the same upstream artifacts."""
    store = tmp_path_factory.mktemp("cat-ship") / "store"
    calls = []
    recorded = attribution.replacement_test_all

    def recording(head, true, predicted, target, **kwargs):
        calls.append({"true": true.clone(), "predicted": predicted.clone(), "target": target.clone()})
        return recorded(head, true, predicted, target, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attribution, "replacement_test_all", recording)
        out = _importance(store, *CAT_SHIP)
    positional_store = store.parent / "positional"
    shutil.copytree(store, positional_store, ignore=shutil.ignore_patterns("importance"))
    with pytest.MonkeyPatch.context() as patch:
        # raising=False: the fixture also runs on code older than target_outputs (to see these tests fail there).
        patch.setattr(importance_stage, "target_outputs",
                      lambda model, images: {name: i for i, name in enumerate(images.class_names)}, raising=False)
        positional = _importance(positional_store, *CAT_SHIP)
    return out, positional, calls


@pytest.mark.slow  # with test_replacement_mix_is_used_unclamped: about 90 s of CPU for both comparisons
def test_importance_and_replacement_attribute_the_output_of_each_class_not_its_position(cat_ship):
    out, positional, calls = cat_ship
    assert {key[0] for key in out} == {"cat", "ship"}
    for (name, owner, k), figures in out.items():
        assert figures["target_output"] == CAT_SHIP_OUTPUTS[name], (name, owner, k)
    assert len(calls) == 2 * 2 * 2  # classes x owners x (cross, self)
    assert {int(t) for call in calls for t in call["target"].unique()} == {3, 8}
    # The old targets (outputs 0 and 1: airplane, automobile) give other numbers.
    for name in ("cat", "ship"):
        for owner in ("model1", "model2"):
            now = np.array([out[(name, owner, k)]["importance"] for k in range(3)])
            before = np.array([positional[(name, owner, k)]["importance"] for k in range(3)])
            assert positional[(name, owner, 0)]["target_output"] == ["cat", "ship"].index(name)
            assert np.isfinite(now).all() and not np.allclose(now, before, atol=1e-3), (name, owner, now, before)


@pytest.mark.slow
def test_replacement_mix_is_used_unclamped(cat_ship):
    """The coefficients handed to the replacement test are U + (predicted - true) at every position, as
    they are: negative where the other model under-predicts a concept the position barely has."""
    _, _, calls = cat_ship
    for call in calls:
        shift = call["predicted"] - call["true"]
        assert torch.allclose(shift, shift[:, :1, :].expand_as(shift), rtol=0, atol=1e-12)
    assert any(bool((call["predicted"] < 0).any()) for call in calls)

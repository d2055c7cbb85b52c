"""Importance and the replacement test as stages, on the shared ResNet-20 and a timm test ViT."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CHECKPOINTS, CIFAR_TEST, compose
from rsvc_cli.stages import importance as importance_stage
from rsvc_cli.stages.regress import prepare_pair, regress
from rsvc_cli.stages.score import score

R20 = CHECKPOINTS["cifar_resnet20"]


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

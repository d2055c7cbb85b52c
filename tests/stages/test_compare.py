"""rsvc compare: the presets, one comparison end to end from the repository root, reuse on a rerun."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CHECKPOINTS, CIFAR_TEST, CIFAR_TRAIN, REPO_ROOT, compose
from rsvc_cli.cli import normalize_overrides

CLASSES = ("cat", "dog", "ship")
N_CONCEPTS = 3
# The cifar_r20_vs_r56 preset, shrunk: 3 classes of 15 images (3 concept and 6 regression training images, 6
# test images), predicted groups of at least 2 images.
SMALL_CIFAR = ["experiment=cifar_r20_vs_r56", f"dataset.classes=[{','.join(CLASSES)}]",
               "dataset.images_per_set={concept:3,regression:6,evaluation:6}", "dataset.min_images_per_set=2",
               f"decomposition.n_concepts={N_CONCEPTS}", "decomposition.max_iter=100", "importance.steps=4",
               "importance.max_patches_per_class=4", "n_tiles=2"]
# Pearson correlations, computed in float64, stored in float32.
CORRELATION_TOL = 1e-6


def test_every_preset_composes():
    presets = sorted(p.stem for p in (REPO_ROOT / "configs" / "experiment").glob("*.yaml"))
    assert {"cifar_r20_vs_r56", "rn18_vs_rn50", "vit_vs_resnet", "smoke"} <= set(presets)
    for preset in presets:
        cfg = compose("compare", f"experiment={preset}")
        assert cfg.layer1 and cfg.layer2 and cfg.model1.name and cfg.model2.name, preset


def test_rn18_vs_rn50_has_the_authors_settings():
    cfg = compose("compare", "experiment=rn18_vs_rn50")
    # ImageNet's layout: train for concepts and regressions, val (50 images per class) for similarities,
    # every set grouped by the models' predictions.
    assert cfg.dataset.group_by == "predicted" and cfg.dataset.images_per_class is None
    assert dict(cfg.dataset.images_per_set) == {"concept": 100, "regression": 200, "evaluation": 50}
    assert (cfg.dataset.root, cfg.dataset.evaluation_root) == ("/path/to/imagenet/train", "/path/to/imagenet/val")
    assert (cfg.model1.name, cfg.model2.name) == ("resnet18.a2_in1k", "resnet50.a2_in1k")
    assert cfg.dataset.name == "imagefolder" and cfg.dataset.first_classes == 100
    assert (cfg.patch.size, cfg.patch.stride, cfg.patch.reference_size) == (64, 51, 224)
    assert (cfg.decomposition.method, cfg.decomposition.n_concepts) == ("nmf", 10)
    assert (cfg.regression.method, cfg.regression.alpha, cfg.regression.n_folds) == ("lasso", 0.1, 5)


def test_vit_vs_resnet_compares_a_vit_s_with_resnet50():
    cfg = compose("compare", "experiment=vit_vs_resnet")
    assert cfg.model1.name.startswith("vit_small_patch16_224") and cfg.model2.name.startswith("resnet50")
    assert cfg.decomposition.method == "semi_nmf", "ViT tokens are signed"
    # The paper's ViT layer: the CLS token after the final norm; the same image sets as rn18_vs_rn50.
    assert (cfg.layer1, cfg.model1.token_reduce) == ("norm", "cls")
    assert cfg.dataset.group_by == "predicted" and cfg.dataset.images_per_set.evaluation == 50


def test_cifar_preset_paths_are_relative_to_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = compose("compare", "experiment=cifar_r20_vs_r56")
    assert Path(cfg.model1.checkpoint).resolve() == CHECKPOINTS["cifar_resnet20"].resolve()
    assert Path(cfg.model2.checkpoint).resolve() == CHECKPOINTS["cifar_resnet56"].resolve()
    assert Path(cfg.dataset.root).resolve() == CIFAR_TRAIN.resolve()
    assert Path(cfg.dataset.evaluation_root).resolve() == CIFAR_TEST.resolve()
    assert cfg.dataset.group_by == "predicted" and cfg.dataset.images_per_class is None
    assert dict(cfg.dataset.images_per_set) == {"concept": 100, "regression": 200, "evaluation": 200}


def test_a_layer_sweep_records_all_its_layers_in_one_pass():
    overrides = normalize_overrides(["layer1=layer1,layer2,layer3", "layer2=blocks.0,blocks.1"])
    assert "extract_layers1=[layer1,layer2,layer3]" in overrides
    assert "extract_layers2=[blocks.0,blocks.1]" in overrides
    assert not [o for o in normalize_overrides(["layer1=layer2"]) if o.startswith("extract_layers")]
    # One value of each swept layer, with the shared extraction lists: what each job of a sweep composes.
    cfg = compose("compare", "layer1=layer2", "extract_layers1=[layer1,layer2,layer3]")
    assert cfg.layer1 == "layer2" and list(cfg.extract_layers1) == ["layer1", "layer2", "layer3"]


def _rsvc_compare(store: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RSVC_PROGRESS": "0", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "rsvc_cli", "compare", *overrides, f"store={store}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.subprocess
def test_cifar_comparison_from_the_repository_root_prints_per_class_similarities(tmp_path, shared_dir):
    store = tmp_path / "store"
    first = _rsvc_compare(store, *SMALL_CIFAR)

    # The per-class table: one row per class with four direction means (each with its interval, which
    # wraps onto the next line), the unpredictable counts ("0/0") and the layer summaries.
    rows = {}
    for line in first.stdout.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] in CLASSES and len(cells) == 8:
            rows[cells[0]] = [float(re.match(r"-?\d+(\.\d+)?", c).group()) for c in cells[1:] if "/" not in c]
    assert sorted(rows) == sorted(CLASSES), first.stdout
    assert all(-1 <= value <= 1 for values in rows.values() for value in values)

    # The results table: one row per class x concept x direction, matching the scores artifact.
    table_path = Path(re.search(r"^results table: (\S+)$", first.stderr, flags=re.M).group(1))
    assert table_path.parent == store / "scores"
    with open(table_path) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(CLASSES) * N_CONCEPTS * 2
    assert {(r["class"], r["owner"], r["direction"]) for r in table} == {
        (c, owner, direction) for c in CLASSES for owner, direction in (("model1", "2->1"), ("model2", "1->2"))}
    assert {"importance", "similarity", "self_similarity"} <= set(table[0])
    with h5py.File(table_path.with_suffix(".h5"), "r", locking=False) as f:
        for r in table:
            group = f"classes/{r['class']}/{r['direction'].replace('->', 'to')}/similarity"
            assert float(r["similarity"]) == pytest.approx(float(f[group][int(r["concept"])]), abs=CORRELATION_TOL)
        for c in CLASSES:
            mean = np.nanmean(f[f"classes/{c}/2to1/similarity"][()])
            assert rows[c][0] == pytest.approx(mean, abs=5e-4), "the printed 2->1 mean of the class"

    # The relative checkpoint paths of the preset reached the shared weights (their digests are in the keys).
    activations = sorted((store / "activations").glob("*.h5"))
    assert len(activations) == 2
    weights = {}
    for path in activations:
        with h5py.File(path, "r", locking=False) as f:
            model = json.loads(f.attrs["config"])["model"]
        weights[model["name"]] = model["weights"]
    assert weights == {name: _file_sha256(CHECKPOINTS[name]) for name in ("cifar_resnet20", "cifar_resnet56")}
    assert (Path(re.search(r"^report: (\S+)$", first.stderr, flags=re.M).group(1))).is_file()

    # Every stage's wall time, printed last and kept beside the results table.
    times = json.loads(table_path.with_suffix(".times.json").read_text())
    assert list(times["seconds"]) == ["load or train models", "extract", "decompose", "regress", "score",
                                      "importance", "collage", "report"]
    assert times["total_seconds"] == pytest.approx(sum(times["seconds"].values()), abs=0.01)
    assert set(times["forward_precision"]) == {"cifar_resnet20", "cifar_resnet56"}
    assert "stage times" in first.stdout.split("per class:")[-1]

    # A rerun computes nothing and prints the same numbers.
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*.h5")}
    second = _rsvc_compare(store, *SMALL_CIFAR)
    assert not re.findall(r"^wrote ", second.stderr, flags=re.M), second.stderr
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.h5")} == stamps
    assert "per class:" in second.stdout
    with open(table_path) as fh:
        assert list(csv.DictReader(fh)) == table

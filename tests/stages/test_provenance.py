"""Random weights are refused unless asked for, then marked; every result records what made it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest

from rsvc_cli.errors import RsvcError
from rsvc_cli.models.loading import file_digest
from rsvc_cli.stages.provenance import check_weights, read_provenance
from tests.conftest import CHECKPOINTS, CIFAR_TEST, compose

R20 = CHECKPOINTS["cifar_resnet20"]


def _rsvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("rsvc")
    assert executable, "the rsvc console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RSVC_PROGRESS": "0"}
    return subprocess.run([executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.subprocess
def test_plain_compare_is_refused_with_the_fix(tmp_path):
    """`rsvc compare` alone would compare two randomly initialized ResNets: refused, nothing made."""
    done = _rsvc("compare", f"store={tmp_path / 'store'}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "model1 (cifar_resnet20) and model2 (cifar_resnet56) have random weights" in message
    assert "model1.checkpoint=PATH" in message and "model1.random_weights_ok=true model2.random_weights_ok=true" in message
    assert not list((tmp_path / "store").rglob("*.h5")), "nothing computed"


@pytest.mark.parametrize("stage", ["regress", "score", "importance", "collage", "report", "compare"])
def test_every_result_stage_refuses_random_weights_per_model(stage):
    cfg = compose(stage, f"model1.checkpoint={R20}")
    with pytest.raises(RsvcError, match=r"model2 \(cifar_resnet56\) has random weights") as caught:
        check_weights(cfg)
    assert "model1" not in caught.value.problem.split("has random")[0].replace("model2", "")
    # Per model: allowing model 1's random weights does not allow model 2's.
    with pytest.raises(RsvcError, match="model2"):
        check_weights(compose(stage, "model1.random_weights_ok=true"))
    assert check_weights(compose(stage, f"model1.checkpoint={R20}", "model2.random_weights_ok=true")) == ["model2"]
    assert check_weights(compose(stage, "experiment=cifar_r20_vs_r56")) == []  # checkpoints
    assert check_weights(compose(stage, "experiment=planted_synthetic")) == []  # trained by rsvc
    assert check_weights(compose(stage, "experiment=smoke")) == ["model1", "model2"]  # asked for


@pytest.fixture(scope="module")
def small_comparison(tmp_path_factory, shared_dir):
    """ResNet-20 (real checkpoint) against an untrained Tiniest, on real images given by a relative root."""
    from rsvc_cli.stages import compare

    cwd = tmp_path_factory.mktemp("run")
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        root = os.path.relpath(CIFAR_TEST, cwd)
        cfg = compose("compare", "model1=cifar_resnet20", f"model1.checkpoint={R20}", "model2=tiniest",
                      "model2.random_weights_ok=true", "layer1=layer3", "layer2=l3", "dataset=cifar10",
                      f"dataset.root={root}", "dataset.classes=[cat,ship]", "dataset.images_per_class=10",
                      "decomposition=semi_nmf", "decomposition.n_concepts=3", "regression=ridge",
                      "regression.n_folds=2", "importance.enabled=false", "n_tiles=2", f"store={cwd / 'store'}")
        result = compare.run(cfg)
    finally:
        os.chdir(previous)
    return result


@pytest.mark.slow  # shares one ~45 s comparison
def test_scores_artifact_records_what_made_it(small_comparison):
    provenance = read_provenance(small_comparison["path"])
    model1, model2 = provenance["model1"], provenance["model2"]
    assert model1["name"] == "cifar_resnet20" and model1["layer"] == "layer3" and not model1["random_weights"]
    assert model1["checkpoint"] == str(R20) and model1["checkpoint_sha256"] == file_digest(R20)
    assert model2["name"] == "tiniest" and model2["random_weights"] and "checkpoint" not in model2
    assert provenance["random_weights"] == ["model2"]
    dataset = provenance["dataset"]
    assert dataset["root"] == str(CIFAR_TEST) and os.path.isabs(dataset["root"])  # given relative
    assert dataset["classes"] == ["cat", "ship"] and dataset["group_by"] == "label"
    assert dataset["images_per_set"] == {"concept": {"total": 4, "per_class_min": 2, "per_class_max": 2},
                                         "regression": {"total": 8, "per_class_min": 4, "per_class_max": 4},
                                         "evaluation": {"total": 8, "per_class_min": 4, "per_class_max": 4}}
    assert provenance["decomposition"]["method"] == "semi_nmf" and provenance["decomposition"]["n_concepts"] == 3
    assert "signed" in provenance["decomposition"]
    assert provenance["regression"] == {"method": "ridge", "alpha": 1.0, "n_folds": 2, "evaluation": "heldout",
                                        "seed": 0}
    assert provenance["figures_computed_on"]["concept_correlation"] == "evaluation set"
    assert provenance["figures_computed_on"]["cka"] == "evaluation set"
    assert provenance["patch"]["size"] == 64 and provenance["rsvc_version"]
    assert provenance["seeds"]["dataset.seed"] == 0 and provenance["seeds"]["model2.init_seed"] == 0


@pytest.mark.slow  # shares one ~45 s comparison
def test_artifact_image_paths_resolve_from_any_folder(small_comparison):
    with h5py.File(small_comparison["regression_path"].parent.parent / "activations" /
                   next(p.name for p in (small_comparison["path"].parent.parent / "activations").glob("*.h5")),
                   "r") as f:
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["images/path"][()]]
    assert paths and all(os.path.isabs(p) and os.path.isfile(p) for p in paths)


@pytest.mark.slow  # shares one ~45 s comparison
def test_report_and_info_show_the_provenance_and_the_random_weights_banner(small_comparison):
    from rsvc_cli.stages.info import describe

    html = Path(small_comparison["report"]).read_text()
    assert 'class="banner"' in html and "RANDOM WEIGHTS: model2 (tiniest) has random weights" in html
    assert 'id="provenance"' in html and str(R20) in html and str(CIFAR_TEST) in html
    # Every class page carries the banner too.
    for page in (Path(small_comparison["report"]).parent / "classes").glob("*.html"):
        assert "RANDOM WEIGHTS" in page.read_text()
    described = describe(small_comparison["path"])
    assert described["attrs"]["provenance"]["model1"]["checkpoint_sha256"] == file_digest(R20)

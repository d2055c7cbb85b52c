"""The installed `rsvc` command: stage listing, Hydra's per-stage features, config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files

import pytest

from conftest import compose
from rsvc_cli.cli import STAGES, normalize_overrides

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
EXPERIMENTS = sorted(p.name[:-5] for p in files("rsvc_cli.configs").joinpath("experiment").iterdir()
                     if p.name.endswith(".yaml"))


def rsvc(*args, cwd):
    return subprocess.run(["rsvc", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_help_lists_every_stage(tmp_path):
    r = rsvc("--help", cwd=tmp_path)
    assert r.returncode == 0
    for stage in STAGES:
        assert stage in r.stdout
    m = subprocess.run([sys.executable, "-m", "rsvc_cli", "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert m.returncode == 0 and "extract" in m.stdout


@pytest.mark.subprocess
def test_hydra_features_per_stage(tmp_path):
    r = rsvc("extract", "--cfg", "job", "model=cifar_resnet56", "layers=[layer1,layer2]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cifar_resnet56" in r.stdout and "layer2" in r.stdout
    r = rsvc("compare", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "model1, model2:" in r.stdout and "experiment" in r.stdout
    r = rsvc("score", "--info", "searchpath", cwd=tmp_path)
    assert "pkg://rsvc_cli.configs" in r.stdout
    assert not any(tmp_path.iterdir()), "Hydra wrote nothing into the working directory"


@pytest.mark.subprocess
def test_unknown_stage_and_bad_override_fail_cleanly(tmp_path):
    r = rsvc("extrct", cwd=tmp_path)
    assert r.returncode == 2 and "Did you mean extract" in r.stderr
    r = rsvc("extract", "model.nosuchkey=1", cwd=tmp_path)
    assert r.returncode != 0 and "nosuchkey" in r.stderr and "Traceback" not in r.stderr


def test_pair_shorthands_and_timm_names():
    assert normalize_overrides(["model1=cifar_resnet20", "model2=convnext_tiny", "model1.checkpoint=x"]) == [
        "model@model1=cifar_resnet20", "model2.name=convnext_tiny", "model1.checkpoint=x"]
    assert "extract_layers1=[layer1,layer2]" in normalize_overrides(["-m", "layer1=layer1,layer2"])
    cfg = compose("regress", "model1=test_vit", "model2=resnet34")
    assert cfg.model1.name == "test_vit" and cfg.model2.name == "resnet34"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose("compare", f"experiment={experiment}")
    assert cfg.layer1 and cfg.layer2 and cfg.model1.name and cfg.model2.name


def test_typos_fail_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("compare", "regression.alpah=0.2")

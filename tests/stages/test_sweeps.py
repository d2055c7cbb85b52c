"""Layer-pair sweeps (`rsvc compare -m`): sequential, joblib and submitit launchers, kill and rerun, summarize.

The models are the shared CIFAR ResNet-20/56 checkpoints loaded into a subclass that logs every
forward pass (model, process, a digest of each input) to $RSVC_TEST_FORWARD_LOG, so the tests can
prove that each model saw each image once per sweep, whatever the launcher.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import CHECKPOINTS, CIFAR_TEST, SHARED, compose
from rsvc_cli.store.artifact import check_artifact

slow, subprocess_test = pytest.mark.slow, pytest.mark.subprocess

# Launchers run the same arithmetic in other processes; only thread scheduling may differ.
TOL = 1e-5
LAYERS = ("layer1", "layer2", "layer3")
CLASSES = ("cat", "dog")
IMAGES_PER_CLASS = 15
PATCHES_PER_IMAGE = 16  # 9 px patches at stride 7 on the 32 px input
# Extraction runs each image's patches, nothing else (the default grouping by label needs no
# predictions on whole images).
INPUTS_PER_IMAGE = PATCHES_PER_IMAGE
ARTIFACT_KINDS = ("activations", "concepts", "regression", "scores")

COUNTING_MODEL = '''
"""CIFAR ResNets that log every forward pass (tests only): which model, which process, which inputs."""

import hashlib
import os

from rsvc_cli.models.cifar import CifarResNet


class CountingCifarResNet(CifarResNet):
    def __init__(self, depth: int, tag: str, num_classes: int = 10):
        super().__init__(depth, num_classes=num_classes)
        self.tag = tag

    def forward(self, x):
        log = os.environ.get("RSVC_TEST_FORWARD_LOG")
        # Blank inputs are the layer check's probe before an extraction (rsvc_cli.models.hooks.describe_layers), not images.
        if log and bool(x.abs().sum() > 0):
            rows = x.detach().cpu().contiguous()
            digests = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in rows]
            with open(log, "a") as fh:  # one append per call: whole lines even with parallel writers
                fh.write(f"{self.tag} {os.getpid()} {len(digests)} {','.join(digests)}\\n")
        return super().forward(x)
'''


def pair_overrides() -> list[str]:
    models = []
    for n, depth in (("1", 20), ("2", 56)):
        models += [f"model{n}=custom", f"model{n}.name=counting_resnet{depth}",
                   f"model{n}._target_=forward_counting.CountingCifarResNet",
                   f"+model{n}.kwargs.depth={depth}", f"+model{n}.kwargs.tag=model{n}",
                   f"model{n}.checkpoint={CHECKPOINTS[f'cifar_resnet{depth}']}"]
    return [*models, "dataset=cifar10", f"dataset.root={CIFAR_TEST}", f"dataset.classes=[{','.join(CLASSES)}]",
            f"dataset.images_per_class={IMAGES_PER_CLASS}", "decomposition.n_concepts=3", "decomposition.max_iter=100",
            "regression.n_folds=3", "importance.enabled=false", "report=false", "n_tiles=2"]


SWEEP = [f"layer1={','.join(LAYERS)}", f"layer2={','.join(LAYERS)}"]


@pytest.fixture(scope="module")
def counting_env(tmp_path_factory) -> dict:
    if not SHARED.is_dir():
        pytest.fail(f"../shared is missing (looked for {SHARED}); the sweeps need its checkpoints and images.")
    helpers = tmp_path_factory.mktemp("helpers")
    (helpers / "forward_counting.py").write_text(COUNTING_MODEL)
    path = os.pathsep.join(filter(None, [str(helpers), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "RSVC_PROGRESS": "0"}


def sweep_command(store: Path, *extra: str, sweep: list[str] = SWEEP) -> list[str]:
    return [sys.executable, "-m", "rsvc_cli", "compare", "-m", *pair_overrides(), *sweep, *extra, f"store={store}"]


def run_sweep(env: dict, root: Path, *extra: str, sweep: list[str] = SWEEP) -> tuple[Path, Path, int]:
    """Run a sweep in a fresh store under `root`; return the store, its forward log and the sweep's process id."""
    store, log = root / "store", root / "forward.log"
    process = subprocess.Popen(sweep_command(store, *extra, sweep=sweep), cwd=root,
                               env={**env, "RSVC_TEST_FORWARD_LOG": str(log)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    return store, log, process.pid


def forward_passes(log: Path) -> dict[str, dict]:
    """Per model: inputs seen, distinct inputs, and the processes that ran them."""
    seen: dict[str, dict] = defaultdict(lambda: {"inputs": 0, "digests": set(), "pids": set()})
    if log.exists():
        for line in log.read_text().splitlines():
            tag, pid, n, digests = line.split(" ")
            seen[tag]["inputs"] += int(n)
            seen[tag]["digests"].update(digests.split(","))
            seen[tag]["pids"].add(int(pid))
    return dict(seen)


def assert_each_image_seen_once(log: Path) -> dict[str, dict]:
    seen = forward_passes(log)
    n_images = len(CLASSES) * IMAGES_PER_CLASS
    assert set(seen) == {"model1", "model2"}
    for tag, s in seen.items():
        assert s["inputs"] == n_images * INPUTS_PER_IMAGE, f"{tag} ran {s['inputs']} inputs, not one pass over the images"
        assert len(s["digests"]) == s["inputs"], f"{tag} saw some input twice"
    return seen


def artifacts(store: Path) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name}": p for kind in ARTIFACT_KINDS for p in (store / kind).glob("*.h5")}


def scores_of(store: Path) -> dict[str, dict[str, np.ndarray]]:
    """{scores file name: {dataset path: values}} of every scores artifact."""
    out = {}
    for path in (store / "scores").glob("*.h5"):
        values = {}
        with h5py.File(path, "r", locking=False) as f:
            f.visititems(lambda name, obj: values.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                         and obj.dtype.kind == "f" else None)
        out[path.name] = values
    return out


def assert_same_numbers(store: Path, reference: Path) -> None:
    got, expected = scores_of(store), scores_of(reference)
    assert sorted(got) == sorted(expected), "same artifacts (same keys) as the reference sweep"
    for name, values in expected.items():
        assert sorted(got[name]) == sorted(values)
        for dataset, value in values.items():
            np.testing.assert_allclose(got[name][dataset], value, atol=TOL, rtol=0, err_msg=f"{name}:{dataset}")


def assert_clean(store: Path) -> None:
    leftovers = [p.name for p in store.rglob("*") if p.name.endswith((".lock", ".partial"))]
    assert not leftovers, f"locks or partial files left behind: {leftovers}"
    for name, path in artifacts(store).items():
        assert check_artifact(path, path.parent.name) is None, name


@pytest.fixture(scope="module")
def sequential_sweep(counting_env, tmp_path_factory) -> tuple[Path, Path, int]:
    """The reference: the 3 x 3 sweep with Hydra's basic launcher, one job after the other, in one process."""
    return run_sweep(counting_env, tmp_path_factory.mktemp("sequential"))


@slow
@subprocess_test
def test_sequential_sweep_extracts_each_model_once(sequential_sweep):
    store, log, pid = sequential_sweep
    seen = assert_each_image_seen_once(log)
    assert all(s["pids"] == {pid} for s in seen.values()), "the basic launcher runs the jobs in its own process"
    names = artifacts(store)
    count = lambda kind: sum(name.startswith(kind + "/") for name in names)  # noqa: E731
    # 3 layers x 2 models of activations and concepts, one regression and scores per layer pair.
    assert (count("activations"), count("concepts"), count("regression"), count("scores")) == (6, 6, 9, 9)
    assert_clean(store)


@slow
@subprocess_test
def test_joblib_sweep_matches_sequential_and_extracts_once(counting_env, sequential_sweep, tmp_path):
    store, log, pid = run_sweep(counting_env, tmp_path, "hydra/launcher=local", "hydra.launcher.n_jobs=2")
    seen = assert_each_image_seen_once(log)
    assert all(pid not in s["pids"] for s in seen.values()), "the forward passes ran in a joblib worker"
    config = next((store / ".runs").glob("compare-multirun/*/multirun.yaml")).read_text()
    assert "JoblibLauncher" in config and "n_jobs: 2" in config
    assert_same_numbers(store, sequential_sweep[0])
    assert_clean(store)


@slow
@subprocess_test
def test_submitit_local_sweep_completes(counting_env, sequential_sweep, tmp_path):
    # Two jobs at once in two fresh processes (submitit's local executor runs them in parallel).
    store, log, pid = run_sweep(counting_env, tmp_path, "hydra/launcher=submitit_local",
                                "hydra.launcher.timeout_min=15", sweep=["layer1=layer2,layer3", "layer2=layer3"])
    seen = assert_each_image_seen_once(log)
    assert all(pid not in s["pids"] for s in seen.values()), "the forward passes ran in a submitit job"
    submitted = list(store.glob(".runs/compare-multirun/*/.submitit/*/*_result.pkl"))
    assert len(submitted) == 2, "both jobs went through submitit"
    reference = scores_of(sequential_sweep[0])
    got = scores_of(store)
    assert len(got) == 2 and set(got) <= set(reference)
    for name, values in got.items():
        for dataset, value in values.items():
            np.testing.assert_allclose(value, reference[name][dataset], atol=TOL, rtol=0)
    assert_clean(store)


@slow
@subprocess_test
def test_killed_sweep_reruns_only_the_missing_work(counting_env, sequential_sweep, tmp_path):
    store, log = tmp_path / "store", tmp_path / "forward.log"
    env = {**counting_env, "RSVC_TEST_FORWARD_LOG": str(log)}
    sweep = subprocess.Popen(sweep_command(store), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(store.glob("scores/*.h5"))) < 2 and sweep.poll() is None:
        time.sleep(0.02)
    assert sweep.poll() is None, "the sweep finished before it could be killed"
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    before = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in artifacts(store).items()}
    assert 2 <= sum(name.startswith("scores/") for name in before) < 9
    passes_before = forward_passes(log)

    rerun = subprocess.run(sweep_command(store), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = artifacts(store)
    untouched = {name for name, (inode, mtime) in before.items()
                 if (after[name].stat().st_ino, after[name].stat().st_mtime_ns) == (inode, mtime)}
    assert untouched == set(before), "complete artifacts are reused, never redone"
    written = {line.split()[2] for line in rerun.stderr.splitlines() if line.startswith("wrote ")}
    missing = {str(after[name]) for name in set(after) - set(before)}
    assert written == missing, "the rerun wrote exactly what was missing"
    # Extraction was complete before the kill: the rerun ran no forward pass at all.
    assert forward_passes(log) == passes_before
    assert_each_image_seen_once(log)
    assert_same_numbers(store, sequential_sweep[0])
    assert_clean(store)


@slow
@subprocess_test
def test_summarize_writes_layer_by_layer_matrices(sequential_sweep, tmp_path):
    from rsvc_cli.stages import summarize
    from rsvc_cli.stages.score import read_scores, summary_numbers

    store = sequential_sweep[0]
    out = tmp_path / "summary"
    written = summarize.run(compose("summarize", f"store={store}", f"out={out}"))
    # The oracle: each scores artifact's own summary, placed by the layers named in its config.
    expected = {}
    for path in (store / "scores").glob("*.h5"):
        result = read_scores(path)
        regression = json.loads(result["config"])["regression"]
        layer1, layer2 = (regression[f"concepts{n}"]["activations"]["layer"] for n in (1, 2))
        s = summary_numbers(result)
        expected[layer1, layer2] = {"mean_max_correlation": s["mean_max_correlation"], "similarity_2to1": s["2->1"],
                                    "similarity_1to2": s["1->2"], "regression_similarity": (s["2->1"] + s["1->2"]) / 2}
    assert len(expected) == 9
    measures = {key[2] for key in written}
    assert measures == set(summarize.MEASURES) == set(next(iter(expected.values())))
    for measure in measures:
        entry = written[("counting_resnet20", "counting_resnet56", measure)]
        assert entry["layers1"] == list(LAYERS) and entry["layers2"] == list(LAYERS), "depth order"
        matrix = entry["matrix"]
        assert matrix.shape == (3, 3) and np.isfinite(matrix).all()
        for (l1, l2), values in expected.items():
            assert matrix[LAYERS.index(l1), LAYERS.index(l2)] == pytest.approx(values[measure], abs=1e-12)
        with open(entry["csv"]) as fh:
            rows = list(csv.reader(fh))
        assert rows[0][1:] == list(LAYERS) and [row[0] for row in rows[1:]] == list(LAYERS)
        np.testing.assert_allclose(np.array([row[1:] for row in rows[1:]], dtype=float), matrix, rtol=1e-5)
        with Image.open(entry["png"]) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_summarize_orders_layers_by_depth_in_the_model():
    from rsvc_cli.stages.summarize import depth_order

    vit = {"name": "test_vit"}
    assert depth_order({"norm", "blocks.1", "patch_embed", "blocks.0"}, vit) == ["patch_embed", "blocks.0", "blocks.1", "norm"]
    assert depth_order({"linear", "layer3", "conv1", "layer1.2"}, {"name": "cifar_resnet20"}) == [
        "conv1", "layer1.2", "layer3", "linear"]
    # A model that cannot be built here: numbered names still in their natural order.
    unknown = {"name": "no_such_model", "target": "no_such_package.Model"}
    assert depth_order({"blocks.10", "blocks.2", "blocks.1"}, unknown) == ["blocks.1", "blocks.2", "blocks.10"]


def test_summarize_keeps_apart_comparisons_with_other_settings():
    from rsvc_cli.stages.summarize import comparison_settings

    def config(layer1, layer2, n_concepts=3):
        concepts = lambda layer: {"activations": {"layer": layer, "model": {"name": "m"}},  # noqa: E731
                                  "decomposition": {"n_concepts": n_concepts}}
        return {"kind": "scores", "evaluation": "heldout",
                "regression": {"concepts1": concepts(layer1), "concepts2": concepts(layer2), "regression": {}}}

    *_, layer1, layer2, digest = comparison_settings(config("layer1", "layer2"))
    assert (layer1, layer2) == ("layer1", "layer2")
    assert comparison_settings(config("layer3", "layer1"))[-1] == digest, "only the layers differ: one matrix"
    assert comparison_settings(config("layer1", "layer2", n_concepts=5))[-1] != digest


def test_summarize_titles_settings_groups_by_what_differs():
    from rsvc_cli.stages.summarize import differing_titles, settings_without_layers

    def entry(layer, n_concepts, alpha):
        concepts = {"activations": {"layer": layer, "model": {"name": "m"}}, "decomposition": {"n_concepts": n_concepts}}
        config = {"regression": {"concepts1": concepts, "concepts2": concepts, "regression": {"alpha": alpha}}}
        return {"settings": settings_without_layers(config)}

    comparisons = {("m", "m", "a"): entry("layer1", 3, 0.1), ("m", "m", "b"): entry("layer2", 3, 0.05),
                   ("m", "m", "c"): entry("layer3", 5, 0.1), ("m", "other", "d"): entry("layer1", 3, 0.1)}
    titles = differing_titles(comparisons)
    assert titles == {("m", "m", "a"): "n_concepts=3, alpha=0.1", ("m", "m", "b"): "n_concepts=3, alpha=0.05",
                      ("m", "m", "c"): "n_concepts=5, alpha=0.1"}, "layers never count; a lone pair needs no title"

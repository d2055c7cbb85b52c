"""Shared fixtures: Hydra composition, an isolated working directory and store, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rsvc_cli.overrides import compose as compose_config
from rsvc_cli.overrides import normalize_overrides

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test"
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train"
CIFAR_MODELS = SHARED / "models" / "cifar10"
CHECKPOINTS = {
    "cifar_resnet20": CIFAR_MODELS / "resnet20-12fca82f.th",
    "cifar_resnet56": CIFAR_MODELS / "resnet56-4bfd9763.th",
    "tiniest": CIFAR_MODELS / "tiniest.pt",
}
# With a preset that counts images per set (cifar_r20_vs_r56), what a test needs to give
# dataset.images_per_class and dataset.split instead.
PER_CLASS_COUNT = ("dataset.images_per_set.concept=null", "dataset.images_per_set.regression=null",
                   "dataset.images_per_set.evaluation=null")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RSVC_PROGRESS", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on what is often a 2-core machine: one thread each
    # (torch, its OpenMP pool, numba; read when they load, and the imports above load neither).
    # Two threads per worker spin against each other on 2 cores.
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: -n 2 --dist loadgroup) a module's tests run in one worker, so
    its module-scoped fixtures (a sweep, a trained pair, two determinism runs) are built once. Tests
    with a group of their own (the planted seeds: the longest) or in a module that sets
    XDIST_SPREAD = True (kill -9 chains, fault injection: a worker builds the reference run once
    per session) are scheduled apart. Those go first, then the other slow tests, so the last
    minutes are not one long group running alone."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return

    def order(item) -> int:
        if item.get_closest_marker("xdist_group") is not None:
            return 0
        if getattr(item.module, "XDIST_SPREAD", False):
            return 1 if item.get_closest_marker("slow") else 3
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
        return 2 if item.get_closest_marker("slow") else 3

    items.sort(key=order)  # stable: collection order within each rank


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own directory (Hydra and the store write there), offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RSVC_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")  # usable by module-scoped fixtures too
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared is missing (looked for {SHARED}); the tests need its real data and checkpoints.")
    return SHARED


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """The `rsvc` entry point called in this process: its exit code and what it wrote to stderr."""
    from rsvc_cli.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def compose(stage: str, *overrides: str):
    """The config `rsvc <stage> <overrides>` would run with (no Hydra run directory is made)."""
    return compose_config(stage, normalize_overrides(list(overrides)))


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture(params=["compiled", "torch"])
def solver_path(request, monkeypatch):
    """Runs a test on both paths: the compiled CPU kernels (lasso and its cross-validation passes,
    NNLS, the NMF's HALS sweeps) and the torch code GPUs run."""
    from rsvc_cli.algorithms import compiled

    if request.param == "compiled" and not compiled.enabled():
        pytest.fail("numba is missing: the compiled kernels are a dependency of rsvc")
    monkeypatch.setenv("RSVC_COMPILED_KERNELS", "1" if request.param == "compiled" else "0")
    return request.param

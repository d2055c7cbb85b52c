"""The same configuration twice on the CPU gives bitwise identical artifacts, and every seed is recorded.

Both runs happen in this process, each after scrambling the global random generators (torch,
numpy, Python) differently, so a computation that draws from a global generator instead of a seed
of its own shows up as a difference. (Runs in separate processes are compared bitwise in
test_kill.py, where every rerun must equal the uninterrupted reference.)
"""

from __future__ import annotations

import json
import random

import h5py
import numpy as np
import pytest
import torch

from conftest import compose
from reliability_helpers import FAST, artifacts, differences, one_torch_thread  # noqa: F401 (fixture)
from rsvc_cli.stages import compare
from rsvc_cli.store.keys import seeds_in

# Seeds each kind names for itself (config key -> the value FAST uses), beyond those of its content.
OWN_SEEDS = {
    "activations": {"dataset.seed": 0},
    "concepts": {"decomposition.seed": 0},
    "regression": {"regression.seed": 0},
    "importance": {"importance.patch_sample_seed": 0},
}
KINDS_WRITTEN = ("activations", "concepts", "regression", "scores", "importance")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scramble_global_generators(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, one_torch_thread):
    stores = []
    for scramble in (11, 12345):
        store = tmp_path_factory.mktemp(f"determinism-{scramble}") / "store"
        scramble_global_generators(scramble)
        compare.run(compose("compare", *FAST, f"store={store}"))
        stores.append(store)
    return stores


@pytest.mark.slow
def test_same_configuration_twice_gives_bitwise_identical_artifacts(two_runs):
    first, second = (artifacts(store) for store in two_runs)
    assert sorted(first) == sorted(second)
    assert {name.split("/")[0] for name in first} == set(KINDS_WRITTEN)
    for name in first:
        assert not differences(first[name], second[name]), f"{name} differs between two identical runs"


@pytest.mark.slow
def test_every_seed_in_use_is_recorded(two_runs):
    for name, path in artifacts(two_runs[0]).items():
        kind = name.split("/")[0]
        with h5py.File(path, "r", locking=False) as f:
            seeds = json.loads(f.attrs["seeds"])
            content = json.loads(f.attrs["config"])
        # Every seed of the content config (the image selection, the synthetic images, the initial
        # weights, upstream decompositions and regressions), under its path in that config.
        expected = seeds_in(content)
        assert expected, f"{name}: a content config without seeds?"
        for path_in_content, value in expected.items():
            assert seeds.get(path_in_content) == value, f"{name} does not record {path_in_content}={value}: {seeds}"
        for key, value in OWN_SEEDS.get(kind, {}).items():
            assert seeds.get(key) == value, f"{name} does not record {key}: {seeds}"
        # Model initialization and image choice matter to every kind, down to the importance.
        assert any(k.endswith("init_seed") for k in seeds), name
        assert any(k.endswith("images.seed") for k in seeds), name


def test_seeds_in_finds_nested_seeds_and_nothing_else():
    content = {"seed": 1, "model": {"init_seed": 2, "name": "m", "weights_seed_digest": "x"},
               "images": {"source": {"synthetic_seed": 3}, "planting": None, "seeds_used": 4},
               "flags": {"seed": True}, "decomposition": {"seed": None}}
    assert seeds_in(content) == {"seed": 1, "model.init_seed": 2, "images.source.synthetic_seed": 3}

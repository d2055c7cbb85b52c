"""A catalogue of bad inputs, each run through the real CLI on a store that already holds a comparison.

For every case: exit code 2, one message naming the problem and the fix, no Python traceback, and
nothing already stored lost (every file of the store before the command is there after it, byte for
byte, damaged ones included: rsvc refuses them, it never deletes them). Greyscale and RGBA images
must simply work. A good share runs the installed `rsvc` console script in a subprocess; the rest
call the same entry point (`rsvc_cli.cli.main`, Hydra included) in this process, which is faster.
`--debug` turns the paragraph back into a traceback.

Not writable store: the tests run as root, which ignores permission bits, so "not writable" is
simulated the way it meets users: `store=` naming an existing file (a typo such as
`store=results.csv`), or a path through a file; both must fail before Hydra makes its run folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CHECKPOINTS, run_main
from reliability_helpers import (  # noqa: F401 (one_torch_thread: a fixture)
    FAST, copy_store, one_torch_thread, reference_run, run_rsvc, snapshot, subprocess_env,
)

HERE = Path(__file__).resolve().parent
# A small model on small image folders: the image cases need no second model.
EXTRACT = ["extract", "model=cifar_resnet20", "layers=[layer2]", "dataset=imagefolder", "dataset.images_per_class=5",
           "device=cpu"]
BROKEN = ["model2=custom", "model2.input_size=32", "layer2=features"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# pytest-xdist schedules each test on its own: a worker builds the reference once (tests/conftest.py).
XDIST_SPREAD = True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("bad-inputs"))


def image_folder(root: Path, classes=("cat", "dog"), n: int = 6, mode: str = "RGB", size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
            Image.fromarray(pixels, "RGBA").convert(mode).save(root / name / f"{i}.png")
    return root


def first(store: Path, kind: str) -> Path:
    return sorted((store / kind).glob("*.h5"))[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def foreign(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:  # what another program leaves under an artifact's name
        f["weights"] = np.arange(10.0)


def older_format(path: Path) -> None:
    with h5py.File(path, "a", locking=False) as f:
        f.attrs["format_version"] = 0


@dataclass
class Case:
    """`setup(case_dir, store)` makes the files the case needs (or damages the store);
    `args(case_dir, store)` is the command line."""

    name: str
    args: Callable[[Path, Path], list[str]]
    problem: str  # a phrase of the message naming what is wrong
    fix: str  # a phrase of the message naming what to do
    setup: Callable[[Path, Path], object] | None = None
    subprocess: bool = False
    code: int = 2


def images(d: Path) -> str:
    return f"dataset.root={d / 'images'}"


CASES = [
    Case("unknown model", lambda d, s: ["extract", "model=resnet_18", f"store={s}"],
         "Unknown model 'resnet_18'", "Set model.name", subprocess=True),
    Case("unknown layer", lambda d, s: ["compare", *FAST, "layer1=layer9", f"store={s}"],
         "Unknown layer name(s) for CifarResNet: 'layer9'", "rsvc layers", subprocess=True),
    Case("layer of the wrong kind (never runs)",
         lambda d, s: ["extract", "model=test_vit", "layers=[blocks.0.attn.attn_drop]", "dataset.n_classes=2",
                       "dataset.images_per_class=3", f"store={s}"],
         "'blocks.0.attn.attn_drop' (not run) does not run in a forward pass", "`rsvc layers` marks each module"),
    # Batch x heads x tokens x head-dim: averaging its last two axes gave one "feature" per head.
    Case("layer of the wrong kind (attention heads)",
         lambda d, s: ["extract", "model=test_vit", "layers=[blocks.0.attn.q_norm]", "dataset.n_classes=2",
                       "dataset.images_per_class=3", f"store={s}"],
         "'blocks.0.attn.q_norm' (batch x 2 x 101 x 32) is no feature map", "`rsvc layers` marks each module",
         subprocess=True),
    # No silent no-ops: settings the chosen option does not read.
    Case("synthetic images with a root and classes",
         lambda d, s: ["extract", "model=cifar_resnet20", "dataset=synthetic", f"dataset.root={d}",
                       "dataset.classes=[cat,dog]", f"store={s}"],
         "dataset.root=", "Remove dataset.root, dataset.classes", subprocess=True),
    Case("classes and first_classes together",
         lambda d, s: [*EXTRACT, images(d), "dataset.classes=[cat]", "dataset.first_classes=2", f"store={s}"],
         "dataset.first_classes=2 (dataset.classes already lists the classes)", "Remove dataset.first_classes",
         setup=lambda d, s: image_folder(d / "images")),
    Case("a sign treatment semi-NMF does not read",
         lambda d, s: ["compare", *FAST, "decomposition.signed=clamp", f"store={s}"],
         "decomposition.signed=clamp (only decomposition=nmf treats signed activations", "Remove decomposition.signed"),
    Case("missing dataset root", lambda d, s: [*EXTRACT, f"dataset.root={d}/nowhere", f"store={s}"],
         "does not exist", "Set dataset.root", subprocess=True),
    Case("empty dataset root", lambda d, s: [*EXTRACT, images(d), f"store={s}"],
         "has no class folders", "one sub-folder per class", setup=lambda d, s: (d / "images").mkdir()),
    Case("a class with no images", lambda d, s: [*EXTRACT, images(d), f"store={s}"],
         "holds no images", "dataset.classes",
         setup=lambda d, s: (image_folder(d / "images"), (d / "images" / "bird").mkdir())),
    # Fewer images than asked but enough for a share of each set is a console note (tests/data/test_selection.py).
    Case("a class with too few images for the sets", lambda d, s: [*EXTRACT, images(d), f"store={s}"],
         "('cat') has 2 images, fewer than dataset.images_per_class=5", "Lower dataset.images_per_class",
         setup=lambda d, s: image_folder(d / "images", n=2)),
    Case("unreadable image", lambda d, s: [*EXTRACT, images(d), "dataset.images_per_class=6", f"store={s}"],
         "2.png cannot be read", "replace them with readable images",
         setup=lambda d, s: (image_folder(d / "images"),
                             (d / "images" / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8))),
    Case("zero-byte image", lambda d, s: [*EXTRACT, images(d), "dataset.images_per_class=6", f"store={s}"],
         "4.png is empty (0 bytes)", "replace them with readable images", subprocess=True,
         setup=lambda d, s: (image_folder(d / "images"), (d / "images" / "cat" / "4.png").write_bytes(b""))),
    Case("greyscale images work", lambda d, s: [*EXTRACT, images(d), f"store={s}"], "wrote activations", "",
         setup=lambda d, s: image_folder(d / "images", mode="L"), code=0),
    Case("RGBA images work", lambda d, s: [*EXTRACT, images(d), f"store={s}"], "wrote activations", "",
         setup=lambda d, s: image_folder(d / "images", mode="RGBA"), code=0),
    Case("checkpoint of another architecture",
         lambda d, s: ["compare", *FAST, f"model1.checkpoint={CHECKPOINTS['cifar_resnet56']}", f"store={s}"],
         "does not match model 'cifar_resnet20'", "Set model.name to the architecture", subprocess=True),
    Case("checkpoint that is not a checkpoint",
         lambda d, s: ["compare", *FAST, f"model2.checkpoint={d / 'notes.txt'}", f"store={s}"],
         "could not be read as torch weights", "torch.save",
         setup=lambda d, s: (d / "notes.txt").write_text("not weights")),
    Case("truncated HDF5 artifact", lambda d, s: ["compare", *FAST, f"store={s}"],
         "cannot be read as HDF5 (truncated or foreign file)", "Delete it", subprocess=True,
         setup=lambda d, s: truncate(first(s, "activations"))),
    Case("HDF5 file from another program", lambda d, s: ["compare", *FAST, f"store={s}"],
         "not an rsvc artifact", "Move it out of the store", setup=lambda d, s: foreign(first(s, "concepts"))),
    Case("artifact from an older format", lambda d, s: ["compare", *FAST, f"store={s}"],
         "written in artifact format 0", "Delete it", setup=lambda d, s: older_format(first(s, "regression"))),
    Case("store is a file", lambda d, s: ["compare", *FAST, f"store={s / 'results.csv'}"],
         "cannot be used as a folder", "Point store=DIR at a folder you can write", subprocess=True,
         setup=lambda d, s: (s / "results.csv").write_text("a,b\n")),
    Case("store inside a file", lambda d, s: [*EXTRACT, images(d), f"store={s / 'results.csv' / 'store'}"],
         "results.csv is a file", "not at a file",
         setup=lambda d, s: (image_folder(d / "images"), (s / "results.csv").write_text("a,b\n"))),
    Case("more concepts than samples", lambda d, s: ["compare", *FAST, "decomposition.n_concepts=100", f"store={s}"],
         "fewer than the 100 concepts asked for", "Lower decomposition.n_concepts"),
    Case("signed activations with plain NMF", lambda d, s: ["compare", *FAST, "decomposition=nmf", f"store={s}"],
         "negative values", "decomposition.signed=clamp", subprocess=True),
    Case("constant activations", lambda d, s: ["compare", *FAST, *BROKEN, "model2._target_=broken_models.ConstantNet",
                                               f"store={s}"],
         "are the same for every concept-set patch", "Pick another layer", subprocess=True),
    Case("all-zero activations", lambda d, s: ["compare", *FAST, *BROKEN, "model2._target_=broken_models.ZeroNet",
                                               f"store={s}"],
         "are the same for every concept-set patch", "check the model and its checkpoint"),
    Case("NaN activations", lambda d, s: ["compare", *FAST, *BROKEN, "model2._target_=broken_models.NaNNet",
                                          f"store={s}"],
         "contain 2560 NaN or infinite values", "Check the checkpoint and the input normalization"),
    Case("one fold (regression.n_folds=1)", lambda d, s: ["compare", *FAST, "regression.n_folds=1", f"store={s}"],
         "leaves nothing to hold out", "regression.n_folds=2 or more"),
    Case("patch larger than the input", lambda d, s: ["compare", *FAST, "patch.size=500", f"store={s}"],
         "larger than the 32 px input", "Lower patch.size"),
    Case("no concept set (dataset.split=[0,2,2])", lambda d, s: ["compare", *FAST, "dataset.split=[0,2,2]",
                                                                 f"store={s}"],
         "No class has any concept-set patches", "Give the concept set a share in dataset.split"),
    Case("no evaluation set (dataset.split=[1,2,0])", lambda d, s: ["compare", *FAST, "dataset.split=[1,2,0]",
                                                                    f"store={s}"],
         "0 evaluation-set patches", "regression.evaluation=crossval"),
    Case("negative split weight", lambda d, s: ["compare", *FAST, "dataset.split=[1,2,-1]", f"store={s}"],
         "must be three non-negative weights", "dataset.split=[1,2,2]"),
    Case("sweep over a layer that does not exist",
         lambda d, s: ["compare", *FAST, f"store={s}", "-m", "layer1=layer2,nosuch"],
         "'nosuch'", "rsvc layers", subprocess=True),
    Case("misspelt config key", lambda d, s: ["compare", *FAST, "regression.alhpa=0.1", f"store={s}"],
         "alhpa", "--cfg job", subprocess=True),
    Case("config option that does not exist", lambda d, s: ["compare", *FAST, "decomposition=nmff", f"store={s}"],
         "`nmff` is not an option of the config group `decomposition`", "Choose one of kmeans, nmf"),
    Case("value of the wrong type", lambda d, s: ["compare", *FAST, "decomposition.n_concepts=ten", f"store={s}"],
         "could not be converted to Integer", "--cfg job"),
    Case("unknown class name", lambda d, s: [*EXTRACT, images(d), "dataset.classes=[cat,dgo]", f"store={s}"],
         "Class 'dgo' is not a folder", "Use one of its 2 class folders",
         setup=lambda d, s: image_folder(d / "images")),
    Case("unknown stage", lambda d, s: ["compair", f"store={s}"],
         "'compair' is not an rsvc stage. Did you mean compare?", "rsvc --help", subprocess=True),
]
if not torch.cuda.is_available():
    CASES.append(Case("CUDA asked for, none here", lambda d, s: ["compare", *FAST, "device=cuda", f"store={s}"],
                      "no CUDA GPU is available", "device=auto"))


def run_case(case: Case, case_dir: Path, store: Path, capsys) -> tuple[int, str]:
    args = case.args(case_dir, store)
    if case.subprocess:
        env = subprocess_env(PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        result = run_rsvc(*args, cwd=case_dir, console_script=True, env=env)
        return result.returncode, result.stderr
    return run_main(args, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_message_and_loses_nothing(case, reference, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RSVC_DEBUG", raising=False)
    monkeypatch.syspath_prepend(str(HERE))  # broken_models for model._target_
    store = copy_store(reference.store, tmp_path / "store")
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    if case.setup is not None:
        case.setup(case_dir, store)
    # Damage done by the set-up counts as "already stored": it must survive the run too.
    before = snapshot(store)
    code, err = run_case(case, case_dir, store, capsys)
    after = snapshot(store)
    assert code == case.code, err
    assert "Traceback" not in err
    text = " ".join(err.split())  # the paragraph is wrapped at 100 columns
    assert case.problem in text, err
    assert case.fix in text, err
    if case.code == 2:
        assert text.count("rsvc: ") == 1, f"one paragraph: {err}"
    lost = sorted(name for name in before if name not in after)
    assert not lost, f"files lost from the store: {lost}"
    changed = sorted(name for name in before if after[name] != before[name])
    assert not changed, f"files changed in the store: {changed}"
    assert not list(store.rglob("*.partial")) and not list(store.rglob("*.lock")), "no partial or lock left"


@pytest.mark.subprocess
def test_debug_switch_shows_the_traceback(tmp_path):
    for switch, env in (("--debug", subprocess_env()), (None, subprocess_env(RSVC_DEBUG="1"))):
        args = ["extract", "model=cifar_resnet20", "layers=[layer9]", f"store={tmp_path / 'store'}"]
        result = run_rsvc(*args, *([switch] if switch else []), cwd=tmp_path, console_script=True, env=env)
        assert result.returncode != 0
        assert "Traceback" in result.stderr and "RsvcError" in result.stderr and "layer9" in result.stderr

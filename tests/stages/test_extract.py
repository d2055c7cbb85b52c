"""rsvc extract: real models on real or synthetic images, reuse, resume after kill -9, user errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CHECKPOINTS, CIFAR_TEST, compose
from rsvc_cli.errors import RsvcError
from rsvc_cli.stages import extract
from rsvc_cli.stages.common import load_image_sets, load_model, predicted_classes_for


def _run(*overrides):
    return extract.run(compose("extract", *overrides))


def _read(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in ("activations", "image_index", "patch_box", "label", "image_set")}


def test_cifar_resnet20_layers_on_real_images(store, shared_dir):
    cfg = compose("extract", "model=cifar_resnet20", f"model.checkpoint={CHECKPOINTS['cifar_resnet20']}",
                  "dataset=imagefolder", f"dataset.root={CIFAR_TEST}", "dataset.classes=[cat,dog]",
                  "dataset.images_per_class=10", "layers=[layer2,layer3]", f"store={store}")
    paths = extract.run(cfg)
    a2, a3 = _read(paths["layer2"]), _read(paths["layer3"])
    assert a2["activations"].shape == (20 * 16, 32) and a3["activations"].shape == (20 * 16, 64)
    assert (a3["activations"] >= 0).all(), "post-ReLU layer outputs averaged over space are non-negative"
    assert np.array_equal(a2["image_index"], a3["image_index"])
    # 2:4:4 split of 10 images per class; labels are the requested classes
    assert np.bincount(a3["image_set"]).tolist() == [2 * 2 * 16, 4 * 2 * 16, 4 * 2 * 16]
    assert set(a3["label"]) == {0, 1}
    # Predictions on the whole images are not part of an extraction: an artifact of their own, made on
    # demand (dataset.group_by=predicted), mostly cat or dog (CIFAR indices 3 and 5), then reused.
    assert not (store / "predictions").exists()
    model, images = load_model(cfg.model, cfg), load_image_sets(cfg.dataset)
    predicted = predicted_classes_for(model, images, cfg)
    assert predicted.shape == (20,) and np.isin(predicted, [3, 5]).mean() > 0.6
    (artifact,) = (store / "predictions").glob("*.h5")
    mtime = artifact.stat().st_mtime_ns
    np.testing.assert_array_equal(predicted_classes_for(model, images, cfg), predicted)
    assert artifact.stat().st_mtime_ns == mtime


def test_timm_resnet_and_vit_shapes_and_token_reduction(store):
    common = ["dataset=synthetic", "dataset.n_classes=2", "dataset.images_per_class=5", f"store={store}"]
    resnet = _read(_run("model=test_resnet", "layers=[layer2]", *common)["layer2"])
    assert resnet["activations"].shape[0] == 10 * 16
    cls = _read(_run("model=test_vit", "layers=[blocks.1]", "model.token_reduce=cls", *common)["blocks.1"])
    mean = _read(_run("model=test_vit", "layers=[blocks.1]", "model.token_reduce=mean", *common)["blocks.1"])
    assert cls["activations"].shape == mean["activations"].shape == (10 * 16, 64)
    assert not np.allclose(cls["activations"], mean["activations"])
    assert (cls["activations"] < 0).any(), "ViT tokens are signed"


def test_patches_stopped_after_the_deepest_layer_match_a_deeper_pass(tmp_path):
    common = ["model=test_vit", "dataset=synthetic", "dataset.n_classes=2", "dataset.images_per_class=5",
              "batch_size=4"]
    # blocks.1 alone: patches stop after it (a third of the network).
    stopped = _read(_run("layers=[blocks.1]", f"store={tmp_path / 'a'}", *common)["blocks.1"])
    # With blocks.5 as well, the pass runs through blocks.5.
    deeper = _read(_run("layers=[blocks.1,blocks.5]", f"store={tmp_path / 'b'}", *common)["blocks.1"])
    # Same numbers; batches of other sizes may round differently in the last float32 digits.
    np.testing.assert_allclose(stopped["activations"], deeper["activations"], rtol=1e-5, atol=1e-5)


def test_second_run_reuses_and_a_changed_setting_recomputes(store, capsys):
    args = ["model=test_resnet", "layers=[layer1]", "dataset.n_classes=2", "dataset.images_per_class=5", f"store={store}"]
    first = _run(*args)["layer1"]
    mtime = first.stat().st_mtime_ns
    capsys.readouterr()
    second = _run(*args)["layer1"]
    assert second == first and first.stat().st_mtime_ns == mtime
    assert "reused" in capsys.readouterr().err
    changed = _run(*args, "patch.stride=40")["layer1"]
    assert changed != first and changed.exists() and first.exists()
    whole = _read(_run(*args, "patch=whole")["layer1"])
    assert whole["activations"].shape[0] == 10


def _images_done(store: Path) -> int:
    """Progress recorded in the partial files (0 while they are missing or being written)."""
    done = []
    for path in store.glob("activations/*.partial"):
        try:
            with h5py.File(path, "r", locking=False) as f:
                done.append(int(f.attrs.get("n_done_images", 0)))
        except (OSError, KeyError):
            return 0
    return min(done) if len(done) == 2 else 0


def test_kill_9_mid_extraction_resumes_to_identical_results(tmp_path):
    args = ["model=cifar_resnet20", "dataset=synthetic", "dataset.n_classes=4", "dataset.images_per_class=60",
            "layers=[layer1,layer3]", "batch_size=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RSVC_PROGRESS": "0"}
    killed_store = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rsvc_cli", "extract", *args, f"store={killed_store}"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and _images_done(killed_store) < 8:
        time.sleep(0.05)
    assert proc.poll() is None, "extraction finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((killed_store / "activations").glob("*.h5")), "no final file after a kill"
    resumed = subprocess.run([sys.executable, "-m", "rsvc_cli", "extract", *args, f"store={killed_store}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming extraction at image" in resumed.stderr
    clean = extract.run(compose("extract", *args, f"store={tmp_path / 'clean'}"))
    for layer, path in clean.items():
        again = killed_store / "activations" / path.name
        a, b = _read(path), _read(again)
        for name in a:
            assert np.array_equal(a[name], b[name]), (layer, name)


@pytest.mark.parametrize("overrides, message", [
    (["model.name=resnet_18"], "Close matches: resnet18"),
    (["model=cifar_resnet20", "layers=[layer4]"], "layer3"),
    (["dataset=imagefolder", "dataset.root=/nonexistent/images"], "dataset.root"),
    (["model=test_resnet", "model.pretrained=true"], "model.checkpoint"),
])
def test_user_errors_name_the_fix(store, overrides, message):
    with pytest.raises(RsvcError) as info:
        _run(*overrides, "dataset.images_per_class=5", f"store={store}")
    assert message in str(info.value)


def test_empty_class_and_unreadable_image(tmp_path, store):
    from PIL import Image

    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 30), (i * 20, 100, 50)).save(root / c / f"{i}.png")
    (root / "empty").mkdir()
    with pytest.raises(RsvcError, match="empty"):
        _run("dataset=imagefolder", f"dataset.root={root}", "dataset.images_per_class=5", f"store={store}")
    (root / "empty").rmdir()
    (root / "b" / "3.png").write_bytes(b"")
    with pytest.raises(RsvcError, match="3.png"):
        _run("dataset=imagefolder", f"dataset.root={root}", "dataset.images_per_class=6", f"store={store}")


@pytest.mark.subprocess
def test_cli_user_error_is_one_paragraph_and_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["rsvc", "extract", "model=cifar_resnet20", "layers=[layer9]", f"store={tmp_path}/s"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "layer9" in r.stderr
    assert not list(tmp_path.glob("*.log")) and not (tmp_path / "outputs").exists(), "nothing littered in the cwd"
    r = subprocess.run(["rsvc", "extract", "layers=[layer9]", f"store={tmp_path}/s", "--debug"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_truncated_artifact_is_refused(store):
    args = ["model=test_resnet", "layers=[layer1]", "dataset.n_classes=2", "dataset.images_per_class=5", f"store={store}"]
    path = _run(*args)["layer1"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RsvcError, match="truncated"):
        _run(*args)
    assert path.stat().st_size == len(data) // 2, "the refused file is left for the user to look at"

"""The command line as a new user meets it: config mistakes, a stage's --help, custom models,
pretrained weights without network, unusable images.

Every refusal: exit code 2, one `rsvc:` paragraph naming the fix, no traceback, no Hydra advice
(HYDRA_FULL_ERROR), nothing written (no run folder, no store, no partial). Most cases call the
CLI's entry point in this process (Hydra included, fast); the ones about the installed command and
its environment run `rsvc` in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CHECKPOINTS, compose, run_main
from rsvc_cli.errors import RsvcError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RSVC_PROGRESS": "0"}
CUSTOM = "rsvc_cli.models.cifar.CifarResNet"


def assert_one_paragraph(code: int, err: str, *phrases: str) -> None:
    text = " ".join(err.split())  # the paragraph is wrapped at 100 columns
    assert code == 2, err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err, err
    assert text.count("rsvc: ") == 1, f"one paragraph: {err}"
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in: {err}"


# (command line, phrases of the paragraph)
CONFIG_CASES = [
    # Hydra suggested `+model=tiniest`, which fails in turn.
    (["compare", "model=tiniest"], ["has no `model`", "model1=tiniest and model2=tiniest"]),
    (["compare", "+model=tiniest"], ["has no `model`", "model1=tiniest"]),
    (["extract", "model1=tiniest"], ["works on one model", "model=tiniest"]),
    # `+layers=[...]` was added to the config and silently ignored.
    (["compare", "+layers=[layer1]"], ["`layers` is not a setting of rsvc compare", "Did you mean layer", "without `+`"]),
    (["compare", "regression.alpah=0.2"], ["`regression.alpah` is not a setting", "regression.alpha", "--cfg job"]),
    (["compare", "+layer1=layer2"], ["already has", "layer1=layer2"]),
    (["compare", "regression=lassso"], ["`lassso` is not an option of the config group `regression`", "lasso",
                                        "hydra.searchpath"]),
    # An unknown preset used to run the default comparison (the group was optional).
    (["compare", "experiment=nosuch"], ["`nosuch` is not an option of the config group `experiment`",
                                        "cifar_r20_vs_r56"]),
    (["compare", "decomposition.n_concepts=ten"], ["wrong type", "could not be converted to Integer", "--cfg job"]),
    (["compare", "layer1=[a"], ["`layer1=[a` is not a valid override", "matching brackets"]),
    # Hydra's lexer refuses non-ASCII characters in unquoted values.
    (["extract", "dataset.classes=[cat,café]"], ["non-ASCII", "'dataset.classes=[cat,\"café\"]'"]),
]


@pytest.mark.parametrize("args,phrases", CONFIG_CASES, ids=[" ".join(a) for a, _ in CONFIG_CASES])
def test_config_mistakes_are_one_paragraph_and_write_nothing(args, phrases, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RSVC_DEBUG", raising=False)
    store = tmp_path / "store"
    code, err = run_main([*args, f"store={store}"], capsys)
    assert_one_paragraph(code, err, *phrases)
    assert not store.exists() and not [p for p in tmp_path.iterdir() if p.name != "store"], "nothing written"


@pytest.mark.subprocess
def test_installed_command_shows_no_hydra_advice(tmp_path):
    r = subprocess.run(["rsvc", "compare", "model=tiniest", "regression.alpha=0.2"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert_one_paragraph(r.returncode, r.stderr, "model1=tiniest")
    assert not any(tmp_path.iterdir())


@pytest.mark.subprocess
def test_stage_help_is_short_and_loads_no_torch(tmp_path):
    r = subprocess.run(["rsvc", "compare", "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) < 60, r.stdout
    for phrase in ("model1, model2:", "experiment:", "regression: method=lasso", "--cfg job"):
        assert phrase in r.stdout, phrase
    # Blocks that do not apply are their switch alone: no training set, no planting colours.
    assert "train.enabled=false" in r.stdout and "train.dataset" not in r.stdout and "color=" not in r.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from rsvc_cli.cli import main; "
                            "main(['extract', '--help']); print('torch loaded:', 'torch' in sys.modules)"],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert "torch loaded: False" in probe.stdout, probe.stdout + probe.stderr


def test_model_kwargs_without_plus_and_constructor_errors_name_the_argument(shared_dir):
    from rsvc_cli.models.registry import make_model

    cfg = compose("compare", "model1=custom", f"model1._target_={CUSTOM}", "model1.kwargs.depth=32",
                  "+model2.kwargs.depth=56", "dataset.planting.class_probability.cat=0.5")
    assert cfg.model1.kwargs.depth == 32 and cfg.model2.kwargs.depth == 56
    assert cfg.dataset.planting.class_probability.cat == 0.5
    model = make_model("custom", target=CUSTOM, kwargs={"depth": 32})
    assert sum(1 for _ in model.module.layer1) == 5  # depth 32: five blocks per stage
    with pytest.raises(RsvcError, match=r"needs the argument depth.*model\.kwargs\.depth=VALUE"):
        make_model("custom", target=CUSTOM)
    with pytest.raises(RsvcError, match=r"takes no argument 'dpth'.*Did you mean depth"):
        make_model("custom", target=CUSTOM, kwargs={"dpth": 32})
    with pytest.raises(RsvcError, match=r"rejects the arguments .*depth must be 6n\+2"):
        make_model("custom", target=CUSTOM, kwargs={"depth": 33})
    # A ResNet-56 checkpoint in a depth-32 custom model: the advice is its kwargs, not model.name.
    with pytest.raises(RsvcError) as caught:
        make_model("custom", target=CUSTOM, kwargs={"depth": 32}, checkpoint=str(CHECKPOINTS["cifar_resnet56"]))
    assert "model.kwargs" in str(caught.value) and "model.name" not in str(caught.value)


def test_checkpoint_message_is_whole_sentences(tmp_path):
    import torch

    from rsvc_cli.models.registry import make_model

    path = tmp_path / "pickled.pt"
    torch.save({"weights": torch.zeros(1), "data_dir": Path("/data")}, path)  # a pickled object besides tensors
    with pytest.raises(RsvcError) as caught:
        make_model("cifar_resnet20", checkpoint=str(path))
    text = str(caught.value)
    assert "weights_only" in text and "torch.save(model.state_dict(), PATH)" in text and text.endswith(".")
    assert "is)." not in text and "\x1b" not in text


@pytest.mark.subprocess
def test_pretrained_without_network_fails_fast(tmp_path):
    """No HF_HUB_OFFLINE, a Hub that does not answer (nothing listens on port 9): the Hub client
    used to retry for about a minute; rsvc probes the host and fails at once with the fix."""
    env = {k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    start = time.monotonic()
    r = subprocess.run(["rsvc", "layers", "model=test_resnet", "model.pretrained=true"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert_one_paragraph(r.returncode, r.stderr, "127.0.0.1 cannot be reached", "model.checkpoint=PATH")
    assert "Retrying" not in r.stderr
    print(f"pretrained=true without network: exit {r.returncode} after {elapsed:.1f} s (process start included)")


def unusable_images(root: Path) -> list[str]:
    """A two-class folder with one of each unusable kind; returns their names."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    # A JPEG whose header says 14000 x 14000: what PIL refuses as a decompression bomb.
    Image.new("RGB", (16, 16)).save(root / "cat" / "huge.jpg")
    data = bytearray((root / "cat" / "huge.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (14000).to_bytes(2, "big") * 2
    (root / "cat" / "huge.jpg").write_bytes(bytes(data))
    Image.new("RGB", (5, 5)).save(root / "cat" / "tiny.png")
    (root / "dog" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "dog" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
    return ["huge.jpg", "tiny.png", "gone.png", "garbage.png"]


def test_unusable_images_are_listed_at_once_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RSVC_DEBUG", raising=False)
    root, store = tmp_path / "images", tmp_path / "store"
    names = unusable_images(root)
    code, err = run_main(["extract", "model=cifar_resnet20", "layers=[layer1]", "dataset=imagefolder",
                          f"dataset.root={root}", "dataset.images_per_class=6", "dataset.split=[1,1,1]", "device=cpu",
                          f"store={store}"], capsys)
    assert_one_paragraph(code, err, "4 of the 12 selected images cannot be used", "decompression bombs",
                         "5x5 px, smaller than the 9 px a patch needs", "which does not exist", "the link itself",
                         "Remove these files")
    for name in names:
        assert name in err
    assert not [p for p in store.rglob("*") if p.is_file() and ".runs" not in p.parts], "no artifact, no partial"


def test_tilde_paths_are_the_home_folder(tmp_path, capsys, monkeypatch):
    """A quoted store='~/x' used to make a folder named `~` in the working directory."""
    monkeypatch.delenv("RSVC_DEBUG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, err = run_main(["extract", "model=resnet_18", "store=~/rsvc-store"], capsys)
    assert_one_paragraph(code, err, "Unknown model 'resnet_18'")
    assert not (work / "~").exists() and (tmp_path / "home" / "rsvc-store").is_dir()


def test_progress_written_to_a_file_is_a_line_every_30_s_with_rate_and_time_left(capsys):
    from rsvc_cli import console

    now = [0.0]
    bar = console.LogProgress(1000, "extract cifar_resnet20 [layer3]", "patch", clock=lambda: now[0])
    for _ in range(10):  # 100 patches every 10 s
        now[0] += 10.0
        bar.update(100)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "extract cifar_resnet20 [layer3]: 300/1000 patch (30%), 10 patch/s, about 1 min 10 s left",
        "extract cifar_resnet20 [layer3]: 600/1000 patch (60%), 10 patch/s, about 40 s left",
        "extract cifar_resnet20 [layer3]: 900/1000 patch (90%), 10 patch/s, about 10 s left",
        "extract cifar_resnet20 [layer3]: 1000/1000 patch (100%), 10 patch/s, done in 1 min 40 s",
    ]


def test_terminal_bar_counts_in_integers(monkeypatch):
    from rsvc_cli import console

    monkeypatch.setenv("RSVC_PROGRESS", "1")
    bar = console.progress(4, "importance model1", unit="class")
    bar.update(3)
    text = str(bar)
    bar.close()
    assert "3/4 class" in text and "3.00" not in text


@pytest.mark.slow
def test_collages_off_store_listing_and_read_only_store(tmp_path, capsys, monkeypatch):
    """A small synthetic comparison (2 classes x 6 images) without collages: the report is written,
    no concept grid is; `rsvc collage` itself refuses the switch rather than doing nothing; `rsvc info
    store=` lists the report and the artifacts by kind with what tells them apart; the store mounted
    read-only serves the same comparison."""
    monkeypatch.delenv("RSVC_DEBUG", raising=False)
    store = tmp_path / "store"
    small = ["model1=cifar_resnet20", "model2=tiniest", "layer1=layer2", "layer2=l3", "dataset.n_classes=2",
             "dataset.images_per_class=6", "decomposition=semi_nmf", "decomposition.n_concepts=2",
             "decomposition.max_iter=20", "regression=ridge", "regression.n_folds=2", "device=cpu",
             "model1.random_weights_ok=true", "model2.random_weights_ok=true"]  # the plumbing, not the numbers
    code, err = run_main(["compare", *small, "importance.enabled=false", "collage.enabled=false", f"store={store}"],
                         capsys)
    assert code in (0, None), err
    assert "collages skipped" in err and len(list(store.glob("reports/*/index.html"))) == 1
    grids = [p for p in store.rglob("*.png") if p.stem.endswith(("_top", "_over", "_under"))]
    assert not grids
    code, err = run_main(["collage", *small, "collage.enabled=false", f"store={store}"], capsys)
    assert_one_paragraph(code, err, "collage.enabled=false leaves it nothing to do")
    # The store explains itself: its comparison with its report, and what tells its two activations
    # artifacts apart.
    from rsvc_cli.stages import info

    listed = info.run(compose("info", f"store={store}"))
    (comparison,) = listed["comparisons"]
    assert comparison[:7] == ("cifar_resnet20", "layer2", "tiniest", "l3", 2, 1.0, "heldout")
    assert comparison[-1].startswith("reports/") and comparison[-1].endswith("/index.html")
    listing = " ".join(capsys.readouterr().out.split())
    assert "comparisons in" in listing and "activations (2)" in listing and "scores (1)" in listing
    assert "model.name=cifar_resnet20" in listing and "model.name=tiniest" in listing
    check_read_only_store(store, ["compare", *small, "importance.enabled=false"], capsys)


def check_read_only_store(store: Path, args: list[str], capsys) -> None:
    """The complete store mounted read-only serves the same comparison's numbers; a run that must
    write (collages) stops with the fix, and nothing in the store changes."""
    mounted = store.parent / "read-only"
    mounted.mkdir()
    if subprocess.run(["mount", "--bind", str(store), str(mounted)], capture_output=True).returncode != 0:
        pytest.skip("a read-only bind mount needs root with mount rights")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mounted)], check=True, capture_output=True)
        before = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))
        code, err = run_main([*args, "collage.enabled=false", "report=false", f"store={mounted}"], capsys)
        assert code in (0, None), err
        assert "reused scores" in err and "wrote" not in err
        code, err = run_main([*args, f"store={mounted}"], capsys)
        assert_one_paragraph(code, err, "The store is read-only", "collage.enabled=false report=false")
        assert sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*")) == before
    finally:
        subprocess.run(["umount", str(mounted)], capture_output=True)

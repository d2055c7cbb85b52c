"""The artifact protocol: atomic commit, resume, refusal of foreign/stale/truncated files, locks."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import ArtifactWriter, check_artifact, is_complete, open_artifact, partial_path
from rsvc_cli.store.keys import artifact_path, content_key
from rsvc_cli.store.lock import artifact_lock, lock_is_stale, lock_path

CONTENT = {"kind": "activations", "model": {"name": "m"}, "layer": "layer3"}


def write(path: Path, content=CONTENT, value=1.0):
    with ArtifactWriter(path, "activations", content) as w:
        w.file.create_dataset("x", data=np.full(3, value))
        w.commit()
    return path


def test_key_is_order_independent_and_sensitive_to_values(tmp_path):
    a = artifact_path(tmp_path, "activations", "m-layer3", {"a": 1, "b": [1, 2]})
    b = artifact_path(tmp_path, "activations", "m-layer3", {"b": [1, 2], "a": 1})
    c = artifact_path(tmp_path, "activations", "m-layer3", {"a": 2, "b": [1, 2]})
    assert a == b != c
    assert a.name.startswith("m-layer3-") and len(a.stem.split("-")[-1]) == 16


def test_commit_is_atomic_and_complete(tmp_path):
    path = tmp_path / "activations" / "x.h5"
    with ArtifactWriter(path, "activations", CONTENT) as w:
        w.file.create_dataset("x", data=np.arange(3))
        assert partial_path(path).exists() and not path.exists()
        w.commit()
    assert path.exists() and not partial_path(path).exists()
    assert is_complete(path, "activations", CONTENT)
    with open_artifact(path, "activations", CONTENT) as f:
        assert f.attrs["key"] == content_key(CONTENT)
        assert "torch" in f.attrs["versions"]


def test_interrupted_write_leaves_no_final_file_and_resumes(tmp_path):
    path = tmp_path / "activations" / "x.h5"
    with pytest.raises(KeyboardInterrupt):
        with ArtifactWriter(path, "activations", CONTENT, resume=True) as w:
            w.file.attrs["n_done"] = 7
            raise KeyboardInterrupt
    assert not path.exists() and partial_path(path).exists()
    with ArtifactWriter(path, "activations", CONTENT, resume=True) as w:
        assert w.resumed and w.file.attrs["n_done"] == 7
        w.commit()
    # A partial made with other settings is never resumed.
    with pytest.raises(KeyboardInterrupt):
        with ArtifactWriter(path.with_name("y.h5"), "activations", CONTENT, resume=True) as w:
            raise KeyboardInterrupt
    with ArtifactWriter(path.with_name("y.h5"), "activations", {**CONTENT, "layer": "other"}, resume=True) as w:
        assert not w.resumed


def test_changed_settings_are_refused_not_reused(tmp_path):
    path = write(tmp_path / "activations" / "x.h5")
    with pytest.raises(RsvcError, match="other settings"):
        is_complete(path, "activations", {**CONTENT, "layer": "layer2"})


@pytest.mark.parametrize("damage", ["truncate", "foreign", "old_format", "incomplete", "wrong_kind"])
def test_damaged_files_are_refused_with_a_fix(tmp_path, damage):
    path = write(tmp_path / "activations" / "x.h5")
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif damage == "foreign":
        path.unlink()
        with h5py.File(path, "w") as f:
            f["data"] = np.arange(4)
    else:
        with h5py.File(path, "a") as f:
            if damage == "old_format":
                f.attrs["format_version"] = 0
            elif damage == "incomplete":
                f.attrs["complete"] = False
            else:
                f.attrs["kind"] = "scores"
    problem = check_artifact(path, "activations", CONTENT)
    assert problem is not None
    with pytest.raises(RsvcError) as info:
        is_complete(path, "activations", CONTENT)
    assert "Delete" in str(info.value) or "Move" in str(info.value)
    assert path.exists(), "a refused file is never deleted behind the user's back"


def test_no_space_left_removes_the_partial_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "activations" / "x.h5"
    with pytest.raises(RsvcError, match="No space left"):
        with ArtifactWriter(path, "activations", CONTENT) as w:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not path.exists() and not partial_path(path).exists()


def _hold_lock(path, seconds, started):
    with artifact_lock(Path(path)):
        started.set()
        time.sleep(seconds)


def test_lock_excludes_a_second_writer_and_dead_holders_are_stale(tmp_path):
    target = tmp_path / "activations" / "x.h5"
    ctx = mp.get_context("fork")
    started = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(target), 1.0, started))
    holder.start()
    started.wait(10)
    waited = []
    t0 = time.time()
    with artifact_lock(target, on_wait=waited.append, poll=0.05):
        elapsed = time.time() - t0
    holder.join()
    assert waited and elapsed > 0.5
    # A lock left by a killed process on this host is broken at once.
    lock_path(target).write_text('{"host": "%s", "pid": 999999999, "time": 0}' % os.uname().nodename)
    assert lock_is_stale(lock_path(target))
    with artifact_lock(target, poll=0.05):
        pass
    assert not lock_path(target).exists()

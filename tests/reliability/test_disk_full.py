"""A full disk in the middle of a stage: the store is left exactly as it was, with a clear message.

The disk fills up in-process: h5py's writes (dataset data, datasets created with data, attributes)
count their bytes and raise OSError(ENOSPC) once a seeded budget is spent, or HDF5's final flush
at commit fails, or the rename of the finished partial does. The stage runs through the CLI's task
shell (`run_task`, what `rsvc compare` calls), upstream artifacts already in the store; afterwards
every file in the store has the same bytes as before (new files none), exit code 2, a message that
says what happened and what to do, no traceback.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import compose
from reliability_helpers import (  # noqa: F401 (one_torch_thread: a fixture)
    FAST, STAGE_KIND, STAGES, copy_store, one_torch_thread, reference_run, snapshot,
)
from rsvc_cli.cli import run_task
from rsvc_cli.stages import compare, score

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# What the user must read: the problem and the fix.
MESSAGE_PARTS = ("No space left", "Free disk space")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# pytest-xdist schedules each test on its own: a worker builds the reference once (tests/conftest.py).
XDIST_SPREAD = True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("disk-full"))


class DiskFull:
    """Make h5py writes fail like a full disk: after `budget` bytes, at commit, or at the rename."""

    def __init__(self, monkeypatch, budget: int | None = None, on_commit: bool = False, on_rename: bool = False):
        self.budget = budget
        self.written = 0
        self.failed = False
        dataset_setitem = h5py.Dataset.__setitem__
        create_dataset = h5py.Group.create_dataset
        attr_setitem = h5py.AttributeManager.__setitem__
        flush = h5py.File.flush
        replace = os.replace

        def spend(n_bytes: int) -> None:
            if self.budget is not None:
                self.written += int(n_bytes)
                if self.written > self.budget:
                    self.failed = True
                    raise NO_SPACE

        def nbytes(value) -> int:
            try:
                return np.asarray(value).nbytes or 8
            except Exception:  # noqa: BLE001 - anything h5py accepts costs at least a little
                return 8

        def patched_dataset_setitem(dataset, key, value):
            spend(nbytes(value))
            return dataset_setitem(dataset, key, value)

        def patched_create_dataset(group, name, shape=None, dtype=None, data=None, **kwargs):
            spend(nbytes(data) if data is not None else 64)
            return create_dataset(group, name, shape=shape, dtype=dtype, data=data, **kwargs)

        def patched_attr_setitem(attrs, name, value):
            spend(nbytes(value))
            return attr_setitem(attrs, name, value)

        def patched_flush(f):
            if on_commit and bool(f.attrs.get("complete", False)):
                self.failed = True
                raise NO_SPACE
            return flush(f)

        def patched_replace(source, target, *args, **kwargs):
            if on_rename and str(source).endswith(".h5.partial"):
                self.failed = True
                raise NO_SPACE
            return replace(source, target, *args, **kwargs)

        monkeypatch.setattr(h5py.Dataset, "__setitem__", patched_dataset_setitem)
        monkeypatch.setattr(h5py.Group, "create_dataset", patched_create_dataset)
        monkeypatch.setattr(h5py.AttributeManager, "__setitem__", patched_attr_setitem)
        monkeypatch.setattr(h5py.File, "flush", patched_flush)
        monkeypatch.setattr(os, "replace", patched_replace)


def upstream_kinds(stage: str) -> tuple[str, ...]:
    return tuple(STAGE_KIND[s] for s in STAGES[: STAGES.index(stage)] if STAGE_KIND[s])


def payload_bytes(path) -> int:
    """Bytes of every dataset and attribute of an artifact: at least what writing it costs."""
    total = 0
    with h5py.File(path, "r", locking=False) as f:
        def visit(_, obj):
            nonlocal total
            total += sum(np.asarray(v).nbytes for v in obj.attrs.values())
            if isinstance(obj, h5py.Dataset):
                total += obj.nbytes
        visit("/", f)
        f.visititems(visit)
    return total


def stage_bytes(reference, stage: str) -> int:
    """The smallest artifact the stage writes, in payload bytes: a budget below it fails the stage's
    first write, whichever of its artifacts comes first."""
    return min(payload_bytes(p) for p in (reference.store / STAGE_KIND[stage]).glob("*.h5"))


def store_before(reference, store, stage: str):
    """The store as `compare` leaves it when `stage` starts: the upstream artifacts and, once
    scores exist, the results table that `score` writes."""
    copy_store(reference.store, store, upstream_kinds(stage))
    for table in store.glob("scores/*.csv"):
        table.unlink()
    if "scores" in upstream_kinds(stage):
        score.run(compose("score", *FAST, f"store={store}"))
    return store


def run_compare_expecting_exit(store, capsys, *extra):
    cfg = compose("compare", *FAST, f"store={store}", *extra)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_task(compare.run, cfg)
    return info.value.code, capsys.readouterr().err


def assert_clear_no_space_message(code, err):
    assert code == 2, err
    text = " ".join(err.split())  # the paragraph is wrapped at 100 columns
    for part in MESSAGE_PARTS:
        assert part in text, err
    assert "Traceback" not in err


ARTIFACT_STAGES = ("extract", "decompose", "regress", "score", "importance")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ARTIFACT_STAGES)
@pytest.mark.parametrize("mode", ["bytes", "commit"])
def test_disk_full_in_a_stage_leaves_the_store_as_it_was(reference, tmp_path, monkeypatch, capsys, stage, mode):
    store = store_before(reference, tmp_path / "store", stage)
    before = snapshot(store)
    rng = np.random.default_rng(ARTIFACT_STAGES.index(stage))
    budget = int(rng.integers(0, stage_bytes(reference, stage))) if mode == "bytes" else None
    disk = DiskFull(monkeypatch, budget=budget, on_commit=mode == "commit")
    code, err = run_compare_expecting_exit(store, capsys)
    assert disk.failed, "the fault was injected"
    assert_clear_no_space_message(code, err)
    assert snapshot(store) == before, f"budget {budget}: the store changed"


def test_disk_full_at_rename_and_with_two_layers_in_one_pass(reference, tmp_path, monkeypatch, capsys):
    """One pass writing two activations artifacts: both partials go; then a failing final rename."""
    store = tmp_path / "store"
    disk = DiskFull(monkeypatch, budget=stage_bytes(reference, "extract") // 3)
    code, err = run_compare_expecting_exit(store, capsys, "extract_layers1=[layer1,layer3]")
    assert disk.failed
    assert_clear_no_space_message(code, err)
    assert snapshot(store) == {}
    monkeypatch.undo()
    DiskFull(monkeypatch, on_rename=True)
    code, err = run_compare_expecting_exit(store, capsys)
    assert_clear_no_space_message(code, err)
    assert snapshot(store) == {}


def test_disk_full_while_taking_a_lock(reference, tmp_path, monkeypatch, capsys):
    """The lock file is created but its content cannot be written: no empty lock is left behind."""
    from rsvc_cli.store import lock

    def no_space_dump(*args, **kwargs):
        raise NO_SPACE

    store = store_before(reference, tmp_path / "store", "regress")
    before = snapshot(store)
    monkeypatch.setattr(lock, "json", type("FullDiskJson", (), {"dump": staticmethod(no_space_dump),
                                                                 "loads": staticmethod(json.loads)}))
    code, err = run_compare_expecting_exit(store, capsys)
    assert_clear_no_space_message(code, err)
    assert snapshot(store) == before


def test_disk_full_while_drawing_collages_keeps_every_artifact(reference, tmp_path, monkeypatch, capsys):
    """Collages are pictures, redrawn on every run: the artifacts and tables are what must survive."""
    store = copy_store(reference.store, tmp_path / "store")
    before = snapshot(store)

    def no_space_write(self, *args, **kwargs):
        raise NO_SPACE

    # Collage PNGs (rsvc_cli.viz.png) are the only files written with Path.write_bytes.
    monkeypatch.setattr(Path, "write_bytes", no_space_write)
    code, err = run_compare_expecting_exit(store, capsys)
    assert_clear_no_space_message(code, err)
    after = snapshot(store)
    assert {k: v for k, v in after.items() if not k.startswith("reports/")} == \
        {k: v for k, v in before.items() if not k.startswith("reports/")}

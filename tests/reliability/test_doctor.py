"""`rsvc doctor store=DIR [clean=true]`: list what is incomplete, orphaned or broken; clean only that.

A store holding a complete comparison gets every kind of litter a crash, a kill or a person leaves:
partials without a writer (and one with a live writer), stale locks (dead process, unreadable and
old), truncated, foreign, old-format and hand-renamed HDF5 files, an orphaned checkpoint partial,
results-table temporaries. The doctor lists each with its state and changes nothing; `clean=true`
removes exactly the removable ones, leaving every complete artifact byte for byte, and the live
writer's files. Also after a real `kill -9`.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import h5py
import numpy as np
import pytest

from conftest import compose
from reliability_helpers import (  # noqa: F401 (one_torch_thread: a fixture)
    FAST,
    Watched,
    artifacts,
    copy_store,
    first_partial_since,
    one_torch_thread,
    reference_run,
    run_rsvc,
    snapshot,
    subprocess_env,
)
from rsvc_cli.cli import main
from rsvc_cli.stages import doctor as doctor_stage
from rsvc_cli.store.lock import HOST

LONG_AGO = time.time() - 7200  # older than every grace period of the lock and table rules

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("doctor"))


def write_lock(path, pid, host=HOST):
    path.write_text(json.dumps({"host": host, "pid": pid, "time": time.time()}))
    return path


def litter(store):
    """Every kind of leftover, by what `clean=true` must do with it (True: remove)."""
    activations = sorted((store / "activations").glob("*.h5"))
    concepts = sorted((store / "concepts").glob("*.h5"))
    regression = next((store / "regression").glob("*.h5"))
    scores = next((store / "scores").glob("*.h5"))
    importance = sorted((store / "importance").glob("*.h5"))
    dead_pid = 2 ** 22 + 12345  # above Linux's default pid_max: never a live process

    out = {}
    # A killed writer: its partial and its lock (dead pid) stay behind.
    partial = store / "concepts" / "custom-features-semi_nmf3-0123456789abcdef.h5.partial"
    partial.write_bytes(concepts[0].read_bytes()[:500])
    out[partial] = True
    out[write_lock(store / "concepts" / "custom-features-semi_nmf3-0123456789abcdef.h5.lock", dead_pid)] = True
    # A partial with no lock at all.
    orphan = store / "activations" / "test_vit-blocks.1-00000000000000aa.h5.partial"
    orphan.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    out[orphan] = True
    # A live writer (this test process): its partial and lock are kept.
    live = store / "regression" / "m1-l1-vs-m2-l2-ridge-00000000000000bb.h5.partial"
    live.write_bytes(b"\x89HDF\r\n\x1a\n")
    out[live] = False
    out[write_lock(store / "regression" / "m1-l1-vs-m2-l2-ridge-00000000000000bb.h5.lock", os.getpid())] = False
    # An unreadable lock, old: its writer died between creating and writing it.
    empty_lock = store / "scores" / "a-vs-b-00000000000000cc.h5.lock"
    empty_lock.write_bytes(b"")
    os.utime(empty_lock, (LONG_AGO, LONG_AGO))
    out[empty_lock] = True
    # Damaged final names: truncated, another program's file, an older format, renamed by hand.
    data = activations[0].read_bytes()
    activations[0].write_bytes(data[: len(data) // 2])
    out[activations[0]] = True
    concepts[1].unlink()
    with h5py.File(concepts[1], "w") as f:
        f["weights"] = np.arange(3)
    out[concepts[1]] = True
    with h5py.File(importance[0], "a", locking=False) as f:
        f.attrs["format_version"] = 0
    out[importance[0]] = True
    renamed = regression.with_name(regression.name.rsplit("-", 1)[0] + "-ffffffffffffffff.h5")
    shutil.copy(regression, renamed)
    out[renamed] = True
    # A checkpoint being trained when the job died (no lock left).
    (store / "checkpoints").mkdir(exist_ok=True)
    checkpoint = store / "checkpoints" / "cifar_resnet20-00000000000000dd.pt.partial"
    checkpoint.write_bytes(b"PK")
    out[checkpoint] = True
    # Results-table temporaries: an old one is orphaned, a fresh one may be mid-write.
    old_table = scores.with_name(scores.stem + ".csv.999.partial")
    old_table.write_text("class,concept\n")
    os.utime(old_table, (LONG_AGO, LONG_AGO))
    out[old_table] = True
    fresh_table = scores.with_name(scores.stem + ".csv.998.partial")
    fresh_table.write_text("class,concept\n")
    out[fresh_table] = False
    untouched = [activations[1], concepts[0], regression, scores, importance[1]]
    return out, untouched


def doctor(store, *extra) -> dict:
    return doctor_stage.run(compose("doctor", f"store={store}", *extra))


EXPECTED_STATES = ("orphaned partial", "stale lock", "broken: cannot be read as HDF5",
                   "broken: is an HDF5 file but not",
                   "broken: was written in artifact format 0", "broken: its name does not match its key", "writing",
                   "locked")


def test_doctor_lists_every_problem_and_cleans_only_those(reference, tmp_path, capsys):
    store = copy_store(reference.store, tmp_path / "store")
    expected, untouched = litter(store)
    complete_before = {p: p.read_bytes() for p in untouched}
    before = snapshot(store)

    found = {f.path: f for f in doctor(store)["findings"]}
    for path, removable in expected.items():
        assert path in found, f"{path.name} is not listed"
        assert found[path].removable == removable, (path.name, found[path].state)
    for path in untouched:
        assert found[path].state == "complete" and not found[path].removable
    states = {f.state for f in found.values()}
    for state in EXPECTED_STATES:
        assert any(s.startswith(state) for s in states), f"{state!r} not among {states}"
    captured = capsys.readouterr()
    assert "10 problem(s)" in " ".join(captured.out.split())
    assert "rerun with clean=true" in " ".join(captured.err.split())
    assert snapshot(store) == before, "without clean=true the doctor changes nothing"

    removed = doctor(store, "clean=true")["removed"]
    assert sorted(removed) == sorted(path for path, removable in expected.items() if removable)
    for path, removable in expected.items():
        assert path.exists() != removable, f"{path.name}: {'kept' if path.exists() else 'removed'}"
    for path, data in complete_before.items():
        assert path.read_bytes() == data, f"complete artifact {path.name} was touched"
    assert sorted(artifacts(store)) == sorted(f"{p.parent.name}/{p.name}" for p in untouched)
    assert not [f for f in doctor(store)["findings"] if f.removable], "nothing left to clean"


@pytest.mark.subprocess
def test_doctor_after_a_real_kill_9_then_the_rerun_completes(reference, tmp_path):
    store = tmp_path / "store"
    wall0 = time.time()
    job = Watched.start_rsvc("compare", *FAST, f"store={store}", cwd=tmp_path)
    deadline = time.time() + 300
    while job.proc.poll() is None and not first_partial_since(store, wall0) and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)
    assert job.proc.poll() is None, "the run ended before it could be killed"
    job.kill()

    wide = subprocess_env(COLUMNS="250")  # one table row per file
    listing = run_rsvc("doctor", f"store={store}", cwd=tmp_path, console_script=True, env=wide)
    assert listing.returncode == 0, listing.stderr
    text = " ".join(listing.stdout.split())
    assert "orphaned partial" in text and "stale lock" in text, listing.stdout
    cleaned = run_rsvc("doctor", f"store={store}", "clean=true", cwd=tmp_path, console_script=True, env=wide)
    assert cleaned.returncode == 0, cleaned.stderr
    assert not list(store.rglob("*.partial")) and not list(store.rglob("*.lock"))


def test_doctor_on_a_missing_store_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["doctor", f"store={tmp_path / 'nowhere'}"])
    assert info.value.code == 2
    assert "does not exist" in " ".join(capsys.readouterr().err.split())

"""kill -9 at seeded random moments inside every stage of `rsvc compare`, then rerun.

Each chain starts from an empty store and runs the real CLI in a process of its own again and again
(forked from a warm process that has done the imports: reliability_helpers.WarmRsvc), each
run killed (SIGKILL: no handler, no flush) at a random moment inside one stage: extract (twice),
decompose, regress, score, importance, collage/report. The moment is drawn uniformly over the
stage's duration in an uninterrupted reference run (its first 60%, for timing jitter), counted
from the event that starts the stage in this run (the stage before it announcing its last
artifact, or, for extract, the first activations partial file being written), so kills land
inside stages however slow the machine. More chains: RSVC_KILL_SEEDS=0,1,...,9.

Kill points: the same, but at exact moments of the artifact protocol that random kills seldom
hit (before and after the rename of a finished partial, inside and right after taking a lock).

After every kill, every final-named artifact in the store is a complete artifact equal, value for
value, to the reference's (a truncated one is never read as complete). A last run completes, and
then the whole store equals the reference: every dataset and attribute (library versions aside),
the results table and the pixels of every collage and plot.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest

from reliability_helpers import (
    ARTIFACT_LINE,
    FAST,
    STAGE_ARTIFACTS,
    STAGE_KIND,
    STAGES,
    Watched,
    assert_all_artifacts_usable,
    assert_same_artifacts,
    first_partial_since,
    leftovers,
    reference_run,
    report_images,
    run_rsvc,
    stage_ends,
)

# Which stage each run of a chain aims at; 3 chains x 7 = 21 kills.
KILL_TARGETS = ("extract", "extract", "decompose", "regress", "score", "importance", "collage")
# More chains for a stress run: RSVC_KILL_SEEDS=0,1,2,3,4,5,6,7 pytest tests/reliability/test_kill.py
CHAIN_SEEDS = tuple(int(seed) for seed in os.environ.get("RSVC_KILL_SEEDS", "0,1,2").split(","))
POLL_SECONDS = 0.002
# Delays are drawn over this share of the stage's expected duration: score and decompose last a
# tenth of a second, and a run a little faster than expected would otherwise be past them.
DELAY_SHARE = 0.6
# A kill that lands past its stage (the machine got faster) is undone and tried again, the delay
# drawn over the duration that run just showed.
ATTEMPTS = 3

# pytest-xdist schedules each test on its own: a worker builds the reference once (tests/conftest.py).
XDIST_SPREAD = True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("kill"))


def run_and_kill(store, target: str, delay: float, cwd) -> tuple[str | None, Watched, float | None]:
    """Run compare; `delay` seconds after `target` starts, kill -9. Returns the stage in progress
    when the kill landed (None when the run finished first), the run, and when the target started."""
    wall0 = time.time()
    watched = Watched.start_rsvc("compare", *FAST, f"store={store}", cwd=cwd)
    anchor = None
    previous = STAGES[STAGES.index(target) - 1] if target != "extract" else None
    while watched.proc.poll() is None:
        now = time.monotonic() - watched.start
        if anchor is None:
            if previous is None:
                anchor = now if first_partial_since(store, wall0) else None
            else:
                anchor = stage_ends(list(watched.lines)).get(previous)
        if anchor is not None and now >= anchor + delay:
            watched.kill()
            ended = stage_ends(watched.lines)
            # None: every stage had ended (killed while the interpreter was shutting down).
            return next((stage for stage in STAGES if stage not in ended), None), watched, anchor
        time.sleep(POLL_SECONDS)
    code = watched.finish()
    assert code == 0, f"a run after kills failed (exit {code}):\n{watched.stderr()}"
    return None, watched, anchor


def computed_durations(lines, extract_start: float | None) -> dict[str, float]:
    """How long each stage this run computed (not reused) took, from its stderr."""
    out: dict[str, float] = {}
    counts: dict[str, int] = {}
    wrote: dict[str, bool] = {}
    previous_end, index = extract_start, 0
    for t, line in lines:
        if index == len(STAGES):
            break
        stage, match = STAGES[index], ARTIFACT_LINE.match(line)
        if match:
            kind = match.group(2)
            counts[kind] = counts.get(kind, 0) + 1
            wrote[kind] = wrote.get(kind, False) or match.group(1) == "wrote"
        if stage == "collage":
            ended, computed = line.startswith("report:"), True
        else:
            kind = STAGE_KIND[stage]
            ended, computed = bool(match) and counts.get(kind, 0) == STAGE_ARTIFACTS[stage], wrote.get(kind, False)
        if ended:
            if computed and previous_end is not None:
                out[stage] = t - previous_end
            previous_end, index = t, index + 1
    return out


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("chain_seed", CHAIN_SEEDS)
def test_kill_9_in_every_stage_then_rerun_gives_the_uninterrupted_artifacts(reference, tmp_path, chain_seed):
    rng = np.random.default_rng(chain_seed)
    store, saved = tmp_path / "store", tmp_path / "before-this-kill"
    durations = {stage: end - start for stage, (start, end) in reference.windows.items()}
    kills = []  # (aimed at, landed in)
    for trial, target in enumerate(KILL_TARGETS):
        for attempt in range(ATTEMPTS):
            shutil.rmtree(saved, ignore_errors=True)
            if store.exists():
                shutil.copytree(store, saved)
            delay = float(rng.uniform(0.0, DELAY_SHARE * durations[target]))
            hit, watched, anchor = run_and_kill(store, target, delay, tmp_path)
            kills.append((target, hit))
            where = f"chain {chain_seed}, kill {trial}.{attempt} aimed at {target} after {delay:.3f} s, landed in {hit}"
            # A final name always holds a complete artifact, and it is the uninterrupted run's.
            try:
                assert_all_artifacts_usable(store)
                assert_same_artifacts(store, reference.store, subset=True)
            except AssertionError as err:
                raise AssertionError(f"{where}: {err}\n{watched.stderr()}") from None
            durations.update(computed_durations(watched.lines, anchor if target == "extract" else None))
            if hit == target:
                break
            if hit is None or STAGES.index(hit) > STAGES.index(target):  # past the stage: undo, try again
                shutil.rmtree(store, ignore_errors=True)
                if saved.exists():
                    shutil.copytree(saved, store)

    final = run_rsvc("compare", *FAST, f"store={store}", cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert_same_artifacts(store, reference.store)
    assert leftovers(store) == [], "no partial file or lock survives a completed run"
    csv = sorted(store.glob("scores/*.csv"))
    assert [p.read_text() for p in csv] == [reference.store.joinpath("scores", p.name).read_text() for p in csv]
    ours, theirs = report_images(store), report_images(reference.store)
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours), "collage or plot pixels differ"
    assert list(store.glob("reports/*/index.html")), "the report was written"

    landed = {hit for _, hit in kills if hit is not None}
    print(f"chain {chain_seed}: {len(kills)} kills (aimed at, landed in): {kills}")
    assert len(kills) >= len(KILL_TARGETS)
    assert landed == set(STAGES), f"chain {chain_seed}: kills landed in {sorted(landed)} only: {kills}"


# (point, n): the n-th artifact of compare's order (activations 1, 2; concepts 3, 4; regression 5;
# scores 6; importance 7, 8) or the n-th lock taken, in the same order.
KILL_POINTS = [("before-rename", 1), ("before-rename", 5), ("after-rename", 3), ("empty-lock", 4), ("after-lock", 6)]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("point, nth", KILL_POINTS, ids=[f"{p}-{n}" for p, n in KILL_POINTS])
def test_kill_9_at_exact_points_of_the_artifact_protocol(reference, tmp_path, point, nth):
    store = tmp_path / "store"
    killed = run_rsvc("compare", *FAST, f"store={store}", cwd=tmp_path, killpoint=(point, nth))  # killpoints.py
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_all_artifacts_usable(store)
    assert_same_artifacts(store, reference.store, subset=True)
    final = run_rsvc("compare", *FAST, f"store={store}", cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert_same_artifacts(store, reference.store)
    assert leftovers(store) == [], "no partial file or lock survives a completed run"

"""Several processes on one store: one writer per artifact, the others wait and reuse, nothing corrupt.

Two levels: `produce` itself raced by four forked processes (cheap, exact count of writes), and four
whole `rsvc compare` runs of the same comparison started at once on one store.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsvc_cli.store.artifact import check_artifact, open_artifact

N_RACERS = 4
# Long enough that every racer reaches the lock while the first one is still writing.
WRITE_SECONDS = 0.5
ARTIFACT_KINDS = ("activations", "concepts", "regression", "scores", "importance")


def _race_produce(store: str, log: str, barrier, results) -> None:
    from rsvc_cli.stages.common import produce

    def write(f):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(WRITE_SECONDS)
        f.create_dataset("values", data=list(range(10)))

    barrier.wait()
    path = produce(Path(store), "scores", "race", {"kind": "scores", "what": "race"}, write)
    results.put(str(path))


def test_four_processes_producing_one_artifact_write_it_once(tmp_path):
    store, log = tmp_path / "store", tmp_path / "writes.log"
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(N_RACERS), context.Queue()
    racers = [context.Process(target=_race_produce, args=(str(store), str(log), barrier, results))
              for _ in range(N_RACERS)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
    assert [racer.exitcode for racer in racers] == [0] * N_RACERS
    paths = {results.get(timeout=5) for _ in range(N_RACERS)}
    assert len(paths) == 1, "every racer got the same artifact"
    assert len(log.read_text().split()) == 1, "exactly one racer computed it"
    path = Path(paths.pop())
    assert check_artifact(path, "scores", {"kind": "scores", "what": "race"}) is None
    with open_artifact(path, "scores") as f:
        assert list(f["values"][()]) == list(range(10))
    assert sorted(p.name for p in (store / "scores").iterdir()) == [path.name], "no lock or partial left behind"


def _race_results_table(path: str, barrier, n_writes: int) -> None:
    import numpy as np

    from rsvc_cli.stages.score import write_results_table

    similarity = {d: np.linspace(0, 1, 10) for d in ("2->1", "1->2", "1->1", "2->2")}
    unpredictable = {d: np.zeros(10, dtype=bool) for d in similarity}
    result = {"classes": {f"class{c}": {"similarity": similarity, "unpredictable": unpredictable, "cka": 0.5}
                          for c in range(20)}}
    barrier.wait()
    for _ in range(n_writes):
        write_results_table(Path(path), result)


def test_racing_jobs_of_one_comparison_all_write_the_results_table(tmp_path):
    """The table is written after the artifacts by every job of the comparison, at about the same time."""
    path = tmp_path / "results.csv"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(N_RACERS)
    racers = [context.Process(target=_race_results_table, args=(str(path), barrier, 100)) for _ in range(N_RACERS)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
    assert [racer.exitcode for racer in racers] == [0] * N_RACERS
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 20 * 2 * 10, "header + one row per class x concept x direction"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file left behind"


# Cheapest full comparison: timm's tiny test models, synthetic images, ridge regression; the report
# is kept on because its files are shared outputs too.
RACE_OVERRIDES = ["experiment=smoke", "importance.enabled=false", "regression=ridge", "decomposition.max_iter=50",
                  "batch_size=4"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_four_racing_compares_leave_the_store_consistent(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RSVC_PROGRESS": "0"}
    racers = [subprocess.Popen([sys.executable, "-m", "rsvc_cli", "compare", *RACE_OVERRIDES, f"store={store}"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(N_RACERS)]
    outputs = [racer.communicate(timeout=600) for racer in racers]
    for racer, (_, err) in zip(racers, outputs):
        assert racer.returncode == 0, err

    files = [p for kind in ARTIFACT_KINDS if (store / kind).is_dir() for p in (store / kind).iterdir()]
    leftovers = [p.name for p in store.rglob("*") if p.name.endswith((".lock", ".partial"))]
    assert not leftovers, f"locks or partial files left behind: {leftovers}"
    artifacts = [p for p in files if p.suffix == ".h5"]
    assert {p.parent.name for p in artifacts} >= {"activations", "concepts", "regression", "scores"}
    for path in artifacts:
        assert check_artifact(path, path.parent.name) is None, path

    # Each artifact written by exactly one racer; every racer ended with the same results table.
    writes = [m for _, err in outputs for m in re.findall(r"^wrote \w+ (\S+\.h5)$", err, flags=re.M)]
    assert sorted(writes) == sorted(map(str, artifacts)), "each artifact computed exactly once"
    tables = {re.search(r"^results table: (\S+)$", err, flags=re.M).group(1) for _, err in outputs}
    assert len(tables) == 1
    table = Path(tables.pop()).read_text()
    assert table.count("\n") > 1 and all(out.count("per class:") == 1 for out, _ in outputs)
    report = store.rglob("index.html")
    assert all(page.read_text().rstrip().endswith("</html>") for page in report)

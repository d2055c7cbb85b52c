"""rsvc doctor: check a store; list incomplete, orphaned or broken artifacts; clean them (clean=true).

What it looks at, per kind folder of the store (`activations/`, `concepts/`, ..., `checkpoints/`):
- `<name>.h5`: complete, or broken (truncated, foreign, another format or kind, not marked
  complete, or a name whose key is not the file's key: renamed or copied by hand);
- `<name>.partial`: being written (its lock is live), or orphaned (no lock, or a stale one: the
  writer was killed); a partial results table (`*.csv.*.partial`, written without a lock) is
  orphaned once it has not changed for a minute;
- `<name>.lock`: held by a live writer, or stale (its process is gone on this host, it is
  unreadable and old, or another host has not touched it for an hour).

`clean=true` removes orphaned partials, stale locks and broken files, each checked again just
before removal; it never touches a complete artifact, a live writer's partial or lock, or anything
that is not an rsvc store file. Run it when no job is writing to the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import PARTIAL_SUFFIX, check_artifact
from rsvc_cli.store.keys import KINDS
from rsvc_cli.store.lock import lock_is_stale, lock_path

KEY_DIGITS = 16
# A results table is written in well under this many seconds; an older partial one is orphaned.
TABLE_PARTIAL_GRACE_SECONDS = 60.0


@dataclass
class Finding:
    kind: str
    path: Path
    state: str  # complete | writing | locked | orphaned partial | stale lock | broken: <why>
    removable: bool


def run(cfg) -> dict:
    store = Path(str(cfg.store)).expanduser()
    if not store.is_dir():
        what = "is a file, not a store folder" if store.exists() else "does not exist"
        raise RsvcError(f"The store {store} {what}.", "Give the store folder to check with store=DIR.")
    findings = examine(store)
    problems = [f for f in findings if f.state not in ("complete", "writing", "locked")]
    rows = [(f.kind, f.path.name, f.state, "remove" if f.removable else "keep")
            for f in findings if f.state != "complete"]
    n_complete = sum(f.state == "complete" for f in findings)
    console.table(f"store {store}: {n_complete} complete artifacts, {len(problems)} problem(s)",
                  ["kind", "file", "state", "clean=true would"], rows or [("-", "-", "all complete", "-")])
    removed = []
    if bool(cfg.get("clean", False)):
        for finding in findings:
            if finding.removable and still_removable(finding):
                finding.path.unlink(missing_ok=True)
                removed.append(finding.path)
        console.say(f"removed {len(removed)} file(s); complete artifacts and live writers untouched")
    elif any(f.removable for f in findings):
        console.say(f"{sum(f.removable for f in findings)} file(s) can be removed: rerun with clean=true "
                    "(complete artifacts are never touched)")
    return {"findings": findings, "problems": problems, "removed": removed}


def examine(store: Path) -> list[Finding]:
    findings = []
    for kind in KINDS:
        folder = store / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            finding = examine_file(kind, path)
            if finding is not None:
                findings.append(finding)
    return findings


def examine_file(kind: str, path: Path) -> Finding | None:
    name = path.name
    if name.endswith(".h5"):
        problem = artifact_problem(kind, path)
        return Finding(kind, path, "complete" if problem is None else f"broken: {problem}", problem is not None)
    if name.endswith(".lock"):
        stale = lock_is_stale(path)
        return Finding(kind, path, "stale lock" if stale else "locked", stale)
    if name.endswith(PARTIAL_SUFFIX):
        target = path.with_name(name[: -len(PARTIAL_SUFFIX)])
        if target.suffix in (".h5", ".pt"):
            lock = lock_path(target)
            writing = lock.exists() and not lock_is_stale(lock)
        else:  # a results table's temporary file: no lock, written in a moment
            writing = _age(path) < TABLE_PARTIAL_GRACE_SECONDS
        return Finding(kind, path, "writing" if writing else "orphaned partial", not writing)
    if kind == "checkpoints" and name.endswith(".pt"):
        return Finding(kind, path, "complete", False)
    return None  # results tables, notes, anything else: not the doctor's business


def artifact_problem(kind: str, path: Path) -> str | None:
    problem = check_artifact(path, kind)
    if problem is not None:
        return problem[0]
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        key = str(f.attrs.get("key", ""))
    name_key = path.stem.rsplit("-", 1)[-1]
    if len(name_key) == KEY_DIGITS and not key.startswith(name_key):
        return "its name does not match its key (renamed or copied by hand?)"
    return None


def still_removable(finding: Finding) -> bool:
    """Check again right before removing: a writer may have come back since the listing."""
    if not finding.path.exists():
        return False
    again = examine_file(finding.kind, finding.path)
    return again is not None and again.removable


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0

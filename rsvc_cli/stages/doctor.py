"""rsvc doctor: check a store; list incomplete, orphaned or broken artifacts; clean them (clean=true).

Complete artifacts are never touched. Cleaning removes partial files whose writer is gone,
stale locks, and files under an artifact name that are not usable artifacts.
"""

from __future__ import annotations

from pathlib import Path

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.catalog import list_artifacts
from rsvc_cli.store.lock import lock_is_stale, lock_path


def run(cfg) -> dict:
    store = Path(str(cfg.store))
    if not store.is_dir():
        raise RsvcError(f"The store {store} does not exist.", "Give the store to check with store=DIR.")
    entries = list_artifacts(store)
    problems = [e for e in entries if e.state != "complete" and e.state != "locked"]
    removable = []
    for e in problems:
        if e.state == "partial":
            # A partial is resumable only while its writer may come back; one with no live lock is orphaned.
            lock = lock_path(e.path.with_name(e.path.name[: -len(".partial")]))
            if lock.exists() and not lock_is_stale(lock):
                continue
        removable.append(e)
    console.table(f"store {store}: {len(entries)} files, {len(problems)} need attention",
                  ["kind", "file", "state"], [(e.kind, e.path.name, e.state) for e in problems] or [("-", "-", "all complete")])
    cleaned = []
    if bool(cfg.get("clean", False)):
        for e in removable:
            e.path.unlink(missing_ok=True)
            cleaned.append(e.path)
        console.say(f"removed {len(cleaned)} file(s); complete artifacts untouched")
    elif removable:
        console.say(f"{len(removable)} file(s) can be removed: rerun with clean=true")
    return {"entries": entries, "problems": problems, "removed": cleaned}

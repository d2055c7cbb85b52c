"""What a store holds: complete, partial (resumable), locked, and broken artifacts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rsvc_cli.store.artifact import PARTIAL_SUFFIX, check_artifact
from rsvc_cli.store.keys import KINDS
from rsvc_cli.store.lock import lock_is_stale


@dataclass
class Entry:
    kind: str
    path: Path
    state: str  # complete | partial | locked | stale-lock | broken: <why>
    size: int


def list_artifacts(store: Path) -> list[Entry]:
    entries = []
    for kind in KINDS:
        folder = Path(store) / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.endswith(".h5"):
                problem = check_artifact(path, kind)
                state = "complete" if problem is None else f"broken: {problem[0]}"
            elif path.name.endswith(".h5" + PARTIAL_SUFFIX):
                state = "partial"
            elif path.name.endswith(".lock"):
                state = "stale-lock" if lock_is_stale(path) else "locked"
            else:
                continue
            entries.append(Entry(kind, path, state, path.stat().st_size if path.exists() else 0))
    return entries

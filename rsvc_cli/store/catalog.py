"""What a store holds: complete, partial (resumable), locked, and broken artifacts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import json

from rsvc_cli.store.artifact import PARTIAL_SUFFIX, _open_h5, check_artifact
from rsvc_cli.store.keys import KINDS
from rsvc_cli.store.lock import lock_is_stale


@dataclass
class Entry:
    kind: str
    path: Path
    state: str  # complete | partial | locked | stale-lock | broken: <why>
    size: int
    settings: dict = field(default_factory=dict)  # a complete artifact's content config, flattened


def flatten(config, prefix: str = "") -> dict:
    """{"model": {"name": "x"}} -> {"model.name": "x"}; lists stay values."""
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    out = {}
    for key, value in config.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def read_settings(path: Path) -> dict:
    with _open_h5(path, "r") as f:
        raw = f.attrs.get("config", "{}")
    return flatten(json.loads(raw.decode() if isinstance(raw, bytes) else raw))


def differing(entries: list[Entry]) -> list[str]:
    """The settings whose values differ between complete artifacts of one kind: what tells them apart."""
    keys = sorted({k for e in entries for k in e.settings})
    return [k for k in keys if len({json.dumps(e.settings.get(k), sort_keys=True) for e in entries}) > 1]


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
            settings = read_settings(path) if state == "complete" else {}
            entries.append(Entry(kind, path, state, path.stat().st_size if path.exists() else 0, settings))
    return entries

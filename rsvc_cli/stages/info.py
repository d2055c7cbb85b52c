"""rsvc info: describe one artifact (path=FILE), or list a store's artifacts (store=DIR)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import FORMAT, read_attrs
from rsvc_cli.store.catalog import list_artifacts


def run(cfg) -> dict:
    if cfg.path:
        return describe(Path(str(cfg.path)))
    rows = list_artifacts(Path(str(cfg.store)))
    console.table(f"store {cfg.store}", ["kind", "file", "state", "size MB"],
                  [(r.kind, r.path.name, r.state, f"{r.size / 1e6:.2f}") for r in rows])
    return {"artifacts": rows}


def show_provenance(provenance: dict) -> None:
    from rsvc_cli.stages.provenance import provenance_rows, random_weights_banner

    banner = random_weights_banner(provenance)
    if banner:
        console.say(f"[bold yellow]{banner}[/bold yellow]")
    console.table("provenance (what made these numbers)", ["", "value"], list(provenance_rows(provenance).items()))


def describe(path: Path) -> dict:
    if not path.exists():
        raise RsvcError(f"{path} does not exist.", "Give path=FILE of an .h5 artifact (rsvc info store=DIR lists them).")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError:
        raise RsvcError(f"{path} cannot be read as HDF5 (truncated, still being written, or not HDF5).",
                        "If it is an rsvc artifact, delete it so it is recomputed (`rsvc doctor clean=true`).") from None
    with f:
        attrs = read_attrs(f)
        if attrs.get("rsvc_format") != FORMAT:
            raise RsvcError(f"{path} is an HDF5 file but not an rsvc artifact.", "rsvc info describes files rsvc wrote.")
        datasets = []
        f.visititems(lambda name, obj: datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
        provenance = attrs.pop("provenance", None)
        console.table(f"{path.name}", ["attribute", "value"],
                      [(k, json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v))
                       for k, v in attrs.items()])
        if provenance is not None:
            attrs["provenance"] = provenance = json.loads(provenance)
            show_provenance(provenance)
        console.table("datasets", ["name", "shape", "dtype", "dims"],
                      [(n, "x".join(map(str, d.shape)) or "scalar", str(d.dtype), str(d.attrs.get("dims", "")))
                       for n, d in datasets[:200]])
        return {"attrs": attrs, "datasets": {n: (d.shape, str(d.dtype)) for n, d in datasets}}

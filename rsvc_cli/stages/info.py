"""rsvc info: describe one artifact (path=FILE), or list a store (store=DIR): its reports, then its
artifacts by kind, each with the settings that tell it apart from the others of its kind."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import h5py

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import FORMAT, read_attrs
from rsvc_cli.store.catalog import differing, list_artifacts


def run(cfg) -> dict:
    if cfg.path:
        return describe(Path(str(cfg.path)))
    store = Path(str(cfg.store)).expanduser()
    rows = list_artifacts(store)
    comparisons = [comparison_row(store, r) for r in rows if r.kind == "scores" and r.state == "complete"]
    if comparisons:
        console.table(f"comparisons in {store}", ["model 1", "layer 1", "model 2", "layer 2", "k", "alpha",
                                                    "evaluation", "date", "report (in the store)"], comparisons)
    for kind in dict.fromkeys(r.kind for r in rows):
        group = [r for r in rows if r.kind == kind]
        apart = differing([r for r in group if r.state == "complete"])
        console.table(f"{kind} ({len(group)})", ["file", "state", "size MB", "settings that tell them apart"],
                      [(r.path.name, r.state, f"{r.size / 1e6:.2f}",
                        "  ".join(f"{k}={short(r.settings.get(k))}" for k in apart)) for r in group])
    if not rows:
        console.say(f"{store} holds no artifacts.")
    return {"artifacts": rows, "comparisons": comparisons}


def show_provenance(provenance: dict) -> None:
    from rsvc_cli.stages.provenance import provenance_rows, random_weights_banner

    banner = random_weights_banner(provenance)
    if banner:
        console.say(f"[bold yellow]{banner}[/bold yellow]")
    console.table("provenance (what made these numbers)", ["", "value"], list(provenance_rows(provenance).items()))


def comparison_row(store: Path, entry) -> tuple:
    """One scores artifact as a comparison: models, layers, concepts per class, regression alpha, evaluation,
    when it was scored, and its report (named like the scores artifact, relative to the store) if one
    was written."""
    s = entry.settings
    side = lambda n, key: s.get(f"regression.concepts{n}.activations.{key}")  # noqa: E731
    report = store / "reports" / entry.path.stem / "index.html"
    return (side(1, "model.name"), side(1, "layer"), side(2, "model.name"), side(2, "layer"),
            s.get("regression.concepts1.decomposition.n_concepts"), s.get("regression.regression.alpha"),
            s.get("evaluation"), datetime.fromtimestamp(entry.path.stat().st_mtime).strftime("%Y-%m-%d %H:%M"),
            str(report.relative_to(store)) if report.is_file() else "none")


def short(value) -> str:
    """A setting for a table cell: digests (checkpoint files, upstream keys) cut to 12 characters."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:12] + "…" if isinstance(value, str) and len(text) > 24 and " " not in text else text


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

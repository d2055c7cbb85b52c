"""rsvc summarize: layer x layer matrices over every pair of layers scored in a store (method step 9).

For each model pair found in `<store>/scores/`: the mean-max concept correlation (mean of the
row maxima and of the column maxima of the k x k Pearson table, averaged over the two and over
classes) and the mean regression similarity (2->1 and 1->2 averaged over concepts and classes),
laid out layer1 x layer2 in depth order, as heatmap PNGs and CSV tables.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.stages.common import store_dir
from rsvc_cli.stages.score import read_scores, summary_numbers
from rsvc_cli.store.artifact import check_artifact

MEASURES = {"mean_max_correlation": "mean max concept correlation",
            "regression_similarity": "mean regression similarity (2->1, 1->2)"}


def natural_key(name: str):
    """layer2 < layer10, blocks.2 < blocks.10: the order layers have in a network."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def collect(store: Path) -> dict:
    """{(model1, model2): {(layer1, layer2): {measure: value}}} over complete scores artifacts."""
    pairs: dict = {}
    for path in sorted((store / "scores").glob("*.h5")):
        if check_artifact(path, "scores") is not None:
            continue
        result = read_scores(path)
        config = json.loads(result["config"])
        reg = config["regression"]
        a1, a2 = reg["concepts1"]["activations"], reg["concepts2"]["activations"]
        s = summary_numbers(result)
        key = (a1["model"]["name"], a2["model"]["name"])
        pairs.setdefault(key, {})[(a1["layer"], a2["layer"])] = {
            "mean_max_correlation": s["mean_max_correlation"],
            "regression_similarity": float(np.nanmean([s["2->1"], s["1->2"]])),
            "cka": s["cka"],
        }
    return pairs


def run(cfg) -> dict:
    from rsvc_cli.viz.plots import plot_layer_heatmap

    store = store_dir(cfg)
    pairs = collect(store)
    if not pairs:
        raise RsvcError(f"No complete scores artifacts in {store}/scores, so there is nothing to summarize.",
                        "Run `rsvc compare ... store=DIR` (or a sweep with -m) first, with the same store=DIR.")
    out_dir = Path(str(cfg.out)) if cfg.out else store / "summary"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for (model1, model2), cells in pairs.items():
        layers1 = sorted({l1 for l1, _ in cells}, key=natural_key)
        layers2 = sorted({l2 for _, l2 in cells}, key=natural_key)
        stem = f"{model1}-vs-{model2}".replace("/", "_")
        for measure, label in MEASURES.items():
            matrix = np.full((len(layers1), len(layers2)), np.nan)
            for (l1, l2), values in cells.items():
                matrix[layers1.index(l1), layers2.index(l2)] = values[measure]
            png = plot_layer_heatmap(out_dir / f"{stem}-{measure}.png", f"{model1} (rows) vs {model2} (columns)",
                                     matrix, layers1, layers2, colorbar_label=label)
            table = out_dir / f"{stem}-{measure}.csv"
            with open(table, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow([f"{model1} \\ {model2}", *layers2])
                w.writerows([[l1, *[f"{v:.6g}" for v in row]] for l1, row in zip(layers1, matrix)])
            console.table(f"{label}: {model1} (rows) vs {model2} (columns)", ["layer", *layers2],
                          [(l1, *row.tolist()) for l1, row in zip(layers1, matrix)])
            written[(model1, model2, measure)] = {"png": png, "csv": table, "matrix": matrix,
                                                  "layers1": layers1, "layers2": layers2}
            console.say(f"heatmap: {png}")
    return written

"""rsvc summarize: layer x layer matrices over every pair of layers scored in a store (method step 9).

For each comparison found in `<store>/scores/` (a model pair with the same images, patches, concept
and regression settings; only the layers vary): the mean-max concept correlation (mean of the row
maxima and of the column maxima of the k x k Pearson table, averaged over the two and over classes)
and the mean regression similarity (over concepts and classes: "2->1" and "1->2" averaged, and each
direction on its own), laid out layer1 x layer2 in depth order, as heatmap PNGs and CSV tables.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import numpy as np

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.stages.common import store_dir
from rsvc_cli.stages.score import read_scores, scores_revision, summary_numbers
from rsvc_cli.store.artifact import check_artifact
from rsvc_cli.store.catalog import flatten
from rsvc_cli.store.keys import REVISIONS, content_key

# measure -> (what it is, the heatmap's title, its colour bar)
MEASURES = {"mean_max_correlation": ("mean max concept correlation", "mean max concept correlation",
                                     "mean max correlation"),
            "regression_similarity": ("mean regression similarity (2->1, 1->2)", "similarity, 2->1 and 1->2",
                                      "mean Pearson r"),
            "similarity_2to1": ("mean similarity 2->1 (model 2 predicts model 1's concepts)",
                                "similarity 2->1 (2 predicts 1)", "mean Pearson r"),
            "similarity_1to2": ("mean similarity 1->2 (model 1 predicts model 2's concepts)",
                                "similarity 1->2 (1 predicts 2)", "mean Pearson r")}
# Digits of the settings digest that tell apart comparisons of one model pair with other settings.
SETTINGS_DIGITS = 8


def natural_key(name: str):
    """layer2 < layer10, blocks.2 < blocks.10: the order numbered layers have in a network."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def module_order(model_identity: dict) -> list[str] | None:
    """The model's module names in definition order (its depth order), or None if it cannot be built here."""
    try:
        import torch

        from rsvc_cli.models.hooks import layer_names_of
        from rsvc_cli.models.registry import make_model

        with torch.device("meta"):  # the architecture only: no weights are made or loaded
            loaded = make_model(model_identity["name"], target=model_identity.get("target"),
                                num_classes=model_identity.get("num_classes"), kwargs=model_identity.get("kwargs") or {})
        return layer_names_of(loaded.module)
    except Exception:  # noqa: BLE001 - an unimportable custom model: fall back to the names
        return None


def depth_order(layers: set[str], model_identity: dict) -> list[str]:
    order = module_order(model_identity)
    if order is not None and set(layers) <= set(order):
        return sorted(layers, key=order.index)
    return sorted(layers, key=natural_key)


def comparison_settings(config: dict) -> tuple[dict, dict, str, str, str]:
    """(model1 identity, model2 identity, layer1, layer2, digest of every setting except the layers)."""
    regression = config["regression"]
    a1, a2 = regression["concepts1"]["activations"], regression["concepts2"]["activations"]
    settings = copy.deepcopy(config)
    for n in (1, 2):
        settings["regression"][f"concepts{n}"]["activations"].pop("layer")
    return a1["model"], a2["model"], a1["layer"], a2["layer"], content_key(settings)


def settings_without_layers(config: dict) -> dict:
    """A scores config's settings, flattened, with the layers (which vary inside one comparison) left out."""
    return {k: v for k, v in flatten(config).items() if not k.endswith(".activations.layer")}


def differing_titles(comparisons: dict) -> dict:
    """{comparison key: "alpha=0.05, n_concepts=5"}: for a model pair compared with several settings,
    the settings in which its groups differ (each named by its last part, or its whole path if ambiguous)."""
    titles = {}
    for key, entry in comparisons.items():
        same_pair = [e["settings"] for k, e in comparisons.items() if k[:2] == key[:2]]
        if len(same_pair) < 2:
            continue
        keys = sorted({k for settings in same_pair for k in settings})
        apart = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in same_pair}) > 1]
        # Upstream configs repeat a setting (concepts1 and concepts2 both hold n_concepts): say it once.
        shown = {}
        for k in apart:
            name = k.rpartition(".")[2]
            shown.setdefault(name, json.dumps(entry["settings"].get(k)))
        titles[key] = ", ".join(f"{name}={value}" for name, value in shown.items())
    return titles


def collect(store: Path) -> dict:
    """{(model1, model2, settings digest): {"models": (identity1, identity2), "settings": flat settings,
    "cells": {(layer1, layer2): measures}}}."""
    comparisons: dict = {}
    stale = 0
    for path in sorted((store / "scores").glob("*.h5")):
        if check_artifact(path, "scores") is not None:
            continue
        # Scores of older code mean other things (see store.keys.REVISIONS): never mixed in.
        if scores_revision(path) != REVISIONS["scores"]:
            stale += 1
            continue
        result = read_scores(path)
        config = json.loads(result["config"])
        model1, model2, layer1, layer2, settings = comparison_settings(config)
        s = summary_numbers(result)
        entry = comparisons.setdefault((model1["name"], model2["name"], settings),
                                       {"models": (model1, model2), "cells": {},
                                        "settings": settings_without_layers(config)})
        entry["cells"][(layer1, layer2)] = {
            "mean_max_correlation": s["mean_max_correlation"],
            "regression_similarity": float(np.nanmean([s["2->1"], s["1->2"]])),
            "similarity_2to1": s["2->1"],
            "similarity_1to2": s["1->2"],
            "cka": s["cka"],
        }
    if stale:
        console.say(f"skipped {stale} scores artifacts made by older rsvc code; rerun their comparisons to include them")
    return comparisons


def run(cfg) -> dict:
    """Heatmaps and tables; returns {(model1, model2, measure): {png, csv, matrix, layers1, layers2}}, keyed
    (model1, model2, settings digest[:8], measure) instead where a store holds one pair with several settings."""
    from rsvc_cli.viz.plots import plot_layer_heatmap

    store = store_dir(cfg)
    comparisons = collect(store)
    if not comparisons:
        raise RsvcError(f"No complete scores artifacts in {store}/scores, so there is nothing to summarize.",
                        "Run `rsvc compare ... store=DIR` (or a sweep with -m) first, with the same store=DIR.")
    out_dir = Path(str(cfg.out)) if cfg.out else store / "summary"
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(m1, m2) for m1, m2, _ in comparisons]
    titles = differing_titles(comparisons)
    written = {}
    for (model1, model2, settings), entry in comparisons.items():
        cells = entry["cells"]
        layers1 = depth_order({l1 for l1, _ in cells}, entry["models"][0])
        layers2 = depth_order({l2 for _, l2 in cells}, entry["models"][1])
        stem = f"{model1}-vs-{model2}".replace("/", "_")
        # One model pair compared with several settings in one store: the files say which is which.
        several = pairs.count((model1, model2)) > 1
        if several:
            stem += f"-{settings[:SETTINGS_DIGITS]}"
        differs = f" ({titles[(model1, model2, settings)]})" if several else ""
        for measure, (label, title, colorbar) in MEASURES.items():
            matrix = np.full((len(layers1), len(layers2)), np.nan)
            for (l1, l2), values in cells.items():
                matrix[layers1.index(l1), layers2.index(l2)] = values[measure]
            png = plot_layer_heatmap(out_dir / f"{stem}-{measure}.png", title + differs, matrix, layers1, layers2,
                                     colorbar_label=colorbar, row_title=f"model 1: {model1}",
                                     col_title=f"model 2: {model2}")
            table = out_dir / f"{stem}-{measure}.csv"
            with open(table, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow([f"{model1} \\ {model2}", *layers2])
                w.writerows([[l1, *[f"{v:.6g}" for v in row]] for l1, row in zip(layers1, matrix)])
            console.table(f"{label}: {model1} (rows) vs {model2} (columns){differs}", ["layer", *layers2],
                          [(l1, *row.tolist()) for l1, row in zip(layers1, matrix)])
            key = (model1, model2, settings[:SETTINGS_DIGITS], measure) if several else (model1, model2, measure)
            written[key] = {"png": png, "csv": table, "matrix": matrix, "layers1": layers1, "layers2": layers2}
            console.say(f"heatmap: {png}")
    return written

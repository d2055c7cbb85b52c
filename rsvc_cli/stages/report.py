"""rsvc report: one self-contained folder (index.html + images) per comparison.

Collects the scores, importance, best match and (planted squares only) square content of every concept,
the per-class figure (similarity against importance, one panel per model) and the collages, and hands
them to `viz.report.write_report`. Opens offline from disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsvc_cli.stages.collage import collage, comparison_dir, _slug
from rsvc_cli.stages.regress import prepare_pair, regress
from rsvc_cli.stages.score import CROSS, SELF, score


def run(cfg) -> Path:
    from rsvc_cli.stages import importance as importance_stage

    pair = prepare_pair(cfg)
    result = score(pair, cfg, regress(pair, cfg))
    if cfg.importance.enabled:
        result["importance"] = importance_stage.importance(pair, cfg, result)
    result["collages"] = collage(pair, cfg, result) if cfg.collage.enabled else {}
    path = report(pair, cfg, result)
    from rsvc_cli import console

    console.say(f"[bold]report:[/bold] {path}")
    return path


def _number(value):
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def best_matches(correlation: np.ndarray, owner: int) -> list[tuple[int, float] | None]:
    """For each concept of model ``owner``, the other model's concept it correlates with most (on common
    patches, the scores' concept-correlation table: rows model 1, columns model 2) and that correlation;
    None where the concept's correlations are all undefined."""
    table = np.asarray(correlation, dtype=np.float64)
    table = table if owner == 1 else table.T
    matches = []
    for row in table:
        finite = np.isfinite(row)
        if not finite.any():
            matches.append(None)
            continue
        best = int(np.nanargmax(np.where(finite, row, -np.inf)))
        matches.append((best, float(row[best])))
    return matches


def class_panels(result: dict, name: str, labels: dict, importance: dict) -> list[dict]:
    """The two panels (one per model) of a class's similarity-against-importance figure."""
    sims = result["classes"][name]["similarity"]
    panels = []
    for owner, other in ((1, 2), (2, 1)):
        k = len(sims[CROSS[owner]])
        values = [importance.get((name, f"model{owner}", j), {}).get("importance") for j in range(k)]
        panels.append({"name": labels[f"model{owner}"], "predictor": labels[f"model{other}"],
                       "direction": CROSS[owner], "similarity": sims[CROSS[owner]],
                       "self_similarity": sims[SELF[owner]],
                       "importance": None if not importance else [np.nan if v is None else v for v in values]})
    return panels


def report(pair, cfg, result: dict) -> Path:
    from rsvc_cli.stages.naming import direction_text, model_labels
    from rsvc_cli.viz.plots import write_class_concepts_svg
    from rsvc_cli.stages.provenance import provenance_rows, random_weights_banner, read_provenance
    from rsvc_cli.viz.report import write_report

    out = comparison_dir(cfg, result)
    labels = result.get("labels") or model_labels(cfg)
    importance = result.get("importance") or {}
    planted = "square_content" in result
    square = result.get("square_content") or {}
    x_axis = "importance" if importance else "self baseline (importance disabled)"
    classes = []
    for name in result["class_names"]:
        if name not in result["classes"]:
            continue
        c = result["classes"][name]
        sims = c["similarity"]
        plot = Path("plots") / f"{_slug(name)}_concepts.svg"
        write_class_concepts_svg(out / plot, f"{name}: similarity against {x_axis}",
                                 class_panels(result, name, labels, importance))
        concepts = []
        for owner, other in ((1, 2), (2, 1)):
            matches = best_matches(c["concept_correlation"], owner)
            for k in range(len(sims[CROSS[owner]])):
                key = (name, f"model{owner}", k)
                paths = result.get("collages", {}).get(key, {})
                match = matches[k] if k < len(matches) else None
                concept = {
                    "owner": f"model{owner}", "concept": k, "direction": CROSS[owner],
                    "similarity": _number(sims[CROSS[owner]][k]), "self_similarity": _number(sims[SELF[owner]][k]),
                    "unpredictable": bool(c["unpredictable"][CROSS[owner]][k]),
                    "best_match": None if match is None else {"owner": f"model{other}", "concept": match[0],
                                                              "correlation": _number(match[1])},
                    "importance": _number(importance.get(key, {}).get("importance")),
                    "collages": {kind: paths[kind] for kind in ("top", "over", "under") if kind in paths},
                    "heatmap": paths.get("heatmap"),
                    "heatmap_image": paths.get("heatmap_image"),
                    "heatmap_max": paths.get("heatmap_max"),
                }
                if planted:  # only a comparison with planted squares has square content
                    concept["square_content"] = _number(square.get(key))
                concepts.append(concept)
        classes.append({"name": name, "plots": [str(plot)], "concepts": concepts})
    p = result.get("pair", {})
    meta = {"store": str(cfg.store), "scores artifact": str(result["path"]), "evaluation": result.get("evaluation"),
            "decomposition": f"{cfg.decomposition.method}, {cfg.decomposition.n_concepts} concepts",
            "regression": f"{cfg.regression.method} (alpha {cfg.regression.alpha}), {cfg.regression.n_folds} folds"}
    check = result.get("planted")
    if check is not None:
        concept, rates = check["square_concept"], check["shortcut"]
        meta["planted-concept experiment"] = (
            f"{'PASSED' if check['passed'] else 'FAILED'}: class {check['planted_class']}, model 1's lowest concept "
            f"{concept['concept']} has similarity {concept['similarity']:.3f} (median of square-free concepts "
            f"{concept['square_free_median']:.3f}) and square content {concept['square_content']:.2f}; other-class "
            f"images called {check['planted_class']} with/without the square: model 1 "
            f"{rates['model1']['with']:.0%}/{rates['model1']['without']:.0%}, model 2 "
            f"{rates['model2']['with']:.0%}/{rates['model2']['without']:.0%}")
    provenance = read_provenance(result["path"]) or {}
    return write_report(out, {
        "banner": random_weights_banner(provenance),
        "provenance": provenance_rows(provenance) if provenance else None,
        "title": f"{labels['model1']} {p.get('layer1')} vs {labels['model2']} {p.get('layer2')}",
        "subtitle": f"RSVC: which concepts each model shares, and which it has alone. "
                    f"{direction_text(labels, '2->1')}; {direction_text(labels, '1->2')}.",
        "meta": meta,
        "labels": labels,
        "models": {"model1": f"{labels['model1']} · {p.get('layer1')}", "model2": f"{labels['model2']} · {p.get('layer2')}"},
        "classes": classes,
        "layer_heatmaps": [],
    })

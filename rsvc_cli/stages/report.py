"""rsvc report: one self-contained folder (index.html + images) per comparison.

Collects the scores, importance and square content of every concept, the per-class similarity
plots and the collages, and hands them to `viz.report.write_report`. Opens offline from disk.
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


def report(pair, cfg, result: dict) -> Path:
    from rsvc_cli.viz.plots import write_class_similarities_svg
    from rsvc_cli.stages.provenance import provenance_rows, random_weights_banner, read_provenance
    from rsvc_cli.viz.report import write_report

    out = comparison_dir(cfg, result)
    importance = result.get("importance") or {}
    square = result.get("square_content") or {}
    classes = []
    for name in result["class_names"]:
        if name not in result["classes"]:
            continue
        c = result["classes"][name]
        sims = c["similarity"]
        plot = Path("plots") / f"{_slug(name)}_similarity.svg"
        write_class_similarities_svg(
            out / plot, f"{name}: concept similarity", {d: sims[d] for d in ("2->1", "1->1", "1->2", "2->2")}
        )
        concepts = []
        for owner in (1, 2):
            for k in range(len(sims[CROSS[owner]])):
                key = (name, f"model{owner}", k)
                paths = result.get("collages", {}).get(key, {})
                concepts.append({
                    "owner": f"model{owner}", "concept": k, "direction": CROSS[owner],
                    "similarity": _number(sims[CROSS[owner]][k]), "self_similarity": _number(sims[SELF[owner]][k]),
                    "unpredictable": bool(c["unpredictable"][CROSS[owner]][k]),
                    "reverse_similarity": None,
                    "importance": _number(importance.get(key, {}).get("importance")),
                    "square_content": _number(square.get(key)),
                    "collages": {kind: paths[kind] for kind in ("top", "over", "under") if kind in paths},
                    "heatmap": paths.get("heatmap"),
                })
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
        "title": f"{p.get('model1')} {p.get('layer1')} vs {p.get('model2')} {p.get('layer2')}",
        "subtitle": "RSVC: which concepts each model shares, and which it has alone. "
                    "\"2->1\": model 2 predicts model 1's concept.",
        "meta": meta,
        "models": {"model1": f"{p.get('model1')} {p.get('layer1')}", "model2": f"{p.get('model2')} {p.get('layer2')}"},
        "classes": classes,
        "layer_heatmaps": [],
    })

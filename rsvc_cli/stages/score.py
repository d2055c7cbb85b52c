"""rsvc score: per-concept similarity and the layer-level summaries (method steps 5 and 9).

For every class and direction, the similarity of a concept is the Pearson correlation between
its true coefficients and the cross-fitted prediction on the evaluation set (or, with
`regression.evaluation=crossval`, on the held-out folds of the regression set). A concept the
other model cannot predict at all (constant prediction: the lasso kept no weight) scores 0 and is
flagged `unpredictable`; it counts in every mean and ranks among the lowest. Only a concept whose
true coefficients are constant on the scored patches is undefined (NaN), and the undefined are
counted wherever means are shown (`metrics.concept_similarity`). Also: the k x k
concept-correlation table between the two models on common patches with its mean row and
column maxima, and debiased linear CKA between the two layers.

How sure each number is (DESIGN.md, "Trust"): `score.n_resamples` bootstrap resamples of each
class's scored images (with their patches; classes independently, seeded by `score.seed` and the
class's position) give percentile intervals for every similarity, its gap to the self baseline
(self minus cross on the same resamples), class and overall means and mean max concept
correlation, and one call per concept (`algorithms.bootstrap.concept_calls`). All of it comes
from the stored regression, so changing only `score.*` reruns this stage alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import open_artifact, read_strings, write_array
from rsvc_cli.store.keys import REVISIONS, stage_content
from rsvc_cli.stages.common import produce, resolve_device, store_dir
from rsvc_cli.stages.decompose import read_activations
from rsvc_cli.stages.naming import direction_text, model_labels
from rsvc_cli.stages.provenance import write_provenance
from rsvc_cli.stages.regress import DIRECTIONS, direction_group, prepare_pair, read_regression, regress, regression_content, regression_params

# Debiased CKA needs 4 samples; Pearson on fewer is noise.
MIN_SCORED_PATCHES = 4
OWNER = {direction: owner for direction, (_, owner) in DIRECTIONS.items()}
SELF = {1: "1->1", 2: "2->2"}
CROSS = {1: "2->1", 2: "1->2"}


def run(cfg) -> dict:
    pair = prepare_pair(cfg)
    return score(pair, cfg, regress(pair, cfg))


class Scored(NamedTuple):
    """What one direction's similarities in one class are computed from: (n, k) arrays."""

    true: np.ndarray  # the owner's concept coefficients
    predicted: np.ndarray  # their cross-fitted prediction from the predictor's activations
    folds: np.ndarray | None  # (n,) fold of each row for held-out-fold predictions; None on the evaluation set


def scored_coefficients(entry: dict, evaluation: str) -> dict[str, Scored]:
    """Per direction, the true and predicted coefficients a class's similarities are computed from
    (one regression-artifact class entry; `regression.evaluation` heldout or crossval)."""
    if evaluation == "heldout":
        return {direction: Scored(entry[f"coefficients{owner}_evaluation"], entry[direction]["evaluation_prediction"], None)
                for direction, owner in OWNER.items()}
    return {direction: Scored(entry[f"coefficients{owner}_regression"], entry[direction]["held_out_prediction"], entry["fold"])
            for direction, owner in OWNER.items()}


def similarity_of(scored: Scored, device="cpu"):
    """`metrics.concept_similarity` of one direction: (similarity, unpredictable, undefined), (k,) each."""
    from rsvc_cli.algorithms.metrics import concept_similarity

    folds = None if scored.folds is None else torch.from_numpy(np.asarray(scored.folds)).to(device)
    return concept_similarity(_float64(scored.true, device), _float64(scored.predicted, device), folds)


def _float64(array, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, torch.float64)


def scores_content(reg_content: dict, evaluation: str, settings: dict | None = None) -> dict:
    """The scores' content config; ``settings`` (`score.*`) key the intervals and calls. Without
    them it names the point similarities only: what importance depends on, so changing
    `score.*` never recomputes importance. (Adding the `intervals` field changed every scores key,
    so artifacts without intervals are never read as current: no revision bump needed.)"""
    fields = {"regression": reg_content, "evaluation": evaluation}
    if settings is not None:
        fields["intervals"] = settings
    return stage_content("scores", **fields)


def score_settings(cfg) -> dict:
    """`score.*` as plain values, checked: the bootstrap and the call thresholds."""
    s = cfg.score
    settings = {"n_resamples": int(s.n_resamples), "confidence": float(s.confidence), "seed": int(s.seed),
                "specific_gap": float(s.specific_gap), "shared_gap": float(s.shared_gap), "min_self": float(s.min_self)}
    if settings["n_resamples"] < 10:
        raise RsvcError(f"score.n_resamples={settings['n_resamples']} is too few resamples for an interval.",
                        "Use at least 10 (1000, the default, gives stable 95 % bounds).")
    if not 0 < settings["confidence"] < 1:
        raise RsvcError(f"score.confidence={settings['confidence']} is not a confidence level.",
                        "Use a number between 0 and 1, e.g. score.confidence=0.95.")
    return settings


def class_intervals(g, scored: dict, u1, u2, image_row: np.ndarray, settings: dict, position: int, t) -> dict:
    """Bootstrap one class's scored images and write the intervals and calls into its group ``g``;
    returns the per-resample values that the overall means need."""
    from rsvc_cli.algorithms.bootstrap import ImageBootstrap, concept_calls, percentile_interval
    from rsvc_cli.algorithms.metrics import mean_max_correlation

    boot = ImageBootstrap(settings["n_resamples"], seed=(settings["seed"], position)).fit(image_row)
    interval = lambda samples: percentile_interval(samples, settings["confidence"])  # noqa: E731
    resampled = {}
    for direction in OWNER:
        sub = g[direction_group(direction)]
        resampled[direction] = boot.pearson(t(scored[direction].true), t(scored[direction].predicted)).cpu()
        # An unpredictable concept scores 0 on every resample (under crossval its held-out prediction is
        # constant within each fold, not overall, so the resampled Pearson alone would not say 0).
        unpredictable = torch.from_numpy(sub["unpredictable"][()].astype(bool))
        resampled[direction] = torch.where(unpredictable & ~resampled[direction].isnan(), 0.0, resampled[direction])
        low, high, undefined = interval(resampled[direction])
        write_array(sub, "similarity_low", low, "concept")
        write_array(sub, "similarity_high", high, "concept")
        write_array(sub, "undefined_resamples", undefined, "concept")
        sub.attrs["mean_similarity_low"], sub.attrs["mean_similarity_high"], _ = interval(torch.nanmean(resampled[direction], -1))
    for owner in (1, 2):
        sub, self_sub = g[direction_group(CROSS[owner])], g[direction_group(SELF[owner])]
        gap = resampled[SELF[owner]] - resampled[CROSS[owner]]
        gap_low, gap_high, _ = interval(gap)
        point = self_sub["similarity"][()] - sub["similarity"][()]
        calls = concept_calls(gap_low, gap_high, self_sub["similarity_low"][()], self_sub["similarity_high"][()],
                              defined=np.isfinite(point), specific_gap=settings["specific_gap"],
                              shared_gap=settings["shared_gap"], min_self=settings["min_self"])
        write_array(sub, "gap", point, "concept")
        write_array(sub, "gap_low", gap_low, "concept")
        write_array(sub, "gap_high", gap_high, "concept")
        write_array(sub, "call", calls, "concept")
    row_max, col_max = mean_max_correlation(boot.concept_correlation(t(u1), t(u2)).cpu())
    mean_max = (row_max + col_max) / 2
    g.attrs["mean_max_correlation_low"], g.attrs["mean_max_correlation_high"], _ = interval(mean_max)
    return {**resampled, "mean_max_correlation": mean_max}


def write_overall_intervals(f, per_class: list[dict], settings: dict) -> None:
    """Overall means per resample (resample b of every class; classes are drawn independently)."""
    from rsvc_cli.algorithms.bootstrap import percentile_interval

    g = f.create_group("overall")
    for direction in DIRECTIONS:
        pooled = torch.cat([c[direction] for c in per_class], dim=-1)
        g.attrs[f"{direction} mean_similarity_low"], g.attrs[f"{direction} mean_similarity_high"], _ = \
            percentile_interval(torch.nanmean(pooled, -1), settings["confidence"])
    per_class_mean_max = torch.stack([c["mean_max_correlation"] for c in per_class], -1)
    g.attrs["mean_max_correlation_low"], g.attrs["mean_max_correlation_high"], _ = \
        percentile_interval(torch.nanmean(per_class_mean_max, -1), settings["confidence"])
    for key, value in settings.items():
        g.attrs[key] = value


def score(pair, cfg, regression_path: Path) -> dict:
    from rsvc_cli.algorithms.metrics import concept_correlation, linear_cka, mean_max_correlation

    evaluation = str(cfg.regression.evaluation)
    if evaluation not in ("heldout", "crossval"):
        raise RsvcError(f"regression.evaluation={evaluation} is not an option.",
                        "Use regression.evaluation=heldout (the evaluation set) or crossval (held-out folds of the regression set).")
    group_by = str(cfg.dataset.group_by)
    reg_content = regression_content(pair, regression_params(cfg), group_by)
    settings = score_settings(cfg)
    content = scores_content(reg_content, evaluation, settings)
    device = resolve_device(cfg.device)
    t = lambda a: _float64(a, device)  # noqa: E731

    def write(f):
        reg = read_regression(regression_path, reg_content)
        a1 = read_activations(*pair.activations1)
        a2 = read_activations(*pair.activations2)
        write_array(f, "class_names", np.array(reg.class_names, dtype=str), "class")
        f.attrs["evaluation"] = evaluation
        write_provenance(f, pair, cfg)
        per_class = []
        for position, (name, entry) in enumerate(reg.classes.items()):
            g = f.create_group(f"classes/{name}")
            rows = entry["evaluation_rows"] if evaluation == "heldout" else entry["regression_rows"]
            if len(rows) < MIN_SCORED_PATCHES:
                which = "evaluation" if evaluation == "heldout" else "regression"
                raise RsvcError(f"Class '{name}' has {len(rows)} {which}-set patches, too few to measure "
                                f"similarities on (at least {MIN_SCORED_PATCHES}).",
                                "Give the evaluation set a share in dataset.split (e.g. dataset.split=[1,2,2]) or "
                                "score on held-out folds with regression.evaluation=crossval.")
            suffix = "evaluation" if evaluation == "heldout" else "regression"
            for direction, scored in scored_coefficients(entry, evaluation).items():
                similarity, unpredictable, _ = similarity_of(scored, device)
                sub = g.create_group(direction_group(direction))
                sub.attrs["direction"] = direction
                sub.attrs["alpha"] = entry[direction]["alpha"]
                write_array(sub, "similarity", similarity.cpu().numpy(), "concept")
                write_array(sub, "unpredictable", unpredictable.cpu().numpy(), "concept")
            u1, u2 = entry[f"coefficients1_{suffix}"], entry[f"coefficients2_{suffix}"]
            table = concept_correlation(t(u1), t(u2)).cpu().numpy()
            row_max, col_max = mean_max_correlation(torch.from_numpy(table))
            write_array(g, "concept_correlation", table, "concept1,concept2")
            g.attrs["mean_max_correlation_1"] = float(row_max)
            g.attrs["mean_max_correlation_2"] = float(col_max)
            g.attrs["cka"] = float(linear_cka(t(a1.values[rows]), t(a2.values[rows]), debiased=True))
            g.attrs["n_patches"] = len(rows)
            g.attrs["n_images"] = len(np.unique(a1.image_row[rows]))
            per_class.append(class_intervals(g, scored_coefficients(entry, evaluation), u1, u2, a1.image_row[rows],
                                             settings, position, t))
        write_overall_intervals(f, per_class, settings)

    prefix = f"{pair.model1.label}-{pair.layer1}-vs-{pair.model2.label}-{pair.layer2}"
    path = produce(store_dir(cfg), "scores", prefix, content, write)
    result = read_scores(path, content)
    result["path"] = path
    result["regression_path"] = regression_path
    if pair.images.planting is not None:
        result["square_content"] = square_content(pair, reg_content, regression_path, int(cfg.n_tiles))
    result["pair"] = {"model1": pair.model1.label, "model2": pair.model2.label, "layer1": pair.layer1, "layer2": pair.layer2}
    result["labels"] = model_labels(cfg)  # display only, never in a key
    table_path = write_results_table(path.with_suffix(".csv"), result)
    print_summary(result)
    console.say(f"results table: {table_path}")
    return result


def square_content(pair, reg_content: dict, regression_path: Path, n_tiles: int) -> dict:
    """Per concept, the fraction of its top patches (as in its collage) that overlap the planted square."""
    from rsvc_cli.data.planting import box_overlap
    from rsvc_cli.viz.collage import select_collage_patches

    reg = read_regression(regression_path, reg_content)
    acts = read_activations(*pair.activations1)
    out = {}
    for name, entry in reg.classes.items():
        rows = entry["evaluation_rows"]
        boxes, image_index, squares = acts.patch_box[rows], acts.image_index[rows], acts.square_box[acts.image_row[rows]]
        for owner in (1, 2):
            true = entry[f"coefficients{owner}_evaluation"]
            predicted = entry[CROSS[owner]]["evaluation_prediction"]
            for k in range(true.shape[1]):
                top = select_collage_patches(true[:, k], predicted[:, k], image_index, n_tiles)["top"]
                hits = [bool(box_overlap(boxes[i:i + 1], squares[i])[0]) for i in top]
                out[(name, f"model{owner}", k)] = float(np.mean(hits)) if hits else float("nan")
    return out


def scores_revision(path: Path) -> int:
    """The scores code revision (`store.keys.REVISIONS`) an artifact was made by."""
    with open_artifact(path, "scores") as f:
        return int(json.loads(f.attrs["config"])["revision"])


def read_scores(path: Path, content: dict | None = None) -> dict:
    # With `content` the key check already refuses other revisions; without, say which it is.
    revision = scores_revision(path) if content is None else REVISIONS["scores"]
    if revision != REVISIONS["scores"]:
        raise RsvcError(f"The scores artifact {path} was made by older rsvc code (scores revision {revision}; "
                        f"this rsvc computes revision {REVISIONS['scores']}).",
                        "Rerun `rsvc compare` with its settings to recompute it beside the old file.")
    with open_artifact(path, "scores", content) as f:
        classes = {}
        for name, g in f["classes"].items():
            by_direction = lambda key, directions=tuple(DIRECTIONS): {d: g[direction_group(d)][key][()] for d in directions}  # noqa: E731
            classes[name] = {
                "similarity": {d: g[direction_group(d)]["similarity"][()] for d in DIRECTIONS},
                "unpredictable": {d: g[direction_group(d)]["unpredictable"][()].astype(bool) for d in DIRECTIONS},
                "similarity_low": by_direction("similarity_low"),
                "similarity_high": by_direction("similarity_high"),
                "undefined_resamples": by_direction("undefined_resamples"),
                "mean_similarity_interval": {d: (float(g[direction_group(d)].attrs["mean_similarity_low"]),
                                                 float(g[direction_group(d)].attrs["mean_similarity_high"])) for d in DIRECTIONS},
                "alpha": {d: float(g[direction_group(d)].attrs["alpha"]) for d in DIRECTIONS},
                "gap": by_direction("gap", tuple(CROSS.values())),
                "gap_low": by_direction("gap_low", tuple(CROSS.values())),
                "gap_high": by_direction("gap_high", tuple(CROSS.values())),
                "call": {d: np.array(read_strings(g[direction_group(d)]["call"])) for d in CROSS.values()},
                "mean_max_correlation_interval": (float(g.attrs["mean_max_correlation_low"]),
                                                  float(g.attrs["mean_max_correlation_high"])),
                "concept_correlation": g["concept_correlation"][()],
                "mean_max_correlation_1": float(g.attrs["mean_max_correlation_1"]),
                "mean_max_correlation_2": float(g.attrs["mean_max_correlation_2"]),
                "cka": float(g.attrs["cka"]),
                "n_patches": int(g.attrs["n_patches"]),
            }
        o = f["overall"].attrs
        overall = {d: (float(o[f"{d} mean_similarity_low"]), float(o[f"{d} mean_similarity_high"])) for d in DIRECTIONS}
        overall["mean_max_correlation"] = (float(o["mean_max_correlation_low"]), float(o["mean_max_correlation_high"]))
        return {"class_names": read_strings(f["class_names"]), "classes": classes, "overall_interval": overall,
                "intervals": {k: o[k].item() for k in ("n_resamples", "confidence", "seed", "specific_gap",
                                                       "shared_gap", "min_self")},
                "config": f.attrs["config"], "evaluation": str(f.attrs["evaluation"])}


def result_rows(result: dict) -> list[dict]:
    """One row per class x concept x direction (the machine-readable results table)."""
    rows = []
    pair = result.get("pair", {})
    for name, c in result["classes"].items():
        for owner in (1, 2):
            cross, self_ = CROSS[owner], SELF[owner]
            for k in range(len(c["similarity"][cross])):
                row = {**pair, "class": name, "owner": f"model{owner}", "concept": k, "direction": cross,
                       "similarity": float(c["similarity"][cross][k]),
                       "unpredictable": bool(c["unpredictable"][cross][k]),
                       "self_similarity": float(c["similarity"][self_][k]),
                       "self_unpredictable": bool(c["unpredictable"][self_][k]), "cka": c["cka"]}
                if "gap" in c:  # read from a scores artifact (results assembled in memory may have no intervals)
                    row.update({
                        "similarity_low": float(c["similarity_low"][cross][k]),
                        "similarity_high": float(c["similarity_high"][cross][k]),
                        "self_similarity_low": float(c["similarity_low"][self_][k]),
                        "self_similarity_high": float(c["similarity_high"][self_][k]),
                        "gap": float(c["gap"][cross][k]), "gap_low": float(c["gap_low"][cross][k]),
                        "gap_high": float(c["gap_high"][cross][k]), "call": str(c["call"][cross][k]),
                        "undefined_resamples": int(c["undefined_resamples"][cross][k]), "alpha": c["alpha"][cross]})
                rows.append(row)
    return rows


def write_results_table(path: Path, result: dict, extra_columns: dict | None = None) -> Path:
    rows = result_rows(result)
    for row in rows:
        if "square_content" in result:
            row["square_content"] = result["square_content"].get((row["class"], row["owner"], row["concept"]))
    if extra_columns:
        for row in rows:
            row.update(extra_columns.get((row["class"], row["owner"], row["concept"]), {}))
    fields = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    data = text.getvalue().encode()
    if path.is_file() and (path.read_bytes() == data or (not extra_columns and _holds(path, data))):
        # The same table, or the same one with more columns (compare's importance): nothing to
        # write, and a read-only store serves it.
        return path
    # One temporary name per process: racing jobs of one comparison must not rename each other's file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _holds(path: Path, data: bytes) -> bool:
    """Whether the CSV at `path` has every column and row of the CSV `data` (and perhaps more columns)."""
    new = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
    with open(path, newline="") as fh:
        old = list(csv.DictReader(fh))
    return len(old) == len(new) and all(o.get(k) == v for o, n in zip(old, new) for k, v in n.items())


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def lowest_first(rows: list[dict]) -> list[dict]:
    """Result rows by similarity, lowest first; at a tie the unpredictable first; undefined (NaN) last."""
    return sorted(rows, key=lambda r: (np.isnan(r["similarity"]), np.nan_to_num(r["similarity"], nan=0.0),
                                       not r["unpredictable"]))


def summary_numbers(result: dict) -> dict:
    """Per direction the mean similarity (unpredictable concepts count as 0), and how many concepts are
    unpredictable (`n_unpredictable`) and undefined (`n_undefined`: true coefficients constant, left out
    of the mean); then mean max correlation and CKA over classes."""
    classes = result["classes"].values()
    out = {d: _nanmean(np.concatenate([c["similarity"][d] for c in classes])) for d in DIRECTIONS}
    out["n_unpredictable"] = {d: int(sum(c["unpredictable"][d].sum() for c in classes)) for d in DIRECTIONS}
    out["n_undefined"] = {d: int(sum(np.isnan(c["similarity"][d]).sum() for c in classes)) for d in DIRECTIONS}
    out["mean_max_correlation"] = _nanmean([(c["mean_max_correlation_1"] + c["mean_max_correlation_2"]) / 2 for c in classes])
    out["cka"] = _nanmean([c["cka"] for c in classes])
    return out


def _interval(point, low, high) -> str:
    return f"{console.fmt(point)} [{console.fmt(low, 2)}, {console.fmt(high, 2)}]"


def call_counts(result: dict) -> dict[str, int]:
    from rsvc_cli.algorithms.bootstrap import CALLS

    calls = [str(r["call"]) for r in result_rows(result)]
    return {call: calls.count(call) for call in CALLS if call in calls}


def print_summary(result: dict, n_lowest: int = 12) -> None:
    pair = result.get("pair", {})
    labels = result.get("labels") or {key: pair.get(key) for key in ("model1", "model2")}
    title = f"{labels['model1']} {pair.get('layer1')} (model 1) vs {labels['model2']} {pair.get('layer2')} (model 2)"
    level = round(100 * result["intervals"]["confidence"])

    def class_mean(c, d):
        return _interval(_nanmean(c["similarity"][d]), *c["mean_similarity_interval"][d])

    console.table(f"per class: {title}", ["class", "2->1", "1->1", "1->2", "2->2", "unpredictable 2->1/1->2",
                                          "mean max corr", "CKA"],
                  [(name, *(class_mean(c, d) for d in ("2->1", "1->1", "1->2", "2->2")),
                    f"{int(c['unpredictable']['2->1'].sum())}/{int(c['unpredictable']['1->2'].sum())}",
                    _interval((c["mean_max_correlation_1"] + c["mean_max_correlation_2"]) / 2, *c["mean_max_correlation_interval"]),
                    c["cka"])
                   for name, c in result["classes"].items()],
                  caption=f"Mean Pearson over concepts (an unpredictable concept counts as 0) [{level} % bootstrap "
                          f"interval over images]. \"2->1\": {direction_text(labels, '2->1')}; 1->1, 2->2: self baselines.")
    # Most model-specific first: the gap to the self baseline we are surest of (its lower bound).
    rows = sorted(result_rows(result), key=lambda r: -np.inf if np.isnan(r["gap_low"]) else r["gap_low"], reverse=True)
    squares = result.get("square_content")
    columns = ["class", "concept of", "k", "direction", "similarity", "unpredictable", "self", "gap", "call"] + (["square content"] if squares else [])
    console.table("most model-specific concepts (by the gap's lower bound)", columns,
                  [(r["class"], f"{labels[r['owner']]} ({r['owner']})", r["concept"], r["direction"],
                    _interval(r["similarity"], r["similarity_low"], r["similarity_high"]), "yes" if r["unpredictable"] else "",
                    _interval(r["self_similarity"], r["self_similarity_low"], r["self_similarity_high"]),
                    _interval(r["gap"], r["gap_low"], r["gap_high"]), r["call"],
                    *([squares.get((r["class"], r["owner"], r["concept"]))] if squares else []))
                   for r in rows[:n_lowest]],
                  caption="gap = self minus cross similarity on the same resamples; model-specific: gap above "
                          f"{result['intervals']['specific_gap']} and self baseline at least {result['intervals']['min_self']} "
                          f"with {level} % confidence. unpredictable: the other model's features predict a constant "
                          "(the lasso kept no weight); similarity 0.")
    s = summary_numbers(result)
    o = result["overall_interval"]
    console.say(f"overall mean similarity: 2->1 {_interval(s['2->1'], *o['2->1'])}, 1->2 {_interval(s['1->2'], *o['1->2'])}; "
                f"self 1->1 {_interval(s['1->1'], *o['1->1'])}, 2->2 {_interval(s['2->2'], *o['2->2'])}; "
                f"mean max concept correlation {_interval(s['mean_max_correlation'], *o['mean_max_correlation'])}; "
                f"CKA {console.fmt(s['cka'])}")
    console.say("concepts flagged unpredictable (similarity 0, in the means): "
                + ", ".join(f"{d} {s['n_unpredictable'][d]}" for d in DIRECTIONS))
    if any(s["n_undefined"].values()):
        console.say("n undefined: true coefficients constant (left out of the means): "
                    + ", ".join(f"{d} {s['n_undefined'][d]}" for d in DIRECTIONS))
    console.say("calls: " + ", ".join(f"{call} {n}" for call, n in call_counts(result).items()))

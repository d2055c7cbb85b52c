"""rsvc regress: can one model's activations predict the other's concept coefficients? (method step 4)

Per class, on the regression set: the coefficients of both models' concepts (NNLS against the
stored bases), then four cross-validated regressions, each batched over classes, folds and
concepts: "2->1" (model 2's activations predict model 1's concepts), "1->2", and the self
baselines "1->1", "2->2". Folds are grouped by source image; standardization statistics come
from the training folds only. The five fold models also predict the evaluation set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from rsvc_cli import console
from rsvc_cli.console import StageTimes
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import open_artifact, read_strings, write_array
from rsvc_cli.store.keys import stage_content
from rsvc_cli.stages.common import (
    ImageSets,
    load_image_sets,
    load_model,
    predicted_class_positions,
    produce,
    resolve_device,
    store_dir,
    to_plain,
)
from rsvc_cli.stages.decompose import (
    EVALUATION_SET,
    REGRESSION_SET,
    Activations,
    activations_for,
    check_grouping,
    coefficients_of,
    concepts_content,
    decompose,
    group_floor,
    read_activations,
    read_concepts,
    read_skipped,
    say_skipped,
    write_skipped,
)

# direction -> (predictor model, concept owner). "2->1": model 2 predicts model 1's concepts.
DIRECTIONS = {"2->1": (2, 1), "1->2": (1, 2), "1->1": (1, 1), "2->2": (2, 2)}


def direction_group(direction: str) -> str:
    return direction.replace("->", "to")


@dataclass
class Pair:
    """Everything upstream of a pair's regression: models, image sets, artifacts and their contents."""

    model1: object
    model2: object
    images: ImageSets
    layer1: str
    layer2: str
    activations1: tuple
    activations2: tuple
    concepts1: tuple
    concepts2: tuple


def prepare_pair(cfg, times: StageTimes | None = None) -> Pair:
    """Load both models and make sure their activations and concepts are in the store (`times`: the wall
    time of loading (or training) the models, extraction and decomposition)."""
    from rsvc_cli.stages.naming import model_labels
    from rsvc_cli.stages.provenance import check_weights

    times = times or StageTimes()
    check_weights(cfg)  # random weights only when asked for, before any work
    model_labels(cfg)  # two models labelled alike are refused before any work too
    with times.stage("load or train models"):
        model1, model2 = load_model(cfg.model1, cfg), load_model(cfg.model2, cfg)
        images = load_image_sets(cfg.dataset)
        layer1, layer2 = str(cfg.layer1), str(cfg.layer2)
        for model in (model1, model2):
            check_grouping(model, images, cfg)
    with times.stage("extract"):
        # Every layer a sweep needs from a model is recorded in one pass (extract_layers1/2).
        acts1 = activations_for(model1, images, cfg, layer1, extra_layers=list(cfg.extract_layers1))
        acts2 = activations_for(model2, images, cfg, layer2, extra_layers=list(cfg.extract_layers2))
    with times.stage("decompose"):
        c1 = (decompose(model1, images, cfg, layer1, activations=acts1), concepts_content(model1, images, cfg, acts1[1]))
        c2 = (decompose(model2, images, cfg, layer2, activations=acts2), concepts_content(model2, images, cfg, acts2[1]))
    return Pair(model1, model2, images, layer1, layer2, acts1, acts2, c1, c2)


def regression_params(cfg) -> dict:
    from rsvc_cli.algorithms.regression import ALPHA_GRID

    r = to_plain(cfg.regression)
    params = {k: r[k] for k in ("method", "alpha", "n_folds", "seed", "max_iter", "tol")}
    if params["alpha"] == "cv":
        if params["method"] != "lasso":
            raise RsvcError(f"regression.alpha=cv chooses the lasso's alpha; regression={params['method']} has "
                            f"{'none' if params['method'] == 'linear' else 'no cross-validated grid here'}.",
                            "Use regression=lasso with regression.alpha=cv, or give a number.")
        if str(r["evaluation"]) != "heldout":
            raise RsvcError("regression.alpha=cv chooses alpha on the regression set's folds, so scoring on "
                            "those folds (regression.evaluation=crossval) would score the choice on its own data.",
                            "Use regression.evaluation=heldout with alpha=cv, or give alpha a number.")
        params["alpha_grid"] = list(ALPHA_GRID)
    else:
        try:
            float(params["alpha"])
        except (TypeError, ValueError):
            raise RsvcError(f"regression.alpha={params['alpha']} is neither a number nor cv.",
                            "Give a number (e.g. regression.alpha=0.1) or regression.alpha=cv.") from None
    return params


def fit_direction(X, Y, folds, X_eval, params: dict, regressor):
    """Held-out predictions (B, n, t), evaluation predictions (B, n_eval, t) and the alpha (B,) of one
    direction for a batch of classes. With alpha=cv each class takes the grid alpha of least
    held-out error on the regression set's grouped folds (the evaluation rows are not read)."""
    from rsvc_cli.algorithms.regression import Lasso, choose_alpha, cross_validate, held_out_error

    predict = lambda cv: cv.predict(X_eval) if X_eval.shape[1] else torch.zeros((len(X), 0, Y.shape[-1]))  # noqa: E731
    if params["alpha"] != "cv":
        cv = cross_validate(X, Y, folds, regressor)
        return cv.held_out_prediction, predict(cv), np.full(len(X), getattr(regressor, "alpha", np.nan))
    grid = params["alpha_grid"]
    fits = [cross_validate(X, Y, folds, Lasso(alpha=a, max_iter=int(params["max_iter"]), tol=float(params["tol"])))
            for a in grid]
    chosen = choose_alpha(torch.stack([held_out_error(Y, fit.held_out_prediction, folds).cpu() for fit in fits]), grid)
    which = [grid.index(float(a)) for a in chosen]
    held_out = torch.stack([fits[j].held_out_prediction[i] for i, j in enumerate(which)])
    evaluation = torch.stack([predict(fits[j])[i] for i, j in enumerate(which)])
    return held_out, evaluation, chosen.numpy()


def regression_content(pair: Pair, params: dict, group_by: str) -> dict:
    return stage_content("regression", concepts1=pair.concepts1[1], concepts2=pair.concepts2[1], regression=params,
                         group_by=group_by)


def run(cfg) -> Path:
    return regress(prepare_pair(cfg), cfg)


def check_aligned(a1: Activations, a2: Activations, label1: str, label2: str) -> None:
    """Both models must have seen exactly the same patches in the same order."""
    same = (len(a1.image_index) == len(a2.image_index) and np.array_equal(a1.image_index, a2.image_index)
            and np.allclose(a1.patch_box, a2.patch_box, atol=1e-3))
    if not same:
        raise RsvcError(f"The activations of {label1} and {label2} come from different patches or image orders, "
                        "so their concepts cannot be compared patch by patch.",
                        "Use the same dataset and patch settings for both models (patch boxes are in original pixels, "
                        "so both models need the same patch.size/stride relative to their input sizes), "
                        "or delete the mismatched activations artifacts and rerun.")


def comparison_rows(a1: Activations, class_index: int, image_set: int, group_by: str, predicted=None) -> np.ndarray:
    """Rows of class c in an image set: by label, or the union of both models' predicted sets (the authors;
    ``predicted``: both models' predicted class per image row)."""
    in_set = a1.image_set == image_set
    if group_by == "label":
        return np.nonzero(in_set & (a1.label == class_index))[0]
    predicted1, predicted2 = (p[a1.image_row] for p in predicted)
    return np.nonzero(in_set & ((predicted1 == class_index) | (predicted2 == class_index)))[0]


def rare_comparison(a1: Activations, class_index: int, name: str, rows_reg: np.ndarray, rows_eval: np.ndarray,
                    concepts: dict, n_folds: int, min_images: int) -> str | None:
    """Why a class cannot be compared under group_by=predicted (None if it can): a model has no concepts
    for it, or the models predict it too rarely on the regression or evaluation images (`group_floor`)."""
    from rsvc_cli.stages.score import MIN_SCORED_PATCHES

    for m in (1, 2):
        if name in concepts[m].skipped:
            return concepts[m].skipped[name]
    n_images = len(np.unique(a1.image_row[rows_reg]))
    floor = max(group_floor(a1, class_index, REGRESSION_SET, min_images), n_folds)
    if n_images < floor:
        return (f"the models predict it for {n_images} regression-set images (either model); the "
                f"{n_folds}-fold regression needs at least {floor}")
    # Without an evaluation set (regression.evaluation=crossval) there is nothing to check there.
    if (a1.image_set == EVALUATION_SET).any():
        n_images = len(np.unique(a1.image_row[rows_eval]))
        floor = group_floor(a1, class_index, EVALUATION_SET, min_images)
        if n_images < floor or len(rows_eval) < MIN_SCORED_PATCHES:
            return (f"the models predict it for {n_images} evaluation-set images ({len(rows_eval)} patches, either "
                    f"model); scoring needs at least {floor} images and {MIN_SCORED_PATCHES} patches")
    return None


def regressor_for(params: dict):
    from rsvc_cli.algorithms.regression import Lasso, LinearRegression, Ridge

    method = params["method"]
    if params["alpha"] == "cv":
        return None  # one per grid alpha, in fit_direction
    if method == "lasso":
        return Lasso(alpha=float(params["alpha"]), max_iter=int(params["max_iter"]), tol=float(params["tol"]))
    if method == "ridge":
        return Ridge(alpha=float(params["alpha"]))
    if method == "linear":
        return LinearRegression()
    raise RsvcError(f"regression.method={method} is not an option.", "Use regression=lasso, regression=ridge or regression=linear.")


def regress(pair: Pair, cfg) -> Path:
    from rsvc_cli.algorithms.regression import grouped_kfold

    params = regression_params(cfg)
    if int(params["n_folds"]) < 2:
        raise RsvcError(f"regression.n_folds={params['n_folds']} leaves nothing to hold out.", "Use regression.n_folds=2 or more (the authors: 5).")
    group_by = str(cfg.dataset.group_by)
    content = regression_content(pair, params, group_by)
    device = resolve_device(cfg.device)

    def write(f):
        a1 = read_activations(*pair.activations1)
        a2 = read_activations(*pair.activations2)
        check_aligned(a1, a2, f"{pair.model1.label} ({pair.layer1})", f"{pair.model2.label} ({pair.layer2})")
        c1, c2 = read_concepts(*pair.concepts1), read_concepts(*pair.concepts2)
        acts = {1: a1, 2: a2}
        concepts = {1: c1, 2: c2}
        write_array(f, "class_names", np.array(a1.class_names, dtype=str), "class")
        regressor = regressor_for(params)
        predicted = None
        if group_by == "predicted":
            predicted = [predicted_class_positions(m, pair.images, cfg) for m in (pair.model1, pair.model2)]
        # Per class: rows and true coefficients of both models on both sets.
        per_class, skipped = {}, {}
        # Per class: its concept coefficients, then one solve for each of the four directions.
        bar = console.progress(5 * len(a1.class_names), f"regress {pair.model1.label} vs {pair.model2.label}",
                               unit="step")
        for c, name in enumerate(a1.class_names):
            bar.update(1)
            rows_reg = comparison_rows(a1, c, REGRESSION_SET, group_by, predicted)
            rows_eval = comparison_rows(a1, c, EVALUATION_SET, group_by, predicted)
            if group_by == "predicted":
                reason = rare_comparison(a1, c, name, rows_reg, rows_eval, concepts, int(params["n_folds"]),
                                         int(cfg.dataset.min_images_per_set))
                if reason:
                    skipped[name] = reason
                    bar.update(len(DIRECTIONS))
                    continue
            elif name not in c1.concept_basis and c1.per_class:
                bar.update(len(DIRECTIONS))
                continue
            n_images = len(np.unique(a1.image_row[rows_reg]))
            if n_images < int(params["n_folds"]):
                raise RsvcError(f"Class '{name}' has {n_images} regression-set images, fewer than the "
                                f"{params['n_folds']} folds.", "Raise dataset.images_per_class or lower regression.n_folds.")
            true = {}
            for m in (1, 2):
                true[m, "regression"] = coefficients_of(acts[m].values[rows_reg], concepts[m], name, device)
                true[m, "evaluation"] = coefficients_of(acts[m].values[rows_eval], concepts[m], name, device)
            folds = grouped_kfold(torch.from_numpy(a1.image_row[rows_reg]), n_folds=int(params["n_folds"]),
                                  seed=int(params["seed"])).numpy()
            per_class[name] = {"rows_reg": rows_reg, "rows_eval": rows_eval, "true": true, "folds": folds}
            g = f.create_group(f"classes/{name}")
            write_array(g, "regression_rows", rows_reg, "patch")
            write_array(g, "evaluation_rows", rows_eval, "patch")
            write_array(g, "fold", folds, "patch")
            for m in (1, 2):
                write_array(g, f"coefficients{m}_regression", true[m, "regression"].astype(np.float32), "patch,concept")
                write_array(g, f"coefficients{m}_evaluation", true[m, "evaluation"].astype(np.float32), "patch,concept")
        write_skipped(f, skipped)
        if not per_class:
            say_skipped(skipped)
            raise RsvcError("dataset.group_by=predicted leaves no class to compare: every class is predicted too "
                            "rarely by one of the models (see the lines above).",
                            "Raise dataset.images_per_class (or dataset.images_per_set), lower "
                            "dataset.min_images_per_set or regression.n_folds, check model1/model2.output_classes, "
                            "or use dataset.group_by=label.")
        # One batched cross-validated solve per direction and per group of equally sized classes.
        for direction, (predictor, owner) in DIRECTIONS.items():
            by_size: dict[tuple, list[str]] = {}
            for name, pc in per_class.items():
                by_size.setdefault((len(pc["rows_reg"]), len(pc["rows_eval"])), []).append(name)
            for names in by_size.values():
                X = np.stack([acts[predictor].values[per_class[n]["rows_reg"]] for n in names])
                Y = np.stack([per_class[n]["true"][owner, "regression"] for n in names])
                folds = np.stack([per_class[n]["folds"] for n in names])
                X_eval = np.stack([acts[predictor].values[per_class[n]["rows_eval"]] for n in names])
                to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
                # Activations go in their storage precision (cross_validate multiplies them in
                # float32 and sums in float64); coefficients in float64.
                held_out, evaluation, alphas = fit_direction(to(X), to(Y).double(), torch.from_numpy(folds).to(device),
                                                             to(X_eval), params, regressor)
                held_out, evaluation = held_out.cpu().numpy(), evaluation.cpu().numpy()
                bar.update(len(names))
                for i, name in enumerate(names):
                    g = f.require_group(f"classes/{name}/{direction_group(direction)}")
                    g.attrs["direction"] = direction
                    g.attrs["alpha"] = float(alphas[i])
                    write_array(g, "held_out_prediction", held_out[i].astype(np.float32), "patch,concept")
                    write_array(g, "evaluation_prediction", evaluation[i].astype(np.float32), "patch,concept")
        bar.close()

    prefix = f"{pair.model1.label}-{pair.layer1}-vs-{pair.model2.label}-{pair.layer2}-{params['method']}"
    path = produce(store_dir(cfg), "regression", prefix, content, write, seeds={"regression.seed": params["seed"]})
    with open_artifact(path, "regression", content) as f:
        # Those without concepts were said by decompose, once per model.
        concepts_skipped = set(read_concepts(*pair.concepts1).skipped) | set(read_concepts(*pair.concepts2).skipped)
        say_skipped({name: reason for name, reason in read_skipped(f).items() if name not in concepts_skipped})
    if params["alpha"] == "cv":
        classes = read_regression(path, content).classes
        console.table("alpha chosen by grouped cross-validation on the regression set", ["class", *DIRECTIONS],
                      [(name, *(entry[d]["alpha"] for d in DIRECTIONS)) for name, entry in classes.items()])
    return path


@dataclass
class RegressionResult:
    class_names: list[str]
    classes: dict  # name -> dict of arrays (see regress)
    skipped: dict = None  # class -> why it was not compared (group_by=predicted)


def read_regression(path: Path, content: dict) -> RegressionResult:
    with open_artifact(path, "regression", content) as f:
        classes = {}
        for name, g in f["classes"].items():
            entry = {key: g[key][()] for key in g if isinstance(g[key], h5py.Dataset)}
            for direction in DIRECTIONS:
                sub = g.get(direction_group(direction))
                if sub is not None:
                    entry[direction] = {key: sub[key][()] for key in sub}
                    # Artifacts written before alpha was recorded had the configured one.
                    entry[direction]["alpha"] = float(sub.attrs.get("alpha", json.loads(f.attrs["config"])["regression"]["alpha"]))
            classes[name] = entry
        return RegressionResult(class_names=read_strings(f["class_names"]), classes=classes, skipped=read_skipped(f))

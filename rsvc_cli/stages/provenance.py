"""What made a result, in one place: the provenance of a comparison and the random-weights guard.

`pair_provenance(pair, cfg)` is the record every scores artifact (root attribute `provenance`, JSON)
and every report carries: per model its name, layer, weights (checkpoint file and digest, pretrained
tag, or the key of the weights rsvc trained) and whether they are random; the dataset (roots resolved
to absolute paths, classes, images per set, grouping), patching, decomposition, regression, the set
each figure is computed on, seeds and the rsvc version. Add an entry here (one key of the dict) and
it reaches the artifact, the report and `rsvc info`. Nothing in it is part of an artifact's key: it
records what made the numbers, which the key already distinguishes.

A model with random weights (no checkpoint, not pretrained, not trained by rsvc) is refused by every
stage that produces results unless `model.random_weights_ok=true` (model1./model2. in a comparison):
numbers from two random initializations look exactly like real ones.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import numpy as np

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.stages.common import ModelHandle, to_plain

PAIR_MODELS = ("model1", "model2")
SET_NAMES = ("concept", "regression", "evaluation")  # image_set 0, 1, 2
RANDOM_WEIGHTS_BANNER = "random weights"


# ------------------------------------------------------------------------------ random weights

def has_random_weights(model_cfg) -> bool:
    """No checkpoint, not pretrained, not trained by rsvc: the architecture's initialization."""
    return not (model_cfg.get("checkpoint") or model_cfg.get("pretrained") or model_cfg.train.enabled)


def random_weights(cfg) -> list[str]:
    """The models of a comparison (model1, model2) with random weights."""
    return [key for key in PAIR_MODELS if has_random_weights(cfg[key])]


def check_weights(cfg) -> list[str]:
    """Refuse random weights not asked for; announce the ones asked for. Returns the models (model1,
    model2) with random weights."""
    random = random_weights(cfg)
    refused = [key for key in random if not cfg[key].random_weights_ok]
    if refused:
        described = " and ".join(f"{key} ({cfg[key].name})" for key in refused)
        verb = "have" if len(refused) > 1 else "has"
        raise RsvcError(
            f"{described} {verb} random weights: no {refused[0]}.checkpoint, {refused[0]}.pretrained or "
            f"{refused[0]}.train was given, so every concept and similarity would describe an untrained network "
            "while looking exactly like a real result.",
            f"Give the weights ({refused[0]}.checkpoint=PATH, {refused[0]}.pretrained=true, or a preset such as "
            "experiment=cifar_r20_vs_r56), or, to compare untrained networks on purpose, set "
            + " ".join(f"{key}.random_weights_ok=true" for key in refused) + ".")
    for key in random:
        console.say(f"[bold yellow]{RANDOM_WEIGHTS_BANNER.upper()}:[/bold yellow] {key} ({cfg[key].name}) has random "
                    f"weights ({key}.random_weights_ok=true): its concepts and similarities describe an untrained network.")
    return random


def random_weights_banner(provenance: dict) -> str | None:
    """The warning a result made with random weights carries (report, console), None otherwise."""
    random = provenance.get("random_weights") or []
    if not random:
        return None
    named = " and ".join(f"{key} ({(provenance.get(key) or {}).get('name')})" for key in random)
    return (f"{RANDOM_WEIGHTS_BANNER.upper()}: {named} {'have' if len(random) > 1 else 'has'} random weights "
            "(no checkpoint, not pretrained, not trained): these concepts and similarities describe untrained "
            "networks, not any trained model.")


# ---------------------------------------------------------------------------------- provenance

def model_provenance(model: ModelHandle, model_cfg, layer: str) -> dict:
    m = to_plain(model_cfg)
    weights = str(model.identity.get("weights"))
    entry = {"name": model.label, "layer": layer, "random_weights": has_random_weights(model_cfg)}
    if weights.startswith("trained:"):
        entry["training_key"] = weights.split(":", 1)[1]
        entry["trained_from_checkpoint"] = _absolute(m.get("checkpoint"))
    elif m.get("checkpoint"):
        entry["checkpoint"] = _absolute(m["checkpoint"])
        entry["checkpoint_sha256"] = weights
    elif m.get("pretrained"):
        entry["pretrained_tag"] = model.label
    else:
        entry["initial_parameters_sha256"] = weights.split(":", 1)[-1]
    if m.get("_target_"):
        entry["target"] = m["_target_"]
    entry["preprocessing"] = {"input_size": model.input_size, "resize_size": model.resize_size,
                              "interpolation": model.interpolation, "mean": list(model.mean), "std": list(model.std),
                              "token_reduce": model.token_reduce}
    return entry


def images_per_set(images) -> dict:
    """Images in each set, in all and per class (min-max), by label."""
    out = {}
    image_set, label = np.asarray(images.image_set), np.asarray(images.label)
    for code, name in enumerate(SET_NAMES):
        per_class = [int(np.sum((image_set == code) & (label == c))) for c in range(len(images.class_names))]
        out[name] = {"total": int(np.sum(image_set == code)),
                     "per_class_min": min(per_class, default=0), "per_class_max": max(per_class, default=0)}
    return out


def dataset_provenance(images, dataset_cfg) -> dict:
    d = to_plain(dataset_cfg)
    entry = {"name": d.get("name"), "classes": list(images.class_names), "group_by": d.get("group_by"),
             "images_per_set": images_per_set(images), "seed": d.get("seed"),
             # What was asked for; images_per_set is what the selection gave.
             "requested": {k: d.get(k) for k in ("images_per_class", "split", "first_classes") if d.get(k) is not None}}
    counts = {name: n for name, n in (d.get("images_per_set") or {}).items() if n is not None}
    if counts:
        entry["requested"]["images_per_set"] = counts
    entry["requested"]["min_images_per_set"] = d.get("min_images_per_set")
    # Every root the images come from, absolute: image paths then resolve from any folder.
    for key, value in d.items():
        if key.endswith("root") and value:
            entry[key] = _absolute(value)
    if d.get("_target_"):
        entry["target"] = d["_target_"]
    if d.get("name") == "synthetic" and not d.get("_target_"):
        entry["synthetic_seed"] = d.get("synthetic_seed")
    planting = d.get("planting") or {}
    if planting.get("enabled"):
        entry["planting"] = {k: planting.get(k) for k in ("size", "class_probability", "default_probability", "seed")}
    return entry


def figure_sets(evaluation: str) -> dict:
    """The image set each figure of a scores artifact is computed on (docs/artifacts.md)."""
    scored = "evaluation set" if evaluation == "heldout" else "regression set (held-out folds)"
    on_patches = "evaluation set" if evaluation == "heldout" else "regression set"
    return {"similarity": scored, "concept_correlation": on_patches, "mean_max_correlation": on_patches,
            "cka": on_patches, "concepts": "concept set", "regressions": "regression set"}


def pair_provenance(pair, cfg) -> dict:
    from rsvc_cli.store.keys import seeds_in

    decomposition, regression = to_plain(cfg.decomposition), to_plain(cfg.regression)
    evaluation = str(regression.get("evaluation"))
    seeds = {"dataset.seed": to_plain(cfg.dataset).get("seed"), "decomposition.seed": decomposition.get("seed"),
             "regression.seed": regression.get("seed")}
    for key, model in (("model1", pair.model1), ("model2", pair.model2)):
        seeds.update({f"{key}.{name}": value for name, value in seeds_in(model.identity).items()})
    return {
        "rsvc_version": _rsvc_version(),
        "model1": model_provenance(pair.model1, cfg.model1, pair.layer1),
        "model2": model_provenance(pair.model2, cfg.model2, pair.layer2),
        "random_weights": random_weights(cfg),
        "dataset": dataset_provenance(pair.images, cfg.dataset),
        "patch": to_plain(cfg.patch),
        "decomposition": {k: decomposition.get(k) for k in ("method", "n_concepts", "signed", "init", "solver",
                                                            "max_iter", "tol", "seed")},
        "regression": {k: regression.get(k) for k in ("method", "alpha", "n_folds", "evaluation", "seed")},
        "figures_computed_on": figure_sets(evaluation),
        "seeds": seeds,
    }


def write_provenance(f, pair, cfg) -> None:
    """The `provenance` root attribute (JSON) of an artifact being written."""
    f.attrs["provenance"] = json.dumps(pair_provenance(pair, cfg), sort_keys=True, default=str)


def read_provenance(path) -> dict | None:
    """An artifact's provenance, None when it has none (artifacts of other kinds, older scores)."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        text = f.attrs.get("provenance")
    if text is None:
        return None
    return json.loads(text.decode() if isinstance(text, bytes) else text)


def provenance_rows(provenance: dict) -> dict[str, str]:
    """The provenance as short readable rows (report block, `rsvc info`)."""
    rows = {}
    for key in PAIR_MODELS:
        m = provenance.get(key) or {}
        if "checkpoint" in m:
            weights = f"checkpoint {m['checkpoint']} (sha256 {str(m.get('checkpoint_sha256', ''))[:16]})"
        elif "training_key" in m:
            weights = f"trained by rsvc (key {m['training_key'][:16]})"
        elif "pretrained_tag" in m:
            weights = f"pretrained {m['pretrained_tag']}"
        else:
            weights = "RANDOM WEIGHTS (no checkpoint, not pretrained, not trained)"
        p = m.get("preprocessing") or {}
        rows[key] = (f"{m.get('name')} at {m.get('layer')}; {weights}; input {p.get('input_size')} px from "
                     f"{p.get('resize_size')} px ({p.get('interpolation')})")
    d = provenance.get("dataset") or {}
    roots = ", ".join(f"{k} {v}" for k, v in d.items() if k.endswith("root"))
    sets = d.get("images_per_set") or {}
    rows["dataset"] = (f"{d.get('name')}{' at ' + roots if roots else ''}; {len(d.get('classes') or [])} classes "
                       f"({', '.join((d.get('classes') or [])[:10])}{', ...' if len(d.get('classes') or []) > 10 else ''}); "
                       f"grouped by {d.get('group_by')}")
    rows["images per set"] = "; ".join(
        f"{name} {s['total']} ({s['per_class_min']}-{s['per_class_max']} per class)" for name, s in sets.items())
    patch = provenance.get("patch") or {}
    rows["patching"] = ("whole images" if patch.get("size") is None else
                        f"{patch.get('size')} px at stride {patch.get('stride')} on {patch.get('reference_size')} px "
                        "(scaled to each model's input)")
    dec, reg = provenance.get("decomposition") or {}, provenance.get("regression") or {}
    rows["decomposition"] = f"{dec.get('method')}, k={dec.get('n_concepts')}, signed={dec.get('signed')}"
    rows["regression"] = (f"{reg.get('method')} (alpha {reg.get('alpha')}), {reg.get('n_folds')} folds, "
                          f"evaluation={reg.get('evaluation')}")
    sets_of = provenance.get("figures_computed_on") or {}
    rows["figures computed on"] = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sets_of.items())
    rows["seeds"] = ", ".join(f"{k}={v}" for k, v in (provenance.get("seeds") or {}).items())
    rows["rsvc version"] = str(provenance.get("rsvc_version"))
    return rows


def _absolute(path) -> str | None:
    return None if not path else os.path.abspath(Path(str(path)).expanduser())


def _rsvc_version() -> str:
    try:
        return importlib.metadata.version("rsvc")
    except importlib.metadata.PackageNotFoundError:
        from rsvc_cli import __version__

        return __version__

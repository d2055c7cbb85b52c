"""The planted-concept experiment's two checks: is the square a shortcut, and does RSVC find it?

Model 1 was trained with a square on images of one class (a shortcut for that class), model 2
with the square on every class at random (so it has no reason to use it). Two things must hold
for the experiment to mean anything, and `compare` prints both when the comparison images carry
squares on exactly one class:

- **Shortcut** (is the premise true?): on the comparison images of the *other* classes, the square
  pasted (same colour, size and placement seed as the comparison) makes model 1 predict the
  planted class at least `SHORTCUT_RATIO_MIN` times as often as without it and for at least
  `SHORTCUT_RATE_MIN` of them, while model 2's rate rises by at most `MODEL2_INCREASE_MAX`.
- **Square concept** (does RSVC see it?): in the planted class, model 1's concept with the lowest
  2->1 similarity has square content >= `SQUARE_CONTENT_MIN`, and its similarity is at most
  `SIMILARITY_RATIO_MAX` times the median similarity of the class's concepts whose square content
  is below `LOW_SQUARE_CONTENT` (the square often splits across several concepts, so "the concept
  with the most square" is not well defined; the lowest one is).
"""

from __future__ import annotations

import numpy as np
import torch

from rsvc_cli import console

SHORTCUT_RATIO_MIN = 10.0
SHORTCUT_RATE_MIN = 0.15
MODEL2_INCREASE_MAX = 0.05
SQUARE_CONTENT_MIN = 0.8
LOW_SQUARE_CONTENT = 0.2
SIMILARITY_RATIO_MAX = 0.5


def planted_class_index(images) -> int | None:
    """The one class whose comparison images carry squares, or None (no planting, or several classes)."""
    if images.planting is None:
        return None
    planted = np.flatnonzero(images.planting.probabilities(images.class_names) > 0)
    return int(planted[0]) if len(planted) == 1 else None


def predicted_classes(model, source, image_index, planting, batch_size: int, device) -> np.ndarray:
    """The model's predicted class for whole images (squares painted where `planting` says), (n,) int64.

    Loaded a batch at a time, so an ImageNet-sized comparison never holds all its inputs at once.
    """
    from rsvc_cli.stages.train import load_inputs

    image_index = np.asarray(image_index, dtype=np.int64)
    module = model.module.to(device).eval()
    predicted = [np.zeros(0, np.int64)]
    with torch.inference_mode():
        for start in range(0, len(image_index), batch_size):
            inputs = load_inputs(model, source, image_index[start:start + batch_size], planting)
            predicted.append(module(inputs.to(device)).argmax(-1).cpu().numpy())
    return np.concatenate(predicted)


def output_index(model_cfg, class_name: str, fallback: int) -> int:
    """The model's output unit for `class_name`: its position among the training classes of a model
    rsvc trained (a comparison may use fewer classes, in another order), else `fallback`."""
    from rsvc_cli.stages.common import make_source, to_plain

    if not model_cfg.train.enabled:
        return fallback
    names = list(make_source(to_plain(model_cfg.train.dataset)).class_names)
    return names.index(class_name) if class_name in names else fallback


def shortcut_rates(pair, cfg, planted_class: int) -> dict:
    """Per model, how often images of the other classes are called the planted class, without and with the square.

    The images are the comparison's (never seen in training); the square has the comparison's
    colour, size and placement seed, on every image.
    """
    from dataclasses import replace

    from rsvc_cli.stages.common import resolve_device

    images = pair.images
    name = images.class_names[planted_class]
    others = images.image_index[images.label != planted_class]
    everywhere = replace(images.planting, class_probability=1.0)
    device = resolve_device(cfg.device)
    rates = {}
    for owner, model in ((1, pair.model1), (2, pair.model2)):
        unit = output_index(cfg[f"model{owner}"], name, planted_class)
        without = predicted_classes(model, images.source, others, None, int(cfg.batch_size), device)
        with_square = predicted_classes(model, images.source, others, everywhere, int(cfg.batch_size), device)
        rates[f"model{owner}"] = {"without": float(np.mean(without == unit)), "with": float(np.mean(with_square == unit)),
                                  "n_images": len(others)}
    rates["model1"]["passed"] = bool(rates["model1"]["with"] >= SHORTCUT_RATIO_MIN * rates["model1"]["without"]
                                     and rates["model1"]["with"] >= SHORTCUT_RATE_MIN)
    rates["model2"]["passed"] = bool(rates["model2"]["with"] - rates["model2"]["without"] <= MODEL2_INCREASE_MAX)
    rates["passed"] = rates["model1"]["passed"] and rates["model2"]["passed"]
    return rates


def square_concept(result: dict, class_name: str) -> dict:
    """Model 1's lowest-2->1 concept in `class_name` against the class's square-free concepts."""
    scores = result["classes"][class_name]
    similarity = np.asarray(scores["similarity"]["2->1"], dtype=np.float64)
    unpredictable = np.asarray(scores["unpredictable"]["2->1"], dtype=bool)
    content = np.array([result["square_content"].get((class_name, "model1", k), np.nan) for k in range(len(similarity))])
    # A concept model 2 cannot predict at all scores 0 (score.py) and competes like any other; only
    # undefined ones (constant true coefficients: nothing to find) are left out, and counted.
    undefined = ~np.isfinite(similarity)
    # All-undefined similarities name no concept: the check fails, it does not crash.
    lowest = int(np.nanargmin(similarity)) if not undefined.all() else 0
    square_free = similarity[(content < LOW_SQUARE_CONTENT) & ~undefined]
    median = float(np.median(square_free)) if len(square_free) else float("nan")
    out = {"class": class_name, "concept": lowest, "similarity": float(similarity[lowest]),
           "unpredictable": bool(unpredictable[lowest]), "n_undefined": int(undefined.sum()),
           "square_content": float(content[lowest]), "square_free_median": median,
           "n_square_free": len(square_free), "similarities": similarity.tolist(), "square_contents": content.tolist()}
    out["passed"] = bool(out["square_content"] >= SQUARE_CONTENT_MIN and np.isfinite(median)
                         and np.isfinite(out["similarity"]) and out["similarity"] <= SIMILARITY_RATIO_MAX * median)
    return out


def planted_check(pair, cfg, result: dict) -> dict | None:
    """Both checks, printed; None (and silent) unless the comparison plants squares on exactly one class."""
    planted_class = planted_class_index(pair.images)
    if planted_class is None or "square_content" not in result:
        return None
    name = pair.images.class_names[planted_class]
    concept = square_concept(result, name)
    rates = shortcut_rates(pair, cfg, planted_class)
    console.table(
        f"shortcut: images of the other classes called '{name}' (n = {rates['model1']['n_images']})",
        ["model", "without square", "with square", "ratio", "passes"],
        [(f"model{owner}", r["without"], r["with"], _ratio(r["with"], r["without"]), _yes(r["passed"]))
         for owner, r in ((1, rates["model1"]), (2, rates["model2"]))],
        caption=f"Model 1 should use the square (>= {SHORTCUT_RATIO_MIN:g}x and >= {SHORTCUT_RATE_MIN:.0%}), "
                f"model 2 not (at most {MODEL2_INCREASE_MAX:.0%} more).")
    console.table(
        f"square concept: model 1's concepts of '{name}', lowest 2->1 similarity first",
        ["k", "2->1 similarity", "square content"],
        sorted(zip(range(len(concept["similarities"])), concept["similarities"], concept["square_contents"]),
               key=lambda row: (np.inf if not np.isfinite(row[1]) else row[1])),
        caption=f"Lowest: concept {concept['concept']}, similarity {console.fmt(concept['similarity'])}"
                + (" (unpredictable: model 2 predicts a constant)" if concept["unpredictable"] else "")
                + f", square content {console.fmt(concept['square_content'])}; median of the "
                f"{concept['n_square_free']} concepts with square content < {LOW_SQUARE_CONTENT:g}: "
                f"{console.fmt(concept['square_free_median'])}"
                + (f"; n undefined: {concept['n_undefined']} (true coefficients constant)" if concept["n_undefined"] else "")
                + ".")
    passed = rates["passed"] and concept["passed"]
    console.say(f"[bold]planted-concept experiment: {'PASSED' if passed else 'FAILED'}[/bold] "
                f"(shortcut learned by model 1 only: {_yes(rates['passed'])}; square concept found and unique "
                f"to model 1: {_yes(concept['passed'])})")
    return {"planted_class": name, "shortcut": rates, "square_concept": concept, "passed": passed}


def _ratio(with_square: float, without: float) -> float:
    return with_square / without if without > 0 else (float("inf") if with_square > 0 else float("nan"))


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"

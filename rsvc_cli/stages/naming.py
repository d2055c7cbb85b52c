"""What a comparison's two models are called on screen: `model1.label` / `model2.label`.

Labels are for display only (console lines, charts, report titles and cards); artifact keys and file
names keep the model's `name`, so relabelling a model reuses everything already stored. A label not
given is the model's name (a built-in or timm name, or the class of a `_target_`); when both models
would then read the same, each gets what tells them apart (the checkpoint file's stem, "pretrained",
"trained by rsvc", or at worst "model 1" / "model 2"), e.g. "cifar_resnet20 (resnet20-12fca82f)".
"""

from __future__ import annotations

from pathlib import Path

from rsvc_cli.errors import RsvcError

PAIR_MODELS = ("model1", "model2")


def _base_name(model_cfg) -> str:
    target = model_cfg.get("_target_")
    if target and model_cfg.get("name") in (None, "", "custom"):
        return str(target).replace(":", ".").rsplit(".", 1)[-1]
    return str(model_cfg.get("name"))


def _weights_detail(model_cfg) -> str | None:
    if model_cfg.get("train") is not None and model_cfg.train.get("enabled"):
        return "trained by rsvc"
    if model_cfg.get("checkpoint"):
        return Path(str(model_cfg.checkpoint)).stem
    if model_cfg.get("pretrained"):
        return "pretrained"
    return None


def model_labels(cfg) -> dict[str, str]:
    """{"model1": label, "model2": label}, always two different strings."""
    given = {key: cfg[key].get("label") for key in PAIR_MODELS}
    labels = {key: str(given[key]) if given[key] else _base_name(cfg[key]) for key in PAIR_MODELS}
    if given["model1"] and given["model2"] and labels["model1"] == labels["model2"]:
        raise RsvcError(f"model1.label and model2.label are both {labels['model1']!r}, so no chart, card or console "
                        "line could tell the two models apart.",
                        "Give the models different labels (model2.label=...), or leave one out to have it derived.")
    if labels["model1"] == labels["model2"]:
        details = {key: _weights_detail(cfg[key]) for key in PAIR_MODELS}
        for position, key in enumerate(PAIR_MODELS, start=1):
            if given[key]:
                continue
            detail = details[key] if details[key] and details["model1"] != details["model2"] else f"model {position}"
            labels[key] = f"{labels[key]} ({detail})"
    return labels


def direction_text(labels: dict, direction: str) -> str:
    """ "2->1" -> "ResNet-56 predicts ResNet-20's concepts (2->1)"; self baselines likewise."""
    source, target = direction.split("->")
    predictor, owner = labels[f"model{source}"], labels[f"model{target}"]
    if source == target:
        return f"{owner} predicts its own concepts ({direction}, self baseline)"
    return f"{predictor} predicts {owner}'s concepts ({direction})"

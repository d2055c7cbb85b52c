"""rsvc layers: a model's module names (what `layers=`, `layer1=`, `layer2=` accept), their outputs, and
whether each can be recorded (and why not)."""

from __future__ import annotations

from rsvc_cli import console
from rsvc_cli.stages.common import load_model


def run(cfg) -> list:
    from rsvc_cli.models.hooks import describe_layers

    model = load_model(cfg.model, cfg)
    layers = describe_layers(model.module, model.input_size)
    console.table(f"{model.label}: layers at input {model.input_size}x{model.input_size}",
                  ["layer", "output", "recordable", "as / why not"],
                  [(info.name, info.output, "yes" if info.recordable else "no", info.kind or info.reason)
                   for info in layers],
                  caption="Recorded as one vector per patch: feature maps averaged over space (channels-last maps "
                          "where the model declares them), token sequences by the CLS token or the token mean "
                          "(model.token_reduce), vectors as they are.")
    return layers

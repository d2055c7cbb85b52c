"""rsvc layers: a model's module names (what `layers=`, `layer1=`, `layer2=` accept) and output shapes."""

from __future__ import annotations

from rsvc_cli import console
from rsvc_cli.stages.common import load_model


def run(cfg) -> list[tuple[str, tuple]]:
    from rsvc_cli.models.hooks import list_layers

    model = load_model(cfg.model, cfg)
    layers = list_layers(model.module, model.input_size)
    console.table(f"{model.label}: layers at input {model.input_size}x{model.input_size}",
                  ["layer", "output shape"], [(name, " x ".join(map(str, shape))) for name, shape in layers],
                  caption="Feature maps are averaged over space; token outputs give the CLS token or the token mean.")
    return layers

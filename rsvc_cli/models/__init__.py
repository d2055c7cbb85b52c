"""Models: names to modules (built-in CIFAR nets, timm, import paths), checkpoints, layer recording."""

from rsvc_cli.models.hooks import (
    LayerRecorder,
    list_layers,
    model_has_cls_token,
    reduce_to_vectors,
    resolve_layer_names,
)
from rsvc_cli.models.loading import DataConfig, file_digest
from rsvc_cli.models.registry import LoadedModel, list_builtin_models, make_model

__all__ = [
    "DataConfig",
    "LayerRecorder",
    "LoadedModel",
    "file_digest",
    "list_builtin_models",
    "list_layers",
    "make_model",
    "model_has_cls_token",
    "reduce_to_vectors",
    "resolve_layer_names",
]

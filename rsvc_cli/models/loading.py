"""Checkpoints and preprocessing: strict loads with readable errors, file digests, data configs.

A checkpoint is a local file holding a plain state dict, a dict with a ``state_dict`` / ``model``
entry (timm and most training scripts), or a safetensors file. ``module.`` (DataParallel) and
``_orig_mod.`` (torch.compile) prefixes are stripped. The load is strict: any missing, unexpected
or mis-shaped key is an ``RsvcError`` that lists a few of them and names the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rsvc_cli.errors import RsvcError, clip

# Keys under which training scripts nest the weights, in order of preference.
STATE_DICT_ENTRIES = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")
# Prefixes wrappers add to every key: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# How many offending keys an error message shows per kind.
N_KEYS_SHOWN = 5


@dataclass(frozen=True)
class DataConfig:
    """How images become model input: the shorter side resized to ``floor(input_size / crop_pct)``
    with ``interpolation``, a centre crop of ``input_size`` (square, in pixels), x/255 normalized by
    mean/std: timm's evaluation transform (``crop_mode="center"``)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"


# ------------------------------------------------------------------------------------------
# File digests
# ------------------------------------------------------------------------------------------

_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 hex of a file, cached in-process by (absolute path, size, mtime)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    cache_key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _DIGEST_CACHE:
        sha256 = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha256.update(block)
        _DIGEST_CACHE[cache_key] = sha256.hexdigest()
    return _DIGEST_CACHE[cache_key]


# ------------------------------------------------------------------------------------------
# Reading checkpoints
# ------------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint file as a flat {key: tensor} dict, wrapper prefixes stripped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RsvcError(
            problem=f"Checkpoint file {str(path)!r} does not exist.",
            fix="Pass the path of a local weights file as model.checkpoint=PATH.",
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:  # pragma: no cover - timm depends on safetensors
            raise RsvcError(
                problem=f"Reading {str(path)!r} needs the safetensors package, which is not installed.",
                fix="Install it with `pip install safetensors`.",
            ) from error
        try:
            raw = load_file(str(path), device="cpu")
        except Exception as error:
            raise _unreadable(path, error) from error
    else:
        try:
            # weights_only keeps a checkpoint from running code; timm training checkpoints
            # also store their argparse arguments, which are harmless.
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise _unreadable(path, error) from error
    return strip_wrapper_prefixes(_find_state_dict(raw, path))


def _unreadable(path: Path, error: Exception) -> RsvcError:
    if "Unsupported global" in str(error):  # a pickled object, not a damaged file
        return RsvcError(
            problem=f"Checkpoint {str(path)!r} holds pickled Python objects besides tensors, which rsvc does "
            "not load because unpickling them could run any code (torch.load with weights_only=True).",
            fix="Where you trust the file, save its weights alone with torch.save(model.state_dict(), PATH) "
            "and pass that file as model.checkpoint=PATH.",
        )
    return RsvcError(
        problem=f"Checkpoint {str(path)!r} could not be read as torch weights ({type(error).__name__}: "
        f"{clip(error) or 'no message'}).",
        fix="Pass a file saved with torch.save(model.state_dict(), PATH) (or a .safetensors file) "
        "as model.checkpoint=PATH.",
    )


def _find_state_dict(raw: object, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(raw, Mapping):
        for entry in STATE_DICT_ENTRIES:
            nested = raw.get(entry)
            if isinstance(nested, Mapping) and nested:
                return _find_state_dict(nested, path)
        # A plain state dict: tensors, plus any `_extra_state` objects modules chose to save.
        n_tensors = sum(isinstance(value, torch.Tensor) for value in raw.values())
        n_extra = sum(str(key).endswith("_extra_state") for key in raw)
        if n_tensors and n_tensors + n_extra >= len(raw):
            return raw
        shown = ", ".join(repr(key) for key in list(raw)[:8])
        raise RsvcError(
            problem=f"Checkpoint {str(path)!r} holds no state dict: its top-level keys are {shown}.",
            fix="Save the weights with torch.save(model.state_dict(), PATH) or under a 'state_dict' "
            "or 'model' key, and pass that file as model.checkpoint=PATH.",
        )
    raise RsvcError(
        problem=f"Checkpoint {str(path)!r} holds a {type(raw).__name__}, not a state dict.",
        fix="Save the weights with torch.save(model.state_dict(), PATH) and pass that file as "
        "model.checkpoint=PATH.",
    )


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` prefixes (possibly nested) from every key."""
    stripped = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        stripped[key] = value
    return stripped


# ------------------------------------------------------------------------------------------
# Strict loading
# ------------------------------------------------------------------------------------------


def load_checkpoint(module: nn.Module, path: str | os.PathLike, model_name: str) -> nn.Module:
    """Load a checkpoint file into ``module`` strictly; a mismatch is an RsvcError naming the fix."""
    load_state_dict_strict(module, read_state_dict(path), model_name, source=str(path))
    return module


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], model_name: str, source: str
) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with the mismatch spelled out."""
    expected = module.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself (old checkpoints lack it), so a
    # strict load succeeds without it.
    missing = [
        key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")
    ]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        (key, tuple(state_dict[key].shape), tuple(value.shape))
        for key, value in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    if missing or unexpected or mismatched:
        raise _mismatch_error(module, model_name, source, missing, unexpected, mismatched)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise RsvcError(
            problem=f"Checkpoint {source!r} does not load into model {model_name!r}: "
            f"{clip(error)}.",
            fix="Pass the checkpoint trained for this architecture as model.checkpoint=PATH.",
        ) from error


def _mismatch_error(module, model_name, source, missing, unexpected, mismatched) -> RsvcError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
    if mismatched:
        shown = ", ".join(
            f"{key}: checkpoint {ckpt_shape} vs model {model_shape}"
            for key, ckpt_shape, model_shape in mismatched[:N_KEYS_SHOWN]
        )
        parts.append(f"{len(mismatched)} key(s) of another shape ({shown})")
    problem = f"Checkpoint {source!r} does not match model {model_name!r}: " + "; ".join(parts) + "."

    only_shapes_differ = mismatched and not (missing or unexpected)
    head_classes = _head_class_count(module, mismatched) if only_shapes_differ else None
    if head_classes is not None:
        fix = (
            f"Only the classifier differs: the checkpoint has {head_classes} classes, so set "
            f"model.num_classes={head_classes}."
        )
    elif _is_import_path(model_name):
        fix = (
            f"Build {model_name} with the arguments the checkpoint was saved with (model.kwargs, "
            "e.g. model.kwargs.depth=32), or pass the checkpoint trained for this module as "
            "model.checkpoint=PATH."
        )
    else:
        fix = (
            "Set model.name to the architecture the checkpoint was saved from, or pass the "
            "checkpoint trained for this model as model.checkpoint=PATH."
        )
    return RsvcError(problem=problem, fix=fix)


def _is_import_path(name: str) -> bool:
    """A custom model is labelled by its import path (pkg.module.Class or pkg.module:function)."""
    return ":" in name or name.count(".") >= 2


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:N_KEYS_SHOWN])
    return shown + (", ..." if len(keys) > N_KEYS_SHOWN else "")


def _head_class_count(module: nn.Module, mismatched) -> int | None:
    """The checkpoint's class count when the only difference is the rows of one Linear head."""
    owners = {key.rsplit(".", 1)[0] for key, _, _ in mismatched}
    if len(owners) != 1 or not isinstance(dict(module.named_modules()).get(owners.pop()), nn.Linear):
        return None
    rows = {ckpt_shape[0] for _, ckpt_shape, _ in mismatched}
    same_inputs = all(ckpt_shape[1:] == model_shape[1:] for _, ckpt_shape, model_shape in mismatched)
    return rows.pop() if len(rows) == 1 and same_inputs else None


# ------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------


def data_config_of(module: nn.Module) -> DataConfig:
    """A model's preprocessing: its own ``data_config`` if it carries one, else timm's resolution
    (the pretrained config of its ``arch.tag``, present whether or not the weights are downloaded).

    timm falls back to 224 px, ImageNet mean/std, bicubic, crop_pct 0.875 for modules without a
    pretrained config.
    """
    own = getattr(module, "data_config", None)
    if isinstance(own, DataConfig):
        return own
    from timm.data import resolve_model_data_config
    from timm.data.constants import DEFAULT_CROP_PCT

    resolved = resolve_model_data_config(module)
    _, height, width = resolved["input_size"]
    # Patches are square; a non-square default input keeps its height as the side.
    side = int(height if height == width else max(height, width))
    return DataConfig(
        input_size=side,
        mean=tuple(float(value) for value in _three(resolved["mean"])),
        std=tuple(float(value) for value in _three(resolved["std"])),
        interpolation=str(resolved.get("interpolation", "bicubic")),
        crop_pct=float(resolved.get("crop_pct") or DEFAULT_CROP_PCT),
        crop_mode=str(resolved.get("crop_mode") or "center"),
    )


def _three(values) -> tuple:
    values = tuple(values)
    return values * 3 if len(values) == 1 else values

"""One entry point from a model name to a ready module: ``make_model``.

Resolution: an explicit ``target`` import path wins (``name`` is then only its label); otherwise
``name`` is looked up among the built-in CIFAR models, then timm (``arch`` or ``arch.tag``, and
``hf-hub:`` ids), then, if it looks like one, as an import path itself. Weights come from a local
``checkpoint`` (strict load) or, for timm, from timm's pretrained download.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rsvc_cli.errors import RsvcError, clip
from rsvc_cli.models.cifar import BUILTIN_MODELS
from rsvc_cli.models.loading import DataConfig, data_config_of, file_digest, load_checkpoint

HF_HUB_PREFIXES = ("hf-hub:", "hf_hub:")
N_SUGGESTIONS = 5
# Seconds to wait for a TCP connection to the weights' host (or the proxy) before working offline:
# without it the Hub client retries for about a minute when there is no network.
HUB_PROBE_TIMEOUT_S = 4.0


@dataclass
class LoadedModel:
    """A model in eval mode with what the rest of the pipeline needs to know about it."""

    module: nn.Module
    name: str
    data_config: DataConfig
    num_classes: int
    checkpoint_digest: str | None  # SHA-256 hex of the checkpoint file; None without one


def list_builtin_models() -> list[str]:
    """Names of the models defined in this package (CIFAR-10 classifiers)."""
    return sorted(BUILTIN_MODELS)


def make_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    target: str | None = None,
    num_classes: int | None = None,
    kwargs: dict | None = None,
) -> LoadedModel:
    """Build a model by name (built-in, timm) or import path, load its weights, put it in eval mode."""
    kwargs = dict(kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).expanduser())
    label = name or target or ""
    if not label:
        raise RsvcError(
            problem="No model was named.",
            fix="Set model.name to a built-in or timm name, or model.target to an import path.",
        )

    if target:
        module = _make_from_target(target, kwargs, pretrained, checkpoint, label)
    elif name in BUILTIN_MODELS:
        module = _make_builtin(name, kwargs, pretrained, checkpoint)
    elif _is_timm_name(name):
        module = _make_timm(name, kwargs, pretrained, checkpoint)
    elif _looks_like_import_path(name):
        module = _make_from_target(name, kwargs, pretrained, checkpoint, label)
    else:
        raise _unknown_model_error(name)

    digest = None
    if checkpoint is not None:
        load_checkpoint(module, checkpoint, target or label)
        digest = file_digest(checkpoint)
    module.eval()
    data_config = data_config_of(module)
    return LoadedModel(
        module=module,
        name=label,
        data_config=data_config,
        num_classes=_count_classes(module, data_config, num_classes),
        checkpoint_digest=digest,
    )


# ------------------------------------------------------------------------------------------
# Built-in models
# ------------------------------------------------------------------------------------------


def _make_builtin(name: str, kwargs: dict, pretrained: bool, checkpoint: str | None) -> nn.Module:
    if pretrained and checkpoint is None:
        raise RsvcError(
            problem=f"Built-in model {name!r} has no download of pretrained weights.",
            fix="Pass its weights file as model.checkpoint=PATH (the CIFAR-10 weights live in "
            "shared/models/cifar10).",
        )
    return _call_constructor(BUILTIN_MODELS[name], kwargs, name)


# ------------------------------------------------------------------------------------------
# timm models
# ------------------------------------------------------------------------------------------


def _is_timm_name(name: str) -> bool:
    import timm

    return name.startswith(HF_HUB_PREFIXES) or timm.is_model(name)


def _make_timm(name: str, kwargs: dict, pretrained: bool, checkpoint: str | None) -> nn.Module:
    import timm

    download = pretrained and checkpoint is None
    unreachable = _go_offline_unless_reachable(name) if download else None
    if not name.startswith(HF_HUB_PREFIXES):
        _check_pretrained_tag(name)
        if download:
            _check_weights_reachable(name)
    try:
        return timm.create_model(name, pretrained=download, **kwargs)
    except TypeError as error:
        raise RsvcError(
            problem=f"timm model {name!r} does not accept the arguments {sorted(kwargs)}: {error}.",
            fix="Remove or rename the offending entries of model.kwargs.",
        ) from error
    except Exception as error:
        if not download:
            raise RsvcError(
                problem=f"timm could not build model {name!r} ({type(error).__name__}: {_first_line(error)}).",
                fix="Check model.name and model.kwargs against timm's documentation for this model.",
            ) from error
        why = (f"{unreachable} cannot be reached and they are not in the local cache" if unreachable
               else f"{type(error).__name__}: {_first_line(error)}")
        raise RsvcError(
            problem=f"Pretrained weights for timm model {name!r} could not be obtained ({why}).",
            fix="Download them where there is network access, or pass a local weights file as "
            "model.checkpoint=PATH.",
        ) from error


def _check_pretrained_tag(name: str) -> None:
    """An unknown ``arch.tag`` is an RsvcError listing the tags timm has for ``arch``."""
    import timm
    from timm.models import get_pretrained_cfg

    try:
        get_pretrained_cfg(name)
    except RuntimeError as error:
        arch = name.split(".", 1)[0]
        tags = timm.list_pretrained(f"{arch}.*")
        close = difflib.get_close_matches(name, tags, n=N_SUGGESTIONS, cutoff=0.0)
        raise RsvcError(
            problem=f"timm has no weights tagged {name!r} ({_first_line(error)}).",
            fix=f"Use one of: {', '.join(close)}." if close else f"Use the plain architecture {arch!r}.",
        ) from error


def _hub_offline() -> bool:
    from huggingface_hub import constants as hub_constants

    return getattr(hub_constants, "is_offline_mode", lambda: hub_constants.HF_HUB_OFFLINE)()


def _go_offline_unless_reachable(name: str) -> str | None:
    """Switch the Hub client to offline mode (cached weights only) when the weights' host, or the
    proxy in between, does not answer within HUB_PROBE_TIMEOUT_S: the failure then comes at once.
    Returns the host that could not be reached, None when it could (or offline mode was set)."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants as hub_constants

    if _hub_offline():
        return None
    url = hub_constants.ENDPOINT
    if not name.startswith(HF_HUB_PREFIXES):
        from timm.models import get_pretrained_cfg

        try:
            pretrained_cfg = get_pretrained_cfg(name)
        except RuntimeError:
            return None  # an unknown tag: _check_pretrained_tag says so
        if pretrained_cfg is not None and not pretrained_cfg.hf_hub_id and pretrained_cfg.url:
            url = pretrained_cfg.url
    target = urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    reached = []

    def probe():  # name resolution ignores socket timeouts, hence the thread
        try:
            socket.create_connection(address, timeout=HUB_PROBE_TIMEOUT_S).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 1)
    if reached:
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    return address[0]


def _check_weights_reachable(name: str) -> None:
    """Fail at once, offline, for weights timm would fetch from a URL (torch.hub has no offline mode)."""
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    if not _hub_offline() or pretrained_cfg is None or pretrained_cfg.hf_hub_id:
        return  # the Hugging Face Hub client itself fails fast offline
    url = pretrained_cfg.url or ""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if url and not cached.is_file():
        raise RsvcError(
            problem=f"Pretrained weights for timm model {name!r} are not cached, and the network cannot be "
            "reached or HF_HUB_OFFLINE is set.",
            fix="Download them where there is network access, or pass a local weights file as "
            "model.checkpoint=PATH.",
        )


# ------------------------------------------------------------------------------------------
# Import paths
# ------------------------------------------------------------------------------------------


def _looks_like_import_path(name: str) -> bool:
    head, _, tail = name.partition(":") if ":" in name else name.rpartition(".")
    return bool(head and tail) and all(part.isidentifier() for part in head.split(".") + [tail])


def _make_from_target(
    target: str, kwargs: dict, pretrained: bool, checkpoint: str | None, label: str
) -> nn.Module:
    if pretrained and checkpoint is None:
        raise RsvcError(
            problem=f"Model {label!r} comes from the import path {target!r}, which has no pretrained download.",
            fix="Pass its weights file as model.checkpoint=PATH, or the constructor's own weight "
            "options through model.kwargs.",
        )
    constructor = _import_object(target)
    module = _call_constructor(constructor, kwargs, target)
    if not isinstance(module, nn.Module):
        raise RsvcError(
            problem=f"{target!r} returned a {type(module).__name__}, not a torch module.",
            fix="Point the import path at an nn.Module class or a function that returns one.",
        )
    return module


def _import_object(target: str):
    module_path, _, attribute = target.partition(":") if ":" in target else target.rpartition(".")
    if not module_path or not attribute:
        raise RsvcError(
            problem=f"{target!r} is not an import path.",
            fix="Write it as 'package.module.Class' or 'package.module:function'.",
        )
    try:
        imported = importlib.import_module(module_path)
    except ImportError as error:
        raise RsvcError(
            problem=f"Cannot import {module_path!r} for model {target!r}: {_first_line(error)}.",
            fix="Install the package that defines it or add its folder to PYTHONPATH.",
        ) from error
    obj = imported
    for part in attribute.split("."):
        if not hasattr(obj, part):
            available = [n for n in dir(imported) if not n.startswith("_")]
            close = difflib.get_close_matches(part, available, n=N_SUGGESTIONS)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise RsvcError(
                problem=f"Module {module_path!r} has no attribute {attribute!r}.{hint}",
                fix="Correct the import path of the model.",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RsvcError(
            problem=f"{target!r} is a {type(obj).__name__}, not a class or function.",
            fix="Point the import path at an nn.Module class or a function that returns one.",
        )
    return obj


def _call_constructor(constructor, kwargs: dict, label: str) -> nn.Module:
    """Call the constructor with model.kwargs; a missing, unknown or rejected argument is named."""
    import inspect

    try:
        signature = inspect.signature(constructor)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        signature = None
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [] if takes_any else [k for k in kwargs if k not in named]
        if unknown:
            close = difflib.get_close_matches(unknown[0], named, n=N_SUGGESTIONS)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise RsvcError(
                problem=f"Model {label!r} takes no argument {unknown[0]!r} (its arguments: {', '.join(named)}).{hint}",
                fix=f"Remove or rename model.kwargs.{unknown[0]}.",
            )
        missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise RsvcError(
                problem=f"Model {label!r} needs the argument{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)}, which model.kwargs does not give.",
                fix="Set " + " ".join(f"model.kwargs.{n}=VALUE" for n in missing) + " (model1.kwargs... and "
                "model2.kwargs... in a comparison).",
            )
    try:
        return constructor(**kwargs)
    except (TypeError, ValueError) as error:
        raise RsvcError(
            problem=f"Model {label!r} rejects the arguments model.kwargs={kwargs}: {_first_line(error)}.",
            fix="Correct the entries of model.kwargs (or model.num_classes) named above.",
        ) from error


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def _count_classes(module: nn.Module, data_config: DataConfig, requested: int | None) -> int:
    """Classes the module predicts: its ``num_classes``, else the width of one dummy forward."""
    count = getattr(module, "num_classes", None)
    if isinstance(count, int) and count > 0:
        return count
    if requested is not None:
        return int(requested)
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    side = data_config.input_size
    try:
        with torch.no_grad():
            logits = module(torch.zeros(1, 3, side, side, device=device))
    except Exception as error:
        raise RsvcError(
            problem=f"The model cannot run on a batch of 3x{side}x{side} images "
            f"({type(error).__name__}: {_first_line(error)}).",
            fix="Give the model a `data_config` attribute (rsvc_cli.models.loading.DataConfig) with its "
            "input size, or pass model.num_classes.",
        ) from error
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise RsvcError(
            problem=f"The model's forward pass returns {type(logits).__name__}"
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else ''}, not (batch, classes) logits.",
            fix="Wrap the model so that forward(images) returns a (batch, classes) tensor.",
        )
    return int(logits.shape[1])


def _unknown_model_error(name: str) -> RsvcError:
    import timm

    candidates = list_builtin_models() + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=N_SUGGESTIONS, cutoff=0.5)
    known = f" Close matches: {', '.join(close)}." if close else ""
    return RsvcError(
        problem=f"Unknown model {name!r}: it is neither built in ({', '.join(list_builtin_models())}) "
        f"nor a timm model.{known}",
        fix="Set model.name to a built-in or timm name (timm.list_models() lists them), or give a "
        "torch module by import path as model._target_=pkg.module.Class.",
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return clip(text, 300) if text else type(error).__name__

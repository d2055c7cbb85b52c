"""Recording layer outputs: layer names, one vector per input, many layers in one forward pass.

A layer is any named submodule (``layer3``, ``blocks.5``, ``l4``); its output is what its forward
returns. ``LayerRecorder`` reduces each recorded output to one vector per input inside the hook, so
large feature maps never pile up: feature maps (n, c, h, w) by their spatial mean, token sequences
(n, t, d) by the CLS token or the mean of the patch tokens, vectors (n, d) as they are.
"""

from __future__ import annotations

import contextlib
import difflib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rsvc_cli.errors import RsvcError

TOKEN_REDUCTIONS = ("cls", "mean")
N_SUGGESTIONS = 5
# Output ranks a layer may have: (n, d) vectors, (n, t, d) tokens, (n, c, h, w) feature maps.
REDUCIBLE_RANKS = (2, 3, 4)
# timm's patch embedding emits patch tokens only; the prefix (CLS, register) tokens come later.
PATCH_EMBED_PREFIX = "patch_embed"

_LAYER_KINDS_FIX = (
    "Pick a module whose output is a feature map (n, c, h, w), a token sequence (n, t, d) or a "
    "vector (n, d) and that runs once per forward pass; `rsvc layers` lists them."
)


# ------------------------------------------------------------------------------------------
# Reducing one output to vectors
# ------------------------------------------------------------------------------------------


def reduce_to_vectors(
    output: torch.Tensor,
    token_reduce: str = "cls",
    num_prefix_tokens: int = 1,
    has_cls_token: bool | None = None,
    layer_name: str = "layer",
) -> torch.Tensor:
    """One float32 vector per input: (n, c, h, w) -> spatial mean, (n, t, d) -> CLS or token mean.

    A token sequence gives its CLS token (index 0) when ``token_reduce == "cls"`` and the model has
    one (``has_cls_token``, by default ``num_prefix_tokens > 0``); otherwise the mean of the patch
    tokens, i.e. without the ``num_prefix_tokens`` leading CLS/register tokens.
    """
    if token_reduce not in TOKEN_REDUCTIONS:
        raise RsvcError(
            problem=f"Unknown token reduction {token_reduce!r}.",
            fix=f"Use one of: {', '.join(TOKEN_REDUCTIONS)}.",
        )
    if not isinstance(output, torch.Tensor):
        raise RsvcError(
            problem=f"Layer {layer_name!r} outputs a {type(output).__name__}, not a tensor: a layer of "
            "the wrong kind for recording.",
            fix=_LAYER_KINDS_FIX,
        )
    if output.ndim not in REDUCIBLE_RANKS:
        raise RsvcError(
            problem=f"Layer {layer_name!r} outputs shape {tuple(output.shape)}, which has no one-vector-"
            "per-input reduction: a layer of the wrong kind for recording.",
            fix=_LAYER_KINDS_FIX,
        )
    # Reduce in float32: half-precision sums over thousands of positions lose digits.
    output = output.detach()
    if output.ndim == 2:
        return output.float()
    if output.ndim == 4:
        return output.float().mean(dim=(2, 3))
    if has_cls_token is None:
        has_cls_token = num_prefix_tokens > 0
    if token_reduce == "cls" and has_cls_token:
        return output[:, 0].float()
    if output.shape[1] <= num_prefix_tokens:
        raise RsvcError(
            problem=f"Layer {layer_name!r} outputs {output.shape[1]} token(s), no patch tokens after the "
            f"{num_prefix_tokens} prefix token(s): a layer of the wrong kind for a token mean.",
            fix=_LAYER_KINDS_FIX,
        )
    return output[:, num_prefix_tokens:].float().mean(dim=1)


def model_has_cls_token(module: nn.Module) -> bool:
    """Whether the model prepends a class token to its token sequence (timm ViT convention)."""
    has_class_token = getattr(module, "has_class_token", None)
    if isinstance(has_class_token, bool):
        return has_class_token
    return isinstance(getattr(module, "cls_token", None), torch.Tensor)


def model_num_prefix_tokens(module: nn.Module) -> int:
    """Leading non-patch tokens (CLS, distillation, register) in the model's token sequence."""
    return int(getattr(module, "num_prefix_tokens", 0) or 0)


# ------------------------------------------------------------------------------------------
# Layer names
# ------------------------------------------------------------------------------------------


def layer_names_of(module: nn.Module) -> list[str]:
    """Every named submodule (the root excluded), in definition order."""
    return [name for name, _ in module.named_modules() if name]


def resolve_layer_names(
    module: nn.Module, names: str | Iterable[str], input_size: int | None = None
) -> list[str]:
    """Check layer names against the module: unknown names are an RsvcError with suggestions.

    With ``input_size``, also run one dummy forward and refuse layers whose output is not understood
    (``describe_layers``: not run, run several times, tuple outputs, shapes that are neither feature
    maps, token sequences nor vectors), naming the shape and the nearest recordable layers.
    Duplicates are dropped.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise RsvcError(problem="No layer was named.", fix="Name at least one layer, e.g. layer=NAME.")
    modules = dict(module.named_modules())
    valid = layer_names_of(module)
    unknown = [name for name in names if not name or name not in modules]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(str(name), valid, n=N_SUGGESTIONS, cutoff=0.5)
            hints.append(f"{name!r} (closest: {', '.join(close) or 'none'})")
        raise RsvcError(
            problem=f"Unknown layer name(s) for {type(module).__name__}: {'; '.join(hints)}.",
            fix="Use module names as printed by `rsvc layers` for this model (e.g. "
            f"{', '.join(valid[-3:])}).",
        )
    containers = [name for name in names if isinstance(modules[name], (nn.ModuleList, nn.ModuleDict))]
    if containers:
        raise RsvcError(
            problem=f"Layer(s) {', '.join(map(repr, containers))} are module containers that never run "
            "themselves: layers of the wrong kind for recording.",
            fix="Name one of their children instead (e.g. " + f"{containers[0]}.0).",
        )
    unique = list(dict.fromkeys(names))
    if input_size is not None:
        described = {info.name: info for info in describe_layers(module, input_size)}
        wrong = [described[name] for name in unique if not described[name].recordable]
        if wrong:
            recordable = [info.name for info in described.values() if info.recordable]
            problems = "; ".join(
                f"{info.name!r} ({info.output}) {info.reason} (nearest recordable layers: "
                f"{', '.join(nearest_layers(info.name, recordable)) or 'none'})"
                for info in wrong
            )
            raise RsvcError(
                problem=f"Layer(s) of the wrong kind for recording: {problems}.",
                fix="Record a layer whose output is a feature map (batch x channels x height x width, or "
                "channels-last where the model declares it), a token sequence (batch x tokens x channels) or a "
                "vector (batch x channels), once per forward pass; `rsvc layers` marks each module.",
            )
    return unique


def nearest_layers(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    """The ``n`` candidates closest to ``name`` in the module tree: most leading name parts in common
    (its parent and siblings first), then nearest in definition order."""
    parts = name.split(".")
    order = {candidate: position for position, candidate in enumerate(candidates)}

    def shared(candidate: str) -> int:
        common = 0
        for mine, theirs in zip(parts, candidate.split(".")):
            if mine != theirs:
                break
            common += 1
        return common

    anchor = max((order[c] for c in candidates if shared(c) == max(map(shared, candidates), default=0)), default=0)
    ranked = sorted((c for c in candidates if c != name),
                    key=lambda c: (-shared(c), not name.startswith(c + "."), abs(order[c] - anchor)))
    return ranked[:n]


@dataclass(frozen=True)
class LayerInfo:
    """One module as a layer: its output (without the batch axis) and whether it can be recorded."""

    name: str
    output: str  # "64 x 8 x 8", "tuple of 2 tensors (4, 2)", "not run"
    kind: str  # feature map | channels-last map | token sequence | vector | "" (not recordable)
    recordable: bool
    reason: str  # why not ("" when recordable)
    shape: tuple[int, ...] | None = None


def list_layers(module: nn.Module, input_size: int | Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape without batch) of every recordable layer (``describe_layers``), in
    definition order."""
    return [(info.name, info.shape) for info in describe_layers(module, input_size) if info.recordable]


def describe_layers(module: nn.Module, input_size: int | Sequence[int]) -> list[LayerInfo]:
    """Every named submodule as a layer, from one dummy forward (batch of 2), in definition order.

    Recordable: runs exactly once per forward pass and returns one tensor that is understood:
    (n, d) a vector, (n, t, d) a token sequence, (n, c, h, w) a feature map, or (n, h, w, c) where
    the layer or model declares channels-last (``is_channels_last``). A 4-d output counts as a
    feature map only when (h, w) is the spatial grid of one of the model's own convolutions, norms or
    poolings: an attention layer's (n, heads, tokens, head-dim) is none, and averaging its last two
    axes would give one number per head. The module's train/eval modes are left as they were.
    """
    height, width = _square(input_size)
    outputs: dict[str, object] = {}
    calls: Counter[str] = Counter()
    grids: set[tuple[int, int]] = set()
    modules = dict(module.named_modules())

    def make_hook(name: str, layer: nn.Module):
        def hook(_module, _inputs, output):
            calls[name] += 1
            outputs[name] = _shape_of(output)
            if isinstance(output, torch.Tensor) and output.ndim == 4 and isinstance(layer, _CHANNELS_FIRST_LAYERS):
                grids.add(tuple(output.shape[2:]))

        return hook

    handles = [submodule.register_forward_hook(make_hook(name, submodule)) for name, submodule in modules.items() if name]
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        with _evaluating(module), torch.no_grad():
            module(torch.zeros(2, 3, height, width, device=device))
    except RsvcError:
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise RsvcError(
            problem=f"The model cannot run on a batch of 3x{height}x{width} images to describe its layers "
            f"({type(error).__name__}: {first}).",
            fix="Set model.input_size to the input size the model expects, or check its model.kwargs.",
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return [_describe(name, modules[name], module, calls[name], outputs.get(name), grids)
            for name in layer_names_of(module)]


def _shape_of(output) -> object:
    """A tensor's shape without the batch axis, or a description of what else came out."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape[1:])
    if isinstance(output, (tuple, list)):
        parts = [tuple(item.shape[1:]) if isinstance(item, torch.Tensor) else type(item).__name__ for item in output]
        return ("tuple", parts)
    return ("object", type(output).__name__)


def _describe(name: str, layer: nn.Module, model: nn.Module, n_calls: int, shape, grids) -> LayerInfo:
    def refused(output: str, reason: str) -> LayerInfo:
        return LayerInfo(name, output, "", False, reason)

    if isinstance(layer, (nn.ModuleList, nn.ModuleDict)):
        return refused("not run", "is a module container that never runs itself")
    if n_calls == 0:
        return refused("not run", "does not run in a forward pass")
    if isinstance(shape, tuple) and shape and shape[0] == "tuple":
        parts = ", ".join(" x ".join(map(str, p)) if isinstance(p, tuple) else p for p in shape[1])
        return refused(f"tuple of {len(shape[1])} ({parts})", f"outputs a tuple of {len(shape[1])} values, not one tensor")
    if isinstance(shape, tuple) and shape and shape[0] == "object":
        return refused(str(shape[1]), f"outputs a {shape[1]}, not a tensor")
    output = "batch x " + " x ".join(map(str, shape)) if shape else "batch"
    if n_calls > 1:
        return refused(output, f"runs {n_calls} times per forward pass")
    rank = len(shape) + 1
    if rank == 2:
        return LayerInfo(name, output, "vector", True, "", shape)
    if rank == 3:
        return LayerInfo(name, output, "token sequence", True, "", shape)
    if rank == 4 and is_channels_last(model, layer, name):
        return LayerInfo(name, output, "channels-last map", True, "", shape)
    if rank == 4 and tuple(shape[1:]) in grids:
        return LayerInfo(name, output, "feature map", True, "", shape)
    if rank == 4:
        return refused(output, "is no feature map: its last two axes are no spatial grid of the model's (as in an "
                       "attention layer's batch x heads x tokens x head-dim), nor a token sequence or a vector")
    return refused(output, f"has rank {rank}: neither a feature map, a token sequence nor a vector")


@contextlib.contextmanager
def _evaluating(module: nn.Module):
    """Eval mode (no BatchNorm statistics updates, no dropout) inside, every submodule's own
    train/eval mode restored after."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    try:
        module.eval()
        yield module
    finally:
        for submodule, training in modes.items():
            submodule.training = training


def _square(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    sizes = tuple(int(value) for value in input_size)
    return sizes[-2], sizes[-1]  # (h, w) or (c, h, w)


# ------------------------------------------------------------------------------------------
# Recording


class _AllRecorded(Exception):
    """Raised from the last layer's hook to end a forward pass early (LayerRecorder(stop_early=True))."""


# Torch's own spatial layers: (n, c, h, w) by definition, whatever the model around them declares.
_CHANNELS_FIRST_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                          nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
                          nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                          nn.modules.pooling._AdaptiveMaxPoolNd)


def _declared_format(module: nn.Module) -> str | None:
    output_format = getattr(module, "output_fmt", None)
    return None if output_format is None else str(getattr(output_format, "value", output_format)).upper()


def is_channels_last(model: nn.Module, layer: nn.Module, name: str | None = None) -> bool:
    """Whether ``layer``'s 4-d output is (n, h, w, c) rather than torch's (n, c, h, w).

    A layer that declares its format (timm's PatchEmbed ``output_fmt``) says so itself; torch's
    convolutions, norms and poolings are channels-first by definition; any other layer follows the
    format its nearest enclosing module declares (given its ``name``), else the model's declared
    format (timm's Swin-style models declare ``output_fmt = "NHWC"``: their stages
    and norms emit (n, h, w, c), and pooling those over axes (2, 3) would silently average the wrong
    axes into vectors of length h).
    """
    own = _declared_format(layer)
    if own is not None:
        return own == "NHWC"
    if isinstance(layer, _CHANNELS_FIRST_LAYERS):
        return False
    if name:  # a layer inside one that declares its format (the norm of timm's NHWC PatchEmbed) follows it
        modules = dict(model.named_modules())
        parts = name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            declared = _declared_format(modules.get(".".join(parts[:end]), nn.Identity()))
            if declared is not None:
                return declared == "NHWC"
    return _declared_format(model) == "NHWC"


class LayerRecorder:
    """Record several layers in one forward pass, one vector per input each.

    >>> with LayerRecorder(model, ["layer2", "layer3"]) as recorder:
    ...     logits, activations = recorder(images)   # activations["layer3"]: (n, 64)

    Hooks stay registered until ``close()`` (or the end of the ``with`` block). Forward passes run
    under ``torch.no_grad``; recorded vectors are float32, detached, on the module's device.
    """

    def __init__(self, module: nn.Module, layer_names: str | Iterable[str], token_reduce: str = "cls"):
        if token_reduce not in TOKEN_REDUCTIONS:
            raise RsvcError(
                problem=f"Unknown token reduction {token_reduce!r}.",
                fix=f"Use one of: {', '.join(TOKEN_REDUCTIONS)}.",
            )
        self.module = module
        self.layer_names = resolve_layer_names(module, layer_names)
        self.token_reduce = token_reduce
        self.num_prefix_tokens = model_num_prefix_tokens(module)
        self.has_cls_token = model_has_cls_token(module)
        self._records: dict[str, torch.Tensor] = {}
        self._calls: Counter[str] = Counter()
        self._stop_early = False
        modules = dict(module.named_modules())
        self._handles = [modules[name].register_forward_hook(self._make_hook(name, modules[name]))
                         for name in self.layer_names]

    def _make_hook(self, name: str, layer: nn.Module):
        patch_tokens_only = name == PATCH_EMBED_PREFIX or name.startswith(PATCH_EMBED_PREFIX + ".")
        num_prefix_tokens = 0 if patch_tokens_only else self.num_prefix_tokens
        has_cls_token = self.has_cls_token and not patch_tokens_only

        channels_last = is_channels_last(self.module, layer, name)

        def hook(_module, _inputs, output):
            self._calls[name] += 1
            if self._calls[name] == 1:
                if channels_last and isinstance(output, torch.Tensor) and output.ndim == 4:
                    output = output.permute(0, 3, 1, 2)
                self._records[name] = reduce_to_vectors(
                    output,
                    token_reduce=self.token_reduce,
                    num_prefix_tokens=num_prefix_tokens,
                    has_cls_token=has_cls_token,
                    layer_name=name,
                )
                if self._stop_early and len(self._records) == len(self.layer_names):
                    raise _AllRecorded

        return hook

    def __call__(self, images: torch.Tensor, stop_early: bool = False) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Run the model once; return its logits and {layer name: (n, d) float32 vectors}.

        ``stop_early``: end the forward pass as soon as every layer is recorded (logits None). The
        layers after the deepest requested one are not computed; whether a layer would run again
        later in the pass is then not checked (a full pass checks it).
        """
        if not self._handles:
            raise RuntimeError("LayerRecorder is closed")
        self._records = {}
        self._calls = Counter()
        self._stop_early = stop_early
        try:
            with torch.no_grad():
                try:
                    logits = self.module(images)
                except _AllRecorded:
                    return None, dict(self._records)
            wrong = {name: self._calls[name] for name in self.layer_names if self._calls[name] != 1}
            if wrong:
                described = ", ".join(f"{name!r} ran {count} times" for name, count in wrong.items())
                raise RsvcError(
                    problem=f"Layer(s) must run exactly once per forward pass, but {described}: "
                    "layers of the wrong kind for recording.",
                    fix=_LAYER_KINDS_FIX,
                )
            return logits, dict(self._records)
        finally:
            self._records = {}
            self._stop_early = False

    def close(self) -> None:
        """Remove the hooks; the module is as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerRecorder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

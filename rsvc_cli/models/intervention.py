"""Run the rest of a network from a named layer whose output is replaced.

Concept importance and the replacement test (DESIGN.md steps 6-7) need "the rest of the network"
after a layer: rebuild the layer's output from concept coefficients (U W) and see what the model
then predicts. Arbitrary ``forward`` code cannot be cut in two, so this module does it with a
forward hook on the layer that returns a replacement tensor: the whole forward pass runs, and the
layer's own output is thrown away and replaced.

Cost, stated plainly: every call of :func:`run_with_layer_output` (and of a head made by
:func:`make_concept_head`) runs one full forward pass of its batch. The part before the layer (the
"prefix") is recomputed each time, but without an autograd graph (parameters are frozen during the
call and the images need no gradient), so it costs time, not memory. Recomputing it is also what
keeps the method generic: modules after the layer may read tensors from before it (a residual
shortcut around ``layer2.0.conv1``, say), and only a real forward pass provides them. With
integrated gradients over S steps that is S forward passes plus S backward passes through the
part after the layer, per image; at a late layer the prefix dominates the time.

Concept-space views. A layer's raw output is an (n, c, h, w) map, an (n, h, w, c) channels-last
map (timm ``patch_embed``), (n, t, d) tokens, or an (n, d) pooled vector. Concepts were fitted on
one d-vector per patch (spatial mean or token summary), and here the basis is applied at every
spatial position or token: :func:`to_positions` gives (n, P, d) rows (P = h*w, t, or 1) and a
function that puts rows back into the layer's layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from rsvc_cli.errors import RsvcError
from rsvc_cli.models.hooks import resolve_layer_names

RestoreFn = Callable[[torch.Tensor], torch.Tensor]
OUTPUT_KINDS = ("logits", "log_probabilities")


# --------------------------------------------------------------------------------------------
# Running a module with a hook on one layer
# --------------------------------------------------------------------------------------------


def find_layer(module: nn.Module, layer_name: str) -> nn.Module:
    """The submodule called ``layer_name``; a wrong name is an RsvcError listing close valid names."""
    (layer_name,) = resolve_layer_names(module, [layer_name])
    return module.get_submodule(layer_name)


@contextlib.contextmanager
def _inference_state(module: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of a call; both restored afterwards.

    Eval mode because dropout and batch statistics would make every replacement noisy. Frozen
    parameters so that autograd records only what depends on a replacement that needs gradients:
    no graph for the prefix, no parameter gradients accumulated in ``.grad``.
    """
    training = {submodule: submodule.training for submodule in module.modules()}
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    module.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        for submodule, was_training in training.items():
            submodule.train(was_training)


class _SingleCallHook:
    """Forward hook that sees the layer's output once: records it, or returns a replacement."""

    def __init__(self, layer_name: str, replacement: torch.Tensor | None = None):
        self.layer_name = layer_name
        self.replacement = replacement
        self.output: torch.Tensor | None = None
        self.n_calls = 0

    def __call__(self, _module: nn.Module, _inputs, output):
        self.n_calls += 1
        if self.n_calls > 1:
            raise RsvcError(
                problem=f"Layer {self.layer_name!r} runs more than once in one forward pass (a module "
                "reused, like a shared ReLU), so its output cannot be replaced unambiguously.",
                fix="Pick a layer that runs once per forward pass, e.g. the enclosing block.",
            )
        if not isinstance(output, torch.Tensor):
            raise RsvcError(
                problem=f"Layer {self.layer_name!r} returns a {type(output).__name__}, not one tensor, "
                "so concepts cannot be rebuilt into its output.",
                fix="Pick a layer whose output is a single tensor (a block or stage, not an attention "
                "module returning a tuple).",
            )
        # Copies both ways: a later in-place op (timm's ReLU(inplace=True) after a norm layer) would
        # otherwise rewrite the recorded output, or the caller's replacement tensor.
        if self.replacement is None:
            self.output = output.detach().clone()
            return None
        if self.replacement.shape != output.shape:
            raise RsvcError(
                problem=f"The replacement for layer {self.layer_name!r} has shape "
                f"{tuple(self.replacement.shape)} but the layer outputs {tuple(output.shape)}.",
                fix="Rebuild the replacement in the layer's layout (to_positions' restore function "
                "does this) and for the same images.",
            )
        return self.replacement.to(dtype=output.dtype, device=output.device, copy=True)


def _forward_with_hook(module: nn.Module, layer_name: str, images: torch.Tensor, hook: _SingleCallHook):
    layer = find_layer(module, layer_name)
    handle = layer.register_forward_hook(hook)
    try:
        outputs = module(images)
    finally:
        handle.remove()
    if hook.n_calls == 0:
        raise RsvcError(
            problem=f"Layer {layer_name!r} never ran during the forward pass, so it has no output to "
            "record or replace.",
            fix="Pick a layer that the model's forward pass uses.",
        )
    return outputs


def capture_layer_output(module: nn.Module, layer_name: str, images: torch.Tensor) -> torch.Tensor:
    """The raw output of ``layer_name`` on ``images``, as the layer gives it: (n, c, h, w), (n, t, d)..."""
    hook = _SingleCallHook(layer_name)
    with _inference_state(module), torch.no_grad():
        _forward_with_hook(module, layer_name, images, hook)
    return hook.output


def run_with_layer_output(
    module: nn.Module, layer_name: str, images: torch.Tensor, replacement: torch.Tensor
) -> torch.Tensor:
    """The model's outputs (logits) on ``images`` when ``layer_name`` outputs ``replacement`` instead.

    ``replacement`` must have the layer's output shape for these images; it is cast to the layer's
    dtype and device. Gradients flow to ``replacement`` (when it requires them) and nowhere else.
    """
    hook = _SingleCallHook(layer_name, replacement)
    with _inference_state(module), torch.set_grad_enabled(replacement.requires_grad):
        return _forward_with_hook(module, layer_name, images, hook)


# --------------------------------------------------------------------------------------------
# Concept-space views of a layer's output
# --------------------------------------------------------------------------------------------


def _feature_axis(shape: torch.Size, n_features: int | None, channels_last: bool | None) -> int:
    """Which axis of a layer output holds the d features.

    Torch's convention decides where the shape alone cannot: tokens (n, t, d) keep features last,
    maps (n, c, h, w) first; a given ``n_features`` (the basis' d) overrides that when only the
    other axis matches, which is how channels-last maps (timm's ``patch_embed``) are recognized.
    ``channels_last`` (True: last axis, False: axis 1) settles it outright.
    """
    if len(shape) == 2:
        candidates = [1]
    elif channels_last is not None:
        candidates = [len(shape) - 1] if channels_last else [1]
    elif len(shape) == 3:
        candidates = [2, 1]
    else:
        candidates = [1, len(shape) - 1]
    if n_features is None:
        return candidates[0]
    for axis in candidates:
        if shape[axis] == n_features:
            return axis
    raise RsvcError(
        problem=f"The layer's output has shape {tuple(shape)}, and no feature axis of it has the "
        f"concept basis' {n_features} features, so the concepts cannot be rebuilt into it.",
        fix="Use the concept basis fitted on this same model and layer.",
    )


def to_positions(
    output: torch.Tensor, n_features: int | None = None, channels_last: bool | None = None
) -> tuple[torch.Tensor, RestoreFn]:
    """One d-vector per position: rows (n, P, d) and a function mapping (m, P, d) back to the layout.

    P is h*w for a map, t for tokens and 1 for a pooled (n, d) output. The restore function
    accepts any leading size m (several copies of the n images stacked) and keeps gradients.
    ``n_features``: the concept basis' d, checked against the output (and used to recognize a
    channels-last map). ``channels_last``: where the layer is known to put features last (True)
    or at axis 1 (False); None infers it.
    """
    if not isinstance(output, torch.Tensor) or output.ndim < 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise RsvcError(
            problem=f"A layer output of shape {shape} has no (batch, ..., feature) layout to apply "
            "concepts to.",
            fix="Pick a layer that outputs a feature map, tokens or a pooled feature vector.",
        )
    axis = _feature_axis(output.shape, n_features, channels_last)
    n_samples, n_features = output.shape[0], output.shape[axis]
    moved = output.movedim(axis, -1)
    position_shape = tuple(moved.shape[1:-1])
    rows = moved.reshape(n_samples, -1, n_features)

    def restore(position_rows: torch.Tensor) -> torch.Tensor:
        return position_rows.reshape(-1, *position_shape, n_features).movedim(-1, axis)

    return rows, restore


def make_concept_head(
    module: nn.Module,
    layer_name: str,
    images: torch.Tensor,
    concept_basis: torch.Tensor,
    restore: RestoreFn,
    residual: torch.Tensor | None = None,
    output: str = "logits",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rest of the network as a function of concept coefficients: U (m, P, k) -> outputs (m, C).

    The layer's output becomes ``restore(U @ concept_basis + residual)``. Rows of U are the n
    ``images`` in order, or r copies of them stacked (m = r n, copy-major), which is how
    :mod:`rsvc_cli.algorithms.attribution` batches integration steps and concepts; the images are
    tiled to match. ``residual`` (n, P, d), e.g. activations - U W, keeps what the concepts do not
    explain (DESIGN.md rebuilds from U W alone: leave it None). ``output``: "logits" or
    "log_probabilities".
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    n_images = images.shape[0]

    def head(coefficients: torch.Tensor) -> torch.Tensor:
        n_copies, remainder = divmod(coefficients.shape[0], n_images)
        if remainder or n_copies == 0:
            raise ValueError(
                f"head got {coefficients.shape[0]} rows of coefficients, not a multiple of the "
                f"{n_images} images it was made for"
            )
        rebuilt = coefficients @ concept_basis.to(coefficients)
        if residual is not None:
            rebuilt = rebuilt + residual.to(rebuilt).repeat(n_copies, 1, 1)
        tiled_images = images.repeat(n_copies, *([1] * (images.ndim - 1)))
        outputs = run_with_layer_output(module, layer_name, tiled_images, restore(rebuilt))
        if output == "log_probabilities":
            outputs = torch.log_softmax(outputs, dim=-1)
        return outputs

    return head

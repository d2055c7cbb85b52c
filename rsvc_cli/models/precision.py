"""The precision of forward passes: float32, or bfloat16 autocast with channels-last memory.

``precision=auto`` computes in bfloat16 only where the processor does so natively (a CUDA GPU with
bf16, a CPU with AMX or AVX512-BF16) and only for convolutional models, where channels-last memory
lets oneDNN/cuDNN run the whole network in blocked bf16 kernels: on an AVX512-BF16 CPU a CIFAR
ResNet-56 pass over 512 patches ran about 2x faster than float32. Elsewhere bf16 is emulated and
slower than float32, so `auto` keeps float32. Layer outputs are reduced to vectors in float32
either way (`hooks.reduce_to_vectors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rsvc_cli.errors import RsvcError

PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device) -> str | None:
    """What computes bf16 natively on ``device`` ("AMX", "AVX512-BF16", "CUDA ..."), or None."""
    if device.type == "cuda":
        # Without emulation: pre-Ampere GPUs "support" bf16 only by converting to float32.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return f"CUDA {torch.cuda.get_device_name(device)}"
        return None
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    # The CPU features oneDNN dispatches its bf16 kernels on (avx512_core_amx, avx512_core_bf16); its
    # plain AVX-512 path converts bf16 to float32 and back, slower than float32.
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def is_convolutional(module: nn.Module) -> bool:
    """More than one convolution: a ViT's or Swin's patch embedding alone does not make a model convolutional."""
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()) > 1


def resolve_precision(option: str, device: torch.device, module: nn.Module) -> str:
    """The precision forward passes of ``module`` run in: "float32" or "bfloat16"."""
    if option not in PRECISIONS:
        raise RsvcError(f"precision={option} is not an option.",
                        "Use precision=auto (bfloat16 where the processor computes it natively, for convolutional "
                        "models), precision=float32 or precision=bfloat16.")
    if option == "auto":
        return "bfloat16" if native_bf16(device) and is_convolutional(module) else "float32"
    if option == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=True):
        raise RsvcError(f"precision=bfloat16 asks for bf16 forward passes, but {torch.cuda.get_device_name(device)} "
                        "has no bf16.", "Use precision=auto or precision=float32.")
    return option


def describe_precision(precision: str, device: torch.device) -> str:
    """One line for the artifact's attributes and the console: what ran and why it could."""
    if precision == "float32":
        return "float32"
    native = native_bf16(device)
    return f"bfloat16 autocast on {device.type} ({native or 'emulated: no native bf16'})"


@contextlib.contextmanager
def forward_precision(module: nn.Module, precision: str, device: torch.device) -> Iterator[None]:
    """Forward passes of ``module`` inside the block run in ``precision``.

    bfloat16: autocast, and channels-last weights for a convolutional model (its convolutions then
    produce channels-last outputs from ordinary inputs). The weights get their usual layout back at the
    end, so later float32 passes (importance) compute exactly as they would have.
    """
    if precision == "float32":
        yield
        return
    channels_last = is_convolutional(module)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        if channels_last:
            module.to(memory_format=torch.contiguous_format)

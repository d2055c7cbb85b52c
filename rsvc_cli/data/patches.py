"""From an image file to the normalized patches both models see, and back to original pixels.

Geometry, in three frames:
- **original** pixels of the image file (what collages crop and boxes are recorded in);
- **input** pixels: the image resized so its shorter side is ``resize_size`` (the model's
  ``floor(input_size / crop_pct)``; ``input_size`` when not given), then centre-cropped to
  ``input_size x input_size``: torchvision's ``Resize(R)`` + ``CenterCrop(S)``, which is timm's
  evaluation transform;
- each **patch** is a box in input pixels, cropped and resized back to ``input_size`` with the
  model's interpolation (torch's resizing of that name).

Boxes are ``[x0, y0, x1, y1]`` with pixel *edges* as coordinates: box ``[0, 0, 2, 2]`` holds
pixels 0 and 1 in each direction, and the whole input is ``[0, 0, S, S]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from rsvc_cli.data.planting import planting_keys
from rsvc_cli.errors import RsvcError

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Interpolations a patch can be enlarged with (torch's F.interpolate modes, as resize matrices).
PATCH_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# The cubic convolution coefficient torch's bicubic resizing uses.
_CUBIC_A = -0.75


def resize_size_for(input_size: int, crop_pct: float = 1.0) -> int:
    """The shorter side an image is resized to before the centre crop: timm's ``floor(S / crop_pct)``."""
    if not 0 < crop_pct <= 1:
        raise RsvcError(
            problem=f"crop_pct={crop_pct} is not in (0, 1]: the centre crop must fit the resized image.",
            fix="Set model.crop_pct to a fraction such as 0.875 (or null for the model's own).",
        )
    return int(math.floor(input_size / crop_pct))


def _resize_and_crop_geometry(width: int, height: int, input_size: int,
                              resize_size: int | None = None) -> tuple[int, int, int, int]:
    """(resized_width, resized_height, crop_left, crop_top) exactly as torchvision's
    ``Resize(R)`` (long side truncated) and ``CenterCrop(S)`` (offset rounded) compute them."""
    resize_size = input_size if resize_size is None else int(resize_size)
    if width <= height:
        resized_width, resized_height = resize_size, int(resize_size * height / width)
    else:
        resized_width, resized_height = int(resize_size * width / height), resize_size
    crop_left = int(round((resized_width - input_size) / 2.0))
    crop_top = int(round((resized_height - input_size) / 2.0))
    return resized_width, resized_height, crop_left, crop_top


def image_to_input_box(width: int, height: int, input_size: int, resize_size: int | None = None) -> np.ndarray:
    """The region of the original image that becomes the input, ``[x0, y0, x1, y1]`` in original pixels.

    It is the whole transform: input pixel edge ``(u, v)`` sits at original
    ``(x0 + u * (x1 - x0) / S, y0 + v * (y1 - y0) / S)``.
    """
    resized_width, resized_height, crop_left, crop_top = _resize_and_crop_geometry(
        width, height, input_size, resize_size)
    scale = np.array([width / resized_width, height / resized_height] * 2)
    return np.array([crop_left, crop_top, crop_left + input_size, crop_top + input_size], dtype=np.float64) * scale


def resize_and_crop(image: Image.Image, input_size: int, interpolation: str = "bilinear",
                    resize_size: int | None = None) -> Image.Image:
    """Resize the shorter side to ``resize_size`` (default ``input_size``) and centre-crop
    ``input_size``: the same pixels as torchvision's ``CenterCrop(S)(Resize(R)(image))``, so inputs
    match the model's evaluation pipeline (timm's ``create_transform``)."""
    width, height = image.size
    resized_width, resized_height, crop_left, crop_top = _resize_and_crop_geometry(
        width, height, input_size, resize_size)
    if (width, height) != (resized_width, resized_height):
        image = image.resize((resized_width, resized_height), _resampling(interpolation))
    if (resized_width, resized_height) == (input_size, input_size):
        return image
    return image.crop((crop_left, crop_top, crop_left + input_size, crop_top + input_size))


def _resampling(interpolation: str):
    if interpolation not in _RESAMPLING:
        raise RsvcError(
            problem=f"Interpolation {interpolation!r} is not supported.",
            fix=f"Use one of {', '.join(_RESAMPLING)}.",
        )
    return _RESAMPLING[interpolation]


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def scaled_patch_geometry(
    input_size: int, size: int | None = 64, stride: int | None = 51, reference_size: int = 224
) -> tuple[int | None, int | None]:
    """Patch size and stride for ``input_size``, scaled from ``size``/``stride`` at ``reference_size``.

    64/51 at 224 (the authors' 16 patches) becomes 9/7 at 32, again 16 patches.
    ``size=None`` means whole images and returns ``(None, None)``.
    """
    if size is None:
        return None, None
    if stride is None:
        stride = size
    scale = input_size / reference_size
    patch_size, patch_stride = max(1, _round_half_up(size * scale)), max(1, _round_half_up(stride * scale))
    if patch_size > input_size:
        raise RsvcError(
            problem=f"Patch size {patch_size} px is larger than the {input_size} px input.",
            fix="Lower patch.size (given at the reference size), or set patch.size=null for whole images.",
        )
    return patch_size, patch_stride


def patch_grid(input_size: int, patch_size: int | None, stride: int | None = None) -> np.ndarray:
    """Square patch boxes ``(n, 4)`` int64 in input pixels, row-major (top row first, left to right).

    Patches start at 0, stride, 2 stride, ... while they fit; ``patch_size=None`` gives one box,
    the whole input.
    """
    if patch_size is None:
        return np.array([[0, 0, input_size, input_size]], dtype=np.int64)
    stride = patch_size if stride is None else stride
    if not (1 <= patch_size <= input_size) or stride < 1:
        raise RsvcError(
            problem=f"Patch size {patch_size} and stride {stride} do not fit a {input_size} px input.",
            fix=f"Use 1 <= patch.size <= {input_size} and patch.stride >= 1, or patch.size=null for whole images.",
        )
    starts = np.arange(0, input_size - patch_size + 1, stride, dtype=np.int64)
    top, left = np.meshgrid(starts, starts, indexing="ij")
    top, left = top.ravel(), left.ravel()
    return np.stack([left, top, left + patch_size, top + patch_size], axis=1)


def make_patches(image_tensor: torch.Tensor, boxes, input_size: int, out: torch.Tensor | None = None,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """Crop each box from ``image_tensor`` and resize it to ``input_size`` with ``interpolation``
    (as torch's ``F.interpolate`` of that mode, ``align_corners=False``, no antialias).

    image_tensor : (c, H, W) or (b, c, H, W) float. boxes : (n, 4) integer, inside the image.
    Returns (n, c, S, S), or (b, n, c, S, S) for a batch, written into ``out`` when given (a view
    into a larger input batch saves a copy). Crops are exact (a patch sees only its box's pixels);
    boxes of one size are gathered and resized in one call.
    """
    boxes = torch.as_tensor(np.asarray(boxes), dtype=torch.int64, device=image_tensor.device)
    height, width = image_tensor.shape[-2:]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {tuple(boxes.shape)}")
    x0, y0, x1, y1 = boxes.unbind(1)
    if bool(((x0 < 0) | (y0 < 0) | (x1 > width) | (y1 > height) | (x1 <= x0) | (y1 <= y0)).any()):
        raise ValueError(f"boxes must lie inside the {width}x{height} image and be non-empty")
    *leading, channels = image_tensor.shape[:-2]
    shape = (*leading, len(boxes), channels, input_size, input_size)
    if out is not None and tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the patches {shape}")
    patches = image_tensor.new_empty(shape) if out is None else out
    box_sizes = torch.stack([x1 - x0, y1 - y0], dim=1)
    # A patch grid has one box size; a loop over distinct sizes keeps any other layout correct.
    for box_width, box_height in torch.unique(box_sizes, dim=0).tolist():
        group = torch.nonzero((box_sizes[:, 0] == box_width) & (box_sizes[:, 1] == box_height)).squeeze(1)
        rows = y0[group, None, None] + torch.arange(box_height, device=boxes.device)[None, :, None]
        columns = x0[group, None, None] + torch.arange(box_width, device=boxes.device)[None, None, :]
        crops = image_tensor[..., rows, columns].movedim(-4, -3)  # (..., m, c, h, w)
        if (box_height, box_width) != (input_size, input_size):
            # Resizing without antialias is separable and every box of the group has one size, so it
            # is two matrix products with the same small interpolation matrices: R_y crop R_x^T.
            # Written straight into the patches, about 3x faster on a CPU than F.interpolate plus a
            # copy, and equal to it up to float rounding.
            rows_matrix = resize_matrix(box_height, input_size, interpolation, image_tensor.dtype, image_tensor.device)
            columns_matrix = resize_matrix(box_width, input_size, interpolation, image_tensor.dtype,
                                           image_tensor.device)
            half_resized = torch.matmul(rows_matrix, crops)  # (..., m, c, S, w)
            if group.numel() == len(boxes):  # every box, in order (nonzero sorts): write in place
                torch.matmul(half_resized, columns_matrix.T, out=patches)
                continue
            crops = torch.matmul(half_resized, columns_matrix.T)
        patches[..., group, :, :, :] = crops
    return patches


def resize_matrix(in_size: int, out_size: int, interpolation: str = "bilinear", dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """(out_size, in_size) matrix of 1-D resizing as F.interpolate(mode=interpolation,
    align_corners=False, antialias=False) does it, for ``interpolation`` in PATCH_INTERPOLATIONS."""
    if interpolation == "bilinear":
        return bilinear_matrix(in_size, out_size, dtype, device)
    outputs = torch.arange(out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    if interpolation == "nearest":
        # torch's legacy "nearest": output pixel j takes input floor(j * in / out).
        source = torch.floor(outputs.double() * (in_size / out_size)).long().clamp_max(in_size - 1)
        matrix[outputs, source] = 1.0
    elif interpolation == "bicubic":
        # Output pixel j samples the input at (j + 0.5) * in / out - 0.5 (not clamped), from the four
        # nearest pixels (indices clamped to the edges) with Keys' cubic kernel, a = -0.75.
        source = (outputs.double() + 0.5) * (in_size / out_size) - 0.5
        lower = source.floor()
        t = source - lower
        weights = torch.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)], dim=1)
        for offset in range(4):
            index = (lower.long() - 1 + offset).clamp(0, in_size - 1)
            matrix.index_put_((outputs, index), weights[:, offset], accumulate=True)
    else:
        raise RsvcError(
            problem=f"Patches cannot be resized with interpolation {interpolation!r}.",
            fix=f"Set model.interpolation to one of {', '.join(PATCH_INTERPOLATIONS)}.",
        )
    return matrix.to(dtype=dtype, device=device)


def bilinear_matrix(in_size: int, out_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(out_size, in_size) matrix of 1-D bilinear resizing, as F.interpolate(mode="bilinear",
    align_corners=False, antialias=False) does it: output pixel j samples the input at
    (j + 0.5) * in_size / out_size - 0.5, clamped to the edge pixels, by linear interpolation."""
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    lower = source.floor().long().clamp_max(in_size - 1)
    upper = (lower + 1).clamp_max(in_size - 1)
    weight = source - lower
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    outputs = torch.arange(out_size)
    matrix.index_put_((outputs, lower), 1 - weight, accumulate=True)
    matrix.index_put_((outputs, upper), weight, accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def _cubic_near(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic kernel for |x| <= 1."""
    return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1


def _cubic_far(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic kernel for 1 < |x| < 2."""
    return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A


def boxes_in_original_pixels(boxes, width: int, height: int, input_size: int,
                              resize_size: int | None = None) -> np.ndarray:
    """Map boxes ``(..., 4)`` in input pixels to original pixels (float64) through resize and crop."""
    input_box = image_to_input_box(width, height, input_size, resize_size)
    scale = (input_box[2:] - input_box[:2]) / input_size  # original pixels per input pixel, (x, y)
    boxes = np.asarray(boxes, dtype=np.float64)
    origin, scale = np.tile(input_box[:2], 2), np.tile(scale, 2)
    return origin + boxes * scale


def _channel_vector(values, name: str) -> torch.Tensor:
    vector = torch.as_tensor(np.asarray(values, dtype=np.float32).reshape(-1))
    if vector.shape != (3,) or not torch.isfinite(vector).all() or (name == "std" and (vector <= 0).any()):
        raise RsvcError(
            problem=f"Normalization {name}={list(np.asarray(values).reshape(-1))} is not three finite numbers"
            + (" above 0." if name == "std" else "."),
            fix=f"Set the model's {name} to one value per RGB channel, e.g. [0.485, 0.456, 0.406] for the mean.",
        )
    return vector.view(3, 1, 1)


class PatchDataset(Dataset):
    """Normalized patches of chosen source images, with their boxes in original pixels.

    Images are resized (shorter side ``resize_size``, default ``input_size``) with
    ``interpolation`` and centre-cropped to ``input_size``; patches are enlarged back to
    ``input_size`` with the same interpolation.

    Item ``i`` is ``(patches, image_index, patch_boxes)``: patches (n_patches, 3, S, S) float32
    normalized ``(x / 255 - mean) / std``, ``image_index`` = ``image_index[i]`` (int), patch_boxes
    (n_patches, 4) float32 in original pixels. With ``planting`` (see ``planting.Planting``) a
    square is painted on the input-size image first and a fourth element, the square's box in
    original pixels (4,) float32, NaN when none was planted, is returned. With ``return_image``
    the item is ``(patches, image, image_index, patch_boxes, square_box)`` whatever the planting,
    ``image`` the whole normalized input (3, S, S). Deterministic and
    picklable, so DataLoader workers are fine.
    """

    def __init__(
        self,
        source,
        image_index: Sequence[int] | np.ndarray,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        patch_size: int | None,
        stride: int | None,
        planting=None,
        interpolation: str = "bilinear",
        return_image: bool = False,
        resize_size: int | None = None,
    ):
        self.source = source
        self.image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
        self.input_size = int(input_size)
        self.mean = _channel_vector(mean, "mean")
        self.std = _channel_vector(std, "std")
        self.patch_size = patch_size
        self.stride = stride
        self.planting = planting
        self.interpolation = interpolation
        self.return_image = return_image
        self.resize_size = self.input_size if resize_size is None else int(resize_size)
        # Fail at construction, not in a worker.
        _resampling(interpolation)
        resize_matrix(1, 1, interpolation)
        self.patch_boxes = patch_grid(self.input_size, patch_size, stride)
        if planting is not None:
            self.planting_probability = planting.probabilities(source.class_names)
            labels = np.asarray(source.labels)[self.image_index]
            self.planting_key = planting_keys(source, self.image_index)
            self.planting_label = labels

    @property
    def n_patches(self) -> int:
        return len(self.patch_boxes)

    def __len__(self) -> int:
        return len(self.image_index)

    def _load(self, item: int) -> tuple[np.ndarray, int, torch.Tensor, torch.Tensor]:
        """Item ``item``'s input pixels (S, S, 3) uint8 (square painted), its source index, its patch
        boxes (n, 4) and its square box (4,) in original pixels (NaN: none planted)."""
        index = int(self.image_index[item])
        image = self.source.load_image(index)
        width, height = image.size
        pixels = np.asarray(resize_and_crop(image, self.input_size, self.interpolation, self.resize_size))
        square_original = torch.full((4,), float("nan"))
        if self.planting is not None:
            probability = float(self.planting_probability[self.planting_label[item]])
            pixels, square_box = self.planting.plant(pixels, self.planting_key[item], probability)
            if square_box is not None:
                square_original[:] = torch.from_numpy(
                    boxes_in_original_pixels(square_box, width, height, self.input_size,
                                             self.resize_size).astype(np.float32))
        patch_boxes = torch.from_numpy(
            boxes_in_original_pixels(self.patch_boxes, width, height, self.input_size,
                                     self.resize_size).astype(np.float32)
        )
        return np.array(pixels, dtype=np.uint8), index, patch_boxes, square_original  # writable, for torch

    def _normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (..., S, S, 3) -> normalized float32 (..., 3, S, S)."""
        # Normalizing before cropping is exact (resizing weights sum to 1) and n_patches times cheaper.
        image_tensor = torch.from_numpy(pixels).movedim(-1, -3).float().div_(255.0)
        return (image_tensor - self.mean) / self.std

    def __getitem__(self, item: int):
        pixels, index, patch_boxes, square_original = self._load(item)
        image_tensor = self._normalize(pixels)
        patches = make_patches(image_tensor, self.patch_boxes, self.input_size, interpolation=self.interpolation)
        if self.return_image:
            # The extraction layout: the whole normalized input (for the model's prediction on the
            # image) and always a square box (NaN without planting).
            return patches, image_tensor, index, patch_boxes, square_original
        if self.planting is None:
            return patches, index, patch_boxes
        return patches, index, patch_boxes, square_original

    def batch(self, items) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Items ``items`` at once, in the extraction layout: ``(inputs, b, image_index, patch_boxes, square_boxes)``.

        ``inputs`` (b * n_patches, 3, S, S) holds every image's patches in order, ready for one
        forward pass, followed by the b whole images when the dataset has ``return_image``;
        patch_boxes (b, n_patches, 4), square_boxes (b, 4) (NaN: none). The same numbers as ``__getitem__`` item by item, but normalized, cropped and resized
        once per batch and written straight into ``inputs``: per-image tensor calls and the copy of a
        concatenation cost as much as the forward pass of a small model.
        """
        loaded = [self._load(int(item)) for item in items]
        b, n = len(loaded), self.n_patches
        images = self._normalize(np.stack([entry[0] for entry in loaded]))
        inputs = images.new_empty(b * n + (b if self.return_image else 0), *images.shape[1:])
        make_patches(images, self.patch_boxes, self.input_size, out=inputs[: b * n].view(b, n, *images.shape[1:]),
                     interpolation=self.interpolation)
        if self.return_image:
            inputs[b * n:] = images
        return (inputs, b, torch.as_tensor([entry[1] for entry in loaded], dtype=torch.int64),
                torch.stack([entry[2] for entry in loaded]), torch.stack([entry[3] for entry in loaded]))

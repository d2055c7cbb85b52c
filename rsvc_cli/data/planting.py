"""A known concept for validation: a small coloured square planted in some images.

A model trained on images where the square marks a class has a "square" concept the other
model may lack; RSVC should find it. Whether an image gets a square and where is a pure
function of ``(seed, image key)`` (SHA-256 -> numpy generator), so every model, run and
DataLoader worker sees the same squares. Squares are painted on the *input-size* image (after
resize and centre crop), so their size is known in input pixels; boxes are returned in input
pixels here and mapped to original pixels by ``patches.PatchDataset`` beside the patch boxes.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rsvc_cli.errors import RsvcError

MAGENTA = (255, 0, 255)


def _generator(seed: int, image_key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{int(seed)}\x00{image_key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def square_placement(image_key: str, probability: float, size: int, width: int, height: int,
                     seed: int = 0) -> np.ndarray | None:
    """Where a ``size`` px square goes in a ``width x height`` image, ``[x0, y0, x1, y1]``, or None.

    The position is drawn whether or not the square is planted, so changing ``probability``
    only adds or removes squares, never moves them.
    """
    if not (1 <= size <= min(width, height)):
        raise RsvcError(
            problem=f"Planted square size {size} px does not fit a {width}x{height} px input.",
            fix=f"Set planting.size between 1 and {min(width, height)} (it is measured in input pixels).",
        )
    rng = _generator(seed, image_key)
    draw, fraction_x, fraction_y = rng.random(3)
    if draw >= probability:
        return None
    x0 = int(fraction_x * (width - size + 1))
    y0 = int(fraction_y * (height - size + 1))
    return np.array([x0, y0, x0 + size, y0 + size], dtype=np.float64)


def paint_box(image, box, color: Sequence[int] = MAGENTA):
    """A copy of ``image`` (PIL or (H, W, 3) uint8 array) with the pixels whose centres lie in ``box`` set to ``color``.

    Works for fractional boxes too (a square mapped to original pixels, for collages).
    """
    is_pil = isinstance(image, Image.Image)
    pixels = np.array(image.convert("RGB") if is_pil else image, dtype=np.uint8, copy=True)
    x0, y0, x1, y1 = (int(np.ceil(value - 0.5)) for value in box)
    pixels[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = np.asarray(color, dtype=np.uint8)
    return Image.fromarray(pixels) if is_pil else pixels


def plant_square(image, image_key: str, probability: float = 1.0, size: int = 4,
                 color: Sequence[int] = MAGENTA, seed: int = 0):
    """Maybe paint a square on ``image`` (input-size PIL image or (H, W, 3) uint8 array).

    Returns ``(image, box)``: a new image of the same type and the square's box in its pixels,
    or the image unchanged and None. Deterministic in ``(seed, image_key)`` given ``probability``.
    """
    width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    box = square_placement(str(image_key), probability, size, width, height, seed)
    if box is None:
        return image, None
    return paint_box(image, box, color), box


def planting_keys(source, image_index) -> list[str]:
    """Stable names of images for planting: ``<class name>/<file name>``.

    Unlike indices or full paths they survive moving the dataset or choosing other classes.
    """
    labels = np.asarray(source.labels)
    return [
        f"{source.class_names[labels[index]]}/{os.path.basename(source.paths[index])}"
        for index in np.asarray(image_index, dtype=np.int64).reshape(-1)
    ]


@dataclass(frozen=True)
class Planting:
    """Parameters of the planted square (mirrors the ``planting/`` config group).

    class_probability : probability of a square per class: one number for all classes, a list
        (one per class), or a mapping from class index or class name to probability (missing
        classes 0).
    size : side in input pixels (e.g. 4 at 32 px). color : RGB 0-255. seed : placement seed.
    """

    class_probability: float | Sequence[float] | Mapping[int | str, float] = 1.0
    size: int = 4
    color: tuple[int, int, int] = MAGENTA
    seed: int = 0

    def __post_init__(self):
        color = tuple(int(channel) for channel in np.asarray(self.color).reshape(-1))
        if len(color) != 3 or not all(0 <= channel <= 255 for channel in color):
            raise RsvcError(
                problem=f"planting.color={list(self.color)} is not three values in 0-255.",
                fix="Set planting.color to an RGB triple such as [255, 0, 255].",
            )
        object.__setattr__(self, "color", color)

    def probabilities(self, class_names: Sequence[str]) -> np.ndarray:
        """Planting probability of each class, (n_classes,) float64, validated."""
        n_classes = len(class_names)
        spec = self.class_probability
        if isinstance(spec, Mapping):
            probabilities = np.zeros(n_classes)
            for key, value in spec.items():
                probabilities[self._class_index(key, class_names)] = value
        elif np.ndim(spec) == 0:
            probabilities = np.full(n_classes, spec, dtype=np.float64)
        else:
            probabilities = np.asarray(list(spec), dtype=np.float64)
            if probabilities.shape != (n_classes,):
                raise RsvcError(
                    problem=f"planting.class_probability lists {len(probabilities)} values for {n_classes} classes.",
                    fix="Give one probability per class, or a mapping {class name or index: probability}.",
                )
        if not np.all((probabilities >= 0) & (probabilities <= 1)):
            raise RsvcError(
                problem=f"planting.class_probability has values outside [0, 1]: {probabilities.tolist()}.",
                fix="Use probabilities between 0 and 1.",
            )
        return probabilities

    @staticmethod
    def _class_index(key, class_names: Sequence[str]) -> int:
        names = list(class_names)
        if isinstance(key, str) and key in names:
            return names.index(key)
        if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
            if 0 <= int(key) < len(names):
                return int(key)
        close = difflib.get_close_matches(str(key), names, n=3)
        raise RsvcError(
            problem=f"planting.class_probability names class {key!r}, which is not in the dataset"
            + (f" (close: {', '.join(close)})." if close else "."),
            fix=f"Use a class name or an index 0-{len(names) - 1}.",
        )

    def plant(self, image, image_key: str, probability: float):
        """``plant_square`` with these parameters: (image, box in input pixels or None)."""
        return plant_square(image, image_key, probability, self.size, self.color, self.seed)


def box_overlap(patch_boxes, square_box, min_fraction: float = 0.0) -> np.ndarray:
    """Which patches contain the square: overlap area > 0, or >= ``min_fraction`` of the square's area.

    patch_boxes (..., 4) and square_box (..., 4) broadcast (e.g. (n_images, n_patches, 4) against
    (n_images, 1, 4)); a NaN square box (none planted) overlaps nothing.
    """
    patch_boxes = np.asarray(patch_boxes, dtype=np.float64)
    square_box = np.asarray(square_box, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        # (..., 2) overlap extent in x and y; negative when apart.
        lower = np.maximum(patch_boxes[..., :2], square_box[..., :2])
        extent = np.minimum(patch_boxes[..., 2:], square_box[..., 2:]) - lower
        overlap_area = np.clip(extent, 0, None).prod(axis=-1)
        if min_fraction <= 0:
            return overlap_area > 0
        square_area = (square_box[..., 2] - square_box[..., 0]) * (square_box[..., 3] - square_box[..., 1])
        return overlap_area >= min_fraction * square_area

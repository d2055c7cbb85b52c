"""Procedural class-structured images that need no files: for the demo, smoke runs and tests.

Each class has up to three visual traits (its cues): an object shape, an object hue and the
orientation of a striped background texture. A trait left out of ``class_cues`` is drawn at random
per image instead, which makes the classes harder to tell apart (the planted-concept demo keeps only
the stripes, so that a small planted square is worth learning as a shortcut). Every image varies
position, size, rotation, brightness, stripe frequency and phase, carries an optional small distractor blob and pixel noise, so a small CNN
learns the classes in a few epochs but no two images are alike. Class ``c``'s traits depend on
``c`` alone and image ``j`` of class ``c`` on ``(seed, c, j)`` alone, so changing ``n_classes``
or ``images_per_class`` never changes an image that exists in both settings; a second seed gives
a disjoint "test split".
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from rsvc_cli.errors import RsvcError

CUES = ("shape", "hue", "stripes")
_TRAIT_OF_CUE = {"shape": "shape", "hue": "hue", "stripes": "stripe_angle"}
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "bar")

_HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet",
              "purple", "rose")
# Class hues skip the 80 degrees around magenta (300 degrees), the default planted-square colour,
# so a planted square is never mistaken for a class's own object.
_HUE_START, _HUE_SPAN = 340.0 / 360.0, 280.0 / 360.0


def _van_der_corput(index: int, base: int) -> float:
    """index-th term of the base-``base`` van der Corput sequence: any prefix is well spread in [0, 1)."""
    value, denominator = 0.0, 1.0
    while index:
        index, digit = divmod(index, base)
        denominator *= base
        value += digit / denominator
    return value


def class_traits(class_index: int) -> dict:
    """The fixed traits of one class: shape, hue in [0, 1), stripe angle in radians."""
    return {
        "shape": SHAPES[class_index % len(SHAPES)],
        "hue": (_HUE_START + _van_der_corput(class_index, 2) * _HUE_SPAN) % 1.0,
        "stripe_angle": _van_der_corput(class_index, 3) * np.pi,
    }


def _class_names(n_classes: int, class_cues=CUES) -> list[str]:
    """Names from the class's own traits (``rose_disc``, ``disc_stripes60``), made unique by the class index."""
    names = []
    for class_index in range(n_classes):
        traits = class_traits(class_index)
        parts = []
        if "hue" in class_cues:
            parts.append(_HUE_NAMES[int(traits["hue"] * len(_HUE_NAMES) + 0.5) % len(_HUE_NAMES)])
        if "shape" in class_cues:
            parts.append(traits["shape"])
        if "stripes" in class_cues:
            parts.append(f"stripes{round(np.degrees(traits['stripe_angle']))}")
        name = "_".join(parts) or f"class{class_index}"
        names.append(name if name not in names else f"{name}_{class_index}")
    return names


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in coordinates already centred, rotated and divided by the radius."""
    if shape == "disc":
        return dx**2 + dy**2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8
    if shape == "triangle":
        # Intersection of three half-planes whose normals are 120 degrees apart.
        normal_angles = np.pi / 2 + 2 * np.pi / 3 * np.arange(3)
        projections = np.cos(normal_angles)[:, None, None] * dx + np.sin(normal_angles)[:, None, None] * dy
        return (projections <= 0.5).all(axis=0)
    if shape == "ring":
        radius_squared = dx**2 + dy**2
        return (radius_squared <= 1.0) & (radius_squared >= 0.55**2)
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    if shape == "bar":
        return (np.abs(dx) <= 1.0) & (np.abs(dy) <= 0.35)
    raise ValueError(f"unknown shape {shape!r}")


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def make_synthetic_image(class_index: int, image_index: int, image_size: int = 32, seed: int = 0,
                         class_cues=CUES) -> np.ndarray:
    """Image ``image_index`` of class ``class_index`` as (image_size, image_size, 3) uint8."""
    rng = np.random.default_rng([seed, class_index, image_index])
    traits = class_traits(class_index)
    # Traits that are not cues of the class: drawn per image from their own stream, so the rest of
    # the image (and every image of the default, all-cues setting) is unchanged.
    free = np.random.default_rng([seed, class_index, image_index, 1])
    random_traits = {"shape": SHAPES[free.integers(len(SHAPES))],
                     "hue": (_HUE_START + free.uniform() * _HUE_SPAN) % 1.0,
                     "stripe_angle": free.uniform() * np.pi}
    traits = {**random_traits, **{_TRAIT_OF_CUE[cue]: traits[_TRAIT_OF_CUE[cue]] for cue in class_cues}}
    # Pixel-centre coordinates in [0, 1) so traits scale with image_size.
    u = (np.arange(image_size) + 0.5) / image_size
    x, y = np.meshgrid(u, u, indexing="xy")

    # Background: a dull random colour with class-oriented stripes of random frequency and phase.
    background = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.65))
    angle = traits["stripe_angle"] + rng.normal(0.0, 0.08)
    frequency = rng.uniform(3.0, 5.0)
    stripes = np.sin(2 * np.pi * (frequency * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform()))
    image = background[None, None, :] + 0.15 * stripes[:, :, None]

    # Optional distractor: a small blob of random colour, drawn before the object so it never hides it.
    if rng.uniform() < 0.5:
        blob_radius = rng.uniform(0.06, 0.1)
        blob_x, blob_y = rng.uniform(blob_radius, 1 - blob_radius, size=2)
        blob = (x - blob_x) ** 2 + (y - blob_y) ** 2 <= blob_radius**2
        image[blob] = _hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))

    # Object: the class shape in the class hue, at a random place, size and rotation.
    radius = rng.uniform(0.2, 0.32)
    center_x, center_y = rng.uniform(radius, 1 - radius, size=2)
    rotation = rng.uniform(0, 2 * np.pi)
    cos_r, sin_r = np.cos(rotation), np.sin(rotation)
    dx, dy = (x - center_x) / radius, (y - center_y) / radius
    mask = _shape_mask(traits["shape"], cos_r * dx + sin_r * dy, -sin_r * dx + cos_r * dy)
    color = _hsv_to_rgb(traits["hue"] + rng.normal(0.0, 0.015), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))
    image[mask] = color

    image = image + rng.normal(0.0, 0.03, size=image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


class SyntheticSource:
    """``n_classes`` x ``images_per_class`` generated RGB images; same interface as ImageFolderSource.

    Image ``i`` belongs to class ``i // images_per_class``; ``paths`` are ids
    ``synthetic/<class name>/<index in class>``, not files.
    """

    def __init__(self, n_classes: int = 4, images_per_class: int = 60, image_size: int = 32, seed: int = 0,
                 class_cues=CUES):
        self.n_classes = n_classes
        self.images_per_class = images_per_class
        self.image_size = image_size
        self.seed = seed
        self.class_cues = tuple(class_cues)
        unknown = sorted(set(self.class_cues) - set(CUES))
        if unknown or not self.class_cues:
            raise RsvcError(
                problem=f"Synthetic dataset class_cues={list(self.class_cues)} is not a non-empty list of {list(CUES)}"
                + (f" ({', '.join(unknown)} unknown)." if unknown else "."),
                fix="Set dataset.class_cues to some of [shape,hue,stripes], e.g. dataset.class_cues=[shape].",
            )
        for name, value, smallest in (
            ("n_classes", n_classes, 1),
            ("images_per_class", images_per_class, 1),
            ("image_size", image_size, 8),
        ):
            if not isinstance(value, (int, np.integer)) or value < smallest:
                raise RsvcError(
                    problem=f"Synthetic dataset {name}={value!r} is not an integer >= {smallest}.",
                    fix=f"Set dataset.{name} to an integer of at least {smallest}.",
                )
        self.class_names = _class_names(n_classes, self.class_cues)
        self.labels = np.repeat(np.arange(n_classes, dtype=np.int64), images_per_class)
        self.paths = [
            f"synthetic/{self.class_names[label]}/{index}"
            for label in range(n_classes)
            for index in range(images_per_class)
        ]

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image (generated, deterministic)."""
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} synthetic images")
        class_index, index_in_class = divmod(int(index), self.images_per_class)
        pixels = make_synthetic_image(class_index, index_in_class, self.image_size, self.seed, self.class_cues)
        return Image.fromarray(pixels)

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(n_classes={self.n_classes}, images_per_class={self.images_per_class}, "
            f"image_size={self.image_size}, seed={self.seed}, class_cues={list(self.class_cues)})"
        )

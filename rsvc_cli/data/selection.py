"""Seeded, recorded choice of the three disjoint image sets per class.

RSVC fits concepts on a **concept** set, fits regressions on a **regression** set and reports
similarities on an **evaluation** set (the authors: 100 / 200 / 200 images per class). The
choice is a pure function of (labels, images_per_class, seed, split): class ``c`` draws from its
own random stream seeded by ``(seed, c)``, so adding or dropping other classes never changes
class ``c``'s sets. Labels may be true labels or a model's predicted classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rsvc_cli.errors import RsvcError

SET_NAMES = ("concept", "regression", "evaluation")
CONCEPT, REGRESSION, EVALUATION = 0, 1, 2
# Values of ImageSelection.source: which source an image_index points into.
PRIMARY_SOURCE, EVALUATION_SOURCE = 0, 1


@dataclass(frozen=True, eq=False)
class ImageSelection:
    """The chosen images, one row each, sorted by class, then set, then image index.

    image_index : (n,) int64, position in the source (``source`` says which one).
    image_set : (n,) int8, 0 concept, 1 regression, 2 evaluation (index into SET_NAMES).
    label : (n,) int64, the class the image was grouped under.
    source : (n,) int8, 0 the primary source, 1 a separate evaluation source; zeros by default.
    """

    image_index: np.ndarray
    image_set: np.ndarray
    label: np.ndarray
    source: np.ndarray | None = None

    def __post_init__(self):
        # Frozen dataclass: normalize dtypes through object.__setattr__.
        object.__setattr__(self, "image_index", np.asarray(self.image_index, dtype=np.int64))
        object.__setattr__(self, "image_set", np.asarray(self.image_set, dtype=np.int8))
        object.__setattr__(self, "label", np.asarray(self.label, dtype=np.int64))
        source = np.zeros(len(self.image_index), np.int8) if self.source is None else self.source
        object.__setattr__(self, "source", np.asarray(source, dtype=np.int8))
        shapes = {name: getattr(self, name).shape for name in ("image_index", "image_set", "label", "source")}
        if len(set(shapes.values())) != 1 or len(shapes["image_index"]) != 1:
            raise ValueError(f"ImageSelection fields must be 1-d arrays of one length, got {shapes}")

    def __len__(self) -> int:
        return len(self.image_index)

    def mask(self, image_set: int | str | None = None, label: int | None = None) -> np.ndarray:
        """Boolean row mask for one set (name or number) and/or one class."""
        keep = np.ones(len(self), dtype=bool)
        if image_set is not None:
            keep &= self.image_set == _set_number(image_set)
        if label is not None:
            keep &= self.label == label
        return keep

    def indices(self, image_set: int | str, label: int | None = None) -> np.ndarray:
        """Source indices of one set (optionally one class)."""
        return self.image_index[self.mask(image_set, label)]

    def counts(self, n_classes: int | None = None) -> np.ndarray:
        """(n_classes, 3) number of images per class and set."""
        n_classes = int(self.label.max(initial=-1)) + 1 if n_classes is None else n_classes
        flat = np.bincount(self.label * len(SET_NAMES) + self.image_set, minlength=n_classes * len(SET_NAMES))
        return flat[: n_classes * len(SET_NAMES)].reshape(n_classes, len(SET_NAMES))

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The fields as plain arrays, for writing to an artifact."""
        return {name: getattr(self, name) for name in ("image_index", "image_set", "label", "source")}

    @classmethod
    def from_arrays(cls, arrays) -> ImageSelection:
        """Inverse of ``as_arrays`` (any mapping of the same names; ``source`` optional)."""
        source = arrays["source"] if "source" in arrays else None
        return cls(np.asarray(arrays["image_index"]), np.asarray(arrays["image_set"]),
                   np.asarray(arrays["label"]), None if source is None else np.asarray(source))


def _set_number(image_set: int | str) -> int:
    if isinstance(image_set, str):
        if image_set not in SET_NAMES:
            raise ValueError(f"unknown image set {image_set!r}; expected one of {SET_NAMES}")
        return SET_NAMES.index(image_set)
    return int(image_set)


def _check_split(split: Sequence[float]) -> np.ndarray:
    ratios = np.asarray(split, dtype=np.float64)
    if ratios.shape != (len(SET_NAMES),) or not np.all(np.isfinite(ratios)) or np.any(ratios < 0) or ratios.sum() <= 0:
        raise RsvcError(
            problem=f"dataset.split={list(split)} is not three non-negative ratios (concept, regression, evaluation).",
            fix="Use three numbers such as [1, 2, 2] (the authors' 100/200/200).",
        )
    return ratios


def split_sizes(n_images: int, split: Sequence[float] = (1, 2, 2)) -> np.ndarray:
    """Split ``n_images`` in the ratio ``split`` (largest remainder); each positive ratio gets >= 1.

    Assumes ``n_images`` >= the number of positive ratios.
    """
    ratios = _check_split(split)
    exact = n_images * ratios / ratios.sum()
    sizes = np.floor(exact).astype(np.int64)
    sizes[(ratios > 0) & (sizes == 0)] = 1
    # At most len(SET_NAMES) steps each way: hand the leftover to the largest remainders,
    # or take back what the minimum of 1 overspent from sets that can spare it.
    while sizes.sum() < n_images:
        sizes[np.argmax(np.where(ratios > 0, exact - sizes, -np.inf))] += 1
    while sizes.sum() > n_images:
        sizes[np.argmax(np.where(sizes > 1, sizes - exact, -np.inf))] -= 1
    return sizes


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return f"Class {label} ({class_names[label]!r})"
    return f"Class {label}"


def _check_labels(labels, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-d integer array, got shape {labels.shape} dtype {labels.dtype}")
    return labels.astype(np.int64)


def _members_by_class(labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """Indices of each class's images in ascending order: one stable sort, not a scan per class."""
    in_range = np.flatnonzero((labels >= 0) & (labels < n_classes))
    order = in_range[np.argsort(labels[in_range], kind="stable")]
    counts = np.bincount(labels[in_range], minlength=n_classes)
    return np.split(order, np.cumsum(counts)[:-1])


def _draw(members: np.ndarray, sizes: np.ndarray, sets: Sequence[int], rng: np.random.Generator):
    """Randomly choose sizes.sum() of ``members`` and deal them to ``sets`` in order."""
    chosen = members[rng.permutation(len(members))[: sizes.sum()]]
    boundaries = np.cumsum(sizes)[:-1]
    parts = [np.sort(part) for part in np.split(chosen, boundaries)]
    image_set = np.concatenate([np.full(len(part), image_set, np.int8) for part, image_set in zip(parts, sets)])
    return np.concatenate(parts), image_set


def _too_few_error(label, class_names, available, requested, where="", n_sets=len(SET_NAMES), largest_possible=None):
    if requested is None:
        return RsvcError(
            problem=(
                f"{_class_name(label, class_names)} has {available} images{where}, too few to give each of "
                f"{n_sets} image sets one."
            ),
            fix="Add images of that class, or leave the class out of dataset.classes.",
        )
    return RsvcError(
        problem=(
            f"{_class_name(label, class_names)} has {available} images{where}, "
            f"fewer than dataset.images_per_class={requested}."
        ),
        fix=(
            f"Lower dataset.images_per_class to at most {available if largest_possible is None else largest_possible}, "
            "or set it to null to use every image of each class."
        ),
    )


def _check_images_per_class(images_per_class: int | None, n_sets: int) -> None:
    if images_per_class is not None and (
        not isinstance(images_per_class, (int, np.integer)) or images_per_class < n_sets
    ):
        raise RsvcError(
            problem=f"dataset.images_per_class={images_per_class!r} cannot give each of {n_sets} image sets an image.",
            fix=f"Set dataset.images_per_class to an integer of at least {n_sets}, or null to use every image.",
        )


def _n_classes(n_classes: int | None, *label_arrays: np.ndarray) -> int:
    if n_classes is None:
        n_classes = max(int(labels.max(initial=-1)) for labels in label_arrays) + 1
    if n_classes < 1:
        raise RsvcError(
            problem="The dataset has no labelled images to choose from.",
            fix="Point dataset.root at a folder with one sub-folder of images per class.",
        )
    return int(n_classes)


def select_image_sets(
    labels,
    images_per_class: int | None,
    seed: int,
    split: Sequence[float] = (1, 2, 2),
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> ImageSelection:
    """Draw ``images_per_class`` images of each class (None = all) and split them concept:regression:evaluation.

    labels : (n_images,) class of each source image (true or predicted); labels outside
        [0, n_classes) are ignored. n_classes : classes 0..n_classes-1 (None = max label + 1).
    class_names : only to name classes in errors.
    """
    labels = _check_labels(labels, "labels")
    sets = [number for number, ratio in enumerate(_check_split(split)) if ratio > 0]
    _check_images_per_class(images_per_class, len(sets))
    n_classes = _n_classes(n_classes, labels)
    image_index, image_set, label = [], [], []
    # One loop over classes: each has its own seeded stream and a ragged number of images.
    members_by_class = _members_by_class(labels, n_classes)
    smallest_class = min(len(members) for members in members_by_class)
    for class_index, members in enumerate(members_by_class):
        n_wanted = len(members) if images_per_class is None else images_per_class
        if len(members) < max(n_wanted, len(sets)):
            raise _too_few_error(class_index, class_names, len(members), images_per_class, n_sets=len(sets),
                                 largest_possible=smallest_class)
        sizes = split_sizes(n_wanted, split)
        chosen, chosen_set = _draw(members, sizes, range(len(SET_NAMES)), np.random.default_rng([seed, class_index]))
        image_index.append(chosen)
        image_set.append(chosen_set)
        label.append(np.full(len(chosen), class_index, np.int64))
    return ImageSelection(np.concatenate(image_index), np.concatenate(image_set), np.concatenate(label))


def select_image_sets_with_evaluation_source(
    labels,
    evaluation_labels,
    images_per_class: int | None,
    seed: int,
    split: Sequence[float] = (1, 2, 2),
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> ImageSelection:
    """Like ``select_image_sets``, but the evaluation set comes from a second source (e.g. the test split).

    The set sizes are those ``select_image_sets`` would give; concept and regression images are
    drawn from ``labels`` (source 0), evaluation images from ``evaluation_labels`` (source 1).
    With ``images_per_class=None`` every primary image is split concept:regression and every
    evaluation-source image is evaluated.
    """
    labels = _check_labels(labels, "labels")
    evaluation_labels = _check_labels(evaluation_labels, "evaluation_labels")
    ratios = _check_split(split)
    if ratios[CONCEPT] <= 0 or ratios[REGRESSION] <= 0 or ratios[EVALUATION] <= 0:
        raise RsvcError(
            problem=f"dataset.split={list(split)} leaves a set empty although an evaluation source is given.",
            fix="Give all three ratios a positive value, e.g. [1, 2, 2].",
        )
    _check_images_per_class(images_per_class, len(SET_NAMES))
    n_classes = _n_classes(n_classes, labels, evaluation_labels)
    primary_members = _members_by_class(labels, n_classes)
    evaluation_members = _members_by_class(evaluation_labels, n_classes)
    image_index, image_set, label, source = [], [], [], []
    for class_index in range(n_classes):
        primary, evaluation = primary_members[class_index], evaluation_members[class_index]
        if images_per_class is None:
            if len(primary) < 2:
                raise _too_few_error(class_index, class_names, len(primary), None, " in the primary source", 2)
            if len(evaluation) < 1:
                raise _too_few_error(class_index, class_names, 0, None, " in the evaluation source", 1)
            primary_sizes = split_sizes(len(primary), (ratios[CONCEPT], ratios[REGRESSION], 0))[:2]
            evaluation_size = len(evaluation)
        else:
            sizes = split_sizes(images_per_class, ratios)
            primary_sizes, evaluation_size = sizes[:2], sizes[EVALUATION]
            if len(primary) < primary_sizes.sum():
                raise _too_few_error(class_index, class_names, len(primary), images_per_class,
                                     where=f" in the primary source ({primary_sizes.sum()} needed for concept "
                                     "and regression)")
            if len(evaluation) < evaluation_size:
                raise _too_few_error(class_index, class_names, len(evaluation), images_per_class,
                                     where=f" in the evaluation source (needs {evaluation_size})")
        # Distinct streams per (class, source): the evaluation draw never shifts the primary one.
        chosen, chosen_set = _draw(primary, primary_sizes, (CONCEPT, REGRESSION),
                                   np.random.default_rng([seed, class_index]))
        evaluation_chosen, evaluation_set = _draw(evaluation, np.array([evaluation_size]), (EVALUATION,),
                                                  np.random.default_rng([seed, class_index, EVALUATION_SOURCE]))
        image_index += [chosen, evaluation_chosen]
        image_set += [chosen_set, evaluation_set]
        label.append(np.full(len(chosen) + len(evaluation_chosen), class_index, np.int64))
        source += [np.full(len(chosen), PRIMARY_SOURCE, np.int8),
                   np.full(len(evaluation_chosen), EVALUATION_SOURCE, np.int8)]
    return ImageSelection(np.concatenate(image_index), np.concatenate(image_set), np.concatenate(label),
                          np.concatenate(source))

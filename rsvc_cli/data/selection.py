"""Seeded, recorded choice of the three disjoint image sets per class.

RSVC fits concepts on a **concept** set, fits regressions on a **regression** set and reports
similarities on an **evaluation** set (the authors: 100 / 200 / 200 images per class). The
choice is a pure function of (labels, images_per_class, seed, split): class ``c`` draws from its
own random stream seeded by ``(seed, c)``, so adding or dropping other classes never changes
class ``c``'s sets. Labels may be true labels or a model's predicted classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    notes : one line per class that got fewer images than asked (not recorded: the images say it).
    """

    image_index: np.ndarray
    image_set: np.ndarray
    label: np.ndarray
    source: np.ndarray | None = None
    notes: tuple = ()

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


def requested_sizes(images_per_class: int | None, split: Sequence[float] = (1, 2, 2),
                    images_per_set: Mapping[str, int | None] | None = None) -> np.ndarray | None:
    """Images asked per class for each set, (3,) in SET_NAMES order; None = every image, split by ``split``.

    ``images_per_set`` (``dataset.images_per_set``: concept, regression, evaluation) gives a set its own
    count; a set it leaves out (or null) gets its share of ``images_per_class`` by ``split``.
    """
    ratios = _check_split(split)
    given = dict(images_per_set or {})
    unknown = sorted(set(given) - set(SET_NAMES))
    if unknown:
        raise RsvcError(
            problem=f"dataset.images_per_set names {', '.join(unknown)}, which is not an image set.",
            fix=f"Use the sets {', '.join(SET_NAMES)} (e.g. dataset.images_per_set.evaluation=50).",
        )
    given = {name: count for name, count in given.items() if count is not None}
    for name, count in given.items():
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
            raise RsvcError(
                problem=f"dataset.images_per_set.{name}={count!r} is not a number of images.",
                fix=f"Set dataset.images_per_set.{name} to a whole number of images per class (0 leaves the set out).",
            )
    if len(given) < len(SET_NAMES):
        if images_per_class is None:
            if not given:
                return None
            missing = [name for name in SET_NAMES if name not in given]
            raise RsvcError(
                problem=(f"dataset.images_per_set gives {', '.join(given)} but not {', '.join(missing)}, and "
                         "dataset.images_per_class=null (every image) cannot be shared with fixed counts."),
                fix=f"Give dataset.images_per_set.{missing[0]} too, or set dataset.images_per_class to a number.",
            )
        _check_images_per_class(images_per_class, int(np.sum(ratios > 0)))
        sizes = split_sizes(int(images_per_class), ratios)
    else:
        sizes = np.zeros(len(SET_NAMES), np.int64)
    for name, count in given.items():
        sizes[SET_NAMES.index(name)] = int(count)
    if sizes.sum() == 0:
        raise RsvcError(problem="dataset.images_per_set asks for no images at all.",
                        fix="Give the concept and regression sets at least one image each.")
    return sizes


def set_floor(asked, min_images: int):
    """The fewest images a set may keep when a class has fewer than asked (or, grouped by prediction, when
    a model predicts the class for fewer): ``min_images``, or half of what the set asked if that is fewer
    (at least 1). Works elementwise on arrays."""
    half = np.maximum(1, (np.asarray(asked) + 1) // 2)
    return np.minimum(half, min_images)


def _sizes_of_class(available: int, asked: np.ndarray | None, ratios: np.ndarray, part: Sequence[int],
                    min_images: int | None, describe) -> tuple[np.ndarray, str | None]:
    """How many of a class's ``available`` images each set of ``part`` gets, (3,) with zeros elsewhere,
    and a note when fewer than asked.

    asked : (3,) the counts asked (zeros outside ``part``), or None for every image split by ``ratios``.
    min_images : with fewer images than asked, each set keeps at least ``set_floor(asked, min_images)``;
        None = every set needs all it asked. ``describe(kind, detail)`` makes the error.
    """
    in_part = np.zeros(len(SET_NAMES), bool)
    in_part[list(part)] = True
    if asked is None:
        shares = np.where(in_part, ratios, 0.0)
        if len(part) == 1:
            shares = in_part.astype(np.float64)  # a source of its own: every image goes to its one set
        if available < int(np.sum(shares > 0)):
            raise describe("every", int(np.sum(shares > 0)))
        return split_sizes(available, shares), None
    if available >= asked.sum():
        return asked, None
    if min_images is None or available < int(np.sum(asked > 0)):
        raise describe("asked", None)
    # Fewer than asked: every set keeps its share of what there is, down to the stated minimum.
    sizes = split_sizes(available, asked)
    floor = np.where(asked > 0, set_floor(asked, min_images), 0)
    if np.any(sizes < floor):
        raise describe("minimum", floor)
    kept = " / ".join(f"{sizes[s]} {SET_NAMES[s]}" for s in part)
    return sizes, f"{available} images, fewer than the {int(asked.sum())} asked: using {kept}"


def select_image_sets(
    labels,
    images_per_class: int | None,
    seed: int,
    split: Sequence[float] = (1, 2, 2),
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    evaluation_labels=None,
    images_per_set: Mapping[str, int | None] | None = None,
    min_images: int | None = None,
) -> ImageSelection:
    """Draw each class's concept, regression and evaluation images.

    labels : (n_images,) class of each source image (true or predicted); labels outside
        [0, n_classes) are ignored. n_classes : classes 0..n_classes-1 (None = max label + 1).
    images_per_class, split, images_per_set : the counts (``requested_sizes``); ``images_per_class=None``
        and no ``images_per_set`` = every image of each class, split by ``split``.
    evaluation_labels : classes of a second source (e.g. the validation split) that alone gives the
        evaluation set (rows with ``source`` 1); concept and regression images then come from ``labels``.
        With every image asked for, every evaluation-source image is evaluated.
    min_images : a class with fewer images than asked keeps every set's share of what it has if each set
        keeps at least this many (or half of what it asked, if fewer: ``set_floor``), with a note in
        ``ImageSelection.notes``; None = too few images is an error.
    class_names : only to name classes in errors and notes.

    Each class (and each source) draws from its own stream seeded by (seed, class), (seed, class, 1) for
    the evaluation source, so adding or dropping other classes never changes a class's sets.
    """
    labels = _check_labels(labels, "labels")
    ratios = _check_split(split)
    separate = evaluation_labels is not None
    asked = requested_sizes(images_per_class, split, images_per_set)
    if asked is None:
        _check_images_per_class(images_per_class, int(np.sum(ratios > 0)))
    images_per_set = images_per_set or None
    if separate and (ratios[EVALUATION] <= 0 if asked is None else asked[EVALUATION] <= 0):
        raise RsvcError(
            problem="The evaluation set is asked for no images although dataset.evaluation_root gives them.",
            fix="Give the evaluation set a share (dataset.split=[1,2,2] or dataset.images_per_set.evaluation=N), "
                "or drop dataset.evaluation_root.",
        )
    label_arrays = [labels]
    if separate:
        evaluation_labels = _check_labels(evaluation_labels, "evaluation_labels")
        label_arrays.append(evaluation_labels)
    n_classes = _n_classes(n_classes, *label_arrays)
    parts = [((CONCEPT, REGRESSION) if separate else (CONCEPT, REGRESSION, EVALUATION),
              _members_by_class(labels, n_classes), PRIMARY_SOURCE, " in the primary source" if separate else "")]
    if separate:
        parts.append(((EVALUATION,), _members_by_class(evaluation_labels, n_classes), EVALUATION_SOURCE,
                      " in the evaluation source"))
    image_index, image_set, label, source, notes = [], [], [], [], []
    # One loop over classes: each has its own seeded stream and a ragged number of images.
    for class_index in range(n_classes):
        for sets, members_by_class, source_number, where in parts:
            members = members_by_class[class_index]
            part_asked = None if asked is None else np.where(np.isin(np.arange(len(SET_NAMES)), sets), asked, 0)
            describe = _describe_too_few(class_index, class_names, len(members), where, part_asked, images_per_class,
                                         images_per_set, min_images,
                                         min(len(m) for m in members_by_class) if not separate else None)
            sizes, note = _sizes_of_class(len(members), part_asked, ratios, sets, min_images, describe)
            if note:
                notes.append(f"{_class_name(class_index, class_names)}{where}: {note}")
            # Distinct streams per (class, source): the evaluation draw never shifts the primary one.
            stream = [seed, class_index] if source_number == PRIMARY_SOURCE else [seed, class_index, EVALUATION_SOURCE]
            chosen, chosen_set = _draw(members, sizes[list(sets)], sets, np.random.default_rng(stream))
            image_index.append(chosen)
            image_set.append(chosen_set)
            label.append(np.full(len(chosen), class_index, np.int64))
            source.append(np.full(len(chosen), source_number, np.int8))
    return ImageSelection(np.concatenate(image_index), np.concatenate(image_set), np.concatenate(label),
                          np.concatenate(source), notes=tuple(notes))


def _describe_too_few(label, class_names, available, where, asked, images_per_class, images_per_set, min_images,
                      smallest_class):
    """The error for a class with too few images, made when ``_sizes_of_class`` finds it."""

    def describe(kind, detail):
        name = _class_name(label, class_names)
        if kind == "every":
            return RsvcError(
                problem=f"{name} has {available} images{where}, too few to give each of {detail} image sets one.",
                fix="Add images of that class, or leave the class out of dataset.classes.",
            )
        wanted = " / ".join(f"{asked[s]} {SET_NAMES[s]}" for s in range(len(SET_NAMES)) if asked[s] > 0)
        if not images_per_set:
            problem = f"{name} has {available} images{where}, fewer than dataset.images_per_class={images_per_class}"
            largest = available if smallest_class is None else smallest_class
            lower = f"Lower dataset.images_per_class to at most {largest}"
        else:
            problem = f"{name} has {available} images{where}, fewer than the {int(asked.sum())} asked ({wanted})"
            lower = "Lower dataset.images_per_set"
        minimum = ""
        if kind == "minimum":
            floors = " / ".join(f"{detail[s]} {SET_NAMES[s]}" for s in range(len(SET_NAMES)) if asked[s] > 0)
            problem += (f", and its share would leave a set below the minimum ({floors}; "
                        f"dataset.min_images_per_set={min_images})")
            minimum = "lower dataset.min_images_per_set to use what the class has, "
        return RsvcError(
            problem=problem + ".",
            fix=(f"{lower}, {minimum}add images of that class, or leave it out of dataset.classes "
                 "(set dataset.images_per_class=null to use every image)."),
        )

    return describe


def select_image_sets_with_evaluation_source(labels, evaluation_labels, images_per_class: int | None, seed: int,
                                             split: Sequence[float] = (1, 2, 2), n_classes: int | None = None,
                                             class_names: Sequence[str] | None = None) -> ImageSelection:
    """``select_image_sets`` with the evaluation set from a second source (kept for its callers)."""
    return select_image_sets(labels, images_per_class, seed, split, n_classes, class_names,
                             evaluation_labels=evaluation_labels)

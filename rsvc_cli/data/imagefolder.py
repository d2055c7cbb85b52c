"""Class-per-folder image trees (the ImageNet layout): ``root/<class>/<image>``.

A source is the small interface every dataset offers the stages: ``class_names``, ``paths``,
``labels`` (index into ``class_names``), ``len(source)`` and ``load_image(i) -> PIL RGB``.
Indices are positions in ``paths``; they are what artifacts record, so ordering is deterministic
(classes sorted or as requested, files sorted by their path inside the class folder).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from rsvc_cli.errors import RsvcError, clip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Unreadable images listed in one message at most; the count of the rest follows.
MAX_LISTED_PROBLEMS = 20

# Integer and float modes (16-bit PNG/TIFF greyscale, float TIFF) that PIL's convert("RGB")
# would clip to 255 instead of rescaling.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _is_hidden(name: str) -> bool:
    # Editor and OS litter (.ipynb_checkpoints, .DS_Store, ._foo.jpg) is never a class or an image.
    return name.startswith(".")


def _is_image_file(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(class_dir: str) -> list[str]:
    """Image files under ``class_dir`` (recursively, like torchvision), sorted by relative path."""
    relative_paths = []
    for dir_path, dir_names, file_names in os.walk(class_dir, followlinks=True):
        dir_names[:] = [name for name in dir_names if not _is_hidden(name)]
        relative_dir = os.path.relpath(dir_path, class_dir)
        for name in file_names:
            if _is_image_file(name):
                relative_paths.append(name if relative_dir == "." else os.path.join(relative_dir, name))
    relative_paths.sort()
    return [os.path.join(class_dir, path) for path in relative_paths]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: greyscale, palette (with transparency), RGBA, CMYK, 16-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        largest = float(values.max(initial=0))
        if image.mode.startswith("I;16") or (image.mode == "I" and largest > 255):
            top = 65535.0
        elif image.mode == "F" and largest <= 1.0:
            top = 1.0  # float images in [0, 1]
        else:
            top = 255.0
        grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")
    if image.mode == "P" and "transparency" in image.info:
        # PIL warns when a palette image with transparency goes straight to RGB.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _bomb_problem(path: str, error: Exception) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(error))
    size = f" ({int(pixels.group(1)) / 1e6:.0f} Mpx)" if pixels else ""
    return (f"{path} is too large to decode safely{size}: PIL refuses images over "
            f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx as possible decompression bombs")


def _missing_problem(path: str) -> str | None:
    if os.path.islink(path) and not os.path.exists(path):
        return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
    if not os.path.exists(path):
        return f"{path} no longer exists"
    if os.path.getsize(path) == 0:
        return f"{path} is empty (0 bytes)"
    return None


def image_problem(path: str, min_side: int | None = None) -> str | None:
    """Why ``path`` cannot be used, judged from its header (cheap: no pixel is decoded); None if
    it can. ``min_side``: the smallest width and height accepted."""
    problem = _missing_problem(path)
    if problem:
        return problem
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        return _bomb_problem(path, error)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return f"{path} cannot be read ({type(error).__name__}: {clip(error, 160)})"
    if min_side and min(width, height) < min_side:
        return f"{path} is {width}x{height} px, smaller than the {min_side} px a patch needs"
    return None


def check_images(paths: Sequence[str], min_side: int | None = None) -> None:
    """Every image in ``paths`` must open and be at least ``min_side`` px wide and high: one
    RsvcError lists the ones that are not (up to MAX_LISTED_PROBLEMS) with what to do."""
    problems = [problem for problem in (image_problem(p, min_side) for p in paths) if problem]
    if not problems:
        return
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    small = f" (images under {min_side} px are too small for the patch geometry: patch.size=null uses " \
            "whole images)" if min_side and any("smaller than" in p for p in problems) else ""
    raise RsvcError(
        problem=f"{len(problems)} of the {len(paths)} selected images cannot be used: {shown}{more}.",
        fix="Remove these files from the dataset folder (for a dangling symbolic link, the link itself) or "
        f"replace them with readable images (an oversized one downscaled, e.g. to 4096 px){small}, then run "
        "the same command again.",
    )


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` fully (so truncation shows here, not later) and return it as RGB."""
    problem = _missing_problem(path)
    if problem:
        raise RsvcError(problem=f"Image file {problem}.",
                        fix="Remove it from the dataset folder (a dangling link: the link itself) or restore it, "
                        "then run the same command again.")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise RsvcError(problem=f"Image file {_bomb_problem(path, error)}.",
                        fix="Downscale it (e.g. to 4096 px) or remove it from the dataset folder, then run the "
                        "same command again.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        # PIL reports corrupt and truncated files through all of these.
        raise RsvcError(
            problem=f"Image file {path} cannot be read ({type(error).__name__}: {clip(error, 160)}).",
            fix="Delete it or replace it with a valid copy, then run the same command again.",
        ) from None


def class_folders(root: str, setting: str = "dataset.root") -> list[str]:
    """The class folders of ``root``, sorted; RsvcError (naming ``setting``) when there are none."""
    if not os.path.exists(root):
        raise RsvcError(
            problem=f"Dataset folder {root} ({setting}) does not exist.",
            fix=f"Set {setting} to a folder holding one sub-folder of images per class.",
        )
    if not os.path.isdir(root):
        raise RsvcError(
            problem=f"Dataset root {root} ({setting}) is a file, not a folder.",
            fix=f"Set {setting} to a folder holding one sub-folder of images per class.",
        )
    available = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _is_hidden(entry.name))
    if not available:
        loose = [entry.name for entry in os.scandir(root) if _is_image_file(entry.name)]
        hint = f" (it holds {len(loose)} loose images)" if loose else ""
        raise RsvcError(
            problem=f"Dataset folder {root} ({setting}) has no class folders{hint}.",
            fix="Put the images in one sub-folder per class (root/<class>/<image>), the ImageNet layout.",
        )
    return available


class ImageFolderSource:
    """Images in ``root/<class>/<file>``, labelled by folder.

    Parameters
    ----------
    root : folder holding one sub-folder per class.
    classes : class folder names to use, in this order (labels follow it); None = all, sorted.
    setting : the config key that gave ``root`` (named in errors).
    """

    def __init__(self, root: str | os.PathLike, classes: Iterable[str] | None = None, setting: str = "dataset.root"):
        self.root = os.fspath(root)
        self.setting = setting  # the config key that names `root`, for errors
        self.classes = None if classes is None else [str(name) for name in classes]
        self.class_names = self._resolve_class_names()
        self.paths, labels = [], []
        for label, class_name in enumerate(self.class_names):
            class_paths = _list_images(os.path.join(self.root, class_name))
            if not class_paths:
                raise RsvcError(
                    problem=(
                        f"Class folder {os.path.join(self.root, class_name)} holds no images "
                        f"(looked for {' '.join(ext[1:] for ext in IMAGE_EXTENSIONS)})."
                    ),
                    fix="Add images to it, remove the folder, or leave the class out of dataset.classes.",
                )
            self.paths.extend(class_paths)
            labels.extend([label] * len(class_paths))
        self.labels = np.asarray(labels, dtype=np.int64)

    def _resolve_class_names(self) -> list[str]:
        available = class_folders(self.root, self.setting)
        # Every class folder, sorted: how torchvision's ImageFolder numbers classes, and so the output
        # order of models trained on such a tree (stages.common.class_outputs).
        self.folder_names = available
        if self.classes is None:
            return available
        duplicates = sorted({name for name in self.classes if self.classes.count(name) > 1})
        if duplicates:
            raise RsvcError(
                problem=f"dataset.classes names {', '.join(duplicates)} more than once.",
                fix="List each class once.",
            )
        if not self.classes:
            raise RsvcError(
                problem="dataset.classes is an empty list.",
                fix="List at least one class folder, or set dataset.classes=null to use all of them.",
            )
        available_set = set(available)
        for name in self.classes:
            if name not in available_set:
                close = difflib.get_close_matches(name, available, n=5)
                suggestion = f" Close matches: {', '.join(close)}." if close else ""
                raise RsvcError(
                    problem=f"Class {name!r} is not a folder in {self.root}.{suggestion}",
                    fix=(
                        f"Use one of its {len(available)} class folders (e.g. {', '.join(available[:5])}), "
                        "or set dataset.classes=null to use all of them."
                    ),
                )
        return list(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def check(self, indices: Iterable[int], min_side: int | None = None) -> None:
        """Images ``indices`` must all open (see ``check_images``)."""
        check_images([self.paths[int(i)] for i in indices], min_side)

    def load_image(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image; RsvcError naming the file if it cannot be read."""
        return load_rgb(self.paths[index])

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(root={self.root!r}, n_classes={len(self.class_names)}, "
            f"n_images={len(self.paths)})"
        )


class SplitSource:
    """Two splits of one dataset in one index space: ``primary`` (e.g. train) then ``evaluation`` (e.g. val).

    The evaluation split's classes are matched to the primary's by folder name and take its labels;
    image ``i`` is ``primary``'s for ``i < n_primary``, else ``evaluation``'s image ``i - n_primary``.
    """

    def __init__(self, primary: ImageFolderSource, evaluation_root: str | os.PathLike,
                 setting: str = "dataset.evaluation_root"):
        evaluation_root = os.fspath(evaluation_root)
        folders = class_folders(evaluation_root, setting)
        missing = [name for name in primary.class_names if name not in set(folders)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise RsvcError(
                problem=(f"{len(missing)} compared class(es) have no folder in {setting}={evaluation_root}: {shown} "
                         f"(it has {len(folders)} class folders, e.g. {', '.join(folders[:5])}). Evaluation images "
                         "are matched to the classes of dataset.root by folder name."),
                fix=(f"Point {setting} at the held-out split with the same class folders as dataset.root, or list "
                     "only classes both have in dataset.classes."),
            )
        self.primary = primary
        self.evaluation = ImageFolderSource(evaluation_root, classes=primary.class_names, setting=setting)
        self.root, self.evaluation_root = primary.root, evaluation_root
        self.class_names = list(primary.class_names)
        self.folder_names = primary.folder_names
        self.n_primary = len(primary)
        self.paths = primary.paths + self.evaluation.paths
        self.labels = np.concatenate([primary.labels, self.evaluation.labels])

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def __repr__(self) -> str:
        return f"SplitSource(root={self.root!r}, evaluation_root={self.evaluation_root!r}, n_images={len(self)})"

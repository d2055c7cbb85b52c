"""rsvc collage: top / over / under image grids for every concept of both models (method step 8).

For concept k of model m on the evaluation patches, with t its true coefficients and p the other
model's prediction (e = t - p), at most one patch per source image:
- top: the largest t (what the concept is);
- over: the most negative e (the other model predicts the concept where it is absent);
- under: the most positive e among patches whose t is below the smallest t of the top set.
Tiles are cropped from the original image at the stored patch box. PNGs go to the comparison's
folder under `<store>/reports/`.
"""

from __future__ import annotations

import collections
import concurrent.futures
from pathlib import Path

import numpy as np

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.stages.common import store_dir
from rsvc_cli.stages.decompose import read_activations
from rsvc_cli.stages.regress import prepare_pair, read_regression, regress, regression_content, regression_params
from rsvc_cli.stages.score import CROSS, score
from rsvc_cli.viz.png import write_png

# zlib level 1: a third of the encoding time of level 6 for files a fifth larger; a sweep writes
# thousands of collages.
PNG_COMPRESSION = 1

COLLAGE_KINDS = ("top", "over", "under")


def run(cfg) -> dict:
    if not cfg.collage.enabled:
        raise RsvcError("rsvc collage only makes collages, so collage.enabled=false leaves it nothing to do.",
                        "Drop collage.enabled=false here; it belongs to rsvc compare and rsvc report, where it skips "
                        "the collages.")
    pair = prepare_pair(cfg)
    result = score(pair, cfg, regress(pair, cfg))
    return collage(pair, cfg, result)


def comparison_dir(cfg, result: dict) -> Path:
    """One folder per comparison, named like its scores artifact."""
    return store_dir(cfg) / "reports" / result["path"].stem


def original_image(images, image_index: int, square_box=None):
    """The original image as the models saw it, planted square included (painted at its recorded box)."""
    image = images.source.load_image(int(image_index))
    if square_box is not None and np.all(np.isfinite(square_box)):
        from rsvc_cli.data.planting import paint_box

        image = paint_box(image, square_box, images.planting.color if images.planting else (255, 0, 255))
    return image


def image_name(images, image_index: int) -> str:
    """How the report names an image: its class folder and file where it has one, and its index."""
    paths = getattr(images.source, "paths", None)
    if paths is not None and 0 <= int(image_index) < len(paths):
        path = Path(str(paths[int(image_index)]))
        return f"{path.parent.name}/{path.name} (image {int(image_index)})"
    return f"image {int(image_index)}"


def collage(pair, cfg, result: dict) -> dict:
    """Write every concept's grids (and heatmap of its best image); return {(class, owner, k): {kind: rel path}},
    plus "heatmap_image" (the heatmap's image, named) and "heatmap_max" (the coefficient at the top of its scale)."""
    out = comparison_dir(cfg, result)
    reg_content = regression_content(pair, regression_params(cfg), str(cfg.dataset.group_by))
    reg = read_regression(result["regression_path"], reg_content)
    acts = read_activations(*pair.activations1)
    index_of_image_row = np.zeros(len(acts.square_box), dtype=np.int64)
    index_of_image_row[acts.image_row] = acts.image_index
    square_of_image = dict(zip(index_of_image_row.tolist(), acts.square_box))
    cache: dict[int, object] = {}

    def get_image(index: int):
        if index not in cache:
            cache[index] = original_image(pair.images, index, square_of_image.get(index))
        return cache[index]

    labels = result.get("labels") or {}
    written = {}
    n_total = sum(2 * reg.classes[name]["coefficients1_evaluation"].shape[1] for name in reg.classes)
    bar = console.progress(n_total, "collages", unit="concept")
    with _BackgroundSaver() as saver:
        for name, entry in reg.classes.items():
            rows = entry["evaluation_rows"]
            boxes, image_index = acts.patch_box[rows], acts.image_index[rows]
            similarity = result["classes"][name]["similarity"]
            for owner in (1, 2):
                true = entry[f"coefficients{owner}_evaluation"]
                predicted = entry[CROSS[owner]]["evaluation_prediction"]
                for k in range(true.shape[1]):
                    title = (f"{name} · {labels.get(f'model{owner}', f'model{owner}')} concept {k} · {CROSS[owner]} "
                             f"{_fmt(similarity[CROSS[owner]][k])} (self {_fmt(similarity[f'{owner}->{owner}'][k])})")
                    folder = Path("collages") / _slug(name)
                    written[(name, f"model{owner}", k)] = _write_concept(
                        saver, out, folder / f"model{owner}_concept{k}", get_image,
                        lambda index: image_name(pair.images, index), boxes, image_index,
                        true[:, k], predicted[:, k], title, int(cfg.n_tiles))
                    bar.update(1)
    bar.close()
    console.say(f"collages: {out / 'collages'}")
    return written


def _write_concept(saver, out: Path, stem: Path, get_image, name_image, boxes, image_index, true, predicted, title: str,
                   n_tiles: int) -> dict[str, str]:
    """One concept's grids and the heatmap of its best image, as PNGs `<out>/<stem>_<kind>.png`;
    returns {kind: path relative to out}."""
    from rsvc_cli.viz.collage import concept_heatmap, make_concept_collages

    (out / stem).parent.mkdir(parents=True, exist_ok=True)
    images = make_concept_collages(get_image, boxes, image_index, true, predicted, title, n_tiles=n_tiles)
    paths = {}
    if len(true):
        best = int(image_index[int(np.nanargmax(np.where(np.isfinite(true), true, -np.inf)))])
        on_best = image_index == best
        # The scale's top is the best patch's coefficient, so the report can draw the colour bar.
        top = float(np.nanmax(true[on_best]))
        images["heatmap"] = concept_heatmap(get_image(best), boxes[on_best], true[on_best], vmax=top)
        paths["heatmap_image"] = name_image(best)
        paths["heatmap_max"] = top
    for kind, image in images.items():
        rel = stem.parent / f"{stem.name}_{kind}.png"
        saver.save(image, out / rel)
        paths[kind] = str(rel)
    return paths


class _BackgroundSaver:
    """Writes PNGs in a second thread while the next grids are drawn. Measured with `viz.png`, the
    overlap is poor: one comparison's collages take about 5.0 s this way or saving inline, 3.0 s with
    no saving. At most ``max_pending`` images wait in memory; an error in a write is raised by the
    next save or at the end of the ``with`` block."""

    def __init__(self, max_pending: int = 32):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsvc-png")
        self._pending: collections.deque = collections.deque()
        self._max_pending = max_pending

    def save(self, image, path: Path) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write_png, image, path, PNG_COMPRESSION))

    def __enter__(self) -> "_BackgroundSaver":
        return self

    def __exit__(self, exc_type, *_) -> None:
        """Wait for every write; a write's error is raised unless another one is on its way already."""
        try:
            while self._pending:
                future = self._pending.popleft()
                if exc_type is None:
                    future.result()
                else:
                    future.exception()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _fmt(value) -> str:
    return "undefined" if value is None or not np.isfinite(value) else f"{value:.2f}"


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)) or "class"

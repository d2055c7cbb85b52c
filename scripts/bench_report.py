"""How long the visual output of a full comparison takes: 100 classes x 10 concepts x 2 models.

Synthetic CIFAR-sized images (32 px, 16 patches each, 200 evaluation images per class) go through
the real code: ``select_collage_patches``, ``crop_tile``, ``make_grid`` and ``concept_heatmap`` for
every concept, matplotlib plots per class, then ``write_report``. Prints the wall time of each part,
its share of the total, the time per concept card, and the size of index.html and the largest class page.

    python scripts/bench_report.py                      # the full 100 x 10 x 2
    python scripts/bench_report.py --n-classes 3 --keep --out /tmp/small-report --screenshot /tmp/shot.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from rsvc_cli.viz.collage import (
    COLLAGE_DESCRIPTIONS,
    COLLAGE_KINDS,
    concept_heatmap,
    crop_tile,
    make_grid,
    select_collage_patches,
)
from rsvc_cli.viz.plots import plot_layer_heatmap, write_class_similarities_svg
from rsvc_cli.viz.report import write_report

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def make_images(rng, n_images: int, size: int) -> list[Image.Image]:
    """Smooth random colour fields with a bright square: something a tile can visibly show."""
    coarse = rng.uniform(0, 255, size=(n_images, 4, 4, 3)).astype(np.uint8)
    images = []
    for field in coarse:
        image = Image.fromarray(field, mode="RGB").resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image).copy()
        side = int(rng.integers(size // 6, size // 3))
        x, y = rng.integers(0, size - side, size=2)
        pixels[y : y + side, x : x + side] = rng.integers(150, 255, size=3)
        images.append(Image.fromarray(pixels, mode="RGB"))
    return images


def patch_grid(size: int) -> np.ndarray:
    """DESIGN.md step 1 scaled to the image: 64 px patches at stride 51 on 224 px, 4 x 4 per image."""
    patch, stride = 64 / 224 * size, 51 / 224 * size
    starts = np.arange(4) * stride
    y0, x0 = np.meshgrid(starts, starts, indexing="ij")
    return np.stack([x0.ravel(), y0.ravel(), x0.ravel() + patch, y0.ravel() + patch], axis=1)


def render(out_dir: Path, n_classes: int, n_concepts: int, n_images: int, image_size: int, n_tiles: int, seed: int):
    rng = np.random.default_rng(seed)
    timings: dict[str, float] = defaultdict(float)
    boxes_per_image = patch_grid(image_size)
    patches_per_image = len(boxes_per_image)
    image_index = np.repeat(np.arange(n_images), patches_per_image)
    patch_box = np.tile(boxes_per_image, (n_images, 1))
    owners = (("model1", "2->1", "1->1"), ("model2", "1->2", "2->2"))
    classes = []
    for class_position in range(n_classes):
        name = f"class_{class_position:03d}"
        images = make_images(rng, n_images, image_size)
        true = rng.gamma(0.6, size=(2, n_concepts, image_index.size))
        predicted = np.clip(0.6 * true + rng.normal(scale=0.4, size=true.shape), 0, None)
        similarity = rng.uniform(-0.1, 1.0, size=(2, n_concepts))
        self_similarity = rng.uniform(0.7, 1.0, size=(2, n_concepts))
        concepts = []
        for owner_position, (owner, direction, _) in enumerate(owners):
            for concept in range(n_concepts):
                t, p = true[owner_position, concept], predicted[owner_position, concept]
                started = time.perf_counter()
                selection = select_collage_patches(t, p, image_index, n_tiles)
                timings["selection"] += time.perf_counter() - started
                collages = {}
                for kind in COLLAGE_KINDS:
                    started = time.perf_counter()
                    tiles = [crop_tile(images[image_index[i]], patch_box[i]) for i in selection[kind]]
                    timings["crops"] += time.perf_counter() - started
                    started = time.perf_counter()
                    grid = make_grid(
                        tiles, f"{name} · {owner} concept {concept} · {kind}", COLLAGE_DESCRIPTIONS[kind],
                        captions=[f"img {image_index[i]}\nt {t[i]:.2f}  p {p[i]:.2f}" for i in selection[kind]],
                    )
                    timings["grids (draw)"] += time.perf_counter() - started
                    started = time.perf_counter()
                    relative = f"collages/{name}/{owner}-{concept}-{kind}.png"
                    (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                    grid.save(out_dir / relative)
                    timings["grids (png)"] += time.perf_counter() - started
                    collages[kind] = relative
                started = time.perf_counter()
                top_image = image_index[selection["top"][0]]
                on_image = image_index == top_image
                heatmap = concept_heatmap(images[top_image], patch_box[on_image], t[on_image])
                heatmap_path = f"collages/{name}/{owner}-{concept}-heatmap.png"
                heatmap.save(out_dir / heatmap_path)
                timings["heatmaps"] += time.perf_counter() - started
                concepts.append({
                    "owner": owner, "concept": concept, "direction": direction,
                    "similarity": float(similarity[owner_position, concept]),
                    "self_similarity": float(self_similarity[owner_position, concept]),
                    "reverse_similarity": None, "importance": float(rng.uniform(-1, 1)), "square_content": None,
                    "collages": collages, "heatmap": heatmap_path,
                })
        started = time.perf_counter()
        plots = []
        for owner_position, (owner, direction, self_direction) in enumerate(owners):
            plots.append(str(write_class_similarities_svg(
                out_dir / f"plots/{name}-{owner}.svg", f"{name}: {owner} concepts",
                {direction: similarity[owner_position], self_direction: self_similarity[owner_position]},
            ).relative_to(out_dir)))
        timings["plots"] += time.perf_counter() - started
        classes.append({"name": name, "plots": plots, "concepts": concepts})

    started = time.perf_counter()
    layers = [f"layer{i}" for i in range(1, 4)]
    plot_layer_heatmap(out_dir / "plots/layers.png", "model1 vs model2", rng.uniform(0.3, 0.9, (3, 3)), layers,
                       layers, "mean max correlation")
    timings["plots"] += time.perf_counter() - started
    report = {
        "title": "rsvc benchmark report", "subtitle": f"{n_classes} classes x {n_concepts} concepts x 2 models",
        "meta": {"seed": seed, "n_images": n_images, "image_size": image_size, "n_tiles": n_tiles},
        "models": {"model1": "synthetic model 1", "model2": "synthetic model 2"},
        "classes": classes, "layer_heatmaps": ["plots/layers.png"],
    }
    started = time.perf_counter()
    index = write_report(out_dir, report)
    timings["html"] += time.perf_counter() - started
    return index, timings


def screenshot(index: Path, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(index.as_uri())
        page.screenshot(path=str(path.with_name(path.stem + "-index.png")), full_page=False)
        page.click("nav.classes a >> nth=0")
        page.wait_for_load_state("load")
        page.locator("article.card").first.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=str(path.with_name(path.stem + "-class.png")), full_page=False)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-classes", type=int, default=100)
    parser.add_argument("--n-concepts", type=int, default=10)
    parser.add_argument("--n-images", type=int, default=200, help="evaluation images per class")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-tiles", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the report folder")
    parser.add_argument("--screenshot", type=Path, default=None, help="also save screenshots (needs chromium)")
    args = parser.parse_args()

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="rsvc-bench-report-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    index, timings = render(out_dir, args.n_classes, args.n_concepts, args.n_images, args.image_size,
                            args.n_tiles, args.seed)
    total = time.perf_counter() - started
    n_cards = args.n_classes * args.n_concepts * 2

    print(f"{args.n_classes} classes x {args.n_concepts} concepts x 2 models = {n_cards} cards, "
          f"{args.n_images} images of {args.image_size} px per class, {args.n_tiles} tiles per grid")
    collage_parts = ["selection", "crops", "grids (draw)", "grids (png)", "heatmaps"]
    for part in collage_parts + ["plots", "html"]:
        print(f"  {part:<14} {timings[part]:8.2f} s  {100 * timings[part] / total:5.1f} %  "
              f"{1000 * timings[part] / n_cards:7.2f} ms/card")
    collage_total = sum(timings[part] for part in collage_parts)
    print(f"  {'collages':<14} {collage_total:8.2f} s  (selection + crops + grids + heatmaps)")
    print(f"  {'total':<14} {total:8.2f} s  (including synthetic data)")
    print(f"  html / collages = {timings['html'] / collage_total:.3f}")
    pages = sorted((out_dir / "classes").glob("*.html"), key=lambda page: page.stat().st_size)
    print(f"index.html: {index.stat().st_size / 1024:.0f} KiB; largest class page: "
          f"{pages[-1].stat().st_size / 1024:.0f} KiB; {len(pages)} class pages; "
          f"all files: {sum(f.stat().st_size for f in out_dir.rglob('*') if f.is_file()) / 2**20:.0f} MiB")
    if args.screenshot:
        screenshot(index, args.screenshot)
        print(f"screenshots next to {args.screenshot}")
    if args.keep or args.out:
        print(f"report: {index}")
    else:
        shutil.rmtree(out_dir)


if __name__ == "__main__":
    main()

"""Extraction throughput against a bare `model(x)` loop, and extraction memory against the number of images.

    python scripts/bench_extract.py                  # cifar_resnet56 and test_vit, CPU
    python scripts/bench_extract.py --models test_vit --images 32 --batch-size 8

Throughput: `rsvc extract`'s work for a set of images (image decoding, patching, the forward passes
with the layer hooks, HDF5 writes) against a bare
`model(x)` loop over the same patches at the same batch size, in the same process, both with the
same torch threads; the patches of the bare loop are made beforehand and are not timed. Printed as
bare time / extraction time (a throughput ratio; goal >= 0.9). The two alternate `--repeats` times
and the best time of each counts (others' load on a shared machine only ever slows a run down).
Extraction runs the patches only up to the deepest requested layer (test_vit's default
blocks.0,blocks.1 skip most of the network; `--layers blocks.5` skips only the head, and shows the
overhead of everything else), while the bare loop always runs the whole model.

Memory: extraction of N and 10 N images, each in a fresh process: peak RSS and tracemalloc's peak
(Python and numpy allocations). Extraction streams batches into the HDF5 file, so neither should
grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RSVC_PROGRESS", "0")
from rsvc_cli import runtime  # noqa: E402

runtime.configure()  # as the rsvc command does, before torch loads

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOAL = 0.9
CHECKPOINTS = {"cifar_resnet20": SHARED / "models/cifar10/resnet20-12fca82f.th",
               "cifar_resnet56": SHARED / "models/cifar10/resnet56-4bfd9763.th"}
LAYERS = {"cifar_resnet20": ["layer1", "layer2", "layer3"], "cifar_resnet56": ["layer1", "layer2", "layer3"],
          "test_vit": ["blocks.0", "blocks.1"], "test_resnet": ["layer1", "layer2"],
          "vit_small_patch16_224": ["blocks.5", "blocks.11"]}
# Images per model for the throughput run: enough for a steady state, patches of the bare loop in memory.
DEFAULT_IMAGES = {"cifar_resnet56": 100, "cifar_resnet20": 200, "test_vit": 50, "test_resnet": 50,
                  "vit_small_patch16_224": 10}
# N of the N vs 10 N memory runs, at --memory-batch-size: many batches even at N.
MEMORY_IMAGES = {"cifar_resnet56": 50, "cifar_resnet20": 50, "test_vit": 100, "test_resnet": 100,
                 "vit_small_patch16_224": 50}


def compose_extract(model: str, n_images: int, batch_size: int, store: Path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rsvc_cli.cli import normalize_overrides
    from rsvc_cli.config import register_configs

    per_class = max(5, n_images // 10)  # 10 classes; 5 per class is the least that splits 1:2:2
    overrides = [f"model={model}", "dataset=cifar10", f"dataset.root={SHARED / 'data/cifar10/test'}",
                 f"dataset.images_per_class={per_class}", f"batch_size={batch_size}", f"store={store}",
                 "device=cpu", f"layers=[{','.join(LAYERS[model])}]"]
    if model in CHECKPOINTS:
        overrides.append(f"model.checkpoint={CHECKPOINTS[model]}")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rsvc_cli.configs", version_base="1.3"):
        return compose(config_name="extract", overrides=normalize_overrides(overrides))


def load(cfg):
    from rsvc_cli.stages.common import load_image_sets, load_model

    return load_model(cfg.model, cfg), load_image_sets(cfg.dataset)


def extraction_seconds(cfg, model, images, store: Path) -> float:
    """One extraction of every configured layer into an empty store."""
    import shutil

    from rsvc_cli.stages.extract import extract_layers

    shutil.rmtree(store, ignore_errors=True)
    start, cpu = time.perf_counter(), time.process_time()
    extract_layers(model, images, cfg.patch, list(cfg.layers), cfg)
    return time.perf_counter() - start, time.process_time() - cpu


def all_patches(cfg, model, images) -> torch.Tensor:
    """The patches extraction feeds the model, in its order: (n_images * n_patches, 3, S, S)."""
    from rsvc_cli.data.patches import PatchDataset
    from rsvc_cli.stages.common import patch_geometry

    size, stride = patch_geometry(cfg.patch, model.input_size)
    dataset = PatchDataset(images.source, images.image_index, model.input_size, model.mean, model.std,
                           patch_size=size, stride=stride)
    return torch.cat([dataset[i][0] for i in range(len(dataset))]), dataset.n_patches


def bare_seconds(module, patches: torch.Tensor, batch_patches: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the bare loop."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for first in range(0, len(patches), batch_patches):
            module(patches[first:first + batch_patches])
    return time.perf_counter() - start, time.process_time() - cpu


def throughput(model_name: str, n_images: int, batch_size: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        cfg = compose_extract(model_name, n_images, batch_size, store)
        model, images = load(cfg)
        module = model.module.eval()
        patches, n_patches = all_patches(cfg, model, images)
        batch_patches = batch_size * n_patches
        bare_seconds(module, patches[:batch_patches], batch_patches)  # warm-up (allocator, kernels)
        bare, extraction = [], []
        for _ in range(repeats):
            bare.append(bare_seconds(module, patches, batch_patches))
            extraction.append(extraction_seconds(cfg, model, images, store))
    n = len(images.image_index) * n_patches
    (bare_wall, bare_cpu), (extract_wall, extract_cpu) = (min(t[0] for t in bare), min(t[1] for t in bare)), \
        (min(t[0] for t in extraction), min(t[1] for t in extraction))
    ratio = bare_wall / extract_wall
    print(f"{model_name:>15}  {len(images.image_index):5d} images x {n_patches} patches, batch {batch_size} images, "
          f"{torch.get_num_threads()} threads, layers {','.join(LAYERS[model_name])}")
    print(f"{'':>15}  bare model(x): {n / bare_wall:8.1f} patches/s ({bare_wall:.2f} s)   "
          f"extract: {n / extract_wall:8.1f} patches/s ({extract_wall:.2f} s)   "
          f"ratio {ratio:.3f} (goal >= {GOAL}) {'ok' if ratio >= GOAL else 'BELOW GOAL'}")
    print(f"{'':>15}  CPU time (all threads): bare {bare_cpu:.2f} s, extract {extract_cpu:.2f} s, ratio "
          f"{bare_cpu / extract_cpu:.3f}; all runs (wall, s): bare {' '.join(f'{t[0]:.2f}' for t in bare)}, "
          f"extract {' '.join(f'{t[0]:.2f}' for t in extraction)}")
    return ratio


def peak_rss_mib(run) -> tuple[float, float]:
    """(RSS before, peak RSS while `run()` runs) in MiB: Linux's VmHWM, reset first (/proc/self/clear_refs)."""
    status = Path("/proc/self/status")

    def field(name: str) -> float:
        line = next(line for line in status.read_text().splitlines() if line.startswith(name + ":"))
        return int(line.split()[1]) / 1024

    try:
        before = field("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    except OSError:  # no /proc: the process's lifetime peak is all there is
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        run()
        return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run()
    return before, field("VmHWM")


def memory_child(model_name: str, n_images: int, batch_size: int) -> None:
    """Runs in a fresh process: one extraction, then its peaks as JSON on stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        cfg = compose_extract(model_name, n_images, batch_size, store)
        model, images = load(cfg)
        timing = {}
        tracemalloc.start()

        def run():
            timing["seconds"] = extraction_seconds(cfg, model, images, store)[0]

        rss_before, rss_peak = peak_rss_mib(run)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        stored = sum(p.stat().st_size for p in store.rglob("*.h5"))
    print(json.dumps({"images": len(images.image_index), "rss_before_mib": rss_before, "rss_peak_mib": rss_peak,
                      "traced_peak_mib": traced_peak / 2**20, "stored_mib": stored / 2**20,
                      "seconds": timing["seconds"]}))


def memory(model_name: str, n_images: int, batch_size: int) -> tuple[dict, dict]:
    runs = []
    for n in (n_images, 10 * n_images):
        out = subprocess.run([sys.executable, __file__, "--memory-child", model_name, str(n), str(batch_size),
                              "--layers", *LAYERS[model_name]],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the memory run of {model_name} with {n} images failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, large = runs
    print(f"{model_name:>15}  memory, {small['images']} vs {large['images']} images, batch {batch_size} images "
          f"(a fresh process each):")
    for r in runs:
        print(f"{'':>15}    {r['images']:5d} images: peak RSS {r['rss_peak_mib']:7.1f} MiB (before extraction "
              f"{r['rss_before_mib']:7.1f}), tracemalloc peak {r['traced_peak_mib']:6.1f} MiB, "
              f"written {r['stored_mib']:6.1f} MiB, {r['seconds']:.1f} s")
    growth = (large["rss_peak_mib"] - large["rss_before_mib"]) - (small["rss_peak_mib"] - small["rss_before_mib"])
    print(f"{'':>15}    growth of the extraction's peak RSS {growth:+.1f} MiB for 10x the images "
          f"(the larger run writes {large['stored_mib'] - small['stored_mib']:.1f} MiB more); "
          f"tracemalloc peak {small['traced_peak_mib']:.1f} -> {large['traced_peak_mib']:.1f} MiB")
    return small, large


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet56", "test_vit"], choices=sorted(LAYERS))
    parser.add_argument("--images", type=int, default=None, help="images for the throughput run (default per model)")
    parser.add_argument("--memory-images", type=int, default=None, help="N of the N vs 10 N memory runs")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (x 16 patches)")
    parser.add_argument("--repeats", type=int, default=4, help="alternating bare/extract runs; the best of each counts")
    parser.add_argument("--memory-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="layers to extract, for every model (default per model); with the network's "
                        "last block among them, extraction cannot stop the patches' pass early")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        model_name, n, batch = args.memory_child
        LAYERS[model_name] = args.layers or LAYERS[model_name]
        memory_child(model_name, int(n), int(batch))
        return 0
    torch.manual_seed(0)
    if args.layers:
        LAYERS.update({model_name: list(args.layers) for model_name in args.models})
    if args.threads:
        torch.set_num_threads(args.threads)
    print("Note: on a shared machine timings are noisy; the ratio is measured in one process, alternating runs.")
    ratios = {}
    for model_name in args.models:
        ratios[model_name] = throughput(model_name, args.images or DEFAULT_IMAGES[model_name], args.batch_size,
                                        args.repeats)
        if not args.skip_memory:
            memory(model_name, args.memory_images or MEMORY_IMAGES[model_name], args.memory_batch_size)
    print("throughput ratios (extract / bare):", ", ".join(f"{m} {r:.3f}" for m, r in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Wall time of a whole `rsvc compare` layer sweep against the bare forward passes it cannot avoid.

    python scripts/bench_pipeline.py            # CIFAR ResNet-20 vs ResNet-56, 10 classes x 500 images
    python scripts/bench_pipeline.py --quick    # 50 images per class

The comparison: the `cifar_r20_vs_r56` preset's checkpoints on the CIFAR-10 test images grouped by
label (the preset's protocol before it took the paper's train/test split and predicted groups), 10
classes, the default 100/200/200 image sets per class, 16 patches per image) swept over all layer
pairs, `layer1=layer1,layer2,layer3 layer2=layer1,layer2,layer3` (a 3 x 3 sweep: 9 comparisons, every
layer of both models extracted in one pass per model), run in this process exactly as
`rsvc compare -m ...` runs it, in a fresh store. Importance (integrated gradients, 30 forward and
backward passes per patch: a separate cost by design) is off unless --importance.

The baseline, in the same process: `model(x)` of both models over the same patches (made
beforehand, untimed) at the same batch size. Printed: both times, their ratio (goal <= 1.3), and
where the sweep's time went, stage by stage.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RSVC_PROGRESS", "0")
from rsvc_cli import runtime  # noqa: E402

runtime.configure()  # as the rsvc command does, before torch loads

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOAL = 1.3
LAYERS = ("layer1", "layer2", "layer3")
CLASSES = 10


def preset_overrides(images_per_class: int, batch_size: int, importance: bool) -> list[str]:
    return ["experiment=cifar_r20_vs_r56",
            f"model1.checkpoint={SHARED / 'models/cifar10/resnet20-12fca82f.th'}",
            f"model2.checkpoint={SHARED / 'models/cifar10/resnet56-4bfd9763.th'}",
            # The protocol this benchmark has always measured (the preset's before it took the paper's):
            # every set from the test images, grouped by label.
            f"dataset.root={SHARED / 'data/cifar10/test'}", "dataset.evaluation_root=null", "dataset.group_by=label",
            "dataset.images_per_set={concept:null,regression:null,evaluation:null}",
            f"dataset.images_per_class={images_per_class}",
            f"batch_size={batch_size}", "device=cpu", f"importance.enabled={str(importance).lower()}"]


def compose_compare(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rsvc_cli.cli import normalize_overrides
    from rsvc_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rsvc_cli.configs", version_base="1.3"):
        cfg = compose(config_name="compare", overrides=normalize_overrides(overrides))
    GlobalHydra.instance().clear()
    return cfg


def bare_forward_seconds(cfg) -> tuple[dict[str, float], float, int]:
    """Wall seconds of `model(x)` per model over every patch of the comparison, their CPU seconds, the patches."""
    from rsvc_cli.data.patches import PatchDataset
    from rsvc_cli.stages.common import load_image_sets, load_model, patch_geometry

    images = load_image_sets(cfg.dataset)
    models = {"model1": load_model(cfg.model1, cfg), "model2": load_model(cfg.model2, cfg)}
    seconds = {name: 0.0 for name in models}
    cpu, n_patches = 0.0, 0
    batch = int(cfg.batch_size)
    geometry = {name: patch_geometry(cfg.patch, m.input_size) for name, m in models.items()}
    with torch.inference_mode():
        for first in range(0, len(images.image_index), batch):
            chosen = images.image_index[first:first + batch]
            for name, model in models.items():
                dataset = PatchDataset(images.source, chosen, model.input_size, model.mean, model.std,
                                       patch_size=geometry[name][0], stride=geometry[name][1], planting=images.planting)
                patches = torch.cat([dataset[i][0] for i in range(len(dataset))])  # untimed
                module = model.module.eval()
                start, start_cpu = time.perf_counter(), time.process_time()
                module(patches)
                seconds[name] += time.perf_counter() - start
                cpu += time.process_time() - start_cpu
            n_patches += len(patches)
    return seconds, cpu, n_patches


class StageTimes:
    """Wall time and calls per wrapped stage function."""

    def __init__(self):
        self.seconds: dict[str, float] = {}  # in the order the stages were wrapped
        self.calls = defaultdict(int)

    def wrap(self, owner, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)
        self.seconds[label] = 0.0

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(owner, attribute, timed)


def instrument() -> StageTimes:
    import rsvc_cli.algorithms.decomposition as decomposition
    import rsvc_cli.stages.collage as collage
    import rsvc_cli.stages.compare as compare
    import rsvc_cli.stages.extract as extract
    import rsvc_cli.stages.importance as importance
    import rsvc_cli.stages.regress as regress
    import rsvc_cli.stages.report as report

    times = StageTimes()
    times.wrap(regress, "load_model", "load models")
    times.wrap(regress, "load_image_sets", "select images")
    times.wrap(extract, "_extract", "extract (forward passes, patches, writes)")
    times.wrap(regress, "decompose", "decompose")
    times.wrap(decomposition.NMF, "fit", "  of which NMF fits")
    times.wrap(compare, "regress", "regress")
    times.wrap(compare, "score", "score")
    times.wrap(importance, "importance", "importance")
    times.wrap(collage, "collage", "collage")
    times.wrap(report, "report", "report")
    times.wrap(compare, "write_results_table", "results table")
    return times


def run_sweep(overrides: list[str], store: Path, launcher: str | None) -> tuple[float, float]:
    from rsvc_cli.cli import main as rsvc_main

    argv = ["compare", "-m", *overrides, f"layer1={','.join(LAYERS)}", f"layer2={','.join(LAYERS)}", f"store={store}"]
    if launcher:
        argv.append(f"hydra/launcher={launcher}")
    start, start_cpu = time.perf_counter(), time.process_time()
    code = rsvc_main(argv)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if code:
        raise SystemExit(f"rsvc compare failed with exit code {code}")
    return seconds, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 images per class instead of 500")
    parser.add_argument("--images-per-class", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward batch (x 16 patches)")
    parser.add_argument("--importance", action="store_true", help="also run the importance stage")
    parser.add_argument("--launcher", default=None, help="a hydra/launcher option, e.g. local (joblib); "
                        "stage times are then not measured (jobs run in other processes)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--store", default=None, help="store directory (default: a fresh temporary one)")
    args = parser.parse_args()
    per_class = args.images_per_class or (50 if args.quick else 500)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = preset_overrides(per_class, args.batch_size, args.importance)
    cfg = compose_compare(overrides)
    print(f"CIFAR ResNet-20 vs ResNet-56, {CLASSES} classes x {per_class} images (split {list(cfg.dataset.split)}), "
          f"3 x 3 layer sweep ({', '.join(LAYERS)}), batch {args.batch_size} images, {torch.get_num_threads()} "
          f"torch threads, importance {'on' if args.importance else 'off'}.")
    print("Note: on a shared machine timings are noisy (others' load only ever slows a run down).")

    bare, bare_cpu, n_patches = bare_forward_seconds(cfg)
    bare_total = sum(bare.values())
    print(f"bare forward passes: {n_patches} patches per model; ResNet-20 {bare['model1']:.1f} s, "
          f"ResNet-56 {bare['model2']:.1f} s, total {bare_total:.1f} s")

    times = None if args.launcher else instrument()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store) if args.store else Path(tmp) / "store"
        if args.store:
            shutil.rmtree(store, ignore_errors=True)
        sweep, sweep_cpu = run_sweep(overrides, store, args.launcher)
    ratio = sweep / bare_total
    print()
    if times is not None:
        print("where the sweep's time went (wall seconds, calls):")
        for label, seconds in times.seconds.items():
            if not times.calls[label]:
                continue
            print(f"  {label:<45} {seconds:8.1f} s  {times.calls[label]:4d}  {100 * seconds / sweep:5.1f} %")
        print(f"  {'everything else (Hydra, reuse checks, ...)':<45} "
              f"{sweep - sum(s for k, s in times.seconds.items() if not k.startswith(' ')):8.1f} s")
    print(f"sweep wall time {sweep:.1f} s, bare forward passes {bare_total:.1f} s: ratio {ratio:.2f} "
          f"(goal <= {GOAL}) {'ok' if ratio <= GOAL else 'ABOVE GOAL'}")
    if not args.launcher:  # jobs in other processes are not in this process's CPU time
        print(f"CPU time of this process (others' load on a shared machine does not count): sweep {sweep_cpu:.1f} s, "
              f"bare {bare_cpu:.1f} s, ratio {sweep_cpu / bare_cpu:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

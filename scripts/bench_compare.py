"""End-to-end `rsvc compare` on the CIFAR workload with precision=float32 and precision=auto, stage by stage.

    python scripts/bench_compare.py                       # 10 classes x 500 images, as the preset
    python scripts/bench_compare.py --classes 2 --images-per-class 50

The workload: the `cifar_r20_vs_r56` preset (the shared ResNet-20 and ResNet-56 checkpoints, layer3,
CIFAR-10 test images, 100 concept / 200 regression / 200 evaluation images per class, 16 patches per
image), grouped by label, importance off, no report:
`rsvc compare experiment=cifar_r20_vs_r56 dataset.group_by=label importance.enabled=false report=false`,
each precision in its own fresh store and its own process (imports, compiled-kernel cache loads and
all), one after the other. Printed: each stage's wall time (from the run's `<scores>.times.json`) in
both precisions, their ratio, and the whole command's wall time. On a device without native bf16,
`auto` is float32, so only float32 is measured (and the script says so). First, the floor it moves: one
ResNet-56 forward pass over 512 patches of 32 px in float32, with channels-last weights, and as rsvc
runs bf16 (autocast, channels-last weights), medians and ranges of --forward-repeats passes.

Run it once before measuring in a fresh checkout: the first use of the compiled kernels compiles them
(about a minute) and that lands in the first run's decompose and regress times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from rsvc_cli import runtime  # noqa: E402

runtime.configure()  # as the rsvc command does, before torch loads

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def overrides(classes: int, images_per_class: int, batch_size: int, device: str) -> list[str]:
    return ["experiment=cifar_r20_vs_r56", "dataset.group_by=label", "importance.enabled=false", "report=false",
            f"model1.checkpoint={SHARED / 'models/cifar10/resnet20-12fca82f.th'}",
            f"model2.checkpoint={SHARED / 'models/cifar10/resnet56-4bfd9763.th'}",
            f"dataset.root={SHARED / 'data/cifar10/test'}", f"dataset.first_classes={classes}",
            f"dataset.images_per_class={images_per_class}", f"batch_size={batch_size}", f"device={device}"]


def run_compare(args: list[str], store: Path) -> tuple[float, dict]:
    """Wall seconds of the whole command and its stage-times record."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", RSVC_PROGRESS="0")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rsvc_cli", "compare", *args, f"store={store}"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"rsvc compare failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    (record,) = (store / "scores").glob("*.times.json")
    return seconds, json.loads(record.read_text())


def forward_pass_times(device, repeats: int) -> dict[str, list[float]]:
    """Seconds of ResNet-56 passes over 512 patches: float32, float32 channels-last, rsvc's bf16."""
    import torch

    from rsvc_cli.models.precision import forward_precision
    from rsvc_cli.models.registry import make_model

    module = make_model("cifar_resnet56", checkpoint=str(SHARED / "models/cifar10/resnet56-4bfd9763.th")).module
    module = module.eval().to(device)
    patches = torch.randn(512, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)

    def one_pass(precision: str, channels_last: bool) -> float:
        if channels_last:
            module.to(memory_format=torch.channels_last)
        with forward_precision(module, precision, device), torch.inference_mode():
            start = time.perf_counter()
            module(patches.contiguous(memory_format=torch.channels_last) if channels_last else patches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        module.to(memory_format=torch.contiguous_format)
        return seconds

    cases = {"float32": ("float32", False), "float32 channels-last": ("float32", True), "bf16 (rsvc)": ("bfloat16", False)}
    for precision, channels_last in cases.values():
        one_pass(precision, channels_last)  # warm-up: oneDNN builds its kernels on first use
    times = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so a burst of others' load hits every case alike
        for name, (precision, channels_last) in cases.items():
            times[name].append(one_pass(precision, channels_last))
    return times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10, help="the first N CIFAR-10 classes (default 10)")
    parser.add_argument("--images-per-class", type=int, default=500, help="split 1:2:2 (default 500: 100/200/200)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward batch (x 16 patches)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--forward-repeats", type=int, default=5, help="forward-pass timings first (0: skip)")
    args = parser.parse_args()

    import torch

    from rsvc_cli.models.precision import native_bf16

    device = torch.device(args.device)
    native = native_bf16(device)
    print(f"CIFAR ResNet-20 vs ResNet-56, layer3, {args.classes} classes x {args.images_per_class} images, "
          f"16 patches each; device {device} ({cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
          f"{torch.get_num_threads()} torch threads.")
    print(f"native bf16: {native or 'none'}; oneDNN bf16 kernels available: "
          f"{torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print("Timings on a shared machine are noisy: others' load only ever slows a run down.")
    if args.forward_repeats:
        times = forward_pass_times(device, args.forward_repeats)
        base = statistics.median(times["float32"])
        print(f"\nResNet-56, 512 patches of 32 px, {args.forward_repeats} passes each (median, range):")
        for name, seconds in times.items():
            print(f"  {name:<22} {1000 * statistics.median(seconds):7.0f} ms  [{1000 * min(seconds):.0f}-"
                  f"{1000 * max(seconds):.0f}]  {base / statistics.median(seconds):.2f}x")
        print()
    precisions = ["float32", "auto"] if native else ["float32"]
    if not native:
        print("This device computes bf16 only by emulation, so precision=auto is float32 here: measuring float32 only.")
    runs = {}
    for precision in precisions:
        with tempfile.TemporaryDirectory() as tmp:
            runs[precision] = run_compare([*overrides(args.classes, args.images_per_class, args.batch_size,
                                                      args.device), f"precision={precision}"], Path(tmp) / "store")
        print(f"precision={precision}: {runs[precision][0]:.1f} s ({', '.join(sorted(set(runs[precision][1]['forward_precision'].values())))})")

    stages = list(dict.fromkeys(name for _, record in runs.values() for name in record["seconds"]))
    header = f"{'stage':<22}" + "".join(f"{p:>12}" for p in precisions) + ("   ratio" if len(runs) > 1 else "")
    print("\n" + header)
    rows = [(name, [runs[p][1]["seconds"].get(name, 0.0) for p in precisions]) for name in stages]
    rows += [("stages", [runs[p][1]["total_seconds"] for p in precisions]),
             ("command", [runs[p][0] for p in precisions])]
    for name, values in rows:
        ratio = f"   {values[0] / values[1]:.2f}x" if len(values) > 1 and values[1] > 0 else ""
        print(f"{name:<22}" + "".join(f"{v:>10.1f} s" for v in values) + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

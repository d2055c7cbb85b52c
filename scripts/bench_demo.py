"""Benchmark: the README's `make demo` (rsvc compare experiment=planted_synthetic) from an empty store.

    python scripts/bench_demo.py [--keep] [--threads N] [extra overrides ...]

Runs the installed `rsvc` in a fresh temporary store (so both models are trained, nothing reused),
then once more on the same store (everything reused), and prints the wall-clock seconds of each,
the CPU seconds of the first, and the first run's share of the 5-minute budget the issue sets for
2 CPU cores. Run it on an otherwise idle machine: on a shared one the wall time measures the
neighbours too (the CPU seconds do not).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

BUDGET_SECONDS = 300.0


def run_demo(store: str, overrides: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, its output) for one `rsvc compare` run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(["rsvc", "compare", "experiment=planted_synthetic", f"store={store}", *overrides],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"rsvc compare failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the store (its path is printed)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the demo")
    args = parser.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", RSVC_PROGRESS="0")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    store = tempfile.mkdtemp(prefix="rsvc-demo-")
    try:
        cold_wall, cold_cpu, output = run_demo(store, args.overrides, env)
        warm_wall, _, _ = run_demo(store, args.overrides, env)
    finally:
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    verdict = [line for line in output.splitlines() if "planted-concept experiment" in line]
    print(f"demo from an empty store: {cold_wall:.1f} s wall, {cold_cpu:.1f} s CPU "
          f"({cold_wall / BUDGET_SECONDS:.2f} of the {BUDGET_SECONDS:.0f} s budget)")
    print(f"demo again on the same store (all reused): {warm_wall:.1f} s wall "
          f"(cold/warm {cold_wall / max(warm_wall, 1e-9):.1f}x)")
    if verdict:
        print(verdict[-1].strip())
    if args.keep:
        print(f"store: {store}")


if __name__ == "__main__":
    main()

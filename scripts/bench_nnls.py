"""Benchmark: batched NNLS (rsvc) against a loop of scipy.optimize.nnls on the same rows.

    python scripts/bench_nnls.py [--quick] [--rows N] [--concepts K] [--features D] [--device cpu|cuda]

Inputs look like what rsvc feeds the solver: ReLU-like activations (float32) generated from a sparse
non-negative concept basis and sparse non-negative coefficients plus noise, so the exact solutions
have many zeros (the hard case for an active-set solver). Prints both timings, their ratio, and how
far rsvc's coefficients are from scipy's.
"""

from __future__ import annotations

import argparse
import time

from rsvc_cli import runtime

runtime.configure()  # as the rsvc command does, before torch loads (both sides run in this process)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import nnls as scipy_nnls  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from rsvc_cli.algorithms.nnls import nnls  # noqa: E402


def make_problem(n_rows: int, n_concepts: int, n_features: int, seed: int = 0):
    generator = np.random.default_rng(seed)
    basis = generator.exponential(1.0, (n_concepts, n_features)) * (generator.random((n_concepts, n_features)) < 0.3)
    true_coefficients = generator.exponential(1.0, (n_rows, n_concepts))
    true_coefficients *= generator.random((n_rows, n_concepts)) < 0.4
    # Noise and a negative bias before the ReLU: about half of the activations and a third of the
    # exact coefficients are zero, and nearly every row has some zero coefficient.
    activations = true_coefficients @ basis + 0.5 * generator.standard_normal((n_rows, n_features)) - 0.3
    return np.maximum(activations, 0).astype(np.float32), basis.astype(np.float32)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 rows instead of 100,000")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both sides (torch and the BLAS under numpy); default: as installed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    n_rows = args.rows or (10_000 if args.quick else 100_000)

    activations, basis = make_problem(n_rows, args.concepts, args.features)
    print(f"NNLS: {n_rows} rows, k={args.concepts}, d={args.features}, device={args.device}, "
          f"torch threads={torch.get_num_threads()}")

    activations_t = torch.from_numpy(activations).to(args.device)
    basis_t = torch.from_numpy(basis).to(args.device)
    nnls(activations_t[:256], basis_t)  # warm-up: lazy linear-algebra initialisation
    _sync(args.device)
    start = time.perf_counter()
    ours = nnls(activations_t, basis_t)
    _sync(args.device)
    rsvc_seconds = time.perf_counter() - start
    ours = ours.double().cpu().numpy()

    basis_t64 = np.ascontiguousarray(basis.T, dtype=np.float64)
    start = time.perf_counter()
    reference = np.stack([scipy_nnls(basis_t64, row.astype(np.float64))[0] for row in activations])
    scipy_seconds = time.perf_counter() - start

    basis64 = basis.astype(np.float64)
    activations64 = activations.astype(np.float64)
    ours_residual = np.linalg.norm(activations64 - ours @ basis64, axis=1)
    reference_residual = np.linalg.norm(activations64 - reference @ basis64, axis=1)
    coefficient_error = np.abs(ours - reference).max() / np.abs(reference).max()
    residual_excess = np.max((ours_residual - reference_residual) / np.maximum(reference_residual, 1e-300))
    print(f"zeros in the exact solutions: {np.mean(reference == 0):.1%}")
    print(f"scipy loop: {scipy_seconds:.3f} s   rsvc: {rsvc_seconds:.3f} s")
    print(f"max relative coefficient error (|ours - scipy| / max|scipy|): {coefficient_error:.2e}")
    print(f"max relative residual excess over scipy: {residual_excess:.2e}")
    print(f"ratio (scipy / rsvc): {scipy_seconds / rsvc_seconds:.1f}x")


if __name__ == "__main__":
    main()

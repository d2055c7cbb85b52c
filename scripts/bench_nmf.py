"""Benchmark: batched NMF (rsvc) against a loop of scikit-learn NMF, one fit per class.

    python scripts/bench_nmf.py [--quick] [--classes C] [--samples N] [--features D] [--concepts K]

Inputs look like patch activations of a ReLU network: per class, a sparse non-negative mixture of
class-specific sparse non-negative parts plus noise, passed through a ReLU (float32, ~45% zeros).
Both sides get the same float32 arrays, NNDSVD init, max_iter and tol; scikit-learn uses its
coordinate-descent solver (the algorithm rsvc's NMF implements). Prints both timings, the ratio,
and both reconstruction errors (rsvc must not be worse).
"""

from __future__ import annotations

import argparse
import time
import warnings

from rsvc_cli import runtime

runtime.configure()  # as the rsvc command does, before torch loads (both sides run in this process)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.decomposition import NMF as SklearnNMF  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from rsvc_cli.algorithms.decomposition import NMF  # noqa: E402


def make_activations(n_classes, n_samples, n_features, n_parts=20, seed=0):
    generator = np.random.default_rng(seed)
    parts = generator.exponential(1.0, (n_classes, n_parts, n_features))
    parts *= generator.random((n_classes, n_parts, n_features)) < 0.25
    mixing = generator.exponential(1.0, (n_classes, n_samples, n_parts))
    mixing *= generator.random((n_classes, n_samples, n_parts)) < 0.3
    pre_activation = mixing @ parts
    # Noise, and a bias that puts about half of the pre-activations below zero, as after a ReLU.
    pre_activation += 0.5 * generator.standard_normal(pre_activation.shape) - 0.4 * pre_activation.mean()
    return np.maximum(pre_activation, 0).astype(np.float32)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 classes instead of 100")
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--samples", type=int, default=1600)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both sides (torch and the BLAS under numpy); default: as installed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    n_classes = args.classes or (10 if args.quick else 100)

    activations = make_activations(n_classes, args.samples, args.features)
    print(f"NMF: {n_classes} classes x {args.samples} x {args.features}, k={args.concepts}, "
          f"max_iter={args.max_iter}, tol={args.tol}, float32, zeros {np.mean(activations == 0):.0%}, "
          f"device={args.device}, torch threads={torch.get_num_threads()}")

    batch = torch.from_numpy(activations).to(args.device)
    NMF(args.concepts, max_iter=2).fit(batch[:1])  # warm-up: lazy linear-algebra initialisation
    _sync(args.device)
    start = time.perf_counter()
    ours = NMF(args.concepts, init="nndsvd", max_iter=args.max_iter, tol=args.tol, seed=0).fit(batch)
    _sync(args.device)
    rsvc_seconds = time.perf_counter() - start
    ours_error = ours.reconstruction_error_.cpu().numpy()

    reference_error = np.empty(n_classes)
    reference_iterations = np.empty(n_classes)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for index, class_activations in enumerate(activations):
            model = SklearnNMF(args.concepts, init="nndsvd", solver="cd", max_iter=args.max_iter,
                               tol=args.tol, random_state=0)
            model.fit(class_activations)
            reference_error[index] = model.reconstruction_err_
            reference_iterations[index] = model.n_iter_
    sklearn_seconds = time.perf_counter() - start

    relative = (ours_error - reference_error) / reference_error
    print(f"iterations: rsvc mean {ours.n_iter_.double().mean():.1f}, sklearn mean {reference_iterations.mean():.1f}")
    print(f"reconstruction error: rsvc mean {ours_error.mean():.4f}, sklearn mean {reference_error.mean():.4f}; "
          f"per class (rsvc - sklearn) / sklearn: mean {relative.mean():+.2e}, max {relative.max():+.2e}")
    print(f"sklearn loop: {sklearn_seconds:.2f} s   rsvc: {rsvc_seconds:.2f} s")
    print(f"ratio (sklearn / rsvc): {sklearn_seconds / rsvc_seconds:.1f}x")


if __name__ == "__main__":
    main()

"""Benchmark: batched NMF (rsvc) against a loop of scikit-learn NMF, one fit per class.

    python scripts/bench_nmf.py [--quick] [--classes C] [--samples N] [--features D] [--concepts K]

Inputs look like patch activations of a ReLU network: per class, a sparse non-negative mixture of
class-specific sparse non-negative parts plus noise, passed through a ReLU (float32, ~45% zeros).
Both sides get the same float32 arrays, NNDSVD init, max_iter and tol; scikit-learn uses its
coordinate-descent solver (the algorithm rsvc's NMF implements). Both rsvc solvers run: "cd" (the
default, scikit-learn's iterates) and "hals_accelerated" (faster, other optima). Per solver: the
time and its ratio to scikit-learn's in this run, iterations, the error against scikit-learn's, and
how many classes reached another optimum (smallest cosine between Hungarian-matched concepts below
0.99).
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

from rsvc_cli.algorithms.decomposition import NMF, NMF_SOLVERS  # noqa: E402
from rsvc_cli.algorithms.stability import matched_cosines  # noqa: E402

# A class whose matched concepts fall below this cosine has reached another optimum.
SAME_OPTIMUM_COSINE = 0.99


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


def min_matched_cosine(basis, reference):
    """The smallest cosine between concepts paired one-to-one (Hungarian) for the largest summed cosine."""
    return float(matched_cosines(basis, reference).min())


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
    parser.add_argument("--max-iter", type=int, default=5000, help="as configs/decomposition/nmf.yaml")
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
    ours = {}
    for solver in NMF_SOLVERS:
        NMF(args.concepts, solver=solver, max_iter=2).fit(batch[:1])  # warm-up: lazy initialisation
        _sync(args.device)
        start = time.perf_counter()
        ours[solver] = NMF(args.concepts, init="nndsvd", solver=solver, max_iter=args.max_iter, tol=args.tol,
                           seed=0).fit(batch)
        _sync(args.device)
        ours[solver].seconds = time.perf_counter() - start

    reference_error = np.empty(n_classes)
    reference_iterations = np.empty(n_classes)
    reference_basis = np.empty((n_classes, args.concepts, args.features), dtype=np.float32)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for index, class_activations in enumerate(activations):
            model = SklearnNMF(args.concepts, init="nndsvd", solver="cd", max_iter=args.max_iter,
                               tol=args.tol, random_state=0)
            model.fit(class_activations)
            reference_error[index] = model.reconstruction_err_
            reference_iterations[index] = model.n_iter_
            reference_basis[index] = model.components_
    sklearn_seconds = time.perf_counter() - start

    print(f"sklearn loop: {sklearn_seconds:.2f} s, iterations mean {reference_iterations.mean():.1f}, "
          f"error mean {reference_error.mean():.4f}")
    for solver, fitted in ours.items():
        error = fitted.reconstruction_error_.cpu().numpy()
        relative = (error - reference_error) / reference_error
        basis = fitted.concept_basis_.cpu().numpy()
        cosines = np.array([min_matched_cosine(basis[i], reference_basis[i]) for i in range(n_classes)])
        print(f"rsvc {solver}: {fitted.seconds:.2f} s, ratio (sklearn / rsvc) {sklearn_seconds / fitted.seconds:.1f}x; "
              f"iterations mean {fitted.n_iter_.double().mean():.1f}, unconverged {int((~fitted.converged_).sum())}; "
              f"error per class (rsvc - sklearn) / sklearn: mean {relative.mean():+.2e}, max {relative.max():+.2e}; "
              f"other optimum (matched cosine < {SAME_OPTIMUM_COSINE}) in {int((cosines < SAME_OPTIMUM_COSINE).sum())}"
              f"/{n_classes} classes, min cosine {cosines.min():.3f}")


if __name__ == "__main__":
    main()

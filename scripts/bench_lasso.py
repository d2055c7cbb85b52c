"""Benchmark: RSVC's cross-validated lasso (rsvc, one batched solve) against a loop of scikit-learn.

    python scripts/bench_lasso.py [--quick] [--classes C] [--samples N] [--features P] [--targets T]

Per class: N patches (16 per source image) with P ReLU-like predictor activations and T non-negative
concept coefficients to predict, 5 folds grouped by image, alpha 0.1, inputs and targets standardized
on the training folds. scikit-learn: StandardScaler + Lasso(alpha) (its defaults, one multi-target
fit per class and fold). rsvc: cross_validate(..., Lasso(alpha)) on all classes at once. Prints both
timings, the ratio and the mean relative difference of the lasso objective over every (class, fold,
target) problem (negative: rsvc's optimum is lower).
"""

from __future__ import annotations

import argparse
import time
import warnings

from rsvc_cli import runtime

runtime.configure()  # as the rsvc command does, before torch loads (both sides run in this process)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import Lasso as SklearnLasso  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from rsvc_cli.algorithms.regression import Lasso, cross_validate, grouped_kfold  # noqa: E402

PATCHES_PER_IMAGE = 16


def make_problem(n_classes, n_samples, n_features, n_targets, n_latent=40, seed=0):
    generator = np.random.default_rng(seed)
    latent = generator.exponential(1.0, (n_classes, n_samples, n_latent))
    latent *= generator.random((n_classes, n_samples, n_latent)) < 0.3
    # Patches of one image share part of their latent content, as real patches do.
    image_effect = generator.exponential(0.5, (n_classes, n_samples // PATCHES_PER_IMAGE, n_latent))
    latent += np.repeat(image_effect, PATCHES_PER_IMAGE, axis=1)
    mixing = generator.standard_normal((n_classes, n_latent, n_features))
    predictors = np.maximum(latent @ mixing + generator.standard_normal((n_classes, n_samples, n_features)), 0)
    readout = np.abs(generator.standard_normal((n_classes, n_latent, n_targets))) * (
        generator.random((n_classes, n_latent, n_targets)) < 0.2
    )
    targets = np.maximum(latent @ readout + 0.5 * generator.standard_normal((n_classes, n_samples, n_targets)), 0)
    groups = np.repeat(np.arange(n_samples // PATCHES_PER_IMAGE), PATCHES_PER_IMAGE)
    return predictors.astype(np.float32), targets.astype(np.float32), groups


def lasso_objective(X, y, coef, intercept, alpha):
    return 0.5 * np.mean((y - X @ coef - intercept) ** 2) + alpha * np.abs(coef).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 classes instead of 100")
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--samples", type=int, default=3200)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both sides (torch and the BLAS under numpy); default: as installed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    n_classes = args.classes or (5 if args.quick else 100)

    predictors, targets, groups = make_problem(n_classes, args.samples, args.features, args.targets)
    fold_of_row = grouped_kfold(torch.from_numpy(groups), args.folds, seed=0)
    print(f"Lasso: {n_classes} classes x {args.folds} folds x {args.targets} targets on {args.samples} x "
          f"{args.features} (train folds of {int((fold_of_row != 0).sum())}), alpha {args.alpha}, "
          f"standardized, device={args.device}, torch threads={torch.get_num_threads()}")

    X = torch.from_numpy(predictors).to(args.device)
    Y = torch.from_numpy(targets).to(args.device)
    cross_validate(X[:1, :200], Y[:1, :200], fold_of_row[:200].to(args.device) % 2, Lasso(args.alpha))  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    ours = cross_validate(X, Y, fold_of_row.to(args.device), Lasso(args.alpha), standardize=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    rsvc_seconds = time.perf_counter() - start
    ours_coef = ours.coef_.cpu().numpy()  # (C, F, T, P), standardized units
    ours_intercept = ours.intercept_.cpu().numpy()

    folds = fold_of_row.numpy()
    sklearn_seconds = 0.0
    relative = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for class_index in range(n_classes):
            for fold in range(args.folds):
                train = folds != fold
                start = time.perf_counter()
                x_scaler = StandardScaler().fit(predictors[class_index, train])
                y_scaler = StandardScaler().fit(targets[class_index, train])
                x_train = x_scaler.transform(predictors[class_index, train])
                y_train = y_scaler.transform(targets[class_index, train])
                model = SklearnLasso(alpha=args.alpha).fit(x_train, y_train)
                sklearn_seconds += time.perf_counter() - start
                x64, y64 = x_train.astype(np.float64), y_train.astype(np.float64)
                for target in range(args.targets):
                    reference = lasso_objective(
                        x64, y64[:, target], model.coef_[target], model.intercept_[target], args.alpha
                    )
                    mine = lasso_objective(x64, y64[:, target], ours_coef[class_index, fold, target],
                                           ours_intercept[class_index, fold, target], args.alpha)
                    relative.append((mine - reference) / reference)
    relative = np.array(relative)
    print(f"lasso objective, (rsvc - sklearn) / sklearn over {len(relative)} problems: mean {relative.mean():+.2e}, "
          f"max {relative.max():+.2e}, min {relative.min():+.2e}")
    print(f"sklearn loop: {sklearn_seconds:.2f} s   rsvc: {rsvc_seconds:.2f} s")
    print(f"ratio (sklearn / rsvc): {sklearn_seconds / rsvc_seconds:.1f}x")


if __name__ == "__main__":
    main()

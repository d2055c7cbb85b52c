"""rsvc decompose: concepts of one model's layer, per class (method step 3).

For every class, the concept set's activations A (patches x features) are factorized
A ~ U W: W (n_concepts x features) is the class's `concept_basis`, U >= 0 its coefficients.
Classes with the same number of patches are fitted together in one batched solve.
Coefficients of any other patches are computed later against the stored basis (NNLS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import open_artifact, read_strings, write_array
from rsvc_cli.store.keys import stage_content
from rsvc_cli.stages.common import (
    ImageSets,
    ModelHandle,
    activations_content,
    check_finite,
    class_outputs,
    load_image_sets,
    load_model,
    patch_geometry,
    predicted_class_positions,
    produce,
    resolve_device,
    store_dir,
    to_plain,
)

CONCEPT_SET, REGRESSION_SET, EVALUATION_SET = 0, 1, 2
ALL_CLASSES = "__all__"


def run(cfg) -> Path:
    model = load_model(cfg.model, cfg)
    images = load_image_sets(cfg.dataset)
    return decompose(model, images, cfg, layer=str(cfg.layer))


@dataclass
class Activations:
    """One activations artifact in memory."""

    values: np.ndarray  # (n_patches, n_features) float32
    image_row: np.ndarray  # (n_patches,) row in the image table (the source image of the patch)
    image_set: np.ndarray
    label: np.ndarray
    patch_box: np.ndarray
    image_index: np.ndarray
    class_names: list[str]
    square_box: np.ndarray  # per image
    image_path: list[str]


def read_activations(path: Path, content: dict) -> Activations:
    with open_artifact(path, "activations", content) as f:
        return Activations(values=f["activations"][()].astype(np.float32), image_row=f["image_row"][()],
                           image_set=f["image_set"][()], label=f["label"][()],
                           patch_box=f["patch_box"][()],
                           image_index=f["image_index"][()], class_names=read_strings(f["class_names"]),
                           square_box=f["images/square_box"][()], image_path=read_strings(f["images/path"]))


def activations_for(model: ModelHandle, images: ImageSets, cfg, layer: str, extra_layers=()) -> tuple[Path, dict]:
    """The activations artifact of (model, layer), extracted now (with `extra_layers`, same pass) if missing."""
    from rsvc_cli.stages.extract import extract_layers

    paths = extract_layers(model, images, cfg.patch, [layer, *extra_layers], cfg)
    geometry = patch_geometry(cfg.patch, model.input_size)
    return paths[layer], activations_content(model, images, geometry, layer, cfg)


def decomposition_params(cfg) -> dict:
    d = to_plain(cfg.decomposition)
    return {k: d[k] for k in ("method", "n_concepts", "init", "solver", "max_iter", "tol", "seed", "signed", "per_class")}


def check_grouping(model: ModelHandle, images: ImageSets, cfg) -> None:
    """Stops a run before any extraction where dataset.group_by=predicted cannot read the model's
    outputs as the compared classes (`common.class_outputs` says why and what to set)."""
    if str(cfg.dataset.group_by) == "predicted":
        class_outputs(model, images)


def concepts_content(model: ModelHandle, images: ImageSets, cfg, act_content: dict) -> dict:
    """The content config of a model's concepts. With dataset.group_by=predicted it holds the output
    read as each class (`common.class_outputs`): that reading decides which patches a class gets."""
    group_by = str(cfg.dataset.group_by)
    fields = {}
    if group_by == "predicted":
        # The floor below which a class's predicted group is skipped decides which classes are fitted.
        fields = {"class_outputs": class_outputs(model, images).tolist(),
                  "min_images_per_set": int(cfg.dataset.min_images_per_set)}
    return stage_content("concepts", activations=act_content, decomposition=decomposition_params(cfg),
                         group_by=group_by, **fields)


def class_of_patch(acts: Activations, group_by: str, predicted_of_image: np.ndarray | None = None) -> np.ndarray:
    """The class each patch is grouped under for fitting concepts: its label, or the model's prediction
    on its whole image (``predicted_of_image``, per image row: `common.predicted_class_positions`)."""
    if group_by == "label":
        return acts.label
    if group_by == "predicted":
        return predicted_of_image[acts.image_row]
    raise RsvcError(f"dataset.group_by={group_by} is not an option.", "Use dataset.group_by=label or dataset.group_by=predicted.")


def decompose(model: ModelHandle, images: ImageSets, cfg, layer: str, activations=None) -> Path:
    check_grouping(model, images, cfg)
    act_path, act_content = activations if activations is not None else activations_for(model, images, cfg, layer)
    params = decomposition_params(cfg)
    group_by = str(cfg.dataset.group_by)
    content = concepts_content(model, images, cfg, act_content)
    device = resolve_device(cfg.device)

    def write(f):
        acts = read_activations(act_path, act_content)
        check_finite(acts.values, f"The activations of {model.label} at {layer}")
        check_varies(acts.values[acts.image_set == CONCEPT_SET], f"The activations of {model.label} at {layer}")
        predicted = predicted_class_positions(model, images, cfg) if group_by == "predicted" else None
        skipped = {}
        if group_by == "predicted" and params["per_class"]:
            skipped = rare_predicted_classes(acts, predicted, int(params["n_concepts"]),
                                             int(cfg.dataset.min_images_per_set), model.label)
        fitted = fit_concepts(acts, params, group_by, device, predicted, desc=f"decompose {model.label} {layer}",
                              skip=set(skipped))
        f.attrs["per_class"] = bool(params["per_class"])
        f.attrs["signed"] = params["signed"]
        write_array(f, "class_names", np.array(acts.class_names, dtype=str), "class")
        write_skipped(f, skipped)
        for name, result in fitted.items():
            g = f.create_group(f"classes/{name}")
            write_array(g, "concept_basis", result["concept_basis"], "concept,feature")
            write_array(g, "coefficients", result["coefficients"], "patch,concept")
            write_array(g, "rows", result["rows"], "patch (rows of the activations artifact)")
            g.attrs["reconstruction_error"] = float(result["reconstruction_error"])
            g.attrs["relative_reconstruction_error"] = float(result["relative_reconstruction_error"])
            g.attrs["n_iter"] = int(result["n_iter"])
            g.attrs["converged"] = bool(result["converged"])
            if result["mean"] is not None:
                write_array(g, "mean", result["mean"], "feature")
        report_unconverged(fitted, params)

    prefix = f"{model.label}-{layer}-{params['method']}{params['n_concepts']}"
    path = produce(store_dir(cfg), "concepts", prefix, content, write, seeds={"decomposition.seed": params["seed"]})
    with open_artifact(path, "concepts", content) as f:
        say_skipped(read_skipped(f))  # made now or reused: the run says which classes it leaves out
    return path


def report_unconverged(fitted: dict[str, dict], params: dict) -> None:
    """One console line per class whose fit stopped at decomposition.max_iter before its stopping
    rule was met: its concepts are not the solver's fixed point (the artifact records it too)."""
    from rsvc_cli import console

    for name, result in fitted.items():
        if not result["converged"]:
            console.say(f"{params['method']} of class '{name}' did not converge in decomposition.max_iter="
                        f"{params['max_iter']} iterations (tol={params['tol']}, relative error "
                        f"{result['relative_reconstruction_error']:.4g}); raise decomposition.max_iter to reach "
                        "its fixed point.")


def group_floor(acts: Activations, class_index: int, image_set: int, min_images: int) -> int:
    """The fewest images a predicted group of a class may have (`selection.set_floor`):
    dataset.min_images_per_set, or half of the images the class was drawn in that set (its label count
    there) if fewer."""
    from rsvc_cli.data.selection import set_floor

    asked = len(np.unique(acts.image_row[(acts.image_set == image_set) & (acts.label == class_index)]))
    return int(set_floor(asked, min_images))


def rare_predicted_classes(acts: Activations, predicted_of_image: np.ndarray, n_concepts: int, min_images: int,
                           model_label: str) -> dict[str, str]:
    """Under group_by=predicted: the classes a model predicts too rarely on the concept images to fit
    concepts on (fewer images than the floor, or fewer patches than concepts), each with why."""
    concept_rows = acts.image_set == CONCEPT_SET
    classes = predicted_of_image[acts.image_row]
    skipped = {}
    for c, name in enumerate(acts.class_names):
        rows = np.flatnonzero(concept_rows & (classes == c))
        n_images, floor = len(np.unique(acts.image_row[rows])), group_floor(acts, c, CONCEPT_SET, min_images)
        if n_images < floor or len(rows) < n_concepts:
            skipped[name] = (f"{model_label} predicts it for {n_images} concept-set images ({len(rows)} patches); "
                             f"its concepts need at least {floor} images and {n_concepts} patches")
    if len(skipped) == len(acts.class_names):
        say_skipped(skipped)
        raise RsvcError(f"dataset.group_by=predicted leaves no class to fit {model_label}'s concepts on: it predicts "
                        "each compared class too rarely on the concept images (see the lines above).",
                        "Raise dataset.images_per_class (or dataset.images_per_set.concept), lower "
                        "dataset.min_images_per_set or decomposition.n_concepts, check that model.output_classes "
                        "names the model's outputs, or use dataset.group_by=label.")
    return skipped


def say_skipped(skipped: dict[str, str]) -> None:
    for name, reason in skipped.items():
        console.say(f"[yellow]skipped[/yellow] class '{name}': {reason}")


def write_skipped(f, skipped: dict[str, str]) -> None:
    """Classes left out of an artifact and why (group_by=predicted), so reports can list them."""
    names = sorted(skipped)
    write_array(f, "skipped_class_names", np.array(names, dtype=str), "skipped class")
    write_array(f, "skipped_reasons", np.array([skipped[n] for n in names], dtype=str), "skipped class")


def read_skipped(f) -> dict[str, str]:
    if "skipped_class_names" not in f:
        return {}
    return dict(zip(read_strings(f["skipped_class_names"]), read_strings(f["skipped_reasons"])))


def check_varies(values: np.ndarray, what: str) -> None:
    """Activations that are the same for every patch (a dead layer, weights that did not load)
    have no concepts to find; say so instead of fitting noise or dividing by zero."""
    if len(values) and float(np.ptp(values, axis=0).max(initial=0.0)) == 0.0:
        raise RsvcError(f"{what} are the same for every concept-set patch (every feature is constant), so there "
                        "are no concepts to find in them.",
                        "Pick another layer (`rsvc layers` lists them), or check the model and its checkpoint: "
                        "a constant layer usually means dead units or weights that were not loaded.")


def prepare_activations(values: np.ndarray, method: str, signed: str) -> np.ndarray:
    """The declared treatment of negative activations (clamp, split, or an error for plain NMF)."""
    from rsvc_cli.algorithms.decomposition import apply_sign_treatment

    if method != "nmf":
        return values
    return apply_sign_treatment(torch.from_numpy(values), signed).numpy()


def make_estimator(params: dict):
    """The decomposition estimator with those of the configured parameters its method takes."""
    import inspect

    from rsvc_cli.algorithms.decomposition import make_decomposition, _METHODS

    method = params["method"]
    accepted = inspect.signature(_METHODS[method]).parameters if method in _METHODS else {}
    if params.get("solver") is not None and "solver" not in accepted:
        raise RsvcError(f"decomposition.solver={params['solver']} is set, but decomposition={method} has no solver "
                        "option (only nmf has one).",
                        "Remove the decomposition.solver override, or use decomposition=nmf.")
    given = {"n_concepts": int(params["n_concepts"]), "init": params.get("init"), "solver": params.get("solver"),
             "max_iter": params.get("max_iter"), "tol": params.get("tol"), "seed": params.get("seed")}
    return make_decomposition(method, **{k: v for k, v in given.items() if k in accepted and v is not None})


def fit_concepts(acts: Activations, params: dict, group_by: str, device: torch.device,
                 predicted_of_image: np.ndarray | None = None, desc: str = "decompose",
                 skip=frozenset()) -> dict[str, dict]:
    """Concepts per class (or of all classes together), leaving out the classes in ``skip``."""
    values = prepare_activations(acts.values, params["method"], params["signed"])
    classes = class_of_patch(acts, group_by, predicted_of_image)
    concept_rows = acts.image_set == CONCEPT_SET
    if params["per_class"]:
        groups = {name: np.nonzero(concept_rows & (classes == c))[0] for c, name in enumerate(acts.class_names)
                  if name not in skip}
        groups = {name: rows for name, rows in groups.items() if len(rows)}
        if not groups:
            # Otherwise an artifact without a single class would be stored as complete.
            raise RsvcError("No class has any concept-set patches, so there is nothing to fit concepts on.",
                            "Give the concept set a share in dataset.split (e.g. dataset.split=[1,2,2]) and "
                            "check dataset.images_per_class.")
    else:
        groups = {ALL_CLASSES: np.nonzero(concept_rows)[0]}
    k = int(params["n_concepts"])
    for name, rows in groups.items():
        if len(rows) < k:
            raise RsvcError(f"Class '{name}' has {len(rows)} concept-set patches, fewer than the {k} concepts asked for.",
                            f"Lower decomposition.n_concepts (at most {len(rows)}) or raise dataset.images_per_class.")
    results = {}
    # Classes with equally many patches are stacked and fitted in one batched solve.
    by_size: dict[int, list[str]] = {}
    for name, rows in groups.items():
        by_size.setdefault(len(rows), []).append(name)
    bar = console.progress(len(groups), desc, unit="class")
    for names in by_size.values():
        batch = torch.from_numpy(np.stack([values[groups[n]] for n in names])).to(device, torch.float64)
        estimator = make_estimator(params)
        estimator.fit(batch)
        means = getattr(estimator, "mean_", None)
        basis = estimator.concept_basis_.detach().cpu().numpy()
        coefficients = estimator.coefficients_.detach().cpu().numpy()
        errors = np.atleast_1d(torch.as_tensor(estimator.reconstruction_error_).cpu().numpy())
        n_iter = np.atleast_1d(torch.as_tensor(estimator.n_iter_).cpu().numpy())
        converged = np.atleast_1d(torch.as_tensor(estimator.converged_).cpu().numpy())
        norms = torch.linalg.matrix_norm(batch).cpu().numpy()
        if not (np.isfinite(basis).all() and np.isfinite(coefficients).all()):
            # Never store a NaN basis as a complete artifact: every later stage would reuse it.
            raise RsvcError(f"The {params['method']} decomposition of class(es) {', '.join(names)} produced NaN or "
                            "infinite values.",
                            "Try another decomposition (decomposition=semi_nmf or decomposition=pca) or another "
                            "layer, and check the layer's activations (`rsvc info path=` its activations artifact).")
        for i, name in enumerate(names):
            results[name] = {"concept_basis": basis[i].astype(np.float32), "coefficients": coefficients[i].astype(np.float32),
                             "rows": groups[name], "reconstruction_error": errors[i],
                             "relative_reconstruction_error": errors[i] / max(norms[i], 1e-30),
                             "n_iter": n_iter[i], "converged": converged[i],
                             "mean": None if means is None else means[i].cpu().numpy().astype(np.float32)}
        bar.update(len(names))
    bar.close()
    return results


@dataclass
class Concepts:
    class_names: list[str]
    per_class: bool
    signed: str
    method: str
    concept_basis: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]  # PCA only: the centre of the fitted activations
    skipped: dict[str, str] = field(default_factory=dict)  # class -> why it has no concepts (group_by=predicted)

    def basis_of(self, name: str) -> np.ndarray:
        return self.concept_basis[name if self.per_class else ALL_CLASSES]

    def estimator_of(self, name: str, device):
        """The fitted estimator of a class, rebuilt from the store (its transform gives coefficients)."""
        from rsvc_cli.algorithms.decomposition import make_decomposition

        key = name if self.per_class else ALL_CLASSES
        estimator = make_decomposition(self.method, n_concepts=self.concept_basis[key].shape[0])
        estimator.concept_basis_ = torch.from_numpy(self.concept_basis[key]).to(device, torch.float64)
        if key in self.mean:
            estimator.mean_ = torch.from_numpy(self.mean[key]).to(device, torch.float64)
        return estimator


def read_concepts(path: Path, content: dict) -> Concepts:
    with open_artifact(path, "concepts", content) as f:
        bases = {name: g["concept_basis"][()] for name, g in f["classes"].items()}
        means = {name: g["mean"][()] for name, g in f["classes"].items() if "mean" in g}
        return Concepts(class_names=read_strings(f["class_names"]), per_class=bool(f.attrs["per_class"]),
                        signed=str(f.attrs["signed"]), method=content["decomposition"]["method"], concept_basis=bases,
                        mean=means, skipped=read_skipped(f))


def coefficients_of(values: np.ndarray, concepts: Concepts, name: str, device) -> np.ndarray:
    """Coefficients of patches against a class's stored basis: exact NNLS (PCA: projection; k-means: nearest centroid)."""
    values = prepare_activations(values, concepts.method, concepts.signed)
    estimator = concepts.estimator_of(name, device)
    return estimator.transform(torch.from_numpy(values).to(device, torch.float64)).cpu().numpy()

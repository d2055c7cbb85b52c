"""What several stages need: devices, models, image sets, and the content configs of artifacts.

The content config of an artifact is everything that determines its numbers; `store.keys`
hashes it into the artifact's path. Content configs nest: a concepts artifact's content holds
its activations artifact's content, so a changed checkpoint or image selection reaches every
downstream key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rsvc_cli.errors import RsvcError
from rsvc_cli.store.keys import artifact_path, stage_content


def to_plain(cfg: Any) -> Any:
    """A DictConfig (or a part of one) as plain Python containers."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise RsvcError(f"device={name} is not a device torch knows ({err}).",
                        "Use device=auto, device=cpu or device=cuda (device=cuda:N for a specific GPU).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RsvcError(f"device={name} asks for CUDA but no CUDA GPU is available here.",
                        "Use device=auto (CUDA when present, else CPU) or device=cpu.")
    return device


def store_dir(cfg) -> Path:
    return Path(str(cfg.store)).expanduser()


# ----------------------------------------------------------------------------------- models

@dataclass
class ModelHandle:
    """A loaded model with what downstream stages need to know about it."""

    loaded: Any  # rsvc_cli.models.registry.LoadedModel
    identity: dict  # what determines its numbers (goes into artifact keys)
    input_size: int
    mean: tuple
    std: tuple
    token_reduce: str
    # Preprocessing beyond input_size/mean/std: the shorter side before the centre crop, the interpolation.
    resize_size: int | None = None
    interpolation: str = "bilinear"
    # The class each output stands for: model.output_classes, or for weights rsvc trained the training
    # classes, then None for the outputs training left unused (filled in by class_outputs when a
    # grouping first needs them); None: see class_outputs.
    output_classes: list[str] | None = None
    training_dataset: dict | None = None  # the config of the images rsvc trained the weights on

    @property
    def module(self) -> torch.nn.Module:
        return self.loaded.module

    @property
    def label(self) -> str:
        return self.identity["name"]


def load_model(model_cfg, run_cfg=None) -> ModelHandle:
    """The model with its weights; `model.train.enabled` weights are trained (or reused) first."""
    if model_cfg.train.enabled:
        from rsvc_cli.stages.train import ensure_trained

        if run_cfg is None:
            raise ValueError("a trained model needs the run settings (store, device)")
        from rsvc_cli.store.keys import content_key, seeds_in

        checkpoint, content = ensure_trained(model_cfg, run_cfg)
        handle = load_untrained_model(model_cfg, checkpoint=str(checkpoint))
        # Keyed by what made the weights, so a retrain that gives the same file changes nothing downstream.
        handle.identity["weights"] = "trained:" + content_key(content)
        # The seeds behind those weights (initialization, image selection, training order) are
        # hashed into that key; named here they reach every downstream artifact's `seeds`.
        handle.identity["train_seeds"] = seeds_in(content)
        handle.training_dataset = to_plain(model_cfg.train.dataset)
        return handle
    return load_untrained_model(model_cfg)


def load_untrained_model(model_cfg, checkpoint: str | None = None, init_seed: int = 0) -> ModelHandle:
    """The model as `model_cfg` describes it, ignoring `model.train` (`checkpoint` overrides model.checkpoint)."""
    from rsvc_cli.models.registry import make_model

    m = to_plain(model_cfg)
    m.pop("train", None)
    if checkpoint is not None:
        m["checkpoint"] = checkpoint
    if m.get("token_reduce") not in ("cls", "mean"):
        raise RsvcError(f"model.token_reduce={m.get('token_reduce')} is not an option.",
                        "Use model.token_reduce=cls (the CLS token where the model has one) or model.token_reduce=mean.")
    checkpoint = m.get("checkpoint")
    if checkpoint is not None:
        checkpoint = str(Path(checkpoint).expanduser())
    # Weights that come from no file are the architecture's initialization: make it reproducible.
    torch.manual_seed(init_seed)
    loaded = make_model(m["name"], pretrained=bool(m.get("pretrained")), checkpoint=checkpoint,
                        target=m.get("_target_"), num_classes=m.get("num_classes"), kwargs=m.get("kwargs") or {})
    dc = loaded.data_config
    input_size = int(m.get("input_size") or dc.input_size)
    mean = tuple(float(v) for v in (m.get("mean") or dc.mean))
    std = tuple(float(v) for v in (m.get("std") or dc.std))
    interpolation, resize_size = _resizing(m, dc, input_size)
    identity = {
        "name": m["name"],
        "target": m.get("_target_"),
        "kwargs": m.get("kwargs") or {},
        "num_classes": m.get("num_classes"),
        # Weights: the checkpoint's digest, or the pretrained tag; random init is seeded by nothing we
        # control, so it is keyed by a digest of the initial parameters instead.
        "weights": loaded.checkpoint_digest or ("pretrained" if m.get("pretrained") else parameter_digest(loaded.module)),
        "init_seed": init_seed if not (loaded.checkpoint_digest or m.get("pretrained")) else None,
        "input_size": input_size,
        "mean": list(mean),
        "std": list(std),
        "resize_size": resize_size,
        "interpolation": interpolation,
        "token_reduce": m["token_reduce"],
    }
    return ModelHandle(loaded=loaded, identity=identity, input_size=input_size, mean=mean, std=std,
                       token_reduce=m["token_reduce"], resize_size=resize_size, interpolation=interpolation,
                       output_classes=_read_output_classes(m.get("output_classes")))


def _resizing(m: dict, dc, input_size: int) -> tuple[str, int]:
    """(interpolation, shorter side before the centre crop): the model's own (timm's pretrained config,
    a built-in's facts) unless model.interpolation / model.crop_pct override them."""
    from rsvc_cli.data.patches import PATCH_INTERPOLATIONS, resize_size_for

    if dc.crop_mode != "center":
        raise RsvcError(f"Model {m['name']} is evaluated with timm's crop_mode={dc.crop_mode!r}; rsvc resizes the "
                        "shorter side and crops the centre (crop_mode='center') only.",
                        "Use a model whose pretrained config crops at the centre, or give the module a data_config "
                        "attribute (rsvc_cli.models.loading.DataConfig) that does.")
    interpolation = str(m.get("interpolation") or dc.interpolation)
    if interpolation not in PATCH_INTERPOLATIONS:
        raise RsvcError(f"Model {m['name']} uses interpolation {interpolation!r}, which rsvc cannot resize patches with.",
                        f"Set model.interpolation to one of {', '.join(PATCH_INTERPOLATIONS)}.")
    crop_pct = float(m.get("crop_pct") or dc.crop_pct)
    return interpolation, resize_size_for(input_size, crop_pct)


def patch_dataset(model: ModelHandle, images: "ImageSets", geometry: tuple, **kwargs):
    """The model's view of the selected images: its preprocessing, the patch geometry, the planting."""
    from rsvc_cli.data.patches import PatchDataset

    return PatchDataset(images.source, images.image_index, model.input_size, model.mean, model.std,
                        patch_size=geometry[0], stride=geometry[1], planting=images.planting,
                        interpolation=model.interpolation, resize_size=model.resize_size, **kwargs)


def _read_output_classes(spec) -> list[str] | None:
    """model.output_classes: None, a list of class names, or a text file with one name per line."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        names = [str(name) for name in spec]
    else:
        path = Path(str(spec)).expanduser()
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as err:
            raise RsvcError(f"model.output_classes={spec} cannot be read ({err.strerror or err}).",
                            "Give a list of class names (model.output_classes=[cat,dog,...]) or a text file with "
                            "one class name per line, in the order of the model's outputs.") from None
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if not names or duplicates:
        problem = "is empty" if not names else f"names {', '.join(duplicates)} more than once"
        raise RsvcError(f"model.output_classes {problem}.",
                        "List each of the model's classes once, in the order of its outputs.")
    return names


def class_outputs(model: ModelHandle, images: ImageSets, reader: str = "dataset.group_by=predicted reads",
                  instead: str = "use dataset.group_by=label") -> np.ndarray:
    """The model output that stands for each compared class (images.class_names order), -1 for a class
    the model has no output for.

    Outputs are named by model.output_classes (or an rsvc-trained model's training classes), else by
    the class folders of dataset.root in sorted order, all of them even where dataset.classes picks a
    few: how torchvision's ImageFolder numbers classes, and so how CIFAR-10 and ImageNet models were
    trained. A model's output index is never a class's position among the compared classes.
    ``reader`` (what needs the outputs) and ``instead`` (the way around it) word the errors.
    """
    names, source_of_names = model.output_classes, f"{model.label}'s model.output_classes"
    n_outputs = int(model.loaded.num_classes)
    if names is None and model.training_dataset is not None:
        # Listing a training tree reads every file name: once per model.
        names = list(make_source(model.training_dataset).class_names)
        source_of_names = "its training classes"
        if len(names) <= n_outputs:
            # rsvc trains with labels 0..n-1 whatever the architecture's output count (a 10-output
            # CIFAR ResNet on 4 classes): the training classes name the first outputs, the rest none.
            names = model.output_classes = names + [None] * (n_outputs - len(names))
    if names is None:
        names = list(getattr(images.source, "folder_names", images.class_names))
        source_of_names = "the sorted class folders of dataset.root"
    if len(names) != n_outputs:
        raise RsvcError(f"{reader} {model.label}'s {n_outputs} outputs as classes, but "
                        f"{source_of_names} give {len(names)} class names.",
                        f"Set model.output_classes (model1./model2. in a comparison) to the {n_outputs} class names of "
                        f"the model's outputs in order (a list or a text file with one per line), or {instead}.")
    output_of = {name: i for i, name in enumerate(names)}
    outputs = np.array([output_of.get(name, -1) for name in images.class_names], dtype=np.int64)
    if (outputs < 0).all():
        raise RsvcError(f"None of the compared classes ({', '.join(images.class_names[:5])}...) is among "
                        f"{model.label}'s output classes ({', '.join(n for n in names[:5] if n is not None)}...); "
                        f"{reader} its outputs as them.",
                        f"Set model.output_classes to the model's class names in output order, or {instead}.")
    return outputs


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a model's parameters and buffers, for weights that come from no file."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "params:" + h.hexdigest()


# ------------------------------------------------------------------------------- image sets

@dataclass
class ImageSets:
    """The images of a comparison: a source, which images, in which set, and its identity."""

    source: Any
    class_names: list[str]
    image_index: np.ndarray  # (n_images,) positions in `source`
    image_set: np.ndarray  # (n_images,) 0 concept, 1 regression, 2 evaluation
    label: np.ndarray  # (n_images,)
    identity: dict  # what determines the images (goes into artifact keys)
    planting: Any = None


def load_image_sets(dataset_cfg) -> ImageSets:
    from rsvc_cli import console
    from rsvc_cli.data.selection import EVALUATION_SOURCE, select_image_sets

    d = to_plain(dataset_cfg)
    source = make_source(d)
    split = tuple(int(v) for v in d.get("split") or (1, 2, 2))
    if len(split) != 3 or min(split) < 0 or sum(split) == 0:
        raise RsvcError(f"dataset.split={list(split)} must be three non-negative weights (concept, regression, evaluation).",
                        "Use e.g. dataset.split=[1,2,2] (the authors' 100/200/200).")
    images_per_set = {k: v for k, v in (d.get("images_per_set") or {}).items() if v is not None}
    if len(images_per_set) == 3 and d.get("images_per_class") is not None:
        raise RsvcError(f"dataset.images_per_set gives every set its count, so dataset.images_per_class="
                        f"{d['images_per_class']} would not be used.",
                        "Set dataset.images_per_class=null to use dataset.images_per_set, or drop one of "
                        "dataset.images_per_set's counts (null) to take that set's share of images_per_class.")
    min_images = d.get("min_images_per_set")
    if min_images is not None and (not isinstance(min_images, int) or min_images < 1):
        raise RsvcError(f"dataset.min_images_per_set={min_images} is not a number of images.",
                        "Set it to the fewest images a set of one class may have (at least 1; default 10).")
    evaluation_root = d.get("evaluation_root")
    if evaluation_root:
        source = split_source(d, source)
        # Evaluation images are numbered after the primary ones (SplitSource): selection sees two sources.
        selection = select_image_sets(source.primary.labels, d.get("images_per_class"), seed=int(d.get("seed", 0)),
                                      split=split, class_names=list(source.class_names),
                                      evaluation_labels=source.evaluation.labels, images_per_set=images_per_set,
                                      min_images=min_images)
        from_evaluation = selection.source == EVALUATION_SOURCE
        image_index = selection.image_index + np.where(from_evaluation, source.n_primary, 0)
    else:
        selection = select_image_sets(source.labels, d.get("images_per_class"), seed=int(d.get("seed", 0)), split=split,
                                      class_names=list(source.class_names), images_per_set=images_per_set,
                                      min_images=min_images)
        image_index = selection.image_index
    for note in selection.notes:
        console.say(f"[yellow]note[/yellow] {note}")
    planting = make_planting(d.get("planting") or {}, source.class_names)
    identity = {
        "images_per_class": d.get("images_per_class"),
        "split": list(split),
        "seed": int(d.get("seed", 0)),
        "planting": planting_identity(d.get("planting") or {}),
    }
    if evaluation_root:
        identity["source"] = source_identity(d, source.primary, selection.image_index[~from_evaluation])
        identity["evaluation_source"] = source_identity(d, source.evaluation, selection.image_index[from_evaluation])
    else:
        identity["source"] = source_identity(d, source, image_index)
    # Only when given, so the keys of runs that never set them stay as they were.
    if images_per_set:
        identity["images_per_set"] = images_per_set
    return ImageSets(source=source, class_names=list(source.class_names), image_index=image_index,
                     image_set=selection.image_set, label=selection.label, identity=identity, planting=planting)


def split_source(d: dict, primary):
    """dataset.root's images followed by dataset.evaluation_root's, classes matched by folder name."""
    from rsvc_cli.data.imagefolder import SplitSource

    if d.get("name") != "imagefolder" or d.get("_target_"):
        raise RsvcError(f"dataset.evaluation_root is set, but dataset {d.get('_target_') or d.get('name')} is not a "
                        "class-per-folder tree, so it has no held-out split to take evaluation images from.",
                        "Drop dataset.evaluation_root, or use dataset=imagefolder with dataset.root=TRAIN_DIR "
                        "dataset.evaluation_root=VAL_DIR.")
    if os.path.realpath(d["evaluation_root"]) == os.path.realpath(primary.root):
        raise RsvcError(f"dataset.evaluation_root is dataset.root ({primary.root}): evaluation images would be drawn "
                        "again from the images that concepts and regressions are fitted on.",
                        "Point dataset.evaluation_root at the held-out split (ImageNet val, CIFAR test), or set "
                        "dataset.evaluation_root=null to draw all three sets, disjoint, from dataset.root.")
    return SplitSource(primary, d["evaluation_root"])


def make_source(d: dict):
    name = d.get("name")
    if d.get("_target_"):
        import importlib

        module_name, _, attr = d["_target_"].replace(":", ".").rpartition(".")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise RsvcError(f"dataset._target_={d['_target_']} cannot be imported ({err}).",
                            "Give an importable path to a class or function returning a source with "
                            "class_names, labels and load_image(i).") from None
        return factory(**(d.get("kwargs") or {}))
    if name == "synthetic":
        from rsvc_cli.data.synthetic import CUES, SyntheticSource

        per_class = d.get("images_per_class") or 60
        return SyntheticSource(n_classes=int(d.get("n_classes", 4)), images_per_class=int(per_class),
                               image_size=int(d.get("image_size", 32)), seed=int(d.get("synthetic_seed", 0)),
                               class_cues=list(d.get("class_cues") or CUES))
    if name == "imagefolder":
        from rsvc_cli.data.imagefolder import ImageFolderSource

        root = d.get("root")
        if not root:
            raise RsvcError("dataset=imagefolder needs the folder of class sub-folders.",
                            "Set dataset.root=DIR (one sub-folder of images per class, the ImageNet layout).")
        classes = d.get("classes")
        if d.get("first_classes") and not classes:
            classes = ImageFolderSource(root).class_names[: int(d["first_classes"])]
        return ImageFolderSource(root, classes=classes)
    raise RsvcError(f"dataset.name={name} is not a dataset rsvc knows.",
                    "Use dataset=imagefolder dataset.root=DIR, dataset=synthetic, or dataset._target_=pkg.module.Factory.")


def source_identity(d: dict, source, image_index: np.ndarray) -> dict:
    """What the selected images are, independent of where the dataset lies on disk."""
    if d.get("name") == "synthetic" and not d.get("_target_"):
        return {"name": "synthetic", "n_classes": int(d.get("n_classes", 4)), "image_size": int(d.get("image_size", 32)),
                "synthetic_seed": int(d.get("synthetic_seed", 0)), "class_cues": list(source.class_cues),
                "class_names": list(source.class_names)}
    # Relative paths and byte sizes of the selected files: moving the tree keeps the key, while a
    # different split (train vs test) with the same file names still gets its own key.
    h = hashlib.sha256()
    root = getattr(source, "root", None)
    for i in np.asarray(image_index):
        path = source.paths[int(i)]
        rel = os.path.relpath(path, root) if root else str(path)
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        h.update(f"{rel}\0{size}\n".encode())
    return {"name": d.get("name"), "target": d.get("_target_"), "class_names": list(source.class_names),
            "images_digest": h.hexdigest()}


def make_planting(p: dict, class_names: list[str]):
    """The planting of a dataset config; `class_probability` keys are class names or indices."""
    if not p or not p.get("enabled"):
        return None
    from rsvc_cli.data.planting import Planting

    given = {str(k): float(v) for k, v in (p.get("class_probability") or {}).items()}
    known = set(class_names) | {str(i) for i in range(len(class_names))}
    unknown = sorted(set(given) - known)
    if unknown:
        raise RsvcError(f"dataset.planting.class_probability names classes that are not in the dataset: {unknown}.",
                        f"Use class names or indices 0-{len(class_names) - 1}: {', '.join(class_names[:20])}.")
    default = float(p.get("default_probability", 0.0))
    probability = [given.get(name, given.get(str(i), default)) for i, name in enumerate(class_names)]
    return Planting(color=tuple(p.get("color") or (255, 0, 255)), size=int(p.get("size", 4)),
                    class_probability=probability, seed=int(p.get("seed", 0)))


def planting_identity(p: dict) -> dict | None:
    if not p or not p.get("enabled"):
        return None
    return {k: p.get(k) for k in ("color", "size", "class_probability", "default_probability", "seed")}


def patch_geometry(patch_cfg, input_size: int) -> tuple[int | None, int | None]:
    from rsvc_cli.data.patches import scaled_patch_geometry

    p = to_plain(patch_cfg)
    return scaled_patch_geometry(input_size, size=p.get("size"), stride=p.get("stride"),
                                 reference_size=p.get("reference_size", 224))


# ------------------------------------------------------------------------- content configs

def activations_content(model: ModelHandle, images: ImageSets, patch: tuple, layer: str, cfg) -> dict:
    # The precision actually used, not the option: `auto` gives bfloat16 on one machine and float32 on
    # another, and their activations must never be taken for each other.
    return stage_content("activations", model=model.identity, images=images.identity,
                         patch={"size": patch[0], "stride": patch[1]}, layer=layer, storage_dtype=cfg.storage_dtype,
                         precision=forward_precision_of(model, cfg))


def forward_precision_of(model: ModelHandle, cfg) -> str:
    """The precision `cfg.precision` gives this model's extraction on `cfg.device`: float32 or bfloat16."""
    from rsvc_cli.models.precision import resolve_precision

    if cfg.get("autocast") is not None:
        raise RsvcError("autocast= is no longer an option: precision= replaces it (and applies on CPUs too).",
                        "Drop autocast and use precision=auto (bfloat16 where the device computes it natively, for "
                        "convolutional models), precision=bfloat16 or precision=float32.")
    return resolve_precision(str(cfg.precision), resolve_device(cfg.device), model.module)


def activations_path(store: Path, model: ModelHandle, content: dict) -> Path:
    return artifact_path(store, "activations", f"{model.label}-{content['layer']}", content)


def produce(store: Path, kind: str, prefix: str, content: dict, write, seeds: dict | None = None) -> Path:
    """Return the complete artifact for `content`, computing it with `write(h5file)` if needed.

    One writer per artifact (a lock), a re-check after waiting, and an atomic commit: a job that
    waited for another one simply reuses what it wrote.
    """
    from rsvc_cli import console
    from rsvc_cli.store.artifact import ArtifactWriter, is_complete
    from rsvc_cli.store.lock import artifact_lock, clear_if_stale

    path = artifact_path(store, kind, prefix, content)
    if is_complete(path, kind, content):
        clear_if_stale(path)
        console.reused(kind, path)
        return path
    with artifact_lock(path, on_wait=lambda holder: console.say(f"waiting for another rsvc job writing {path.name}")):
        if is_complete(path, kind, content):
            console.reused(kind, path)
            return path
        with ArtifactWriter(path, kind, content, seeds=seeds) as writer:
            write(writer.file)
            writer.commit()
    console.wrote(kind, path)
    return path


def predictions_content(model: ModelHandle, images: ImageSets) -> dict:
    return stage_content("predictions", model=model.identity, images=images.identity)


def predicted_classes_for(model: ModelHandle, images: ImageSets, cfg) -> np.ndarray:
    """The model's predicted output (its argmax) on every selected image (squares painted where planted),
    (n_images,) in image order, from the store or made now by a pass over the whole images. Output
    indices, not class positions: `predicted_class_positions` translates them.

    Only dataset.group_by=predicted needs them, so they are an artifact of their own rather than a
    second pass in every extraction (whole images were 1 in 17 of its inputs).
    """
    from rsvc_cli.stages.planted import predicted_classes
    from rsvc_cli.store.artifact import open_artifact, write_array

    content = predictions_content(model, images)

    def write(f):
        predicted = predicted_classes(model, images.source, images.image_index, images.planting,
                                      int(cfg.batch_size), resolve_device(cfg.device))
        write_array(f, "predicted_class", predicted, "image")
        write_array(f, "image_index", images.image_index, "image")

    path = produce(store_dir(cfg), "predictions", model.label, content, write)
    with open_artifact(path, "predictions", content) as f:
        return f["predicted_class"][()]


def predicted_class_positions(model: ModelHandle, images: ImageSets, cfg) -> np.ndarray:
    """Each selected image's predicted class as a position in images.class_names (the labels' numbering),
    -1 where the model predicts a class that is not compared; (n_images,) in image order."""
    outputs = class_outputs(model, images)
    position_of_output = np.full(int(model.loaded.num_classes), -1, dtype=np.int64)
    compared = np.flatnonzero(outputs >= 0)
    position_of_output[outputs[compared]] = compared
    return position_of_output[predicted_classes_for(model, images, cfg)]


def check_finite(array, what: str) -> None:
    """NaN or inf in activations make every downstream number meaningless: stop early and say where."""
    import numpy as _np

    bad = ~_np.isfinite(array)
    if bad.any():
        rows = _np.unique(_np.nonzero(bad)[0])
        raise RsvcError(f"{what} contain {int(bad.sum())} NaN or infinite values (in {len(rows)} patches, "
                        f"first at row {int(rows[0])}).",
                        "Check the checkpoint and the input normalization (model.mean/model.std); bfloat16 forward "
                        "passes (precision=auto or bfloat16) or float16 storage can overflow: rerun with "
                        "precision=float32 storage_dtype=float32 (artifacts of their own).")

"""Configuration schemas, stored in Hydra's ConfigStore.

Every stage's primary YAML (configs/<stage>.yaml) starts from one of these schemas, so a typo in a
key or a value of the wrong type fails when the config is composed, before any work starts.
The YAML files in the config groups (configs/model/, configs/dataset/, ...) fill these schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

DEFAULT_STORE = "${oc.env:RSVC_STORE,rsvc-store}"


@dataclass
class PlantingConfig:
    """A coloured square pasted on images (the planted-concept experiment)."""

    enabled: bool = False
    color: List[int] = field(default_factory=lambda: [255, 0, 255])
    size: int = 4  # pixels at the model input size
    # Probability of a square per class name; `default_probability` for classes not listed.
    class_probability: Dict[str, float] = field(default_factory=dict)
    default_probability: float = 0.0
    seed: int = 0


@dataclass
class ImagesPerSetConfig:
    """Images per class for one set each; null: that set's share of images_per_class by split."""

    concept: Optional[int] = None
    regression: Optional[int] = None
    evaluation: Optional[int] = None


@dataclass
class DatasetConfig:
    """Where images come from and which ones each image set gets."""

    name: str = "synthetic"  # imagefolder | synthetic
    # Class-per-folder tree of the concept and regression images (and the evaluation images without
    # evaluation_root).
    root: Optional[str] = None
    # The held-out split (ImageNet val, CIFAR test) that alone gives the evaluation images, its class
    # folders matched to root's by name (imagefolder only). null: evaluation images come from root.
    evaluation_root: Optional[str] = None
    classes: Optional[List[str]] = None
    # Only the first N classes in sorted folder order (the authors: ImageNet classes 0-99).
    first_classes: Optional[int] = None
    # Images drawn per class, split concept:regression:evaluation by `split` (authors: 100/200/200).
    # null: every image of each class, split by `split` (with evaluation_root: root's split
    # concept:regression, every evaluation_root image evaluated).
    images_per_class: Optional[int] = 500
    split: List[int] = field(default_factory=lambda: [1, 2, 2])
    # A set's own count per class (e.g. evaluation: 50, all ImageNet val has), instead of its share above.
    images_per_set: ImagesPerSetConfig = field(default_factory=ImagesPerSetConfig)
    # A class with fewer images than asked keeps each set's share of what it has, with a console note,
    # as long as every set keeps at least this many (half of what it asked, if that is fewer); else an
    # error. Under group_by=predicted a class whose predicted groups fall below the same floor is skipped.
    min_images_per_set: int = 10
    seed: int = 0
    # label: every set grouped by the images' folder. predicted (the paper's protocol): the images of
    # each set are grouped by the models' predictions on the whole image: a model's concepts of class c
    # are fitted on the concept images it predicts as c, and the regression and evaluation sets of c are
    # the images either model predicts as c (the union). Classes a model predicts too rarely are skipped.
    group_by: str = "label"  # label | predicted
    # synthetic only
    n_classes: int = 4
    image_size: int = 32
    synthetic_seed: int = 0
    # What tells the classes apart: any of shape, hue, stripes (the others vary at random per image).
    class_cues: List[str] = field(default_factory=lambda: ["shape", "hue", "stripes"])
    planting: PlantingConfig = field(default_factory=PlantingConfig)
    _target_: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Weights made by `rsvc train` (cached in the store): fine-tune `checkpoint` or train from scratch."""

    enabled: bool = False
    dataset: DatasetConfig = field(default_factory=lambda: DatasetConfig())
    epochs: int = 3
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    seed: int = 0
    augment: bool = True  # random crop (pad 4 at 32 px) and horizontal flip


@dataclass
class ModelConfig:
    """A model: a built-in or timm name, or a torch module by import path, plus weights."""

    name: str = "cifar_resnet20"
    # What charts, cards and console lines call the model (display only: artifact keys keep `name`);
    # null: derived from the name, and from the checkpoint file when both models of a pair share it.
    label: Optional[str] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    # Import path "pkg.module.Class" (or "pkg.module:function") called with `kwargs`.
    _target_: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    num_classes: Optional[int] = None
    # The class each output stands for, in output order: a list of names or a text file with one per
    # line (dataset.group_by=predicted reads predictions through it). null: an rsvc-trained model's
    # training classes, else the class folders of dataset.root in sorted order.
    output_classes: Optional[Any] = None
    # ViT token outputs: the CLS token where the model has one, or the mean of patch tokens.
    token_reduce: str = "cls"
    # Preprocessing overrides; null = the model's own (timm pretrained config or built-in): the shorter
    # side resized to floor(input_size / crop_pct) with `interpolation`, a centre crop of input_size.
    input_size: Optional[int] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    interpolation: Optional[str] = None  # nearest | bilinear | bicubic
    crop_pct: Optional[float] = None
    # A model with random weights (no checkpoint, not pretrained, not trained by rsvc) is refused by
    # the stages that produce results unless this is true; the results then carry a banner.
    random_weights_ok: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class PatchConfig:
    """Square patches: `size` at stride `stride` on a `reference_size` input, scaled to the model's input."""

    size: Optional[int] = 64  # null: whole images
    stride: int = 51
    reference_size: int = 224


@dataclass
class DecompositionConfig:
    method: str = "nmf"  # nmf | semi_nmf | pca | kmeans
    n_concepts: int = 10
    init: str = "nndsvd"
    solver: Optional[str] = None  # nmf only: cd (scikit-learn's fixed point) | hals_accelerated
    max_iter: int = 500
    tol: float = 1e-4
    seed: int = 0
    signed: str = "error"  # error | clamp | split (negative activations with nmf)
    per_class: bool = True


@dataclass
class RegressionConfig:
    method: str = "lasso"  # lasso | ridge | linear
    alpha: Any = 0.1  # a number, or "cv": chosen per class and direction on the regression set
    n_folds: int = 5
    seed: int = 0
    max_iter: int = 5000
    tol: float = 1e-7
    evaluation: str = "heldout"  # heldout (evaluation set) | crossval (held-out folds of the regression set)


@dataclass
class ScoreConfig:
    """Intervals by bootstrap over images and the per-concept call (DESIGN.md, "Trust")."""

    n_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    # Calls from the gap (self minus cross similarity) and the self baseline's intervals. 0.4, not
    # 0.2: on CIFAR ResNet-20 vs ResNet-56 (layer3, 10 classes, k=10) a gap above 0.2 called 116 of
    # 200 concepts model-specific (22 of them above their class mean), above 0.3 25, above 0.4 6.
    specific_gap: float = 0.4  # model-specific: the gap's lower bound is above this ...
    min_self: float = 0.5  # ... and the self baseline's lower bound at least this; unreliable: its upper bound below
    shared_gap: float = 0.1  # shared: the gap's upper bound is below this


@dataclass
class ImportanceConfig:
    enabled: bool = True
    steps: int = 30
    baseline: str = "zero"
    replacement_mix: float = 0.5
    # Keep what the concepts do not explain (activations - U W) in the rebuilt layer. DESIGN rebuilds
    # from U W alone (false); at intermediate layers with few concepts that can move the logits far.
    residual: bool = False
    # Evaluation patches per class that go through the network (IG costs `steps` passes each).
    max_patches_per_class: int = 64


@dataclass
class CollageConfig:
    # false: no collage PNGs (the CIFAR preset makes about 800) and no image cards in the report;
    # the scores, tables and plots are the same.
    enabled: bool = True


@dataclass
class RunConfig:
    """Settings shared by every stage that do not change any number."""

    store: str = DEFAULT_STORE
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32  # images per forward batch (each image gives n_patches inputs)
    num_workers: int = 0
    # Forward passes of extraction: auto (bfloat16 with channels-last memory for convolutional models
    # where the device computes bf16 natively, float32 elsewhere) | float32 | bfloat16. Part of the
    # activations' key; whole-image predictions and importance always run in float32.
    precision: str = "auto"
    autocast: Optional[bool] = None  # replaced by precision: setting it is an error that says so
    storage_dtype: str = "float32"  # float32 | float16 (activations on disk)
    debug: bool = False


@dataclass
class ExtractConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    layers: List[str] = field(default_factory=lambda: ["layer3"])


@dataclass
class LayersConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class InfoConfig(RunConfig):
    path: Optional[str] = None
    clean: bool = False  # rsvc doctor: remove orphaned partials, stale locks, broken files


@dataclass
class DecomposeConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    layer: str = "layer3"
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)


@dataclass
class PairConfig(RunConfig):
    """Stages that compare two models: regress, score, collage, importance, compare."""

    model1: ModelConfig = field(default_factory=ModelConfig)
    model2: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    layer1: str = "layer3"
    layer2: str = "layer3"
    # Extra layers extracted in the same forward pass (sweeps share one pass per model).
    extract_layers1: List[str] = field(default_factory=list)
    extract_layers2: List[str] = field(default_factory=list)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    collage: CollageConfig = field(default_factory=CollageConfig)
    n_tiles: int = 8
    report: bool = True
    report_dir: Optional[str] = None


@dataclass
class TrainStageConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class SummarizeConfig(RunConfig):
    out: Optional[str] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in {
        "extract_schema": ExtractConfig,
        "layers_schema": LayersConfig,
        "info_schema": InfoConfig,
        "decompose_schema": DecomposeConfig,
        "pair_schema": PairConfig,
        "summarize_schema": SummarizeConfig,
        "train_schema": TrainStageConfig,
    }.items():
        cs.store(name=name, node=node)


# ------------------------------------------------------------------------------------------
# No silent no-ops: a setting the chosen option does not read is an error
# ------------------------------------------------------------------------------------------

# Dataset keys only a class-per-folder tree reads, and keys only the synthetic images read.
_FOLDER_KEYS = ("root", "evaluation_root", "classes", "first_classes")
_SYNTHETIC_KEYS = ("n_classes", "image_size", "synthetic_seed", "class_cues")


def unused_options(cfg) -> list[tuple[str, str]]:
    """(setting, why the chosen option ignores it) for every setting of ``cfg`` that would change
    nothing: values given for keys the chosen dataset, decomposition, regression or patching does not
    read. Keys left at their schema default are not counted (nothing was asked)."""
    found: list[tuple[str, str]] = []
    datasets = [("dataset", cfg.get("dataset"))]
    for model_key in ("model", "model1", "model2"):
        model = cfg.get(model_key)
        if model is not None and model.get("train") is not None and model.train.enabled:
            datasets.append((f"{model_key}.train.dataset", model.train.dataset))
    for prefix, dataset in datasets:
        if dataset is not None:
            found += _unused_dataset_options(prefix, dataset)
    decomposition = cfg.get("decomposition")
    if decomposition is not None and decomposition.method != "nmf" and decomposition.signed != DecompositionConfig.signed:
        found.append(("decomposition.signed", f"only decomposition=nmf treats signed activations; "
                                              f"{decomposition.method} takes them as they are"))
    regression = cfg.get("regression")
    if regression is not None and regression.method == "linear" and regression.alpha != RegressionConfig.alpha:
        found.append(("regression.alpha", "regression=linear has no penalty"))
    patch = cfg.get("patch")
    if patch is not None and patch.size is None and patch.stride != PatchConfig.stride:
        found.append(("patch.stride", "whole images (patch.size=null) have no patch grid"))
    return found


def _unused_dataset_options(prefix: str, dataset) -> list[tuple[str, str]]:
    found = []
    if dataset.get("_target_"):
        for key in ("root", "classes", "first_classes"):
            if dataset.get(key) is not None:
                found.append((f"{prefix}.{key}", f"{prefix}._target_ builds the images from {prefix}.kwargs alone"))
    elif dataset.name == "synthetic":
        for key in _FOLDER_KEYS:
            if dataset.get(key) is not None:
                found.append((f"{prefix}.{key}", f"{prefix}=synthetic makes its own images and classes"))
    else:
        defaults = DatasetConfig()
        for key in _SYNTHETIC_KEYS:
            if dataset.get(key) is not None and list_or_value(dataset.get(key)) != list_or_value(getattr(defaults, key)):
                found.append((f"{prefix}.{key}", f"only synthetic images read it, and {prefix}.name={dataset.name}"))
    if dataset.get("classes") is not None and dataset.get("first_classes") is not None and not dataset.get("_target_"):
        found.append((f"{prefix}.first_classes", f"{prefix}.classes already lists the classes"))
    return found


def list_or_value(value):
    """A config value comparable with a dataclass default (ListConfig -> list)."""
    return list(value) if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") else value


def check_unused_options(cfg) -> None:
    """Refuse settings the chosen options ignore, naming each one (``unused_options``)."""
    from rsvc_cli.errors import RsvcError

    found = unused_options(cfg)
    if found:
        described = "; ".join(f"{key}={_shown(cfg, key)} ({why})" for key, why in found)
        keys = ", ".join(key for key, _ in found)
        raise RsvcError(f"Setting(s) that the chosen options do not use, so they would change nothing: {described}.",
                        f"Remove {keys}, or choose the option that reads them (e.g. dataset=imagefolder for a "
                        "folder of images, decomposition=nmf for decomposition.signed).")


def _shown(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = value.get(part)
    return list_or_value(value)

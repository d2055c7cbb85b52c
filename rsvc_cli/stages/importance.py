"""rsvc importance: which concepts the model uses (method steps 6 and 7).

Importance: integrated gradients in concept space. For the evaluation patches of a class, the
layer's output is taken apart position by position (every spatial position of a feature map,
every token of a ViT block, the single vector of a pooled layer), each position's coefficients
are the exact NNLS solution against the stored concept basis, the output is rebuilt as U W and
run through the rest of the network; the attribution of a concept is summed over positions,
averaged over patches and normalized by the class's largest absolute value.

Replacement test: concept j's coefficients move from the true value towards the other model's
prediction (mix 0.5), the same shift at every position, used as it is even where that makes a
coefficient negative (clamping at 0 would cut short exactly the under-predictions the test is
about); KL(original || replaced), top-1 agreement and the change of the class probability, each
minus the same figure when the prediction comes from the model's own activations (the self baseline).

Both attribute, for each class, the model output that stands for it (`target_outputs`: the map
dataset.group_by=predicted reads predictions with), never the class's position among the
compared classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import open_artifact, write_array
from rsvc_cli.store.keys import stage_content
from rsvc_cli.stages.common import class_outputs, produce, resolve_device, store_dir, to_plain
from rsvc_cli.stages.decompose import read_concepts
from rsvc_cli.stages.regress import prepare_pair, read_regression, regress, regression_content, regression_params
from rsvc_cli.stages.score import CROSS, SELF, score, scores_content

FIGURES = ("kl", "top1_agreement", "target_prob_change")
# Which evaluation patches go through the network when a class has more than max_patches_per_class.
PATCH_SAMPLE_SEED = 0


def run(cfg) -> dict:
    pair = prepare_pair(cfg)
    result = score(pair, cfg, regress(pair, cfg))
    out = importance(pair, cfg, result)
    _print(out)
    return out


def importance_content(pair, cfg, owner: int) -> dict:
    reg_content = regression_content(pair, regression_params(cfg), str(cfg.dataset.group_by))
    params = to_plain(cfg.importance)
    params.pop("enabled", None)
    return stage_content("importance", scores=scores_content(reg_content, str(cfg.regression.evaluation)),
                         owner=owner, importance=params)


def importance(pair, cfg, result: dict) -> dict:
    """{(class, "model1"|"model2", k): {importance, replacement figures, target_output}} for both models."""
    out = {}
    for owner in (1, 2):
        content = importance_content(pair, cfg, owner)
        model = pair.model1 if owner == 1 else pair.model2
        layer = pair.layer1 if owner == 1 else pair.layer2
        path = produce(store_dir(cfg), "importance", f"{model.label}-{layer}-model{owner}", content,
                       lambda f, o=owner: _write(f, pair, cfg, result, o),
                       seeds={"importance.patch_sample_seed": PATCH_SAMPLE_SEED})
        with open_artifact(path, "importance", content) as f:
            for name, g in f["classes"].items():
                for k in range(g["importance"].shape[0]):
                    out[(name, f"model{owner}", k)] = {key: float(g[key][k]) for key in g if g[key].ndim == 1}
                    out[(name, f"model{owner}", k)]["target_output"] = int(g.attrs["target_output"])
    return out


def target_outputs(model, images) -> dict[str, int]:
    """The model output whose score importance and the replacement test follow, per compared class.

    `common.class_outputs` names the outputs (model.output_classes, the training classes of weights
    rsvc trained, the sorted class folders of dataset.root). Images with no class folders (synthetic
    ones) mean nothing to a model that no list of names describes; class c is then output c, said
    on the console, as a smoke check and not a measurement.
    """
    names = list(images.class_names)
    if model.output_classes is None and model.training_dataset is None and not hasattr(images.source, "folder_names"):
        console.say(f"importance: {model.label}'s outputs are named by no class list and the images have no class "
                    f"folders; class i of {len(names)} is read as output i (set model.output_classes to name them).")
        return {name: i for i, name in enumerate(names)}
    outputs = class_outputs(model, images, reader="importance and the replacement test read",
                            instead="turn them off with importance.enabled=false")
    missing = [name for name, output in zip(names, outputs) if output < 0]
    if missing:
        raise RsvcError(f"{model.label} has no output for class {', '.join(missing)}, so importance and the "
                        "replacement test have no class score to follow there.",
                        "Set model.output_classes to the model's class names in output order, compare only classes "
                        "the model has (dataset.classes=[...]), or turn them off with importance.enabled=false.")
    return {name: int(output) for name, output in zip(names, outputs)}


def table_columns(importance_result: dict | None) -> dict:
    if not importance_result:
        return {}
    return {key: {"importance": v["importance"], **{f"replacement_{f}": v.get(f"relative_{f}") for f in FIGURES}}
            for key, v in importance_result.items()}


def _write(f, pair, cfg, result: dict, owner: int) -> None:
    from rsvc_cli.algorithms.attribution import concept_importance, integrated_gradients, relative_to_baseline, replacement_test_all
    from rsvc_cli.algorithms.nnls import nnls
    from rsvc_cli.models.hooks import is_channels_last
    from rsvc_cli.models.intervention import capture_layer_output, find_layer, make_concept_head, to_positions
    from rsvc_cli.stages.common import patch_dataset, patch_geometry

    device = resolve_device(cfg.device)
    model = pair.model1 if owner == 1 else pair.model2
    layer = pair.layer1 if owner == 1 else pair.layer2
    concepts = read_concepts(*(pair.concepts1 if owner == 1 else pair.concepts2))
    reg = read_regression(result["regression_path"], regression_content(pair, regression_params(cfg), str(cfg.dataset.group_by)))
    geometry = patch_geometry(cfg.patch, model.input_size)
    dataset = patch_dataset(model, pair.images, geometry)
    per_image = dataset.n_patches
    module = model.module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    steps, mix = int(cfg.importance.steps), float(cfg.importance.replacement_mix)
    rng = np.random.default_rng(PATCH_SAMPLE_SEED)
    output_of = target_outputs(model, pair.images)
    bar = console.progress(len(reg.classes), f"importance model{owner}", unit="class")
    for name in reg.class_names:
        if name not in reg.classes:
            continue
        entry = reg.classes[name]
        rows = entry["evaluation_rows"]
        keep = np.arange(len(rows))
        if len(keep) > int(cfg.importance.max_patches_per_class):
            keep = np.sort(rng.choice(len(rows), int(cfg.importance.max_patches_per_class), replace=False))
        rows = rows[keep]
        inputs = torch.stack([dataset[int(r // per_image)][0][int(r % per_image)] for r in rows]).to(device)
        basis = torch.from_numpy(concepts.basis_of(name)).to(device, torch.float64)
        signed = concepts.signed if concepts.method == "nmf" else "none"
        d = basis.shape[1] // 2 if signed == "split" else basis.shape[1]
        # The basis that rebuilds the layer: with split activations [relu(x), relu(-x)], x = pos - neg.
        rebuild_basis = basis[:, :d] - basis[:, d:] if signed == "split" else basis
        with torch.no_grad():
            output = capture_layer_output(module, layer, inputs)
        layout = is_channels_last(module, find_layer(module, layer)) if output.ndim == 4 else None
        positions, restore = to_positions(output, n_features=d, channels_last=layout)
        positions = positions.double()
        if signed == "split":
            positions_for_nnls = torch.cat([positions.clamp_min(0), (-positions).clamp_min(0)], dim=-1)
        elif signed == "clamp":
            positions_for_nnls = positions.clamp_min(0)
        else:
            positions_for_nnls = positions
        if concepts.method not in ("nmf", "semi_nmf"):
            raise RsvcError(f"Importance needs non-negative concept coefficients; decomposition.method={concepts.method} has none.",
                            "Use decomposition=nmf or decomposition=semi_nmf, or importance.enabled=false.")
        U = nnls(positions_for_nnls, basis)
        residual = positions - U @ rebuild_basis if cfg.importance.residual else None
        head = make_concept_head(module, layer, inputs, rebuild_basis, restore, residual=residual)
        target = torch.full((len(rows),), output_of[name], dtype=torch.long, device=device)
        g = f.create_group(f"classes/{name}")
        g.attrs["target_output"] = output_of[name]
        attributions, gap = integrated_gradients(head, U, target, steps=steps, return_delta=True)
        write_array(g, "importance", concept_importance(attributions).cpu().numpy(), "concept")
        write_array(g, "mean_attribution", attributions.mean(0).cpu().numpy(), "concept")
        g.attrs["completeness_gap_max"] = float(gap.abs().max())
        g.attrs["n_patches"] = len(rows)
        true = torch.from_numpy(entry[f"coefficients{owner}_evaluation"][keep]).to(device, torch.float64)
        figures = {}
        for which, direction in (("cross", CROSS[owner]), ("self", SELF[owner])):
            predicted = torch.from_numpy(entry[direction]["evaluation_prediction"][keep]).to(device, torch.float64)
            shifted = U + (predicted - true)[:, None, :]
            figures[which] = replacement_test_all(head, U, shifted, target, concept_basis=rebuild_basis, mix=mix)
        relative = relative_to_baseline(figures["cross"], figures["self"])
        for fig in FIGURES:
            write_array(g, f"cross_{fig}", figures["cross"][fig].cpu().numpy(), "concept")
            write_array(g, f"self_{fig}", figures["self"][fig].cpu().numpy(), "concept")
            write_array(g, f"relative_{fig}", relative[fig].cpu().numpy(), "concept")
        bar.update(1)
    bar.close()


def _print(out: dict) -> None:
    rows = sorted(out.items(), key=lambda kv: -abs(kv[1]["importance"]) if np.isfinite(kv[1]["importance"]) else 0)
    console.table("concept importance (integrated gradients) and replacement test (relative to self baseline)",
                  ["class", "concept of", "k", "importance", "ΔKL", "Δtop-1 agree", "Δp(class)"],
                  [(c, o, k, v["importance"], v.get("relative_kl"), v.get("relative_top1_agreement"),
                    v.get("relative_target_prob_change")) for (c, o, k), v in rows[:20]])

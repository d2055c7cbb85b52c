"""rsvc train: train or fine-tune a classifier, for the planted-concept experiments.

The model's starting weights (`model.checkpoint`, or the architecture's initialization seeded by
`model.train.seed`) are trained on `model.train.dataset` (with its planting, if any) with SGD
and a cosine schedule. The result is a checkpoint file in `<store>/checkpoints/`, keyed by
everything that determines it, written atomically; a rerun with the same settings reuses it.
Any stage that loads a model with `model.train.enabled=true` calls this first, so
`rsvc compare experiment=planted_synthetic` trains both models once and then compares them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.keys import artifact_path, canonical_json, content_key, stage_content
from rsvc_cli.store.lock import artifact_lock


def run(cfg) -> Path:
    path, _ = ensure_trained(cfg.model, cfg)
    console.say(f"checkpoint: {path}  (use it with model.checkpoint={path})")
    return path


def train_content(model_cfg, base_identity: dict, data_identity: dict) -> dict:
    from rsvc_cli.stages.common import to_plain

    t = to_plain(model_cfg.train)
    params = {k: t[k] for k in ("epochs", "lr", "momentum", "weight_decay", "batch_size", "seed", "augment")}
    return stage_content("checkpoint", base_model=base_identity, train=params, data=data_identity)


def ensure_trained(model_cfg, run_cfg) -> tuple[Path, dict]:
    """The trained checkpoint for `model_cfg` (training it now if the store lacks it)."""
    from rsvc_cli.stages.common import load_image_sets, load_untrained_model, store_dir

    if model_cfg.train.dataset.get("evaluation_root"):
        # Training uses every drawn image, so a held-out split there would be trained on.
        raise RsvcError("model.train.dataset.evaluation_root is set, but training uses every image it draws, so the "
                        "held-out split would be trained on.",
                        "Drop model.train.dataset.evaluation_root; set the comparison's dataset.evaluation_root "
                        "instead.")
    base = load_untrained_model(model_cfg, init_seed=int(model_cfg.train.seed))
    images = load_image_sets(model_cfg.train.dataset)
    content = train_content(model_cfg, base.identity, images.identity)
    path = artifact_path(store_dir(run_cfg), "checkpoints", base.label, content).with_suffix(".pt")
    if path.exists():
        console.reused("checkpoint", path)
        return path, content
    with artifact_lock(path, on_wait=lambda h: console.say(f"waiting for another rsvc job training {path.name}")):
        if path.exists():
            console.reused("checkpoint", path)
            return path, content
        state = _train(base, images, model_cfg.train, run_cfg)
        tmp = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state, "rsvc": {"key": content_key(content), "config": canonical_json(content)}}, tmp)
        os.replace(tmp, path)
    console.wrote("checkpoint", path)
    return path, content


def load_inputs(model, source, image_index, planting=None, desc: str | None = None) -> torch.Tensor:
    """Whole images as `model` sees them: resized, centre-cropped, square painted (if planted), normalized.

    (n, 3, S, S) float32. The same pixels as `PatchDataset` with whole images, built without the
    patch machinery (a whole-image "patch" is a copy), so training and the planted checks share it.
    """
    from rsvc_cli.data.patches import resize_and_crop
    from rsvc_cli.data.planting import planting_keys

    image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    size = int(model.input_size)
    pixels = np.empty((len(image_index), size, size, 3), dtype=np.uint8)
    if planting is not None:
        probability = planting.probabilities(source.class_names)[np.asarray(source.labels)[image_index]]
        keys = planting_keys(source, image_index)
    bar = console.progress(len(image_index), desc, unit="img") if desc else None
    # One decode per image file: there is nothing to batch before the pixels exist.
    for row, index in enumerate(image_index):
        image = np.asarray(resize_and_crop(source.load_image(int(index)).convert("RGB"), size,
                                           model.interpolation, model.resize_size))
        if planting is not None:
            image, _ = planting.plant(image, keys[row], float(probability[row]))
        pixels[row] = image
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    inputs = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (inputs - mean) / std


def _load_training_tensors(base, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training image once, resized, planted and normalized, in memory (small datasets)."""
    inputs = load_inputs(base, images.source, images.image_index, images.planting, desc="load training images")
    return inputs, torch.from_numpy(np.asarray(images.label, dtype=np.int64))


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after 1/8-size zero padding, and horizontal flips (the standard CIFAR recipe)."""
    n, _, s, _ = batch.shape
    pad = max(1, s // 8)
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(s)[None, :])  # (n, s)
    cols = (dx[:, None] + torch.arange(s)[None, :])
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(batch.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _train(base, images, train_cfg, run_cfg) -> dict:
    from rsvc_cli.stages.common import resolve_device

    device = resolve_device(run_cfg.device)
    inputs, labels = _load_training_tensors(base, images)
    if len(inputs) == 0:
        raise RsvcError("The training dataset selected no images.", "Check model.train.dataset (root, classes, images_per_class).")
    module = base.module.to(device)
    generator = torch.Generator().manual_seed(int(train_cfg.seed))
    optimizer = torch.optim.SGD(module.parameters(), lr=float(train_cfg.lr), momentum=float(train_cfg.momentum),
                                weight_decay=float(train_cfg.weight_decay), nesterov=False)
    batch = int(train_cfg.batch_size)
    steps_per_epoch = (len(inputs) + batch - 1) // batch
    total = int(train_cfg.epochs) * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * step / max(total, 1))))
    bar = console.progress(total, f"train {base.label}", unit="step")
    module.train()
    for epoch in range(int(train_cfg.epochs)):
        order = torch.randperm(len(inputs), generator=generator)
        correct = seen = 0
        for start in range(0, len(inputs), batch):
            idx = order[start:start + batch]
            x = inputs[idx]
            if train_cfg.augment:
                x = _augment(x, generator)
            x, y = x.to(device), labels[idx].to(device)
            logits = module(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", acc=f"{correct / max(seen, 1):.3f}")
    bar.close()
    module.eval()
    console.say(f"trained {base.label}: {train_cfg.epochs} epochs, last-epoch training accuracy {correct / max(seen, 1):.3f}")
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}

"""rsvc extract: activations of one model on the patches of the image sets.

One forward pass per batch of patches records every requested layer and stops after the deepest
one (the model's predictions on whole images, which only dataset.group_by=predicted needs, are an
artifact of their own: `common.predicted_classes_for`); each layer is its own artifact
(`activations/<model>-<layer>-<key>.h5`) so that layers are shared between comparisons. Layers
that are already complete are skipped; the others are written together, resumably: the partial
files record how many images are done, and a rerun continues from there.

The forward passes run in the precision `precision` gives the model on this device (`models.precision`:
bf16 autocast with channels-last weights, or float32); the vectors are stored in float32 (or
storage_dtype) either way, and the precision used is part of their key.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from rsvc_cli import console
from rsvc_cli.errors import RsvcError
from rsvc_cli.store.artifact import ArtifactWriter, is_complete, write_array
from rsvc_cli.store.lock import artifact_lock, clear_if_stale, touch
from rsvc_cli.stages.common import (
    ImageSets,
    ModelHandle,
    activations_content,
    activations_path,
    load_image_sets,
    load_model,
    patch_dataset,
    patch_geometry,
    resolve_device,
    store_dir,
)

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def run(cfg) -> dict[str, Path]:
    model = load_model(cfg.model, cfg)
    images = load_image_sets(cfg.dataset)
    return extract_layers(model, images, cfg.patch, list(cfg.layers), cfg)


def extract_layers(model: ModelHandle, images: ImageSets, patch_cfg, layers: list[str], run_cfg) -> dict[str, Path]:
    """Make sure an activations artifact exists for every layer; return their paths."""
    from rsvc_cli.models.hooks import resolve_layer_names

    if run_cfg.storage_dtype not in STORAGE_DTYPES:
        raise RsvcError(f"storage_dtype={run_cfg.storage_dtype} is not an option.", "Use storage_dtype=float32 or float16.")
    layers = resolve_layer_names(model.module, list(dict.fromkeys(layers)))
    geometry = patch_geometry(patch_cfg, model.input_size)
    store = store_dir(run_cfg)
    contents = {layer: activations_content(model, images, geometry, layer, run_cfg) for layer in layers}
    paths = {layer: activations_path(store, model, contents[layer]) for layer in layers}

    todo = [layer for layer in layers if not is_complete(paths[layer], "activations", contents[layer])]
    for layer in layers:
        if layer not in todo:
            clear_if_stale(paths[layer])
            console.reused("activations", paths[layer])
    if not todo:
        return paths
    # One forward pass of two blank images: a layer whose output is not understood is refused before any
    # image is read (layers already extracted were checked when they were).
    resolve_layer_names(model.module, todo, input_size=model.input_size)

    # One writer per artifact: take the locks in a fixed order (no deadlock between jobs asking for
    # overlapping layer sets), then look again, since a job we waited for may have written them.
    with contextlib.ExitStack() as locks:
        for layer in sorted(todo, key=lambda name: str(paths[name])):
            locks.enter_context(artifact_lock(paths[layer], on_wait=lambda holder, p=paths[layer]: console.say(
                f"waiting for another rsvc job writing {p.name} ({(holder or {}).get('host', '?')}:{(holder or {}).get('pid', '?')})")))
        todo = [layer for layer in todo if not is_complete(paths[layer], "activations", contents[layer])]
        if todo:
            _extract(model, images, geometry, todo, {l: paths[l] for l in todo}, {l: contents[l] for l in todo}, run_cfg)
    return paths


def _extract(model: ModelHandle, images: ImageSets, geometry, layers, paths, contents, run_cfg) -> None:
    from rsvc_cli.models.hooks import LayerRecorder
    from rsvc_cli.models.precision import describe_precision, forward_precision

    device = resolve_device(run_cfg.device)
    dtype = STORAGE_DTYPES[run_cfg.storage_dtype]
    dataset = patch_dataset(model, images, geometry)
    n_images = len(images.image_index)
    patches_per_image = dataset.n_patches
    n_patches = n_images * patches_per_image
    module = model.module.to(device).eval()
    seeds = {"dataset.seed": images.identity["seed"]}
    if hasattr(images.source, "check"):  # image files: every unusable one listed before anything is written
        images.source.check(images.image_index, min_side=geometry[0])
    precision = next(iter(contents.values()))["precision"]

    with contextlib.ExitStack() as stack:
        writers = {l: stack.enter_context(ArtifactWriter(paths[l], "activations", contents[l], seeds=seeds, resume=True))
                   for l in layers}
        # Resume from the least advanced partial; rows past it are simply rewritten.
        n_done = min(int(w.file.attrs.get("n_done_images", 0)) if w.resumed else 0 for w in writers.values())
        if n_done:
            console.say(f"resuming extraction at image {n_done}/{n_images}")
        recorder = LayerRecorder(module, layers, token_reduce=model.token_reduce)
        datasets = None
        if n_done:
            datasets = {l: writers[l].file["activations"] for l in layers}
        loader = torch.utils.data.DataLoader(_Batches(dataset, n_done, int(run_cfg.batch_size)), batch_size=None,
                                             shuffle=False, num_workers=int(run_cfg.num_workers))
        for l in layers:
            writers[l].file.attrs["precision"] = describe_precision(precision, device)
        bar = console.progress(n_patches, f"extract {model.label} [{', '.join(layers)}]", unit="patch",
                               initial=n_done * patches_per_image)
        start = n_done
        try:
            # Layout changes outside inference mode: weights made inside it could not take part in the
            # gradients of a later importance pass.
            with forward_precision(module, precision, device), torch.inference_mode(), recorder:
                for inputs, b, _, boxes, squares in _prefetched(loader):
                    inputs = inputs.to(device, non_blocking=True)
                    # Nothing past the deepest requested layer is needed.
                    _, vectors = recorder(inputs, stop_early=True)
                    if datasets is None:
                        datasets = {l: _create_layout(writers[l].file, images, dataset, vectors[l].shape[-1], dtype)
                                    for l in layers}
                    rows = slice(start * patches_per_image, (start + b) * patches_per_image)
                    for l in layers:
                        f = writers[l].file
                        datasets[l][rows] = vectors[l].float().cpu().numpy().astype(dtype)
                        f["patch_box"][rows] = boxes.numpy().reshape(-1, 4)
                        f["images/square_box"][start:start + b] = squares.numpy()
                        f.attrs["n_done_images"] = start + b
                        f.flush()
                        touch(paths[l])
                    start += b
                    bar.update(b * patches_per_image)
        finally:
            bar.close()
        if n_images == 0:
            raise RsvcError("No images were selected, so there is nothing to extract.",
                            "Check dataset.classes and dataset.images_per_class.")
        for l in layers:
            f = writers[l].file
            _finish_layout(f, images, patches_per_image)
            console.wrote("activations", writers[l].commit())


def _prefetched(loader):
    """The loader's batches, the next one made in a background thread while the caller uses this one.

    Made in this process (num_workers=0), a batch (image decoding, planting, crop and resize) would
    otherwise wait for the forward pass and the forward pass for it; a forward pass leaves part of
    the cores idle (about 0.3 of 2 here) and both release the GIL, so they overlap. Worker processes
    (num_workers > 0) prefetch already.
    """
    if loader.num_workers > 0:
        yield from loader
        return
    batches = iter(loader)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsvc-batches") as pool:
        upcoming = pool.submit(next, batches, None)
        try:
            while (batch := upcoming.result()) is not None:
                upcoming = pool.submit(next, batches, None)
                yield batch
        finally:
            upcoming.cancel()


class _Batches(torch.utils.data.Dataset):
    """The extraction's input batches from image `first` on: item j is `PatchDataset.batch` of images
    first + j * batch_size onward, every image's patches, made in one call (per-image tensor calls
    cost as much as a small model's forward pass). Whole batches are items, so DataLoader workers
    (num_workers) make whole batches too."""

    def __init__(self, dataset, first: int, batch_size: int):
        self.dataset, self.first, self.batch_size = dataset, first, max(1, batch_size)

    def __len__(self) -> int:
        return -(-(len(self.dataset) - self.first) // self.batch_size)

    def __getitem__(self, j: int):
        start = self.first + j * self.batch_size
        return self.dataset.batch(range(start, min(start + self.batch_size, len(self.dataset))))


def _create_layout(f, images: ImageSets, dataset, n_features: int, dtype) -> "h5py.Dataset":
    n_images = len(images.image_index)
    p = dataset.n_patches
    n = n_images * p
    rows_per_chunk = max(1, min(n, (1 << 20) // max(1, n_features * np.dtype(dtype).itemsize)))
    acts = f.create_dataset("activations", shape=(n, n_features), dtype=dtype, chunks=(rows_per_chunk, n_features))
    acts.attrs["dims"] = "patch,feature"
    f.create_dataset("patch_box", shape=(n, 4), dtype=np.float32).attrs["dims"] = "patch,xyxy (original pixels)"
    grp = f.create_group("images")
    write_array(grp, "index", images.image_index, "image")
    write_array(grp, "label", images.label, "image")
    write_array(grp, "image_set", images.image_set, "image")
    # Files of a folder tree absolute, so that anyone reading the artifact finds them from any folder
    # (synthetic images are ids, not files).
    on_disk = getattr(images.source, "root", None) is not None
    paths = [os.path.abspath(p) if on_disk else p for p in (str(images.source.paths[int(i)]) for i in images.image_index)]
    write_array(grp, "path", np.array(paths, dtype=object).astype(str), "image")
    grp.create_dataset("square_box", shape=(n_images, 4), dtype=np.float32).attrs["dims"] = "image,xyxy (NaN: none)"
    write_array(f, "class_names", np.array(images.class_names, dtype=str), "class")
    f.attrs["patches_per_image"] = p
    return acts


def _finish_layout(f, images: ImageSets, patches_per_image: int) -> None:
    """Per-patch copies of the per-image columns, so readers index patches directly."""
    per_patch = lambda values: np.repeat(np.asarray(values), patches_per_image, axis=0)  # noqa: E731
    write_array(f, "image_row", per_patch(np.arange(len(images.image_index))), "patch")
    write_array(f, "image_index", per_patch(images.image_index), "patch")
    write_array(f, "label", per_patch(images.label), "patch")
    write_array(f, "image_set", per_patch(images.image_set), "patch")

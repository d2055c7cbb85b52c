"""Artifact keys: the configuration that determines an artifact's numbers, hashed.

An artifact's path is ``<store>/<kind>/<prefix>-<key16>.h5`` where ``key16`` is the first 16 hex
digits of SHA-256 over the sorted-key JSON of its *content config*: everything that changes the
numbers (model identity and checkpoint digest, image selection, patching, layer, method
parameters, upstream keys) and nothing that does not (device, batch size, workers, absolute
paths). Two runs that would compute the same numbers share one file; any change makes a new one.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

KINDS = ("activations", "predictions", "concepts", "regression", "scores", "importance", "checkpoints")

# Revision of the code that computes each kind's numbers, written into every content config (which
# nest, so downstream keys change too). Bump one when a change alters what its stage computes (another
# solver, a fixed bug): artifacts of earlier code are then recomputed beside the old files instead of
# being reused as if this code had made them. Settings need no bump; they are in the content already.
REVISIONS = {
    "activations": 3,  # 2: layers of channels-last (NHWC) models averaged over their own spatial axes;
    # 3: the model's evaluation transform (resize by crop_pct, its interpolation, also for patches)
    "predictions": 2,  # 2: whole images through the model's evaluation transform
    "concepts": 2,  # 2: NMF solver=cd (scikit-learn's iterates) by default; n_iter and converged per class
    "regression": 2,  # 2: float32 products for float32 activations; exact constants per training fold
    "scores": 2,  # 2: a constant prediction of a varying concept scores 0 (flagged unpredictable), not NaN
    "importance": 2,  # 2: each class's model output is the target (not its position); replacement mix unclamped
    "checkpoint": 1,
}


def stage_content(kind: str, **fields: Any) -> dict[str, Any]:
    """A stage's content config: its kind, its code revision (``REVISIONS``) and ``fields``."""
    return {"kind": kind, "revision": REVISIONS[kind], **fields}


def canonical_json(content: dict[str, Any]) -> str:
    """JSON with sorted keys and no whitespace: the text that is hashed and stored."""
    return json.dumps(content, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON-serializable in an artifact key: {value!r}")


def seeds_in(content: Any, prefix: str = "") -> dict[str, int]:
    """Every seed named in a content config (keys `seed` or `*_seed`), by dotted path.

    Content configs nest their upstream artifacts' contents, so this is every seed an artifact's
    numbers depend on; writers record it in the `seeds` attribute.
    """
    found: dict[str, int] = {}
    if isinstance(content, dict):
        for key, value in content.items():
            path = f"{prefix}{key}"
            if (key == "seed" or str(key).endswith("_seed")) and isinstance(value, int) and not isinstance(value, bool):
                found[path] = value
            else:
                found.update(seeds_in(value, path + "."))
    return found


def content_key(content: dict[str, Any]) -> str:
    """Full SHA-256 hex digest of a content config."""
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


def safe_name(text: str) -> str:
    """A file-name-safe readable prefix (``resnet50.a1_in1k`` -> ``resnet50.a1_in1k``, ``blocks/5`` -> ``blocks_5``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "artifact"


def artifact_path(store: str | Path, kind: str, prefix: str, content: dict[str, Any]) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    return Path(store) / kind / f"{safe_name(prefix)}-{content_key(content)[:16]}.h5"

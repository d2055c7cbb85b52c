"""One HDF5 file per artifact, written atomically and read only when complete.

Protocol (docs/artifacts.md is the normative version):

- A stage writes ``<name>.h5.partial``: root attributes ``rsvc_format``, ``format_version``,
  ``kind``, ``key`` (full SHA-256 of the content config), ``config`` (that JSON), ``versions``,
  ``seeds`` and ``complete=False``; datasets as it goes (resumable stages record progress in
  attributes such as ``n_done``).
- When everything is written it sets ``complete=True``, closes the file and renames it to
  ``<name>.h5``. A final name therefore always holds a complete artifact; a ``.partial`` is either
  resumed (same key) or discarded.
- Readers check format, version, kind, key and the completion mark and refuse anything else with
  a message that names the fix. HDF5 file locking is turned off (``locking=False``): it fails on
  network file systems; ``store.lock`` provides one writer per artifact instead.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from rsvc_cli.errors import RsvcError
from rsvc_cli.store.keys import canonical_json, content_key, seeds_in

FORMAT = "rsvc-artifact"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def write_text_replacing(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` then rename it into place, so an interrupted run never leaves a half
    file that looks finished. One temporary name per process, so that jobs racing on one comparison
    never rename each other's."""
    partial = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _is_no_space(exc: BaseException | None) -> bool:
    """True when `exc`, or an exception it was raised from, is a full disk."""
    while exc is not None:
        if isinstance(exc, OSError) and (exc.errno in NO_SPACE_ERRNOS or "No space left" in str(exc)):
            return True
        exc = exc.__cause__
    return False


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("rsvc", "torch", "timm", "numpy", "h5py", "scikit-learn"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "absent"
    return versions


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _open_h5(path: Path, mode: str) -> h5py.File:
    return h5py.File(path, mode, locking=False)


def write_array(group: h5py.Group, name: str, array: Any, dims: str, **kwargs) -> h5py.Dataset:
    """Create (or replace) a dataset with its ``dims`` attribute naming the axes."""
    if name in group:
        del group[name]
    data = np.asarray(array)
    if data.dtype.kind == "U":
        data = data.astype(h5py.string_dtype())
    dataset = group.create_dataset(name, data=data, **kwargs)
    dataset.attrs["dims"] = dims
    return dataset


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in dataset[()]]


def _problem_with(f: h5py.File, kind: str, key: str | None) -> tuple[str, str] | None:
    """What is wrong with an open artifact file, as (problem, fix), or None if it is usable."""
    attrs = f.attrs
    if attrs.get("rsvc_format") != FORMAT:
        return ("is an HDF5 file but not an rsvc artifact (no rsvc_format attribute)",
                "Move it out of the store; rsvc only reads files it wrote.")
    version = int(attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        return (f"was written in artifact format {version}, this rsvc reads format {FORMAT_VERSION}",
                "Delete it (or run `rsvc doctor store=... --clean`) so it is recomputed.")
    if attrs.get("kind") != kind:
        return (f"is a '{attrs.get('kind')}' artifact where a '{kind}' artifact was expected",
                "Move it out of the store; its name does not match its content.")
    if key is not None and attrs.get("key") != key:
        return ("was made with other settings than the ones asked for (its key differs)",
                "Delete it so it is recomputed; rsvc never reuses an artifact made with other settings.")
    if not bool(attrs.get("complete", False)):
        return ("is not marked complete (an interrupted write that was renamed by hand?)",
                "Delete it so it is recomputed.")
    return None


def check_artifact(path: Path, kind: str, content: dict | None = None) -> tuple[str, str] | None:
    """(problem, fix) when ``path`` is not a usable artifact of ``kind``, else None."""
    key = content_key(content) if content is not None else None
    try:
        with _open_h5(path, "r") as f:
            return _problem_with(f, kind, key)
    except OSError:
        return ("cannot be read as HDF5 (truncated or foreign file)",
                "Delete it so it is recomputed.")


def is_complete(path: Path, kind: str, content: dict) -> bool:
    """True when ``path`` exists and is a complete artifact for exactly ``content``.

    A file that exists but is unusable raises: rsvc never overwrites something it did not
    write, and never silently reuses one made with other settings.
    """
    if not path.exists():
        return False
    problem = check_artifact(path, kind, content)
    if problem is None:
        return True
    raise RsvcError(f"The artifact {path} {problem[0]}.", problem[1])


@contextmanager
def open_artifact(path: Path, kind: str, content: dict | None = None) -> Iterator[h5py.File]:
    """Open a complete artifact for reading, refusing anything else with a clear message."""
    path = Path(path)
    if not path.exists():
        raise RsvcError(f"The {kind} artifact {path} does not exist.",
                        "Run the stage that makes it first (or `rsvc compare`, which runs every stage).")
    problem = check_artifact(path, kind, content)
    if problem is not None:
        raise RsvcError(f"The artifact {path} {problem[0]}.", problem[1])
    f = _open_h5(path, "r")
    try:
        yield f
    finally:
        f.close()


def read_attrs(f: h5py.File) -> dict[str, Any]:
    out = {}
    for name, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and name in ("config", "versions", "seeds"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[name] = value.item() if isinstance(value, np.generic) else value
    return out


class ArtifactWriter:
    """Write one artifact: ``.partial`` first, ``commit()`` marks it complete and renames it.

    ``resume=True`` reopens an existing ``.partial`` with the same key so a resumable stage can
    continue (``self.resumed`` tells); a partial with another key, or one HDF5 cannot open
    (killed mid-write), is discarded. Used as a context manager: an interruption or crash leaves a
    resumable partial for the next run to resume; a user error (RsvcError) or any failure of a
    non-resumable write removes the partial this run created; a full disk also becomes a clear
    message.
    """

    def __init__(self, path: Path, kind: str, content: dict, seeds: dict | None = None,
                 resume: bool = False):
        self.path = Path(path)
        self.kind = kind
        self.content = content
        # The seeds named in the content (upstream ones included) and any the stage adds.
        self.seeds = {**seeds_in(content), **(seeds or {})}
        self.resume = resume
        self.partial = partial_path(self.path)
        self.key = content_key(content)
        self.file: h5py.File | None = None
        self.resumed = False
        self._created = False

    def __enter__(self) -> "ArtifactWriter":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self._open()
        except OSError as err:
            self._raise_os_error(err)
        return self

    def _open(self) -> h5py.File:
        if self.resume and self.partial.exists():
            try:
                f = _open_h5(self.partial, "a")
                if f.attrs.get("key") == self.key and f.attrs.get("rsvc_format") == FORMAT:
                    self.resumed = True
                    return f
                f.close()
            except OSError:
                pass  # an unreadable partial (killed while HDF5 metadata was in flight): start over
        if self.partial.exists():
            self.partial.unlink()
        self._created = True
        f = _open_h5(self.partial, "w")
        f.attrs["rsvc_format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["kind"] = self.kind
        f.attrs["key"] = self.key
        f.attrs["config"] = canonical_json(self.content)
        f.attrs["versions"] = json.dumps(library_versions(), sort_keys=True)
        f.attrs["seeds"] = json.dumps(self.seeds, sort_keys=True)
        f.attrs["complete"] = False
        return f

    def commit(self) -> Path:
        assert self.file is not None
        try:
            self.file.attrs["complete"] = True
            self.file.flush()
            self.file.close()
            self.file = None
            os.replace(self.partial, self.path)
        except OSError as err:
            self._raise_os_error(err)
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # noqa: BLE001 - closing a file whose write already failed
                pass
            self.file = None
        if (exc is not None and self._created and self.partial.exists()
                and (not self.resume or isinstance(exc, RsvcError))):
            # Nothing resumes a partial of a non-resumable stage, nor one stopped by a user error
            # (its fix changes the key): a failed write leaves the store as it was. An interrupted
            # resumable write keeps its partial for the next run.
            self.partial.unlink()
        if isinstance(exc, OSError):
            self._raise_os_error(exc)
        if _is_no_space(exc) and self._created and self.partial.exists():
            # Several writers in one pass (extract): another one already turned the disk-full
            # OSError into a message, this one still removes its own partial.
            self.partial.unlink()

    def _raise_os_error(self, err: OSError) -> None:
        if err.errno in NO_SPACE_ERRNOS or "No space left" in str(err):
            if self._created and self.partial.exists():
                self.partial.unlink()
            raise RsvcError(
                f"No space left on the device while writing {self.path}; nothing was stored for it "
                "and the artifacts already in the store are untouched.",
                "Free disk space or point store=DIR at a larger disk, then run the same command again.",
            ) from err
        if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise RsvcError(f"Cannot write to the store at {self.path.parent} ({err.strerror}).",
                            "Make the directory writable or choose another one with store=DIR.") from err
        raise err

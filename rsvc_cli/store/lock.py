"""One writer per artifact across processes and machines sharing a store.

An ``O_CREAT | O_EXCL`` lock file ``<artifact>.lock`` holds the writer's host, pid and start
time. Creating a file exclusively is atomic on local disks and on NFS (v3 and later), unlike
HDF5's own ``flock``-based locking, which we turn off. A lock whose process is gone (same host,
dead pid) is stale and broken; a lock from another host is trusted until ``stale_after`` seconds
without its file being touched (writers refresh it while they work).
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

HOST = socket.gethostname()


def lock_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def lock_is_stale(path: Path, stale_after: float = 3600.0) -> bool:
    holder = read_lock(path)
    if holder is None:
        # Unreadable: a writer killed between create and write, or one writing right now.
        try:
            return time.time() - path.stat().st_mtime > 5.0
        except FileNotFoundError:
            return False
    if holder.get("host") == HOST:
        return not _pid_alive(int(holder.get("pid", -1)))
    try:
        return time.time() - path.stat().st_mtime > stale_after
    except FileNotFoundError:
        return False


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"host": HOST, "pid": os.getpid(), "time": time.time()}, f)
    except BaseException:
        # An empty lock (disk full, interrupted) would hold every other job off until it goes stale.
        path.unlink(missing_ok=True)
        raise
    return True


@contextmanager
def artifact_lock(artifact: Path, on_wait: Callable[[dict | None], None] | None = None,
                  poll: float = 0.2, stale_after: float = 3600.0) -> Iterator[None]:
    """Hold the lock of ``artifact``, waiting while another live writer holds it.

    After acquiring, callers must check again whether the artifact became complete meanwhile.
    """
    path = lock_path(Path(artifact))
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while not _try_create(path):
        if lock_is_stale(path, stale_after):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        if on_wait is not None and not told:
            on_wait(read_lock(path))
            told = True
        time.sleep(poll)
    try:
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clear_if_stale(artifact: Path) -> None:
    """Remove the lock of a complete artifact whose writer died between the rename and the unlock:
    nobody will take it again, and it would litter the store forever."""
    path = lock_path(Path(artifact))
    if path.exists() and lock_is_stale(path):
        path.unlink(missing_ok=True)


def touch(artifact: Path) -> None:
    """Refresh the lock's time so other hosts see the writer is alive."""
    try:
        os.utime(lock_path(Path(artifact)))
    except FileNotFoundError:
        pass

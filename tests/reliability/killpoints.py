"""Run the rsvc CLI and SIGKILL it at one exact moment of the artifact protocol.

    python killpoints.py POINT N rsvc-args...

kills the process (no handler, no cleanup, as `kill -9` does) the N-th time it reaches POINT:
- `before-rename`: the partial is complete and closed, about to be renamed to its final name;
- `after-rename`: the final name exists, the lock is still held;
- `empty-lock`: the lock file has been created exclusively, its content not yet written;
- `after-lock`: the lock is taken, nothing written yet.
Random kills seldom land in these windows of a few microseconds; this lands in them every time.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, nth: int) -> None:
    seen = {"n": 0}

    def reached() -> bool:
        seen["n"] += 1
        return seen["n"] == nth

    if point in ("before-rename", "after-rename"):
        replace = os.replace

        def patched_replace(source, target, *args, **kwargs):
            is_artifact = str(source).endswith(".h5.partial")
            if is_artifact and point == "before-rename" and reached():
                _die()
            result = replace(source, target, *args, **kwargs)
            if is_artifact and point == "after-rename" and reached():
                _die()
            return result

        os.replace = patched_replace
    elif point in ("empty-lock", "after-lock"):
        from rsvc_cli.store import lock

        fdopen, try_create = os.fdopen, lock._try_create

        def patched_fdopen(fd, *args, **kwargs):
            if point == "empty-lock" and os.readlink(f"/proc/self/fd/{fd}").endswith(".lock") and reached():
                _die()
            return fdopen(fd, *args, **kwargs)

        def patched_try_create(path):
            created = try_create(path)
            if created and point == "after-lock" and reached():
                _die()
            return created

        os.fdopen = patched_fdopen
        lock._try_create = patched_try_create
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from rsvc_cli.cli import main

    raise SystemExit(main(sys.argv[3:]))

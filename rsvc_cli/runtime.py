"""Process settings that make CPU runs fast: how idle OpenMP threads wait and how memory is reused.

``configure()`` runs first thing in the ``rsvc`` command (and in the benchmark scripts, so they
measure what the command does). It sets environment defaults that processes started later inherit
(launcher workers), and applies the memory settings to the running process as well. A value the
user set in the environment is always kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h) and the environment variables glibc reads for them at start-up.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MALLOC_SETTINGS = {
    # Blocks of any size come from the heap, not from a fresh mmap that is returned on free: a forward
    # pass allocates and frees the same tens of MB per layer and batch, and every fresh mapping is paid
    # again in page faults (on a 2-core VM: a 160 MB batch costs 90 ms to fault in, 15 ms to reuse; a
    # test_vit forward pass 1.43 s -> 0.84 s).
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 1 << 30),
    # Freed memory stays with the process for the next batch instead of going back to the system.
    # The price: a higher plateau of resident memory, still bounded (a test_vit extraction peaked at
    # 965-1085 MiB for 100 to 6000 images, against 895-914 MiB with glibc's defaults).
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 1 << 30),
    # One heap for every thread: the batch-making thread's blocks are reused too (a second thread's
    # own heap is capped at 64 MB, beyond which glibc maps and unmaps every block again).
    "MALLOC_ARENA_MAX": (_M_ARENA_MAX, 1),
}


def configure() -> None:
    """Environment defaults for this process's children and glibc's malloc settings for this one."""
    # Idle OpenMP threads sleep instead of spinning (read when torch loads its OpenMP runtime, so
    # this must come first; inherited by launcher workers). Spinning threads take the cores from the
    # threads with work wherever the CPU is shared or small: 40x slower NMF, 2x slower extraction
    # with 2 threads on a busy 2-core machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    mallopt = _glibc_mallopt()
    for variable, (parameter, value) in _MALLOC_SETTINGS.items():
        if variable in os.environ:
            continue  # glibc applied the user's value at start-up
        os.environ[variable] = str(value)  # for processes started from here on
        if mallopt is not None:
            mallopt(parameter, value)  # for this one, already running


def _glibc_mallopt():
    """glibc's mallopt, or None on other C libraries (macOS, musl) where these settings do not apply."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt

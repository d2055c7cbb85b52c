"""Process settings the rsvc command applies before torch loads (rsvc_cli.runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SHOW_ENVIRONMENT = (
    "import json, os; from rsvc_cli import runtime; runtime.configure(); "
    "print(json.dumps({k: os.environ.get(k) for k in "
    "('OMP_WAIT_POLICY', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_ARENA_MAX')}))"
)


def _configured_environment(**given):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "OMP_WAIT_POLICY"}
    env.update(given)
    out = subprocess.run([sys.executable, "-c", SHOW_ENVIRONMENT], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_configure_sets_defaults_that_workers_inherit():
    env = _configured_environment()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) >= 1 << 26  # large blocks come from the reused heap
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 26
    assert env["MALLOC_ARENA_MAX"] == "1"


def test_configure_keeps_what_the_user_set():
    env = _configured_environment(OMP_WAIT_POLICY="ACTIVE", MALLOC_ARENA_MAX="4", MALLOC_TRIM_THRESHOLD_="0")
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert env["MALLOC_ARENA_MAX"] == "4" and env["MALLOC_TRIM_THRESHOLD_"] == "0"
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) >= 1 << 26

"""`rsvc layers`: every module, marked recordable or not and why (tuple outputs listed, not hidden)."""

from __future__ import annotations

import os
import subprocess

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


@pytest.mark.subprocess
def test_layers_marks_each_module(tmp_path):
    done = subprocess.run(["rsvc", "layers", "model=test_vit"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {}
    for line in done.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 4 and cells[0] and cells[2] in ("yes", "no"):
            rows[cells[0]] = cells
    assert rows["norm"][1:3] == ["batch x 101 x 64", "yes"] and rows["norm"][3] == "token sequence"
    assert rows["blocks.0.attn.q_norm"][1:3] == ["batch x 2 x 101 x 32", "no"]
    assert rows["blocks.0.attn.q_norm"][3].startswith("is no feature map")
    assert rows["blocks.0.attn.attn_drop"][2:] == ["no", "does not run in a forward pass"]
    assert rows["layer3" if "layer3" in rows else "blocks.5"][2] == "yes"

"""Our PNG writer: every file decodes (with Pillow) to exactly the pixels it was given."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rsvc_cli.viz.png import encode_png, write_png


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("RGBA", 4)])
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (13, 5), (96, 64)])
def test_png_round_trips_exactly(mode, channels, size):
    rng = np.random.default_rng(size[0] * 100 + size[1])
    shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[..., :1] = 255  # a flat stretch next to noise: both directions of the modulo-256 "Sub" difference
    image = Image.fromarray(pixels, mode=mode)
    for level in (0, 1, 9):
        decoded = Image.open(io.BytesIO(encode_png(image, level)))
        assert decoded.format == "PNG" and decoded.mode == mode and decoded.size == size
        assert np.array_equal(np.asarray(decoded), pixels)


def test_other_modes_are_written_as_rgb(tmp_path):
    palette = Image.new("P", (6, 4))
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    palette.putpixel((2, 1), 1)
    write_png(palette, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as decoded:
        assert decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), np.asarray(palette.convert("RGB")))

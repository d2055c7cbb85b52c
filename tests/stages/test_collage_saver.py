"""The collage stage's background PNG writer: every image written, errors not lost."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rsvc_cli.stages.collage import _BackgroundSaver


def test_background_saver_writes_every_image_in_full(tmp_path):
    images = [Image.fromarray(np.full((20, 30, 3), value, dtype=np.uint8)) for value in range(50)]
    with _BackgroundSaver(max_pending=4) as saver:
        for index, image in enumerate(images):
            saver.save(image, tmp_path / f"{index}.png")
    for index in range(50):
        with Image.open(tmp_path / f"{index}.png") as written:
            assert written.size == (30, 20) and written.getpixel((0, 0)) == (index, index, index)


def test_background_saver_raises_a_failed_write(tmp_path):
    with pytest.raises(OSError):
        with _BackgroundSaver() as saver:
            saver.save(Image.new("RGB", (4, 4)), tmp_path / "missing-folder" / "a.png")

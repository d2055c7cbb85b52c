"""PNG files written with zlib directly: collages are thousands of small PNGs per sweep.

Rows use PNG's "Sub" filter (each byte minus the same channel of the pixel to its left), one numpy
subtraction for the whole image, then ``zlib.compress``: at level 1, 1.2 ms per collage grid against
3.2 ms for Pillow's encoder, for files about a fifth larger; one comparison's collages 6.3 -> 5.0 s.
Pillow's encoder also holds the GIL while it compresses; zlib releases it."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow mode -> PNG colour type (8 bits per channel).
_COLOUR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
_SUB_FILTER = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: Image.Image, compress_level: int = 1) -> bytes:
    """The PNG file of ``image`` (L, RGB or RGBA; other modes are converted to RGB)."""
    if image.mode not in _COLOUR_TYPES:
        image = image.convert("RGB")
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    flat = pixels.reshape(height, width * channels)
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = _SUB_FILTER
    rows[:, 1:1 + channels] = flat[:, :channels]
    np.subtract(flat[:, channels:], flat[:, :-channels], out=rows[:, 1 + channels:])  # modulo 256
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[image.mode], 0, 0, 0)
    return (_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level))
            + _chunk(b"IEND", b""))


def write_png(image: Image.Image, path: str | Path, compress_level: int = 1) -> None:
    Path(path).write_bytes(encode_png(image, compress_level))

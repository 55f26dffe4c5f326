"""Real image files in the modes people's pictures come in, made with PIL for the reading tests
(data_prep.images): a phone photo stored sideways with its EXIF orientation, 16-bit grey, and a
PNG whose header declares more pixels than PIL's decompression-bomb limit."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def red_over_blue(width: int = 30, height: int = 40) -> np.ndarray:
    """An upright picture, uint8 [height, width, 3]: red top half, blue bottom half (so "top" is
    told from "left" at a glance)."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[: height // 2], pixels[height // 2 :] = RED, BLUE
    return pixels


def save_sideways(path: Path, upright: np.ndarray, fmt: str = "JPEG") -> None:
    """Save `upright` as a camera does: its pixels turned a quarter left, with EXIF orientation 6
    ("turn a quarter right to view"), which viewers apply."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


def save_grey16(path: Path, values: np.ndarray) -> None:
    """Save uint16 [H, W] as a 16-bit greyscale PNG (PIL mode "I;16")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path, format="PNG")


def huge_png(width: int, height: int) -> bytes:
    """A real PNG whose header declares width x height (a decompression bomb's shape): a 1x1 image
    with its IHDR rewritten, CRC included. PIL opens it; decoding it would fail or explode."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # the signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)

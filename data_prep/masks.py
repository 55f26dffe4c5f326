"""A ref's mask: the annotation's segmentation rasterised with pycocotools.

Two ways to combine the polygons of one annotation:
- `union` (default, the right mask): a pixel is in the mask if any polygon covers it.
- `refer`: the refer toolkit sums the polygons' masks and LAVT / MagNet then keep the pixels
  equal to 1, so where two polygons overlap the pixels are dropped. Offered to reproduce
  published numbers.
Crowd annotations carry RLE (compressed string counts or an uncompressed list); both modes
decode it as it is.

A segmentation that cannot give a mask raises UnusableSegmentation with the reason.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

MaskMode = Literal["union", "refer"]
MASK_MODES: tuple[str, ...] = ("union", "refer")


class UnusableSegmentation(ValueError):
    """The segmentation yields no mask; the message says why."""


def _polygons(segmentation: list[Any]) -> list[list[float]]:
    """The usable polygons: flat x,y lists of at least 3 finite points. Degenerate parts of a
    multi-part annotation are left out; with none left the annotation is unusable."""
    usable = []
    for poly in segmentation:
        if not isinstance(poly, list | tuple) or len(poly) < 6 or len(poly) % 2:
            continue
        try:
            coords = [float(v) for v in poly]
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(v) for v in coords):
            usable.append(coords)
    if not usable:
        raise UnusableSegmentation("no polygon with at least 3 finite points")
    return usable


def _rle(segmentation: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    size = segmentation.get("size")
    counts = segmentation.get("counts")
    if size is None or counts is None:
        raise UnusableSegmentation("RLE without 'size' or 'counts'")
    if [int(s) for s in size] != [height, width]:
        raise UnusableSegmentation(f"RLE size {list(size)} differs from the image's {[height, width]}")
    if isinstance(counts, list):
        if sum(int(c) for c in counts) != height * width:
            raise UnusableSegmentation("uncompressed RLE counts do not add up to height*width")
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(counts, str | bytes):
        return {
            "size": [height, width],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    raise UnusableSegmentation(f"RLE counts of type {type(counts).__name__}")


def rasterize(segmentation: Any, height: int, width: int, mode: MaskMode = "union") -> np.ndarray:
    """The mask [height, width] uint8 in {0, 1} of one annotation's segmentation.

    Args:
        segmentation: polygons (list of flat x,y lists) or an RLE dict, as in COCO.
        height, width: the image's size from instances.json.
        mode: `union` or `refer` (sum then keep ones), see the module docstring.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}: expected one of {', '.join(MASK_MODES)}")
    if isinstance(segmentation, dict):
        try:
            mask = mask_utils.decode(_rle(segmentation, height, width))
        except (ValueError, TypeError) as err:
            raise UnusableSegmentation(f"RLE does not decode ({err})") from None
    elif isinstance(segmentation, list) and segmentation:
        rles = mask_utils.frPyObjects(_polygons(segmentation), height, width)
        if mode == "union":
            mask = mask_utils.decode(mask_utils.merge(rles))
        else:
            summed = mask_utils.decode(rles).sum(axis=2)  # [H, W, n_polygons] -> [H, W]
            mask = (summed == 1).astype(np.uint8)
    else:
        raise UnusableSegmentation("empty or missing segmentation")
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if not mask.any():
        raise UnusableSegmentation("the mask is empty (segmentation outside the image?)")
    return mask


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A {0, 1} mask [H, W] as COCO's compressed RLE, JSON-ready: ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rles(rles: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Masks uint8 [K, height, width] in {0, 1} of ``encode_rle``'s RLEs (K may be 0)."""
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return np.ascontiguousarray(mask_utils.decode(coded).transpose(2, 0, 1))  # [H, W, K] -> [K, H, W]

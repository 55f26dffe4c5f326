"""Masks against pycocotools directly: union, the refer toolkit's sum-then-keep-ones, RLE."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from refer_fixture import ANNOTATIONS

from data_prep.masks import UnusableSegmentation, rasterize


def _polygon_masks(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.frPyObjects(polygons, height, width))  # [H, W, n]


def test_union_of_overlapping_polygons() -> None:
    _, _, polygons = ANNOTATIONS[102]
    expected = _polygon_masks(polygons, 32, 32).max(axis=2)
    mask = rasterize(polygons, 32, 32)
    assert mask.dtype == np.uint8 and mask.shape == (32, 32)
    np.testing.assert_array_equal(mask, expected)


def test_refer_mode_drops_the_overlap() -> None:
    _, _, polygons = ANNOTATIONS[102]
    stacked = _polygon_masks(polygons, 32, 32)
    refer = rasterize(polygons, 32, 32, mode="refer")
    np.testing.assert_array_equal(refer, (stacked.sum(axis=2) == 1).astype(np.uint8))
    union = rasterize(polygons, 32, 32)
    assert refer.sum() < union.sum() and not refer[15, 15] and union[15, 15]


def test_multi_part_keeps_usable_parts_only() -> None:
    _, _, polygons = ANNOTATIONS[103]
    expected = _polygon_masks(polygons[:2], 32, 32).max(axis=2)
    np.testing.assert_array_equal(rasterize(polygons, 32, 32), expected)


@pytest.mark.parametrize("ann_id", [104, 110])
def test_crowd_rle_compressed_and_uncompressed(ann_id: int) -> None:
    _, _, rle = ANNOTATIONS[ann_id]
    height, width = rle["size"]
    reference = mask_utils.decode(
        mask_utils.frPyObjects(rle, height, width)
        if isinstance(rle["counts"], list)
        else {"size": rle["size"], "counts": rle["counts"].encode()}
    )
    for mode in ("union", "refer"):
        mask = rasterize(rle, height, width, mode=mode)
        np.testing.assert_array_equal(mask, reference)
    assert mask.sum() == {104: 9 * 10 + 3 * 2, 110: 9 * 10 + 2 * 2}[ann_id]  # 110 is 16 rows high


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ([], "empty or missing"),
        (None, "empty or missing"),
        ([[1.0, 1.0, 5.0, 5.0]], "at least 3"),
        ([[1.0, 1.0, 5.0, float("nan"), 3.0, 3.0]], "at least 3"),
        ([[100.0, 100.0, 120.0, 100.0, 120.0, 120.0]], "empty"),
        ({"size": [5, 5], "counts": "PP"}, "differs from the image"),
        ({"size": [20, 24], "counts": [1, 2, 3]}, "do not add up"),
    ],
)
def test_unusable_segmentations_say_why(segmentation: object, message: str) -> None:
    with pytest.raises(UnusableSegmentation, match=message):
        rasterize(segmentation, 20, 24)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown mask mode 'sum'"):
        rasterize([[0, 0, 5, 0, 5, 5]], 10, 10, mode="sum")

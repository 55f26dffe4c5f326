"""A small hand-built refer-format fixture holding every hard case the preparation must handle.

Layout under the root: refcoco/instances.json, refcoco/refs(unc).p, images in
images/mscoco/images/train2014, and refcoco+/refs(unc).p as a malicious pickle. refcoco's refs
are a protocol-2 pickle as Python 3 writes it, so the byte strings among its expressions are
stored through `_codecs.encode`. `EXPECTED` says what a preparation of refcoco (unc) must
count, split by split and reject by reject.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_prep.refer import IMAGE_SUBDIR

OVERLONG = (
    "the tall man in the dark blue jacket standing just behind the woman holding a red umbrella near the door"
)

# Images: id -> (file name, width, height, how the file is written)
IMAGES = {
    1: ("COCO_train2014_000000000001.jpg", 40, 30, "jpeg"),
    2: ("COCO_train2014_000000000002.png", 32, 32, "png"),
    3: ("COCO_train2014_000000000003.jpg", 24, 20, "jpeg"),
    4: ("COCO_train2014_000000000004.jpg", 24, 20, "missing"),
    5: ("COCO_train2014_000000000005.jpg", 40, 30, "truncated"),
    6: ("COCO_train2014_000000000006.jpg", 24, 20, "garbage"),
    7: ("COCO_train2014_000000000007.jpg", 24, 20, "wrong-size"),
    8: ("COCO_train2014_000000000008.jpg", 24, 16, "jpeg"),
}


def _square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _crowd_rle(height: int, width: int, compressed: bool) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[3:12, 5:15] = 1
    mask[14:17, 2:4] = 1
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")  # COCO's uncompressed RLE: run lengths over column-major pixels
    runs, current, length = [], 0, 0
    for value in flat:
        if value == current:
            length += 1
        else:
            runs.append(length)
            current, length = value, 1
    runs.append(length)
    return {"size": [height, width], "counts": runs}


ANNOTATIONS = {
    101: (1, 0, [_square(5, 5, 20, 25)]),  # plain polygon
    102: (2, 0, [_square(2, 2, 20, 20), _square(10, 10, 28, 28)]),  # two overlapping polygons
    103: (
        2,
        0,
        [_square(1, 22, 8, 30), _square(22, 1, 30, 8), [3.0, 3.0, 4.0, 4.0]],
    ),  # multi-part, a 2-point part
    104: (3, 1, _crowd_rle(20, 24, compressed=True)),  # crowd, compressed RLE
    105: (4, 0, [_square(1, 1, 10, 10)]),
    106: (5, 0, [_square(1, 1, 10, 10)]),
    107: (6, 0, [_square(1, 1, 10, 10)]),
    108: (1, 0, [[1.0, 1.0, 5.0, 5.0]]),  # only a 2-point polygon: unusable
    109: (1, 0, [_square(100, 100, 120, 120)]),  # outside the 40x30 image: empty mask
    110: (8, 1, _crowd_rle(16, 24, compressed=False)),  # crowd, uncompressed RLE
    111: (7, 0, [_square(1, 1, 10, 10)]),
}

# Refs: ref_id -> (ann_id, image_id, split, [(sent_id, raw)]); raw as stored, not always text
REFS = {
    1: (
        101,
        1,
        "train",
        [
            (1, "the man on the left"),
            (2, "le café à gauche, 左边的椅子"),
            (3, OVERLONG),
            (4, ""),
            (5, "  \t "),
            (6, "\u200b\u200b"),
        ],
    ),
    2: (102, 2, "train", [(7, "the big overlapping thing"), (8, "overlap")]),
    3: (103, 2, "train", [(9, "the two corner pieces")]),
    4: (104, 3, "train", [(10, "the crowd")]),
    5: (108, 1, "train", [(11, "a degenerate polygon")]),
    6: (109, 1, "train", [(12, "something outside")]),
    7: (105, 4, "val", [(13, "image file missing"), (14, "still missing")]),
    8: (106, 5, "val", [(15, "truncated jpeg")]),
    9: (107, 6, "val", [(16, "not an image")]),
    10: (110, 8, "val", [(17, "uncompressed crowd")]),
    11: (111, 7, "testA", [(18, "image size disagrees")]),
    12: (105, 9, "testA", [(19, "image not in instances")]),
    13: (999, 1, "testA", [(20, "annotation not in instances")]),
    14: (101, 1, "testA", [(21, "first of a repeated id"), (21, "second of a repeated id")]),
    15: (110, 8, "testB", [(22, "the crowd at the bottom"), (23, "crowd again")]),
    16: (102, 1, "train", [(24, "an object of image 2 on image 1")]),  # ann 102 is on image 2
    17: (
        101,
        1,
        "train",
        [
            (25, None),
            (26, 42),
            (27, b"\xff\xfe not utf-8"),
            (28, "the café table".encode()),  # UTF-8 bytes: text
            (29, "😀😀"),  # every word piece [UNK]
            (30, "the 😀 dog"),
        ],
    ),
}

EXPECTED = {
    "counts": {
        "train": {"read": 19, "written": 9, "rejected": 10},
        "val": {"read": 5, "written": 1, "rejected": 4},
        "testA": {"read": 5, "written": 1, "rejected": 4},
        "testB": {"read": 2, "written": 2, "rejected": 0},
    },
    "rejects": {
        "train": {
            "annotation_image_mismatch": 1,
            "empty_expression": 2,
            "empty_tokens": 1,
            "expression_not_text": 3,
            "no_known_words": 1,
            "unusable_segmentation": 2,
        },
        "val": {"corrupt_image": 2, "missing_image": 2},
        "testA": {
            "duplicate_sent_id": 1,
            "image_size_mismatch": 1,
            "missing_annotation": 1,
            "missing_image_record": 1,
        },
        "testB": {},
    },
}


class _Evil:
    """Pickles to a call of os.system: loading it must not run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _image_bytes(width: int, height: int, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _sentence(sent_id: int, raw: object) -> dict[str, object]:
    """A refs sentence; the toolkit's normalised `sent` and `tokens` are left empty where raw is
    not text."""
    text = raw.lower() if isinstance(raw, str) else ""
    return {"raw": raw, "sent": text, "sent_id": sent_id, "tokens": text.split()}


def build_refer_fixture(root: Path, evil_marker: Path) -> Path:
    """Write the fixture under `root` and return it."""
    image_dir = root / IMAGE_SUBDIR
    image_dir.mkdir(parents=True)
    for image_id, (name, width, height, kind) in IMAGES.items():
        path = image_dir / name
        if kind == "jpeg":
            path.write_bytes(_image_bytes(width, height, "JPEG", image_id))
        elif kind == "png":
            path.write_bytes(_image_bytes(width, height, "PNG", image_id))
        elif kind == "truncated":
            data = _image_bytes(width, height, "JPEG", image_id)
            path.write_bytes(data[: len(data) // 2])
        elif kind == "garbage":
            path.write_bytes(b"this is not an image at all" * 10)
        elif kind == "wrong-size":
            path.write_bytes(_image_bytes(width + 5, height, "JPEG", image_id))

    instances = {
        "images": [
            {"id": i, "file_name": name, "width": w, "height": h} for i, (name, w, h, _) in IMAGES.items()
        ],
        "annotations": [
            {
                "id": a,
                "image_id": im,
                "category_id": 1,
                "iscrowd": crowd,
                "segmentation": seg,
                "area": 0.0,
                "bbox": [0, 0, 1, 1],
            }
            for a, (im, crowd, seg) in ANNOTATIONS.items()
        ],
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    refs = [
        {
            "ref_id": ref_id,
            "ann_id": ann_id,
            "image_id": image_id,
            "category_id": 1,
            "split": split,
            "sent_ids": [s for s, _ in sentences],
            "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",  # the ref's name, not the image's
            "sentences": [_sentence(s, raw) for s, raw in sentences],
        }
        for ref_id, (ann_id, image_id, split, sentences) in REFS.items()
    ]
    (root / "refcoco").mkdir()
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "refcoco+").mkdir()
    (root / "refcoco+" / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    (root / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([_Evil(f"touch {evil_marker}")], protocol=2))
    return root

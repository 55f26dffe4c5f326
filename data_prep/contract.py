"""The shard contract: the names and schemas the writer (data_prep.shards) and every reader
(magnet.data, the pipelines, benchmarks, tests) share, so that a name changes in one place.

    <root>/<split>/shard-%06d.tar   one sample per expression, members <key>.<member>
    <root>/manifest.parquet         one row per written sample (MANIFEST_SCHEMA)
    <root>/rejects.parquet          one row per expression not written (REJECTS_SCHEMA)
    <root>/summary.json             counts, shard checksums, tokenizer, settings
    <root>/_work/                   the writer's per-shard parts and completion markers

``<root>`` is ``<out>/<dataset>-<splitBy>``, a local directory or an fsspec URL. Dataset, splitBy
and split names pass `data_prep.paths.check_name` (splits also `check_split`) before anything is
written, so none reaches outside ``<root>`` or onto another dataset's or the writer's own files.
"""

from __future__ import annotations

import pyarrow as pa

from data_prep.paths import check_name

SUMMARY = "summary.json"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
INDEX_FILES = (SUMMARY, MANIFEST, REJECTS)
"""The files indexing the shards; the summary is written last, once what it describes is there."""
WORK_DIR = "_work"
SHARD_GLOB = "shard-*.tar"
"""Matches a split's shard file names (inside ``<root>/<split>/``)."""

IMAGE_MEMBERS = ("jpg", "jpeg", "png")
"""Suffixes of the image member: the image file's original bytes, under its own extension."""
MASK_MEMBER = "mask.png"
INPUT_IDS_MEMBER = "input_ids.npy"
ATTENTION_MASK_MEMBER = "attention_mask.npy"
META_MEMBER = "json"
OBJECTS_MEMBER = "objects.json"
"""Every object of the sample's image, the referred one among them, so that evaluation can tell
picking the wrong object from outlining the right one badly: a JSON list ordered by ann_id of
``{"ann_id": int, "rle": {"size": [H, W], "counts": str}}`` (COCO's compressed RLE, pycocotools)
at the original size, rasterised with the target's mask_mode. Objects whose segmentation gives no
mask are left out. Written since shard format 3; older shards lack it (no pick metrics)."""

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("ref_id", pa.int64()),
        ("sent_id", pa.int64()),
        ("ann_id", pa.int64()),
        ("image_id", pa.int64()),
        ("category_id", pa.int64()),
        ("raw", pa.string()),
        ("n_tokens", pa.int32()),
        ("mask_area", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
"""`n_tokens`: WordPiece ids of the whole expression with [CLS] and [SEP], before the cut to
max_tokens (n_tokens > max_tokens marks a cut expression). `mask_area`: mask pixels at the
original size. `shard`: the shard's path relative to the dataset directory. A last column `kind`
(KIND_FIELD) is added only when the refer root has the synthetic generator's kinds file."""
KIND_FIELD = pa.field("kind", pa.string())

REJECTS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("ref_id", pa.int64()),
        ("sent_id", pa.int64()),
        ("image_id", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
"""`reason`: a key of data_prep.shards.REJECT_REASONS; `detail`: the specific message."""


def check_split(name: str) -> str:
    """A split name that may become ``<root>/<split>/``: `check_name`, and none of the index files."""
    return check_name(name, "split", reserved=INDEX_FILES)


def shard_stem(index: int) -> str:
    """A shard's file name without ``.tar``; the writer's parts of the shard share it."""
    return f"shard-{index:06d}"


def shard_path(split: str, index: int) -> str:
    """A shard's path relative to the root, as the summary and the manifest name it."""
    return f"{split}/{shard_stem(index)}.tar"


def split_of(shard: str) -> str:
    """The split a shard path (relative to the root) belongs to."""
    return shard.split("/", 1)[0]


def sample_key(sent_id: int) -> str:
    """A sample's key, the stem of its members' names: the sent_id, zero-padded to 10 digits."""
    return f"{sent_id:010d}"

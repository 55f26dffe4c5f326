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

import hashlib
import json
from typing import TypeVar

import fsspec
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from data_prep.paths import check_name

FORMAT_VERSION = 4  # 3: every object of the image (objects.json); 4: images read upright (data_prep.images)
"""Bumped when the bytes written for the same input change, so old chunk markers are redone. Every
format since 1 has the same summary.json and sample json; shards before 3 lack OBJECTS_MEMBER."""

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


class ShardError(RuntimeError):
    """A shard set that cannot be read as promised: missing or unreadable summary, bad checksum,
    wrong counts, a sample not as written."""


# ------------------------------------------------------------------------- the contract files
class _ContractFile(BaseModel):
    """A JSON file of the contract: immutable, pickled across Ray and Prefect, unknown keys kept
    out (a newer writer may add some) but every known one required."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


_File = TypeVar("_File", bound=_ContractFile)


def parse_contract_file(model: type[_File], data: bytes | str, where: str, error: type[Exception]) -> _File:
    """``data`` read as ``model``, or one-line ``error`` naming ``where`` and every problem."""
    try:
        return model.model_validate(json.loads(data))
    except ValueError as err:  # json.JSONDecodeError and pydantic's ValidationError both are
        if isinstance(err, ValidationError):
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'the whole file'}: {e['msg']}" for e in err.errors()
            )
        else:
            problems = f"not JSON ({err})"
        raise error(f"{where} cannot be read: {problems}") from None


class SplitCounts(_ContractFile):
    """Expressions of a split read, written as samples and rejected (read = written + rejected)."""

    read: int
    written: int
    rejected: int


class ShardEntry(_ContractFile):
    """One shard: its path relative to the root, sha256 and number of samples."""

    path: str
    sha256: str
    samples: int


class TokenizerRecord(_ContractFile):
    name: str
    vocabulary_hash: str


class SummarySettings(_ContractFile):
    """The preparation settings a reader must match (max_tokens) or report (mask_mode)."""

    splits: tuple[str, ...]
    max_tokens: int
    samples_per_shard: int
    mask_mode: str


class Summary(_ContractFile):
    """summary.json: what a prepared dataset holds, written last by data_prep.shards."""

    dataset: str
    split_by: str = Field(alias="splitBy")
    format_version: int
    tokenizer: TokenizerRecord
    counts: dict[str, SplitCounts]
    rejects_by_reason: dict[str, dict[str, int]]
    shards: tuple[ShardEntry, ...]
    manifest_sha256: str
    rejects_sha256: str
    versions: dict[str, str]
    settings: SummarySettings

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, version: int) -> int:
        if not 1 <= version <= FORMAT_VERSION:
            raise ValueError(
                f"format {version} is not one of 1 to {FORMAT_VERSION} (prepared by another version?)"
            )
        return version

    def to_bytes(self) -> bytes:
        """The file's bytes: keys in the order above, indented, UTF-8 text as it is."""
        text = json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False)
        return (text + "\n").encode("utf-8")

    def split_shards(self, split: str) -> list[ShardEntry]:
        return [entry for entry in self.shards if split_of(entry.path) == split]


def summary_url(root: str) -> str:
    """Where a prepared dataset's (a directory or URL) summary.json lies."""
    return f"{str(root).rstrip('/')}/{SUMMARY}"


def read_summary_and_sha256(root: str) -> tuple[Summary, str]:
    """The summary.json of a prepared dataset (a directory or URL) and its sha256 (which names the
    data in MLflow), the one reading of the file.

    Raises:
        ShardError: the file is missing, not JSON, or not a summary this code reads (a field
            missing or of the wrong type, a format_version not known).
    """
    url = summary_url(root)
    try:
        with fsspec.open(url, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ShardError(f"{url} is missing: is {root} a prepared dataset (magnet prepare)?") from None
    return parse_contract_file(Summary, raw, url, ShardError), hashlib.sha256(raw).hexdigest()


def read_summary(root: str) -> Summary:
    """`read_summary_and_sha256` without the hash."""
    return read_summary_and_sha256(root)[0]


class SampleMeta(_ContractFile):
    """A sample's META_MEMBER: the ids, split and expression, and the original image size."""

    ref_id: int
    sent_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str
    raw: str
    height: int
    width: int

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(), ensure_ascii=False, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> SampleMeta:
        """The member's content; ShardError naming ``where`` (sample and shard) when it is not one."""
        return parse_contract_file(cls, data, where, ShardError)

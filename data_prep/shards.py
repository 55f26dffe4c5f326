"""Refer-format data (or a folder dataset, data_prep.folder) into WebDataset tar shards, a manifest,
a rejects list and a summary.

    <out>/<dataset>-<splitBy>/<split>/shard-%06d.tar
    <out>/<dataset>-<splitBy>/manifest.parquet    one row per written sample
    <out>/<dataset>-<splitBy>/rejects.parquet     one row per expression not written, with why
    <out>/<dataset>-<splitBy>/summary.json        counts, shard checksums, tokenizer, versions
    <out>/<dataset>-<splitBy>/_work/              per-shard parts and completion markers

`out` may be an fsspec URL (s3://bucket/prefix; credentials and endpoint from the environment):
each chunk is then written in a local temporary directory and uploaded with its parts, its
completion marker last, so object storage holds the same layout and the same bytes, and a re-run
finds the finished chunks there.

The work is cut into chunks that are the shards themselves: a split's images, ordered by id,
are taken in order until a chunk holds `samples_per_shard` expressions (cut at an image
boundary, so a ref never straddles two shards). A chunk is a pure function of its inputs and
settings, so chunks run in any order, on any number of workers, and give the same bytes; a
chunk whose completion marker matches its fingerprint is not redone. `assemble` then joins the
per-chunk manifest and rejects parts in chunk order and writes the summary. Preparing some
splits into an existing output adds them to its index (the other splits' entries are kept) when
the settings and tokenizer are the same, and is refused before any work otherwise.

`plan_prepare` -> `prepare_chunk` (per chunk, parallel) -> `assemble` is the path the Prefect
flow drives; `prepare_dataset` runs the three in one call with a local process pool.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import reprlib
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path, PurePath, PurePosixPath
from typing import NamedTuple, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from data_prep.contract import (
    ATTENTION_MASK_MEMBER,
    FORMAT_VERSION,
    INDEX_FILES,
    INPUT_IDS_MEMBER,
    KIND_FIELD,
    MANIFEST,
    MANIFEST_SCHEMA,
    MASK_MEMBER,
    META_MEMBER,
    OBJECTS_MEMBER,
    REJECTS,
    REJECTS_SCHEMA,
    SHARD_GLOB,
    SUMMARY,
    WORK_DIR,
    SampleMeta,
    ShardEntry,
    SplitCounts,
    Summary,
    SummarySettings,
    TokenizerRecord,
    check_split,
    read_summary,
    sample_key,
    shard_path,
    shard_stem,
    summary_url,
)
from data_prep.defaults import PREPARE
from data_prep.folder import MaskFile, MaskFileError, is_folder_dataset, load_folder, read_mask
from data_prep.images import TooLargeImage, UnreadableImage, load_shown, open_image, turn_note
from data_prep.masks import MASK_MODES, MaskMode, UnusableSegmentation, encode_rle, rasterize
from data_prep.output import written_whole
from data_prep.paths import check_name, is_url
from data_prep.processes import leave_sigint_to_parent
from data_prep.refer import Annotation, ImageInfo, Ref, Sentence, load_kinds, load_refer
from data_prep.tokenize import encode_expressions, load_tokenizer, vocabulary_hash

REJECT_REASONS: dict[str, str] = {
    "missing_image_record": "the ref's image_id is not in instances.json",
    "missing_image": "the image file does not exist",
    "corrupt_image": "the image file does not decode (truncated or not an image)",
    "image_too_large": "the image has more pixels than PIL.Image.MAX_IMAGE_PIXELS (decompression bombs)",
    "image_size_mismatch": "the decoded image size differs from instances.json",
    "missing_annotation": "the ref's ann_id is not in instances.json",
    "annotation_image_mismatch": "the ref's ann_id outlines an object of another image",
    "unusable_segmentation": "the annotation's segmentation gives no mask",
    "missing_mask": "the mask file of a folder dataset does not exist",
    "corrupt_mask": "the mask file of a folder dataset does not decode",
    "expression_not_text": "the stored expression is not text (None, a number, bytes not in UTF-8)",
    "empty_expression": "the expression is empty or whitespace only",
    "empty_tokens": "the expression tokenises to no word ids",
    "no_known_words": "every word id the model sees is [UNK] (emoji, symbols, unknown scripts)",
    "duplicate_sent_id": "an earlier expression of the split has the same sent_id",
}


@dataclass(frozen=True)
class PrepareSettings:
    """Everything besides the input that decides the bytes written."""

    dataset: str
    split_by: str
    tokenizer: str = PREPARE.tokenizer
    max_tokens: int = PREPARE.max_tokens
    samples_per_shard: int = PREPARE.samples_per_shard
    mask_mode: MaskMode = PREPARE.mask_mode

    def __post_init__(self) -> None:
        check_name(self.dataset, "dataset")  # both become <out>/<dataset>-<splitBy>/
        check_name(self.split_by, "splitBy")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 ([CLS] and one word), got {self.max_tokens}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be positive, got {self.samples_per_shard}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {self.mask_mode!r}")


@dataclass(frozen=True)
class ChunkRef:
    """A ref with its annotation (None when instances.json lacks it) and the positions of its
    sentences whose sent_id an earlier expression of the split already used."""

    ref: Ref
    annotation: Annotation | None
    duplicates: tuple[int, ...] = ()


@dataclass(frozen=True)
class ChunkImage:
    """An image (None when instances.json lacks it), its refs ordered by ref_id, and every object
    annotated on it ordered by ann_id (a folder dataset's: its referred objects), written beside
    each sample for pick accuracy (contract.OBJECTS_MEMBER)."""

    image_id: int
    info: ImageInfo | None
    refs: tuple[ChunkRef, ...]
    objects: tuple[Annotation, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """One shard's worth of work: consecutive images of one split."""

    split: str
    index: int
    images: tuple[ChunkImage, ...]

    @property
    def shard(self) -> str:
        return shard_path(self.split, self.index)

    @property
    def n_expressions(self) -> int:
        return sum(len(cr.ref.sentences) for im in self.images for cr in im.refs)


@dataclass(frozen=True)
class PreparePlan:
    """The chunks of a preparation and where they go."""

    settings: PrepareSettings
    out_dir: Path | str  # a local directory, or a URL on object storage
    image_dir: Path
    splits: tuple[str, ...]
    chunks: tuple[Chunk, ...]
    vocabulary_hash: str
    kinds: tuple[tuple[int, str], ...] = ()  # (sent_id, kind) from a synthetic kinds file, else empty
    # Every split summary.json will list: `splits`, after those an earlier preparation of the same
    # settings left in out_dir (kept as they are, merged into the index), in the index's order.
    index_splits: tuple[str, ...] = ()

    @property
    def kept_splits(self) -> tuple[str, ...]:
        return tuple(split for split in self.index_splits if split not in self.splits)


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk wrote; `skipped` when a matching completion marker was found."""

    split: str
    index: int
    shard: str
    read: int
    written: int
    rejected: int
    rejects_by_reason: dict[str, int]
    sha256: str
    skipped: bool


@dataclass(frozen=True)
class PrepareResult:
    """The outcome of a whole preparation."""

    out_dir: Path | str
    counts: dict[str, SplitCounts]
    rejects_by_reason: dict[str, dict[str, int]]
    shards: list[ShardEntry]
    summary: Summary
    chunks_skipped: int = 0


def dataset_dir(out: str | Path, dataset: str, split_by: str) -> Path | str:
    """`<out>/<dataset>-<splitBy>`: where one preparation writes (a URL when `out` is one)."""
    if is_url(out):
        return f"{str(out).rstrip('/')}/{dataset}-{split_by}"
    return Path(out) / f"{dataset}-{split_by}"


def plan_prepare(
    refer_root: str | Path,
    out: str | Path,
    settings: PrepareSettings,
    splits: Iterable[str] | None = None,
    image_dir: str | Path | None = None,
) -> PreparePlan:
    """Read the refer data and cut every requested split into chunks (one per shard).

    Args:
        refer_root: the refer-layout root (holds `<dataset>/` and `images/`), or a folder
            dataset's folder (holds annotations.jsonl or .csv, see data_prep.folder).
        out: the output root; the plan writes under `<out>/<dataset>-<splitBy>/`.
        settings: tokenizer, lengths, shard size and mask mode.
        splits: split names (refer toolkit matching); default every stored split.
        image_dir: where the images are, if not `<refer_root>/images/mscoco/images/train2014`
            (refer layout only: a folder dataset's paths are relative to its folder).
    """
    if is_folder_dataset(refer_root):
        if image_dir is not None:
            raise ValueError("image_dir is for the refer layout: a folder dataset's paths are relative to it")
        data = load_folder(refer_root, settings.dataset, settings.split_by)
    else:
        data = load_refer(refer_root, settings.dataset, settings.split_by, image_dir)
    chosen = tuple(check_split(split) for split in splits) if splits else tuple(data.stored_splits())
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"splits must not repeat: {list(chosen)}")
    objects_of: dict[int, list[Annotation]] = {}
    for annotation in sorted(data.annotations.values(), key=lambda a: a.ann_id):
        objects_of.setdefault(annotation.image_id, []).append(annotation)
    chunks: list[Chunk] = []
    for split in chosen:
        refs = sorted(data.select(split), key=lambda r: (r.image_id, r.ref_id))
        chunks.extend(
            _chunk_split(split, refs, data.images, data.annotations, objects_of, settings.samples_per_shard)
        )
    kinds = load_kinds(refer_root, settings.dataset, settings.split_by) or {}
    vocab_hash = vocabulary_hash(load_tokenizer(settings.tokenizer))
    out_dir = dataset_dir(out, settings.dataset, settings.split_by)
    return PreparePlan(
        settings=settings,
        out_dir=out_dir,
        image_dir=data.image_dir,
        splits=chosen,
        chunks=tuple(chunks),
        vocabulary_hash=vocab_hash,
        kinds=tuple(sorted(kinds.items())),
        index_splits=merged_splits(out_dir, settings, vocab_hash, chosen),
    )


def _earlier_summary(out_dir: Path | str) -> Summary | None:
    """An earlier preparation's summary.json in out_dir, or None."""
    filesystem, root = fsspec.core.url_to_fs(str(out_dir))
    return read_summary(str(out_dir)) if filesystem.exists(summary_url(root)) else None


def merged_splits(
    out_dir: Path | str, settings: PrepareSettings, vocab_hash: str, chosen: tuple[str, ...]
) -> tuple[str, ...]:
    """The splits summary.json will list: those an earlier preparation left in out_dir (in its
    order) and the chosen ones. A preparation of some splits adds to the index rather than drop the
    others' shards from it; with other settings the two would not belong together, so it refuses.

    Raises:
        ValueError: out_dir holds other splits prepared with other settings.
    """
    previous = _earlier_summary(out_dir)
    earlier = list(previous.counts) if previous else []
    if not any(split not in chosen for split in earlier):
        return chosen
    wanted = {
        "format_version": FORMAT_VERSION,
        "tokenizer": settings.tokenizer,
        "vocabulary_hash": vocab_hash,
        "max_tokens": settings.max_tokens,
        "samples_per_shard": settings.samples_per_shard,
        "mask_mode": settings.mask_mode,
    }
    found = {
        "format_version": previous.format_version,
        "tokenizer": previous.tokenizer.name,
        "vocabulary_hash": previous.tokenizer.vocabulary_hash,
        **{key: getattr(previous.settings, key) for key in ("max_tokens", "samples_per_shard", "mask_mode")},
    }
    differ = [f"{key} {found[key]!r} (now {wanted[key]!r})" for key in wanted if found[key] != wanted[key]]
    if differ:
        others = [split for split in earlier if split not in chosen]
        raise ValueError(
            f"{out_dir} holds splits {', '.join(others)} prepared with {'; '.join(differ)}: preparing "
            f"only {', '.join(chosen)} would leave them out of its index. Use the same settings to add "
            "to it, prepare every split (no --splits), or choose another --out"
        )
    return (*earlier, *(split for split in chosen if split not in earlier))


def _chunk_split(
    split: str,
    refs: list[Ref],
    images: dict[int, ImageInfo],
    annotations: dict[int, Annotation],
    objects_of: Mapping[int, list[Annotation]],
    samples_per_shard: int,
) -> list[Chunk]:
    seen_sent_ids: set[int] = set()
    by_image: dict[int, list[ChunkRef]] = {}
    for ref in refs:
        ordered = tuple(sorted(ref.sentences, key=lambda s: s.sent_id))
        duplicates = []
        for position, sentence in enumerate(ordered):
            if sentence.sent_id in seen_sent_ids:
                duplicates.append(position)
            seen_sent_ids.add(sentence.sent_id)
        ref = Ref(ref.ref_id, ref.ann_id, ref.image_id, ref.category_id, ref.split, ordered)
        by_image.setdefault(ref.image_id, []).append(
            ChunkRef(ref, annotations.get(ref.ann_id), tuple(duplicates))
        )

    chunks: list[Chunk] = []
    pending: list[ChunkImage] = []
    pending_count = 0
    for image_id, chunk_refs in by_image.items():  # refs were sorted by image_id
        objects = tuple(objects_of.get(image_id, ()))
        pending.append(ChunkImage(image_id, images.get(image_id), tuple(chunk_refs), objects))
        pending_count += sum(len(cr.ref.sentences) for cr in chunk_refs)
        if pending_count >= samples_per_shard:
            chunks.append(Chunk(split, len(chunks), tuple(pending)))
            pending, pending_count = [], 0
    if pending:
        chunks.append(Chunk(split, len(chunks), tuple(pending)))
    return chunks


# ---------------------------------------------------------------------------------------------
# One chunk


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file with fixed metadata, so equal content gives equal tar bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask * np.uint8(255), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _load_image(info: ImageInfo, image_dir: Path) -> tuple[str, bytes] | tuple[str, str]:
    """("jpg"|"png", bytes) for a usable image, else (reason, detail). The image is judged as
    data_prep.images reads it (upright, as viewers show it), the size instances.json gives
    included. OSErrors other than a missing file propagate: they are I/O trouble to retry, not a
    property of the data. Details name the file relative to the image directory, so they do not
    depend on where it lies."""
    path = image_dir / info.file_name
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return "missing_image", f"{info.file_name} not found in the image directory"
    try:
        with open_image(data) as image:
            fmt, shown = image.format, load_shown(image)
    except TooLargeImage as err:
        return "image_too_large", f"{info.file_name}: {err}"
    except UnreadableImage as err:
        return "corrupt_image", f"{info.file_name}: {err}"
    if fmt not in ("JPEG", "PNG"):
        # The contract carries .jpg or .png: other formats are stored as the PNG of what they show.
        buffer = io.BytesIO()
        shown.save(buffer, format="PNG")
        fmt, data = "PNG", buffer.getvalue()
    expected = (info.width, info.height)
    if shown.size != expected:
        return (
            "image_size_mismatch",
            f"{info.file_name} is {shown.size[0]}x{shown.size[1]}, instances.json says "
            f"{info.width}x{info.height}{turn_note(shown.size, expected, 'its size')}",
        )
    return ("jpg" if fmt == "JPEG" else "png"), data


def _object_mask(
    annotation: Annotation, info: ImageInfo, image_dir: Path, mode: MaskMode
) -> np.ndarray | tuple[str, str]:
    """An object's mask [H, W] uint8 {0, 1} at the image's size, else (reason, detail). A folder
    dataset's mask files are read relative to its folder (the image directory)."""
    try:
        if isinstance(annotation.segmentation, MaskFile):
            return read_mask(image_dir, annotation.segmentation, info.height, info.width)
        return rasterize(annotation.segmentation, info.height, info.width, mode)
    except MaskFileError as err:
        return err.reason, str(err)
    except UnusableSegmentation as err:
        return "unusable_segmentation", f"ann_id {annotation.ann_id}: {err}"


def _ref_mask(
    chunk_ref: ChunkRef, object_masks: Mapping[int, np.ndarray | tuple[str, str]]
) -> np.ndarray | tuple[str, str]:
    """The ref's mask among its image's ``object_masks`` (ann_id -> ``_object_mask``), else
    (reason, detail)."""
    ref, annotation = chunk_ref.ref, chunk_ref.annotation
    if annotation is None:
        return "missing_annotation", f"ann_id {ref.ann_id} not in instances.json"
    if annotation.image_id != ref.image_id:
        return (
            "annotation_image_mismatch",
            f"ann_id {ref.ann_id} is on image_id {annotation.image_id}, the ref on image_id {ref.image_id}",
        )
    return object_masks[ref.ann_id]


def _objects_json(object_masks: Mapping[int, np.ndarray | tuple[str, str]]) -> bytes:
    """The OBJECTS_MEMBER of an image's samples: every object that has a mask, as RLE."""
    objects = [
        {"ann_id": ann_id, "rle": encode_rle(mask)}
        for ann_id, mask in object_masks.items()
        if isinstance(mask, np.ndarray)
    ]
    return json.dumps(objects, sort_keys=True).encode()


class _Candidate(NamedTuple):
    """An expression whose image and mask are good, waiting for its tokens."""

    info: ImageInfo
    ext: str  # "jpg" or "png"
    image_bytes: bytes
    ref: Ref
    mask: np.ndarray  # [H, W] uint8 {0, 1}
    mask_png: bytes
    objects_json: bytes  # the image's objects (OBJECTS_MEMBER)
    sentence: Sentence


def _chunk_fingerprint(settings: PrepareSettings, vocab_hash: str, chunk: Chunk, image_dir: Path) -> str:
    """Hash of everything the chunk's bytes depend on: settings, tokenizer, the chunk's refs,
    annotations, images and mask files (files identified by size and modification time)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT_VERSION, asdict(settings), vocab_hash], sort_keys=True).encode())
    digest.update(json.dumps(asdict(chunk), sort_keys=True, default=str).encode())
    files = [image.info.file_name for image in chunk.images if image.info is not None]
    annotations = [
        annotation
        for image in chunk.images
        for annotation in (*image.objects, *(chunk_ref.annotation for chunk_ref in image.refs))
        if annotation is not None and isinstance(annotation.segmentation, MaskFile)
    ]
    files += dict.fromkeys(annotation.segmentation.path for annotation in annotations)
    for name in files:
        try:
            stat = (image_dir / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        except FileNotFoundError:
            digest.update(f"{name}:missing".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


_P = TypeVar("_P", bound=PurePath)


DONE_SUFFIX = ".done.json"
"""A finished chunk's completion marker, beside its manifest and rejects parts."""


def _part_paths(out_dir: _P, chunk: Chunk) -> tuple[_P, _P, _P]:
    stem = out_dir / WORK_DIR / chunk.split / shard_stem(chunk.index)
    return (
        stem.with_suffix(".manifest.parquet"),
        stem.with_suffix(".rejects.parquet"),
        stem.with_suffix(DONE_SUFFIX),
    )


def done_markers(root: str) -> str:
    """The glob of every finished chunk's marker under a dataset directory."""
    return f"{root}/{WORK_DIR}/*/*{DONE_SUFFIX}"


CHUNK_STAGING = "magnet-chunk-"
"""A chunk for object storage is written in ``<temp dir>/magnet-chunk-<pid>-<random>``, then uploaded."""


def remove_partial_files(out_dir: str | Path, writers: Iterable[int]) -> None:
    """Remove what chunk writers stopped mid-chunk (the processes ``writers``, killed) left behind:
    the ``.tmp`` files of a local output, their staging directories of an object-storage one. Their
    chunks have no completion marker, so the next run writes them again."""
    if not is_url(out_dir):
        for partial in Path(out_dir).rglob("*.tmp"):
            partial.unlink(missing_ok=True)
    for pid in writers:
        for staging in Path(tempfile.gettempdir()).glob(f"{CHUNK_STAGING}{pid}-*"):
            shutil.rmtree(staging, ignore_errors=True)


def _write_parquet(rows: list[dict[str, object]], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    with written_whole(path) as tmp:
        pq.write_table(table, tmp)


def finished_chunk(
    settings: PrepareSettings, vocab_hash: str, chunk: Chunk, out_dir: str | Path, image_dir: str | Path
) -> ChunkResult | None:
    """The chunk's result (skipped=True) if an earlier run finished it with the same fingerprint
    and its shard is intact, else None."""
    if is_url(out_dir):
        return _finished_remote_chunk(settings, vocab_hash, chunk, str(out_dir), Path(image_dir))
    out_dir = Path(out_dir)
    _, _, done_path = _part_paths(out_dir, chunk)
    shard_path = out_dir / chunk.shard
    if not (done_path.is_file() and shard_path.is_file()):
        return None
    marker = json.loads(done_path.read_text())
    fingerprint = _chunk_fingerprint(settings, vocab_hash, chunk, Path(image_dir))
    if marker.get("fingerprint") != fingerprint or marker.get("sha256") != _file_sha256(shard_path):
        return None
    return ChunkResult(**{**marker["result"], "skipped": True})


def _reject_row(chunk: Chunk, ref: Ref, sent_id: int, reason: str, detail: str) -> dict[str, object]:
    return {
        "split": chunk.split,
        "ref_id": ref.ref_id,
        "sent_id": sent_id,
        "image_id": ref.image_id,
        "reason": reason,
        "detail": detail,
    }


def _screen(
    settings: PrepareSettings, chunk: Chunk, image_dir: Path
) -> tuple[list[_Candidate], list[dict[str, object]]]:
    """Read each image and mask once and check every expression: those that pass every check before
    tokenising, and the reject rows of the others."""
    rejects: list[dict[str, object]] = []
    candidates: list[_Candidate] = []
    for image in chunk.images:
        loaded = (
            _load_image(image.info, image_dir)
            if image.info is not None
            else ("missing_image_record", f"image_id {image.image_id} not in instances.json")
        )
        image_ok = loaded[0] in ("jpg", "png")
        if image_ok:
            object_masks = {
                a.ann_id: _object_mask(a, image.info, image_dir, settings.mask_mode) for a in image.objects
            }
            objects_json = _objects_json(object_masks)
        for chunk_ref in image.refs:
            ref = chunk_ref.ref
            if not image_ok:
                rejects += [_reject_row(chunk, ref, sentence.sent_id, *loaded) for sentence in ref.sentences]
                continue
            mask = _ref_mask(chunk_ref, object_masks)
            if isinstance(mask, tuple):
                rejects += [_reject_row(chunk, ref, sentence.sent_id, *mask) for sentence in ref.sentences]
                continue
            mask_png = _png_bytes(mask)
            for position, sentence in enumerate(ref.sentences):
                if position in chunk_ref.duplicates:
                    detail = f"sent_id {sentence.sent_id} repeats"
                    rejects.append(_reject_row(chunk, ref, sentence.sent_id, "duplicate_sent_id", detail))
                elif not isinstance(sentence.raw, str):
                    detail = f"{type(sentence.raw).__name__} {reprlib.repr(sentence.raw)}"
                    rejects.append(_reject_row(chunk, ref, sentence.sent_id, "expression_not_text", detail))
                elif not sentence.raw.strip():
                    rejects.append(
                        _reject_row(chunk, ref, sentence.sent_id, "empty_expression", repr(sentence.raw))
                    )
                else:
                    candidates.append(
                        _Candidate(image.info, *loaded, ref, mask, mask_png, objects_json, sentence)
                    )
    return candidates, rejects


@dataclass(frozen=True)
class _Tokens:
    """The chunk's candidates tokenised, row for row."""

    ids: np.ndarray
    attention: np.ndarray
    n_words: np.ndarray
    has_known_word: np.ndarray


def _tokenise(settings: PrepareSettings, candidates: list[_Candidate]) -> _Tokens:
    tokenizer = load_tokenizer(settings.tokenizer)
    texts = [c.sentence.raw for c in candidates]
    ids, attention, n_words = encode_expressions(tokenizer, texts, max_tokens=settings.max_tokens)
    # [UNK] is a special id: a row holding special ids only gives the model no word.
    has_known_word = np.isin(ids, tokenizer.all_special_ids, invert=True).any(axis=1)
    return _Tokens(ids, attention, n_words, has_known_word)


def _write_shard(
    shard_path: Path, chunk: Chunk, candidates: list[_Candidate], tokens: _Tokens | None
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """The chunk's tar, whole or not at all; returns its manifest rows and the rejects found while
    writing (no word left after tokenising)."""
    manifest: list[dict[str, object]] = []
    rejects: list[dict[str, object]] = []
    shard_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        written_whole(shard_path) as tmp_shard,
        tarfile.open(tmp_shard, "w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for row, candidate in enumerate(candidates):
            assert tokens is not None  # there are candidates
            info, ext, image_bytes, ref, mask, mask_png, objects_json, sentence = candidate
            if tokens.n_words[row] == 0:
                rejects.append(_reject_row(chunk, ref, sentence.sent_id, "empty_tokens", repr(sentence.raw)))
                continue
            if not tokens.has_known_word[row]:
                rejects.append(
                    _reject_row(chunk, ref, sentence.sent_id, "no_known_words", repr(sentence.raw))
                )
                continue
            key = sample_key(sentence.sent_id)
            meta = SampleMeta(
                ref_id=ref.ref_id,
                sent_id=sentence.sent_id,
                ann_id=ref.ann_id,
                image_id=ref.image_id,
                category_id=ref.category_id,
                split=chunk.split,
                raw=sentence.raw,
                height=info.height,
                width=info.width,
            )
            _tar_member(tar, f"{key}.{ext}", image_bytes)
            _tar_member(tar, f"{key}.{MASK_MEMBER}", mask_png)
            _tar_member(tar, f"{key}.{INPUT_IDS_MEMBER}", _npy_bytes(tokens.ids[row]))
            _tar_member(tar, f"{key}.{ATTENTION_MASK_MEMBER}", _npy_bytes(tokens.attention[row]))
            _tar_member(tar, f"{key}.{META_MEMBER}", meta.to_bytes())
            _tar_member(tar, f"{key}.{OBJECTS_MEMBER}", objects_json)
            manifest.append(
                {
                    "key": key,
                    "shard": chunk.shard,
                    "n_tokens": int(tokens.n_words[row]) + 2,
                    "mask_area": int(mask.sum(dtype=np.int64)),
                    **{k: v for k, v in meta.model_dump().items() if k in MANIFEST_SCHEMA.names},
                }
            )
    return manifest, rejects


def _mark_done(done_path: Path, fingerprint: str, shard_path: Path, result: ChunkResult) -> None:
    """The completion marker a rerun checks before skipping the chunk, written last and whole."""
    marker = {
        "fingerprint": fingerprint,
        "sha256": result.sha256,
        "size": shard_path.stat().st_size,
        "result": asdict(result),
    }
    with written_whole(done_path) as tmp_done:
        tmp_done.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def prepare_chunk(
    settings: PrepareSettings, vocab_hash: str, chunk: Chunk, out_dir: str | Path, image_dir: str | Path
) -> ChunkResult:
    """Write one chunk's shard and its manifest / rejects parts; skip it when its completion
    marker matches. Every expression of the chunk becomes a sample or a reject row: screened,
    tokenised, written, then marked done."""
    done = finished_chunk(settings, vocab_hash, chunk, out_dir, image_dir)
    if done is not None:
        return done
    if is_url(out_dir):
        with tempfile.TemporaryDirectory(prefix=f"{CHUNK_STAGING}{os.getpid()}-") as staging:
            result = prepare_chunk(settings, vocab_hash, chunk, staging, image_dir)
            _upload_chunk(Path(staging), str(out_dir), chunk)
        return result
    out_dir, image_dir = Path(out_dir), Path(image_dir)
    manifest_path, rejects_path, done_path = _part_paths(out_dir, chunk)
    shard_path = out_dir / chunk.shard
    fingerprint = _chunk_fingerprint(settings, vocab_hash, chunk, image_dir)

    candidates, rejects = _screen(settings, chunk, image_dir)
    tokens = _tokenise(settings, candidates) if candidates else None
    manifest, unreadable = _write_shard(shard_path, chunk, candidates, tokens)
    rejects += unreadable
    # Rejects in input order whatever stage found them.
    order = {(cr.ref.ref_id, s.sent_id): i for i, (im, cr, s) in enumerate(_expressions(chunk))}
    rejects.sort(key=lambda r: order[(r["ref_id"], r["sent_id"])])
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    _write_parquet(manifest, MANIFEST_SCHEMA, manifest_path)
    _write_parquet(rejects, REJECTS_SCHEMA, rejects_path)

    result = ChunkResult(
        split=chunk.split,
        index=chunk.index,
        shard=chunk.shard,
        read=chunk.n_expressions,
        written=len(manifest),
        rejected=len(rejects),
        rejects_by_reason=dict(sorted(Counter(r["reason"] for r in rejects).items())),
        sha256=_file_sha256(shard_path),
        skipped=False,
    )
    if result.read != result.written + result.rejected:
        raise AssertionError(f"{chunk.shard}: read {result.read} != written + rejected")
    _mark_done(done_path, fingerprint, shard_path, result)
    return result


def _upload_chunk(staging: Path, out_url: str, chunk: Chunk) -> None:
    """Copy a chunk written under `staging` to `out_url`, its completion marker last: an upload
    cut short leaves no marker, so the next run redoes the chunk."""
    fs, root = fsspec.core.url_to_fs(out_url)
    for local in (staging / chunk.shard, *_part_paths(staging, chunk)):
        fs.put_file(str(local), f"{root}/{local.relative_to(staging).as_posix()}")


def _finished_remote_chunk(
    settings: PrepareSettings, vocab_hash: str, chunk: Chunk, out_url: str, image_dir: Path
) -> ChunkResult | None:
    """`finished_chunk` on object storage: the marker must match and the shard must have the
    size it had when the marker was written (uploads are whole objects: no torn writes)."""
    fs, root = fsspec.core.url_to_fs(out_url)
    _, _, done_path = _part_paths(PurePosixPath(root), chunk)
    try:
        marker = json.loads(fs.cat_file(str(done_path)))
        shard_size = fs.size(f"{root}/{chunk.shard}")
    except FileNotFoundError:
        return None
    fingerprint = _chunk_fingerprint(settings, vocab_hash, chunk, image_dir)
    if marker.get("fingerprint") != fingerprint or marker.get("size") != shard_size:
        return None
    return ChunkResult(**{**marker["result"], "skipped": True})


def _expressions(chunk: Chunk) -> Iterable[tuple]:
    for image in chunk.images:
        for chunk_ref in image.refs:
            for sentence in chunk_ref.ref.sentences:
                yield image, chunk_ref, sentence


# ---------------------------------------------------------------------------------------------
# Assembly


def _tool_versions() -> dict[str, str]:
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for dist in (
        "magnet-pipeline",
        "numpy",
        "pillow",
        "pycocotools",
        "pyarrow",
        "transformers",
        "tokenizers",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def assemble(plan: PreparePlan, results: Iterable[ChunkResult]) -> PrepareResult:
    """Join the chunks' parts into manifest.parquet and rejects.parquet, write summary.json,
    and remove shards a previous run with other settings left behind. Splits an earlier
    preparation wrote and this one did not redo (`plan.kept_splits`) keep their index entries."""
    if is_url(plan.out_dir):
        return _assemble_remote(plan, results)
    by_chunk = {(r.split, r.index): r for r in results}
    missing = [c.shard for c in plan.chunks if (c.split, c.index) not in by_chunk]
    if missing:
        raise RuntimeError(f"cannot assemble: {len(missing)} chunks unfinished, first {missing[0]}")
    out_dir = plan.out_dir
    listed = plan.index_splits or plan.splits
    previous = _previous_index(out_dir, plan.kept_splits)
    manifest_parts, reject_parts = [], []
    for split in listed:
        if split in previous:
            manifest_parts.append(previous[split].manifest)
            reject_parts.append(previous[split].rejects)
            continue
        for chunk in (c for c in plan.chunks if c.split == split):
            manifest_path, rejects_path, _ = _part_paths(out_dir, chunk)
            manifest_parts.append(pq.read_table(manifest_path, schema=MANIFEST_SCHEMA))
            reject_parts.append(pq.read_table(rejects_path, schema=REJECTS_SCHEMA))
    manifest = pa.concat_tables(manifest_parts) if manifest_parts else MANIFEST_SCHEMA.empty_table()
    rejects = pa.concat_tables(reject_parts) if reject_parts else REJECTS_SCHEMA.empty_table()
    manifest_schema = MANIFEST_SCHEMA
    if plan.kinds:
        kind_of = dict(plan.kinds)
        kinds = pa.array([kind_of.get(i) for i in manifest.column("sent_id").to_pylist()], pa.string())
        manifest, manifest_schema = (
            manifest.append_column(KIND_FIELD, kinds),
            MANIFEST_SCHEMA.append(KIND_FIELD),
        )
    _write_parquet(manifest.to_pylist(), manifest_schema, out_dir / MANIFEST)
    _write_parquet(rejects.to_pylist(), REJECTS_SCHEMA, out_dir / REJECTS)

    planned = {c.shard for c in plan.chunks}
    for split in plan.splits:
        for stale in sorted((out_dir / split).glob(SHARD_GLOB)):
            if f"{split}/{stale.name}" not in planned:
                stale.unlink()

    counts: dict[str, SplitCounts] = {}
    reasons: dict[str, dict[str, int]] = {}
    shards: list[ShardEntry] = []
    for split in listed:
        if split in previous:
            counts[split] = previous[split].counts
            reasons[split] = previous[split].rejects_by_reason
            shards += previous[split].shards
            continue
        chunks = [c for c in plan.chunks if c.split == split]
        chunk_results = [by_chunk[(c.split, c.index)] for c in chunks]
        counts[split] = SplitCounts(
            read=sum(r.read for r in chunk_results),
            written=sum(r.written for r in chunk_results),
            rejected=sum(r.rejected for r in chunk_results),
        )
        total: Counter[str] = Counter()
        for r in chunk_results:
            total.update(r.rejects_by_reason)
        reasons[split] = dict(sorted(total.items()))
        shards += [
            ShardEntry(path=c.shard, sha256=r.sha256, samples=r.written)
            for c, r in zip(chunks, chunk_results, strict=True)
        ]
    settings = plan.settings
    summary = Summary(
        dataset=settings.dataset,
        split_by=settings.split_by,
        format_version=FORMAT_VERSION,
        tokenizer=TokenizerRecord(name=settings.tokenizer, vocabulary_hash=plan.vocabulary_hash),
        counts=counts,
        rejects_by_reason=reasons,
        shards=tuple(shards),
        manifest_sha256=_file_sha256(out_dir / MANIFEST),
        rejects_sha256=_file_sha256(out_dir / REJECTS),
        versions=_tool_versions(),
        settings=SummarySettings(
            splits=tuple(listed),
            max_tokens=settings.max_tokens,
            samples_per_shard=settings.samples_per_shard,
            mask_mode=settings.mask_mode,
        ),
    )
    with written_whole(out_dir / SUMMARY) as tmp:
        tmp.write_bytes(summary.to_bytes())
    return PrepareResult(
        out_dir=out_dir,
        counts=counts,
        rejects_by_reason=reasons,
        shards=shards,
        summary=summary,
        chunks_skipped=sum(r.skipped for r in by_chunk.values()),
    )


@dataclass(frozen=True)
class _KeptSplit:
    """A split an earlier preparation wrote, as its index entries: carried into the new index."""

    manifest: pa.Table
    rejects: pa.Table
    counts: SplitCounts
    rejects_by_reason: dict[str, int]
    shards: list[ShardEntry]


def _previous_index(out_dir: Path, splits: tuple[str, ...]) -> dict[str, _KeptSplit]:
    """The earlier index's manifest and rejects rows, counts and shard entries of ``splits``."""
    if not splits:
        return {}
    summary = read_summary(str(out_dir))
    manifest = pq.read_table(out_dir / MANIFEST, schema=MANIFEST_SCHEMA)
    rejects = pq.read_table(out_dir / REJECTS, schema=REJECTS_SCHEMA)
    return {
        split: _KeptSplit(
            manifest=manifest.filter(pc.equal(manifest["split"], split)),
            rejects=rejects.filter(pc.equal(rejects["split"], split)),
            counts=summary.counts[split],
            rejects_by_reason=summary.rejects_by_reason[split],
            shards=summary.split_shards(split),
        )
        for split in splits
    }


def _assemble_remote(plan: PreparePlan, results: Iterable[ChunkResult]) -> PrepareResult:
    """`assemble` for a plan on object storage: fetch the chunks' parts into a local directory,
    assemble there, remove stale remote shards, then upload manifest, rejects and summary.json
    (last, so a summary is only there once what it describes is)."""
    fs, root = fsspec.core.url_to_fs(str(plan.out_dir))
    with tempfile.TemporaryDirectory(prefix="magnet-assemble-") as tmp:
        staging = Path(tmp)
        for chunk in plan.chunks:
            for local in _part_paths(staging, chunk)[:2]:
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{local.relative_to(staging).as_posix()}", str(local))
        if plan.kept_splits:  # the earlier index, merged with this preparation's splits
            for name in INDEX_FILES:
                fs.get_file(f"{root}/{name}", str(staging / name))
        result = assemble(replace(plan, out_dir=staging), results)
        planned = {c.shard for c in plan.chunks}
        for split in plan.splits:
            for stale in sorted(fs.glob(f"{root}/{split}/{SHARD_GLOB}")):
                if f"{split}/{PurePosixPath(stale).name}" not in planned:
                    fs.rm_file(stale)
        for name in (MANIFEST, REJECTS, SUMMARY):  # the summary last
            fs.put_file(str(staging / name), f"{root}/{name}")
    return replace(result, out_dir=plan.out_dir)


def prepare_dataset(
    refer_root: str | Path,
    dataset: str,
    split_by: str,
    out: str | Path,
    splits: Iterable[str] | None = None,
    tokenizer: str = PREPARE.tokenizer,
    max_tokens: int = PREPARE.max_tokens,
    samples_per_shard: int = PREPARE.samples_per_shard,
    workers: int = 1,
    mask_mode: MaskMode = PREPARE.mask_mode,
    image_dir: str | Path | None = None,
    on_chunk: Callable[[ChunkResult, int], None] | None = None,
) -> PrepareResult:
    """Prepare one dataset / splitBy into shards without an orchestrator.

    Args:
        refer_root, dataset, split_by, splits, image_dir: the input (see `plan_prepare`).
        out: output root, a directory or an fsspec URL (s3://bucket/prefix); writes
            `<out>/<dataset>-<splitBy>/`.
        tokenizer: Hugging Face name or path, or the offline alias `all-minilm-l6-v2`.
        max_tokens: token ids per expression (20 in the reference models).
        samples_per_shard: expressions per shard before it is cut at the next image.
        workers: processes for the chunks; the output does not depend on it.
        mask_mode: `union` or `refer` (see data_prep.masks).
        on_chunk: called with each finished chunk and the total number of chunks.
    """
    settings = PrepareSettings(dataset, split_by, tokenizer, max_tokens, samples_per_shard, mask_mode)
    plan = plan_prepare(refer_root, out, settings, splits, image_dir)
    jobs = [(settings, plan.vocabulary_hash, chunk, plan.out_dir, plan.image_dir) for chunk in plan.chunks]
    results: list[ChunkResult] = []

    def finished(result: ChunkResult) -> None:
        results.append(result)
        if on_chunk is not None:
            on_chunk(result, len(jobs))

    todo = []
    for job in jobs:  # finished chunks are found here, so a full re-run starts no processes
        done = finished_chunk(*job)
        if done is not None:
            finished(done)
        else:
            todo.append(job)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            finished(prepare_chunk(*job))
    else:
        # spawn: the parent has used the (multi-threaded) Rust tokenizer, which fork can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, context, leave_sigint_to_parent) as pool:
            for future in as_completed([pool.submit(prepare_chunk, *job) for job in todo]):
                finished(future.result())
    return assemble(plan, results)

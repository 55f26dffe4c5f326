"""Reading a referring-segmentation dataset of one's own: a plain folder made by hand.

    <root>/annotations.jsonl (or annotations.csv)   one row per referred object (or expression)
    <root>/<image paths named in the rows>          the images, JPEG or PNG
    <root>/<mask paths named in the rows>           one mask per object (data_prep.images.decode_mask:
                                                    the opaque pixels of a mask with transparency,
                                                    else its non-black pixels), at the image's
                                                    upright size (EXIF orientation applied)

A JSONL row: {"image": "...", "mask": "...", "expressions": ["...", ...], "split": "train"}
("expression": "..." for one). A CSV has the columns image, mask, expression, split, one
expression per row. Other keys and columns are ignored. Rows naming the same image and mask are
one object whose expressions add up in row order.

The reader produces the records the refer reader does (`ReferData`), so the same preparation
writes the same shards, manifest, rejects and summary. Ids follow row order: an image's id is
its rank among first appearances, an object's ref_id (and ann_id) likewise, sent_ids number the
expressions; the same file gives the same ids. What a row holds is judged by the preparation
(a missing or broken image or mask, a bad expression: a rejects row); a file that cannot be read
as rows at all (not JSON, a missing field, a path outside the folder, a split that is no safe
directory name (data_prep.paths.check_name), one object in two splits)
is refused before any work, naming every bad line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from data_prep.contract import check_split
from data_prep.images import UnreadableImage, decode_mask, shown_size, turn_note
from data_prep.masks import UnusableSegmentation
from data_prep.refer import Annotation, ImageInfo, Ref, ReferData, ReferFormatError, Sentence

ANNOTATION_FILES = ("annotations.jsonl", "annotations.csv")
FOLDER_SPLIT_BY = "folder"
"""The splitBy a folder dataset is prepared under: `<out>/<dataset>-folder/`."""
CSV_COLUMNS = ("image", "mask", "expression", "split")
_MAX_NAMED_ROWS = 10  # bad rows named in one error message


class MaskFileError(ValueError):
    """A mask file is missing or does not decode; `reason` is the rejects reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class MaskFile:
    """A segmentation given as a mask image, its path relative to the dataset folder."""

    path: str


@dataclass(frozen=True)
class AnnotationRow:
    """One annotation row after its structure was checked."""

    line: int
    image: str
    mask: str
    expressions: tuple[object, ...]  # as stored: the preparation rejects what is not text
    split: str


def is_folder_dataset(root: str | Path) -> bool:
    """Whether `root` holds a folder dataset (an annotations file) rather than the refer layout."""
    return any((Path(root) / name).is_file() for name in ANNOTATION_FILES)


def _annotation_file(root: Path) -> Path:
    found = [root / name for name in ANNOTATION_FILES if (root / name).is_file()]
    if len(found) != 1:
        held = "both of" if found else "none of"
        raise ReferFormatError(f"{root}: holds {held} {' and '.join(ANNOTATION_FILES)}, expected one")
    return found[0]


def _inside(value: object, field: str) -> str:
    """A path relative to the folder, in POSIX form; ValueError when it is not one."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field!r} must be a non-empty path, got {value!r}")
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{field} path {value!r} leaves the folder")
    return str(path)


def _row(line: int, record: object) -> AnnotationRow:
    """Check one row's structure; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    missing = [key for key in ("image", "mask", "split") if key not in record]
    if missing:
        raise ValueError(f"no {', '.join(repr(key) for key in missing)}")
    if ("expression" in record) == ("expressions" in record):
        raise ValueError("needs exactly one of 'expression' and 'expressions'")
    if "expression" in record:
        expressions = (record["expression"],)
    else:
        expressions = record["expressions"]
        if not isinstance(expressions, list) or not expressions:
            raise ValueError(f"'expressions' must be a non-empty list, got {expressions!r}")
    split = check_split(record["split"])  # it becomes <out>/<dataset>-folder/<split>/
    return AnnotationRow(
        line, _inside(record["image"], "image"), _inside(record["mask"], "mask"), tuple(expressions), split
    )


def _records(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed record) for each row; a line that does not parse is a ValueError
    standing in for its record."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a byte-order mark
    except UnicodeDecodeError as err:
        raise ReferFormatError(f"{path}: not UTF-8 text ({err})") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        absent = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or ())]
        if absent:
            raise ReferFormatError(
                f"{path}: no column {', '.join(absent)} (columns: {', '.join(CSV_COLUMNS)})"
            )
        return [(reader.line_num, dict(record)) for record in reader]
    records: list[tuple[int, object]] = []
    for line, content in enumerate(text.splitlines(), start=1):
        if content.strip():
            try:
                records.append((line, json.loads(content)))
            except json.JSONDecodeError as err:
                records.append((line, ValueError(f"not JSON ({err.msg})")))
    return records


def read_rows(root: str | Path) -> list[AnnotationRow]:
    """The annotation rows of a folder dataset, their structure checked; every bad line is named
    in one ReferFormatError, before any image is opened."""
    path = _annotation_file(Path(root))
    rows: list[AnnotationRow] = []
    problems: list[str] = []
    split_of: dict[tuple[str, str], AnnotationRow] = {}
    for line, record in _records(path):
        try:
            if isinstance(record, ValueError):
                raise record
            row = _row(line, record)
            first = split_of.setdefault((row.image, row.mask), row)
            if first.split != row.split:
                raise ValueError(
                    f"{row.mask} on {row.image} is in split {row.split!r}, "
                    f"on line {first.line} in {first.split!r}"
                )
            rows.append(row)
        except ValueError as err:
            problems.append(f"line {line}: {err}")
    if problems:
        named = "; ".join(problems[:_MAX_NAMED_ROWS])
        more = f" (and {len(problems) - _MAX_NAMED_ROWS} more)" if len(problems) > _MAX_NAMED_ROWS else ""
        rows_word = "row" if len(problems) == 1 else "rows"
        raise ReferFormatError(f"{path}: {len(problems)} bad {rows_word}: {named}{more}")
    if not rows:
        raise ReferFormatError(f"{path}: no rows")
    return rows


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) upright (EXIF orientation applied) from the image's header, or (0, 0) when
    it cannot be read: the image is then rejected as missing or corrupt when its chunk decodes it."""
    try:
        with Image.open(path) as image:
            width, height = shown_size(image)
        return height, width
    except Exception:  # PIL raises many types for bad data; the chunk names the problem
        return 0, 0


def load_folder(root: str | Path, dataset: str, split_by: str = FOLDER_SPLIT_BY) -> ReferData:
    """Read a folder dataset (see the module docstring) into the refer reader's records.

    Args:
        root: the folder holding annotations.jsonl or annotations.csv.
        dataset, split_by: the names the preparation writes under (`<dataset>-<split_by>`).
    """
    root = Path(root)
    rows = read_rows(root)
    image_ids: dict[str, int] = {}
    ref_ids: dict[tuple[str, str], int] = {}
    sentences: dict[int, list[Sentence]] = {}
    split_of: dict[int, str] = {}
    next_sent_id = 1
    for row in rows:
        image_ids.setdefault(row.image, len(image_ids) + 1)
        ref_id = ref_ids.setdefault((row.image, row.mask), len(ref_ids) + 1)
        split_of[ref_id] = row.split
        for raw in row.expressions:
            sentences.setdefault(ref_id, []).append(Sentence(next_sent_id, raw))
            next_sent_id += 1
    images = {
        image_id: ImageInfo(image_id, name, *_image_size(root / name)) for name, image_id in image_ids.items()
    }
    annotations = {
        ref_id: Annotation(ref_id, image_ids[image], category_id=0, segmentation=MaskFile(mask), iscrowd=0)
        for (image, mask), ref_id in ref_ids.items()
    }
    refs = tuple(
        Ref(ref_id, ref_id, image_ids[image], 0, split_of[ref_id], tuple(sentences[ref_id]))
        for (image, _), ref_id in ref_ids.items()
    )
    return ReferData(dataset, split_by, refs, images, annotations, image_dir=root)


def read_mask(root: Path, mask: MaskFile, height: int, width: int) -> np.ndarray:
    """The object's mask [height, width] uint8 {0, 1}, read by `data_prep.images.decode_mask`
    (upright; the opaque pixels of a mask with transparency, else the non-black ones). Messages
    name the file relative to the folder, so they do not depend on where it lies.

    Raises:
        MaskFileError: the file is missing (`missing_mask`) or does not decode (`corrupt_mask`).
        UnusableSegmentation: the mask's size differs from the image's, or it is empty.
    """
    try:
        data = (root / mask.path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise MaskFileError("missing_mask", f"{mask.path} not found in the folder") from None
    try:
        pixels = decode_mask(data)  # [H, W] bool
    except UnreadableImage as err:
        raise MaskFileError("corrupt_mask", f"{mask.path}: {err}") from None
    if pixels.shape != (height, width):
        size = (pixels.shape[1], pixels.shape[0])
        raise UnusableSegmentation(
            f"mask {mask.path} is {size[0]}x{size[1]}, the image {width}x{height}"
            f"{turn_note((width, height), size, 'the mask')}"
        )
    if not pixels.any():
        raise UnusableSegmentation(f"mask {mask.path} is empty (no object pixel: all black or transparent)")
    return pixels.astype(np.uint8)

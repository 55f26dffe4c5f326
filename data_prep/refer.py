"""Reading RefCOCO-family data in the layout of the `refer` toolkit.

    <root>/<dataset>/instances.json      COCO-style images, annotations, categories
    <root>/<dataset>/refs(<splitBy>).p   a pickle: a list of refs with their sentences
    <root>/images/mscoco/images/train2014/<file_name>

The refs pickle is read through an unpickler that admits only plain containers, strings, bytes
and numbers, because a pickle can run arbitrary code when loaded. Byte strings are text in
UTF-8, whichever Python wrote them. Image names and sizes come from instances.json: a ref's own
`file_name` names the ref, not the image file.

Split selection follows the refer toolkit (`REFER.getRefIds`), quirks included:
`train` and `val` match exactly; `testA` / `testB` / `testC` select every stored split whose
name contains that letter (so `testAB` too); `test` selects every stored split containing
"test" (on RefCOCO that is testA + testB). A name that selects nothing is an error.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from data_prep.contract import check_split
from data_prep.paths import UnsafeNameError
from data_prep.scenes import KINDS

DATASETS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc", "google"),
    "refcocog": ("umd", "google"),
}
"""Datasets and the splitBy variants (refs files) each one ships."""

IMAGE_SUBDIR = Path("images/mscoco/images/train2014")
_SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")


class ReferFormatError(ValueError):
    """The refer-format input is malformed; the message names the file and the problem."""


class UnsafePickleError(ReferFormatError):
    """A refs pickle asked to load something other than plain data."""


@dataclass(frozen=True)
class Sentence:
    """One referring expression. `raw` is the stored value, byte strings decoded: anything but
    a str (None, a number, bytes that are not UTF-8) is kept as it is, so that preparation
    rejects that one expression (`expression_not_text`) instead of writing its repr."""

    sent_id: int
    raw: object


@dataclass(frozen=True)
class Ref:
    """One referred object and its expressions."""

    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str
    sentences: tuple[Sentence, ...]


@dataclass(frozen=True)
class ImageInfo:
    """An image as instances.json describes it."""

    image_id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class Annotation:
    """A COCO annotation: its segmentation is polygons (list of flat x,y lists) or RLE (dict)."""

    ann_id: int
    image_id: int
    category_id: int
    segmentation: Any
    iscrowd: int


@dataclass(frozen=True)
class ReferData:
    """Everything one refs file and its instances.json hold, indexed by id."""

    dataset: str
    split_by: str
    refs: tuple[Ref, ...]
    images: dict[int, ImageInfo]
    annotations: dict[int, Annotation]
    image_dir: Path

    def stored_splits(self) -> list[str]:
        """The split names written in the refs, in the conventional order."""
        names = {ref.split for ref in self.refs}
        return sorted(names, key=_split_sort_key)

    def available_splits(self) -> list[str]:
        """Names `select` accepts: the stored ones, plus `test` when any stored name has it."""
        names = self.stored_splits()
        if "test" not in names and any("test" in name for name in names):
            names = sorted([*names, "test"], key=_split_sort_key)
        return names

    def select(self, split: str) -> list[Ref]:
        """Refs of `split`, matched as the refer toolkit does (see the module docstring)."""
        if split in ("train", "val"):
            chosen = [ref for ref in self.refs if ref.split == split]
        elif split in ("testA", "testB", "testC"):
            chosen = [ref for ref in self.refs if "test" in ref.split and split[-1] in ref.split]
        elif split == "test":
            chosen = [ref for ref in self.refs if "test" in ref.split]
        else:
            chosen = [ref for ref in self.refs if ref.split == split]
        if not chosen:
            raise ValueError(
                f"unknown split {split!r} for {self.dataset} ({self.split_by}): "
                f"available splits are {', '.join(self.available_splits())}"
            )
        return chosen


def _split_sort_key(name: str) -> tuple[int, str]:
    return (_SPLIT_ORDER.index(name) if name in _SPLIT_ORDER else len(_SPLIT_ORDER), name)


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable that is not plain data."""


def _latin1_bytes(text: str = "", encoding: str = "latin1") -> bytes:
    """How a protocol-2 pickle written by Python 3 stores bytes: `_codecs.encode(text, "latin1")`.
    Only that codec is admitted, so the global cannot reach any other."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _RefusedGlobal(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a byte string")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """How a protocol-2 pickle written by Python 3 stores b"": `bytes()`. Any argument is refused
    (bytes(n) would allocate n bytes)."""
    if args:
        raise _RefusedGlobal(f"bytes() called with {len(args)} arguments is not a byte string")
    return b""


class _PlainDataUnpickler(pickle.Unpickler):
    """Admits the opcodes for containers, strings and numbers; any global is refused, bar the
    harmless builtins Python 2 pickles use for sets and the two Python 3 uses for bytes."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Callable[..., Any]]] = {
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "set"): set,  # Python 2's name (and Python 3's with fix_imports)
        ("__builtin__", "frozenset"): frozenset,
        ("__builtin__", "bytes"): _empty_bytes,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]
        raise _RefusedGlobal(f"global '{module}.{name}' is not plain data")


def load_refs_pickle(path: str | Path) -> Any:
    """Load a refs pickle admitting only plain data; a refused global raises UnsafePickleError,
    a file that ends early or is no pickle a ReferFormatError that says which."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            # Python 2 pickles (the published refs files) keep byte strings: read them as UTF-8.
            return _PlainDataUnpickler(handle, encoding="utf-8").load()
    except _RefusedGlobal as err:
        raise UnsafePickleError(f"{path}: refused to load, not a plain-data pickle ({err})") from None
    except (EOFError, pickle.UnpicklingError) as err:
        # The C unpickler reports data that stops mid-opcode as "pickle data was truncated".
        if isinstance(err, EOFError) or "truncated" in str(err):
            size = path.stat().st_size
            raise ReferFormatError(
                f"{path}: truncated file, the pickle stops before its end ({size} bytes); copy it again"
            ) from None
        raise ReferFormatError(f"{path}: not a readable refs pickle ({err})") from None
    except (UnicodeDecodeError, ValueError, TypeError) as err:
        raise ReferFormatError(f"{path}: not a readable refs pickle ({err})") from None


def _text(value: object) -> object:
    """A stored string as str: bytes are UTF-8 text (as the unpickler reads Python 2 strings);
    bytes that do not decode, and anything else, come back unchanged."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _int(value: Any, what: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReferFormatError(f"{where}: {what} must be an integer, got {value!r}")
    return value


def _split_name(value: object, where: Path) -> str:
    """The ref's split, which becomes a directory of the prepared output: text and a safe name."""
    name = _text(value)
    if not isinstance(name, str):
        raise ReferFormatError(f"{where}: split must be text, got {value!r}")
    try:
        return check_split(name)
    except UnsafeNameError as err:
        raise ReferFormatError(f"{where}: {err}") from None


def _parse_ref(item: Any, where: Path) -> Ref:
    if not isinstance(item, dict):
        raise ReferFormatError(f"{where}: each ref must be a dict, got {type(item).__name__}")
    try:
        sentences = tuple(
            Sentence(sent_id=_int(s["sent_id"], "sent_id", where), raw=_text(s["raw"]))
            for s in item["sentences"]
        )
        return Ref(
            ref_id=_int(item["ref_id"], "ref_id", where),
            ann_id=_int(item["ann_id"], "ann_id", where),
            image_id=_int(item["image_id"], "image_id", where),
            category_id=_int(item.get("category_id", 0), "category_id", where),
            split=_split_name(item["split"], where),
            sentences=sentences,
        )
    except (KeyError, TypeError) as err:
        raise ReferFormatError(f"{where}: ref {item.get('ref_id', '?')} lacks field {err}") from None


def refer_files(refer_root: str | Path, dataset: str, split_by: str) -> tuple[Path, Path]:
    """The refs pickle and instances.json of `dataset` / `split_by`, checked to exist, without
    reading them: a ValueError names an unknown dataset or splitBy, a FileNotFoundError the
    missing root or file."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if split_by not in DATASETS[dataset]:
        raise ValueError(
            f"{dataset} has no splitBy {split_by!r}: expected one of {', '.join(DATASETS[dataset])}"
        )
    root = Path(refer_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected the refer layout there)")
    refs_path = root / dataset / f"refs({split_by}).p"
    instances_path = root / dataset / "instances.json"
    for path in (refs_path, instances_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (expected the refer layout under {root})")
    return refs_path, instances_path


def load_refs(refs_path: str | Path) -> tuple[Ref, ...]:
    """The refs of a refs pickle, each checked (ids, split names); `magnet prepare` reads them
    before its flow starts, so a bad file is named there."""
    raw_refs = load_refs_pickle(refs_path)
    if not isinstance(raw_refs, list):
        raise ReferFormatError(f"{refs_path}: expected a list of refs, got {type(raw_refs).__name__}")
    return tuple(_parse_ref(item, Path(refs_path)) for item in raw_refs)


def load_refer(
    refer_root: str | Path, dataset: str, split_by: str, image_dir: str | Path | None = None
) -> ReferData:
    """Read `<refer_root>/<dataset>/refs(<split_by>).p` and its instances.json.

    Args:
        refer_root: the directory holding the dataset directories and `images/`.
        dataset: refcoco, refcoco+ or refcocog.
        split_by: unc or google (refcoco, refcoco+), umd or google (refcocog).
        image_dir: where the image files are; default `<refer_root>/images/mscoco/images/train2014`.
    """
    root = Path(refer_root)
    refs_path, instances_path = refer_files(root, dataset, split_by)
    refs = load_refs(refs_path)

    try:
        instances = json.loads(instances_path.read_text(encoding="utf-8"))
        images = {
            int(im["id"]): ImageInfo(int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))
            for im in instances["images"]
        }
        annotations = {
            int(an["id"]): Annotation(
                ann_id=int(an["id"]),
                image_id=int(an["image_id"]),
                category_id=int(an.get("category_id", 0)),
                segmentation=an.get("segmentation"),
                iscrowd=int(an.get("iscrowd", 0)),
            )
            for an in instances["annotations"]
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ReferFormatError(f"{instances_path}: not COCO-style instances ({err!r})") from None

    return ReferData(
        dataset=dataset,
        split_by=split_by,
        refs=refs,
        images=images,
        annotations=annotations,
        image_dir=Path(image_dir) if image_dir is not None else root / IMAGE_SUBDIR,
    )


def kinds_path(refer_root: Path, dataset: str, split_by: str) -> Path:
    """Where the kinds of a refs file lie: ``<root>/<dataset>/kinds(<splitBy>).json``."""
    return Path(refer_root) / dataset / f"kinds({split_by}).json"


def load_kinds(refer_root: str | Path, dataset: str, split_by: str) -> dict[int, str] | None:
    """sent_id -> kind from the generator's kinds file, or None when there is none (real data).

    Raises ReferFormatError naming the file when it is not what ``synthesize`` writes.
    """
    path = kinds_path(Path(refer_root), dataset, split_by)
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())["sentences"]
        kinds = {int(e["sent_id"]): str(e["kind"]) for e in entries}
    except (ValueError, KeyError, TypeError) as err:
        raise ReferFormatError(f"{path}: not a kinds file ({type(err).__name__}: {err})") from None
    unknown = sorted(set(kinds.values()) - set(KINDS))
    if unknown:
        raise ReferFormatError(f"{path}: unknown kinds {unknown}; expected {', '.join(KINDS)}")
    return kinds

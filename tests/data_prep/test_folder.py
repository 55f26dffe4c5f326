"""A dataset of one's own (data_prep.folder): images, one mask per object and annotations.jsonl
or .csv, prepared into the same shards, manifest and rejects as the refer layout."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from outputs import output_digests
from PIL import Image

from data_prep.contract import MANIFEST, REJECTS, read_summary
from data_prep.folder import load_folder
from data_prep.masks import decode_rles
from data_prep.refer import ReferFormatError
from data_prep.shards import REJECT_REASONS, prepare_dataset

# Rows of annotations.jsonl: what each holds and what its expressions must become.
ROWS = [
    {"image": "images/a.jpg", "mask": "masks/man.png", "expressions": ["the man on the left", "tall man"]},
    {"image": "./images/a.jpg", "mask": "masks/dog.png", "expression": "the brown dog", "note": "ignored"},
    {"image": "images/a.jpg", "mask": "masks/man.png", "expression": "the man again"},  # same object
    {
        "image": "images/b.png",
        "mask": "masks/cup.png",
        "expressions": ["le café", None, 42, "😀😀", " ", "cup"],
    },
    {"image": "images/missing.jpg", "mask": "masks/man.png", "expression": "no image file"},
    {"image": "images/broken.jpg", "mask": "masks/man.png", "expression": "image does not decode"},
    {"image": "images/a.jpg", "mask": "masks/nope.png", "expression": "no mask file"},
    {"image": "images/a.jpg", "mask": "masks/broken.png", "expression": "mask does not decode"},
    {"image": "images/a.jpg", "mask": "masks/small.png", "expression": "mask of another size"},
    {"image": "images/a.jpg", "mask": "masks/black.png", "expression": "mask without object"},
    {"image": "images/b.png", "mask": "masks/rgba.png", "expression": "the plate"},
]
SPLITS = ["train", "train", "train", "val", "val", "val", "test", "test", "test", "test", "test"]

EXPECTED_COUNTS = {
    "train": {"read": 4, "written": 4, "rejected": 0},
    "val": {"read": 8, "written": 2, "rejected": 6},
    "test": {"read": 5, "written": 1, "rejected": 4},
}
EXPECTED_REJECTS = {
    "train": {},
    "val": {
        "corrupt_image": 1,
        "empty_expression": 1,
        "expression_not_text": 2,
        "missing_image": 1,
        "no_known_words": 1,
    },
    "test": {"corrupt_mask": 1, "missing_mask": 1, "unusable_segmentation": 2},
}


def _image(path: Path, width: int, height: int, fmt: str, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def _mask(path: Path, array: np.ndarray, mode: str) -> None:
    """Save `array` ([H, W] bool, the object) as a mask image of `mode`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        image = Image.fromarray(array.astype(np.uint8) * 255, mode="L")
    elif mode == "RGB":  # a coloured object on black
        rgb = np.zeros((*array.shape, 3), dtype=np.uint8)
        rgb[array] = (0, 0, 7)  # dark, but not black
        image = Image.fromarray(rgb)
    elif mode == "P":
        image = Image.fromarray(array.astype(np.uint8), mode="L").convert("P")
        image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    else:  # RGBA: colour where the object is, transparent black elsewhere
        rgba = np.zeros((*array.shape, 4), dtype=np.uint8)
        rgba[array] = (255, 255, 255, 255)
        image = Image.fromarray(rgba, mode="RGBA")
    image.save(path, format="PNG")


def _box(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    array = np.zeros((height, width), dtype=bool)
    array[y0:y1, x0:x1] = True
    return array


MASKS = {  # name -> (object [H, W], mode)
    "man.png": (_box(30, 40, 2, 20, 3, 15), "L"),
    "dog.png": (_box(30, 40, 10, 28, 20, 38), "RGB"),
    "cup.png": (_box(24, 32, 4, 12, 4, 30), "P"),
    "rgba.png": (_box(24, 32, 15, 22, 1, 9), "RGBA"),
    "small.png": (_box(20, 20, 2, 5, 2, 5), "L"),
    "black.png": (np.zeros((30, 40), dtype=bool), "L"),
}


def build_folder(root: Path, rows: list[dict], fmt: str = "jsonl") -> Path:
    """The folder: images a.jpg (40x30) and b.png (32x24), a broken one, the masks, the rows."""
    _image(root / "images/a.jpg", 40, 30, "JPEG", 1)
    _image(root / "images/b.png", 32, 24, "PNG", 2)
    (root / "images/broken.jpg").write_bytes(b"not an image" * 20)
    for name, (array, mode) in MASKS.items():
        _mask(root / "masks" / name, array, mode)
    (root / "masks/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    if fmt == "jsonl":
        lines = [
            json.dumps({**row, "split": split}, ensure_ascii=False)
            for row, split in zip(rows, SPLITS, strict=True)
        ]
        (root / "annotations.jsonl").write_text(
            "\n".join([*lines[:3], "", *lines[3:]]) + "\n", encoding="utf-8"
        )
    else:  # one expression per row
        with (root / "annotations.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["split", "image", "mask", "expression", "comment"])
            for row, split in zip(rows, SPLITS, strict=True):
                for text in row.get("expressions", [row.get("expression")]):
                    writer.writerow([split, row["image"], row["mask"], text, "a, quoted; comment"])
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_folder(tmp_path_factory.mktemp("mine"), ROWS)


@pytest.fixture(scope="module")
def prepared(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    return Path(prepare_dataset(folder, "mine", "folder", out, samples_per_shard=3).out_dir)


def test_rows_become_the_refer_readers_records(folder: Path) -> None:
    data = load_folder(folder, "mine")
    assert (data.dataset, data.split_by, data.image_dir) == ("mine", "folder", folder)
    # Ids in row order; rows naming the same image and mask are one object.
    assert {i: (im.file_name, im.width, im.height) for i, im in data.images.items()} == {
        1: ("images/a.jpg", 40, 30),
        2: ("images/b.png", 32, 24),
        3: ("images/missing.jpg", 0, 0),
        4: ("images/broken.jpg", 0, 0),
    }
    man = data.refs[0]
    assert (man.ref_id, man.ann_id, man.image_id, man.split) == (1, 1, 1, "train")
    assert [(s.sent_id, s.raw) for s in man.sentences] == [
        (1, "the man on the left"),
        (2, "tall man"),
        (4, "the man again"),
    ]
    assert data.refs[1].image_id == 1  # "./images/a.jpg" is images/a.jpg
    assert [s.raw for s in data.refs[2].sentences] == ["le café", None, 42, "😀😀", " ", "cup"]
    assert data.stored_splits() == ["train", "val", "test"]


def test_counts_and_every_mask_file_reason(prepared: Path) -> None:
    summary = read_summary(str(prepared))
    assert (summary.dataset, summary.split_by) == ("mine", "folder")
    assert {split: counts.model_dump() for split, counts in summary.counts.items()} == EXPECTED_COUNTS
    assert summary.rejects_by_reason == EXPECTED_REJECTS
    assert {r for split in EXPECTED_REJECTS.values() for r in split} <= set(REJECT_REASONS)
    rejects = {
        r["sent_id"]: (r["reason"], r["detail"]) for r in pq.read_table(prepared / REJECTS).to_pylist()
    }
    assert rejects[11] == ("missing_image", "images/missing.jpg not found in the image directory")
    assert rejects[12] == ("corrupt_image", "images/broken.jpg: not a recognised image format")
    assert rejects[13] == ("missing_mask", "masks/nope.png not found in the folder")
    assert rejects[14][0] == "corrupt_mask" and rejects[14][1].startswith("masks/broken.png: ")
    assert rejects[15] == (
        "unusable_segmentation",
        "ann_id 8: mask masks/small.png is 20x20, the image 40x30",
    )
    assert rejects[16] == (
        "unusable_segmentation",
        "ann_id 9: mask masks/black.png is empty (no object pixel: all black or transparent)",
    )


def test_written_masks_are_the_mask_files_objects(prepared: Path) -> None:
    manifest = {r["sent_id"]: r for r in pq.read_table(prepared / MANIFEST).to_pylist()}
    assert sorted(manifest) == [1, 2, 3, 4, 5, 10, 17]
    assert manifest[5]["raw"] == "le café"
    expected = {1: "man.png", 3: "dog.png", 5: "cup.png", 17: "rgba.png"}
    checked = False
    for shard in sorted(prepared.glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "mask.png" and int(key) in expected:
                    pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                    obj, _ = MASKS[expected[int(key)]]
                    np.testing.assert_array_equal(pixels, obj.astype(np.uint8) * 255)
                    assert manifest[int(key)]["mask_area"] == obj.sum()
                if ext == "objects.json" and int(key) == 1:  # image a.jpg: the man, the dog; no other mask
                    objects = json.loads(tar.extractfile(member).read())
                    assert [o["ann_id"] for o in objects] == [1, 2]
                    found = decode_rles([o["rle"] for o in objects], 30, 40)
                    np.testing.assert_array_equal(found, [MASKS["man.png"][0], MASKS["dog.png"][0]])
                    checked = True
    assert checked


def test_csv_gives_the_same_bytes_and_reruns_are_identical(tmp_path: Path, prepared: Path) -> None:
    text_rows = [dict(row) for row in ROWS]
    text_rows[3] = {
        **ROWS[3],
        "expressions": ["le café", "None", "42", "😀😀", " ", "cup"],
    }  # CSV holds text only
    as_jsonl = build_folder(tmp_path / "jsonl", text_rows)
    as_csv = build_folder(tmp_path / "csv", text_rows, fmt="csv")
    first = prepare_dataset(as_jsonl, "mine", "folder", tmp_path / "out-jsonl", samples_per_shard=3)
    second = prepare_dataset(as_csv, "mine", "folder", tmp_path / "out-csv", samples_per_shard=3)
    assert output_digests(Path(first.out_dir)) == output_digests(Path(second.out_dir))
    assert first.counts["val"].written == 4  # "None" and "42" are text in a CSV
    again = prepare_dataset(as_csv, "mine", "folder", tmp_path / "out-csv", samples_per_shard=3)
    assert again.chunks_skipped == len(again.shards)
    (as_csv / "masks/man.png").write_bytes((as_csv / "masks/dog.png").read_bytes())  # a mask edited
    edited = prepare_dataset(as_csv, "mine", "folder", tmp_path / "out-csv", samples_per_shard=3)
    assert 0 < edited.chunks_skipped < len(edited.shards)


def test_bad_rows_are_all_named_before_any_work(tmp_path: Path) -> None:
    good = {"image": "images/a.jpg", "mask": "masks/man.png", "expression": "x", "split": "train"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"image": "images/a.jpg", "mask": "masks/dog.png", "expression": "x"}),
        json.dumps({**good, "image": "../outside.jpg"}),
        json.dumps({**good, "mask": "masks/dog.png", "expression": None, "expressions": []}),
        json.dumps({"image": "images/a.jpg", "mask": "masks/dog.png", "expressions": [], "split": "train"}),
        json.dumps({**good, "split": "val"}),
        json.dumps(["a", "list"]),
    ]
    root = tmp_path / "bad"
    root.mkdir()
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReferFormatError) as caught:
        prepare_dataset(root, "bad", "folder", tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{root / 'annotations.jsonl'}: 7 bad rows: line 2: not JSON")
    for expected in (
        "line 3: no 'split'",
        "line 4: image path '../outside.jpg' leaves the folder",
        "line 5: needs exactly one of 'expression' and 'expressions'",
        "line 6: 'expressions' must be a non-empty list, got []",
        "line 7: masks/man.png on images/a.jpg is in split 'val', on line 1 in 'train'",
        "line 8: expected an object, got list",
    ):
        assert expected in message
    assert not (tmp_path / "out").exists()

    (root / "annotations.csv").write_text("image,mask,text,split\n")
    with pytest.raises(ReferFormatError, match=r"holds both of annotations\.jsonl and annotations\.csv"):
        load_folder(root, "bad")
    (root / "annotations.jsonl").unlink()
    with pytest.raises(ReferFormatError, match=r"annotations.csv: no column expression"):
        load_folder(root, "bad")
    (root / "annotations.csv").write_bytes(
        "image,mask,expression,split\na,b,caf\xe9,train\n".encode("latin1")
    )
    with pytest.raises(ReferFormatError, match=r"annotations.csv: not UTF-8 text"):
        load_folder(root, "bad")


def test_names_that_would_leave_the_output_are_refused_before_any_write(tmp_path: Path) -> None:
    """A split or dataset name becomes a directory: one that climbs out (onto another dataset's
    shards, or out of --out), lands in the writer's own files or hides is refused by line before
    anything is written, and the other dataset keeps its bytes."""
    out = tmp_path / "a" / "b" / "out"
    other = out / "other-unc" / "train" / "shard-000000.tar"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another dataset's shard")
    good = {"image": "images/a.jpg", "mask": "masks/man.png", "expression": "the man"}
    masks = ["man.png", "dog.png", "cup.png", "rgba.png", "small.png", "black.png"]
    splits = ["train", "../other-unc/train", "_work", "../../../escaped", "summary.json", ".hidden"]
    root = tmp_path / "names"
    build_folder(root, ROWS)
    (root / "annotations.jsonl").write_text(
        "".join(
            json.dumps({**good, "mask": f"masks/{mask}", "split": split}) + "\n"
            for mask, split in zip(masks, splits, strict=True)
        )
    )
    with pytest.raises(ReferFormatError) as caught:
        prepare_dataset(root, "mine", "folder", out)
    message = str(caught.value)
    assert message.startswith(f"{root / 'annotations.jsonl'}: 5 bad rows: line 2: split '../other-unc/train'")
    assert "line 3: split '_work' cannot name a directory" in message
    assert "line 5: split 'summary.json' is reserved" in message
    with pytest.raises(ValueError, match=r"dataset '\.\./other' cannot name a directory"):
        prepare_dataset(root, "../other", "folder", out)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents] == [other]
    assert other.read_bytes() == b"another dataset's shard"

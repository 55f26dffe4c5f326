"""Preparation on the hand-built fixture: counts, rejects, shard contents, determinism, re-runs."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from outputs import output_digests
from PIL import Image
from refer_fixture import ANNOTATIONS, EXPECTED, IMAGES

from data_prep.contract import (
    INDEX_FILES,
    MANIFEST,
    META_MEMBER,
    REJECTS,
    SUMMARY,
    SampleMeta,
    TokenizerRecord,
    read_summary,
)
from data_prep.masks import decode_rles, rasterize
from data_prep.shards import REJECT_REASONS, prepare_dataset
from data_prep.tokenize import encode_expressions, load_tokenizer, vocabulary_hash


@pytest.fixture(scope="module")
def prepared(refer_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(refer_root, "refcoco", "unc", out, samples_per_shard=4)
    return out / "refcoco-unc"


def test_counts_and_every_reject_reason(prepared: Path) -> None:
    summary = read_summary(str(prepared))
    assert {split: counts.model_dump() for split, counts in summary.counts.items()} == EXPECTED["counts"]
    assert summary.rejects_by_reason == EXPECTED["rejects"]
    found = {r for split in EXPECTED["rejects"].values() for r in split}
    # The fixture exercises every reason but those of mask files (test_folder.py) and of a picture
    # of too many pixels (test_image_modes.py).
    assert found == set(REJECT_REASONS) - {"missing_mask", "corrupt_mask", "image_too_large"}


def test_read_equals_written_plus_rejected(prepared: Path) -> None:
    manifest = pq.read_table(prepared / MANIFEST).to_pylist()
    rejects = pq.read_table(prepared / REJECTS).to_pylist()
    for split, counts in EXPECTED["counts"].items():
        written = [r for r in manifest if r["split"] == split]
        rejected = [r for r in rejects if r["split"] == split]
        assert len(written) == counts["written"] and len(rejected) == counts["rejected"]
        assert counts["read"] == len(written) + len(rejected)
    reasons = {(r["sent_id"], r["reason"]) for r in rejects}
    assert {(4, "empty_expression"), (5, "empty_expression"), (6, "empty_tokens")} <= reasons
    assert {(15, "corrupt_image"), (16, "corrupt_image"), (13, "missing_image")} <= reasons
    # Silently wrong before: another image's mask, "None" / "42" / "b'...'" as text, all-[UNK] ids.
    assert {(24, "annotation_image_mismatch"), (29, "no_known_words")} <= reasons
    assert {(25, "expression_not_text"), (26, "expression_not_text"), (27, "expression_not_text")} <= reasons
    details = {r["sent_id"]: r["detail"] for r in rejects}
    assert details[24] == "ann_id 102 is on image_id 2, the ref on image_id 1"
    assert (details[25], details[26], details[27]) == (
        "NoneType None",
        "int 42",
        "bytes b'\\xff\\xfe not utf-8'",
    )
    assert all(r["detail"] for r in rejects)


def _samples(shard: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == (
                0,
                0,
                0,
                "",
                "",
                0o644,
            )
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


MEMBERS = ("mask.png", "input_ids.npy", "attention_mask.npy", "json", "objects.json")  # besides the image
# Every object of an image with a usable mask (108 and 109 on image 1 give none), the referred one too.
USABLE_OBJECTS = {1: [101], 2: [102, 103], 3: [104], 8: [110]}


def test_shard_members_follow_the_contract(prepared: Path, refer_root: Path) -> None:
    summary = read_summary(str(prepared))
    manifest = {r["key"]: r for r in pq.read_table(prepared / MANIFEST).to_pylist()}
    tokenizer = load_tokenizer()
    assert summary.tokenizer == TokenizerRecord(
        name="all-minilm-l6-v2", vocabulary_hash=vocabulary_hash(tokenizer)
    )
    seen = []
    image_dir = refer_root / "images/mscoco/images/train2014"
    for shard in summary.shards:
        path = prepared / shard.path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256
        samples = _samples(path)
        assert len(samples) == shard.samples
        for key, members in samples.items():
            meta = SampleMeta.from_bytes(members[META_MEMBER], f"sample {key} in {path}")
            row = manifest[key]
            assert key == f"{meta.sent_id:010d}" and row["shard"] == shard.path
            name, width, height, _ = IMAGES[meta.image_id]
            ext = "png" if name.endswith(".png") else "jpg"
            assert set(members) == {ext, *MEMBERS}
            assert members[ext] == (image_dir / name).read_bytes()  # original bytes
            mask = Image.open(io.BytesIO(members["mask.png"]))
            assert mask.mode == "L" and mask.size == (width, height)
            pixels = np.asarray(mask)
            assert set(np.unique(pixels)) <= {0, 255}
            _, _, segmentation = ANNOTATIONS[meta.ann_id]
            np.testing.assert_array_equal(pixels // 255, rasterize(segmentation, height, width))
            assert row["mask_area"] == int((pixels > 0).sum())
            objects = json.loads(members["objects.json"])
            assert [o["ann_id"] for o in objects] == USABLE_OBJECTS[meta.image_id]
            masks = decode_rles([o["rle"] for o in objects], height, width)
            for obj, found in zip(objects, masks, strict=True):
                np.testing.assert_array_equal(found, rasterize(ANNOTATIONS[obj["ann_id"]][2], height, width))
            ids = np.load(io.BytesIO(members["input_ids.npy"]))
            attention = np.load(io.BytesIO(members["attention_mask.npy"]))
            assert ids.dtype == attention.dtype == np.int32 and ids.shape == attention.shape == (20,)
            expected_ids, expected_mask, n_words = encode_expressions(tokenizer, [meta.raw])
            np.testing.assert_array_equal(ids, expected_ids[0])
            np.testing.assert_array_equal(attention, expected_mask[0])
            assert row["n_tokens"] == n_words[0] + 2 and row["raw"] == meta.raw
            assert (meta.height, meta.width, row["height"], row["width"]) == (height, width) * 2
            seen.append((meta.split, meta.image_id, meta.ref_id, meta.sent_id))
    # Samples ordered by (image_id, ref_id, sent_id) within a split; a ref never spans two shards.
    for split in EXPECTED["counts"]:
        order = [s[1:] for s in seen if s[0] == split]
        assert order == sorted(order)
    shards_of_ref: dict[int, set[str]] = {}
    for row in manifest.values():
        shards_of_ref.setdefault(row["ref_id"], set()).add(row["shard"])
    assert all(len(s) == 1 for s in shards_of_ref.values())


def test_overlong_and_unicode_expressions(prepared: Path) -> None:
    manifest = {r["sent_id"]: r for r in pq.read_table(prepared / MANIFEST).to_pylist()}
    assert manifest[2]["raw"] == "le café à gauche, 左边的椅子"
    assert manifest[3]["n_tokens"] > 20  # cut to 20 ids in the shard, full length in the manifest
    assert manifest[28]["raw"] == "the café table"  # stored as UTF-8 bytes
    assert manifest[30]["raw"] == "the 😀 dog"  # one [UNK] among known words is kept


def test_byte_identical_whatever_the_workers_and_rerun_skips(
    prepared: Path, refer_root: Path, tmp_path: Path
) -> None:
    chunks: list[tuple[str, bool]] = []
    result = prepare_dataset(
        refer_root,
        "refcoco",
        "unc",
        tmp_path,
        samples_per_shard=4,
        workers=2,
        on_chunk=lambda r, total: chunks.append((r.shard, r.skipped)),
    )
    assert result.chunks_skipped == 0 and len(chunks) == len(result.shards) > 4
    assert output_digests(tmp_path / "refcoco-unc") == output_digests(prepared)

    again = prepare_dataset(refer_root, "refcoco", "unc", tmp_path, samples_per_shard=4)
    assert again.chunks_skipped == len(again.shards)
    assert output_digests(tmp_path / "refcoco-unc") == output_digests(prepared)

    # A shard damaged after the fact is redone, not trusted.
    damaged = tmp_path / "refcoco-unc" / result.shards[0].path
    damaged.write_bytes(b"garbage")
    third = prepare_dataset(refer_root, "refcoco", "unc", tmp_path, samples_per_shard=4)
    assert third.chunks_skipped == len(third.shards) - 1
    assert output_digests(tmp_path / "refcoco-unc") == output_digests(prepared)


def test_split_selection_refer_mode_and_errors(refer_root: Path, tmp_path: Path) -> None:
    result = prepare_dataset(refer_root, "refcoco", "unc", tmp_path, splits=["test"], mask_mode="refer")
    assert {split: c.read for split, c in result.counts.items()} == {"test": 7}
    assert [s.path for s in result.shards] == ["test/shard-000000.tar"]
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*available splits are train, val"):
        prepare_dataset(refer_root, "refcoco", "unc", tmp_path, splits=["dev"])
    with pytest.raises(ValueError, match="mask_mode"):
        prepare_dataset(refer_root, "refcoco", "unc", tmp_path, mask_mode="sum")


def test_synthetic_set_is_written_whole(tmp_path: Path) -> None:
    from data_prep.synth import synthesize

    report = synthesize(tmp_path / "refer", num_images=24, image_size=64, seed=3, workers=1)
    result = prepare_dataset(tmp_path / "refer", "refcoco", "unc", tmp_path / "out", samples_per_shard=20)
    assert {split: c.read for split, c in result.counts.items()} == {
        split: stats.n_expressions for split, stats in report.splits.items()
    }
    assert all(c.rejected == 0 and c.written == c.read for c in result.counts.values())


def test_synthetic_shards_of_an_older_format_are_prepared_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data_prep import synthetic_shards

    monkeypatch.setattr(synthetic_shards.os, "cpu_count", lambda: 1)  # one process: no pool to start
    shards = synthetic_shards.ensure_synthetic_shards(tmp_path, images=6, image_size=64)
    current = read_summary(str(shards))
    older = current.model_copy(update={"format_version": current.format_version - 1})
    (shards / SUMMARY).write_bytes(older.to_bytes())
    synthetic_shards.ensure_synthetic_shards(tmp_path, images=6, image_size=64)  # a demo directory kept
    assert read_summary(str(shards)) == current


def test_partial_prepare_merges_into_the_index_or_refuses(
    prepared: Path, refer_root: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "refcoco-unc"
    shutil.copytree(prepared, out)
    # Redoing one split with the same settings keeps the others in the index: the same bytes.
    redone = prepare_dataset(refer_root, "refcoco", "unc", tmp_path, splits=["val"], samples_per_shard=4)
    assert list(redone.counts) == list(EXPECTED["counts"])
    assert output_digests(out) == output_digests(prepared)

    # With other settings the splits would not belong together: refused, nothing touched.
    others = ", ".join(split for split in EXPECTED["counts"] if split != "val")
    with pytest.raises(ValueError, match=rf"holds splits {others} prepared with max_tokens 20 \(now 12\)"):
        prepare_dataset(refer_root, "refcoco", "unc", tmp_path, splits=["val"], max_tokens=12)
    assert output_digests(out) == output_digests(prepared)

    # Splits prepared one at a time add up.
    fresh = tmp_path / "fresh"
    prepare_dataset(refer_root, "refcoco", "unc", fresh, splits=["val"], samples_per_shard=4)
    added = prepare_dataset(refer_root, "refcoco", "unc", fresh, splits=["train"], samples_per_shard=4)
    assert list(added.counts) == ["val", "train"]
    manifest = pq.read_table(fresh / "refcoco-unc" / MANIFEST).to_pylist()
    assert {r["split"] for r in manifest} == {"val", "train"}
    assert sum(c.written for c in added.counts.values()) == len(manifest)


def test_partial_prepare_on_object_storage_merges_too(prepared: Path, refer_root: Path, s3_store) -> None:
    import fsspec

    out = s3_store.url("merge")
    prepare_dataset(refer_root, "refcoco", "unc", out, samples_per_shard=4)
    prepare_dataset(refer_root, "refcoco", "unc", out, splits=["val"], samples_per_shard=4)
    s3 = fsspec.filesystem("s3")
    for name in INDEX_FILES:  # as the full local run's
        assert s3.cat_file(f"{s3_store.bucket}/merge/refcoco-unc/{name}") == (prepared / name).read_bytes()

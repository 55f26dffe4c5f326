"""The contract files' one reader and writer each: summary.json and a sample's json member."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
from contract_files import fake_summary, write_summary

from data_prep.contract import FORMAT_VERSION, SUMMARY, SampleMeta, ShardError, read_summary

COUNTS = {"train": {"read": 3, "written": 2, "rejected": 1}}
SHARDS = [{"path": "train/shard-000000.tar", "sha256": "ab" * 32, "samples": 2}]
META = SampleMeta(
    ref_id=1, sent_id=2, ann_id=3, image_id=4, category_id=5, split="val", raw="le café", height=6, width=7
)


def test_summary_round_trips_through_its_file_and_pickle(tmp_path: Path) -> None:
    summary = fake_summary(counts=COUNTS, shards=SHARDS, mask_mode="refer")
    write_summary(tmp_path, summary)
    assert read_summary(str(tmp_path)) == summary
    assert pickle.loads(pickle.dumps(summary)) == summary
    assert (tmp_path / SUMMARY).read_text().startswith('{\n  "dataset": "refcoco",\n  "splitBy": "unc",\n')
    assert summary.split_shards("train")[0].samples == 2 and summary.split_shards("val") == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda s: {k: v for k, v in s.items() if k != "settings"}, "settings: Field required"),
        (lambda s: s | {"format_version": 0}, "format_version: Value error, format 0 is not one of 1 to"),
        (
            lambda s: s | {"format_version": FORMAT_VERSION + 1},
            f"format {FORMAT_VERSION + 1} is not one of 1 to {FORMAT_VERSION}",
        ),
        (
            lambda s: s | {"counts": {"train": {"read": "many"}}},
            "counts.train.read: Input should be a valid integer",
        ),
    ],
)
def test_a_summary_of_another_layout_is_one_error_naming_the_file(tmp_path: Path, edit, problem) -> None:
    written = json.loads(fake_summary(counts=COUNTS).to_bytes())
    (tmp_path / SUMMARY).write_text(json.dumps(edit(written)))
    with pytest.raises(ShardError, match=re.escape(f"{tmp_path / SUMMARY} cannot be read: ")) as caught:
        read_summary(str(tmp_path))
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_a_broken_or_missing_summary_is_one_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=re.escape(f"{tmp_path / SUMMARY} is missing")):
        read_summary(str(tmp_path))
    (tmp_path / SUMMARY).write_text('{"dataset": "refcoco",')
    with pytest.raises(ShardError, match=re.escape(f"{tmp_path / SUMMARY} cannot be read: not JSON (")):
        read_summary(str(tmp_path))
    (tmp_path / SUMMARY).write_text("[]")
    with pytest.raises(ShardError, match="the whole file: Input should be a valid dictionary"):
        read_summary(str(tmp_path))


def test_an_older_shard_format_is_still_read(tmp_path: Path) -> None:
    """Shards before format 3 lack the objects member but evaluate (without pick metrics)."""
    older = fake_summary(counts=COUNTS).model_copy(update={"format_version": 1})
    write_summary(tmp_path, older)
    assert read_summary(str(tmp_path)).format_version == 1


def test_sample_meta_round_trips_and_says_which_sample_is_broken() -> None:
    assert SampleMeta.from_bytes(META.to_bytes(), "sample") == META
    assert pickle.loads(pickle.dumps(META)) == META
    assert json.loads(META.to_bytes())["raw"] == "le café" and b"caf\xc3\xa9" in META.to_bytes()
    lacking = json.dumps({k: v for k, v in META.model_dump().items() if k != "width"}).encode()
    with pytest.raises(ShardError, match=r"^sample 7 in s\.tar: json cannot be read: width: Field required$"):
        SampleMeta.from_bytes(lacking, "sample 7 in s.tar: json")
    with pytest.raises(ShardError, match="not JSON"):
        SampleMeta.from_bytes(b"\x00", "sample 7")

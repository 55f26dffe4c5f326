"""Contract files for tests that need one without preparing data: every field filled, so the one
reader (data_prep.contract.read_summary) takes it; a test sets only the fields it is about. And
prepared data made corrupt: shards whose sha256 no longer matches summary.json."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from data_prep.contract import (
    FORMAT_VERSION,
    SUMMARY,
    ShardEntry,
    SplitCounts,
    Summary,
    SummarySettings,
    TokenizerRecord,
)


def fake_summary(
    *,
    dataset: str = "refcoco",
    split_by: str = "unc",
    counts: dict[str, dict[str, int]] | None = None,
    shards: list[dict[str, Any]] | None = None,
    mask_mode: str = "union",
) -> Summary:
    counts = counts or {}
    return Summary(
        dataset=dataset,
        split_by=split_by,
        format_version=FORMAT_VERSION,
        tokenizer=TokenizerRecord(name="bert-base-uncased", vocabulary_hash="0" * 64),
        counts={split: SplitCounts(**c) for split, c in counts.items()},
        rejects_by_reason={split: {} for split in counts},
        shards=tuple(ShardEntry(**entry) for entry in shards or ()),
        manifest_sha256="0" * 64,
        rejects_sha256="0" * 64,
        versions={},
        settings=SummarySettings(
            splits=tuple(counts), max_tokens=20, samples_per_shard=1000, mask_mode=mask_mode
        ),
    )


def write_summary(root: Path, summary: Summary) -> None:
    (root / SUMMARY).write_bytes(summary.to_bytes())


def flip_bytes(path: Path) -> None:
    """Flip 64 bytes in the middle of a file: a shard whose checksum no longer matches."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def corrupt_copy(prepared: Path, into: Path, *shards: str) -> Path:
    """A copy of a prepared dataset at ``into``, each shard named (relative to the root) corrupted."""
    shutil.copytree(prepared, into)
    for shard in shards:
        flip_bytes(into / shard)
    return into

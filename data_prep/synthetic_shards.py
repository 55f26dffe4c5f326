"""The synthetic dataset the demo and the flows fall back on when no shards are given: generated
(data_prep.synth) and prepared (data_prep.shards) under one directory, each only when missing (or,
for the shards, older than the data or of an older shard format)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.contract import FORMAT_VERSION, SUMMARY, read_summary
from data_prep.shards import dataset_dir, prepare_dataset
from data_prep.synth import synthesize

SYNTHETIC_IMAGES = 800
SYNTHETIC_IMAGE_SIZE = 64
SYNTHETIC_SEED = 0
DATASET, SPLIT_BY = "refcoco", "unc"


def ensure_synthetic_shards(
    workdir: Path,
    images: int = SYNTHETIC_IMAGES,
    image_size: int = SYNTHETIC_IMAGE_SIZE,
    seed: int = SYNTHETIC_SEED,
) -> Path:
    """Synthetic refer-format data and its shards under ``workdir``; made only when missing, the
    shards again when older than the data or of another format (a demo directory kept from
    before the shards carried the images' objects gets them).

    Returns the prepared dataset root ``<workdir>/shards/refcoco-unc``.
    """
    workdir = workdir.resolve()
    data = workdir / "data"
    report = data / "synth_report.json"
    wanted = {"num_images": images, "image_size": image_size, "seed": seed}
    if not report.is_file() or any(json.loads(report.read_text()).get(k) != v for k, v in wanted.items()):
        print(f"[demo] generating {images} synthetic images of {image_size} px under {data}")
        synthesize(data, num_images=images, image_size=image_size, seed=seed)
    shards = dataset_dir(workdir / "shards", DATASET, SPLIT_BY)
    summary = shards / SUMMARY
    stale = not summary.is_file() or summary.stat().st_mtime < report.stat().st_mtime
    if stale or read_summary(str(shards)).format_version != FORMAT_VERSION:
        print(f"[demo] preparing shards under {shards}")
        prepare_dataset(data, DATASET, SPLIT_BY, workdir / "shards", workers=min(2, os.cpu_count() or 1))
    return shards

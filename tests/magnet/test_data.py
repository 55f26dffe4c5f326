"""The shard reader: batch contract, rank balance, per-object sampling, resume, checksums."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from contract_files import corrupt_copy, fake_summary, flip_bytes, write_summary
from PIL import Image

from data_prep.contract import (
    ATTENTION_MASK_MEMBER,
    INPUT_IDS_MEMBER,
    MANIFEST,
    MASK_MEMBER,
    META_MEMBER,
    SampleMeta,
    sample_key,
    shard_path,
)
from data_prep.shards import prepare_dataset
from data_prep.synth import synthesize
from data_prep.tokenize import load_tokenizer, vocabulary_hash
from magnet.config import DataConfig, EvalConfig, TextConfig
from magnet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataPosition,
    ShardError,
    build_eval_loader,
    build_train_loader,
    check_text_settings,
    open_split,
    train_batches_per_epoch,
)

# Expressions per referred object, per shard: uneven shard sizes on purpose.
LAYOUT = {"train": [[2, 3, 1, 2], [1, 1], [3, 2, 2, 1, 3]], "val": [[2, 1, 3], [1, 2]]}
SIZE = 32


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_dataset(root: Path) -> Path:
    """A prepared dataset exactly per the shard contract (DEVELOPERS.md), written by hand."""
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    shards: list[dict] = []
    sent_id = ref_id = image_id = 0
    for split, layout in LAYOUT.items():
        (root / split).mkdir(parents=True)
        for index, refs in enumerate(layout):
            name = shard_path(split, index)
            count = 0
            with wds.TarWriter(str(root / name), encoder=False, mtime=0) as sink:
                for n_sents in refs:
                    ref_id += 1
                    image_id += 1
                    height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
                    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                    jpeg = io.BytesIO()
                    Image.fromarray(image).save(jpeg, format="JPEG")
                    mask = np.zeros((height, width), np.uint8)
                    mask[height // 4 : height // 2, width // 3 :] = 255
                    for _ in range(n_sents):
                        sent_id += 1
                        ids = np.zeros(20, np.int32)
                        ids[:3] = (101, 1000 + sent_id, 102)
                        attention = (ids > 0).astype(np.int32)
                        meta = SampleMeta(
                            ref_id=ref_id,
                            sent_id=sent_id,
                            ann_id=ref_id,
                            image_id=image_id,
                            category_id=1,
                            split=split,
                            raw=f"thing ünïcode {sent_id}",
                            height=height,
                            width=width,
                        )
                        npy = {}
                        for member, array in ((INPUT_IDS_MEMBER, ids), (ATTENTION_MASK_MEMBER, attention)):
                            buffer = io.BytesIO()
                            np.save(buffer, array)
                            npy[member] = buffer.getvalue()
                        key = sample_key(sent_id)
                        sink.write(
                            {
                                "__key__": key,
                                "jpg": jpeg.getvalue(),
                                MASK_MEMBER: _png(mask),
                                **npy,
                                META_MEMBER: meta.to_bytes(),
                            }
                        )
                        rows.append(
                            {"key": key, "split": split, "shard": name, "ref_id": ref_id, "sent_id": sent_id}
                        )
                        count += 1
            digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
            shards.append({"path": name, "sha256": digest, "samples": count})
    pq.write_table(pa.Table.from_pylist(rows), root / MANIFEST)
    written = {
        split: sum(e["samples"] for e in shards if e["path"].startswith(f"{split}/")) for split in LAYOUT
    }
    counts = {split: {"read": n, "written": n, "rejected": 0} for split, n in written.items()}
    write_summary(root, fake_summary(counts=counts, shards=shards))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("shards"))


def _all_sent_ids(split: str) -> set[int]:
    start = sum(
        sum(sum(shard) for shard in LAYOUT[s])
        for s in LAYOUT
        if list(LAYOUT).index(s) < list(LAYOUT).index(split)
    )
    return set(range(start + 1, start + 1 + sum(sum(shard) for shard in LAYOUT[split])))


def _sent_batches(loader) -> list[list[int]]:
    return [batch["sent_id"].tolist() for batch in loader]


def test_batch_contract_and_normalisation(root: Path) -> None:
    shards = open_split(str(root), "val")
    loader = build_eval_loader(
        shards, DataConfig(batch_size=4, loader_workers=0), EvalConfig(eval_size=24), image_size=SIZE
    )
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, SIZE, SIZE)
    assert batch["mask"].dtype == torch.float32 and batch["mask"].shape == (4, 24, 24)
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    for name in ("input_ids", "attention_mask"):
        assert batch[name].dtype == torch.int64 and batch[name].shape == (4, 20)
    for name in ("sent_id", "ref_id", "image_id"):
        assert batch[name].dtype == torch.int64 and batch[name].shape == (4,)
    assert batch["raw"][0].startswith("thing ünïcode")
    assert "orig_mask" not in batch

    # The first sample, transformed by hand: PIL bilinear resize, then ImageNet normalisation.
    with wds.WebDataset(str(root / "val/shard-000000.tar"), shardshuffle=False) as first_shard:
        raw = next(iter(first_shard))
    image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    expected = (
        torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        - torch.tensor(IMAGENET_MEAN)[:, None, None]
    ) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(batch["image"][0], expected)
    assert batch["image"].min() > -2.2 and batch["image"].max() < 2.7
    mask = Image.open(io.BytesIO(raw[MASK_MEMBER])).resize((24, 24), Image.NEAREST)
    np.testing.assert_array_equal(batch["mask"][0].numpy(), np.asarray(mask) / 255)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_same_batches_and_union_covers_split(root: Path, world_size: int, workers: int) -> None:
    cfg = DataConfig(batch_size=3, loader_workers=workers, one_expression_per_object=False, shuffle_buffer=4)
    shards = open_split(str(root), "train")
    expected = train_batches_per_epoch(shards, cfg, world_size)
    seen: set[int] = set()
    for rank in range(world_size):
        loader = build_train_loader(shards, cfg, image_size=SIZE, seed=1, rank=rank, world_size=world_size)
        batches = _sent_batches(loader)
        assert len(loader) == len(batches) == expected
        assert all(len(b) == cfg.batch_size for b in batches)
        seen.update(s for b in batches for s in b)
    assert seen == _all_sent_ids("train")


def test_one_expression_per_object_varies_by_epoch(root: Path) -> None:
    cfg = DataConfig(batch_size=2, loader_workers=0, one_expression_per_object=True, shuffle_buffer=4)
    shards = open_split(str(root), "train")
    picks_by_epoch = []
    for epoch in range(4):
        loader = build_train_loader(shards, cfg, image_size=SIZE, seed=0, position=DataPosition(epoch))
        picks: dict[int, set[int]] = defaultdict(set)
        for batch in loader:
            for ref, sent in zip(batch["ref_id"].tolist(), batch["sent_id"].tolist(), strict=True):
                picks[ref].add(sent)
        assert len(picks) == sum(s.refs for s in shards.shards)  # every object seen...
        assert all(len(sents) == 1 for sents in picks.values())  # ...through exactly one expression
        picks_by_epoch.append({ref: next(iter(s)) for ref, s in picks.items()})
    assert len({tuple(sorted(p.items())) for p in picks_by_epoch}) > 1


def test_order_reproducible_for_seed_and_epoch(root: Path) -> None:
    cfg = DataConfig(batch_size=3, loader_workers=2, one_expression_per_object=False, shuffle_buffer=8)
    shards = open_split(str(root), "train")

    def run(seed: int, epoch: int) -> list[list[int]]:
        return _sent_batches(
            build_train_loader(shards, cfg, image_size=SIZE, seed=seed, position=DataPosition(epoch))
        )

    assert run(3, 1) == run(3, 1)
    assert run(3, 1) != run(3, 2)
    assert run(3, 1) != run(4, 1)


@pytest.mark.parametrize("workers", [0, 3])
def test_resume_replays_remaining_batches(root: Path, workers: int) -> None:
    cfg = DataConfig(batch_size=2, loader_workers=workers, one_expression_per_object=False, shuffle_buffer=5)
    shards = open_split(str(root), "train")
    full = _sent_batches(
        build_train_loader(
            shards, cfg, image_size=SIZE, seed=7, rank=1, world_size=2, position=DataPosition(2)
        )
    )
    for done in (1, 4, len(full) - 1, len(full)):
        position = DataPosition(epoch=2, batches_done=done)
        resumed = build_train_loader(
            shards, cfg, image_size=SIZE, seed=7, rank=1, world_size=2, position=position
        )
        assert len(resumed) == len(full) - done
        assert _sent_batches(resumed) == full[done:]


@pytest.mark.parametrize("protocol", ["lavt", "original"])
def test_eval_every_expression_once_across_ranks(root: Path, protocol: str) -> None:
    shards = open_split(str(root), "val")
    cfg, eval_cfg = DataConfig(batch_size=2, loader_workers=2), EvalConfig(protocol=protocol, eval_size=16)
    counts: Counter[int] = Counter()
    for rank in range(3):
        for batch in build_eval_loader(shards, cfg, eval_cfg, image_size=SIZE, rank=rank, world_size=3):
            counts.update(batch["sent_id"].tolist())
            if protocol == "original":
                for mask, raw in zip(batch["orig_mask"], batch["raw"], strict=True):
                    assert (
                        mask.dtype == torch.uint8 and mask.ndim == 2 and set(mask.unique().tolist()) <= {0, 1}
                    )
                    assert raw
    assert set(counts) == _all_sent_ids("val") and set(counts.values()) == {1}


def test_eval_max_samples_caps_the_split(root: Path) -> None:
    shards = open_split(str(root), "val")
    loader = build_eval_loader(
        shards, DataConfig(batch_size=4, loader_workers=0), EvalConfig(max_samples=5), image_size=SIZE
    )
    assert sum(len(b["sent_id"]) for b in loader) == 5


def test_corrupt_shard_is_named_or_skipped(root: Path, tmp_path: Path) -> None:
    copy = corrupt_copy(root, tmp_path / "copy", "train/shard-000001.tar")
    with pytest.raises(ShardError, match=re.escape("train/shard-000001.tar is corrupt")):
        open_split(str(copy), "train")
    (copy / "val/shard-000001.tar").unlink()
    with pytest.raises(ShardError, match=re.escape("val/shard-000001.tar is corrupt: sha256 missing file")):
        open_split(str(copy), "val")
    shards = open_split(str(copy), "train", skip_corrupt=True)
    assert shards.skipped == ("train/shard-000001.tar",)
    assert shards.num_samples == sum(sum(s) for i, s in enumerate(LAYOUT["train"]) if i != 1)
    cfg = DataConfig(batch_size=2, loader_workers=0, one_expression_per_object=False)
    lengths = [
        len(_sent_batches(build_train_loader(shards, cfg, image_size=SIZE, seed=0, rank=r, world_size=2)))
        for r in range(2)
    ]
    assert lengths[0] == lengths[1] == train_batches_per_epoch(shards, cfg, 2)


def test_a_shard_is_hashed_once_until_it_changes(root: Path, tmp_path: Path, monkeypatch) -> None:
    """The command, the flow and the Ray driver of one run each check the splits: the shards are
    read once, and a shard changed since is read again (its corruption found)."""
    import os

    import magnet.data as data

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    hashed: list[str] = []
    hash_file = data._hash_file
    monkeypatch.setattr(data, "_hash_file", lambda fs, path: hashed.append(path) or hash_file(fs, path))
    first = open_split(str(copy), "train")
    open_split(str(copy), "train")
    assert len(hashed) == len(first.shards)
    bad = copy / "train/shard-000001.tar"
    flip_bytes(bad)
    os.utime(bad, ns=(bad.stat().st_atime_ns, bad.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(ShardError, match=re.escape("train/shard-000001.tar is corrupt")):
        open_split(str(copy), "train")
    assert len(hashed) == len(first.shards) + 1


def test_a_file_without_a_modification_stamp_is_hashed_every_time() -> None:
    """A file system whose ``info`` names no mtime, LastModified or ETag (fsspec's memory one) gives
    no way to tell a changed file: its digest is never kept."""
    import fsspec

    import magnet.data as data

    url = "memory://digest-test/shard.tar"
    with fsspec.open(url, "wb") as handle:
        handle.write(b"a" * 100)
    first = data._sha256(url)
    with fsspec.open(url, "wb") as handle:
        handle.write(b"b" * 100)  # the same size
    assert data._sha256(url) != first == hashlib.sha256(b"a" * 100).hexdigest()


def test_missing_summary_and_unknown_split_are_clear_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=re.escape("summary.json is missing")):
        open_split(str(tmp_path), "train")
    with pytest.raises(ShardError, match="no shards for split 'testC'"):
        open_split(str(root), "testC")


def test_shards_tokenised_otherwise_than_the_model_reads_are_refused(
    synthetic_shards, other_tokenizer
) -> None:
    shards = str(synthetic_shards())  # all-minilm-l6-v2's vocabulary, max_tokens 20
    check_text_settings(shards, TextConfig())
    check_text_settings(shards, TextConfig(name_or_path="bert-base-uncased"))  # the same vocabulary
    with pytest.raises(ShardError, match=r"max_tokens 20 but the model reads text\.max_tokens 12"):
        check_text_settings(shards, TextConfig(max_tokens=12))
    written, other = (
        vocabulary_hash(load_tokenizer(name))[:12] for name in ("all-minilm-l6-v2", other_tokenizer)
    )
    with pytest.raises(
        ShardError, match=rf"sha256 {written}\) but text\.name_or_path .* has vocabulary sha256 {other}"
    ):
        check_text_settings(shards, TextConfig(name_or_path=other_tokenizer))


def test_reads_what_data_prep_writes(tmp_path: Path) -> None:
    """The real writer's shards: balance, per-object picks and eval coverage against its manifest."""
    synthesize(tmp_path / "refer", num_images=24, image_size=32, seed=3, workers=1)
    out = prepare_dataset(
        tmp_path / "refer", "refcoco", "unc", tmp_path / "out", samples_per_shard=15
    ).out_dir
    manifest = pq.read_table(out / MANIFEST).to_pylist()
    train = open_split(str(out), "train")
    assert len(train.shards) > 2 and train.num_samples == sum(r["split"] == "train" for r in manifest)

    cfg = DataConfig(batch_size=4, loader_workers=0, shuffle_buffer=8)
    refs_seen: set[int] = set()
    for rank in range(3):
        loader = build_train_loader(train, cfg, image_size=SIZE, seed=0, rank=rank, world_size=3)
        batches = list(loader)
        assert len(batches) == train_batches_per_epoch(train, cfg, 3)
        refs_seen.update(r for b in batches for r in b["ref_id"].tolist())
    assert refs_seen == {r["ref_id"] for r in manifest if r["split"] == "train"}

    val = open_split(str(out), "val")
    eval_cfg = EvalConfig(protocol="original", eval_size=SIZE)
    batches = list(build_eval_loader(val, cfg, eval_cfg, image_size=SIZE))
    by_sent = {r["sent_id"]: r for r in manifest if r["split"] == "val"}
    assert sorted(s for b in batches for s in b["sent_id"].tolist()) == sorted(by_sent)
    for batch in batches:
        for sent_id, mask in zip(batch["sent_id"].tolist(), batch["orig_mask"], strict=True):
            row = by_sent[sent_id]
            assert mask.shape == (row["height"], row["width"]) and int(mask.sum()) == row["mask_area"]

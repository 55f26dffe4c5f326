"""Evaluation over whole splits: every expression once, both protocols, rank shares adding up."""

import hashlib
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from data_prep.contract import MANIFEST, META_MEMBER, OBJECTS_MEMBER, SUMMARY, SampleMeta, read_summary
from data_prep.masks import decode_rles
from data_prep.refer import load_kinds
from magnet.config import load_config
from magnet.evaluate import Breakdown, breakdown_rows, evaluate, evaluate_split, prediction_figure
from magnet.metrics import GroupScores, IoUAccumulator
from magnet.models import MagNetOutput


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> str:
    return str(synthetic_shards(num_images=40, image_size=48, seed=1, samples_per_shard=6))


class Everywhere(nn.Module):
    """Predicts the whole image as the object: I = |gt| and U = image area, known from the manifest."""

    def forward(self, image, input_ids, attention_mask, target_mask=None) -> MagNetOutput:
        size = image.shape[-1] // 4
        return MagNetOutput(mask_logits=torch.full((image.shape[0], 1, size, size), 5.0), aux_mask_logits=[])


def config(protocol: str):
    return load_config(
        "tiny",
        ["model.image_size=32", "data.batch_size=4", "data.loader_workers=0", f"eval.protocol={protocol}"],
    )


def test_original_protocol_scores_every_expression_at_its_own_size(shards):
    rows = [r for r in pq.read_table(f"{shards}/{MANIFEST}").to_pylist() if r["split"] == "val"]
    result = evaluate(Everywhere(), shards, config("original"), splits=["val"], keep_examples=2)
    m = result.metrics
    assert result.protocol == "original" and "original size" in result.describe()
    assert m["val/n"] == len(rows)
    expected = 100 * sum(r["mask_area"] for r in rows) / sum(r["height"] * r["width"] for r in rows)
    assert m["val/oIoU"] == pytest.approx(expected)
    assert len(result.splits["val"].examples) == 2
    png = prediction_figure(result.splits["val"].examples, "val")
    assert png.startswith(b"\x89PNG")


def test_rank_shares_add_up_to_the_whole_split(shards):
    cfg = config("lavt")
    whole = evaluate(Everywhere(), shards, cfg, splits=["val", "testA"])
    assert whole.eval_size == cfg.model.image_size and "32x32" in whole.describe()
    merged = {split: IoUAccumulator() for split in ("val", "testA")}
    merged_groups = {split: GroupScores(list(whole.splits[split].groups.groups)) for split in merged}
    for rank in range(3):
        part = evaluate(Everywhere(), shards, cfg, splits=["val", "testA"], rank=rank, world_size=3)
        for split, acc in merged.items():
            acc.merge(part.splits[split].scores)
            merged_groups[split].merge(part.splits[split].groups)
    for split, acc in merged.items():
        got = {f"{split}/{k}": v for k, v in acc.compute().items()}
        for group, values in merged_groups[split].compute().items():
            got.update({f"{split}/{group}/{k}": v for k, v in values.items()})
        assert got == pytest.approx({k: v for k, v in whole.metrics.items() if k.startswith(f"{split}/")})


class LeftColumns(nn.Module):
    """Foreground logits in the left sixteenth of the S/4 grid (28 of 112 columns for a 448 model)."""

    def forward(self, image, input_ids, attention_mask, target_mask=None) -> MagNetOutput:
        size = image.shape[-1] // 4
        logits = torch.full((image.shape[0], 1, size, size), -10.0)
        logits[..., : size // 4] = 10.0
        return MagNetOutput(mask_logits=logits, aux_mask_logits=[])


def _hand_made_batch(size: int, sent_ids: list[int]) -> dict:
    """Samples whose true mask is the left quarter of a size x size image."""
    mask = torch.zeros(len(sent_ids), size, size)
    mask[..., : size // 4] = 1
    return {
        "image": torch.zeros(len(sent_ids), 3, size, size),
        "mask": mask,
        "orig_mask": [m.to(torch.uint8) for m in mask],
        "input_ids": torch.zeros(len(sent_ids), 4, dtype=torch.int64),
        "attention_mask": torch.ones(len(sent_ids), 4, dtype=torch.int64),
        "sent_id": torch.tensor(sent_ids),
        "raw": ["x"] * len(sent_ids),
    }


@pytest.mark.parametrize(("protocol", "expected"), [("lavt", 100 * 111 / 112), ("original", 100.0)])
def test_a_448_model_under_each_protocol(protocol, expected):
    # The left 28 of 112 logit columns against the left 112 of 448 pixels: align_corners=True (lavt)
    # puts the step at 110.7, so 111 columns; align_corners=False (original) at 111.5, so 112.
    cfg = load_config("tiny", ["model.image_size=448", f"eval.protocol={protocol}"]).eval
    batch = _hand_made_batch(448, [1])
    result = evaluate_split(LeftColumns(), [batch], cfg, split="val", device=torch.device("cpu"))
    assert result.scores.compute()["oIoU"] == pytest.approx(expected)


def test_per_kind_scores_of_hand_made_samples():
    # Sample 1 is hit exactly (kind a); sample 2 (kind b) has twice the true mask: IoU 1/2.
    batch = _hand_made_batch(16, [1, 2])
    batch["orig_mask"][1][:, :8] = 1
    breakdown = Breakdown("kind", ("kind/a", "kind/b"), {1: ("kind/a",), 2: ("kind/b",)})
    cfg = load_config("tiny", ["eval.protocol=original"]).eval
    result = evaluate_split(
        LeftColumns(), [batch], cfg, split="val", device=torch.device("cpu"), breakdown=breakdown
    )
    assert result.groups.compute() == {
        "kind/a": {"oIoU": 100.0, "mIoU": 100.0, "n": 1},
        "kind/b": {"oIoU": 50.0, "mIoU": 50.0, "n": 1},
    }


def test_lavt_scores_at_the_model_input_size_and_names_the_mask_convention(shards, tmp_path):
    cfg = load_config(
        "tiny", ["model.image_size=448", "data.batch_size=2", "data.loader_workers=0", "eval.max_samples=2"]
    )
    result = evaluate(Everywhere(), shards, cfg, splits=["val"])
    assert result.eval_size == 448 and result.metrics["val/n"] == 2
    assert "448x448" in result.describe() and "align_corners=True" in result.describe()
    assert result.as_dict()["mask_mode"] == "union" and result.as_dict()["align_corners"] is True
    refer = tmp_path / "refer-masks"
    shutil.copytree(shards, refer)
    summary = read_summary(str(refer))
    settings = summary.settings.model_copy(update={"mask_mode": "refer"})
    (refer / SUMMARY).write_bytes(summary.model_copy(update={"settings": settings}).to_bytes())
    again = evaluate(Everywhere(), str(refer), config("original"), splits=["val"])
    assert again.as_dict()["mask_mode"] == "refer" and "masks refer" in again.describe()
    assert again.eval_size is None and "align_corners=False" in again.describe()


def test_real_data_is_broken_down_by_text_features(shards, tmp_path):
    # Shards without a kind column (real data): every sample lands in one length bucket.
    plain = tmp_path / "no-kinds"
    shutil.copytree(shards, plain)
    manifest = pq.read_table(plain / MANIFEST)
    if "kind" in manifest.column_names:
        pq.write_table(manifest.drop(["kind"]), plain / MANIFEST)
    result = evaluate(Everywhere(), str(plain), config("original"), splits=["val"])
    assert result.breakdown == "text"
    lengths = [k for k in result.metrics if k.startswith("val/text/length_") and k.endswith("/n")]
    assert sum(result.metrics[k] for k in lengths) == result.metrics["val/n"]
    rows = breakdown_rows(result.metrics)
    names = ("oIoU", "mIoU", "pick_acc", "outline_IoU", "n")
    whole = {"split": "val", "group": "all", **{k: result.metrics[f"val/{k}"] for k in names}}
    assert rows[0] == whole and all(r["group"].startswith("text/") for r in rows[1:])
    assert all(
        {"split", "group", "oIoU", "mIoU", "pick_acc", "n"} <= set(r) <= {"split", "group", *names}
        for r in rows
    )


def test_kinds_survive_synth_prepare_and_evaluate(shards):
    """The generator's kinds reach the manifest and the metrics: per split and kind the sample
    count is the generator's, and the Everywhere model's per-kind oIoU is the manifest's sums."""
    refer = Path(shards).parent.parent / "refer"
    report = json.loads((refer / "synth_report.json").read_text())
    kinds = load_kinds(refer, "refcoco", "unc")
    rows = pq.read_table(f"{shards}/{MANIFEST}").to_pylist()
    assert [r["kind"] for r in rows] == [kinds[r["sent_id"]] for r in rows]
    result = evaluate(Everywhere(), shards, config("original"), splits=["val", "testA"])
    assert result.breakdown == "kind" and result.as_dict()["breakdown"] == "kind"
    for split in ("val", "testA"):
        generated = {kind: stats["n_expressions"] for kind, stats in report["splits"][split]["kinds"].items()}
        scored = {
            key.split("/")[2]: value
            for key, value in result.metrics.items()
            if key.startswith(f"{split}/kind/") and key.endswith("/n")
        }
        assert scored == generated
        for kind in generated:
            mine = [r for r in rows if r["split"] == split and r["kind"] == kind]
            expected = 100 * sum(r["mask_area"] for r in mine) / sum(r["height"] * r["width"] for r in mine)
            assert result.metrics[f"{split}/kind/{kind}/oIoU"] == pytest.approx(expected)


def test_rows_score_every_expression_and_worst_are_the_lowest(shards):
    manifest = {r["sent_id"]: r for r in pq.read_table(f"{shards}/{MANIFEST}").to_pylist()}
    result = evaluate(Everywhere(), shards, config("original"), splits=["val"], keep_rows=True, keep_worst=3)
    rows = result.splits["val"].rows
    assert sorted(r["sent_id"] for r in rows) == sorted(s for s, r in manifest.items() if r["split"] == "val")
    for row in rows:  # predicting everywhere: IoU = the object's share of the original image
        truth = manifest[row["sent_id"]]
        assert (row["image_id"], row["raw"]) == (truth["image_id"], truth["raw"])
        assert row["iou"] == pytest.approx(truth["mask_area"] / (truth["height"] * truth["width"]))
        assert 0 < row["area"] < 1
    lowest = sorted(r["iou"] for r in rows)[:3]
    worst = result.splits["val"].worst
    shown = [float(ex.text.split(":")[0].removeprefix("IoU ")) for ex in worst]
    assert shown == pytest.approx(lowest, abs=5e-3)
    assert all(ex.pred.all() for ex in worst)  # the model's masks, drawn at the image size
    lavt = evaluate(Everywhere(), shards, config("lavt"), splits=["val"], keep_rows=True)
    assert all(row["iou"] == pytest.approx(row["area"]) for row in lavt.splits["val"].rows)
    assert not evaluate(Everywhere(), shards, config("lavt"), splits=["val"]).splits["val"].rows


def test_picture_examples_come_from_different_images_and_cover_every_kind():
    # Batch 1: images 10, 10, 14, 11 (kinds a, a, b, a); batch 2: images 12, 13 (kinds a, c).
    # One example per image; kinds a, b and c first, then a new image of a kind already shown.
    first = _hand_made_batch(16, [1, 2, 3, 4])
    first["image_id"] = torch.tensor([10, 10, 14, 11])
    first["raw"] = ["s1", "s2", "s3", "s4"]
    second = _hand_made_batch(16, [5, 6])
    second["image_id"] = torch.tensor([12, 13])
    second["raw"] = ["s5", "s6"]
    kinds = {1: "a", 2: "a", 3: "b", 4: "a", 5: "a", 6: "c"}
    breakdown = Breakdown(
        "kind", ("kind/a", "kind/b", "kind/c"), {s: (f"kind/{k}",) for s, k in kinds.items()}
    )
    cfg = load_config("tiny", ["eval.protocol=original"]).eval
    result = evaluate_split(
        LeftColumns(),
        [first, second],
        cfg,
        split="val",
        device=torch.device("cpu"),
        breakdown=breakdown,
        keep_examples=4,
    )
    assert [example.text for example in result.examples] == ["s1", "s3", "s6", "s4"]


# The lavt protocol's align_corners=True upsampling makes the left quarter 3 columns of 16, not 4.
@pytest.mark.parametrize(("protocol", "outline"), [("lavt", 100 * (3 / 4 + 3 / 8) / 2), ("original", 75.0)])
def test_hand_made_samples_picked_or_not(protocol, outline):
    # The model predicts the left quarter. Sample 1: that is the referred object (picked, IoU 1);
    # sample 2: the referred object is the right quarter and the left quarter another object of the
    # image (the wrong one picked); sample 3: the left half, beside an object in the right half
    # (picked, IoU 1/2).
    batch = _hand_made_batch(16, [1, 2, 3])
    left, right, right_half = (torch.zeros(16, 16, dtype=torch.uint8) for _ in range(3))
    left[:, :4], right[:, 12:], right_half[:, 8:] = 1, 1, 1
    targets = [left, right, left.clone()]
    targets[2][:, :8] = 1
    batch["mask"] = torch.stack(targets).float()
    batch["orig_mask"] = targets
    batch["others"] = [torch.stack([right]), torch.stack([left]), torch.stack([right_half])]
    batch["image_id"] = torch.tensor([1, 2, 3])
    cfg = load_config("tiny", ["model.image_size=16", f"eval.protocol={protocol}"]).eval
    breakdown = Breakdown("kind", ("kind/a", "kind/b"), {1: ("kind/a",), 2: ("kind/b",), 3: ("kind/b",)})
    result = evaluate_split(
        LeftColumns(),
        [batch],
        cfg,
        split="val",
        device=torch.device("cpu"),
        breakdown=breakdown,
        keep_rows=True,
    )
    assert result.scores.compute()["pick_acc"] == pytest.approx(200 / 3)
    assert result.scores.compute()["outline_IoU"] == pytest.approx(outline)
    assert result.groups.compute()["kind/b"]["pick_acc"] == 50.0
    assert [row["picked"] for row in result.rows] == [True, False, True]


def _objects_of_samples(shards: str, split: str) -> dict[int, tuple[int, list[int]]]:
    """sent_id -> (area of the referred object, areas of the image's other objects), read from the
    shards' members themselves."""
    found = {}
    for shard in sorted(Path(shards, split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(f".{OBJECTS_MEMBER}"):
                meta_name = name.replace(OBJECTS_MEMBER, META_MEMBER)
                meta = SampleMeta.from_bytes(members[meta_name], f"{shard}: {meta_name}")
                objects = json.loads(data)
                areas = decode_rles([o["rle"] for o in objects], meta.height, meta.width).sum(axis=(1, 2))
                ids = [o["ann_id"] for o in objects]
                target = int(areas[ids.index(meta.ann_id)])
                others = [int(a) for i, a in zip(ids, areas, strict=True) if i != meta.ann_id]
                found[meta.sent_id] = (target, others)
    return found


def test_the_images_objects_reach_the_evaluation(shards):
    # Predicting the whole image picks the object of the largest area: the referred object is
    # picked right when it is strictly the largest of its image, and its IoU is its image share.
    manifest = {r["sent_id"]: r for r in pq.read_table(f"{shards}/{MANIFEST}").to_pylist()}
    objects = _objects_of_samples(shards, "val")
    result = evaluate(Everywhere(), shards, config("original"), splits=["val"], keep_rows=True)
    assert len(objects) == result.metrics["val/n"] and any(others for _, others in objects.values())
    picked = {sent: target > max(others, default=0) for sent, (target, others) in objects.items()}
    assert 0 < sum(picked.values()) < len(picked)
    assert {row["sent_id"]: row["picked"] for row in result.splits["val"].rows} == picked
    assert result.metrics["val/pick_acc"] == pytest.approx(100 * sum(picked.values()) / len(picked))
    shares = [
        manifest[s]["mask_area"] / (manifest[s]["height"] * manifest[s]["width"]) for s in picked if picked[s]
    ]
    assert result.metrics["val/outline_IoU"] == pytest.approx(100 * sum(shares) / len(shares))
    assert {f"val/kind/{k}/pick_acc" for k in ("attribute", "relation")} <= set(result.metrics)


def test_shards_without_objects_still_evaluate_without_pick_metrics(shards, tmp_path, caplog):
    # Shards prepared before format 3: the same samples without the objects member.
    old = tmp_path / "format-2"
    shutil.copytree(shards, old)
    summary = read_summary(str(old))
    entries = []
    for entry in summary.shards:
        path = old / entry.path
        with tarfile.open(path) as tar:
            kept = [
                (m, tar.extractfile(m).read())
                for m in tar.getmembers()
                if not m.name.endswith(OBJECTS_MEMBER)
            ]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in kept:
                tar.addfile(member, io.BytesIO(data))
        entries.append(entry.model_copy(update={"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}))
    older = summary.model_copy(update={"format_version": 2, "shards": tuple(entries)})
    (old / SUMMARY).write_bytes(older.to_bytes())
    with caplog.at_level(logging.WARNING, logger="magnet.evaluate"):
        for _ in range(2):  # an evaluation every eval_every steps says it once
            result = evaluate(Everywhere(), str(old), config("lavt"), splits=["val"], keep_rows=True)
    assert not [k for k in result.metrics if k.endswith(("/pick_acc", "/outline_IoU"))]
    assert (
        result.metrics["val/oIoU"]
        == evaluate(Everywhere(), shards, config("lavt"), splits=["val"]).metrics["val/oIoU"]
    )
    assert all(row["picked"] is None for row in result.splits["val"].rows)
    notes = [r.getMessage() for r in caplog.records if "pick_acc and outline_IoU left out" in r.getMessage()]
    assert len(notes) == 1 and "carry no objects" in notes[0]

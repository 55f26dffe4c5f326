"""Evaluation over whole splits: every expression once, both protocols, rank shares adding up."""

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from magnet.config import load_config
from magnet.evaluate import evaluate, prediction_figure
from magnet.metrics import IoUAccumulator
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
    rows = [r for r in pq.read_table(f"{shards}/manifest.parquet").to_pylist() if r["split"] == "val"]
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
    assert whole.eval_size == cfg.eval.eval_size and "480x480" in whole.describe()
    merged = {split: IoUAccumulator() for split in ("val", "testA")}
    for rank in range(3):
        part = evaluate(Everywhere(), shards, cfg, splits=["val", "testA"], rank=rank, world_size=3)
        for split, acc in merged.items():
            acc.merge(part.splits[split].scores)
    for split, acc in merged.items():
        got = {f"{split}/{k}": v for k, v in acc.compute().items()}
        assert got == pytest.approx({k: v for k, v in whole.metrics.items() if k.startswith(f"{split}/")})


def test_rows_score_every_expression_and_worst_are_the_lowest(shards):
    manifest = {r["sent_id"]: r for r in pq.read_table(f"{shards}/manifest.parquet").to_pylist()}
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

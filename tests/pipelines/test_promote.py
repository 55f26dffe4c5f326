"""Promotion on a real registry: runs with logged metrics and registered tiny models that score
differently by construction; the alias moves for a better model, not for a worse one, nothing
changes on a re-run, and scores on different data are refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import TINY_MODEL

from data_prep.contract import SUMMARY, read_summary
from magnet.checkpoint import TrainState, save_checkpoint
from magnet.config import load_config
from magnet.models import build_model
from pipelines import mlflow_record, registry, tracking
from pipelines.promote import (
    CHALLENGER,
    CHAMPION,
    PromotionError,
    promote,
    resolve_metric,
)

EXPERIMENT = "promote-test"


@pytest.fixture(scope="module")
def store(module_tmp, synthetic_shards) -> dict:
    root = module_tmp("promote")
    return {
        "root": root,
        "shards": str(synthetic_shards(num_images=12, image_size=64, seed=0, samples_per_shard=8)),
        "uri": f"sqlite:///{root}/mlflow.db",  # explicit: MLflow exports the last URI it was set to
    }


def checkpoint(directory: Path, threshold: float, max_samples: int | None = None) -> Path:
    """A tiny MagNet whose mask logits are all 0 (mask embedding zeroed): probability 0.5 everywhere.
    With threshold 0.3 it predicts the whole image (oIoU > 0), with 0.7 nothing (oIoU = 0)."""
    cfg = load_config(
        "tiny",
        [
            *TINY_MODEL,
            "data.loader_workers=0",
            "eval.eval_size=64",
            f"eval.threshold={threshold}",
            f"eval.max_samples={'null' if max_samples is None else max_samples}",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for name, parameter in model.named_parameters():
        if ".mask_embed." in f".{name}":
            torch.nn.init.zeros_(parameter)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(
        directory, model=model, optimizer=optimizer, scheduler=scheduler, state=TrainState(step=1), cfg=cfg,
        rng_states=[{}],
    )  # fmt: skip


def example() -> tuple[bytes, str]:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue(), "the thing"


def trained_run(
    store: dict,
    name: str,
    threshold: float,
    val_oiou: float,
    shards: str | None = None,
    max_samples: int | None = None,
) -> str:
    """A finished run with a logged val/oIoU and a registered model; returns its version."""
    cfg = load_config("tiny")
    settings = tracking.start_run(
        cfg, shards=shards or store["shards"], tracking_uri=store["uri"], experiment=EXPERIMENT, run_name=name
    )
    tracking.MlflowRunLogger(settings).log_metrics({"val/oIoU": val_oiou}, step=1)
    weights = checkpoint(store["root"] / name, threshold, max_samples)
    version = registry.log_and_register(settings, weights, example())
    tracking.end_run(settings)
    return version


def run_promotion(store: dict, **kwargs):
    return promote(
        shards=store["shards"], experiment=EXPERIMENT, metric="val_oIoU", tracking_uri=store["uri"], **kwargs
    )


def aliases(store: dict) -> dict[str, str]:
    model = tracking.client_for(store["uri"]).get_registered_model("magnet")
    return {alias: str(version) for alias, version in model.aliases.items()}


def registry_state(client, model_name: str = registry.MODEL_NAME) -> dict:
    """Aliases, and every version's tags, description and last update: what a promotion may write."""
    model = client.get_registered_model(model_name)
    versions = client.search_model_versions(f"name = '{model_name}'")
    return {
        "aliases": {alias: str(v) for alias, v in (model.aliases or {}).items()},
        "versions": {
            str(v.version): {
                "tags": dict(v.tags or {}),
                "description": v.description,
                "aliases": sorted(v.aliases or []),
                "updated": v.last_updated_timestamp,
            }
            for v in versions
        },
    }


def test_metric_names():
    assert resolve_metric("val_oIoU") == "val/oIoU" and resolve_metric("testA/mIoU") == "testA/mIoU"
    with pytest.raises(PromotionError, match="split and a score"):
        resolve_metric("oIoU")


def test_promotion_story(store):
    client = tracking.client_for(store["uri"])
    with pytest.raises(PromotionError, match="no MLflow experiment"):
        run_promotion(store)

    # a run without the metric: refused, naming the metric
    settings = tracking.start_run(
        load_config("tiny"),
        shards=store["shards"],
        tracking_uri=store["uri"],
        experiment=EXPERIMENT,
        run_name="bare",
    )
    tracking.end_run(settings)
    with pytest.raises(PromotionError, match="reports metric 'val/oIoU'"):
        run_promotion(store)

    # the first model becomes champion
    weak = trained_run(store, "weak", threshold=0.7, val_oiou=10.0)
    first = run_promotion(store)
    assert first.decision == "first-champion" and first.challenger.value == 0.0
    assert aliases(store) == {CHAMPION: weak}

    # a better model: the alias moves, the old champion becomes challenger; the model card the
    # train flow wrote stays, the promotion is a section of its own below it
    strong = trained_run(store, "strong", threshold=0.3, val_oiou=20.0)
    card = "**Weights**: trained here (1 steps).\n\n| split | n |\n|---|---|\n| val | 4 |"
    mlflow_record.describe_version(store["uri"], strong, card)
    second = run_promotion(store, min_gain=1.0)
    assert second.decision == "promoted" and second.challenger.value > 1.0 and second.gain >= 1.0
    assert aliases(store) == {CHAMPION: strong, CHALLENGER: weak}
    story = client.get_model_version("magnet", strong)
    assert story.tags["promotion.decision"] == "promoted" and story.tags["promotion.against_version"] == weak
    assert story.description.startswith(f"{card}\n\n## Promotion\n\nPromotion: challenger version {strong}")
    assert f"champion version {weak}" in story.description and "became `champion`" in story.description
    mlflow_record.describe_version(store["uri"], strong, card)  # the card written again keeps the record
    assert client.get_model_version("magnet", strong).description == story.description

    # running it again changes nothing, and evaluates nothing (scores come from the tags)
    before = registry_state(client)
    again = run_promotion(store, min_gain=1.0)
    assert again.decision == "already-champion" and not again.changed
    assert registry_state(client) == before

    # a model with the best run metric that evaluates worse: champion stays, it gets challenger
    worse = trained_run(store, "worse", threshold=0.7, val_oiou=30.0)
    third = run_promotion(store, min_gain=1.0)
    assert third.decision == "kept" and third.gain < 0 and third.changed
    assert aliases(store) == {CHAMPION: strong, CHALLENGER: worse}
    loser = client.get_model_version("magnet", worse)
    assert loser.tags["promotion.decision"] == "kept" and "remains `champion`" in loser.description
    # a later decision on a version replaces its promotion section, the card and other sections stay
    twice = mlflow_record.with_section(f"{card}\n\n## Promotion\n\nold\n\n## Notes\n\nx", "Promotion", "new")
    assert twice == f"{card}\n\n## Promotion\n\nnew\n\n## Notes\n\nx"
    before = registry_state(client)
    assert not run_promotion(store, min_gain=1.0).changed
    assert registry_state(client) == before

    # a run on other data: refused, and the registry is untouched
    other = store["root"] / "other-shards"
    other.mkdir()
    summary = read_summary(store["shards"])
    changed = summary.settings.model_copy(
        update={"samples_per_shard": summary.settings.samples_per_shard + 1}
    )
    (other / SUMMARY).write_bytes(summary.model_copy(update={"settings": changed}).to_bytes())
    trained_run(store, "elsewhere", threshold=0.3, val_oiou=99.0, shards=str(other))
    state = registry_state(client)
    with pytest.raises(PromotionError, match="different data"):
        run_promotion(store, min_gain=1.0)
    assert registry_state(client) == state


def test_promotion_scores_the_whole_split_whatever_the_run_capped(store, tmp_path):
    """A run trained with eval.max_samples (a quick-check cap) is still scored on every sample, so
    it is compared with the champion on the same data."""
    from magnet.evaluate import evaluate

    own = store | {"root": tmp_path, "uri": f"sqlite:///{tmp_path}/mlflow.db"}
    capped = trained_run(own, "capped", threshold=0.3, val_oiou=5.0, max_samples=1)
    result = run_promotion(own)
    model, cfg = registry.load_model(f"models:/magnet/{capped}", tracking_uri=own["uri"])
    assert cfg.eval.max_samples == 1
    capped_score = evaluate(model, own["shards"], cfg, splits=["val"]).metrics["val/oIoU"]
    cfg.eval.max_samples = None
    whole = evaluate(model, own["shards"], cfg, splits=["val"]).metrics["val/oIoU"]
    assert abs(whole - capped_score) > 1e-3, "the fixture must make the cap matter"
    assert result.challenger.value == pytest.approx(whole, abs=1e-5)

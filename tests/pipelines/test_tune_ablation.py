"""The shipped ablation preset (configs/sweeps/ablation.yaml) end to end through run_sweep, made
tiny (two of its variants, two seeds, two steps): every finished trial is scored on val and the
test splits, and the sweep's run holds the mean and spread of oIoU and mIoU per variant as a
table and a plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from tiny_runs import tiny_trial

from magnet.config import CONFIG_DIR, load_config
from pipelines import tracking
from pipelines.sweep.driver import run_sweep
from pipelines.sweep.space import Param, load_space

pytestmark = pytest.mark.slow

TINY = tiny_trial(max_steps=2)
VARIANTS = ("baseline", "all")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def ablation(synthetic_shards, tmp_path_factory):
    import ray

    shards = str(synthetic_shards(num_images=16, image_size=64, seed=0, samples_per_shard=8))
    root = tmp_path_factory.mktemp("ablation")
    cfg = load_config("tiny", TINY)
    preset = load_space(CONFIG_DIR / "sweeps" / "ablation.yaml", cfg)
    space = preset.model_copy(
        update={
            "params": {
                "variant": Param.model_validate({"grid": VARIANTS}),
                "train.seed": Param.model_validate({"grid": SEEDS}),
            }
        }
    )
    uri = f"sqlite:///{root}/mlflow.db"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # two trials at a time
    try:
        result = run_sweep(
            cfg, space, shards, storage_path=root / "ray", tracking_uri=uri, experiment="ablation",
            register_best=False,
        )  # fmt: skip
    finally:
        ray.shutdown()
    return {"result": result, "uri": uri, "root": root, "space": space}


def test_the_preset_runs_every_variant_and_seed_to_the_end(ablation):
    rows = ablation["result"].trials
    assert sorted((r["variant"], r["train.seed"]) for r in rows) == sorted(
        (v, s) for v in VARIANTS for s in SEEDS
    )
    assert all(r["status"] == "FINISHED" and not r["early_stopped"] for r in rows)
    assert ablation["space"].report.splits == ("val", "testA", "testB")


def test_the_report_gives_mean_and_spread_per_variant_on_val_and_test_splits(ablation):
    result, client = ablation["result"], tracking.client_for(ablation["uri"])
    parent = result.parent_run_id
    assert {"report/summary.csv", "report/summary.md", "report/summary.png"} <= {
        a.path for a in client.list_artifacts(parent, "report")
    }
    png = Path(client.download_artifacts(parent, "report/summary.png", str(ablation["root"])))
    assert png.read_bytes().startswith(b"\x89PNG")
    text = Path(client.download_artifacts(parent, "report/summary.csv", str(ablation["root"]))).read_text()
    summary = {row["variant"]: row for row in csv.DictReader(io.StringIO(text))}
    assert sorted(summary) == sorted(VARIANTS)
    for variant in VARIANTS:
        finals = [client.get_run(r["run_id"]).data.metrics for r in result.trials if r["variant"] == variant]
        assert summary[variant]["n"] == str(len(SEEDS))
        for split in ("val", "testA", "testB"):
            for name in ("oIoU", "mIoU"):
                scores = [m[f"final/{split}/{name}"] for m in finals]  # each trial's own run
                mean = sum(scores) / len(scores)
                spread = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
                assert float(summary[variant][f"{split}/{name} mean"]) == pytest.approx(mean)
                assert float(summary[variant][f"{split}/{name} std"]) == pytest.approx(spread)
    assert result.report_markdown.splitlines()[0].startswith("| variant | n | val/oIoU mean | val/oIoU std")

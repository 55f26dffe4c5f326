"""The shipped ablation preset (configs/sweeps/ablation.yaml) end to end through run_sweep, made
tiny (two of its variants, two seeds, two steps each evaluated; two DDP workers per trial on two
CPUs): every finished trial is scored on val and the test splits, the sweep's run holds the mean and
spread of oIoU and mIoU per variant as a table and a plot, and `magnet sweep-report` writes the
ablation report of that sweep, learning curves per kind included."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from tiny_runs import tiny_trial

from data_prep.contract import read_summary
from data_prep.scenes import KINDS
from magnet.config import CONFIG_DIR, load_config
from pipelines import tracking
from pipelines.sweep.driver import run_sweep
from pipelines.sweep.space import Param, load_space

pytestmark = pytest.mark.slow

# two evaluations while training (a curve), of a few expressions only: the final scoring is whole
CAPPED = 6
TINY = [*tiny_trial(max_steps=2), "train.eval_every=1", f"eval.max_samples={CAPPED}"]
VARIANTS = ("baseline", "all")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def ablation(synthetic_shards, module_tmp):
    import ray

    shards = str(synthetic_shards(num_images=16, image_size=64, seed=0, samples_per_shard=8))
    root = module_tmp("ablation")
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
    # a laptop's two cores and the demo's two DDP workers per trial: the trial's driver must not
    # take a CPU of its own, or no trial fits
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(
            cfg, space, str(shards), storage_path=str(root / "ray"), tracking_uri=uri, experiment="ablation",
            workers_per_trial=2, register_best=False,
        )  # fmt: skip
    finally:
        ray.shutdown()
    return {"result": result, "uri": uri, "root": root, "space": space, "shards": shards}


def test_the_preset_runs_every_variant_and_seed_to_the_end(ablation):
    rows = ablation["result"].trials
    assert sorted((r["variant"], r["train.seed"]) for r in rows) == sorted(
        (v, s) for v in VARIANTS for s in SEEDS
    )
    assert all(r["status"] == "FINISHED" and not r["early_stopped"] for r in rows)
    assert ablation["space"].report.splits == ("val", "testA", "testB")


def test_every_finished_trial_is_scored_on_whole_splits_whatever_its_training_capped(ablation):
    client = tracking.client_for(ablation["uri"])
    counts = read_summary(str(ablation["shards"])).counts
    for row in ablation["result"].trials:
        metrics = client.get_run(row["run_id"]).data.metrics
        assert metrics["val/n"] == CAPPED < counts["val"].written  # the evaluations while training
        for split in ("val", "testA", "testB"):
            assert metrics[f"final/{split}/n"] == counts[split].written


def test_the_report_gives_mean_and_spread_per_variant_on_val_and_test_splits(ablation):
    result, client = ablation["result"], tracking.client_for(ablation["uri"])
    parent = result.parent_run_id
    assert {"report/summary.csv", "report/summary.md", "report/summary.png", "report/groups.csv"} <= {
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


def sweep_report(*args: str):
    from typer.testing import CliRunner

    from pipelines.cli import app

    return CliRunner().invoke(app, ["sweep-report", *args])


def test_the_report_command_writes_the_ablation_report_of_the_finished_sweep(ablation, tmp_path):
    result, client = ablation["result"], tracking.client_for(ablation["uri"])
    out = tmp_path / "results" / "ablation.md"
    out.parent.mkdir()
    outcome = sweep_report(
        result.sweep_name, "--out", str(out), "--experiment", "ablation", "--tracking-uri", ablation["uri"]
    )
    assert outcome.exit_code == 0, outcome.output
    text = out.read_text()
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG") and "](ablation.png)" in text
    assert "- Command: `" in text and "commit `" in text and "train.max_steps=2" in text
    headers = [line for line in text.splitlines() if line.startswith("| variant | split | n | overall |")]
    # oIoU, mIoU, pick accuracy (the shards carry the images' objects), outline IoU when a trial picked right
    assert len(headers) in (3, 4) and all(any(f"| {kind} " in h for kind in KINDS) for h in headers)
    for variant in VARIANTS:  # a row per variant and split, the numbers those of the trials' runs
        finals = [client.get_run(r["run_id"]).data.metrics for r in result.trials if r["variant"] == variant]
        for split in ("val", "testA", "testB"):
            scores = [m[f"final/{split}/oIoU"] for m in finals]
            mean = sum(scores) / len(scores)
            spread = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
            assert f"| {variant} | {split} | {len(SEEDS)} | {mean:.1f} ± {spread:.1f} |" in text
    assert "mean_X - mean_baseline > std_X + std_baseline" in text
    (sentence,) = [line for line in text.splitlines() if line.startswith("- **all**")]
    assert "beyond the spread" in sentence


def test_the_report_gives_the_learning_curves_per_kind_of_the_trials_evaluations(ablation, tmp_path):
    result, client = ablation["result"], tracking.client_for(ablation["uri"])
    out = tmp_path / "ablation.md"
    outcome = sweep_report(
        result.sweep_name, "--out", str(out), "--experiment", "ablation", "--tracking-uri", ablation["uri"]
    )
    assert outcome.exit_code == 0, outcome.output
    text = out.read_text()
    assert (tmp_path / "ablation-curves.png").read_bytes().startswith(b"\x89PNG")
    assert "](ablation-curves.png)" in text and "## Learning curves" in text
    (header,) = [line for line in text.splitlines() if line.startswith("| variant | step | n | overall |")]
    kinds = {key.split("/")[2] for r in result.trials for key in client.get_run(r["run_id"]).data.metrics
             if key.startswith("val/kind/")}  # fmt: skip
    assert kinds and {c.strip() for c in header.split("|")[5:-1]} == kinds
    for variant in VARIANTS:  # each evaluated step: the mean and spread of the trials' own histories
        runs = [r["run_id"] for r in result.trials if r["variant"] == variant]
        histories = [{m.step: m.value for m in client.get_metric_history(run, "val/oIoU")} for run in runs]
        assert all(sorted(h) == [1, 2] for h in histories)
        for step in (1, 2):
            scores = [h[step] for h in histories]
            mean = sum(scores) / len(scores)
            spread = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
            assert f"| {variant} | {step} | {len(SEEDS)} | {mean:.1f} ± {spread:.1f} |" in text


def test_the_report_command_refuses_what_it_cannot_report(ablation, tmp_path):
    uri, name = ablation["uri"], ablation["result"].sweep_name
    store = ["--experiment", "ablation", "--tracking-uri", uri]
    outcome = sweep_report("nope", "--out", str(tmp_path / "r.md"), *store)
    assert outcome.exit_code == 2
    assert (
        outcome.output.strip()
        == f"error: nope: no sweep of that name in experiment ablation; sweeps there: {name}"
    )
    outcome = sweep_report(name, "--out", str(tmp_path / "missing" / "r.md"), *store)
    assert outcome.exit_code == 2 and "missing is not a directory" in outcome.output
    client = tracking.client_for(uri)
    started = client.create_run(
        client.get_experiment_by_name("ablation").experiment_id,
        run_name="half-done",
        tags={"tune.kind": "sweep", "tune.sweep": "half-done"},
    )  # a sweep whose driver died before any trial was scored
    for key, value in tracking.client_for(uri).get_run(ablation["result"].parent_run_id).data.params.items():
        if key.startswith("sweep."):
            client.log_param(started.info.run_id, key, value)
    outcome = sweep_report("half-done", "--out", str(tmp_path / "r.md"), *store)
    assert outcome.exit_code == 2 and "half-done: no trial has final scores" in outcome.output
    assert not (tmp_path / "r.md").exists()

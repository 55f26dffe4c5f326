"""Sweeps: the space file's validation, and a 4-trial Tune-over-Train sweep on local Ray where ASHA
stops the trials that cannot win, tracked as MLflow parent and child runs, the best registered."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_runs import tiny_trial

from magnet.config import load_config
from pipelines import tracking
from pipelines.sweep.driver import run_sweep
from pipelines.sweep.report import (
    FinishedSweep,
    aggregate,
    aggregate_curves,
    aggregate_groups,
    aggregate_plot,
    beats_beyond_spread,
    curve_keys,
    curves_plot,
    groups_plot,
    has_curves,
    report_markdown,
    verdict,
    wins_over_baseline,
)
from pipelines.sweep.space import SpaceError, apply_params, load_space

TINY = tiny_trial()

# Deterministic by design: with a 0.95 threshold a barely trained model predicts no foreground,
# so its val oIoU is 0 while a 0.05 threshold scores above 0. The grid lists 0.05 first, so a
# 0.95 trial always meets a better trial at its first rung and ASHA (grace 1, factor 2) stops at
# least one of them. Which 0.05 trial survives is not fixed: the two seeds score differently,
# and the weaker may fall below the rung's cutoff too.
SWEEP = """
metric: val/oIoU
mode: max
search: grid
num_samples: 1
scheduler: {time_attr: step, grace_period: 1, reduction_factor: 2}
params:
  eval.threshold: {grid: [0.05, 0.95]}
  train.seed: {grid: [0, 1]}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ the space file
def test_shipped_sweeps_load_and_fit_the_config():
    cfg = load_config("tiny")
    weights = load_space("configs/sweeps/loss-weights.yaml", cfg)
    assert weights.search == "optuna" and weights.params["train.lr"].kind == "loguniform"
    ablation = load_space("configs/sweeps/ablation.yaml", cfg)
    assert ablation.report.group_by == "variant" and len(ablation.variants) == 5
    baseline = apply_params(cfg, {"variant": "baseline", "train.seed": 2}, ablation.variants)
    assert not baseline.model.fusion.use_cam and not baseline.model.mask_grounding.enabled
    assert not baseline.model.alignment.enabled and baseline.train.seed == 2
    grounding = load_space("configs/sweeps/mask-grounding.yaml", cfg)
    separate = apply_params(cfg, {"variant": "+MG separate", "train.seed": 0}, grounding.variants)
    assert separate.model.mask_grounding.encoder_pass == "separate" and not separate.model.alignment.enabled
    assert grounding.report.splits == ("val",)  # choices on val only
    seeds = load_space("configs/sweeps/seeds.yaml", cfg)
    assert seeds.params["train.seed"].values == (0, 1, 2) and seeds.report.group_by == "variant"
    assert apply_params(cfg, {"variant": "as-configured", "train.seed": 1}, seeds.variants) == cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"seed": 1})}
    )  # the recipe as given, only the seed changes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "params: {model.loss.lambda_xx: {uniform: [0, 1]}}",
            "params.model.loss.lambda_xx is not a config field",
        ),
        ("params: {train.lr: {gaussian: [0, 1]}}", "params.train.lr: unknown distribution 'gaussian'"),
        ("params: {train.lr: {loguniform: [0, 1]}}", "params.train.lr: loguniform needs low > 0"),
        ("params: {train.lr: {uniform: [2, 1]}}", "params.train.lr: uniform needs low < high"),
        ("params: {train.lr: {choice: []}}", "params.train.lr: choice needs a non-empty list"),
        ("params: {train.seed: {grid: [0, 1]}}", "optuna cannot search grid params ['train.seed']"),
        ("params: {train.lr: {choice: [fast]}}", "params.train.lr = 'fast'"),
        ("search: grid\nparams: {train.lr: {choice: [1]}}", "every param as a grid; not: ['train.lr']"),
        ("params: {variant: {grid: [nope]}}\nsearch: grid", "['nope'] not among variants"),
        ("metrics: x\nparams: {train.lr: {choice: [1]}}", "unknown top-level key(s) ['metrics']"),
    ],
)
def test_bad_space_entries_are_named(tmp_path, text, message):
    with pytest.raises(SpaceError) as err:
        load_space(write(tmp_path, text), load_config("tiny"))
    assert message in str(err.value)


@pytest.mark.parametrize("search", ["optuna", "random"])
def test_searchers_accept_the_loss_weight_space(search):
    from pipelines.sweep.driver import _searcher, tune_param_space

    space = load_space("configs/sweeps/loss-weights.yaml", load_config("tiny"))
    searcher = _searcher(search, seed=0, concurrency=2)
    assert searcher.set_search_properties(space.metric, space.mode, tune_param_space(space))


def flat(output: str) -> str:
    """Typer's error box wraps lines: the words alone."""
    return " ".join(output.replace("│", " ").split())


def test_tune_command_refuses_a_bad_space_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    space = write(tmp_path, "params: {model.loss.lambda_mg: {loguniform: [-1, 1]}}")
    outcome = CliRunner().invoke(app, ["tune", "--space", str(space), "--shards", str(tmp_path)])
    assert outcome.exit_code == 2 and "loguniform needs low > 0" in flat(outcome.output)
    outcome = CliRunner().invoke(
        app,
        ["tune", "--space", "configs/sweeps/ablation.yaml", "--shards", str(tmp_path), "--search", "optuna"],
    )
    assert outcome.exit_code == 2 and "optuna cannot search grid params" in flat(outcome.output)
    outcome = CliRunner().invoke(
        app,
        [
            "tune",
            "--space",
            "configs/sweeps/loss-weights.yaml",
            "--shards",
            str(tmp_path),
            "--set",
            "train.max_steps=6",
        ],
    )
    assert outcome.exit_code == 2 and "grace_period 2000 is not before the end" in flat(outcome.output)


@pytest.mark.parametrize(
    "space",
    [
        "search: grid\nparams: {data.eval_splits: {grid: [[val], [val, testB]]}}",
        "search: grid\nparams: {variant: {grid: [plain, hard]}}\n"
        "variants: {plain: {}, hard: {data.eval_splits: [testB]}}",
    ],
    ids=["grid", "variant"],
)
def test_a_corrupt_shard_only_some_trials_read_is_named_before_any_starts(synthetic_shards, tmp_path, space):
    """A split that only the trials of one grid value or one variant evaluate on is checked with
    the others: found in a trial, its corrupt shard would fail those trials after their training."""
    from contract_files import corrupt_copy

    from data_prep.contract import ShardError
    from pipelines.sweep.driver import check_sweep_splits

    copy = corrupt_copy(synthetic_shards(), tmp_path / "refcoco-unc", "testB/shard-000000.tar")
    shard = copy / "testB" / "shard-000000.tar"
    cfg = load_config("tiny", ["data.eval_splits=[val]"])
    parsed = load_space(write(tmp_path, space), cfg)
    with pytest.raises(ShardError, match=f"{shard}.* is corrupt"):
        check_sweep_splits(cfg, parsed, str(copy), register_best=False)


def test_ablation_report_aggregates_seeds_per_variant():
    rows = [
        {"variant": "baseline", "final": {"val/oIoU": 50.0, "val/mIoU": 40.0}},
        {"variant": "baseline", "final": {"val/oIoU": 54.0, "val/mIoU": 44.0}},
        {"variant": "all", "final": {"val/oIoU": 60.0, "val/mIoU": 50.0}},
        {"variant": "all", "final": None},  # early-stopped or failed: no final scores
    ]
    ordered = aggregate(rows, "variant", ["val"], order=["baseline", "+MG", "all"])
    assert [row["variant"] for row in ordered] == ["baseline", "all"]  # the file's order, +MG had none
    table = {row["variant"]: row for row in ordered}
    assert table["baseline"]["n"] == 2 and table["baseline"]["val/oIoU mean"] == 52.0
    assert table["baseline"]["val/oIoU std"] == pytest.approx(2.8284, abs=1e-3)
    assert table["all"]["n"] == 1 and table["all"]["val/mIoU std"] == 0.0
    assert aggregate_plot(list(table.values()), "variant", ["val"]).startswith(b"\x89PNG")


def scores(overall: float, relation: float) -> dict[str, float]:
    """One trial's final metrics on val: overall and one kind, mIoU 10 points under oIoU."""
    return {
        "val/oIoU": overall, "val/mIoU": overall - 10, "val/P@0.5": 1.0,
        "val/kind/relation/oIoU": relation, "val/kind/relation/mIoU": relation - 10,
        "val/kind/relation/n": 3.0, "testA/oIoU": 99.0, "testA/mIoU": 99.0,
    }  # fmt: skip


def test_ablation_report_aggregates_seeds_per_variant_split_and_kind():
    rows = [
        {"variant": "+MG", "final": scores(60.0, 70.0)},
        {"variant": "baseline", "final": scores(50.0, 40.0)},
        {"variant": "baseline", "final": scores(54.0, 44.0)},
        {"variant": "+MG", "final": scores(62.0, 72.0)},
        {"variant": "+MG", "final": None},  # not scored
    ]
    cells = aggregate_groups(rows, "variant", ["val"], order=["baseline", "+CAL", "+MG"])
    assert [(c["variant"], c["split"], c["group"]) for c in cells] == [
        ("baseline", "val", "all"), ("baseline", "val", "kind/relation"),
        ("+MG", "val", "all"), ("+MG", "val", "kind/relation"),
    ]  # fmt: skip
    relation = cells[1]
    assert relation["n"] == 2 and relation["oIoU mean"] == 42.0 and relation["mIoU mean"] == 32.0
    assert relation["oIoU std"] == pytest.approx(2.8284, abs=1e-3)
    assert cells[2]["n"] == 2 and cells[2]["oIoU mean"] == 61.0
    assert groups_plot(cells, "variant", ["val"]).startswith(b"\x89PNG")


def test_learning_curves_are_the_training_evaluations_oiou_per_split_and_kind():
    logged = [
        "val/oIoU", "val/mIoU", "val/kind/ordinal/oIoU", "val/kind/ordinal/n", "train/oIoU",
        "train/loss", "train/samples_per_s", "final/val/oIoU", "final/val/kind/ordinal/oIoU",
    ]  # fmt: skip
    assert curve_keys(logged) == ["val/oIoU", "val/kind/ordinal/oIoU", "train/oIoU"]


def test_learning_curves_aggregate_seeds_per_variant_step_and_kind():
    rows = [
        {"variant": "all", "curves": {"val/oIoU": [(50, 30.0), (100, 40.0)]}},
        {"variant": "baseline", "curves": {"val/oIoU": [(50, 20.0), (100, 24.0)]}},
        {"variant": "baseline", "curves": {"val/oIoU": [(50, 22.0), (100, 28.0)],
                                           "val/kind/ordinal/oIoU": [(100, 21.0)]}},
    ]  # fmt: skip
    curves = aggregate_curves(rows, "variant", order=["baseline", "+MG", "all"])
    assert [(c["variant"], c["group"], c["step"], c["n"]) for c in curves] == [
        ("baseline", "all", 50, 2), ("baseline", "all", 100, 2), ("baseline", "kind/ordinal", 100, 1),
        ("all", "all", 50, 1), ("all", "all", 100, 1),
    ]  # fmt: skip
    assert curves[1]["mean"] == 26.0 and curves[1]["std"] == pytest.approx(2.8284, abs=1e-3)
    assert curves[2]["std"] == 0.0 and has_curves(curves)
    assert curves_plot(curves, "variant").startswith(b"\x89PNG")
    once = aggregate_curves([{"variant": "all", "curves": {"val/oIoU": [(50, 30.0)]}}], "variant")
    assert not has_curves(once)  # evaluated once: no curve to draw


def test_a_one_recipe_sweep_reports_its_spread_and_curves_without_a_baseline_verdict():
    one = "as-configured"
    rows = [
        {"variant": one, "final": scores(30.0, 20.0), "curves": {"val/oIoU": [(50, 20.0), (100, 30.0)]}},
        {"variant": one, "final": scores(34.0, 24.0), "curves": {"val/oIoU": [(50, 22.0), (100, 34.0)]}},
    ]
    sweep = FinishedSweep(
        name="seeds", experiment="e", run_id="r", params={}, tags={}, group_by="variant", splits=("val",),
        order=(one,), rows=rows,
    )  # fmt: skip
    cells = aggregate_groups(rows, "variant", ["val"], sweep.order)
    text = report_markdown(sweep, cells, "seeds.png", aggregate_curves(rows, "variant"), "seeds-curves.png")
    assert text.startswith("# Sweep report: seeds") and "Against the baseline" not in text
    assert "| as-configured | val | 2 | 32.0 ± 2.8 | 22.0 ± 2.8 |" in text
    assert "![oIoU per evaluated step, split and kind](seeds-curves.png)" in text
    assert "| as-configured | 100 | 2 | 32.0 ± 2.8 |" in text


def test_the_report_tables_pick_accuracy_and_outline_iou_beside_oiou():
    picks = {"val/pick_acc": 60.0, "val/outline_IoU": 70.0, "val/kind/relation/pick_acc": 50.0}
    rows = [
        {"variant": "baseline", "final": {**scores(30.0, 20.0), **picks}},
        {"variant": "baseline", "final": {**scores(34.0, 24.0), **picks, "val/pick_acc": 64.0,
                                          "val/outline_IoU": 72.0, "val/kind/relation/pick_acc": 0.0}},
        {"variant": "+MG", "final": scores(40.0, 30.0)},  # scored on shards without the images' objects
    ]  # fmt: skip
    sweep = FinishedSweep(
        name="picks", experiment="e", run_id="r", params={}, tags={}, group_by="variant", splits=("val",),
        order=("baseline", "+MG"), rows=rows,
    )  # fmt: skip
    cells = aggregate_groups(rows, "variant", ["val"], sweep.order)
    baseline, relation, mg = cells[0], cells[1], cells[2]
    assert baseline["pick_acc mean"] == 62.0 and baseline["outline_IoU mean"] == 71.0
    assert baseline["outline_IoU std"] == pytest.approx(1.4142, abs=1e-3)
    assert "outline_IoU mean" not in relation  # nothing picked right there
    assert "pick_acc mean" not in mg
    text = report_markdown(sweep, cells, "picks.png")
    pick_acc = text[text.index("## pick_acc (%, mean ± std over seeds)") : text.index("## outline_IoU")]
    assert "| baseline | val | 2 | 62.0 ± 2.8 | 25.0 ± 35.4 |" in pick_acc
    assert "| +MG | val | 1 |  |  |" in pick_acc
    assert "| baseline | val | 2 | 71.0 ± 1.4 |  |" in text[text.index("## outline_IoU") :]
    assert "A low pick_acc is the wrong object" in text


@pytest.mark.parametrize(
    ("mean", "std", "expected"),
    [(56.0, 1.0, True), (55.0, 1.0, False), (55.0, 0.0, True), (60.0, 5.0, True), (60.0, 6.5, False)],
)
def test_a_variant_beats_the_baseline_only_beyond_both_spreads(mean, std, expected):
    assert beats_beyond_spread(mean, std, baseline_mean=50.0, baseline_std=4.0) is expected


def test_each_variant_is_told_where_it_beats_the_baseline_beyond_the_spread():
    rows = [
        {"variant": "baseline", "final": scores(50.0, 40.0)},
        {"variant": "baseline", "final": scores(54.0, 44.0)},
        {"variant": "+MG", "final": scores(60.0, 45.0)},  # overall far above, relation within spread
        {"variant": "+MG", "final": scores(62.0, 41.0)},
        {"variant": "+CAL", "final": scores(53.0, 43.0)},
    ]
    cells = aggregate_groups(rows, "variant", ["val"], order=["baseline", "+MG", "+CAL"])
    wins = wins_over_baseline(cells, "variant", "baseline")
    assert wins == {"+MG": [("oIoU", "val", "all"), ("mIoU", "val", "all")], "+CAL": []}
    assert verdict("+MG", wins["+MG"], "baseline") == (
        "**+MG** beats baseline beyond the spread in oIoU on val overall; in mIoU on val overall."
    )
    assert verdict("+CAL", [], "baseline") == (
        "**+CAL** does not beat baseline beyond the spread on any split or kind."
    )


# ------------------------------------------------------------------------------------ a sweep
@pytest.fixture(scope="module")
def shards(synthetic_shards) -> str:
    return str(synthetic_shards(num_images=16, image_size=64, seed=0, samples_per_shard=8))


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("DO_NOT_TRACK", "1")
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def sweep(shards, harness, module_tmp) -> dict:
    """The tune-magnet flow on local Ray: 4 CPUs, two one-worker trials at a time (their start-up
    waits overlap). A trial ASHA kills leaves its worker's CPU reserved when the state API
    (dashboard) is off; there is room for that. The last 0.95 trial starts only once an earlier
    trial has ended, so it meets the first rung's recorded scores and is stopped whatever the race."""
    import ray
    from prefect.artifacts import Artifact

    from pipelines.flows.tune import tune_magnet

    os.environ["HF_HUB_OFFLINE"] = "1"
    root = module_tmp("sweep")
    uri = f"sqlite:///{root}/mlflow.db"  # explicit: MLflow exports the last URI set as MLFLOW_TRACKING_URI
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        summary = tune_magnet(
            space=str(write(root, SWEEP)),
            config="tiny",
            shards=shards,
            overrides=TINY,
            experiment="sweep-test",
            tracking_uri=uri,
            storage_path=str(root / "ray"),
            max_concurrent=2,
        )
    finally:
        ray.shutdown()
    table = Artifact.get(f"tune-magnet-{summary['sweep_name']}")
    return {"result": SimpleNamespace(**summary), "uri": uri, "root": root, "table": table}


@pytest.mark.slow
def test_asha_stops_the_losing_trials_early(sweep):
    rows = sweep["result"].trials
    assert len(rows) == 4
    stopped = [r for r in rows if r["early_stopped"]]
    assert any(r["eval.threshold"] == 0.95 for r in stopped)
    assert all(r["step"] < 6 and r["status"] == "KILLED" for r in stopped)
    finished = [r for r in rows if r["status"] == "FINISHED"]
    assert finished and all(r["step"] == 6 for r in finished)
    assert rows[0]["eval.threshold"] == 0.05 and rows[0]["val/oIoU"] > 0  # ranked best first
    table = json.loads(sweep["table"].data)  # the flow's Prefect table artifact
    assert [row["trial"] for row in table] == [row["trial"] for row in rows] and table[0]["rank"] == 1


@pytest.mark.slow
def test_parent_and_child_runs_carry_params_curves_and_checkpoints(sweep):
    result = sweep["result"]
    client = tracking.client_for(sweep["uri"])
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == result.sweep_name
    assert (
        parent.data.params["sweep.search"] == "grid" and "eval.threshold" in parent.data.params["sweep.space"]
    )
    assert parent.data.params["sweep.scheduler"].startswith("asha(time_attr=step, grace_period=1")
    assert parent.data.tags["tune.trials"] == "4" and parent.data.metrics["best/val/oIoU"] > 0
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "trials.md"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    assert len(children) == 4
    for child in children:
        row = next(r for r in result.trials if r["run_id"] == child.info.run_id)
        assert child.data.params["eval.threshold"] == str(row["eval.threshold"])
        assert child.data.params["train.seed"] == str(row["train.seed"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/oIoU")]
        assert steps == [2, 4, 6][: len(steps)] and steps
        assert "checkpoint.last" in child.data.tags or "checkpoint.best" in child.data.tags
        assert child.info.status == ("KILLED" if row["early_stopped"] else "FINISHED")
    csv_text = Path(client.download_artifacts(result.parent_run_id, "trials.csv")).read_text()
    assert csv_text.splitlines()[0].startswith("rank,trial,status,val/oIoU")


@pytest.mark.slow
def test_the_best_trial_is_registered(sweep):
    result = sweep["result"]
    client = tracking.client_for(sweep["uri"])
    version = client.get_model_version("magnet", result.model_version)
    assert version.run_id == result.best_run_id == result.trials[0]["run_id"]
    assert client.get_run(result.parent_run_id).data.tags["tune.best_model_version"] == result.model_version


@pytest.mark.slow
def test_a_finished_sweep_name_cannot_be_started_again(sweep, shards):
    result = sweep["result"]
    cfg = load_config("tiny", TINY)
    space = load_space(write(sweep["root"], SWEEP), cfg)
    with pytest.raises(FileExistsError, match="resume it"):
        run_sweep(
            cfg, space, str(shards), storage_path=str(sweep["root"] / "ray"), tracking_uri=sweep["uri"],
            sweep_name=result.sweep_name,
        )  # fmt: skip


@pytest.mark.slow
def test_resuming_a_finished_sweep_reruns_nothing_and_registers_nothing_new(sweep, shards):
    import ray

    result = sweep["result"]
    cfg = load_config("tiny", TINY)
    space = load_space(write(sweep["root"], SWEEP), cfg)
    with pytest.raises(FileNotFoundError, match="no sweep 'nope'"):
        run_sweep(
            cfg, space, str(shards), storage_path=str(sweep["root"] / "ray"), tracking_uri=sweep["uri"],
            sweep_name="nope", resume=True,
        )  # fmt: skip
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        again = run_sweep(
            cfg, space, str(shards), storage_path=str(sweep["root"] / "ray"), tracking_uri=sweep["uri"],
            experiment="sweep-test", sweep_name=result.sweep_name, resume=True,
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert again.parent_run_id == result.parent_run_id and again.model_version == result.model_version
    assert [(r["trial"], r["status"], r["step"]) for r in again.trials] == [
        (r["trial"], r["status"], r["step"]) for r in result.trials
    ]
    client = tracking.client_for(sweep["uri"])
    assert len(client.search_model_versions("name = 'magnet'")) == 1


@pytest.mark.slow
def test_promoting_the_sweeps_best_makes_it_champion(sweep, shards):
    from pipelines.flows.tune import promote_magnet

    result = sweep["result"]
    promotion = promote_magnet(
        experiment="sweep-test", shards=shards, sweep=result.parent_run_id, tracking_uri=sweep["uri"]
    )
    assert promotion["decision"] == "first-champion" and promotion["champion_version"] == result.model_version
    assert promotion["challenger"]["run_id"] == result.best_run_id and promotion["challenger"]["value"] > 0


@pytest.mark.slow
def test_quiet_workers_mute_the_placement_group_cleaner_in_every_ray_worker():
    """The demo and `magnet tune` start Ray with QUIET_WORKERS: the hook runs in each worker process,
    where Train's PlacementGroupCleaner would warn once a second that the state API is missing, or
    die with a traceback when several Ray instances share the machine."""
    import logging

    import ray

    from pipelines.ray_workers import CLEANER_LOGGER, QUIET_WORKERS

    def worker_settings() -> tuple[int, str | None, str]:
        return (
            logging.getLogger(CLEANER_LOGGER).getEffectiveLevel(),
            os.environ.get("RAY_ADDRESS"),
            ray.get_runtime_context().gcs_address,
        )

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env=QUIET_WORKERS)
    try:
        level, address, own = ray.get(ray.remote(worker_settings).remote())
    finally:
        ray.shutdown()
    assert level == logging.ERROR
    assert address == own  # the state API asks this cluster, not any other on the machine

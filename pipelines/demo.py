"""`magnet demo`: the whole pipeline on a laptop in minutes, everything kept under one directory.

    <workdir>/data/             synthetic RefCOCO in the refer layout + synth_report.json (baselines)
    <workdir>/shards/refcoco-unc/  WebDataset shards, manifest, rejects, summary.json
    <workdir>/mlflow.db, mlartifacts/   the MLflow store (runs, the registered model `magnet`)
    <workdir>/ray-results/      Ray Train checkpoints, and the Tune sweep's trials
    <workdir>/pictures/         predictions per split (predicted red, true outlined in cyan)
    <workdir>/demo-summary.json metrics per split and per kind of expression (oIoU, mIoU, pick
                                accuracy, outline IoU) beside the language-blind baselines

After the training, the model is promoted to `champion` (its score recorded on the version), then
a short sweep of the loss weights runs (`SWEEP_TRIALS` tiny trials: an MLflow parent run with a
child run per trial), so the MLflow UI shows every piece of the pipeline. Data and shards are
reused when present, so a second run only trains again. Training settings are the `demo` preset
(configs/demo.yaml); the data size is data_prep.synthetic_shards'.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.sweep.driver import SweepResult

DEMO_CONFIG = "demo"
DEMO_WORKERS = 2
EXPERIMENT = "magnet-demo"
SWEEP_EXPERIMENT = "magnet-demo-sweeps"
SWEEP_TRIALS = 2
SWEEP_OVERRIDES = (  # on the demo preset: a few steps, one evaluation (of val) at the end
    "data.eval_splits=[val]",
    "train.max_steps=6",
    "train.eval_every=6",
    "train.checkpoint_every=6",
    "train.log_every=1",
)
ALIAS = "demo"
TIDY_ENV = {  # a readable console: no per-worker weight-loading bars and reports
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "HF_HUB_OFFLINE": "1",
}


def _baselines(data: Path) -> dict[str, dict[str, Any]]:
    """synth_report.json's language-blind floors (fractions) per split and per kind of expression."""
    report = json.loads((data / "synth_report.json").read_text())

    def floors(stats: dict[str, Any]) -> dict[str, float]:
        return {"largest": stats["baseline_largest_oiou"], "random": stats["baseline_random_oiou"]}

    return {
        split: {**floors(stats), "kinds": {kind: floors(k) for kind, k in stats.get("kinds", {}).items()}}
        for split, stats in report["splits"].items()
    }


def _score_row(metrics: dict[str, float], prefix: str, floors: dict[str, Any]) -> dict[str, float | None]:
    """The model's oIoU, mIoU, pick accuracy, outline IoU and n under ``prefix`` ('val',
    'val/kind/relation') beside the baselines' oIoU, all in percent; a pick figure the evaluation
    did not give (shards without the images' objects, nothing picked right) is None."""
    return {
        "oIoU": metrics[f"{prefix}/oIoU"],
        "mIoU": metrics[f"{prefix}/mIoU"],
        "pick_acc": metrics.get(f"{prefix}/pick_acc"),
        "outline_IoU": metrics.get(f"{prefix}/outline_IoU"),
        "n": metrics[f"{prefix}/n"],
        "baseline_largest": 100 * floors["largest"],
        "baseline_random": 100 * floors["random"],
    }


def score_rows(metrics: dict[str, float], baselines: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per evaluated split its row and, under ``kinds``, a row per kind of expression."""
    rows: dict[str, dict[str, Any]] = {}
    for split, floors in baselines.items():
        if f"{split}/oIoU" not in metrics:
            continue
        kinds = {
            kind: _score_row(metrics, f"{split}/kind/{kind}", kind_floors)
            for kind, kind_floors in floors["kinds"].items()
            if f"{split}/kind/{kind}/oIoU" in metrics
        }
        rows[split] = {**_score_row(metrics, split, floors), "kinds": kinds}
    return rows


def _beats_both(row: dict[str, float]) -> bool:
    return row["oIoU"] > max(row["baseline_largest"], row["baseline_random"])


def _percent(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def score_table(rows: dict[str, dict[str, Any]]) -> str:
    """The splits, each followed by its kinds (indented), model beside baselines (oIoU, percent);
    pick accuracy and outline IoU beside the model's oIoU and mIoU ('-' where not scored)."""
    header = (
        f"{'split / kind':<14} {'n':>5} {'model oIoU':>10} {'mIoU':>7} {'pick':>7} {'outline':>7} "
        f"{'largest':>8} {'random':>7}"
    )
    lines = [f"{header}  beats both"]
    for split, row in rows.items():
        for name, line in ((split, row), *((f"  {kind}", k) for kind, k in row["kinds"].items())):
            lines.append(
                f"{name:<14} {line['n']:>5.0f} {line['oIoU']:>10.2f} {line['mIoU']:>7.2f} "
                f"{_percent(line['pick_acc'], 7)} {_percent(line['outline_IoU'], 7)} "
                f"{line['baseline_largest']:>8.2f} {line['baseline_random']:>7.2f}  "
                + ("yes" if _beats_both(line) else "NO")
            )
    return "\n".join(lines)


def _try_it_example(workdir: Path, shards: Path) -> tuple[Path, str]:
    """A validation image and one of its expressions, for the printed `magnet predict` line."""
    import pyarrow.parquet as pq

    from data_prep.contract import MANIFEST
    from data_prep.refer import IMAGE_SUBDIR
    from data_prep.synth import image_file_name

    rows = pq.read_table(shards / MANIFEST, columns=["split", "image_id", "raw"]).to_pylist()
    row = next(r for r in rows if r["split"] == "val")
    return workdir / "data" / IMAGE_SUBDIR / image_file_name(row["image_id"]), row["raw"]


def _start_ray() -> None:
    """Local Ray for the whole demo (or RAY_ADDRESS's cluster), workers' cleaner warnings muted.

    Locally it counts at least a CPU per sweep trial, so the trials run side by side: a trial's
    driver reserves no CPU (it only waits on its one Train worker), and 2 cores carry the 2 workers.
    """
    import ray

    from pipelines import interrupts
    from pipelines.ray_workers import QUIET_WORKERS

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=QUIET_WORKERS)
    else:
        cpus = max(os.cpu_count() or 1, DEMO_WORKERS, SWEEP_TRIALS)
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=QUIET_WORKERS)
    interrupts.reclaim_sigterm()


def _ui_guide(summary: dict[str, Any]) -> str:
    """Where the demo's runs, sweep and aliases sit in the MLflow UI."""
    mlflow, sweep, champion = summary["mlflow"], summary["sweep"], summary["champion"]
    return "\n".join(
        [
            f"MLflow UI: mlflow ui --backend-store-uri {mlflow['tracking_uri']}   (then http://127.0.0.1:5000)",
            f"  Experiments > {EXPERIMENT}: the training run {mlflow['run_id']} "
            "(params, loss curves, metrics, predictions/)",
            f"  Experiments > {SWEEP_EXPERIMENT}: the sweep {sweep['name']}, expand it: "
            f"{len(sweep['trials'])} child runs, one per trial; its artifacts hold trials.md (ranked)",
            f"  Models > magnet: `champion` = version {champion['champion_version']}, "
            + ", ".join(
                f"`{alias}` = version {version}"
                for alias, version in summary["aliases"].items()
                if alias != "champion"
            )
            + "; each version's description and promotion.* tags tell why",
        ]
    )


def run_demo_sweep(
    workdir: Path,
    shards: str,
    *,
    tracking_uri: str,
    experiment: str = SWEEP_EXPERIMENT,
    trials: int = SWEEP_TRIALS,
    config: str = DEMO_CONFIG,
    overrides: Sequence[str] = SWEEP_OVERRIDES,
) -> SweepResult:
    """A short sweep of the loss weights for the demo (a few tiny trials, one CPU worker each), so
    a newcomer finds a parent run with a child run per trial in the MLflow UI.

    Its trials are too short to compete with the demo's trained model, so none is registered: that
    spares a model logging and, in a promotion, an evaluation, a minute on 2 cores. No early
    stopping here: the worker group of a trial ASHA kills is released through Ray's state API,
    which needs the dashboard (ray[default]), not installed here.
    """
    from magnet.config import CONFIG_DIR, load_config
    from pipelines.sweep.driver import run_sweep
    from pipelines.sweep.space import Scheduler, load_space

    cfg = load_config(config, list(overrides))
    space = load_space(CONFIG_DIR / "sweeps" / "loss-weights.yaml", cfg)
    space = space.model_copy(update={"scheduler": Scheduler(early_stopping=False)})
    return run_sweep(
        cfg,
        space,
        shards,
        storage_path=str(Path(workdir).resolve() / "ray-results"),
        tracking_uri=tracking_uri,
        experiment=experiment,
        num_samples=trials,
        search="random",
        register_best=False,
    )


def _demo_environment(workdir: Path) -> str:
    """Quiet libraries, Prefect's temporary API and MLflow's store under the demo's folder (unless
    the user points elsewhere); returns the tracking URI."""
    from pipelines.stack import QUIET_ENV
    from pipelines.tracking import resolve_tracking_uri

    for key, value in {**QUIET_ENV, **TIDY_ENV}.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ:
        os.environ.setdefault(
            "PREFECT_HOME", str(workdir / "prefect")
        )  # Prefect's temporary API keeps its DB here
    return resolve_tracking_uri(default_dir=workdir)


def _summary(
    workdir: Path,
    config: str,
    num_workers: int,
    result: dict[str, Any],
    promotion: Any,
    sweep: SweepResult,
    aliases: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """demo-summary.json: scores per split and kind beside the baselines, where the runs and models
    are, the champion's decision, and the time each part took."""
    rows = score_rows(result["metrics"], _baselines(workdir / "data"))
    return {
        "config": config,
        "protocol": result["protocol"],
        "workers": num_workers,
        "splits": rows,
        "beats_baselines": all(_beats_both(r) for r in rows.values()),
        "mlflow": {
            "tracking_uri": result["tracking_uri"],
            "run_id": result["run_id"],
            "model": f"models:/magnet@{ALIAS}",
            "model_version": result["model_version"],
        },
        "sweep": {
            "name": sweep.sweep_name,
            "experiment": SWEEP_EXPERIMENT,
            "parent_run_id": sweep.parent_run_id,
            "trials": [
                {
                    "trial": r["trial"],
                    "run_id": r["run_id"],
                    "status": r["status"],
                    sweep.metric: r[sweep.metric],
                }
                for r in sweep.trials
            ],
        },
        "champion": {
            "decision": promotion.decision,
            "champion_version": promotion.champion_version,
            "summary": promotion.summary,
        },
        "aliases": {alias: str(version) for alias, version in sorted(aliases.items())},
        "seconds": seconds,
        "pictures": sorted(str(p) for p in (workdir / "pictures").glob("*.png")),
    }


def _print_outcome(workdir: Path, shards: Path, summary: dict[str, Any]) -> None:
    """The score table, where the summary and pictures are, the MLflow UI guide and a command to try."""
    print()
    print(f"MagNet demo: {summary['protocol']}; oIoU in percent, per split and per kind of expression")
    print(score_table(summary["splits"]))
    print(
        "pick: share of expressions whose mask picks the referred object over the image's others; "
        "outline: mean IoU of those"
    )
    print()
    print(f"summary: {workdir / 'demo-summary.json'}   pictures: {workdir / 'pictures'}")
    print(_ui_guide(summary))
    image, text = _try_it_example(workdir, shards)
    print(
        f"Try it: MLFLOW_TRACKING_URI={summary['mlflow']['tracking_uri']} magnet predict --model "
        f'models:/magnet@{ALIAS} --image {image} --text "{text}" --out overlay.png'
    )
    print(f"done in {summary['seconds']['total']:.0f} s")


def run_demo(workdir: Path, num_workers: int = DEMO_WORKERS, config: str = DEMO_CONFIG) -> dict[str, Any]:
    """Synthetic data -> shards -> Ray training -> evaluation -> registry -> `champion` -> a short
    sweep, then the summary and where to look in the MLflow UI."""
    start = time.perf_counter()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = _demo_environment(workdir)
    from data_prep.synthetic_shards import (
        ensure_synthetic_shards,
    )  # after the environment: it loads transformers

    shards = ensure_synthetic_shards(workdir)
    data_seconds = time.perf_counter() - start
    import ray

    from magnet.config import load_config
    from pipelines.flows.train import train_magnet
    from pipelines.promote import promote
    from pipelines.registry import MODEL_NAME
    from pipelines.tracking import client_for

    _start_ray()
    try:
        result = train_magnet(
            config=config,
            shards=str(shards),
            num_workers=num_workers,
            experiment=EXPERIMENT,
            tracking_uri=tracking_uri,
            storage_path=str(workdir / "ray-results"),
            aliases=[ALIAS],
            pictures_dir=str(workdir / "pictures"),
        )
        train_seconds = time.perf_counter() - start
        promotion = promote(
            shards=str(shards),
            experiment=EXPERIMENT,
            tracking_uri=tracking_uri,
            protocol=load_config(config).eval.protocol,  # as the run was scored: `original`
        )
        print(f"[demo] {promotion.summary}")
        print(f"[demo] a short sweep of the loss weights: {SWEEP_TRIALS} tiny trials")
        sweep = run_demo_sweep(workdir, str(shards), tracking_uri=tracking_uri)
    finally:
        ray.shutdown()
    print(f"[demo] sweep {sweep.sweep_name}, trials ranked by {sweep.metric}:\n{sweep.table_markdown}")
    aliases = client_for(tracking_uri).get_registered_model(MODEL_NAME).aliases or {}
    seconds = {
        "data": round(data_seconds, 1),
        "train": round(train_seconds - data_seconds, 1),
        "promotion_and_sweep": round(time.perf_counter() - start - train_seconds, 1),
        "total": round(time.perf_counter() - start, 1),
    }
    summary = _summary(workdir, config, num_workers, result, promotion, sweep, aliases, seconds)
    (workdir / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_outcome(workdir, shards, summary)
    return summary

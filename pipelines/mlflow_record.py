"""What a run shows in MLflow beyond curves and dataset inputs (`pipelines.tracking`): system
metrics while it trains, the evaluation as a per-expression table with a picture of the worst
cases, the model card on each registered version, and the link Prefect shows to the run.

Everything here writes through `MlflowClient` with an explicit run id (never the fluent API's
active run), like `pipelines.tracking`, so it is safe in Ray workers and beside other runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.tracking import MlflowRunLogger, RunRef, client_for

if TYPE_CHECKING:
    from data_prep.contract import Summary
    from magnet.checkpoint import CheckpointMeta
    from magnet.evaluate import Evaluation

WORST_EXAMPLES = 4
SYSTEM_METRICS_INTERVAL_S = 10.0
TABLE_COLUMNS = ("split", "sent_id", "image_id", "raw", "kind", "iou", "area", "picked")
SECTION_MARK = "## "  # a registered version's description: the model card, then ``## <title>`` sections

# Published MagNet oIoU (%), shared/design/magnet-architecture.md, and each split's number of
# referred objects (refs, shared/design/refcoco-data-and-eval.md): a split holding at least
# REAL_SHARE of those refs is taken as the benchmark's own split, anything smaller (synthetic or
# sampled data under the same name) is not compared.
PUBLISHED_OIOU: dict[tuple[str, str], dict[str, float]] = {
    ("refcoco", "unc"): {"val": 75.24, "testA": 78.24, "testB": 71.05},
    ("refcoco+", "unc"): {"val": 66.16, "testA": 71.32, "testB": 58.14},
    ("refcocog", "umd"): {"val": 65.36, "test": 66.03},
    ("refcocog", "google"): {"val": 63.13},
}
BENCHMARK_REFS: dict[tuple[str, str], dict[str, int]] = {
    ("refcoco", "unc"): {"val": 3811, "testA": 1975, "testB": 1810},
    ("refcoco+", "unc"): {"val": 3805, "testA": 1975, "testB": 1798},
    ("refcocog", "umd"): {"val": 2573, "test": 5023},
    ("refcocog", "google"): {"val": 5000},
}
REAL_SHARE = 0.99


# ------------------------------------------------------------------------------ system metrics
@contextmanager
def system_metrics(run: RunRef, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
    """MLflow's system metrics monitor on the run while the block runs: ``system/cpu_utilization_
    percentage``, ``system/system_memory_usage_megabytes``, disk, network and, where pynvml finds
    GPUs, ``system/gpu_<i>_memory_usage_megabytes`` and ``..._utilization_percentage``.

    Attached by run id from whichever process trains (rank 0's worker, so on the GPU's node);
    ``resume_logging`` continues the steps after a restarted worker group. MLflow's
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides ``interval_s``.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its start/stop and "skip GPU metrics" lines are INFO on every training run: progress noise.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(
        run.run_id,
        sampling_interval=interval_s,
        resume_logging=True,
        tracking_uri=run.tracking_uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# --------------------------------------------------------------------------- evaluation table
def _kinds(shards: str) -> dict[int, str]:
    """sent_id -> kind of expression, where preparation recorded one (manifest column ``kind``)."""
    import fsspec
    import pyarrow.parquet as pq

    from data_prep.contract import MANIFEST

    with fsspec.open(f"{shards.rstrip('/')}/{MANIFEST}", "rb") as handle:
        manifest = pq.ParquetFile(handle)
        if "kind" not in manifest.schema_arrow.names:
            return {}
        columns = manifest.read(columns=["sent_id", "kind"]).to_pydict()
    return {s: k for s, k in zip(columns["sent_id"], columns["kind"], strict=True) if k is not None}


def expression_table(evaluation: Evaluation, shards: str) -> Any:
    """One row per scored expression (pandas DataFrame, TABLE_COLUMNS): split, ids, the text, its
    kind where the manifest has one, IoU (0-1), the object's share of the image and whether the
    prediction picked it over the image's other objects (null where the shards lack them)."""
    import pandas as pd

    kinds = _kinds(shards)
    rows = [
        {**row, "split": split, "kind": kinds.get(row["sent_id"])}
        for split, result in evaluation.splits.items()
        for row in result.rows
    ]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def log_evaluation(run: RunRef, evaluation: Evaluation, shards: str, step: int) -> str:
    """Log the per-expression table as ``evaluation/expressions_step%08d.json`` (MLflow's table
    format, browsable in the run's Evaluation view) and a picture of each split's worst cases;
    returns the table's artifact path. A table already logged at that step is not appended to
    again (a retried task), since MLflow's log_table appends to an existing file."""
    from magnet.evaluate import prediction_figure

    artifact = f"evaluation/expressions_step{step:08d}.json"
    logged = {entry.path for entry in run.client.list_artifacts(run.run_id, "evaluation")}
    if artifact not in logged:
        run.client.log_table(run.run_id, expression_table(evaluation, shards), artifact)
    logger = MlflowRunLogger(run)
    for split, result in evaluation.splits.items():
        if result.worst:
            figure = prediction_figure(result.worst, title=f"{split}: lowest IoU")
            logger.log_predictions(figure, f"worst_{split}_step{step:08d}.png", step=step)
    return artifact


# ---------------------------------------------------------------------------------- model card
def _benchmark_splits(shards: str, summary: Summary) -> dict[str, float]:
    """Published oIoU of the splits that are the benchmark's own (see BENCHMARK_REFS)."""
    import fsspec
    import pyarrow.parquet as pq

    from data_prep.contract import MANIFEST

    key = (summary.dataset, summary.split_by)
    if key not in PUBLISHED_OIOU:
        return {}
    with fsspec.open(f"{shards.rstrip('/')}/{MANIFEST}", "rb") as handle:
        columns = pq.read_table(handle, columns=["split", "ref_id"]).to_pydict()
    refs: dict[str, set[int]] = {}
    for split, ref_id in zip(columns["split"], columns["ref_id"], strict=True):
        refs.setdefault(split, set()).add(ref_id)
    expected = BENCHMARK_REFS[key]
    return {
        split: score
        for split, score in PUBLISHED_OIOU[key].items()
        if len(refs.get(split, ())) >= REAL_SHARE * expected[split]
    }


def _origin(meta: CheckpointMeta | None, init_from: str | None) -> str:
    """Where the weights came from: imported (meta.json says from which file), fine-tuned or trained."""
    step = meta.step if meta else 0
    if meta and meta.imported_from:
        source = meta.imported_from
        return f"imported from the published checkpoint {source.file} (sha256 {source.sha256})"
    if init_from:
        return f"fine-tuned here from {init_from} ({step} steps)"
    return f"trained here ({step} steps)"


def _scores(evaluation: Mapping[str, Any], shards: str, summary: Summary) -> list[str]:
    """The card's protocol line and score table, the published oIoU beside the benchmark's splits."""
    published = _benchmark_splits(shards, summary)
    metrics: Mapping[str, float] = evaluation["metrics"]
    splits = list(dict.fromkeys(key.split("/", 1)[0] for key in metrics))
    names = ["n", "oIoU", "mIoU", "pick_acc", "outline_IoU", "P@0.5", "P@0.7", "P@0.9"]
    mask_mode = summary.settings.mask_mode
    lines = [
        f"**Scored** on {', '.join(f'`{s}`' for s in splits)}: {evaluation['protocol']}; "
        f"masks prepared as `{mask_mode}`"
        + (" (published numbers use `refer`)." if mask_mode != "refer" and published else "."),
        "",
        "| split | " + " | ".join(names) + " | published MagNet oIoU |",
        "|---" * (len(names) + 2) + "|",
    ]
    for split in splits:
        cells = {name: metrics.get(f"{split}/{name}") for name in names}
        shown = ["" if c is None else f"{c:.0f}" if name == "n" else f"{c:.2f}" for name, c in cells.items()]
        lines.append(f"| {split} | " + " | ".join(shown) + f" | {published.get(split, '')} |")
    if not published:
        lines += ["", "No published comparison: these splits are not a benchmark's own (too few refs)."]
    return lines


def model_card(
    run: RunRef,
    checkpoint: str | Path,
    shards: str,
    evaluation: Mapping[str, Any] | None,
    compute: str,
) -> str:
    """The markdown description of a registered version: where the weights came from, the data
    and split, protocol and mask convention, per-split scores beside the published MagNet oIoU
    (where the split is the benchmark's own), seeds and compute.

    Args:
        run: the run that logged the model.
        checkpoint: the registered checkpoint directory.
        shards: prepared dataset root it was trained (or registered) and scored on.
        evaluation: ``{"protocol": description, "metrics": {<split>/<name>: value}}`` (the flow's
            evaluate task); None when it was not scored at registration.
        compute: how it was trained (workers, devices), in words.
    """
    from data_prep.contract import read_summary_and_sha256
    from magnet.checkpoint import META_FILE, load_config_from_checkpoint, read_checkpoint_meta

    cfg = load_config_from_checkpoint(checkpoint)
    meta = read_checkpoint_meta(checkpoint) if (Path(checkpoint) / META_FILE).is_file() else None
    logged = run.client.get_run(run.run_id)
    summary, sha256 = read_summary_and_sha256(shards)
    imported = meta is not None and meta.imported_from is not None
    used = "not trained on them" if imported else f"trained on `{cfg.data.train_split}`"
    lines = [
        f"**Weights**: {_origin(meta, cfg.train.init_from)}; "
        f"config `{cfg.name}`, MLflow run `{logged.info.run_name}` ({logged.info.run_id}).",
        "",
        f"**Data**: {summary.dataset} / {summary.split_by}, shards `{shards}` "
        f"(summary sha256 `{sha256}`); {used}.",
        "",
        *(_scores(evaluation, shards, summary) if evaluation else ["Not scored at registration."]),
        "",
        f"**Seeds**: train.seed={cfg.train.seed}. **Compute**: {compute}; "
        f"run wall time {(time.time() * 1000 - logged.info.start_time) / 60000:.1f} min.",
        f"**Code**: commit {logged.data.tags.get('mlflow.source.git.commit', 'unknown')}"
        + (" (uncommitted changes)" if logged.data.tags.get("git.dirty") == "true" else "")
        + ".",
    ]
    return "\n".join(lines)


def describe_version(tracking_uri: str, version: str, card: str, model_name: str = "magnet") -> None:
    """Put the model card on the registered version (the registry UI shows it as its description),
    keeping the sections others added after it (`with_section`: the promotion's record), so a
    re-registration of the same checkpoint does not erase why the version holds its alias."""
    client = client_for(tracking_uri)
    before = client.get_model_version(model_name, version).description or ""
    start = next((i for i, line in enumerate(before.split("\n")) if line.startswith(SECTION_MARK)), None)
    sections = "\n".join(before.split("\n")[start:]) if start is not None else ""
    client.update_model_version(model_name, version, description="\n\n".join(filter(None, [card, sections])))


def with_section(description: str | None, title: str, body: str) -> str:
    """``description`` with its section ``title`` (from the line ``## <title>`` to the next ``## ``
    heading or the end) holding ``body``: replaced where it is, else appended; the rest (the model
    card, other sections) kept as it was. The same call again gives the same text."""
    lines = (description or "").split("\n")
    heading = f"{SECTION_MARK}{title}"
    start = next((i for i, line in enumerate(lines) if line == heading), len(lines))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(SECTION_MARK)), len(lines))
    before, after = "\n".join(lines[:start]).rstrip(), "\n".join(lines[end:]).strip()
    return "\n\n".join(filter(None, [before, f"{heading}\n\n{body.strip()}", after]))


# ------------------------------------------------------------------------------- prefect link
def run_link(run: RunRef) -> str:
    """The run's page: on the tracking server, or where ``mlflow ui`` serves a local store by default."""
    uri = run.tracking_uri
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.experiment_id}/runs/{run.run_id}"


def link_flow_run(run: RunRef, key: str) -> None:
    """A Prefect link artifact from the current flow run to its MLflow run."""
    from prefect.artifacts import create_link_artifact

    uri = run.tracking_uri
    local = not uri.startswith(("http://", "https://"))
    create_link_artifact(
        link=run_link(run),
        link_text=f"MLflow run {run.run_id}",
        key=key,
        description=f"served by `mlflow ui --backend-store-uri {uri}`" if local else "the MLflow run",
    )


# ------------------------------------------------------------------------- where a run's files are
def tag_checkpoints(run: RunRef, best: str | None, last: str | None) -> None:
    """Tags ``checkpoint.best`` and ``checkpoint.last``: where the run's checkpoints are (an
    object-storage URL, or a path on the driver's machine), for `magnet evaluate --model`."""
    for name, location in (("checkpoint.best", best), ("checkpoint.last", last)):
        if location:
            run.client.set_tag(run.run_id, name, location)


# ------------------------------------------------------------------------------ worker placement
WORKER_GROUPS_TAG = "ray.worker_groups"
RESUMED_FROM_TAG = "ray.resumed_from"


def worker_tag(rank: int, field: str) -> str:
    """The tag holding ``field`` (``node_id`` or ``host``) of rank ``rank``'s node."""
    return f"ray.rank{rank}.{field}"


def record_workers(run: RunRef, workers: Sequence[Mapping[str, str]], resumed_from: str | None) -> None:
    """Where a (re)started Ray Train worker group runs, as tags of the run: per rank
    ``ray.rank<r>.node_id`` (the Ray node id) and ``ray.rank<r>.host`` (``<hostname> (<node IP>)``);
    ``ray.resumed_from``, the checkpoint the group started from (none for a fresh start); and
    ``ray.worker_groups``, the groups started for the run (2 after one restart from a lost worker
    or node). Each start overwrites the others, so they describe the group that trained last.
    Rank 0 calls it at each start with every rank's entry."""
    from mlflow.entities import RunTag

    started = int(run.client.get_run(run.run_id).data.tags.get(WORKER_GROUPS_TAG, "0")) + 1
    tags = {WORKER_GROUPS_TAG: str(started)}
    if resumed_from:
        tags[RESUMED_FROM_TAG] = resumed_from
    for rank, worker in enumerate(workers):
        tags.update({worker_tag(rank, field): value for field, value in worker.items()})
    run.client.log_batch(run.run_id, tags=[RunTag(key, value) for key, value in tags.items()])

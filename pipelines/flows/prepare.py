"""The `prepare-refcoco` Prefect flow: refer-format data -> WebDataset shards, manifest, rejects.

The flow only puts data_prep's steps in order: plan the chunks (one per shard), find those an
earlier run finished (their completion marker matches their fingerprint and the shard is
intact: data_prep's markers, whether or not Prefect remembers that run), run each other chunk
as its own task in a process pool, then assemble manifest, rejects and summary. Progress
shows as a line at most every 10 s (on magnet.progress, which `magnet` prints) and as a Prefect
progress artifact; the run ends with a markdown artifact of the counts per split and the rejects by reason.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from data_prep.contract import Summary
from data_prep.defaults import PREPARE
from data_prep.masks import MaskMode
from data_prep.output import is_permanent
from data_prep.processes import leave_sigint_to_parent
from data_prep.shards import (
    REJECT_REASONS,
    Chunk,
    ChunkResult,
    PreparePlan,
    PrepareResult,
    PrepareSettings,
    assemble,
    dataset_dir,
    finished_chunk,
    merged_splits,
    plan_prepare,
    prepare_chunk,
    remove_partial_files,
)
from data_prep.tokenize import load_tokenizer, vocabulary_hash
from magnet import progress
from pipelines import interrupts
from pipelines.flows import artifact_key


def _transient_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only I/O errors that may pass (a flaky disk or network mount); bad data never raises
    here, it becomes rejects rows, a bug should fail at once, and so should a write no retry can
    mend (full disk, read-only or forbidden place: `data_prep.output.is_permanent`)."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, OSError) and not is_permanent(error)


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient_io_error, cache_policy=NONE)
def plan_task(
    refer_root: str, out: str, settings: PrepareSettings, splits: list[str] | None, image_dir: str | None
) -> PreparePlan:
    """Read the refer data and cut the splits into chunks."""
    return plan_prepare(refer_root, out, settings, splits, image_dir)


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient_io_error, cache_policy=NONE)
def finished_chunks_task(plan: PreparePlan) -> list[ChunkResult]:
    """Chunks an earlier run finished (same fingerprint, intact shard): not submitted again, so a
    full re-run starts no worker processes."""
    found = (
        finished_chunk(plan.settings, plan.vocabulary_hash, chunk, plan.out_dir, plan.image_dir)
        for chunk in plan.chunks
    )
    return [result for result in found if result is not None]


@task(
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=_transient_io_error,
    cache_policy=NONE,
    task_run_name="chunk-{chunk.split}-{chunk.index:06d}",
)
def chunk_task(
    settings: PrepareSettings, vocab_hash: str, chunk: Chunk, out_dir: Path | str, image_dir: Path
) -> ChunkResult:
    """Write one shard and its manifest / rejects parts (or find them already done)."""
    return prepare_chunk(settings, vocab_hash, chunk, out_dir, image_dir)


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient_io_error, cache_policy=NONE)
def assemble_task(plan: PreparePlan, results: list[ChunkResult]) -> PrepareResult:
    """Join the parts into manifest.parquet and rejects.parquet and write summary.json."""
    return assemble(plan, results)


def report_markdown(result: PrepareResult) -> str:
    """The run's report: counts per split and rejects by reason."""
    summary = result.summary
    lines = [
        f"# prepare-refcoco: {summary.dataset} ({summary.split_by})",
        "",
        f"Output `{result.out_dir}`; tokenizer `{summary.tokenizer.name}` "
        f"(vocabulary sha256 `{summary.tokenizer.vocabulary_hash[:12]}…`), "
        f"{len(result.shards)} shards, {result.chunks_skipped} already done before this run.",
        "",
        "| split | read | written | rejected |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {split} | {c.read} | {c.written} | {c.rejected} |" for split, c in result.counts.items()]
    splits = list(result.counts)
    lines += ["", "## Rejects by reason", "", "| reason | " + " | ".join(splits) + " | meaning |"]
    lines.append("|---|" + "---:|" * len(splits) + "---|")
    reasons = sorted({r for per_split in result.rejects_by_reason.values() for r in per_split})
    if not reasons:
        lines.append("| (none) |" + " 0 |" * len(splits) + " |")
    for reason in reasons:
        cells = " | ".join(str(result.rejects_by_reason[split].get(reason, 0)) for split in splits)
        lines.append(f"| {reason} | {cells} | {REJECT_REASONS.get(reason, '')} |")
    return "\n".join(lines) + "\n"


@flow(name="prepare-refcoco")
def prepare_refcoco(
    refer_root: str,
    out: str,
    dataset: str = PREPARE.dataset,
    split_by: str = PREPARE.split_by,
    splits: list[str] | None = None,
    tokenizer: str = PREPARE.tokenizer,
    max_tokens: int = PREPARE.max_tokens,
    samples_per_shard: int = PREPARE.samples_per_shard,
    mask_mode: MaskMode = PREPARE.mask_mode,
    image_dir: str | None = None,
    show_progress: bool = True,
) -> Summary:
    """Prepare one dataset / splitBy; returns what summary.json says. The task runner (and so
    the number of worker processes) is chosen by the caller with `.with_options`."""
    interrupts.reclaim_sigterm()
    logger = get_run_logger()
    settings = PrepareSettings(dataset, split_by, tokenizer, max_tokens, samples_per_shard, mask_mode)
    plan = plan_task(refer_root, out, settings, splits, image_dir)
    total = len(plan.chunks)
    logger.info("%d chunks over splits %s into %s", total, ", ".join(plan.splits), plan.out_dir)

    artifact = create_progress_artifact(0.0, key="prepare-refcoco-progress", description="chunks done (%)")
    results = finished_chunks_task(quote(plan))
    logger.info("%d of %d chunks already done", len(results), total)
    done = {(r.split, r.index) for r in results}
    update_progress_artifact(artifact, 100.0 * len(results) / max(total, 1))
    every, skipped = progress.Every(), len(results)
    try:
        # quote(): Prefect would otherwise walk every field of every chunk (all the polygons) to
        # look for upstream futures, which costs more than the chunk's work on real data.
        futures = [
            chunk_task.submit(settings, plan.vocabulary_hash, quote(chunk), plan.out_dir, plan.image_dir)
            for chunk in plan.chunks
            if (chunk.split, chunk.index) not in done
        ]
        for future in as_completed(futures):
            results.append(future.result())
            update_progress_artifact(artifact, 100.0 * len(results) / max(total, 1))
            if show_progress and every.due(last=len(results) == total):
                left = progress.time_left(len(results) - skipped, total - len(results), every.elapsed)
                progress.LOGGER.info(
                    "prepare %s-%s: %d/%d chunks (%d%%), %s left",
                    dataset, split_by, len(results), total, 100 * len(results) // total, left,
                )  # fmt: skip
    except KeyboardInterrupt:
        _stop_chunk_workers(plan.out_dir)
        raise
    result = assemble_task(quote(plan), results)
    create_markdown_artifact(
        report_markdown(result),
        key=artifact_key("prepare", dataset, split_by),
        description="counts per split and rejects by reason",
    )
    return result.summary


def _stop_chunk_workers(out_dir: str | Path) -> None:
    """On Ctrl-C, end the pool's worker processes now and remove what their chunks left half-written.

    The task runner would wait for every chunk already handed to a worker, the queued ones too
    (which ignore SIGINT, `leave_sigint_to_parent`); on real data that is minutes. Its processes
    are this process's multiprocessing children (none with one worker: the chunk in its thread
    ends whole)."""
    workers = multiprocessing.active_children()
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=5)
    remove_partial_files(out_dir, [worker.pid for worker in workers if worker.pid is not None])


@contextmanager
def _api_for_worker_processes() -> Iterator[None]:
    """Point pool processes at the flow's Prefect API. Without PREFECT_API_URL, Prefect runs an
    ephemeral server inside each process, so every pool process would start one of its own:
    start one temporary server here instead and export its address to the children. The server
    stops at exit (Prefect's own atexit hook), after Prefect has flushed its logs to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()  # registers its own stop at exit
        url = server.api_url
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def check_output(**parameters: Any) -> None:
    """Refuse, before the flow starts, the flow's parameters that the output cannot take: settings
    PrepareSettings rejects, and some splits into an output prepared with other settings
    (`data_prep.shards.merged_splits`). Found inside the flow, they would end in Prefect's traceback.

    Raises:
        ValueError: naming the setting, or the output and the settings that differ.
    """
    bound = inspect.signature(prepare_refcoco.fn).bind(**parameters)
    bound.apply_defaults()
    given = bound.arguments
    settings = PrepareSettings(
        given["dataset"],
        given["split_by"],
        given["tokenizer"],
        given["max_tokens"],
        given["samples_per_shard"],
        given["mask_mode"],
    )
    if given["splits"]:  # every split redone leaves nothing of an earlier index to keep
        out_dir = dataset_dir(given["out"], settings.dataset, settings.split_by)
        vocab_hash = vocabulary_hash(load_tokenizer(settings.tokenizer))
        merged_splits(out_dir, settings, vocab_hash, tuple(given["splits"]))


def run_prepare(workers: int = PREPARE.workers, **parameters: Any) -> Summary:
    """Run the flow with `workers` processes for the chunks (what `magnet prepare` does); with one
    worker the chunks run in this process, sparing the pool's start-up. Parameters the output
    cannot take are refused first (`check_output`)."""
    check_output(**parameters)
    if workers <= 1:
        return prepare_refcoco.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(**parameters)
    with _api_for_worker_processes():
        runner = ProcessPoolTaskRunner(workers, initializer=leave_sigint_to_parent)
        return prepare_refcoco.with_options(task_runner=runner)(**parameters)

"""Training faults made for real: a Ray Train worker process SIGKILLed from outside mid-epoch, and
a shard with flipped bytes. Steps are traced through a per-step JSON-lines file the workers append
to (a StepHook that records, and holds one worker still at a chosen step so that the kill lands
there on a fast machine as on a slow one); the SIGKILL comes from the test's own watcher thread."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import contract_files
import pytest
from contract_files import flip_bytes
from tiny_runs import SCORE_VAL, TINY_RUN, lifetimes, step_records

from data_prep.contract import MANIFEST, read_summary
from magnet.checkpoint import (
    CHECKPOINT_GLOB,
    checkpoint_name,
    checkpoint_step,
    load_model_from_checkpoint,
    read_checkpoint_meta,
)
from magnet.config import load_config
from magnet.data import DataPosition, ShardError, build_train_loader, open_split, train_batches_per_epoch
from magnet.train import EVAL_FAILED_KEY, NOT_EVALUATED, SCORE_KEY, SKIPPED_SHARDS_KEY, LocalReporter, train
from pipelines import tracking
from pipelines.mlflow_record import RESUMED_FROM_TAG, WORKER_GROUPS_TAG, worker_tag
from pipelines.train_driver import run_training

WORKERS = 2


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> Path:
    return synthetic_shards(num_images=24, image_size=64, seed=0, samples_per_shard=8)


@pytest.fixture(scope="module")
def local_ray():
    import ray
    import ray.cloudpickle

    os.environ["HF_HUB_OFFLINE"] = "1"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # StepTrace travels to workers
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_config(*overrides: str):
    return load_config("tiny", [*TINY_RUN, "data.eval_splits=[]", "train.keep_checkpoints=null", *overrides])


@dataclass
class StepTrace:
    """Appends one JSON line per worker step: pid, rank, step, epoch, sent ids.

    With ``hold_step`` set, rank ``hold_rank`` then waits after that step until the file
    ``release`` exists: the run stands still mid-epoch, whatever the machine's speed, until the
    test's watcher has killed the process (and released the restarted one). Nothing here fails.
    """

    log_file: str
    hold_rank: int = -1
    hold_step: int = -1
    release: str = ""

    def __call__(self, event) -> None:
        record = {
            "pid": os.getpid(),
            "rank": event.rank,
            "step": event.step,
            "epoch": event.epoch,
            "sent_ids": event.sent_ids,
        }
        with open(self.log_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if (event.rank, event.step) == (self.hold_rank, self.hold_step):
            deadline = time.monotonic() + 300
            while not os.path.exists(self.release) and time.monotonic() < deadline:
                time.sleep(0.05)


def process_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train's controller has registered: those a restart may resume from."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
        return []
    return [entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]]


class Killer(threading.Thread):
    """SIGKILLs the worker of ``trace.hold_rank`` once it stands at ``trace.hold_step`` and Ray's
    controller has registered checkpoint ``checkpoint_step`` (it learns of reports when it polls
    its workers: a checkpoint written just before a crash may not be the one a restart uses), then
    creates ``trace.release`` so the restarted worker runs through."""

    def __init__(self, trace: StepTrace, run_dir: Path, *, checkpoint_step: int) -> None:
        super().__init__(daemon=True)
        self.trace, self.run_dir = trace, run_dir
        self.checkpoint = checkpoint_name(checkpoint_step)
        self.killed: tuple[int, int, str] | None = None  # pid, the step it had done, its process title
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            done = [r for r in step_records(Path(self.trace.log_file)) if r["rank"] == self.trace.hold_rank]
            if not done or done[-1]["step"] != self.trace.hold_step:
                continue
            if self.checkpoint not in registered_checkpoints(self.run_dir):
                continue
            pid = done[-1]["pid"]
            title = process_title(pid)
            os.kill(pid, signal.SIGKILL)
            self.killed = (pid, done[-1]["step"], title)
            Path(self.trace.release).touch()
            return


def expected_batches(shards: Path, cfg, rank: int, steps: int) -> list[list[int]]:
    """The sent ids of each of rank's first ``steps`` batches in an uninterrupted run, read straight
    from the loader (grad_accum 1: one batch a step)."""
    split = open_split(str(shards), cfg.data.train_split)
    per_epoch = train_batches_per_epoch(split, cfg.data, WORKERS)
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        loader = build_train_loader(
            split, cfg.data, image_size=cfg.model.image_size, seed=cfg.train.seed, rank=rank,
            world_size=WORKERS, position=DataPosition(epoch, 0),
        )  # fmt: skip
        epoch_batches = [[int(i) for i in batch["sent_id"]] for batch in loader]
        assert len(epoch_batches) == per_epoch
        batches += epoch_batches
        epoch += 1
    return batches[:steps]


@pytest.mark.slow
def test_worker_sigkilled_mid_epoch_resumes_and_does_every_step_once(shards, local_ray, tmp_path):
    cfg = tiny_config("train.max_steps=10", "train.checkpoint_every=3")
    per_epoch = train_batches_per_epoch(open_split(str(shards), "train"), cfg.data, WORKERS)
    assert per_epoch > 5, "the kill at step 5 must fall inside the first epoch, after checkpoint 3"
    steps, runs, name = tmp_path / "steps.jsonl", tmp_path / "runs", "killed-run"
    trace = StepTrace(str(steps), hold_rank=1, hold_step=5, release=str(tmp_path / "release"))
    killer = Killer(trace, runs / name, checkpoint_step=3)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = tracking.start_run(
        cfg, shards=str(shards), tracking_uri=uri, experiment="faults", run_name=name
    )
    killer.start()
    try:
        result = run_training(
            cfg, str(shards), num_workers=WORKERS, storage_path=str(runs), run_name=name, max_failures=2,
            tracking=settings, hooks=[trace],
        )  # fmt: skip
    finally:
        killer.stop.set()
        killer.join()
        tracking.end_run(settings)
    assert killer.killed is not None, "the run ended before the worker could be killed"
    pid, killed_after, title = killer.killed
    assert "RayTrainWorker" in title, f"killed pid {pid} is not a Ray Train worker: {title!r}"
    assert result.metrics["step"] == cfg.train.max_steps

    for rank in range(WORKERS):
        lives = lifetimes(steps, rank)
        assert len(lives) == 2, f"rank {rank}: expected one restart, saw {len(lives)} worker processes"
        first, second = lives
        if rank == 1:
            assert first[0]["pid"] == pid and first[-1]["step"] == killed_after == 5
        # the restart continues after checkpoint 3 (not from scratch, not from a later step)
        resumed_from = second[0]["step"] - 1
        assert resumed_from == 3, f"rank {rank} resumed after step {resumed_from}, not checkpoint 3"
        # every step 1..N exactly once in what the final model went through: the first life up to
        # the checkpoint it resumed from, then the second life, no gap, no repeat
        lineage = first[:resumed_from] + second
        assert [r["step"] for r in lineage] == list(range(1, cfg.train.max_steps + 1))
        assert [r["epoch"] for r in lineage] == [
            (s - 1) // per_epoch for s in range(1, cfg.train.max_steps + 1)
        ]
        # and the samples an uninterrupted run reads, in its order, epoch boundary included
        assert [r["sent_ids"] for r in lineage] == expected_batches(shards, cfg, rank, cfg.train.max_steps)
        # the steps the kill threw away were redone on the same samples
        redone = {r["step"]: r["sent_ids"] for r in first[resumed_from:]}
        assert redone and all(second[s - resumed_from - 1]["sent_ids"] == ids for s, ids in redone.items())

    # the run's curves hold each step once, though the killed group had logged some redone steps
    history = tracking.client_for(uri).get_metric_history(settings.run_id, "train/loss")
    assert sorted(point.step for point in history) == list(range(1, cfg.train.max_steps + 1))
    # the run says where its ranks trained, that its worker group was started twice, and from where
    tags = tracking.client_for(uri).get_run(settings.run_id).data.tags
    assert tags[WORKER_GROUPS_TAG] == "2"
    assert tags[RESUMED_FROM_TAG] == checkpoint_name(3)
    import ray

    node = ray.get_runtime_context().get_node_id()
    assert [tags[worker_tag(rank, "node_id")] for rank in range(WORKERS)] == [node] * WORKERS
    assert all(tags[worker_tag(rank, "host")].startswith(socket.gethostname()) for rank in range(WORKERS))

    saved = sorted(checkpoint_step(p.name) for p in (runs / name).glob(CHECKPOINT_GLOB))
    assert saved == [3, 6, 9, 10]
    assert Path(result.last_checkpoint) == runs / name / checkpoint_name(cfg.train.max_steps)
    model, saved_cfg = load_model_from_checkpoint(result.last_checkpoint)  # the restarted run's last is whole
    assert saved_cfg.train.max_steps == cfg.train.max_steps and not model.training


# ------------------------------------------------------------------------------ corrupt shards
def split_shards(root: Path, split: str) -> list[str]:
    """The shard paths of a split, as summary.json names them."""
    return [entry.path for entry in read_summary(str(root)).split_shards(split)]


@pytest.fixture
def corrupt_copy(shards: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the prepared shards with 64 bytes flipped in the middle of the second train shard."""
    name = split_shards(shards, "train")[1]
    return contract_files.corrupt_copy(shards, tmp_path / shards.name, name), name


def test_corrupt_shard_refused_before_training_starts(corrupt_copy, tmp_path):
    copy, name = corrupt_copy
    steps = tmp_path / "steps.jsonl"
    with pytest.raises(ShardError, match=f"{name}.* is corrupt"):
        run_training(
            tiny_config("train.max_steps=2"), str(copy), num_workers=1, storage_path=str(tmp_path / "runs"),
            hooks=[StepTrace(str(steps))],
        )  # fmt: skip
    # refused by the driver: no worker started, no step ran, no run directory
    assert not steps.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_corrupt_shard_skipped_and_counted_in_the_run(corrupt_copy, local_ray, tmp_path):
    import mlflow
    import pyarrow.parquet as pq

    copy, name = corrupt_copy
    cfg = tiny_config("train.max_steps=2", "train.checkpoint_every=2", "data.skip_corrupt_shards=true")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = tracking.start_run(
        cfg, shards=str(copy), tracking_uri=uri, experiment="faults", run_name="skip"
    )
    steps = tmp_path / "steps.jsonl"
    result = run_training(
        cfg,
        str(copy),
        num_workers=1,
        storage_path=str(tmp_path / "runs"),
        tracking=settings,
        hooks=[StepTrace(str(steps))],
    )
    tracking.end_run(settings)

    assert result.metrics[SKIPPED_SHARDS_KEY] == 1
    run = mlflow.MlflowClient(uri).get_run(settings.run_id)
    assert run.data.metrics[SKIPPED_SHARDS_KEY] == 1
    # nothing of the skipped shard was trained on
    manifest = pq.read_table(copy / MANIFEST, columns=["shard", "sent_id"]).to_pylist()
    in_corrupt = {row["sent_id"] for row in manifest if row["shard"] == name}
    trained = {i for record in step_records(steps) for i in record["sent_ids"]}
    assert in_corrupt and trained and not trained & in_corrupt


@pytest.mark.parametrize("read_by", ["eval_splits", "final_splits"])
def test_corrupt_evaluation_shard_refused_before_training_starts(shards, tmp_path, read_by):
    """Every split the run reads is checked on the driver: the evaluation splits of the loop, and
    those the caller scores after training (the flow's held-out splits)."""
    split = "val" if read_by == "eval_splits" else "testB"
    name = split_shards(shards, split)[0]
    copy = contract_files.corrupt_copy(shards, tmp_path / shards.name, name)
    cfg = tiny_config("train.max_steps=2", *(SCORE_VAL if read_by == "eval_splits" else []))
    steps = tmp_path / "steps.jsonl"
    final = {"final_splits": [split]} if read_by == "final_splits" else {}
    with pytest.raises(ShardError, match=f"{name}.* is corrupt"):
        run_training(
            cfg, str(copy), num_workers=1, storage_path=str(tmp_path / "runs"), max_failures=0,
            hooks=[StepTrace(str(steps))], **final,
        )  # fmt: skip
    assert not steps.exists() and not (tmp_path / "runs").exists()


@dataclass
class CorruptAt:
    """A StepHook flipping bytes of ``path`` on rank 0 at ``step`` (before that step's evaluation):
    data going bad mid-run."""

    path: str
    step: int

    def __call__(self, event) -> None:
        if (event.rank, event.step) == (0, self.step):
            flip_bytes(Path(self.path))


class RecordingLogger:
    """A RunLogger keeping (step, metrics) in memory."""

    def __init__(self) -> None:
        self.points: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.points.append((step, dict(metrics)))

    def log_predictions(self, figure_png: bytes, name: str, step: int) -> None:
        pass


def test_evaluation_failing_on_data_is_reported_and_keeps_training(shards, tmp_path):
    """A val shard corrupted after step 1's evaluation: the evaluations of steps 2 and 3 fail on it, are
    reported as eval/failed (report, logger, meta.json) without a score, and every step's
    checkpoint is still written; the loop runs to its end instead of dying."""
    copy = tmp_path / shards.name
    shutil.copytree(shards, copy)
    cfg = tiny_config("train.max_steps=3", "train.eval_every=1", "eval.max_samples=4", *SCORE_VAL)
    reporter, logger = LocalReporter(tmp_path / "checkpoints"), RecordingLogger()
    hook = CorruptAt(str(copy / split_shards(copy, "val")[0]), step=2)
    final = train(cfg, str(copy), reporter=reporter, logger=logger, device="cpu", hooks=[hook])

    assert [(r["step"], r[EVAL_FAILED_KEY]) for r in reporter.reports] == [(1, 0), (2, 1), (3, 1)]
    assert reporter.reports[0][SCORE_KEY] >= 0 and "val/oIoU" in reporter.reports[0]
    for report in reporter.reports[1:]:  # no score, and no earlier evaluation's figures
        assert report[SCORE_KEY] == NOT_EVALUATED and "val/oIoU" not in report
    assert final["step"] == 3 and final[EVAL_FAILED_KEY] == 1
    assert [p.name for p in reporter.checkpoints()] == [checkpoint_name(s) for s in (1, 2, 3)]
    meta = read_checkpoint_meta(reporter.checkpoints()[-1])
    assert meta.step == 3 and meta.metrics[EVAL_FAILED_KEY] == 1
    logged = [(step, m[EVAL_FAILED_KEY]) for step, m in logger.points if EVAL_FAILED_KEY in m]
    assert logged == [(1, 0), (2, 1), (3, 1)]

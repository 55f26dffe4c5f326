"""End to end on tiny generated shards with Ray Train: resuming a stopped run by its name, on local
disk and on object storage. Each step is traced through a per-step log file. (A worker killed
mid-run: tests/pipelines/test_fault_training.py.)"""

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_runs import SCORE_VAL, TINY_RUN, lifetimes

from magnet.checkpoint import checkpoint_name
from magnet.config import load_config
from magnet.data import ShardError
from pipelines.train_driver import new_run_name, run_training

pytestmark = pytest.mark.slow

MAX_STEPS = 5


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> str:
    return str(synthetic_shards(num_images=24, image_size=64, seed=0, samples_per_shard=8))


@pytest.fixture(scope="module")
def local_ray(s3_store):
    """Ray for this module, started after the object store so its workers inherit AWS_*."""
    import ray
    import ray.cloudpickle

    os.environ["HF_HUB_OFFLINE"] = "1"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks below travel to workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_config(max_steps: int = MAX_STEPS):
    return load_config(
        "tiny",
        [
            *TINY_RUN,
            *SCORE_VAL,
            f"train.max_steps={max_steps}",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=null",
        ],
    )


@dataclass
class StepTrace:
    """Appends one JSON line per worker step; fails once at a chosen step (a stopped run)."""

    log_file: str
    fault_rank: int = -1
    fault_step: int = -1
    marker: str = ""

    def __call__(self, event) -> None:
        with open(self.log_file, "a") as handle:
            record = {"pid": os.getpid(), "rank": event.rank, "step": event.step, "sent_ids": event.sent_ids}
            handle.write(json.dumps(record) + "\n")
        fire = event.rank == self.fault_rank and event.step == self.fault_step
        if fire and not os.path.exists(self.marker):
            Path(self.marker).touch()
            # Ray's controller collects reports when it polls the workers (every 2 s): give it
            # time to register the last checkpoint, or the restart begins from an older one
            time.sleep(8)
            raise RuntimeError("stopping the run on purpose")


def test_stopped_run_resumes_by_name(shards, local_ray, s3_store, tmp_path):
    """On object storage (a name taken there is refused, the resume reads its checkpoints there);
    on local storage the same resume runs through `magnet train` in test_interrupts.py."""
    runs = s3_store.url(f"resume-{tmp_path.name}")
    steps = tmp_path / "steps.jsonl"
    trace = StepTrace(str(steps), fault_rank=0, fault_step=3, marker=str(tmp_path / "stop"))
    name = new_run_name(tiny_config())
    with pytest.raises(Exception, match="stopping the run on purpose"):
        run_training(
            tiny_config(), str(shards), storage_path=runs, run_name=name, max_failures=0, hooks=[trace]
        )

    with pytest.raises(FileExistsError, match="resume"):
        run_training(tiny_config(), str(shards), storage_path=runs, run_name=name)
    result = run_training(
        tiny_config(), str(shards), storage_path=runs, run_name=name, resume=True, hooks=[trace]
    )
    assert result.run_name == name and result.metrics["step"] == MAX_STEPS
    first, second = lifetimes(steps, 0)
    assert [r["step"] for r in first] == [1, 2, 3]
    assert [r["step"] for r in second] == [3, 4, 5]
    assert result.last_checkpoint == f"{runs}/{name}/{checkpoint_name(MAX_STEPS)}"


def test_resume_needs_an_existing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run"):
        run_training(tiny_config(), "unused", storage_path=str(tmp_path), run_name="nope", resume=True)
    with pytest.raises(ValueError, match="run_name"):
        run_training(tiny_config(), "unused", storage_path=str(tmp_path), resume=True)


def test_driver_warns_when_the_global_batch_differs_from_the_presets(tmp_path, caplog):
    with pytest.raises(ShardError):  # no shards: the warning comes before any slow work
        run_training(
            load_config("paper"), str(tmp_path / "no-shards"), num_workers=2, storage_path=str(tmp_path)
        )
    assert (
        "global batch 16 = 2 workers x data.batch_size 8 x train.grad_accum 1 differs from the "
        "preset's train.global_batch 32" in caplog.text
    )

"""Faults that used to waste or lose work (issue 14), made for real in one scenario: the `magnet`
command in its own processes and one Ray run.

1. `magnet prepare --splits val` into an existing output keeps the other splits in the index (and
   refuses other settings, exit 2, before any chunk is written);
2. a val shard corrupted while the run trains: its evaluations are reported as failed, training
   and its checkpoints go on, no worker restarts;
3. `magnet evaluate` / `predict` with a models:/ URI from a folder without a tracking store: exit 2
   naming the URI searched, and no ./mlflow.db left behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import contract_files
import pytest
import test_fault_training
from test_fault_training import CorruptAt, StepTrace, split_shards
from tiny_runs import SCORE_VAL, lifetimes

from data_prep.contract import INDEX_FILES
from magnet.checkpoint import CHECKPOINT_GLOB, checkpoint_name
from magnet.config import load_config
from magnet.data import open_split
from magnet.train import EVAL_FAILED_KEY
from pipelines import tracking
from pipelines.train_driver import run_training

REPO = Path(__file__).resolve().parents[2]
INDEX_FILES = INDEX_FILES
WORKERS = 2


def magnet(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The `magnet` command of this checkout, in its own process, without MLFLOW_TRACKING_URI."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
    environment["COLUMNS"] = "1000"  # rich would fold a long path inside the message box
    command = [sys.executable, "-m", "pipelines.cli", *args]
    return subprocess.run(
        command, cwd=cwd, env={**environment, **env}, capture_output=True, text=True, timeout=600
    )


def one_line(output: str) -> str:
    """The CLI's message without rich's box and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def digests(root: Path) -> dict[str, str]:
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in INDEX_FILES}


@pytest.fixture(scope="module")
def local_ray():
    import ray
    import ray.cloudpickle

    # StepTrace, CorruptAt and the flip_bytes that CorruptAt calls travel to workers
    ray.cloudpickle.register_pickle_by_value(test_fault_training)
    ray.cloudpickle.register_pickle_by_value(contract_files)
    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_partial_prepare_bad_eval_shard_and_registry_read_from_the_wrong_folder(
    synthetic_shards, prefect_harness, local_ray, tmp_path
):
    from prefect.settings import PREFECT_API_URL

    prepared = synthetic_shards(num_images=24, image_size=64, seed=0, samples_per_shard=8)
    refer_root = prepared.parent.parent / "refer"
    out = tmp_path / "prepared"
    shards = out / prepared.name
    shutil.copytree(prepared, shards)
    before = digests(shards)

    # 1. A partial prepare merges into the index: the same index, every split still readable.
    api = {"PREFECT_API_URL": PREFECT_API_URL.value()}
    prepare = ["prepare", "--refer-root", str(refer_root), "--out", str(out), "--workers", "1"]
    done = magnet(*prepare, "--splits", "val", "--samples-per-shard", "8", cwd=tmp_path, **api)
    assert done.returncode == 0, done.stderr[-3000:]
    assert digests(shards) == before
    assert open_split(str(shards), "train").num_samples > 0
    # other settings: refused before any work, one message, nothing changed
    refused = magnet(*prepare, "--splits", "val", "--samples-per-shard", "5", cwd=tmp_path, **api)
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = one_line(refused.stderr)
    assert "holds splits train, testA, testB prepared with samples_per_shard 8 (now 5)" in message
    assert "Traceback" not in refused.stderr
    assert digests(shards) == before

    # 2. One Ray run; a val shard goes bad at step 3, after the evaluation of step 2.
    cfg = load_config(
        "tiny",
        [*test_fault_training.TINY_RUN, *SCORE_VAL, "eval.max_samples=4", "train.max_steps=4",
         "train.eval_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=null"],
    )  # fmt: skip
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = tracking.start_run(
        cfg, shards=str(shards), tracking_uri=uri, experiment="chaos", run_name="chaos"
    )
    steps, runs = tmp_path / "steps.jsonl", tmp_path / "runs"
    hooks = [StepTrace(str(steps)), CorruptAt(str(shards / split_shards(shards, "val")[0]), step=3)]
    result = run_training(
        cfg, str(shards), num_workers=WORKERS, storage_path=str(runs), run_name="chaos", tracking=settings,
        hooks=hooks,
    )  # fmt: skip
    tracking.end_run(settings)
    assert result.metrics["step"] == 4 and result.metrics[EVAL_FAILED_KEY] == 1
    assert all(len(lifetimes(steps, rank)) == 1 for rank in range(WORKERS)), "a worker was restarted"
    saved = sorted(p.name for p in (runs / "chaos").glob(CHECKPOINT_GLOB))
    assert saved == [checkpoint_name(s) for s in (2, 4)]
    assert result.best_checkpoint.endswith(checkpoint_name(2))  # the one with a score
    client = tracking.client_for(uri)
    failed = client.get_metric_history(settings.run_id, EVAL_FAILED_KEY)
    assert sorted((p.step, p.value) for p in failed) == [(2, 0.0), (4, 1.0)]
    assert [p.step for p in client.get_metric_history(settings.run_id, "val/oIoU")] == [2]

    # 3. Reading the registry from a folder without a store: exit 2 naming it, nothing created.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = next((refer_root / "images").rglob("*.jpg"))
    for command in (
        ["evaluate", "--model", "models:/magnet@champion", "--shards", str(shards)],
        ["predict", "--model", "models:/magnet/1", "--image", str(image), "--text", "the left one"],
    ):
        read = magnet(*command, cwd=elsewhere)
        assert read.returncode == 2, read.stderr[-3000:]
        assert f"no MLflow tracking store at sqlite:///{elsewhere}/mlflow.db" in one_line(read.stderr)
        assert "Traceback" not in read.stderr
    assert list(elsewhere.iterdir()) == []
    # a store that exists but lacks the model: the message names the store searched
    missing = magnet("evaluate", "--model", "models:/magnet@champion", "--shards", str(shards), cwd=tmp_path)
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert f"no registered model 'magnet' in {uri}" in one_line(missing.stderr)

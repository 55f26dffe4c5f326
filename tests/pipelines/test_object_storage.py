"""prepare -> train -> evaluate with everything on object storage: moto's S3 server on 127.0.0.1
(``s3_store``) holds the shards, Ray Train's checkpoints and the artifacts of the MLflow server
(``mlflow_server``, on PostgreSQL); the commands get s3:// URLs and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from tiny_runs import SCORE_VAL, TINY_RUN
from typer.testing import CliRunner

from data_prep.contract import MANIFEST, REJECTS, SUMMARY, read_summary
from data_prep.shards import prepare_dataset
from data_prep.synth import synthesize
from magnet.checkpoint import CHECKPOINT_PREFIX, checkpoint_name
from magnet.config import load_config
from pipelines import tracking as mlflow_tracking
from pipelines.cli import app
from pipelines.train_driver import run_training

pytestmark = pytest.mark.slow

MAX_STEPS = 3


def _files(root: Path) -> dict[str, Path]:
    return {path.relative_to(root).as_posix(): path for path in root.rglob("*") if path.is_file()}


def test_prepare_train_evaluate_on_object_storage(
    s3_store, mlflow_server, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"  # anything written to a relative path by mistake would land here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    refer = tmp_path / "refer"
    synthesize(refer, num_images=16, image_size=64, seed=3, workers=1)
    runner = CliRunner()

    # prepare: the same files and bytes as a local run, in the bucket
    prepared = runner.invoke(
        app,
        [
            *("prepare", "--refer-root", str(refer), "--out", s3_store.url("e2e/data")),
            *("--samples-per-shard", "8", "--workers", "1"),
        ],
    )
    assert prepared.exit_code == 0, prepared.output
    shards = s3_store.url("e2e/data/refcoco-unc")
    local = _files(prepare_dataset(refer, "refcoco", "unc", tmp_path / "local", samples_per_shard=8).out_dir)
    prefix = "e2e/data/refcoco-unc/"
    assert s3_store.keys(prefix) == sorted(prefix + name for name in local)
    s3 = fsspec.filesystem("s3")
    for name in (SUMMARY, MANIFEST, REJECTS, "train/shard-000000.tar"):
        assert s3.cat_file(f"{s3_store.bucket}/{prefix}{name}") == local[name].read_bytes(), name

    # train on Ray: shards streamed from the bucket, checkpoints written to it, tracked in MLflow
    cfg = load_config(
        "tiny", [*TINY_RUN, *SCORE_VAL, f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=2"]
    )
    tracking = mlflow_tracking.start_run(
        cfg, shards=shards, tracking_uri=mlflow_server.url, experiment="object-storage", run_name="s3-e2e"
    )
    result = run_training(cfg, shards, num_workers=1, storage_path=s3_store.url("e2e/ray"), tracking=tracking)
    mlflow_tracking.end_run(tracking)
    assert result.metrics["step"] == MAX_STEPS
    run_prefix = f"e2e/ray/{result.run_name}/"
    assert result.last_checkpoint == s3_store.url(f"{run_prefix}{checkpoint_name(MAX_STEPS)}")
    checkpoints = {
        key[len(run_prefix) :].split("/")[0] for key in s3_store.keys(f"{run_prefix}{CHECKPOINT_PREFIX}")
    }
    assert sorted(checkpoints) == [checkpoint_name(2), checkpoint_name(MAX_STEPS)]
    stored = {key.rsplit("/", 1)[1] for key in s3_store.keys(f"{run_prefix}{checkpoint_name(MAX_STEPS)}/")}
    assert {"model.pt", "train_state.pt", "config.yaml", "meta.json"} <= stored

    # evaluate: the checkpoint where training left it, the shards where prepare put them
    report = tmp_path / "metrics.json"
    evaluated = runner.invoke(
        app,
        [
            *("evaluate", "--model", result.last_checkpoint, "--shards", shards),
            *("--split", "val", "--out", str(report)),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(report.read_text())
    summary = read_summary(str(local[SUMMARY].parent))
    assert metrics["shards"] == shards
    assert metrics["metrics"]["val/n"] == summary.counts["val"].written
    # the weights read back from the bucket score what training measured on them
    assert metrics["metrics"]["val/oIoU"] == pytest.approx(result.metrics["val/oIoU"], rel=1e-5)

    # MLflow: the run's metrics on the server, its artifacts in the bucket
    run = mlflow_tracking.client_for(mlflow_server.url).get_run(tracking.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val/oIoU"] == pytest.approx(result.metrics["val/oIoU"])
    assert run.data.tags["dataset.summary_sha256"]
    artifacts = s3_store.keys("mlflow/")
    assert any(key.endswith(f"{tracking.run_id}/artifacts/config.yaml") for key in artifacts), artifacts
    assert any(f"{tracking.run_id}/artifacts/predictions/" in key for key in artifacts), artifacts

    # nothing landed on local disk in place of the bucket
    assert not any(cwd.iterdir()), sorted(cwd.rglob("*"))


def test_prepare_on_object_storage_reuses_finished_chunks_and_checks_shards(s3_store, tmp_path: Path) -> None:
    from magnet.data import ShardError, open_split

    refer = tmp_path / "refer"
    synthesize(refer, num_images=12, image_size=64, seed=5, workers=1)
    first = prepare_dataset(refer, "refcoco", "unc", s3_store.url("rerun"), samples_per_shard=8)
    assert first.out_dir == s3_store.url("rerun/refcoco-unc")
    s3 = fsspec.filesystem("s3")
    prefix = f"{s3_store.bucket}/rerun/refcoco-unc"
    written = {key: s3.cat_file(f"{s3_store.bucket}/{key}") for key in s3_store.keys("rerun/")}

    # a crash between a shard's upload and its marker's: that chunk is redone, the others reused
    s3.rm_file(f"{prefix}/_work/train/shard-000001.done.json")
    again = prepare_dataset(refer, "refcoco", "unc", s3_store.url("rerun"), samples_per_shard=8)
    assert again.chunks_skipped == len(first.shards) - 1
    assert {key: s3.cat_file(f"{s3_store.bucket}/{key}") for key in s3_store.keys("rerun/")} == written

    # checksums are verified on object storage too
    shard = f"{prefix}/train/shard-000000.tar"
    damaged = bytearray(written["rerun/refcoco-unc/train/shard-000000.tar"])
    damaged[700] ^= 0xFF
    s3.pipe_file(shard, bytes(damaged))
    with pytest.raises(ShardError, match=r"train/shard-000000\.tar is corrupt"):
        open_split(first.out_dir, "train")
    assert open_split(first.out_dir, "train", skip_corrupt=True).skipped == ("train/shard-000000.tar",)

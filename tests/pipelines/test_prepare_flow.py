"""The `prepare-refcoco` flow through `magnet prepare`, on Prefect's test harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from data_prep.contract import SUMMARY, SplitCounts, read_summary
from pipelines.cli import app


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_prep.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, num_images=20, image_size=64, seed=1, workers=1)
    return root


def _artifacts() -> dict[str, list]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found: dict[str, list] = {}
        for artifact in client.read_artifacts():
            found.setdefault(artifact.type, []).append(artifact)
        return found


def test_magnet_prepare_runs_the_flow_and_reruns_skip(
    prefect_harness: None, refer_root: Path, tmp_path: Path
) -> None:
    from data_prep.shards import prepare_dataset
    from pipelines.flows.prepare import run_prepare

    args = ["prepare", "--refer-root", str(refer_root), "--out", str(tmp_path / "flow")]
    args += ["--samples-per-shard", "15", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "rejected" in result.output
    flow_dir = tmp_path / "flow" / "refcoco-unc"
    summary = read_summary(str(flow_dir))
    assert len(summary.shards) > 2

    artifacts = _artifacts()
    assert [a.data for a in artifacts["progress"]] == [100.0]
    (report,) = artifacts["markdown"]
    assert (
        report.key == "prepare-refcoco-unc"
        and "| train |" in report.data
        and "Rejects by reason" in report.data
    )

    # The flow writes what the library writes, and a re-run finds every chunk done.
    prepare_dataset(refer_root, "refcoco", "unc", tmp_path / "lib", samples_per_shard=15)
    assert (tmp_path / "lib" / "refcoco-unc" / SUMMARY).read_bytes() == (flow_dir / SUMMARY).read_bytes()
    # Again through the flow (a second CliRunner would find Prefect's console handler bound to
    # the first one's closed stream).
    # Two workers: the chunks go to a process pool that must reach the harness's API.
    (flow_dir / summary.shards[0].path).unlink()
    run_prepare(workers=2, refer_root=str(refer_root), out=str(tmp_path / "flow"), samples_per_shard=15)
    assert (tmp_path / "lib" / "refcoco-unc" / SUMMARY).read_bytes() == (flow_dir / SUMMARY).read_bytes()
    markdown = sorted(_artifacts()["markdown"], key=lambda a: a.created)[-1].data
    assert f"{len(summary.shards)} shards, {len(summary.shards) - 1} already done" in markdown


def test_unknown_split_is_a_clear_cli_error(prefect_harness: None, refer_root: Path, tmp_path: Path) -> None:
    args = ["prepare", "--refer-root", str(refer_root), "--out", str(tmp_path), "--splits", "testC"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "unknown split 'testC'" in result.output


def test_a_dataset_name_prefect_keys_cannot_hold_gets_its_report(
    prefect_harness: None, tmp_path: Path
) -> None:
    """`My_Kitchen` is a good dataset name but no Prefect artifact key (lowercase, digits, dashes):
    the flow derives its report's key (pipelines.flows.artifact_key) instead of failing after every
    shard was written."""
    import numpy as np
    from PIL import Image

    from pipelines.flows import artifact_key
    from pipelines.flows.prepare import run_prepare

    folder = tmp_path / "My_Kitchen"
    folder.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.eye(16, dtype=np.uint8) * 255).save(folder / "m.png")
    row = {"image": "a.png", "mask": "m.png", "expression": "the line"}
    (folder / "annotations.jsonl").write_text(json.dumps({**row, "split": "train"}) + "\n")
    summary = run_prepare(
        refer_root=str(folder), out=str(tmp_path / "out"), dataset="My_Kitchen", split_by="folder"
    )
    assert summary.counts == {"train": SplitCounts(read=1, written=1, rejected=0)}
    key = artifact_key("prepare", "My_Kitchen", "folder")
    assert key.startswith("prepare-my-kitchen-folder-") and key != artifact_key(
        "prepare", "my-kitchen", "folder"
    )
    assert key in {artifact.key for artifact in _artifacts()["markdown"]}

"""`magnet train` turns its options into one validated flow call (the flow itself is tested in
test_train_flow.py; here it is replaced to catch what the command hands it)."""

import shutil
from pathlib import Path

import pytest
from cli_text import plain
from typer.testing import CliRunner

from pipelines.cli import app


@pytest.fixture
def prepared(synthetic_shards) -> Path:
    return synthetic_shards()


@pytest.fixture
def flow_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    import pipelines.flows.train as flows

    calls: list[dict] = []
    monkeypatch.setattr(flows, "train_magnet", lambda **kwargs: calls.append(kwargs) or {"run_id": "r"})
    return calls


def test_init_from_becomes_an_absolute_config_override(prepared, flow_calls, tmp_path, monkeypatch):
    checkpoint = tmp_path / "imported"
    checkpoint.mkdir()
    (checkpoint / "model.pt").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["train", "--shards", str(prepared), "--init-from", "imported", "--set", "train.lr=1e-4"]
    )
    assert result.exit_code == 0, result.output
    assert flow_calls[0]["overrides"] == ["train.lr=1e-4", f"train.init_from={checkpoint.resolve()}"]


def test_init_from_without_weights_is_refused(prepared, flow_calls, tmp_path):
    missing = tmp_path / "nope"
    result = CliRunner().invoke(app, ["train", "--shards", str(prepared), "--init-from", str(missing)])
    assert result.exit_code != 0 and "holds no model.pt: not a checkpoint" in plain(result.output)
    assert not flow_calls


def test_bad_override_is_refused_before_the_flow_starts(prepared, flow_calls):
    result = CliRunner().invoke(app, ["train", "--shards", str(prepared), "--set", "train.lrr=1"])
    assert result.exit_code != 0 and "train.lrr: Extra inputs are not permitted" in plain(result.output)
    assert not flow_calls


def test_a_corrupt_training_shard_is_one_line_before_the_flow_starts(synthetic_shards, flow_calls, tmp_path):
    copy = tmp_path / "refcoco-unc"
    shutil.copytree(synthetic_shards(), copy)
    shard = copy / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["train", "--shards", str(copy)])
    assert result.exit_code == 2 and not flow_calls
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith(f"error: shard {shard} is corrupt: sha256 ")

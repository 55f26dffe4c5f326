"""`magnet train` turns its options into one validated flow call (the flow itself is tested in
test_train_flow.py; here it is replaced to catch what the command hands it)."""

from pathlib import Path

import pytest
from cli_text import plain
from contract_files import corrupt_copy
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
    copy = corrupt_copy(synthetic_shards(), tmp_path / "refcoco-unc", "train/shard-000001.tar")
    shard = copy / "train" / "shard-000001.tar"
    result = CliRunner().invoke(app, ["train", "--shards", str(copy)])
    assert result.exit_code == 2 and not flow_calls
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith(f"error: shard {shard} is corrupt: sha256 ")


def test_a_corrupt_shard_of_any_split_the_run_reads_is_refused_before_the_flow(
    synthetic_shards, flow_calls, tmp_path
):
    """testB is read by the evaluations while training (an override here) and scored at the end
    (a held-out split): a corrupt shard there is one line now, not a Prefect traceback later."""
    copy = corrupt_copy(synthetic_shards(), tmp_path / "refcoco-unc", "testB/shard-000000.tar")
    shard = copy / "testB" / "shard-000000.tar"
    args = ["train", "--shards", str(copy), "--set", "data.eval_splits=[val,testA,testB]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and not flow_calls, result.output
    assert result.output.startswith(f"error: shard {shard} is corrupt: sha256 "), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_run_names_are_refused_before_anything_is_made_for_them(prepared, flow_calls, tmp_path):
    """A name taken without --resume, a resume of nothing, or a name that is no directory: refused
    before Prefect starts and before the MLflow run is opened, so no stray run is left behind."""
    storage = tmp_path / "ray"
    (storage / "taken").mkdir(parents=True)
    base = ["train", "--shards", str(prepared), "--storage-path", str(storage)]
    cases = [
        (["--run-name", "taken"], f"--run-name: run 'taken' already exists under {storage}: resume it"),
        (["--run-name", "gone", "--resume"], f"--resume: no run 'gone' under {storage} to resume"),
        (["--resume"], "--resume: resume needs the name of the run to continue"),
        (["--run-name", "../taken"], "--run-name: run name '../taken' cannot name a directory"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 2 and message in plain(result.output), result.output
    assert not flow_calls and sorted(storage.iterdir()) == [storage / "taken"]
    result = CliRunner().invoke(app, [*base, "--run-name", "taken", "--resume"])
    assert result.exit_code == 0 and flow_calls[0]["run_name"] == "taken", result.output


def test_the_flow_refuses_a_taken_run_name_before_it_opens_the_mlflow_run(prepared, tmp_path, monkeypatch):
    import pipelines.flows.train as flows

    monkeypatch.setattr(flows, "open_run", lambda *args: pytest.fail("an MLflow run was opened"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="run 'taken' already exists"):
        flows.train_magnet.fn(shards=str(prepared), run_name="taken", storage_path=str(tmp_path))


def test_the_flow_refuses_a_corrupt_shard_before_it_opens_the_mlflow_run(
    synthetic_shards, tmp_path, monkeypatch
):
    """Started without the command (a deployment run), the flow checks the splits itself before the
    MLflow run is opened: a corrupt shard leaves no FAILED run behind."""
    import pipelines.flows.train as flows
    from data_prep.contract import ShardError

    monkeypatch.setattr(flows, "open_run", lambda *args: pytest.fail("an MLflow run was opened"))
    copy = corrupt_copy(synthetic_shards(), tmp_path / "refcoco-unc", "testB/shard-000000.tar")
    shard = copy / "testB" / "shard-000000.tar"
    with pytest.raises(ShardError, match=f"{shard} is corrupt"):
        flows.train_magnet.fn(shards=str(copy), storage_path=str(tmp_path / "ray"))

"""`magnet prepare` refuses bad arguments before the flow (and its Prefect server) starts: one
message naming the option, exit code 2, no traceback. The flow is replaced to see whether it ran."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from cli_text import plain
from contract_files import fake_summary
from typer.testing import CliRunner

from data_prep.refer import IMAGE_SUBDIR
from pipelines.cli import app


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The files the checks look for (their content is the flow's business), in the working
    directory so that messages hold short relative paths rich does not wrap."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([]))  # read for its split names
    (tmp_path / "refcoco" / "instances.json").write_text("{}")
    (tmp_path / IMAGE_SUBDIR).mkdir(parents=True)
    return tmp_path


@pytest.fixture
def flow_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    import pipelines.flows.prepare as flows

    calls: list[dict] = []
    summary = fake_summary()  # the flow returns the dataset's typed summary
    monkeypatch.setattr(flows, "run_prepare", lambda **kwargs: calls.append(kwargs) or summary)
    return calls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--refer-root", "nowhere"],
            "Invalid value for --refer-root: nowhere is not a directory",
        ),
        (
            ["--refer-root", "refcoco"],
            "Invalid value for --refer-root: refcoco/refcoco/refs(unc).p not found",
        ),
        (["--dataset", "refclef"], "Invalid value for --dataset: unknown dataset 'refclef'"),
        (["--dataset", "refcocog"], "Invalid value for --split-by: refcocog has no splitBy 'unc'"),
        (["--split-by", "umd"], "Invalid value for --split-by: refcoco has no splitBy 'umd'"),
        (["--mask-mode", "sum"], "Invalid value for --mask-mode: 'sum' is not one of union, refer"),
        (["--image-dir", "pics"], "Invalid value for --image-dir: pics is not a directory"),
    ],
)
def test_bad_arguments_are_refused_before_the_flow(
    layout: Path, flow_calls: list[dict], args: list[str], message: str
) -> None:
    if "--refer-root" not in args:
        args = ["--refer-root", ".", *args]
    result = CliRunner().invoke(app, ["prepare", "--out", "out", *args])
    assert result.exit_code == 2, result.output
    assert message in plain(result.output)
    assert not flow_calls and "Traceback" not in result.output


def test_an_unwritable_output_is_refused_before_the_flow(layout: Path, flow_calls: list[dict]) -> None:
    """A path through a file (ENOTDIR: read-only places cannot be made as root) is refused at
    once, not retried by Prefect's tasks for a minute."""
    (layout / "notes.txt").write_text("a file, not a directory")
    result = CliRunner().invoke(app, ["prepare", "--refer-root", ".", "--out", "notes.txt/out"])
    assert result.exit_code == 2, result.output
    expected = f"Invalid value for --out: cannot write to {layout / 'notes.txt' / 'out'}: Not a directory"
    assert expected in plain(result.output)
    assert not flow_calls and "Traceback" not in result.output


def test_good_arguments_reach_the_flow(layout: Path, flow_calls: list[dict]) -> None:
    result = CliRunner().invoke(app, ["prepare", "--refer-root", str(layout), "--out", str(layout / "out")])
    assert result.exit_code == 0, result.output
    assert [(c["refer_root"], c["dataset"], c["split_by"]) for c in flow_calls] == [
        (str(layout), "refcoco", "unc")
    ]


def test_missing_refer_root_from_the_shell_is_one_message_not_retries(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pipelines.cli", "prepare", "--refer-root", str(tmp_path / "nowhere")]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "is not a directory" in plain(done.stderr)
    assert (
        "Traceback" not in done.stderr + done.stdout and "prefect" not in (done.stderr + done.stdout).lower()
    )


def test_a_folder_dataset_is_named_after_its_folder_and_its_rows_checked(
    layout: Path, flow_calls: list[dict]
) -> None:
    row = {"image": "a.jpg", "mask": "a.png", "expression": "the cat", "split": "train"}
    (layout / "mine").mkdir()
    (layout / "mine" / "annotations.jsonl").write_text(json.dumps(row) + "\n")
    result = CliRunner().invoke(app, ["prepare", "--folder", "mine", "--out", "out"])
    assert result.exit_code == 0, result.output
    assert [(c["refer_root"], c["dataset"], c["split_by"]) for c in flow_calls] == [
        (str(layout / "mine"), "mine", "folder")
    ]

    refused = [
        (
            ["--split-by", "unc"],
            "Invalid value for --split-by: a folder dataset is prepared as 'folder', not 'unc'",
        ),
        (["--image-dir", "."], "Invalid value for --image-dir: is for the refer layout"),
        (["--dataset", "a/b"], "Invalid value for --dataset: dataset 'a/b' cannot name a directory"),
        (["--dataset", ".."], "Invalid value for --dataset: dataset '..' cannot name a directory"),
        (["--splits", "../x"], "Invalid value for --splits: split '../x' cannot name a directory"),
    ]
    for args, message in refused:
        result = CliRunner().invoke(app, ["prepare", "--folder", "mine", "--out", "out", *args])
        assert result.exit_code == 2 and message in plain(result.output), result.output
    # split names become <out>/mine-folder/<split>/: none may climb onto another dataset, out of
    # --out, into the writer's _work or onto its index files; every bad row is named
    bad = ["", "../refcoco-unc/train", "_work", "../../../escaped", "Summary.json", "a/b"]
    rows = [{**row, "mask": f"{index}.png", "split": split} for index, split in enumerate(bad)]
    (layout / "mine" / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["prepare", "--folder", "mine", "--out", "out"])
    message = "Invalid value for --folder: mine/annotations.jsonl: 6 bad rows: line 1: split '' cannot name"
    assert result.exit_code == 2 and message in plain(result.output), result.output
    for line, split in enumerate(bad[1:], start=2):
        assert f"line {line}: split '{split}' " in plain(result.output)
    # a folder whose name is no safe directory name needs --dataset
    (layout / "mine" / "annotations.jsonl").write_text(json.dumps(row) + "\n")
    (layout / "mine").rename(layout / "my kitchen")
    result = CliRunner().invoke(app, ["prepare", "--folder", "my kitchen", "--out", "out"])
    message = "dataset (the folder's name) 'my kitchen' cannot name a directory"
    assert (
        result.exit_code == 2
        and message in plain(result.output)
        and "give one with --dataset" in plain(result.output)
    )
    result = CliRunner().invoke(
        app, ["prepare", "--folder", "my kitchen", "--dataset", "My_Kitchen", "--out", "o"]
    )
    assert result.exit_code == 0, result.output
    assert [c["dataset"] for c in flow_calls] == ["mine", "My_Kitchen"]


def test_a_refs_file_whose_split_names_no_directory_is_refused_before_the_flow(
    layout: Path, flow_calls: list[dict]
) -> None:
    ref = {"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "../../escaped", "sentences": []}
    (layout / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([ref], protocol=2))
    result = CliRunner().invoke(app, ["prepare", "--refer-root", ".", "--out", "out"])
    assert result.exit_code == 2 and not flow_calls, result.output
    assert "Invalid value for --refer-root: refcoco/refs(unc).p: split '../../escaped' cannot name" in plain(
        result.output
    )

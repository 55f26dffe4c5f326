"""Every mistake in what a user hands `magnet` ends as one line on stderr naming the thing and what
is wrong, exit code 2, no traceback, before Prefect, Ray or a model load; `magnet --debug` shows
the traceback. Also what `predict` says about text it cannot show or the model cannot read."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_text import refused
from contract_files import corrupt_copy
from PIL import Image
from typer.testing import CliRunner

from data_prep.contract import SUMMARY
from magnet.config import load_config
from pipelines.cli import app


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as loading a model."""
    import pipelines.registry as registry

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(registry, "load_model", load_model)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "scene.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------ predict's inputs
def _predict_case(tmp_path: Path, image: Path, case: str) -> tuple[list[str], str]:
    args = {"--model": str(tmp_path), "--image": str(image), "--text": "the square"}
    args["--out"] = str(tmp_path / "overlay.png")
    extra: list[str] = []
    if case == "not an image":
        args["--image"] = str(tmp_path / "notes.jpg")
        Path(args["--image"]).write_text("not a picture")
        expected = "--image: " + args["--image"] + " is not a recognised image format"
    elif case == "truncated image":
        args["--image"] = str(tmp_path / "half.jpg")
        data = image.read_bytes()
        Path(args["--image"]).write_bytes(data[: len(data) // 2])
        expected = "--image: " + args["--image"] + " is damaged: image file is truncated"
    elif case == "empty text":
        args["--text"] = "   "
        expected = "--text: the expression is empty"
    elif case == "out not a picture":
        args["--out"] = str(tmp_path / "overlay.txt")
        expected = "--out: " + args["--out"] + ": .txt is not an image format"
    elif case == "logits not npy":
        extra = ["--logits-out", str(tmp_path / "logits.bin")]
        expected = "--logits-out: " + extra[1] + ": numpy writes .npy files"
    else:  # "cuda without a GPU"
        extra = ["--device", "cuda"]
        expected = "--device: cuda: no CUDA GPU is available here"
    return ["predict", *(item for pair in args.items() for item in pair), *extra], expected


@pytest.mark.parametrize(
    "case",
    ["not an image", "truncated image", "empty text", "out not a picture", "logits not npy", "cuda"],
)
def test_predict_refuses_bad_input_before_loading_the_model(tmp_path, image, no_model_load, case):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    args, expected = _predict_case(tmp_path, image, case)
    assert expected in refused(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_promote_refuses_a_gpu_it_does_not_have(tmp_path, monkeypatch):
    import pipelines.flows.tune as flows

    monkeypatch.setattr(flows, "promote_magnet", lambda **kwargs: pytest.fail("promotion started"))
    args = ["promote", "--experiment", "magnet", "--shards", str(tmp_path), "--device", "cuda:1"]
    assert "--device: cuda:1: no CUDA GPU is available here" in refused(args)


# ------------------------------------------------------------------------ registry references
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite MLflow store holding `magnet` version 1 with the alias `demo`, and one run."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("magnet")
    client.create_model_version("magnet", source="/nowhere/model", run_id=None)
    client.set_registered_model_alias("magnet", "demo", "1")
    return uri


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("models:/magnet@nope", "magnet has no alias 'nope'; versions: 1; aliases: @demo -> 1"),
        ("models:/magnet@champion", "`champion` exists only after `magnet promote`"),
        ("models:/magnet/9", "magnet has no version 9; versions: 1; aliases: @demo -> 1"),
        ("models:/nothing/1", "no registered model 'nothing' in sqlite:///"),
        ("0123456789abcdef0123456789abcdef", "no run 0123456789abcdef0123456789abcdef in sqlite:///"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "no run 0123456789abcdef0123456789abcdef"),
        ("no-such-model", "is neither an MLflow URI"),
    ],
)
def test_a_reference_to_nothing_lists_what_exists(store, image, tmp_path, no_model_load, ref, expected):
    args = ["--model", ref, "--image", str(image), "--text", "x", "--out", str(tmp_path / "o.png")]
    line = refused(["predict", *args, "--tracking-uri", store])
    assert expected in line and ref in line


def test_a_registry_reference_without_a_store_creates_none(image, tmp_path, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--model", "models:/magnet@champion", "--image", str(image), "--text", "x"]
    assert "no MLflow tracking store at sqlite:///" in refused(["predict", *args])
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def corrupt_shards(synthetic_shards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("corrupt") / "refcoco-unc"
    return corrupt_copy(synthetic_shards(), into, "val/shard-000000.tar", "train/shard-000000.tar")


def test_evaluate_names_an_unknown_split_before_loading_the_model(synthetic_shards, tmp_path, no_model_load):
    args = ["evaluate", "--model", str(tmp_path), "--shards", str(synthetic_shards()), "--split", "vall"]
    line = refused(args)
    assert "no shards for split 'vall'; splits with shards: ['testA', 'testB', 'train', 'val']" in line


def test_evaluate_names_a_corrupt_shard(corrupt_shards, checkpoint):
    line = refused(["evaluate", "--model", str(checkpoint), "--shards", str(corrupt_shards)])
    assert f"shard {corrupt_shards}/val/shard-000000.tar is corrupt" in line


def test_train_refuses_shards_cut_to_another_length_before_prefect(synthetic_shards):
    line = refused(["train", "--shards", str(synthetic_shards()), "--set", "model.text.max_tokens=12"])
    assert "holds expressions of max_tokens 20 but the model reads text.max_tokens 12" in line


def test_debug_shows_the_traceback(synthetic_shards, tmp_path, no_model_load):
    from magnet.data import ShardError

    args = ["evaluate", "--model", str(tmp_path), "--shards", str(synthetic_shards()), "--split", "vall"]
    result = CliRunner().invoke(app, ["--debug", *args])
    assert isinstance(result.exception, ShardError)


# ------------------------------------------------------------------------------- sweep files
@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, Path]:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / SUMMARY).write_text("{}")
    return tmp_path / "sweep.yaml", prepared


GOOD_SWEEP = """metric: val/oIoU
search: random
num_samples: 1
scheduler: {early_stopping: false}
overrides: [train.max_steps=2]
params:
  train.lr: {choice: [1.0e-4]}
"""


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("choice: [1.0e-4]}", "choice: [1.0e-4]"), "sweep.yaml, line 8 column 1: not valid YAML"),
        (("train.max_steps=2", "train.max_stepz=2"), "overrides: train.max_stepz: Extra inputs are not"),
        (("train.max_steps=2", "trian.max_steps=2"), "overrides: trian.max_steps: trian is not a config"),
        (("val/oIoU", "val/oIOU"), "metric 'val/oIOU' is not reported; one of val/oIoU, val/mIoU"),
    ],
)
def test_a_bad_sweep_file_is_named_before_the_sweep_starts(sweep, monkeypatch, edit, expected):
    import pipelines.flows.tune as flows

    monkeypatch.setattr(flows, "tune_magnet", lambda **kwargs: pytest.fail("the sweep started"))
    path, prepared = sweep
    path.write_text(GOOD_SWEEP.replace(*edit))
    line = refused(["tune", "--space", str(path), "--shards", str(prepared)])
    assert str(path) in line and expected in line


@pytest.mark.parametrize(("command", "option"), [("train", "--num-workers"), ("tune", "--workers-per-trial")])
def test_more_workers_than_local_cpus_are_refused_before_prefect(sweep, monkeypatch, command, option):
    import importlib

    flows = importlib.import_module(f"pipelines.flows.{command}")
    monkeypatch.setattr(flows, f"{command}_magnet", lambda **kwargs: pytest.fail("the flow started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path, prepared = sweep
    path.write_text(GOOD_SWEEP)
    workers = (os.cpu_count() or 1) + 1
    args = [command, "--shards", str(prepared), option, str(workers)]
    line = refused(args + (["--space", str(path)] if command == "tune" else []))
    assert f"{workers} workers need {workers} CPUs (one each) but this machine has {workers - 1}" in line


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("SPREAD_OUT", "--placement-strategy: 'SPREAD_OUT' is not one of PACK, SPREAD, STRICT_PACK"),
        (
            "strict_spread",
            "--placement-strategy: STRICT_SPREAD puts each of the 2 workers on a node of its own",
        ),
    ],
)
def test_a_placement_no_local_ray_can_make_is_refused_before_prefect(sweep, monkeypatch, strategy, expected):
    import pipelines.flows.train as flows

    monkeypatch.setattr(flows, "train_magnet", lambda **kwargs: pytest.fail("the flow started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _, prepared = sweep
    args = ["train", "--shards", str(prepared), "--num-workers", "2", "--placement-strategy", strategy]
    assert expected in refused(args)


def test_a_sweep_name_to_resume_is_checked_before_prefect(sweep, monkeypatch, tmp_path):
    import pipelines.flows.tune as flows

    monkeypatch.setattr(flows, "tune_magnet", lambda **kwargs: pytest.fail("the sweep started"))
    path, prepared = sweep
    path.write_text(GOOD_SWEEP)
    args = ["tune", "--space", str(path), "--shards", str(prepared), "--storage-path", str(tmp_path / "ray")]
    assert f"--resume: no sweep 'gone' under {tmp_path / 'ray'} to resume" in refused(
        [*args, "--resume", "gone"]
    )
    assert "--resume: sweep name '../gone' cannot name a directory" in refused([*args, "--resume", "../gone"])


# ------------------------------------------------------------------------- outputs it cannot write
@pytest.mark.parametrize(
    ("command", "option", "written"),
    [
        ("train", "--storage-path", "{place}"),
        ("tune", "--storage-path", "{place}"),
        ("evaluate", "--out", "{place}/metrics.json"),
        ("predict", "--out", "{place}/overlay.png"),
        ("predict", "--mask-out", "{place}/mask.png"),
        ("demo", "--workdir", "{place}"),
        ("synth", "--out", "{place}"),
        ("pretrain-vision", "--out", "{place}/vision.pt"),
        ("import-weights", "--out", "{place}"),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(
    synthetic_shards, sweep, image, no_model_load, monkeypatch, tmp_path, command, option, written
):
    """Every command that writes checks its output place first: here a path through a file (what
    a read-only or full place also gives, but root's tests cannot make those), refused at once
    rather than after a flow, a model load or a training."""
    import pipelines.flows.train as train_flows
    import pipelines.flows.tune as tune_flows

    monkeypatch.setattr(train_flows, "train_magnet", lambda **kwargs: pytest.fail("the flow started"))
    monkeypatch.setattr(tune_flows, "tune_magnet", lambda **kwargs: pytest.fail("the sweep started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    space, _ = sweep
    space.write_text(GOOD_SWEEP)
    prepared = synthetic_shards()
    (tmp_path / "a-file").write_text("not a directory")
    place = tmp_path / "a-file" / "runs"
    before = {
        "train": ["--shards", str(prepared)],
        "tune": ["--space", str(space), "--shards", str(prepared)],
        "evaluate": ["--model", str(tmp_path), "--shards", str(prepared)],
        "predict": ["--model", str(tmp_path), "--image", str(image), "--text", "the square"],
        "pretrain-vision": ["--steps", "1"],
        "import-weights": ["--checkpoint", str(image)],
    }.get(command, [])
    line = refused([command, *before, option, written.format(place=place)])
    assert f"{option}: cannot write to {place}: Not a directory" in line, line


# ---------------------------------------------------------------------------- readers of a store
def test_commands_that_read_a_store_refuse_a_missing_one_and_create_none(sweep, tmp_path, monkeypatch):
    """promote and sweep-report only read MLflow: without a store they say so, before Prefect,
    instead of leaving an empty ./mlflow.db (MLflow makes one on first contact); the library's
    promote creates none either."""
    import pipelines.flows.tune as flows
    from pipelines.promote import promote

    monkeypatch.setattr(flows, "promote_magnet", lambda **kwargs: pytest.fail("promotion started"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, prepared = sweep
    for args in (
        ["promote", "--experiment", "magnet", "--shards", str(prepared)],
        ["sweep-report", "some-sweep", "--out", str(tmp_path / "report.md")],
    ):
        assert "--tracking-uri: no MLflow tracking store at sqlite:///" in refused(args)
    with pytest.raises(FileNotFoundError, match="no MLflow tracking store"):
        promote(shards=str(prepared), experiment="magnet")
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------- weights misfit
def test_weights_that_do_not_fit_are_summarised(checkpoint, image, tmp_path):
    """A config whose model the weights do not fit: counts and a few names, every key in a file."""
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    (other / "config.yaml").write_text(
        (checkpoint / "config.yaml").read_text().replace("use_cam: true", "use_cam: false")
    )
    args = ["--model", str(other), "--image", str(image), "--text", "x", "--out", str(tmp_path / "o.png")]
    line = refused(["predict", *args])
    assert f"{other}/model.pt does not fit this model: " in line and " unexpected: " in line
    listing = Path(line.rsplit("every key: ", 1)[1])
    unexpected = int(line.split(" unexpected: ")[0].rsplit(" ", 1)[1])
    weights = torch.load(checkpoint / "model.pt", weights_only=True)
    cam_keys = [key for key in weights if ".cam." in key or key.startswith("cam.")]
    assert unexpected == len(cam_keys) > 3 and line.count("cam") <= 5
    assert set(cam_keys) <= set(listing.read_text().splitlines())


# ---------------------------------------------------------------------------- predict's text
def test_long_text_is_cut_in_the_caption_and_said_to_be_cut(checkpoint, image, tmp_path):
    overlay = tmp_path / "overlay.png"
    text = "the red square left of the blue circle " * 260  # ~10,000 characters
    args = ["--model", str(checkpoint), "--image", str(image), "--text", text, "--out", str(overlay)]
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 0, result.output
    assert "note: the expression has 2080 word pieces; the model reads only its first 19" in result.output
    read = "the red square left of the blue circle " * 2 + "the red square"  # 19 word pieces
    assert f"(text.max_tokens 20 with [CLS]): {read!r}" in result.output
    picture = Image.open(overlay)
    assert picture.width == 64 and picture.height < 48 + 60  # the image and at most 3 caption lines


def test_length_warning_of_transformers_is_not_shown():
    from data_prep.tokenize import load_tokenizer
    from magnet.inference import tokenize

    load_tokenizer.cache_clear()  # transformers warns once per tokenizer: a fresh one
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    tokenizer_log.addHandler(handler)
    try:
        tokenize(["a very long expression " * 200], load_config("tiny").model)
    finally:
        tokenizer_log.removeHandler(handler)
    assert not [r for r in records if "indexing errors" in r.getMessage()]


def test_text_the_caption_font_cannot_draw_is_named(checkpoint, image, tmp_path):
    from magnet.inference import missing_glyphs, render_overlay

    assert missing_glyphs("the red cup, красная чашка, η κούπα") == []  # Latin, Cyrillic, Greek drawn
    assert missing_glyphs("左边的红杯子 cup") == list("左边的红杯子")
    args = ["--model", str(checkpoint), "--image", str(image), "--out", str(tmp_path / "o.png")]
    result = CliRunner().invoke(app, ["predict", *args, "--text", "左边的 cup"])
    assert result.exit_code == 0, result.output
    assert "note: the caption font has no glyphs for '左边的': they show as boxes" in result.output
    picture = render_overlay(Image.open(image), np.zeros((48, 64), dtype=np.uint8), text="η κούπα")
    strip = np.asarray(picture)[: picture.height - 48]
    assert (strip < 128).any()  # Greek is drawn in the caption strip


# --------------------------------------------------------------------------------- help texts
def test_every_command_has_a_one_line_summary_in_the_help():
    import typer

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert command.short_help and "\n" not in command.short_help, name


# -------------------------------------------------------------------------------- known noise
def test_magnet_quiets_prefect_telemetry_and_rays_cleaner_for_every_ray_init(monkeypatch):
    from ray._private.worker import _maybe_modify_runtime_env

    from pipelines.ray_workers import QUIET_WORKERS

    for name in ("RAY_RUNTIME_ENV_HOOK", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.setenv(name, "")  # so that the test's end unsets what the command sets
        monkeypatch.delenv(name)
    assert CliRunner().invoke(app, ["config"]).exit_code == 0
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert _maybe_modify_runtime_env(None, False) == QUIET_WORKERS  # what ray.init does with the hook
    own = {"worker_process_setup_hook": "mine.hook", "env_vars": {"A": "1"}}
    assert _maybe_modify_runtime_env(own, False) == own

"""Import of the published MagNet checkpoints (magnet/weights.py): the rename table against the
published inventory, refusals that name every key at fault, weights_only reading, and one full
import of a random checkpoint shaped like the published one: strict load, forward, round trips."""

from __future__ import annotations

import functools
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.swin_transformer import get_relative_position_index
from torch import nn
from typer.testing import CliRunner

from magnet.checkpoint import load_model_from_checkpoint, read_checkpoint_meta
from magnet.config import AlignmentLossConfig
from magnet.models import MagNet, build_model
from magnet.weights import (
    WeightImportError,
    import_published,
    imported_config,
    ours_to_published,
    published_to_ours,
    read_published,
)

INVENTORY = Path(__file__).resolve().parents[2].parent / "shared/reference/official_magnet_state_dict.json"
pytestmark = pytest.mark.skipif(not INVENTORY.is_file(), reason=f"published inventory {INVENTORY} is absent")

LANG_PROJ_HOME = "criterion.alignment.text_proj"
"""The default alignment loss's text projection: one Linear 768 -> 256, the published lang_proj."""


@functools.cache
def inventory() -> list[dict]:
    return json.loads(INVENTORY.read_text())["tensors"]


def position_index(shape: list[int]) -> torch.Tensor:
    """The real relative_position_index of a square window with shape [w*w, w*w]."""
    window = math.isqrt(shape[0])
    return get_relative_position_index(window, window)


def shaped_like_published(fill: str) -> dict[str, torch.Tensor]:
    """A state dict with every published key, shape and dtype.

    fill "zeros": stride-0 views of one zero (files of a few kB); "random": seeded small values.
    """
    g = torch.Generator().manual_seed(0)
    out = {}
    for entry in inventory():
        key, shape, dtype = entry["key"], entry["shape"], getattr(torch, entry["dtype"])
        if key.endswith("relative_position_index"):
            out[key] = position_index(shape)
        elif fill == "zeros":
            out[key] = torch.zeros(1, dtype=dtype).expand(shape)
        else:
            out[key] = (0.02 * torch.randn(shape, generator=g)).to(dtype)
    return out


@pytest.fixture(scope="module")
def paper_meta() -> MagNet:
    return build_model(imported_config().model, "meta")


# ---------------------------------------------------------------------------------- mapping
def test_every_published_tensor_finds_its_place(paper_meta: MagNet) -> None:
    published = shaped_like_published("zeros")
    mapped, report = published_to_ours(published, paper_meta)
    ours = paper_meta.state_dict()
    assert len(published) == 1310
    assert set(report.mapped) | set(report.dropped) == set(published)
    assert sorted(report.dropped) == sorted(
        k for k in published if k.endswith("attn.relative_position_index")
    )
    assert report.kept_training_only == [f"{LANG_PROJ_HOME}.weight", f"{LANG_PROJ_HOME}.bias"]
    inference = {k for k in ours if not k.startswith("criterion.")}
    assert inference <= set(mapped)
    for ours_key, value in mapped.items():
        assert value.shape == ours[ours_key].shape, ours_key
    # the shift: the reference's merging at the end of stage k is timm's at the start of k+1
    assert report.mapped["image_model.layers.0.downsample.reduction.weight"] == (
        "image_model.layers.1.downsample.reduction.weight"
    )
    assert report.mapped["image_model.layers.2.mixer.0.weight"] == "image_model.layers.2.cam.mixer.0.weight"


def test_inverse_gives_the_published_layout(paper_meta: MagNet) -> None:
    published = ours_to_published(paper_meta.state_dict(), paper_meta)
    expected = {e["key"]: e for e in inventory()}
    assert set(published) == set(expected)
    for key, value in published.items():
        assert list(value.shape) == expected[key]["shape"], key
        assert str(value.dtype).removeprefix("torch.") == expected[key]["dtype"], key


def test_lang_proj_seeds_the_single_linear_text_projection(paper_meta: MagNet) -> None:
    assert isinstance(paper_meta.get_submodule(LANG_PROJ_HOME), nn.Linear)
    _, report = published_to_ours(shaped_like_published("zeros"), paper_meta)
    assert report.mapped["lang_proj.weight"] == f"{LANG_PROJ_HOME}.weight"
    assert report.mapped["lang_proj.bias"] == f"{LANG_PROJ_HOME}.bias"


@pytest.mark.parametrize("alignment", [{"enabled": False}, {"pixel_features": "cam_stage1"}])
def test_lang_proj_is_dropped_without_a_matching_head(alignment: dict) -> None:
    """No alignment loss, or the stage-1 variant whose MLP lang_proj cannot be: dropped on import,
    and never written back (no lang_proj.0.* from the MLP's layers)."""
    cfg = imported_config()
    cfg.model.alignment = AlignmentLossConfig(**alignment)
    model = build_model(cfg.model, "meta")
    _, report = published_to_ours(shaped_like_published("zeros"), model)
    assert report.kept_training_only == []
    assert set(k for k in report.dropped if not k.endswith("relative_position_index")) == {
        "lang_proj.weight",
        "lang_proj.bias",
    }
    assert not [k for k in ours_to_published(model.state_dict(), model) if k.startswith("lang_proj")]


# ---------------------------------------------------------------------------------- refusals
MISSING = "classifier.predictor.query_feat.weight"
EXTRA = "image_model.layers.0.fusion.extra_proj.weight"
MISSHAPEN = "image_model.layers.1.downsample.reduction.weight"
BAD_INDEX = "image_model.layers.2.blocks.5.attn.relative_position_index"


def spoil(published: dict[str, torch.Tensor], faults: tuple[str, ...]) -> dict[str, torch.Tensor]:
    published = dict(published)
    if "missing" in faults:
        del published[MISSING]
    if "extra" in faults:
        published[EXTRA] = torch.zeros(4, 4)
    if "misshapen" in faults:
        published[MISSHAPEN] = torch.zeros(1).expand(512, 1000)
    if "bad_index" in faults:
        published[BAD_INDEX] = position_index([144, 144]).flip(0)
    return published


@pytest.mark.parametrize(
    "faults",
    [
        ("missing",),
        ("extra",),
        ("misshapen",),
        ("bad_index",),
        ("missing", "extra", "misshapen", "bad_index"),
    ],
)
def test_import_refuses_a_misfit_file_naming_every_key(tmp_path: Path, faults: tuple[str, ...]) -> None:
    path = tmp_path / "spoiled.pth"
    torch.save({"model": spoil(shaped_like_published("zeros"), faults)}, path)
    with pytest.raises(WeightImportError) as err:
        import_published(path, tmp_path / "out")
    named = {"missing": MISSING, "extra": EXTRA, "misshapen": MISSHAPEN, "bad_index": BAD_INDEX}
    for fault in faults:
        assert named[fault] in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_refusal_names_the_key(tmp_path: Path) -> None:
    from pipelines.cli import app

    path = tmp_path / "spoiled.pth"
    torch.save(spoil(shaped_like_published("zeros"), ("missing",)), path)  # a bare state dict
    result = CliRunner().invoke(
        app, ["import-weights", "--checkpoint", str(path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert MISSING in result.output


class _RunsCodeOnLoad:
    """Unpickling this calls os.system: what weights_only must refuse to execute."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _RunsCodeOnLoad(marker)}}, path)
    with pytest.raises(WeightImportError, match="weights_only"):
        read_published(path)
    assert not marker.exists()
    with path.open("wb") as handle:  # the same in the legacy (non-zip) pickle format
        pickle.dump({"model": {"x": _RunsCodeOnLoad(marker)}}, handle)
    with pytest.raises(WeightImportError, match="weights_only"):
        read_published(path)
    assert not marker.exists()


def test_reads_wrapped_and_bare_state_dicts(tmp_path: Path) -> None:
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    torch.save(sd, tmp_path / "bare.pth")
    for name in ("wrapped.pth", "bare.pth"):
        read = read_published(tmp_path / name)
        assert read.keys() == sd.keys() and all(torch.equal(read[k], sd[k]) for k in sd)
    torch.save({"model": {"a": torch.zeros(1), "step": 3}}, tmp_path / "mixed.pth")
    with pytest.raises(WeightImportError, match="step"):
        read_published(tmp_path / "mixed.pth")


def test_imported_config_sizes() -> None:
    assert imported_config(448).model.image_size == 448
    assert imported_config(480, reference_mask_quirk=False).model.fusion.reference_mask_quirk is False
    with pytest.raises(ValueError, match="384"):
        imported_config(384)


# ------------------------------------------------------------------------- the full import
def test_import_load_forward_and_round_trips(tmp_path: Path) -> None:
    """One real paper-size import (~1.2 GB of random weights): strict load by checkpoint.py, a
    forward pass, published -> ours -> published and ours -> published -> ours both exact."""
    source = tmp_path / "magnet_random.pth"
    torch.save({"model": shaped_like_published("random")}, source)
    out = import_published(source, tmp_path / "imported")
    imported = read_checkpoint_meta(out).imported_from
    assert imported.tensors_mapped == 1286
    assert imported.training_only_kept == (f"{LANG_PROJ_HOME}.weight", f"{LANG_PROJ_HOME}.bias")

    model, cfg = load_model_from_checkpoint(out)
    assert cfg.model.fusion.reference_mask_quirk is True
    assert cfg.model.image_size == 480
    assert cfg.train.precision == "fp32"

    published = torch.load(source, map_location="cpu", weights_only=True, mmap=True)["model"]
    back = ours_to_published(model.state_dict(), model)
    assert back.keys() == published.keys()
    unequal = [k for k in published if not torch.equal(back[k], published[k])]
    assert unequal == []

    ours = model.state_dict()
    again, _ = published_to_ours(back, model)
    carried = {k for k in ours if not k.startswith("criterion.")} | {
        f"{LANG_PROJ_HOME}.weight",
        f"{LANG_PROJ_HOME}.bias",
    }
    assert set(again) == carried
    assert [k for k in carried if not torch.equal(again[k], ours[k])] == []

    ids = torch.zeros(1, 20, dtype=torch.long)
    ids[0, :5] = torch.tensor([101, 1996, 2158, 2187, 102])
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 96, 96), ids, (ids != 0).long()).mask_logits
    assert logits.shape == (1, 1, 24, 24)
    assert np.isfinite(logits.numpy()).all()


# ------------------------------------------------------------------- predict --logits-out
def test_predict_writes_raw_logits(tmp_path: Path) -> None:
    """`magnet predict --logits-out` saves the mask logits at the model's output resolution
    (S/4 x S/4, float32), as the model computes them, for number-by-number comparisons."""
    import yaml
    from PIL import Image

    from magnet.checkpoint import CONFIG_FILE, MODEL_FILE
    from magnet.config import load_config
    from magnet.inference import preprocess_images, tokenize
    from pipelines.cli import app

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    torch.save(model.state_dict(), checkpoint / MODEL_FILE)
    (checkpoint / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    image = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)).save(image)
    text, logits_file = "the red square on the left", tmp_path / "logits.npy"

    result = CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            str(checkpoint),
            "--image",
            str(image),
            "--text",
            text,
            "--out",
            str(tmp_path / "overlay.png"),
            "--logits-out",
            str(logits_file),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = np.load(logits_file)
    ids, attention = tokenize([text], cfg.model)
    with torch.no_grad():
        expected = model(
            preprocess_images([Image.open(image)], cfg.model.image_size), ids, attention
        ).mask_logits
    assert saved.dtype == np.float32 and saved.shape == (cfg.model.image_size // 4,) * 2
    np.testing.assert_allclose(saved, expected[0, 0].numpy(), rtol=1e-5, atol=1e-5)

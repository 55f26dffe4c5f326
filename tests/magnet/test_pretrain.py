"""The vision pretraining on generated scenes (magnet.pretrain) and `magnet pretrain-vision`."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from data_prep.scenes import COLOURS, SHAPES
from data_prep.synth import render_scene
from magnet.config import load_config
from magnet.models import build_model
from magnet.models.magnet import SWIN_KEY
from magnet.pretrain import SCENE_SEED, ScenePretrainer, scene_targets, swin_features
from pipelines.cli import app


def test_targets_label_each_object_with_its_classes_and_centre() -> None:
    image, labels, offsets = scene_targets(SCENE_SEED, 3, 64)
    rendered, _ = render_scene(SCENE_SEED, 3, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    for obj, mask in zip(rendered.scene.objects, rendered.masks, strict=True):
        assert (labels[0][mask] == list(COLOURS).index(obj.colour) + 1).all()
        assert (labels[1][mask] == SHAPES.index(obj.shape) + 1).all()
        ys, xs = np.nonzero(mask)  # the offsets point every pixel at the same centre
        np.testing.assert_allclose(xs / 64 + offsets[0][mask], obj.cx / 64, atol=1e-5)
        np.testing.assert_allclose(ys / 64 + offsets[1][mask], obj.cy / 64, atol=1e-5)
    background = ~np.any(rendered.masks, axis=0)
    assert not labels[:, background].any() and not offsets[:, background].any()


def test_pretrainer_runs_magnets_own_swin_path() -> None:
    """The pretrained Swin is MagNet's: with the gates at zero, MagNet's stages compute exactly the
    plain Swin path the pretraining trains (the fusion only adds through the gate)."""
    cfg = load_config("demo", ["model.vision.pretrained=null"])
    torch.manual_seed(0)
    pretrainer = ScenePretrainer(cfg.model)
    model = build_model(cfg.model).eval()
    model.image_model.load_state_dict(pretrainer.swin_state_dict(), strict=False)
    image = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[101, 2417, 4418, 102]] * 2)
    with torch.no_grad():
        plain = swin_features(pretrainer.swin.eval(), image)
        x = model.image_model.patch_embed(image)
        words = model.language_model.embeddings(input_ids=ids)
        for stage, expected in zip(model.image_model.layers, plain, strict=True):
            x, pixels, _ = stage(x, words, torch.ones(2, 4))
            torch.testing.assert_close(pixels, expected)


def test_pretrain_command_writes_weights_that_the_model_loads(tmp_path) -> None:
    out = tmp_path / "swin.pt"
    result = CliRunner().invoke(
        app,
        ["pretrain-vision", "--out", str(out), "--steps", "2", "--batch-size", "2", "--loader-workers", "0"],
    )
    assert result.exit_code == 0, result.output
    state = torch.load(out, weights_only=True)
    assert state and all(SWIN_KEY.match(k) for k in state)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["steps"] == 2 and set(meta["held_out"]) == {"colour", "shape", "size", "offset_px"}
    model = build_model(load_config("demo", [f"model.vision.pretrained={out}"]).model)
    loaded = model.image_model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_pretrain_command_refuses_a_bad_out_in_one_line(tmp_path) -> None:
    result = CliRunner().invoke(app, ["pretrain-vision", "--out", str(tmp_path / "swin.bin")])
    assert result.exit_code == 2
    assert "must end in .pt" in result.output and "Traceback" not in result.output

"""What users hand a trained model: `magnet predict` reads a photo as a person sees it (upright by
its EXIF orientation, 16-bit grey not white)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from pictures import red_over_blue, save_grey16, save_sideways
from PIL import Image
from typer.testing import CliRunner

from magnet.checkpoint import load_model_from_checkpoint
from magnet.inference import preprocess_images, tokenize
from pipelines.cli import app

TEXT = "the red part"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _logits(checkpoint: Path, picture: Image.Image) -> np.ndarray:
    """The model's mask logits for `picture` through the library (the reference)."""
    net, cfg = load_model_from_checkpoint(checkpoint)
    ids, attention = tokenize([TEXT], cfg.model)
    pixels = preprocess_images([picture], cfg.model.image_size)  # [1, 3, S, S]
    with torch.inference_mode():
        return net(pixels, ids, attention).mask_logits[0, 0].numpy()


@pytest.mark.parametrize("kind", ["sideways jpeg", "16-bit grey png"])
def test_predict_sees_the_picture_a_person_sees(checkpoint: Path, tmp_path: Path, kind: str) -> None:
    if kind == "sideways jpeg":
        image = tmp_path / "photo.jpg"
        save_sideways(image, red_over_blue(width=30, height=40))
        # What a viewer shows: the stored pixels turned a quarter right, as EXIF orientation 6 says.
        seen = Image.fromarray(np.asarray(Image.open(image).transpose(Image.Transpose.ROTATE_270)))
    else:
        image = tmp_path / "scan.png"
        values = np.linspace(0, 65535, 30 * 40).reshape(40, 30).astype(np.uint16)
        save_grey16(image, values)
        seen = Image.fromarray(np.rint(values / 257).astype(np.uint8), "L")
    mask, logits = tmp_path / "mask.png", tmp_path / "logits.npy"
    args = ["predict", "--model", str(checkpoint), "--image", str(image), "--text", TEXT]
    args += ["--out", str(tmp_path / "overlay.png"), "--mask-out", str(mask), "--logits-out", str(logits)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Image.open(mask).size == (30, 40)  # upright: 30 wide, 40 tall
    np.testing.assert_allclose(np.load(logits), _logits(checkpoint, seen), rtol=0, atol=1e-5)

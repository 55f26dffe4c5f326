"""What users hand a trained model: `magnet predict` reads a photo as a person sees it (upright by
its EXIF orientation, 16-bit grey not white), and the served pyfunc answers a bad row with the row
and its cause (a 400, nothing of the server's internals) instead of a stack trace."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from pictures import huge_png, red_over_blue, save_grey16, save_sideways
from PIL import Image
from typer.testing import CliRunner

from magnet.checkpoint import load_model_from_checkpoint
from magnet.inference import preprocess_images, tokenize
from pipelines import registry
from pipelines.cli import app

TEXT = "the red part"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple:
    """The checkpoint's model, loaded once, for the logits the CLI's must equal."""
    return load_model_from_checkpoint(checkpoint)


def _logits(reference: tuple, picture: Image.Image) -> np.ndarray:
    """The model's mask logits for `picture` through the library."""
    net, cfg = reference
    ids, attention = tokenize([TEXT], cfg.model)
    pixels = preprocess_images([picture], cfg.model.image_size)  # [1, 3, S, S]
    with torch.inference_mode():
        return net(pixels, ids, attention).mask_logits[0, 0].numpy()


@pytest.mark.parametrize("kind", ["sideways jpeg", "16-bit grey png"])
def test_predict_sees_the_picture_a_person_sees(
    checkpoint: Path, reference, tmp_path: Path, kind: str
) -> None:
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
    np.testing.assert_allclose(np.load(logits), _logits(reference, seen), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def served(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc model as `mlflow models serve` loads it (saved locally: no registry needed)."""
    path = tmp_path_factory.mktemp("served") / "model"
    mlflow.pyfunc.save_model(
        str(path),
        python_model=registry.MagNetPyfunc(),
        artifacts={registry.CHECKPOINT_ARTIFACT: str(checkpoint)},
        signature=registry.signature(),
        pip_requirements=["mlflow"],
        code_paths=registry._project_code(),
    )
    return mlflow.pyfunc.load_model(str(path))


GOOD = _png(Image.fromarray(red_over_blue()))


@pytest.mark.parametrize(
    ("cell", "text", "cause"),
    [
        (GOOD, 123, "text: not text (int 123)"),
        (GOOD, "  ", "text: empty: say which object to segment"),
        (b"%PDF-1.4 not a picture", TEXT, "image: not a recognised image format"),
        (GOOD[: len(GOOD) // 2], TEXT, "image: damaged: "),
        (huge_png(30_000, 20_000), TEXT, "image: too large: more pixels than twice the 89.5 MP limit"),
        (huge_png(10_000, 9_000), TEXT, "image: too large: 10000x9000 pixels (90.0 MP), more than the"),
    ],
    ids=["text a number", "empty text", "not an image", "truncated", "bomb", "over the limit"],
)
def test_a_bad_row_is_named_with_its_cause(served, cell: bytes, text: object, cause: str) -> None:
    """Row 2 of three is bad: the batch is refused naming row 2 (counted from 0) and why."""
    frame = pd.DataFrame({"image": [GOOD, GOOD, cell], "text": [TEXT, TEXT, text]}, dtype=object)
    with pytest.raises(MlflowException) as raised:
        served.predict(frame)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert raised.value.message.startswith(f"row 2: {cause}"), raised.value.message
    assert "row 0" not in raised.value.message and "row 1" not in raised.value.message


def test_the_scoring_server_answers_a_bad_row_with_400_and_no_internals(served) -> None:
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    good = base64.b64encode(GOOD).decode()
    rows = [[good, TEXT], [base64.b64encode(b"not an image").decode(), TEXT]]
    client = TestClient(scoring_server.init(served))

    def request(data: list[list[str]]):
        payload = {"dataframe_split": {"columns": ["image", "text"], "data": data}}
        return client.post("/invocations", json=payload)

    response = request(rows)
    assert response.status_code == 400
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
    assert body["message"].endswith("Error: row 1: image: not a recognised image format")
    assert ".py" not in body["message"]
    assert request(rows[:1]).status_code == 200

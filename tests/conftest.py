"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow_server import mlflow_server, postgres_server  # noqa: F401  (fixtures)
from object_store import s3_store  # noqa: F401  (fixture)

# Nothing in the suite may reach a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True, scope="module")
def isolated_mlflow() -> Iterator[None]:
    """Give every test module a clean MLflow target.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into os.environ (so subprocesses
    inherit it), which would point the next module's runs at this module's store.
    """
    saved = {name: os.environ.get(name) for name in _MLFLOW_ENV}
    yield
    import mlflow

    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None unsets the global and the variable
    mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for name, value in saved.items():  # set_registry_uri(None) leaves its variable behind
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def module_tmp(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Path]]:
    """``tmp_path_factory.mktemp`` for a module's shared fixtures, whose directories go after the
    module's last test unless one of its tests failed. Their Ray checkpoints and MLflow stores are
    hundreds of MB each; kept to the session's end they added up to 25 GB, more than CI's shared
    disk had free. (Each test's own tmp_path goes when it passes: tmp_path_retention_policy.)"""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Prepared shards of a generated RefCOCO-format set: ``make(num_images, image_size, seed,
    samples_per_shard)`` -> the ``refcoco-unc`` shard root. Built once per argument set and
    session; tests must not modify what they get."""
    from data_prep.shards import prepare_dataset
    from data_prep.synth import synthesize

    built: dict[tuple[int, int, int, int], Path] = {}

    def make(num_images: int = 24, image_size: int = 64, seed: int = 0, samples_per_shard: int = 8) -> Path:
        key = (num_images, image_size, seed, samples_per_shard)
        if key not in built:
            root = tmp_path_factory.mktemp("synthetic")
            synthesize(root / "refer", num_images=num_images, image_size=image_size, seed=seed, workers=1)
            out = prepare_dataset(
                root / "refer", "refcoco", "unc", root / "shards", samples_per_shard=samples_per_shard
            )
            built[key] = out.out_dir
        return built[key]

    return make


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local WordPiece tokenizer whose vocabulary is not the project's: its ids mean other words
    ([MASK] is 4, not 103)."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("tokenizer")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "red", "square"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(str(root / "vocab.txt")).save_pretrained(str(root / "saved"))
    return str(root / "saved")

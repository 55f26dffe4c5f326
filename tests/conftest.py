"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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

"""Reading the registry creates nothing: a models:/ or runs:/ reference looked up where there is no
tracking store fails naming the URI it searched, and leaves no empty ./mlflow.db behind."""

from __future__ import annotations

import pytest

from pipelines import registry, tracking


@pytest.mark.parametrize("ref", ["models:/magnet@champion", "runs:/0123456789abcdef0123456789abcdef/model"])
def test_registry_read_without_a_store_names_it_and_creates_none(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(
        FileNotFoundError, match=f"no MLflow tracking store at sqlite:///{tmp_path}/mlflow.db"
    ):
        registry.load_model(ref)
    assert list(tmp_path.iterdir()) == []


def test_registry_read_of_a_model_the_store_lacks_names_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.client_for(uri).search_experiments()  # an existing, empty store
    ref = "models:/magnet@champion"
    with pytest.raises(ValueError, match=f"{ref} is not in the MLflow tracking store {uri}"):
        registry.load_model(ref, tracking_uri=uri)

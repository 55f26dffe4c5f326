"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch

from magnet.config import load_config
from magnet.models import MagNet, build_model


@pytest.fixture(scope="module")
def tiny() -> MagNet:
    """The tiny preset's model, seeded, in training mode; one per test module (tests may change
    its config)."""
    torch.manual_seed(0)
    return build_model(load_config("tiny").model)

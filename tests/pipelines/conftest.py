"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_runs import TINY_MODEL


@pytest.fixture(scope="module")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server and database for the module's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def checkpoint(module_tmp) -> Path:
    """A saved tiny MagNet (TINY_MODEL, random weights) as training leaves it at step 3."""
    import torch

    from magnet.checkpoint import TrainState, checkpoint_name, save_checkpoint
    from magnet.config import load_config
    from magnet.models import build_model

    cfg = load_config("tiny", TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_checkpoint(
        module_tmp("ckpt") / checkpoint_name(3),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=TrainState(step=3),
        cfg=cfg,
        rng_states=[{}],
    )

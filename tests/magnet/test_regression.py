"""Fixed-seed regression: the tiny model's training losses and logits on a fixed batch.

A refactor must give the same loss with a fixed seed (style.md, torchtitan). The values below
were recorded on CPU in float32; a change to the model, the losses or their weights moves them.
"""

from __future__ import annotations

import pytest
import torch

from magnet.config import load_config
from magnet.losses import LOSS_KEYS
from magnet.models import build_model

EXPECTED_LOSSES = {
    "loss": 6.125121116638184,
    "bce": 1.9751451015472412,
    "dice": 2.041072130203247,
    "seg": 4.016217231750488,
    "mg": 11.111337661743164,
    "cal": 9.977701187133789,
}
EXPECTED_LOGITS = {"sum": -942.5121928704903, "abs_sum": 1441.022715804167}
RTOL = 1e-4


def _fixed_batch(image_size: int, batch: int = 2, length: int = 20) -> dict[str, torch.Tensor]:
    """An image, an 8-id expression ([CLS] w1..w6 [SEP]) padded to ``length`` and a box mask."""
    gen = torch.Generator().manual_seed(1234)
    ids = torch.zeros(batch, length, dtype=torch.long)
    ids[:, 0], ids[:, 7] = 101, 102
    ids[:, 1:7] = torch.randint(1000, 5000, (batch, 6), generator=gen)
    mask = torch.zeros(batch, image_size, image_size)
    mask[0, 16:80, 24:96] = 1
    mask[1, 40:120, 8:60] = 1
    return {
        "image": torch.randn(batch, 3, image_size, image_size, generator=gen),
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "mask": mask,
    }


def _losses_and_logits() -> tuple[dict[str, float], dict[str, float]]:
    """One training-mode forward of the tiny preset (Mask Grounding and CAL on), as train_step runs it."""
    cfg = load_config("tiny")
    assert cfg.model.mask_grounding.enabled and cfg.model.alignment.enabled
    torch.manual_seed(0)
    model = build_model(cfg.model)
    data = _fixed_batch(cfg.model.image_size)
    model.train()
    torch.manual_seed(1)  # Mask Grounding's word masking and CAL's pixel sampling draw from it
    with torch.no_grad():
        out = model(data["image"], data["input_ids"], data["attention_mask"], target_mask=data["mask"])
    losses = {key: float(out.losses[key]) for key in LOSS_KEYS}
    logits = out.mask_logits.double()
    return losses, {"sum": float(logits.sum()), "abs_sum": float(logits.abs().sum())}


def test_tiny_losses_and_logits_match_recorded_values() -> None:
    losses, logits = _losses_and_logits()
    assert losses == pytest.approx(EXPECTED_LOSSES, rel=RTOL)
    assert logits == pytest.approx(EXPECTED_LOGITS, rel=RTOL)

"""MagNet and its parts. ``build_model(cfg.model)`` is the one entry point the rest of the
project uses (DEVELOPERS.md, model contract); variants are config presets (configs/*.yaml)."""

from __future__ import annotations

import torch

from magnet.config import ModelConfig
from magnet.models.magnet import MagNet, MagNetOutput, build_magnet

__all__ = ["MagNet", "MagNetOutput", "build_model"]


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> MagNet:
    """MagNet for ``cfg`` on ``device`` (default CPU); ``"meta"`` builds it without memory or weights."""
    return build_magnet(cfg, device)

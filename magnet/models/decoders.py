"""Choose MagNet's mask decoder by ``cfg.kind`` (the decoder ablation is a config switch, not a fork)."""

from __future__ import annotations

from torch import nn

from magnet.config import DecoderConfig
from magnet.models._decoder import DecoderOutput
from magnet.models.lavt_decoder import LAVTDecoder
from magnet.models.mask2former import Mask2FormerDecoder

__all__ = ["DECODERS", "DecoderOutput", "build_decoder"]

DECODERS: dict[str, type[nn.Module]] = {"mask2former": Mask2FormerDecoder, "lavt": LAVTDecoder}


def build_decoder(in_channels: tuple[int, int, int, int], cfg: DecoderConfig) -> nn.Module:
    """The decoder named by ``cfg.kind`` for levels of ``in_channels`` (strides 4, 8, 16, 32).

    Every decoder's ``forward(features)`` takes the four maps ordered stride 4 -> 32 and returns a
    ``DecoderOutput`` (mask logits at 1/4 of the input, the mask features they are read from,
    auxiliary masks, optional class logits); ``mask_feature_dim`` is the mask features' width.
    """
    if cfg.kind not in DECODERS:
        raise ValueError(f"decoder.kind={cfg.kind!r} is unknown; choose one of {sorted(DECODERS)}")
    return DECODERS[cfg.kind](in_channels, cfg)

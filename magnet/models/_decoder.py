"""What the mask decoders (``mask2former.py``, ``lavt_decoder.py``) share: their output and input checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DecoderOutput:
    """A decoder's predictions at 1/4 of the input resolution.

    Attributes:
        mask_logits: final mask logits [B, Q, H/4, W/4] (Q = 1 query: one referred object).
        mask_features: the per-pixel embedding the mask is read from, [B, C_m, H/4, W/4] with C_m the
            decoder's ``mask_feature_dim`` (what the cross-modal alignment loss aligns with the words).
        aux_mask_logits: earlier predictions of the same shape for deep supervision, oldest first;
            empty for decoders without intermediate predictions.
        class_logits: final "object / no object" logits [B, Q, 2] where the decoder has a class head
            (kept for checkpoint compatibility with the reference; MagNet's loss does not use them).
    """

    mask_logits: Tensor
    mask_features: Tensor
    aux_mask_logits: list[Tensor] = field(default_factory=list)
    class_logits: Tensor | None = None


def check_features(features: list[Tensor], in_channels: tuple[int, ...], owner: str) -> None:
    """Clear errors for a wrong number of levels or wrong channels (shapes are static under compile)."""
    if len(features) != len(in_channels):
        raise ValueError(
            f"{owner}: expected {len(in_channels)} feature maps (strides 4..32), got {len(features)}"
        )
    channels = tuple(f.shape[1] for f in features)
    if channels != tuple(in_channels):
        raise ValueError(
            f"{owner}: feature channels {channels} do not match in_channels {tuple(in_channels)}"
        )

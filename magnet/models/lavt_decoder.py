"""LAVT-style simple decoder: progressive top-down fusion to a 1/4-resolution mask.

After LAVT's SimpleDecoding (Yang et al., CVPR 2022, github.com/yz93/LAVT-RIS): the deepest map is
upsampled, concatenated with the next shallower one and fused by two 3x3 conv-BN-ReLU, down to
stride 4, then a 1x1 conv gives the mask logit. MagNet's ablations use it as the baseline decoder;
it predicts one logit (sigmoid) instead of LAVT's two-class softmax and has no auxiliary masks.

Shape legend: B batch, C_s channels of the stride-s map, D fusion width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magnet.config import DecoderConfig
from magnet.models._decoder import DecoderOutput, check_features


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias, BN follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class LAVTDecoder(nn.Module):
    """Top-down fusion stride 32 -> 16 -> 8 -> 4, two ConvBNReLU per step, then a 1x1 mask head.

    Args:
        in_channels: channels of the four input levels, strides 4, 8, 16, 32.
        cfg: the decoder section; ``lavt_hidden_dim`` sets the fusion width D (None: C_32 / 2, as LAVT).
    """

    def __init__(self, in_channels: tuple[int, int, int, int], cfg: DecoderConfig) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"LAVTDecoder: expected 4 input levels, got in_channels={in_channels}")
        self.in_channels = tuple(in_channels)
        hidden = cfg.lavt_hidden_dim or max(in_channels[3] // 2, 1)
        self.mask_feature_dim = hidden
        # fuse[0] takes [up(C_32), C_16], fuse[1] [up(D), C_8], fuse[2] [up(D), C_4]
        inputs = [in_channels[3] + in_channels[2], hidden + in_channels[1], hidden + in_channels[0]]
        self.fuse = nn.ModuleList(
            nn.Sequential(ConvBNReLU(c, hidden), ConvBNReLU(hidden, hidden)) for c in inputs
        )
        self.mask_head = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, features: list[Tensor]) -> DecoderOutput:
        """features: 4 maps [B, C_s, H/s, W/s] at strides s = 4, 8, 16, 32 -> mask logits [B, 1, H/4, W/4]."""
        check_features(features, self.in_channels, type(self).__name__)
        x = features[3]  # [B, C_32, H/32, W/32]
        for fuse, lateral in zip(self.fuse, features[2::-1], strict=True):
            x = F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=True)
            x = fuse(torch.cat([x, lateral], dim=1))  # [B, D, h, w] of the lateral's stride
        return DecoderOutput(mask_logits=self.mask_head(x), mask_features=x)  # x: [B, D, H/4, W/4]

"""Pixel-word fusion blocks shared by MagNet (and LAVT, its base): PWAM, the tanh gates, the
language-side fusion and the cross-modal alignment module (CAM).

Module and parameter names follow the published MagNet checkpoint (``vis_project``,
``image_lang_att.f_query/f_key/f_value/W``, ``project_mm``, ``pyramids``, ``fusions``,
``mixer``), so importing its weights is a handful of renames, not a re-wiring. The 1x1
projections stay ``Conv1d``/``Conv2d`` where the reference has them, for the same reason.

Legend: B batch, N = H*W pixels of a stage, C pixel channels, L words (expression ids),
D word width (768 for BERT-base), s pyramid pool size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PADDING_BIAS = -10000.0
"""BERT's additive constant for padded positions, kept so the reference's scores are reproduced."""


class Pointwise1d(nn.Conv1d):
    """A 1x1 ``Conv1d`` (the reference's parameter shape [out, in, 1]) applied to channels-last
    tokens [..., in] as a matrix product: the same function, without a convolution kernel's
    overhead, and no transposes around it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        return F.linear(x, self.weight.squeeze(-1), self.bias)


class Pointwise2d(nn.Conv2d):
    """A 1x1 ``Conv2d`` (parameter shape [out, in, 1, 1]) applied to channels-last maps [B, H, W, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        return F.linear(x, self.weight.flatten(1), self.bias)


class TokenInstanceNorm(nn.Module):
    """Instance norm over the token axis of channels-last tokens [B, L, D] (``InstanceNorm1d``
    without affine parameters, as the reference's language side uses it)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, D] -> [B, L, D], each channel normalised over its L positions."""
        # The reference's own op on a [B, D, L] view: ~2x faster than var_mean over the strided axis.
        return F.instance_norm(x.transpose(1, 2), eps=self.eps).transpose(1, 2)


def tanh_gate(dim: int, act_layer: type[nn.Module]) -> nn.Sequential:
    """linear - act - linear - tanh, no biases: how much of a fused residual enters a stream.

    Only the LAST linear starts at zero (see ``zero_gate_``): the gate is exactly 0 at
    initialisation, yet its first linear keeps a non-zero output, so the gradient reaches the
    last one from the first step. Zeroing both would leave the gate dead for ever.
    """
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False), act_layer(), nn.Linear(dim, dim, bias=False), nn.Tanh()
    )


def zero_gate_(gate: nn.Sequential) -> None:
    """Make ``gate`` output exactly 0 (the stream starts as the plain unimodal encoder)."""
    nn.init.zeros_(gate[2].weight)


class PixelWordAttention(nn.Module):
    """Each pixel attends over the words (one head, scaled dot product, padded words excluded).

    Args:
        pixel_dim: C, channels of the pixels (the queries).
        word_dim: D, width of the words (keys and values).
        key_dim: width of queries and keys.
        value_dim: width of the values.
        out_dim: output channels.
    """

    def __init__(self, pixel_dim: int, word_dim: int, key_dim: int, value_dim: int, out_dim: int) -> None:
        super().__init__()
        self.f_query = nn.Sequential(nn.Linear(pixel_dim, key_dim), nn.LayerNorm(key_dim))
        self.f_key = nn.Sequential(Pointwise1d(word_dim, key_dim))
        self.f_value = nn.Sequential(Pointwise1d(word_dim, value_dim))
        self.W = nn.Sequential(nn.Linear(value_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, pixels: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        """pixels [B, N, C], words [B, L, D], word_mask [B, L] (1 real, 0 padding) -> [B, N, out_dim]."""
        query = self.f_query(pixels)  # [B, N, K]
        keep = word_mask.unsqueeze(-1).to(query.dtype)  # [B, L, 1]
        key = (self.f_key(words) * keep).to(query.dtype)  # [B, L, K], padded words zeroed
        value = (self.f_value(words) * keep).to(query.dtype)  # [B, L, V]
        attend = word_mask.bool()[:, None, None, :]  # [B, 1, 1, L]; [CLS] is always real
        out = F.scaled_dot_product_attention(
            query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), attend
        )  # [B, 1, N, V]
        return self.W(out.squeeze(1))  # [B, N, out_dim]


class PWAM(nn.Module):
    """Pixel-word attention module: the multimodal residual of a stage (vision side).

    ``project_mm(vis_project(x) * attention(x, words))``: pixel features modulated element-wise
    by what each pixel read from the expression.

    Args:
        dim: C, channels of the pixels (in and out).
        word_dim: D, width of the words.
        dropout: dropout after the two projections.
    """

    def __init__(self, dim: int, word_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.vis_project = nn.Sequential(Pointwise1d(dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = PixelWordAttention(dim, word_dim, dim, dim, dim)
        self.project_mm = nn.Sequential(Pointwise1d(dim, dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, pixels: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        """pixels [B, N, C], words [B, L, D], word_mask [B, L] -> residual [B, N, C]."""
        return self.project_mm(self.vis_project(pixels) * self.image_lang_att(pixels, words, word_mask))


class WordPixelAttention(nn.Module):
    """Each word attends over the stage's pixels (language side, one head).

    As in the reference, queries are multiplied by the word mask (not normalised), keys and
    values are instance-normalised over the pixels, the output over the word positions, and
    padded queries get ``PADDING_BIAS`` on their scores. Handing the
    ADDITIVE mask (0 / -10000) in place of the 0/1 one reproduces the published model's quirk
    (real words' queries zeroed); see ``LanguageFusion``.

    Args:
        word_dim: D, width of the words (queries and output).
        pixel_dim: C, channels of the pixels (keys and values).
    """

    def __init__(self, word_dim: int, pixel_dim: int) -> None:
        super().__init__()
        self.f_query = nn.Sequential(Pointwise1d(word_dim, word_dim))
        self.f_key = nn.Sequential(Pointwise1d(pixel_dim, word_dim), TokenInstanceNorm())  # over pixels
        self.f_value = nn.Sequential(Pointwise1d(pixel_dim, word_dim), TokenInstanceNorm())
        self.W = nn.Sequential(Pointwise1d(word_dim, word_dim), TokenInstanceNorm())

    def forward(self, words: Tensor, pixels: Tensor, word_mask: Tensor) -> Tensor:
        """words [B, L, D], pixels [B, N, C], word_mask [B, L] float -> [B, L, D]."""
        query = self.f_query(words) * word_mask.unsqueeze(-1).to(words.dtype)  # [B, L, D]
        key = self.f_key(pixels).to(query.dtype)  # [B, N, D]
        value = self.f_value(pixels).to(query.dtype)  # [B, N, D]
        # Row bias of each query word: 0 for real words, PADDING_BIAS (or, in the quirk, a huge
        # multiple of it) for padded ones. Softmax runs over pixels, so it only matters through
        # float32 rounding, which the quirk mode must reproduce.
        bias = (-PADDING_BIAS * word_mask.float() + PADDING_BIAS)[:, None, :, None]  # [B, 1, L, 1]
        out = F.scaled_dot_product_attention(
            query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), bias.to(query.dtype)
        )  # [B, 1, L, D]
        return self.W(out.squeeze(1))  # [B, L, D]


class LanguageFusion(nn.Module):
    """Language-side PWAM: the words' multimodal residual from the stage's pixels.

    Args:
        word_dim: D, width of the words.
        pixel_dim: C, channels of the stage's pixels.
        dropout: dropout after the two projections.
    """

    def __init__(self, word_dim: int, pixel_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.vis_project = nn.Sequential(nn.Linear(word_dim, word_dim), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = WordPixelAttention(word_dim, pixel_dim)
        self.project_mm = nn.Sequential(Pointwise1d(word_dim, word_dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, words: Tensor, pixels: Tensor, word_mask: Tensor) -> Tensor:
        """words [B, L, D], pixels [B, N, C], word_mask [B, L] (0/1; additive in quirk mode) -> [B, L, D]."""
        return self.project_mm(self.vis_project(words) * self.image_lang_att(words, pixels, word_mask))


class ChannelsLastPool(nn.AdaptiveAvgPool2d):
    """Adaptive average pooling of [B, C, H, W] to [B, s, s, C] (channels-last for what follows)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).permute(0, 2, 3, 1)


def pyramid_branch(dim: int, pool_size: int) -> nn.Sequential:
    """Pool to s x s, then 1x1 convs C -> 4C (LayerNorm) -> C (GELU) -> C/4: one CAM branch."""
    return nn.Sequential(
        ChannelsLastPool(pool_size),  # [B, C, H, W] -> [B, s, s, C]
        Pointwise2d(dim, 4 * dim, bias=False),
        nn.LayerNorm(4 * dim, eps=1e-6),  # the reference's channels-first LayerNorm
        Pointwise2d(4 * dim, dim, bias=False),
        nn.GELU(),
        Pointwise2d(dim, dim // 4, bias=False),  # -> [B, s, s, C/4]
    )


class CrossModalAlignment(nn.Module):
    """CAM (MagNet): the words read at several pooled scales, mixed with the stage's residual.

    Each pyramid branch pools the stage's pixels to s x s, projects them to C/4, fuses them with
    the words through its own PWAM and upsamples back (bilinear, align_corners=True as the
    reference); the branches (n x C/4) are concatenated with the full-resolution multimodal
    residual (C) and mixed back to C. The output is what the decoder sees at this stage.

    Args:
        dim: C, channels of the stage (divisible by 4).
        word_dim: D, width of the words.
        pool_sizes: pyramid pooling sizes (1, 2, 3, 6 in the paper).
    """

    def __init__(self, dim: int, word_dim: int, pool_sizes: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"CrossModalAlignment: stage channels {dim} must be divisible by 4")
        self.pyramids = nn.ModuleList(pyramid_branch(dim, size) for size in pool_sizes)
        self.fusions = nn.ModuleList(PWAM(dim // 4, word_dim) for _ in pool_sizes)
        self.mixer = nn.Sequential(
            nn.Linear(dim + len(pool_sizes) * (dim // 4), dim),
            nn.LayerNorm(dim),
            nn.Linear(dim, dim),
            nn.GELU(),
        )

    def forward(self, x: Tensor, residual: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        """x, residual [B, H, W, C] (stage pixels, multimodal residual), words [B, L, D] -> [B, H, W, C]."""
        height, width = x.shape[1:3]
        grid = x.permute(0, 3, 1, 2)  # [B, C, H, W]
        branches = []
        for pyramid, fusion in zip(self.pyramids, self.fusions, strict=True):
            pooled = pyramid(grid)  # [B, s, s, C/4]
            fused = fusion(pooled.flatten(1, 2), words, word_mask).view(pooled.shape)  # [B, s, s, C/4]
            up = F.interpolate(
                fused.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=True
            )
            branches.append(up.permute(0, 2, 3, 1))  # [B, C/4, H, W] -> [B, H, W, C/4]
        branches.append(residual)  # after the pooled branches, as the reference concatenates
        return self.mixer(torch.cat(branches, dim=-1))  # [B, H, W, C + n*C/4] -> [B, H, W, C]

"""MagNet's training losses: segmentation (BCE + Dice, deep supervision), the cross-modal
alignment loss (CAL) and their combination with Mask Grounding (MG). The criterion that owns the
training-only heads lives with the model (magnet.models.criterion).

    L = seg + lambda_mg * MG + lambda_cal * CAL
    seg = sum over masks m of w_m * (bce_weight * BCE_m + dice_weight * Dice_m),
          w = 1 for the final mask and aux_weight for each auxiliary mask (Mask2Former sums them).

The segmentation terms are computed at the logits' own resolution (1/4 of the input for the
Mask2Former-style decoder), as Mask2Former does, with the target area-downsampled to it: each
target cell holds the fraction of its pixels inside the object (exactly 0/1 where the object's
edge falls on the grid). That is 16x cheaper than upsampling logits to the input size, and
keeps thin objects that nearest-neighbour subsampling would drop.

Every score that goes through an exponential is computed in float32 with autocast off, so bf16
training gives the same losses. Disabled parts are zero tensors and touch no parameters.

Legend: B batch, h x w logit grid, H x W target size, N pixels of a feature map (h*w), K sampled
pixels per image, C pixel feature channels, D_t text width, E embed_dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magnet.config import AlignmentLossConfig, LossConfig

LOSS_KEYS = ("loss", "bce", "dice", "seg", "mg", "cal")
"""Keys of the loss dict the model's forward returns (DEVELOPERS.md, model contract)."""


# ------------------------------------------------------------------------------- segmentation
def resize_target(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Target [B, H, W] (or [B, 1, H, W]) in {0, 1} -> float32 [B, h, w] covered fractions."""
    if target.dim() == 4:
        target = target.squeeze(1)
    target = target.float()
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target.unsqueeze(1), size=size, mode="area").squeeze(1)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice on sigmoid probabilities, averaged over the batch.

    Per sample: 1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth); ``smooth`` (1, as in
    Mask2Former) makes an empty target with an empty prediction cost 0 instead of 0/0.

    Args:
        logits: [B, h, w] mask logits.
        target: [B, h, w] targets in [0, 1], same size.
    """
    prob = logits.float().sigmoid().flatten(1)  # [B, h*w]
    target = target.float().flatten(1)
    numerator = 2 * (prob * target).sum(1) + smooth
    denominator = prob.sum(1) + target.sum(1) + smooth
    return (1 - numerator / denominator).mean()


def segmentation_loss(
    mask_logits: Tensor, aux_mask_logits: Sequence[Tensor], target: Tensor, cfg: LossConfig
) -> dict[str, Tensor]:
    """BCE + Dice on the final mask and on every auxiliary mask (deep supervision).

    Args:
        mask_logits: [B, 1, h, w] (or [B, h, w]) final mask logits.
        aux_mask_logits: auxiliary logits, each [B, 1, h', w'] (any grid); may be empty.
        target: [B, H, W] ground-truth mask in {0, 1}, any size (area-resized to each grid).
        cfg: the weights.

    Returns:
        ``bce`` and ``dice`` (each summed over the masks, aux ones weighted by aux_weight) and
        ``seg = bce_weight * bce + dice_weight * dice``; float32 scalars.
    """
    predictions = [(mask_logits, 1.0)] + [(aux, cfg.aux_weight) for aux in aux_mask_logits]
    targets: dict[tuple[int, int], Tensor] = {}
    bce = dice = torch.zeros((), device=mask_logits.device)
    with torch.autocast(device_type=mask_logits.device.type, enabled=False):
        for logits, weight in predictions:
            logits = logits.float().squeeze(1) if logits.dim() == 4 else logits.float()  # [B, h, w]
            size = tuple(logits.shape[-2:])
            if size not in targets:
                targets[size] = resize_target(target, size)
            bce = bce + weight * F.binary_cross_entropy_with_logits(logits, targets[size])
            dice = dice + weight * dice_loss(logits, targets[size])
    return {"bce": bce, "dice": dice, "seg": cfg.bce_weight * bce + cfg.dice_weight * dice}


# ---------------------------------------------------------------------------------------- CAL
def mean_pool(text_features: Tensor, attention_mask: Tensor) -> Tensor:
    """Sentence embedding: mean of [B, L, D] over real tokens -> [B, D]."""
    weights = attention_mask.to(text_features.dtype).unsqueeze(-1)  # [B, L, 1]
    return (text_features * weights).sum(1) / weights.sum(1).clamp(min=1)


def _projection_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class CrossModalAlignmentLoss(nn.Module):
    """Contrastive alignment of pixel features with the sentence (CAL).

    Pixels and sentences meet in one space, L2-normalised; scores are cosine similarities over
    ``temperature``. Which pixels and how they get there is ``cfg.pixel_features``:

    - ``mask_features`` (default): the decoder's mask features as they are, and the sentence
      through ONE Linear to their width. This is where the published checkpoint puts it: it holds
      ``lang_proj`` (Linear 768 -> 256, the decoder's width) and no pixel-side projection, so the
      authors aligned the 256-wide mask features with linearly projected language; an imported
      ``lang_proj`` seeds ``text_proj`` (magnet.weights).
    - ``cam_stage1``: the stage-1 CAM output (C_0 wide), pixels and sentence each through a
      two-layer MLP into ``embed_dim``.

    Pixel-to-text: each foreground pixel of image i must pick its own sentence i (InfoNCE). Its
    negatives (``cfg.negatives``) are the other sentences of the batch scored against that pixel,
    and with ``sentences_and_background`` also sentence i scored against every background pixel of
    image i. The second set keeps the term alive for a batch of one and teaches the sentence where
    its object is not, but its thousands of terms (up to 14.4k at 120 x 120, against B - 1
    sentences) then dominate the denominator. With no negative at all (``sentences`` and a
    batch of one) the term is 0.

    Pixel-to-pixel (supervised-contrastive, per image): up to ``max_pixels`` pixels are sampled,
    half from the foreground and half from the background; each sampled foreground pixel is
    pulled towards the other sampled foreground pixels and pushed from the sampled background
    pixels. Images with fewer than two foreground or with no background pixels contribute
    nothing.

    Both terms average over their anchors across the batch; with no anchor at all (empty masks)
    they are 0 with a graph, never NaN.
    """

    def __init__(self, pixel_dim: int, text_dim: int, cfg: AlignmentLossConfig) -> None:
        """Args:
        pixel_dim: channels C of the pixel features handed in.
        text_dim: width D_t of the language features handed in.
        cfg: pixel source, negatives, embed_dim, temperature, term weights and max_pixels.
        """
        super().__init__()
        self.cfg = cfg
        if cfg.pixel_features == "mask_features":
            self.pixel_proj: nn.Module = nn.Identity()
            self.text_proj: nn.Module = nn.Linear(text_dim, pixel_dim)
        else:
            self.pixel_proj = _projection_mlp(pixel_dim, cfg.embed_dim)
            self.text_proj = _projection_mlp(text_dim, cfg.embed_dim)

    def forward(
        self,
        pixel_features: Tensor,
        text_features: Tensor,
        attention_mask: Tensor,
        target_mask: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Args:
        pixel_features: [B, C, h, w] pixel features (see ``cfg.pixel_features``).
        text_features: [B, L, D_t] language features (mean-pooled over real tokens).
        attention_mask: [B, L], 1 on real tokens.
        target_mask: [B, H, W] ground truth in {0, 1}, any size (area-resized, >= 0.5 is fg).
        generator: optional generator for the pixel sampling.

        Returns:
            ``cal`` (the weighted sum), ``p2t`` and ``p2p``: float32 scalars.
        """
        h, w = pixel_features.shape[-2:]
        pixels = self.pixel_proj(pixel_features.flatten(2).transpose(1, 2))  # [B, N, E]
        sentences = self.text_proj(mean_pool(text_features, attention_mask))  # [B, E]
        foreground = resize_target(target_mask, (h, w)).flatten(1) >= 0.5  # [B, N]
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            pixels = F.normalize(pixels.float(), dim=-1)
            sentences = F.normalize(sentences.float(), dim=-1)
            p2t = self._pixel_to_text(pixels, sentences, foreground)
            p2p = self._pixel_to_pixel(pixels, foreground, generator)
        cal = self.cfg.pixel_to_text_weight * p2t + self.cfg.pixel_to_pixel_weight * p2p
        return {"cal": cal, "p2t": p2t, "p2p": p2p}

    def _pixel_to_text(self, pixels: Tensor, sentences: Tensor, foreground: Tensor) -> Tensor:
        batch = pixels.shape[0]
        lowest = torch.finfo(pixels.dtype).min  # finite "minus infinity": no NaN in gradients
        scores = torch.einsum("bne,ke->bnk", pixels, sentences) / self.cfg.temperature  # [B, N, B]
        own = scores.diagonal(dim1=0, dim2=2).transpose(0, 1)  # [B, N]: pixel of image b vs sentence b
        same = torch.eye(batch, dtype=torch.bool, device=scores.device)[:, None, :]  # [B, 1, B]
        other_sentences = scores.masked_fill(same, lowest).logsumexp(-1)  # [B, N]
        denominator = torch.logaddexp(own, other_sentences)  # [B, N]
        if self.cfg.negatives == "sentences_and_background":
            background = own.masked_fill(foreground, lowest).logsumexp(-1, keepdim=True)  # [B, 1]
            denominator = torch.logaddexp(denominator, background)
        nll = denominator - own  # [B, N]
        return (nll * foreground).sum() / foreground.sum().clamp(min=1)

    def _pixel_to_pixel(
        self, pixels: Tensor, foreground: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        num_pixels = pixels.shape[1]
        lowest = torch.finfo(pixels.dtype).min
        half = min(max(self.cfg.max_pixels // 2, 1), num_pixels)
        # Random priorities; topk over "foreground first" / "background first" picks a random
        # subset of each, and ``valid`` says which picks really are of the wanted kind.
        priority = torch.rand(pixels.shape[:2], generator=generator, device=pixels.device)  # [B, N]
        fg_idx = priority.masked_fill(~foreground, -1).topk(half, dim=1).indices  # [B, K/2]
        bg_idx = priority.masked_fill(foreground, -1).topk(half, dim=1).indices  # [B, K/2]
        index = torch.cat([fg_idx, bg_idx], dim=1)  # [B, K]
        is_fg = torch.gather(foreground, 1, index)  # [B, K]
        valid = torch.cat([is_fg[:, :half], ~is_fg[:, half:]], dim=1)  # [B, K]
        is_fg = is_fg & valid
        is_bg = ~is_fg & valid
        sampled = torch.gather(pixels, 1, index.unsqueeze(-1).expand(-1, -1, pixels.shape[-1]))  # [B, K, E]
        scores = sampled @ sampled.transpose(1, 2) / self.cfg.temperature  # [B, K, K]
        not_self = ~torch.eye(index.shape[1], dtype=torch.bool, device=pixels.device)  # [K, K]
        positive = is_fg[:, :, None] & is_fg[:, None, :] & not_self  # [B, K, K]
        contrast = (is_fg[:, None, :] | is_bg[:, None, :]) & not_self  # [B, K, K]: anchor's denominator
        log_prob = scores - scores.masked_fill(~contrast, lowest).logsumexp(-1, keepdim=True)  # [B, K, K]
        num_positive = positive.sum(-1)  # [B, K]
        anchor = is_fg & (num_positive > 0) & is_bg.any(1, keepdim=True)  # [B, K]
        per_anchor = -(log_prob * positive).sum(-1) / num_positive.clamp(min=1)  # [B, K]
        return (per_anchor * anchor).sum() / anchor.sum().clamp(min=1)


# ------------------------------------------------------------------------------------ combined
def total_loss(
    seg: dict[str, Tensor], mg: Tensor | None, cal: Tensor | None, cfg: LossConfig
) -> dict[str, Tensor]:
    """Combine the parts: ``loss = seg + lambda_mg * mg + lambda_cal * cal``.

    ``seg`` is ``segmentation_loss``'s dict; ``mg`` / ``cal`` are scalars or None for a disabled
    part (reported as a zero tensor). Returns exactly the keys of ``LOSS_KEYS``.
    """
    zero = torch.zeros((), device=seg["seg"].device)
    mg = zero if mg is None else mg
    cal = zero if cal is None else cal
    return {
        "loss": seg["seg"] + cfg.lambda_mg * mg + cfg.lambda_cal * cal,
        "bce": seg["bce"],
        "dice": seg["dice"],
        "seg": seg["seg"],
        "mg": mg,
        "cal": cal,
    }

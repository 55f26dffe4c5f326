"""MagNet's training criterion: the losses of magnet.losses put together, and the home of the
training-only heads (Mask Grounding, CAL's projections) that the model keeps as ``criterion``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from magnet.config import AlignmentLossConfig, LossConfig, MaskGroundingConfig
from magnet.losses import CrossModalAlignmentLoss, segmentation_loss, total_loss
from magnet.models.mask_grounding import MaskGroundingHead


@dataclass
class MaskGroundingInputs:
    """What the model hands the criterion for Mask Grounding (shapes: ``MaskGroundingHead``).

    Every input is a function of the masked expression, the image and the ground-truth mask only:
    features of a fused pass on the original words would carry the masked words' identity.
    """

    text_features: Tensor  # [B, L, D_t] language features of the masked expression
    attention_mask: Tensor  # [B, L]
    visual_features: Tensor  # [B, C_mg, h, w] image features of the same pass on the masked expression
    labels: Tensor  # [B, L] from mask_tokens
    word_embeddings: Tensor  # [V, D_w] the text encoder's word-embedding weight


@dataclass
class AlignmentInputs:
    """What the model hands the criterion for CAL (shapes: ``CrossModalAlignmentLoss``)."""

    pixel_features: Tensor  # [B, C_cal, h, w]
    text_features: Tensor  # [B, L, D_t]
    attention_mask: Tensor  # [B, L]


class MagNetCriterion(nn.Module):
    """All of MagNet's training objective, and the home of its training-only parameters.

    Holds the Mask Grounding head (``mask_grounding``) and the CAL projections (``alignment``)
    when their switches are on, so a model that keeps this module as ``criterion`` drops every
    training-only weight by dropping ``criterion.*`` from inference checkpoints.
    """

    def __init__(
        self,
        loss_cfg: LossConfig,
        mg_cfg: MaskGroundingConfig,
        cal_cfg: AlignmentLossConfig,
        *,
        text_dim: int,
        word_embeddings: nn.Embedding,
        mg_visual_dim: int,
        cal_pixel_dim: int,
    ) -> None:
        """Args:
        loss_cfg: weights of the parts.
        mg_cfg: Mask Grounding (``enabled`` False builds no head).
        cal_cfg: the alignment loss (``enabled`` False builds no projections).
        text_dim: width D_t of the language features handed to MG and CAL.
        word_embeddings: the text encoder's word embeddings (only their shape is read here;
            the weight itself is passed at each call, see ``MaskGroundingInputs``).
        mg_visual_dim: channels of the visual features handed to MG.
        cal_pixel_dim: channels of the pixel features handed to CAL.
        """
        super().__init__()
        self.loss_cfg = loss_cfg
        self.mask_grounding = (
            MaskGroundingHead.from_config(mg_cfg, text_dim, mg_visual_dim, word_embeddings)
            if mg_cfg.enabled
            else None
        )
        self.alignment = (
            CrossModalAlignmentLoss(cal_pixel_dim, text_dim, cal_cfg) if cal_cfg.enabled else None
        )

    def forward(
        self,
        mask_logits: Tensor,
        aux_mask_logits: Sequence[Tensor],
        target_mask: Tensor,
        mg: MaskGroundingInputs | None = None,
        cal: AlignmentInputs | None = None,
    ) -> dict[str, Tensor]:
        """Args:
        mask_logits: [B, 1, h, w] final mask logits.
        aux_mask_logits: auxiliary mask logits, each [B, 1, h', w'].
        target_mask: [B, H, W] ground truth in {0, 1}.
        mg: Mask Grounding inputs; required when MG is enabled and the module is training,
            ignored otherwise (MG runs only in training).
        cal: CAL inputs; required whenever CAL is enabled.

        Returns:
            ``loss``, ``bce``, ``dice``, ``seg``, ``mg``, ``cal`` (float32 scalars).
        """
        seg = segmentation_loss(mask_logits, aux_mask_logits, target_mask, self.loss_cfg)
        mg_loss = cal_loss = None
        if self.mask_grounding is not None and self.training:
            if mg is None:
                raise ValueError(
                    "MagNetCriterion: Mask Grounding is enabled but no MaskGroundingInputs given"
                )
            mg_loss = self.mask_grounding(
                mg.text_features,
                mg.attention_mask,
                mg.visual_features,
                target_mask,
                mg.labels,
                mg.word_embeddings,
            ).loss
        if self.alignment is not None:
            if cal is None:
                raise ValueError(
                    "MagNetCriterion: the alignment loss is enabled but no AlignmentInputs given"
                )
            cal_loss = self.alignment(cal.pixel_features, cal.text_features, cal.attention_mask, target_mask)[
                "cal"
            ]
        return total_loss(seg, mg_loss, cal_loss, self.loss_cfg)

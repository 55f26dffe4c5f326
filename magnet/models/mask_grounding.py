"""Mask Grounding (MagNet, CVPR 2024): a training-only task that recovers masked words.

Some words of the expression are masked BERT-style (``mask_tokens``); a small predictor
(``MaskGroundingHead``) must recover them from three streams: the language features of the
masked expression, the image features, and an encoding of the ground-truth mask of the referred
object. Knowing *where* the object is makes the masked word guessable, so the loss teaches the
language features where in the image each word lives. All three streams must be computed from the
masked expression: MagNet's encoders fuse words into the image side, so image features of a pass
on the original words carry the answer (MagNet.forward runs a fused pass on the masked ids, see
``MaskGroundingConfig.encoder_pass``). Nothing here runs at inference, and the
published checkpoints carry none of it: the model keeps the head under a name of its own
(``mask_grounding``) so its weights are dropped from inference checkpoints.

Legend: B batch, L expression length (ids), D_t text width, C visual channels, h x w visual
grid, H x W ground-truth mask size, G mask_grid, E hidden_dim, V vocabulary size, D_w word
embedding width.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magnet.config import MaskGroundingConfig

IGNORE_INDEX = -100
"""Label of positions that carry no Mask Grounding target (torch's cross-entropy default)."""


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    special_ids: Iterable[int] | Tensor,
    mask_token_id: int,
    vocab_size: int,
    cfg: MaskGroundingConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT-style masking of the real words of a batch of expressions.

    Every real (attended) token that is not special is picked with probability ``cfg.mask_prob``;
    a picked token becomes ``mask_token_id`` with probability ``cfg.replace_mask_prob``, a random
    non-special word with ``cfg.replace_random_prob``, and stays as it is otherwise. [CLS], [SEP],
    padding and every other id in ``special_ids`` are never picked nor drawn as random words.
    A batch where nothing is picked gets labels that are all ``IGNORE_INDEX``; the head's loss
    is then 0 (with a graph), never NaN.

    Args:
        input_ids: [B, L] int64 token ids.
        attention_mask: [B, L], 1 (or True) on real tokens, 0 on padding.
        special_ids: ids never masked nor drawn (the tokenizer's ``all_special_ids``:
            for bert-base-uncased [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103).
        mask_token_id: the [MASK] id.
        vocab_size: size of the vocabulary random words are drawn from.
        cfg: the probabilities.
        generator: optional random generator (on the device of ``input_ids``), for reproducibility.

    Returns:
        ``(masked_ids [B, L] int64, labels [B, L] int64)``: labels hold the original id where a
        token was picked and ``IGNORE_INDEX`` elsewhere.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"mask_tokens: input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be [B, L]"
        )
    device = input_ids.device
    special = torch.as_tensor(list(special_ids) if not isinstance(special_ids, Tensor) else special_ids)
    special = special.to(device=device, dtype=input_ids.dtype)
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask_tokens: mask_token_id {mask_token_id} is outside [0, vocab_size={vocab_size})"
        )
    # Words a random replacement may draw: the vocabulary without the special ids. [V']
    drawable = torch.ones(vocab_size, dtype=torch.bool, device=device)
    drawable[special[(special >= 0) & (special < vocab_size)]] = False
    drawable_ids = drawable.nonzero().squeeze(1)
    if drawable_ids.numel() == 0:
        raise ValueError("mask_tokens: every vocabulary id is special; nothing to draw random words from")

    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)  # [B, L]
    pick_u, split_u = torch.rand((2, *input_ids.shape), generator=generator, device=device)
    picked = candidates & (pick_u < cfg.mask_prob)
    to_mask = picked & (split_u < cfg.replace_mask_prob)
    to_random = picked & ~to_mask & (split_u < cfg.replace_mask_prob + cfg.replace_random_prob)
    draws = torch.randint(
        drawable_ids.numel(), input_ids.shape, generator=generator, device=device
    )  # [B, L] indices into drawable_ids
    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked_ids = torch.where(to_random, drawable_ids[draws], masked_ids)
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked_ids, labels


class MaskEncoder(nn.Module):
    """Ground-truth mask [B, H, W] -> G*G tokens [B, G*G, E].

    The mask is first pooled to a (4G x 4G) map of covered fractions (so any input size works and
    thin objects leave a trace), then two stride-2 convolutions reach the G x G grid.
    """

    def __init__(self, hidden_dim: int, mask_grid: int) -> None:
        """Args:
        hidden_dim: output width E.
        mask_grid: the token grid G (G*G tokens).
        """
        super().__init__()
        self.mask_grid = mask_grid
        mid = max(hidden_dim // 4, 1)
        self.convs = nn.Sequential(
            nn.Conv2d(1, mid, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(mid, hidden_dim, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden_dim, hidden_dim, 1),
        )

    def forward(self, mask: Tensor) -> Tensor:
        grid = 4 * self.mask_grid
        x = F.adaptive_avg_pool2d(mask.unsqueeze(1).to(self.convs[0].weight.dtype), grid)  # [B, 1, 4G, 4G]
        x = self.convs(x)  # [B, E, G, G]
        return x.flatten(2).transpose(1, 2)  # [B, G*G, E]


class MaskGroundingOutput(NamedTuple):
    loss: Tensor
    """Cross-entropy at the masked positions (mean over them), float32 scalar; 0 if none."""
    logits: Tensor
    """[M, V] float32 word logits at the M predicted positions (labels != IGNORE_INDEX), in the
    row-major order of ``labels``: the vocabulary is scored only where a loss is taken."""


class MaskGroundingHead(nn.Module):
    """Predict masked words from [masked language; visual; mask] tokens, with a tied LM head.

    The three streams are projected to E, tagged with a type embedding, and the visual and mask
    tokens share one learned 2-D position table (G x G, resized to the visual grid) so the
    predictor knows which image region each mask token covers. A few pre-norm transformer
    layers (SDPA inside ``nn.TransformerEncoderLayer``) mix them; the language positions are
    then mapped back to the word-embedding width and scored against the word embeddings passed
    in at call time. Passing the embedding matrix (rather than holding it) keeps this head's
    state dict free of the text encoder's weights, so dropping ``mask_grounding.*`` drops
    exactly the training-only parameters, and the tie is the very same tensor.
    """

    def __init__(
        self,
        text_dim: int,
        visual_dim: int,
        word_dim: int,
        vocab_size: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 8,
        mask_grid: int = 8,
        dropout: float = 0.0,
    ) -> None:
        """Args:
        text_dim: width D_t of the language features handed in.
        visual_dim: channels C of the visual features handed in.
        word_dim: width D_w of the word embeddings the LM head is tied to.
        vocab_size: V, rows of the word-embedding matrix (30,522 for bert-base-uncased).
        hidden_dim: predictor width E.
        num_layers: transformer layers of the predictor.
        num_heads: attention heads (must divide hidden_dim).
        mask_grid: the ground-truth mask becomes mask_grid**2 tokens.
        dropout: dropout inside the transformer layers.
        """
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(
                f"MaskGroundingHead: hidden_dim {hidden_dim} not divisible by num_heads {num_heads}"
            )
        self.vocab_size = vocab_size
        self.mask_grid = mask_grid
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.visual_proj = nn.Linear(visual_dim, hidden_dim)
        self.mask_encoder = MaskEncoder(hidden_dim, mask_grid)
        self.type_embed = nn.Parameter(torch.zeros(3, hidden_dim))  # language, visual, mask
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden_dim, mask_grid, mask_grid))
        layer = nn.TransformerEncoderLayer(
            hidden_dim,
            num_heads,
            dim_feedforward=4 * hidden_dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.predictor = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        # BERT's prediction transform (dense, GELU, LayerNorm) then the tied decoder + own bias.
        self.lm_transform = nn.Sequential(nn.Linear(hidden_dim, word_dim), nn.GELU(), nn.LayerNorm(word_dim))
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.trunc_normal_(self.type_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @classmethod
    def from_config(
        cls, cfg: MaskGroundingConfig, text_dim: int, visual_dim: int, word_embeddings: nn.Embedding
    ) -> MaskGroundingHead:
        """Build from the config; widths and vocabulary size are read off ``word_embeddings``."""
        vocab_size, word_dim = word_embeddings.weight.shape
        return cls(
            text_dim,
            visual_dim,
            word_dim,
            vocab_size,
            hidden_dim=cfg.hidden_dim,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            mask_grid=cfg.mask_grid,
        )

    def forward(
        self,
        text_features: Tensor,
        attention_mask: Tensor,
        visual_features: Tensor,
        target_mask: Tensor,
        labels: Tensor,
        word_embeddings: Tensor,
    ) -> MaskGroundingOutput:
        """Args:
        text_features: [B, L, D_t] language features of the MASKED expression.
        attention_mask: [B, L], 1 on real tokens (padding is hidden from the predictor).
        visual_features: [B, C, h, w] image features of a pass on the masked expression (any stage;
            the last one is cheapest).
        target_mask: [B, H, W] ground-truth mask in {0, 1} (any size).
        labels: [B, L] int64 from ``mask_tokens`` (IGNORE_INDEX where nothing is predicted).
        word_embeddings: [V, D_w] the text encoder's word-embedding weight (the tie).
        """
        batch, length, _ = text_features.shape
        if word_embeddings.shape != (self.vocab_size, self.lm_transform[0].out_features):
            raise ValueError(
                f"MaskGroundingHead: word_embeddings {tuple(word_embeddings.shape)} do not match "
                f"(vocab_size, word_dim) = ({self.vocab_size}, {self.lm_transform[0].out_features})"
            )
        if labels.shape != (batch, length) or attention_mask.shape != (batch, length):
            raise ValueError(
                f"MaskGroundingHead: labels {tuple(labels.shape)} and attention_mask "
                f"{tuple(attention_mask.shape)} must match text_features [B, L] = ({batch}, {length})"
            )
        h, w = visual_features.shape[-2:]
        pos_visual = F.interpolate(self.pos_embed, size=(h, w), mode="bilinear", align_corners=False)
        lang = self.text_proj(text_features) + self.type_embed[0]  # [B, L, E]
        vis = self.visual_proj(visual_features.flatten(2).transpose(1, 2))  # [B, h*w, E]
        vis = vis + pos_visual.flatten(2).transpose(1, 2) + self.type_embed[1]
        msk = self.mask_encoder(target_mask)  # [B, G*G, E]
        msk = msk + self.pos_embed.flatten(2).transpose(1, 2) + self.type_embed[2]
        tokens = torch.cat([lang, vis, msk.to(lang.dtype)], dim=1)  # [B, L + h*w + G*G, E]
        image_tokens = tokens.shape[1] - length
        padding = torch.cat(
            [~attention_mask.bool(), attention_mask.new_zeros(batch, image_tokens, dtype=torch.bool)], dim=1
        )  # [B, L + h*w + G*G], True = ignored
        tokens = self.norm(self.predictor(tokens, src_key_padding_mask=padding))
        # Only the M predicted positions reach the vocabulary: scoring every one of the B*L
        # positions against 30k words cost most of the head's time for the same loss.
        predicted = labels != IGNORE_INDEX  # [B, L]
        words = self.lm_transform(tokens[:, :length][predicted])  # [M, D_w]
        # Word scores in float32: 30k-way softmax under bf16 loses the small logits.
        with torch.autocast(device_type=words.device.type, enabled=False):
            logits = F.linear(words.float(), word_embeddings.float(), self.lm_bias.float())  # [M, V]
            summed = F.cross_entropy(logits, labels[predicted], reduction="sum")
            loss = summed / predicted.sum().clamp(min=1)
        return MaskGroundingOutput(loss=loss, logits=logits)

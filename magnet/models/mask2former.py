"""Mask2Former-style decoder of MagNet: deformable-attention pixel decoder + masked-attention decoder.

After Mask2Former (Cheng et al., CVPR 2022, github.com/facebookresearch/Mask2Former) as MagNet
uses it: all four backbone levels go through the multi-scale deformable-attention encoder (no FPN
lateral branch), ONE learned query, 9 masked-attention layers cycling over strides 32/16/8.
Module and parameter names match the reference checkpoint's ``classifier.*`` keys, so importing
the published weights is a rename of the prefix only.

Deformable attention is plain PyTorch (one ``F.grid_sample`` per level, vectorised over batch,
heads, queries and points), so it runs on CPU and GPU without a compiled extension.

Shape legend: B batch, C hidden width (256), M heads, Dh = C / M, L levels, P sampling points,
S = sum of H_l * W_l (all positions of all levels), Q queries (1), K keys of one level.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magnet.config import DecoderConfig
from magnet.models._decoder import DecoderOutput, check_features

# The masked-attention decoder reads the three lowest-resolution levels (strides 32, 16, 8).
PREDICTOR_LEVELS = 3


# ----------------------------------------------------------------------------- building blocks
def sine_position_encoding(height: int, width: int, dim: int, device: torch.device | None = None) -> Tensor:
    """DETR's normalised sine encoding of an unpadded map, as Mask2Former's PositionEmbeddingSine.

    Returns float32 [dim, height, width]: the first dim/2 channels encode y, the rest x.
    """
    num_feats = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale  # [H]
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale  # [W]
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # [F]

    def encode(coord: Tensor) -> Tensor:  # [N] -> [N, F], sin on even channels, cos on odd ones
        angles = coord[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, num_feats)  # [H, W, F]
    pos_x = encode(x)[None, :, :].expand(height, width, num_feats)  # [H, W, F]
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)  # [dim, H, W]


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinear samples of every level: the core of Deformable DETR's MSDeformAttn.

    Sampling runs in float32 whatever the autocast dtype: a bf16 grid would place samples up to half
    a pixel off on a 120-wide map (Mask2Former also keeps this op in float32).

    Args:
        value: [B, S, M, Dh], the levels' positions concatenated in ``spatial_shapes`` order.
        spatial_shapes: (H_l, W_l) per level.
        sampling_locations: [B, Q, M, L, P, 2], (x, y) in [0, 1] of each level's extent.
        attention_weights: [B, Q, M, L, P], summing to one over (L, P).

    Returns:
        [B, Q, M * Dh] in value's dtype.
    """
    batch, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    values = value.split([h * w for h, w in spatial_shapes], dim=1)  # L x [B, H_l*W_l, M, Dh]
    grids = 2 * sampling_locations.float() - 1  # grid_sample wants [-1, 1]
    out = None
    for level, (height, width) in enumerate(spatial_shapes):
        v = values[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width).float()
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*M, Q, P, 2]
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled: [B*M, Dh, Q, P]
        weights = attention_weights[:, :, :, level].transpose(1, 2).flatten(0, 1)[:, None].float()
        contribution = (sampled * weights).sum(-1)  # [B*M, Dh, Q]
        out = contribution if out is None else out + contribution
    assert out is not None, "at least one level is required"
    out = out.view(batch, heads * head_dim, num_queries).transpose(1, 2)  # [B, Q, M*Dh]
    return out.to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR): each query samples P points per head and level.

    Args:
        dim: model width C.
        num_levels: L feature levels.
        num_heads: M heads; C must divide by M.
        num_points: P sampling points per head and level.
    """

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"deformable attention: width {dim} is not divisible by {num_heads} heads")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: head h starts sampling along direction 2*pi*h/M, point p at p+1 steps."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # [M, 2]
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # onto the unit square's border
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(
            1, self.num_levels, self.num_points, 1
        )  # [M, L, P, 2]
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """query [B, Q, C], reference_points [B|1, Q, 2] (x, y in [0, 1]), value_input [B, S, C].

        Returns [B, Q, C].
        """
        batch, num_queries, dim = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(batch, -1, heads, dim // heads)  # [B, S, M, Dh]
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # offsets are in pixels of each level: normalise by that level's (W, H)
        normalizer = torch.tensor(
            [(w, h) for h, w in spatial_shapes], dtype=torch.float32, device=query.device
        )
        locations = (
            reference_points[:, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )  # [B, Q, M, L, P, 2]
        out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Mask2Former's MSDeformAttnTransformerEncoderLayer: deformable self-attention + FFN, post-norm.

    Args:
        dim: model width C.
        ffn_dim: hidden width of the feed-forward block.
        num_levels: L feature levels.
        num_heads: attention heads.
        num_points: sampling points per head and level.
    """

    def __init__(self, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """src [B, S, C], pos [1, S, C] -> [B, S, C]."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    """A stack of deformable encoder layers (the reference's ``transformer.encoder``)."""

    def __init__(self, layers: list[DeformableEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """Centre of every position of every level, (x, y) in [0, 1]: [1, S, 2] (no padding, so one per batch)."""
    points = []
    for height, width in spatial_shapes:
        ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
        points.append(torch.stack((grid_x.flatten(), grid_y.flatten()), -1))  # [H*W, 2]
    return torch.cat(points, 0)[None]


class DeformableTransformer(nn.Module):
    """Mask2Former's MSDeformAttnTransformerEncoderOnly: level embeddings + the deformable encoder.

    Args:
        dim: model width C.
        num_layers: encoder layers.
        ffn_dim: hidden width of each layer's feed-forward block.
        num_levels: L feature levels.
        num_heads: attention heads.
        num_points: sampling points per head and level.
    """

    def __init__(
        self, dim: int, num_layers: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int
    ) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        self.encoder = DeformableEncoder(
            [
                DeformableEncoderLayer(dim, ffn_dim, num_levels, num_heads, num_points)
                for _ in range(num_layers)
            ]
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier for every matrix, then Deformable DETR's own init of the attention, as the reference."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], pos: list[Tensor]) -> Tensor:
        """srcs L x [B, C, H_l, W_l]; pos L x [C, H_l, W_l] -> encoded [B, S, C] in level order."""
        spatial_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, C]
        level_pos = torch.cat(
            [p.flatten(1).transpose(0, 1) + self.level_embed[lvl] for lvl, p in enumerate(pos)], 0
        )[None].to(src.dtype)  # [1, S, C]
        reference_points = encoder_reference_points(spatial_shapes, src.device)
        return self.encoder(src, level_pos, reference_points, spatial_shapes)


class PixelDecoder(nn.Module):
    """Projects the four levels to C, mixes them with deformable attention, and makes the mask features.

    Level order inside is the reference's: stride 32 first (``input_proj.0`` takes the deepest level).

    Args:
        in_channels: channels of the levels at strides 4, 8, 16, 32.
        dim: hidden width C (also the mask features' width).
        num_layers: deformable encoder layers.
        ffn_dim: encoder feed-forward width.
        num_heads: attention heads.
        num_points: sampling points per head and level.
    """

    def __init__(
        self,
        in_channels: tuple[int, int, int, int],
        dim: int,
        num_layers: int,
        ffn_dim: int,
        num_heads: int,
        num_points: int,
    ) -> None:
        super().__init__()
        if dim % 32:
            raise ValueError(f"pixel decoder: hidden width {dim} must be a multiple of 32 (GroupNorm 32)")
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim)) for c in in_channels[::-1]
        )
        self.transformer = DeformableTransformer(
            dim, num_layers, ffn_dim, len(in_channels), num_heads, num_points
        )
        self.mask_features = nn.Conv2d(dim, dim, kernel_size=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)  # detectron2's c2_xavier_fill
        nn.init.zeros_(self.mask_features.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """features at strides 4..32 -> (mask features [B, C, H/4, W/4], encoded maps at strides 32/16/8)."""
        srcs = [proj(f) for proj, f in zip(self.input_proj, features[::-1], strict=True)]  # strides 32..4
        dim = srcs[0].shape[1]
        pos = [sine_position_encoding(s.shape[-2], s.shape[-1], dim, s.device) for s in srcs]
        memory = self.transformer(srcs, pos)  # [B, S, C]
        maps = [
            chunk.transpose(1, 2).reshape(s.shape)  # [B, H_l*W_l, C] -> [B, C, H_l, W_l]
            for chunk, s in zip(memory.split([s.shape[-2] * s.shape[-1] for s in srcs], 1), srcs, strict=True)
        ]
        return self.mask_features(maps[-1]), maps[:PREDICTOR_LEVELS]


class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    Parameters are named and shaped like ``nn.MultiheadAttention``'s (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``) so Mask2Former checkpoints load unchanged; batch comes first.

    Args:
        dim: model width C.
        num_heads: M heads; C must divide by M.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attend: Tensor | None = None) -> Tensor:
        """query [B, Q, C], key/value [B, K, C], attend bool [B, Q, K] (True = may attend) -> [B, Q, C]."""
        batch, num_queries, dim = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: Tensor) -> Tensor:  # [B, N, C] -> [B, M, N, Dh]
            return x.view(batch, x.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)

        q = heads(F.linear(query, w_q, b_q))
        k = heads(F.linear(key, w_k, b_k))
        v = heads(F.linear(value, w_v, b_v))
        mask = None if attend is None else attend[:, None]  # [B, 1, Q, K], same for every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, M, Q, Dh]
        return self.out_proj(out.transpose(1, 2).reshape(batch, num_queries, dim))


def _xavier_matrices(module: nn.Module) -> None:
    """Mask2Former's decoder-layer init: Xavier for every matrix."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries, post-norm (Mask2Former's SelfAttentionLayer)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, x: Tensor, query_pos: Tensor) -> Tensor:
        """x [B, Q, C], query_pos [B, Q, C] -> [B, Q, C]."""
        q = k = x + query_pos
        return self.norm(x + self.self_attn(q, k, x))


class CrossAttentionLayer(nn.Module):
    """Masked cross-attention from the queries to one level's pixels, post-norm (Mask2Former's)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.multihead_attn = Attention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, x: Tensor, memory: Tensor, blocked: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """x [B, Q, C], memory [B, K, C], blocked bool [B, Q, K], pos [1, K, C] -> [B, Q, C].

        A query blocked from every pixel is unblocked everywhere (Mask2Former's rule), so an empty
        predicted mask never yields an all-masked softmax (NaN).
        """
        attend = ~(blocked & ~blocked.all(-1, keepdim=True))
        return self.norm(x + self.multihead_attn(x + query_pos, memory + pos, memory, attend))


class FFNLayer(nn.Module):
    """Feed-forward block, post-norm (Mask2Former's FFNLayer)."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (Mask2Former's mask_embed)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's MultiScaleMaskedTransformerDecoder with learned queries (the reference's ``predictor``).

    Each layer: masked cross-attention to one level (strides 32, 16, 8 in turn) -> self-attention
    -> FFN; after the initial query and after every layer the heads predict a mask, whose
    bilinearly resized ``sigmoid < mask_threshold`` region is what the next layer may NOT attend.

    Args:
        dim: width C of queries and pixel features.
        num_heads: attention heads.
        ffn_dim: feed-forward width.
        num_layers: decoder layers.
        num_queries: learned queries (MagNet: 1).
        mask_threshold: probability below which a pixel is hidden from the next cross-attention.
        num_classes: object classes of the class head (a "no object" logit is added).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        num_queries: int,
        mask_threshold: float,
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        self.mask_threshold = mask_threshold
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(dim, num_heads) for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(dim, num_heads) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(dim, ffn_dim) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(PREDICTOR_LEVELS, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = MLP(dim, dim, dim, 3)

    def _prediction_heads(
        self, queries: Tensor, mask_features: Tensor, attn_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """queries [B, Q, C] -> class logits [B, Q, 2], mask logits [B, Q, H/4, W/4], blocked [B, Q, h*w]."""
        decoded = self.decoder_norm(queries)
        class_logits = self.class_embed(decoded)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        small = F.interpolate(mask_logits, size=attn_size, mode="bilinear", align_corners=False)
        blocked = (small.sigmoid().flatten(2) < self.mask_threshold).detach()  # [B, Q, h*w]
        return class_logits, mask_logits, blocked

    def forward(self, levels: list[Tensor], mask_features: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """levels: 3 x [B, C, h, w] at strides 32, 16, 8; mask_features [B, C, H/4, W/4].

        Returns (mask logits, class logits) per prediction: the initial query's, then one per layer.
        """
        batch, dim = mask_features.shape[:2]
        sizes = [(x.shape[-2], x.shape[-1]) for x in levels]
        memories = [
            x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl] for lvl, x in enumerate(levels)
        ]  # [B, h*w, C] each
        positions = [
            sine_position_encoding(h, w, dim, x.device).flatten(1).transpose(0, 1)[None].to(x.dtype)
            for (h, w), x in zip(sizes, levels, strict=True)
        ]  # [1, h*w, C] each
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)  # [B, Q, C]
        queries = self.query_feat.weight[None].expand(batch, -1, -1)  # [B, Q, C]

        class_logits, mask_logits, blocked = self._prediction_heads(queries, mask_features, sizes[0])
        masks, classes = [mask_logits], [class_logits]
        for i, (cross, self_attn, ffn) in enumerate(
            zip(
                self.transformer_cross_attention_layers,
                self.transformer_self_attention_layers,
                self.transformer_ffn_layers,
                strict=True,
            )
        ):
            lvl = i % PREDICTOR_LEVELS
            queries = cross(queries, memories[lvl], blocked, positions[lvl], query_pos)
            queries = ffn(self_attn(queries, query_pos))
            next_size = sizes[(i + 1) % PREDICTOR_LEVELS]
            class_logits, mask_logits, blocked = self._prediction_heads(queries, mask_features, next_size)
            masks.append(mask_logits)
            classes.append(class_logits)
        return masks, classes


# -------------------------------------------------------------------------------- main class
class Mask2FormerDecoder(nn.Module):
    """MagNet's decoder: ``pixel_decoder`` (deformable attention) + ``predictor`` (masked attention).

    Output: the last layer's mask as ``mask_logits``; ``aux_mask_logits`` holds the decoder_layers
    earlier predictions, as Mask2Former's ``aux_outputs``: index 0 from the initial learned query
    (before any layer), index i from layer i (1-based), so the final layer's mask is not repeated.

    Args:
        in_channels: channels of the four input levels, strides 4, 8, 16, 32 (Swin-B: 128..1024).
        cfg: the decoder section of the config.
    """

    def __init__(self, in_channels: tuple[int, int, int, int], cfg: DecoderConfig) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"Mask2FormerDecoder: expected 4 input levels, got in_channels={in_channels}")
        self.in_channels = tuple(in_channels)
        self.mask_feature_dim = cfg.hidden_dim
        self.pixel_decoder = PixelDecoder(
            in_channels,
            cfg.hidden_dim,
            cfg.pixel_decoder_layers,
            cfg.pixel_decoder_ffn_dim,
            cfg.num_heads,
            cfg.deform_points,
        )
        self.predictor = MaskedAttentionDecoder(
            cfg.hidden_dim,
            cfg.num_heads,
            cfg.decoder_ffn_dim,
            cfg.decoder_layers,
            cfg.num_queries,
            cfg.mask_threshold,
        )

    def forward(self, features: list[Tensor]) -> DecoderOutput:
        """features: 4 maps [B, C_l, H/s, W/s] at strides s = 4, 8, 16, 32 -> DecoderOutput at 1/4."""
        check_features(features, self.in_channels, type(self).__name__)
        mask_features, levels = self.pixel_decoder(features)
        masks, classes = self.predictor(levels, mask_features)
        return DecoderOutput(
            mask_logits=masks[-1],
            mask_features=mask_features,
            aux_mask_logits=masks[:-1],
            class_logits=classes[-1],
        )

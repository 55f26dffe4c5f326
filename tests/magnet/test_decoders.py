"""MagNet's mask decoders: shapes, deformable attention vs a loop, masked attention, dtypes, gradients,
and the paper-size Mask2Former decoder's parameters against the published checkpoint's inventory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from magnet.config import DecoderConfig
from magnet.models.decoders import DECODERS, build_decoder
from magnet.models.lavt_decoder import LAVTDecoder
from magnet.models.mask2former import (
    CrossAttentionLayer,
    Mask2FormerDecoder,
    MSDeformAttn,
    multi_scale_deformable_attention,
)

TINY_CHANNELS = (8, 16, 24, 32)
PAPER_CHANNELS = (128, 256, 512, 1024)
# Sum of the shapes of the 258 `classifier.*` tensors in the reference checkpoint's inventory.
OFFICIAL_CLASSIFIER_NUMEL = 17_997_314
INVENTORY = Path(__file__).resolve().parents[2].parent / "shared/reference/official_magnet_state_dict.json"


def tiny_cfg(kind: str = "mask2former") -> DecoderConfig:
    return DecoderConfig(
        kind=kind,
        hidden_dim=32,
        num_heads=4,
        pixel_decoder_layers=2,
        pixel_decoder_ffn_dim=64,
        decoder_layers=4,
        decoder_ffn_dim=64,
        lavt_hidden_dim=16,
    )


def features(
    batch: int, height: int, width: int, channels: tuple[int, ...] = TINY_CHANNELS
) -> list[torch.Tensor]:
    """Random backbone maps for an input of height x width, strides 4, 8, 16, 32."""
    return [
        torch.randn(batch, c, math.ceil(height / s), math.ceil(width / s))
        for c, s in zip(channels, (4, 8, 16, 32), strict=True)
    ]


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 96)])
def test_output_shapes_and_aux_count(kind: str, height: int, width: int) -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg(kind)
    decoder = build_decoder(TINY_CHANNELS, cfg)
    out = decoder(features(2, height, width))
    assert out.mask_logits.shape == (2, 1, height // 4, width // 4)
    # the mask features the alignment loss reads: hidden_dim (Mask2Former) or lavt_hidden_dim wide
    assert out.mask_features.shape == (2, decoder.mask_feature_dim, height // 4, width // 4)
    assert all(a.shape == out.mask_logits.shape for a in out.aux_mask_logits)
    if kind == "mask2former":
        assert isinstance(decoder, Mask2FormerDecoder) and decoder.mask_feature_dim == cfg.hidden_dim
        # the initial query's prediction + one per layer except the last (that one is mask_logits)
        assert len(out.aux_mask_logits) == cfg.decoder_layers
        assert out.class_logits is not None and out.class_logits.shape == (2, 1, 2)
    elif kind == "lavt":
        assert isinstance(decoder, LAVTDecoder) and decoder.mask_feature_dim == cfg.lavt_hidden_dim
        assert out.aux_mask_logits == []
    assert torch.isfinite(out.mask_logits).all()


def test_wrong_features_are_named() -> None:
    decoder = build_decoder(TINY_CHANNELS, tiny_cfg())
    maps = features(1, 64, 64)
    with pytest.raises(ValueError, match="4 feature maps"):
        decoder(maps[:3])
    with pytest.raises(ValueError, match="channels"):
        decoder(maps[::-1])


def loop_deformable_attention(
    value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """One sample at a time: explicit bilinear interpolation with zero padding (align_corners=False)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, _, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(head_dim, dtype=torch.float64)
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < w and 0 <= yi < h:
                                corner = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                sample += corner * value[b, starts[lvl] + yi * w + xi, m].double()
                        out[b, q, m] += weights[b, q, m, lvl, p].item() * sample
    return out.flatten(2)


def test_deformable_attention_matches_loop() -> None:
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4), (2, 2)]
    batch, queries, heads, head_dim, points = 2, 4, 2, 3, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim)
    # some locations fall outside [0, 1]: zero padding must match too
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes) * points).softmax(-1)
    weights = weights.view(batch, queries, heads, len(shapes), points)
    got = multi_scale_deformable_attention(value, shapes, locations, weights)
    want = loop_deformable_attention(value, shapes, locations, weights)
    assert got.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_sampling_offsets_start_on_directional_grid() -> None:
    attn = MSDeformAttn(dim=32, num_levels=2, num_heads=8, num_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)  # [heads, levels, points, (x, y)]
    assert torch.equal(bias[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))  # head 0: +x
    torch.testing.assert_close(bias[2, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)  # head 2: +y
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([1.0, 1.0]))  # head 1: diagonal, on the square
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()


def test_masked_cross_attention_reads_only_unblocked_pixels() -> None:
    torch.manual_seed(0)
    layer = CrossAttentionLayer(dim=16, num_heads=4)
    keys = 10
    x, query_pos = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    memory, pos = torch.randn(1, keys, 16), torch.randn(1, keys, 16)
    region = torch.zeros(keys, dtype=torch.bool)
    region[[2, 3, 7]] = True
    blocked = ~region[None, None]  # [1, 1, K]: the query may only see the region
    out = layer(x, memory, blocked, pos, query_pos)

    outside = memory.clone()
    outside[:, ~region] = torch.randn(1, int((~region).sum()), 16)
    torch.testing.assert_close(layer(x, outside, blocked, pos, query_pos), out)
    inside = memory.clone()
    inside[:, region] = torch.randn(1, int(region.sum()), 16)
    assert not torch.allclose(layer(x, inside, blocked, pos, query_pos), out)


def test_fully_blocked_row_attends_everywhere() -> None:
    torch.manual_seed(0)
    layer = CrossAttentionLayer(dim=16, num_heads=4)
    x, query_pos = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    memory, pos = torch.randn(2, 6, 16), torch.randn(1, 6, 16)
    all_blocked = torch.ones(2, 1, 6, dtype=torch.bool)
    out = layer(x, memory, all_blocked, pos, query_pos)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, layer(x, memory, torch.zeros_like(all_blocked), pos, query_pos))


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_bf16_autocast_forward_backward(kind: str) -> None:
    torch.manual_seed(0)
    decoder = build_decoder(TINY_CHANNELS, tiny_cfg(kind))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder(features(2, 64, 96))
        loss = out.mask_logits.float().mean() + sum(a.float().mean() for a in out.aux_mask_logits)
    loss.backward()
    assert out.mask_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.mask_logits.float()).all()


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_gradients_reach_every_parameter(kind: str) -> None:
    torch.manual_seed(0)
    decoder = build_decoder(TINY_CHANNELS, tiny_cfg(kind))
    # Zero-initialised offset and weight projections make the encoder's query (and so its level
    # embedding) gradient exactly zero at step 0; perturb them as one optimiser step would.
    for module in decoder.modules():
        if isinstance(module, MSDeformAttn):
            torch.nn.init.normal_(module.sampling_offsets.weight, std=0.01)
            torch.nn.init.normal_(module.attention_weights.weight, std=0.01)
    out = decoder(features(2, 64, 96))
    loss = out.mask_logits.square().mean() + sum(a.square().mean() for a in out.aux_mask_logits)
    if out.class_logits is not None:  # the class head's only path
        loss = loss + out.class_logits.square().mean()
    loss.backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_paper_size_matches_official_classifier() -> None:
    with torch.device("meta"):
        decoder = Mask2FormerDecoder(PAPER_CHANNELS, DecoderConfig())
    assert sum(p.numel() for p in decoder.parameters()) == OFFICIAL_CLASSIFIER_NUMEL
    if not INVENTORY.exists():
        pytest.skip(f"{INVENTORY} not present: key-by-key comparison skipped (the count was checked)")
    tensors = json.loads(INVENTORY.read_text())["tensors"]
    official = {
        t["key"].removeprefix("classifier."): t["shape"]
        for t in tensors
        if t["key"].startswith("classifier.")
    }
    ours = {k: list(v.shape) for k, v in decoder.state_dict().items()}
    assert ours == official

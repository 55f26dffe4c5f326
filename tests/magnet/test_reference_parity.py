"""Parity of our blocks with the published MagNet's formulas (restated from its released
evaluation code: yxchng/mask-grounding, lib/backbone.py, lib/multimodal_swin.py,
bert/multimodal_bert.py, test.py), at toy widths with random weights, in float32: what loading
the published weights needs to reproduce the reference's outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from magnet.models.fusion import CrossModalAlignment, LanguageFusion
from magnet.models.magnet import MultiModalStage


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def inorm(x: Tensor, dim: int) -> Tensor:
    """InstanceNorm1d (no affine, eps 1e-5) over axis ``dim``."""
    var, mean = torch.var_mean(x, dim=dim, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + 1e-5)


def conv1(x: Tensor, conv: torch.nn.Module) -> Tensor:
    """A 1x1 Conv1d/Conv2d (weight [out, in, 1(, 1)]) on channels-last x [..., in]."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def ref_language_fusion(m: LanguageFusion, words: Tensor, pixels: Tensor, handed_mask: Tensor) -> Tensor:
    """The reference's language-side PWAM; ``handed_mask`` [B, L] is what its caller passes."""
    att = m.image_lang_att
    query = conv1(words, att.f_query[0]) * handed_mask[..., None]  # no norm on the query
    key = inorm(conv1(pixels, att.f_key[0]), dim=1)  # instance norm over the pixels
    value = inorm(conv1(pixels, att.f_value[0]), dim=1)
    sim = (query @ key.transpose(1, 2)) * query.shape[-1] ** -0.5  # [B, L, N]
    sim = sim + (1e4 * handed_mask - 1e4)[..., None]
    out = inorm(conv1(sim.softmax(-1) @ value, att.W[0]), dim=1)  # instance norm over the words
    vis = F.gelu(m.vis_project[0](words))
    return F.gelu(conv1(vis * out, m.project_mm[0]))


def ref_cam(m: CrossModalAlignment, x: Tensor, residual: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
    """x, residual [B, H, W, C] -> mixer(cat(branch_1, ..., branch_n, residual))."""
    b, h, w, _ = x.shape
    grid = x.permute(0, 3, 1, 2)
    branches = []
    for pyramid, fusion in zip(m.pyramids, m.fusions, strict=True):
        pooled = F.adaptive_avg_pool2d(grid, pyramid[0].output_size).permute(0, 2, 3, 1)
        y = conv1(pooled, pyramid[1])
        y = F.layer_norm(y, y.shape[-1:], pyramid[2].weight, pyramid[2].bias, eps=1e-6)
        y = conv1(F.gelu(conv1(y, pyramid[3])), pyramid[5])  # [B, s, s, C/4]
        s = y.shape[1]
        fused = fusion(y.reshape(b, s * s, -1), words, word_mask).reshape(b, s, s, -1)
        up = F.interpolate(fused.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=True)
        branches.append(up.permute(0, 2, 3, 1))
    return m.mixer(torch.cat([*branches, residual], dim=-1))


def inputs(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(2, 20, 32, generator=g)
    pixels = torch.randn(2, 36, 16, generator=g)
    mask = torch.zeros(2, 20)
    mask[0, :7], mask[1, :20] = 1, 1  # one padded expression, one with no padding at all
    return words, pixels, mask


def test_language_fusion_with_the_quirk_matches_the_reference() -> None:
    m = LanguageFusion(32, 16).eval()
    randomise(m)
    words, pixels, mask = inputs()
    handed = (1.0 - mask) * -10000.0  # BERT's additive mask, what the reference hands over
    torch.testing.assert_close(m(words, pixels, handed), ref_language_fusion(m, words, pixels, handed))


def test_language_fusion_without_the_quirk_matches_the_reference_formula() -> None:
    m = LanguageFusion(32, 16).eval()
    randomise(m)
    words, pixels, mask = inputs()
    torch.testing.assert_close(m(words, pixels, mask), ref_language_fusion(m, words, pixels, mask))


def test_cam_matches_the_reference() -> None:
    m = CrossModalAlignment(16, 32).eval()
    randomise(m)
    words, _, mask = inputs()
    g = torch.Generator().manual_seed(2)
    x, residual = torch.randn(2, 6, 6, 16, generator=g), torch.randn(2, 6, 6, 16, generator=g)
    torch.testing.assert_close(m(x, residual, words, mask), ref_cam(m, x, residual, words, mask))


def test_words_between_stages_are_not_normalised() -> None:
    """Reference: l = l + gate(res) * res goes on to the next BERT group; norms[k] only
    normalises the residual it returns beside it (unused at inference)."""
    from magnet.config import load_config
    from magnet.models import build_model

    torch.manual_seed(0)
    model = build_model(load_config("tiny", ["model.text.pretrained=false"]).model).eval()
    language = model.language_model
    randomise(language.res_gates)
    words, _, mask = inputs()
    words = words[..., :1].expand(2, 20, language.norms[0].normalized_shape[0]).contiguous()
    pixels = torch.randn(2, 4, 4, model.image_model.channels[0])
    residual = language.pwams[0](words, pixels.flatten(1, 2), mask)
    expected = words + language.res_gates[0](residual) * residual
    torch.testing.assert_close(language.fuse(0, words, pixels, mask), expected)


# ----------------------------------------------------------------- Swin: pad, then shift
def windows(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def ref_block(blk, x, ws, shift):
    b, h, w, c = x.shape
    shortcut = x
    x = blk.norm1(x)
    pr, pb = (ws - w % ws) % ws, (ws - h % ws) % ws
    x = F.pad(x, (0, 0, 0, pr, 0, pb))
    hp, wp = x.shape[1:3]
    mask = None
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
        img = torch.zeros(1, hp, wp, 1)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                img[:, hs, wsl, :] = cnt
                cnt += 1
        mw = windows(img, ws).squeeze(-1)
        mask = (mw.unsqueeze(1) - mw.unsqueeze(2)).ne(0).float() * -100.0
    xw = windows(x, ws)  # [B*nW, N, C]
    attn = blk.attn
    nh = attn.num_heads
    qkv = attn.qkv(xw).reshape(xw.shape[0], ws * ws, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    a = q @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(ws * ws, ws * ws, -1)
    a = a + bias.permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        a = (a.view(-1, nw, nh, ws * ws, ws * ws) + mask.unsqueeze(1).unsqueeze(0)).view(
            -1, nh, ws * ws, ws * ws
        )
    out = (a.softmax(-1) @ v).transpose(1, 2).reshape(xw.shape[0], ws * ws, c)
    out = attn.proj(out)
    out = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = shortcut + out[:, :h, :w]
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("grid", [15, 14, 28, 24])
def test_stage_blocks_match_the_reference(grid: int) -> None:
    torch.manual_seed(0)
    stage = MultiModalStage(
        dim=32,
        out_dim=32,
        input_resolution=(grid, grid),
        depth=2,
        num_heads=2,
        window_size=12,
        word_dim=8,
        downsample=False,
        mlp_ratio=4.0,
        drop_path=[0.0, 0.0],
        use_cam=False,
        cam_pool_sizes=(1,),
    ).eval()
    x = torch.randn(2, grid, grid, 32)
    with torch.no_grad():
        ours = stage.blocks(x)  # the Swin blocks alone (no merging: downsample=False)
        expected = ref_block(stage.blocks[1], ref_block(stage.blocks[0], x, 12, 0), 12, 6)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------ point 6: what the decoder receives
def stage_outputs(model, image: Tensor, ids: Tensor) -> list[Tensor]:
    """Each stage's third output (CAM mixer output, or the fused residual without the CAM),
    captured as the stage returns it, channels-last [B, H_k, W_k, C_k]."""
    captured: list[Tensor] = []
    hooks = [
        stage.register_forward_hook(lambda _m, _i, out: captured.append(out[2]))
        for stage in model.image_model.layers
    ]
    try:
        with torch.no_grad():
            features = model.encode(image, ids, (ids != 0).long()).features
    finally:
        for hook in hooks:
            hook.remove()
    return captured, features


@pytest.mark.parametrize("use_cam", [True, False])
def test_decoder_receives_the_cam_output_as_it_is(use_cam: bool) -> None:
    """Reference point 6: ``outputs['s1'] = i1_residual`` straight from the CAM mixer; the
    backbone's norm0..3 are never applied. LAVT (no CAM) normalises the fused residual."""
    from magnet.config import load_config
    from magnet.models import build_model

    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.text.pretrained=false", f"model.fusion.use_cam={use_cam}"]).model
    model = build_model(cfg).eval()
    for k in range(4):  # norms far from identity, so applying one shows
        randomise(getattr(model.image_model, f"norm{k}"), seed=k)
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 64, 64, generator=g)
    ids = torch.zeros(2, 20, dtype=torch.long)
    ids[:, 0], ids[:, 1:6], ids[:, 6] = 101, torch.randint(1000, 5000, (2, 5), generator=g), 102
    outs, features = stage_outputs(model, image, ids)
    for k, (out, feature) in enumerate(zip(outs, features, strict=True)):
        norm = getattr(model.image_model, f"norm{k}")
        expected = out if use_cam else F.layer_norm(out, out.shape[-1:], norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(feature, expected.permute(0, 3, 1, 2))

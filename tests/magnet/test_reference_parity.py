"""Parity of our forward pass with the published MagNet's, point by point.

Each test restates a formula of the authors' released evaluation code (yxchng/mask-grounding:
test.py, lib/backbone.py, lib/multimodal_swin.py, bert/multimodal_bert.py, modeling/) on its
own, from the module's parameters only, at toy widths with random weights in float32, and checks
our module against it: what loading the published weights needs to reproduce their logits.
The points are those of ../shared/design/reference-forward.md:

  point  what                                    test
  1      PIL antialiased bilinear resize, /255,   test_image_resize_is_pil_antialiased_bilinear
         ImageNet mean/std
  2      WordPiece ids cut to 20, pad 0; token    test_tokens_are_cut_to_20_and_padded_with_zero,
         types 0, positions 0..19                 test_embeddings_use_token_type_0_and_positions_from_0
  3      per stage: Swin, BERT group, both        test_whole_model_matches_the_reference_forward
         fusions from the same outputs, merging
  4      Swin: pad after norm1, then shift;       test_stage_blocks_match_the_reference,
         mask on the padded grid, -100            test_whole_model_matches_the_reference_forward
  5      patch merging order, LayerNorm, no bias  test_patch_merging_matches_the_reference
  6      decoder gets the CAM output as it is     test_decoder_receives_the_cam_output_as_it_is
  7      vision PWAM                              test_vision_pwam_matches_the_reference
  8      vision gate (no bias, GELU, tanh)        test_gates_match_the_reference
  9      CAM (pools, eps 1e-6 LN, align_corners,  test_cam_matches_the_reference
         mixer order)
  10     language fusion handed BERT's additive   the test_language_fusion_* tests: _with_the_quirk_,
         mask, float32 scale-offset-softmax       _with_the_quirk_rounds_like_the_reference_at_full_size,
                                                  _without_the_quirk_ (the 0/1 mask we train with)
  11     language keys/values/output instance     the test_language_fusion_* tests
         norms
  12     language gate (ReLU), l = l + g * res    test_gates_match_the_reference,
         everywhere, norms.k unused               test_words_between_stages_are_not_normalised
  13     BERT: (1 - m) * -10000, eps 1e-12,       test_bert_layers_match_the_reference
         exact GELU
  14     decoder: all four levels through the     test_decoder_matches_the_reference,
         deformable encoder, level_embed placing,
         mask features from stride 4              test_paper_preset_has_the_reference_sizes
  15     sine encoding, deformable sampling,      test_decoder_matches_the_reference (+ test_decoders.py:
         4 post-norm ReLU encoder layers          test_deformable_attention_matches_loop)
  16     masked-attention decoder, 9 layers,      test_decoder_matches_the_reference,
         blocked rows unblocked                   test_paper_preset_has_the_reference_sizes
  17     scoring: sigmoid of logits upsampled     not here: magnet/metrics.py and evaluate.py belong to the
         with align_corners=True, GT NEAREST      scoring protocol (another change); not part of the logits
  18     lang_proj, norm0..3, norms.0..3 unused   test_unused_published_weights_leave_the_logits_alone
  --     published layout round trip              test_published_layout_round_trips_on_the_paper_model
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from magnet.models.fusion import PWAM, CrossModalAlignment, LanguageFusion
from magnet.models.magnet import MultiModalStage

INVENTORY = Path(__file__).resolve().parents[2].parent / "shared/reference/official_magnet_state_dict.json"


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def inorm(x: Tensor, dim: int) -> Tensor:
    """InstanceNorm1d (no affine, eps 1e-5) over axis ``dim``, as the reference calls it."""
    return F.instance_norm(x.movedim(dim, -1), eps=1e-5).movedim(-1, dim)


def conv1(x: Tensor, conv: torch.nn.Module) -> Tensor:
    """A 1x1 Conv1d/Conv2d (weight [out, in, 1(, 1)]) on channels-last x [..., in]."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def layer_norm(x: Tensor, norm: torch.nn.Module, eps: float) -> Tensor:
    """The reference's LayerNorm over the last axis with ITS eps, which ours must carry too."""
    assert norm.eps == eps, f"{norm} has eps {norm.eps}, the reference's is {eps}"
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, eps)


def relative_l2(ours: Tensor, reference: Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


# ---------------------------------------------------------------------- inputs (points 1, 2)
def test_image_resize_is_pil_antialiased_bilinear() -> None:
    """Point 1: the reference's transform is torchvision's ``F.resize`` on a PIL image (PIL's
    antialiased bilinear), ``to_tensor``, ``normalize``: the predict path and the shard reader."""
    import torchvision.transforms.functional as TF

    from magnet.data import IMAGENET_MEAN, IMAGENET_STD, resize_pair
    from magnet.inference import preprocess_images

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (75, 133, 3), dtype=np.uint8))  # shrunk 2.8x / 1.6x
    resized = TF.to_tensor(TF.resize(image, [48, 48]))  # [3, 48, 48] in [0, 1]
    expected = TF.normalize(resized, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(preprocess_images([image], 48)[0], expected)
    rgb, _ = resize_pair(image, np.zeros((75, 133), dtype=np.uint8), 48, 12)  # uint8 [48, 48, 3]
    torch.testing.assert_close(torch.tensor(rgb).permute(2, 0, 1).float() / 255, resized)


def test_tokens_are_cut_to_20_and_padded_with_zero() -> None:
    """Point 2: uncased WordPiece with [CLS]/[SEP], the first 20 ids kept (a long expression
    loses its [SEP]), 0 after them, attention 1 on the kept ids."""
    from data_prep.tokenize import load_tokenizer
    from magnet.config import load_config
    from magnet.inference import tokenize

    cfg = load_config("paper").model
    texts = ["the man on the left", " ".join(["a tall red umbrella next to the small blue car"] * 3)]
    tokenizer = load_tokenizer(cfg.text.name_or_path)
    ids, mask = tokenize(texts, cfg)
    for row, text in enumerate(texts):
        kept = tokenizer(text)["input_ids"][:20]  # [CLS] ... [SEP], then cut
        assert ids[row].tolist() == kept + [0] * (20 - len(kept))
        assert mask[row].tolist() == [1] * len(kept) + [0] * (20 - len(kept))
    assert ids[0, 0] == tokenizer.cls_token_id and tokenizer.sep_token_id in ids[0].tolist()
    assert tokenizer.sep_token_id not in ids[1].tolist()  # the long one lost its [SEP]


# ---------------------------------------------------------------- the tiny model, randomised
def build_tiny(*overrides: str) -> torch.nn.Module:
    from magnet.config import load_config
    from magnet.models import build_model

    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.text.pretrained=false", *overrides]).model
    return build_model(cfg).eval()


def scramble(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random at a scale that keeps activations O(1) (gates, norms and the
    zero-initialised deformable projections included), so no term of a formula hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p[0].numel()) if p.dim() > 1 else 1.0 + 0.3 * noise)


@pytest.fixture(scope="module")
def reference_model() -> torch.nn.Module:
    """The tiny MagNet (CAM on, the published model's language-mask quirk on), scrambled."""
    model = build_tiny("model.fusion.reference_mask_quirk=true")
    scramble(model)
    return model


def expressions(seed: int = 3) -> tuple[Tensor, Tensor]:
    """Two expressions: 7 ids with 13 of padding, and 20 ids with none (the cut one)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (2, 20), generator=g)
    ids[:, 0] = 101
    ids[0, 6], ids[0, 7:] = 102, 0
    return ids, (ids != 0).long()


# --------------------------------------------------------------------- BERT (points 2, 13)
def ref_embeddings(emb: torch.nn.Module, ids: Tensor) -> Tensor:
    """BERT's embeddings of the reference call: token types all 0, positions 0..L-1."""
    positions = torch.arange(ids.shape[1])
    x = emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[positions]
    return layer_norm(x + emb.token_type_embeddings.weight[0], emb.LayerNorm, 1e-12)


def ref_bert_layer(layer: torch.nn.Module, h: Tensor, mask: Tensor) -> Tensor:
    """One BERT layer with the extended mask (1 - m) * -10000, eps 1e-12, exact GELU."""
    b, length, width = h.shape
    att = layer.attention.self
    heads, head_dim = att.num_attention_heads, att.attention_head_size

    def split(t: Tensor) -> Tensor:  # [B, L, D] -> [B, heads, L, D/heads]
        return t.view(b, length, heads, head_dim).transpose(1, 2)

    q, k, v = split(att.query(h)), split(att.key(h)), split(att.value(h))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + ((1.0 - mask.float()) * -10000.0)[:, None, None]
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, width)
    a = layer_norm(layer.attention.output.dense(context) + h, layer.attention.output.LayerNorm, 1e-12)
    inner = F.gelu(layer.intermediate.dense(a), approximate="none")
    return layer_norm(layer.output.dense(inner) + a, layer.output.LayerNorm, 1e-12)


def test_embeddings_use_token_type_0_and_positions_from_0(reference_model) -> None:
    ids, _ = expressions()
    emb = reference_model.language_model.embeddings
    with torch.no_grad():
        torch.testing.assert_close(emb(input_ids=ids), ref_embeddings(emb, ids))


def test_bert_layers_match_the_reference(reference_model) -> None:
    from magnet.models.magnet import text_encoder_config

    for name in ("bert-base-uncased", reference_model.cfg.text.name_or_path):  # paper's and tiny's
        config = text_encoder_config(name)
        assert (config.layer_norm_eps, config.hidden_act) == (1e-12, "gelu"), name
    language = reference_model.language_model
    _, mask = expressions()
    g = torch.Generator().manual_seed(4)
    words = torch.randn(2, 20, language.embeddings.word_embeddings.embedding_dim, generator=g)
    with torch.no_grad():
        ours = language.run_group(0, words, mask.bool()[:, None, None, :])
        expected = words
        for index in language.groups[0]:
            expected = ref_bert_layer(language.encoder.layer[index], expected, mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------- Swin: pad, then shift (points 4, 5)
def windows(x: Tensor, ws: int) -> Tensor:
    """[B, H, W, C] -> [B*nW, ws*ws, C], windows in row-major order."""
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def ref_position_index(ws: int) -> Tensor:
    """Swin's relative position index of a ws x ws window, [ws*ws, ws*ws]."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # [N, N, 2]
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def ref_block(blk: torch.nn.Module, x: Tensor, ws: int, shift: int) -> Tensor:
    """The reference's Swin block on x [B, H, W, C]: norm1, pad to a window multiple, THEN
    roll, with the -100 region mask built on the padded grid (no mask without a shift)."""
    b, h, w, c = x.shape
    shortcut = x
    x = layer_norm(x, blk.norm1, 1e-5)
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
    q, k, v = qkv[0] * (c // nh) ** -0.5, qkv[1], qkv[2]
    a = q @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[ref_position_index(ws).view(-1)].view(ws * ws, ws * ws, -1)
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
    mlp = blk.mlp
    return x + mlp.fc2(F.gelu(mlp.fc1(layer_norm(x, blk.norm2, 1e-5))))


def ref_patch_merging(merge: torch.nn.Module, x: Tensor) -> Tensor:
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: zero-pad odd sides, concatenate (even row,
    even col), (odd, even), (even, odd), (odd, odd), LayerNorm, bias-free linear."""
    assert merge.reduction.bias is None
    x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    return F.linear(layer_norm(x, merge.norm, 1e-5), merge.reduction.weight)


def ref_patch_embed(embed: torch.nn.Module, image: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, H/4, W/4, C]: zero-pad right/bottom to a multiple of 4, 4x4 stride-4
    conv, LayerNorm."""
    h, w = image.shape[-2:]
    image = F.pad(image, (0, -w % 4, 0, -h % 4))
    x = F.conv2d(image, embed.proj.weight, embed.proj.bias, stride=4).permute(0, 2, 3, 1)
    return layer_norm(x, embed.norm, 1e-5)


def single_stage(grid: tuple[int, int], downsample: bool) -> MultiModalStage:
    torch.manual_seed(0)
    return MultiModalStage(
        dim=16 if downsample else 32,
        out_dim=32,
        input_resolution=grid,
        depth=2,
        num_heads=2,
        window_size=12,
        word_dim=8,
        downsample=downsample,
        mlp_ratio=4.0,
        drop_path=[0.0, 0.0],
        use_cam=False,
        cam_pool_sizes=(1,),
    ).eval()


@pytest.mark.parametrize("grid", [(15, 15), (14, 14), (28, 28), (24, 24), (15, 26)])
def test_stage_blocks_match_the_reference(grid: tuple[int, int]) -> None:
    stage = single_stage(grid, downsample=False)
    randomise(stage.blocks)
    x = torch.randn(2, *grid, 32)
    with torch.no_grad():
        ours = stage.blocks(x)  # the Swin blocks alone (no merging: downsample=False)
        expected = ref_block(stage.blocks[1], ref_block(stage.blocks[0], x, 12, 0), 12, 6)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(30, 30), (9, 11)])
def test_patch_merging_matches_the_reference(grid: tuple[int, int]) -> None:
    stage = single_stage(grid, downsample=True)
    randomise(stage.downsample)
    x = torch.randn(2, *grid, 16)
    with torch.no_grad():
        torch.testing.assert_close(stage.downsample(x), ref_patch_merging(stage.downsample, x))


# ------------------------------------------------------- vision fusion, gates, CAM (7, 8, 9)
def ref_pwam(m: PWAM, pixels: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
    """The reference's vision-side PWAM: pixels [B, N, C], words [B, L, D], 0/1 mask [B, L]."""
    att = m.image_lang_att
    width = att.f_query[0].out_features  # the PWAM's own width: C, or C/4 inside the CAM
    vis = F.gelu(conv1(pixels, m.vis_project[0]))
    query = layer_norm(F.linear(pixels, att.f_query[0].weight, att.f_query[0].bias), att.f_query[1], 1e-5)
    keep = word_mask[..., None]
    key, value = conv1(words, att.f_key[0]) * keep, conv1(words, att.f_value[0]) * keep
    sim = (query @ key.transpose(1, 2)) * width**-0.5 + (1e4 * word_mask - 1e4)[:, None, :]  # [B, N, L]
    out = layer_norm(F.linear(sim.softmax(-1) @ value, att.W[0].weight, att.W[0].bias), att.W[1], 1e-5)
    return F.gelu(conv1(vis * out, m.project_mm[0]))


def ref_gate(gate: torch.nn.Sequential, residual: Tensor, act) -> Tensor:
    """tanh(W2 act(W1 residual)), both linears bias-free: what of the residual enters the stream."""
    assert gate[0].bias is None and gate[2].bias is None
    return torch.tanh(F.linear(act(F.linear(residual, gate[0].weight)), gate[2].weight))


def ref_cam(m: CrossModalAlignment, x: Tensor, residual: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
    """x, residual [B, H, W, C] -> mixer(cat(branch_1, branch_2, branch_3, branch_6, residual))."""
    b, h, w, _ = x.shape
    grid = x.permute(0, 3, 1, 2)
    branches = []
    for pyramid, fusion in zip(m.pyramids, m.fusions, strict=True):
        pooled = F.adaptive_avg_pool2d(grid, pyramid[0].output_size).permute(0, 2, 3, 1)
        y = conv1(pooled, pyramid[1])
        y = layer_norm(y, pyramid[2], 1e-6)  # the reference's channels-first LayerNorm, eps 1e-6
        y = conv1(F.gelu(conv1(y, pyramid[3])), pyramid[5])  # [B, s, s, C/4]
        s = y.shape[1]
        fused = ref_pwam(fusion, y.reshape(b, s * s, -1), words, word_mask).reshape(b, s, s, -1)
        up = F.interpolate(fused.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=True)
        branches.append(up.permute(0, 2, 3, 1))
    mixer = m.mixer
    z = F.linear(torch.cat([*branches, residual], dim=-1), mixer[0].weight, mixer[0].bias)
    return F.gelu(F.linear(layer_norm(z, mixer[1], 1e-5), mixer[2].weight, mixer[2].bias))


def inputs(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(2, 20, 32, generator=g)
    pixels = torch.randn(2, 36, 16, generator=g)
    mask = torch.zeros(2, 20)
    mask[0, :7], mask[1, :20] = 1, 1  # one padded expression, one with no padding at all
    return words, pixels, mask


def test_vision_pwam_matches_the_reference() -> None:
    m = PWAM(16, 32).eval()
    randomise(m)
    words, pixels, mask = inputs()
    torch.testing.assert_close(m(pixels, words, mask), ref_pwam(m, pixels, words, mask))


def test_gates_match_the_reference() -> None:
    """Point 8 (vision: GELU) and 12 (language: ReLU)."""
    from magnet.models.fusion import tanh_gate

    residual = torch.randn(2, 20, 16)
    for act_layer, act in ((torch.nn.GELU, F.gelu), (torch.nn.ReLU, F.relu)):
        gate = tanh_gate(16, act_layer)
        randomise(gate)
        torch.testing.assert_close(gate(residual), ref_gate(gate, residual, act))


def test_cam_matches_the_reference() -> None:
    m = CrossModalAlignment(16, 32).eval()
    randomise(m)
    words, _, mask = inputs()
    g = torch.Generator().manual_seed(2)
    for size in (6, 15):  # 15: PyTorch's uneven adaptive-pool bins (the 480 model's stage 4)
        x, residual = torch.randn(2, size, size, 16, generator=g), torch.randn(2, size, size, 16, generator=g)
        torch.testing.assert_close(m(x, residual, words, mask), ref_cam(m, x, residual, words, mask))


# ------------------------------------------------------------- language fusion (10, 11, 12)
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


def test_language_fusion_with_the_quirk_matches_the_reference() -> None:
    m = LanguageFusion(32, 16).eval()
    randomise(m)
    words, pixels, mask = inputs()
    handed = (1.0 - mask) * -10000.0  # BERT's additive mask, what the reference hands over
    torch.testing.assert_close(m(words, pixels, handed), ref_language_fusion(m, words, pixels, handed))


def test_language_fusion_with_the_quirk_rounds_like_the_reference_at_full_size() -> None:
    """Point 10 at the 480 model's stage 2 (30 x 30 pixels, 512 channels, 768-wide words): the
    padded rows' scores sit near -1e8, where float32 only holds multiples of 8, so only scale,
    offset, softmax in float32 reproduces them. A case where that shows: the same formula in
    float64 lands 8e-4 away (relative L2, measured), ours within 3e-7."""
    torch.manual_seed(2)
    m = LanguageFusion(768, 512).eval()
    g = torch.Generator().manual_seed(1)
    words, pixels = torch.randn(1, 20, 768, generator=g), torch.randn(1, 900, 512, generator=g)
    mask = torch.zeros(1, 20)
    mask[0, :6] = 1
    handed = (1.0 - mask) * -10000.0
    with torch.no_grad():
        ours, expected = m(words, pixels, handed), ref_language_fusion(m, words, pixels, handed)
    assert relative_l2(ours, expected) < 1e-5


def test_language_fusion_without_the_quirk_matches_the_reference_formula() -> None:
    m = LanguageFusion(32, 16).eval()
    randomise(m)
    words, pixels, mask = inputs()
    torch.testing.assert_close(m(words, pixels, mask), ref_language_fusion(m, words, pixels, mask))


def test_words_between_stages_are_not_normalised(reference_model) -> None:
    """Reference: l = l + gate(res) * res at every position goes on to the next BERT group;
    norms[k] only normalises the residual it returns beside it (unused at inference)."""
    language = reference_model.language_model
    _, mask = expressions()
    g = torch.Generator().manual_seed(5)
    words = torch.randn(2, 20, language.norms[0].normalized_shape[0], generator=g)
    pixels = torch.randn(2, 4, 4, reference_model.image_model.channels[0], generator=g)
    handed = language.fusion_mask(mask)  # the quirk: (1 - m) * -10000
    torch.testing.assert_close(handed, (1.0 - mask.float()) * -10000.0)
    with torch.no_grad():
        residual = ref_language_fusion(language.pwams[0], words, pixels.flatten(1, 2), handed)
        expected = words + ref_gate(language.res_gates[0], residual, F.relu) * residual
        torch.testing.assert_close(language.fuse(0, words, pixels, handed), expected)


# ------------------------------------------------------------------- decoder (14, 15, 16)
def ref_sine(height: int, width: int, dim: int) -> Tensor:
    """DETR's PositionEmbeddingSine(dim / 2, normalize=True) of an unpadded map: [dim, H, W],
    y channels first; cumulative coordinates over (last + 1e-6) * 2 pi, temperature 10000."""
    ones = torch.ones(1, height, width)
    y, x = ones.cumsum(1), ones.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    feats = dim // 2
    dim_t = 10000 ** (2 * (torch.arange(feats) // 2) / feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t  # [1, H, W, F]
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)[0]


def ref_deformable_attention(attn, query: Tensor, points: Tensor, value_in: Tensor, shapes) -> Tensor:
    """MSDeformAttn with the reference's PyTorch core: query [B, Q, C], points [1, Q, 2] (x, y)."""
    b, nq, c = query.shape
    heads, levels, n_points = attn.num_heads, attn.num_levels, attn.num_points
    value = attn.value_proj(value_in).view(b, -1, heads, c // heads)
    offsets = attn.sampling_offsets(query).view(b, nq, heads, levels, n_points, 2)
    weights = attn.attention_weights(query).view(b, nq, heads, levels * n_points).softmax(-1)
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # (W, H) per level
    locations = points[:, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
    grids = 2 * locations - 1
    sampled = []
    for lvl, (v, (h, w)) in enumerate(
        zip(value.split([h * w for h, w in shapes], dim=1), shapes, strict=True)
    ):
        v = v.flatten(2).transpose(1, 2).reshape(b * heads, c // heads, h, w)
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*M, Q, P, 2]
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(b * heads, 1, nq, levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(b, c, nq).transpose(1, 2)
    return attn.output_proj(out)


def ref_pixel_decoder(pd, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """All four levels, deepest first, through the deformable encoder; mask features from stride 4."""
    srcs = []  # 1x1 conv + GroupNorm(32, eps 1e-5), deepest level first: strides 32, 16, 8, 4
    for (conv, norm), f in zip(pd.input_proj, features[::-1], strict=True):
        assert (norm.num_groups, norm.eps) == (32, 1e-5)
        srcs.append(F.group_norm(F.conv2d(f, conv.weight, conv.bias), 32, norm.weight, norm.bias, 1e-5))
    shapes = [tuple(s.shape[-2:]) for s in srcs]
    dim = srcs[0].shape[1]
    src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, S, C]
    pos = torch.cat(
        [
            ref_sine(h, w, dim).flatten(1).T + pd.transformer.level_embed[lvl]
            for lvl, (h, w) in enumerate(shapes)
        ]
    )[None]  # level_embed joins the position encoding here
    points = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij"
        )
        points.append(torch.stack((xs.flatten() / w, ys.flatten() / h), -1))
    points = torch.cat(points)[None]  # pixel centres, [1, S, 2]
    for layer in pd.transformer.encoder.layers:
        attended = ref_deformable_attention(layer.self_attn, src + pos, points, src, shapes)
        src = layer_norm(src + attended, layer.norm1, 1e-5)
        src = layer_norm(src + layer.linear2(F.relu(layer.linear1(src))), layer.norm2, 1e-5)
    maps = [
        chunk.transpose(1, 2).reshape(src.shape[0], dim, h, w)
        for chunk, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes, strict=True)
    ]
    return pd.mask_features(maps[-1]), maps[:3]


def ref_mha(
    attn, query: Tensor, key: Tensor, value: Tensor, heads: int, blocked: Tensor | None = None
) -> Tensor:
    """nn.MultiheadAttention on sequence-first tensors; blocked [B*heads, Q, K] True = masked."""
    return F.multi_head_attention_forward(
        query, key, value, query.shape[-1], heads, attn.in_proj_weight, attn.in_proj_bias,
        None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias,
        training=False, need_weights=False, attn_mask=blocked,
    )[0]  # fmt: skip


def ref_predictor(pr, levels: list[Tensor], mask_features: Tensor, heads: int) -> Tensor:
    """Mask2Former's masked-attention decoder (sequence-first, as the reference runs it)."""
    b, dim = mask_features.shape[:2]
    sizes = [tuple(x.shape[-2:]) for x in levels]
    src = [
        (x.flatten(2) + pr.level_embed.weight[i][None, :, None]).permute(2, 0, 1)
        for i, x in enumerate(levels)
    ]
    pos = [ref_sine(h, w, dim).flatten(1).permute(1, 0)[:, None] for h, w in sizes]  # [HW, 1, C]
    query_pos = pr.query_embed.weight.unsqueeze(1).repeat(1, b, 1)  # [Q, B, C]
    out = pr.query_feat.weight.unsqueeze(1).repeat(1, b, 1)

    def heads_(out: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        decoded = layer_norm(out, pr.decoder_norm, 1e-5).transpose(0, 1)
        embed = decoded
        for i, linear in enumerate(pr.mask_embed.layers):
            embed = linear(embed) if i == len(pr.mask_embed.layers) - 1 else F.relu(linear(embed))
        mask = torch.einsum("bqc,bchw->bqhw", embed, mask_features)
        small = F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
        blocked = small.sigmoid().flatten(2).unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1) < 0.5
        return mask, blocked

    mask, blocked = heads_(out, sizes[0])
    for i in range(len(pr.transformer_cross_attention_layers)):
        lvl = i % 3
        blocked[torch.where(blocked.sum(-1) == blocked.shape[-1])] = False
        cross = pr.transformer_cross_attention_layers[i]
        attended = ref_mha(
            cross.multihead_attn, out + query_pos, src[lvl] + pos[lvl], src[lvl], heads, blocked
        )
        out = layer_norm(out + attended, cross.norm, 1e-5)
        self_attn = pr.transformer_self_attention_layers[i]
        attended = ref_mha(self_attn.self_attn, out + query_pos, out + query_pos, out, heads)
        out = layer_norm(out + attended, self_attn.norm, 1e-5)
        ffn = pr.transformer_ffn_layers[i]
        out = layer_norm(out + ffn.linear2(F.relu(ffn.linear1(out))), ffn.norm, 1e-5)
        mask, blocked = heads_(out, sizes[(i + 1) % 3])
    return mask  # [B, 1, H/4, W/4], the last layer's prediction


def ref_decoder(decoder, features: list[Tensor], heads: int) -> Tensor:
    mask_features, levels = ref_pixel_decoder(decoder.pixel_decoder, features)
    return ref_predictor(decoder.predictor, levels, mask_features, heads)


def test_decoder_matches_the_reference() -> None:
    """Two encoder layers and four decoder layers, so the level cycle 32, 16, 8 wraps around."""
    from magnet.config import DecoderConfig
    from magnet.models.mask2former import Mask2FormerDecoder

    cfg = DecoderConfig(
        hidden_dim=64,
        num_heads=4,
        pixel_decoder_layers=2,
        pixel_decoder_ffn_dim=96,
        deform_points=3,
        decoder_layers=4,
        decoder_ffn_dim=128,
    )
    channels = (16, 32, 64, 128)
    decoder = Mask2FormerDecoder(channels, cfg).eval()
    scramble(decoder)
    g = torch.Generator().manual_seed(6)
    features = [
        torch.randn(2, c, 18 // 2**k + 1, 22 // 2**k + 1, generator=g) for k, c in enumerate(channels)
    ]
    with torch.no_grad():
        ours = decoder(features).mask_logits
        expected = ref_decoder(decoder, features, cfg.num_heads)
    assert ours.shape == (2, 1, 19, 23)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_paper_preset_has_the_reference_sizes() -> None:
    """Points 4, 9, 14-16 at the published sizes: window 12 at 480, pools 1/2/3/6, 4 encoder
    layers (FFN 1024, 4 points, 8 heads, width 256), 9 decoder layers (FFN 2048), 1 query,
    20 tokens, and a (1, 1, 120, 120) output."""
    from magnet.models.magnet import describe_model
    from magnet.weights import imported_config

    cfg = imported_config().model
    assert (cfg.image_size, cfg.vision.window_size, cfg.text.max_tokens) == (480, 12, 20)
    assert tuple(cfg.fusion.cam_pool_sizes) == (1, 2, 3, 6) and cfg.fusion.reference_mask_quirk
    d = cfg.decoder
    assert (d.hidden_dim, d.num_heads, d.pixel_decoder_layers, d.pixel_decoder_ffn_dim, d.deform_points) == (
        256,
        8,
        4,
        1024,
        4,
    )
    assert (d.decoder_layers, d.decoder_ffn_dim, d.num_queries, d.mask_threshold) == (9, 2048, 1, 0.5)
    described = describe_model(cfg)
    assert described["stages"] == [[1, 128, 120, 120], [1, 256, 60, 60], [1, 512, 30, 30], [1, 1024, 15, 15]]
    assert described["mask_logits"] == [1, 1, 120, 120]


# ----------------------------------------------------------- the whole forward (3, 4, 18)
def ref_forward(model, image: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """The reference's WrapperModel.forward from our parameters: per stage, the Swin blocks,
    then the BERT group, then both fusions from those same outputs (the language side reads
    the Swin output before the vision gate), then the gated x goes through patch merging.
    The decoder gets each stage's CAM mixer output as it is."""
    image_model, language = model.image_model, model.language_model
    window = model.cfg.vision.window_size
    word_mask, handed = mask.float(), (1.0 - mask.float()) * -10000.0
    x = ref_patch_embed(image_model.patch_embed, image)  # [B, H/4, W/4, C_0]
    words = ref_embeddings(language.embeddings, ids)
    features = []
    for k, stage in enumerate(image_model.layers):
        if k:  # the reference merges at the end of stage k-1; timm at the start of stage k
            x = ref_patch_merging(stage.downsample, x)
        for i, blk in enumerate(stage.blocks):
            x = ref_block(blk, x, window, 0 if i % 2 == 0 else window // 2)
        for index in language.groups[k]:
            words = ref_bert_layer(language.encoder.layer[index], words, mask)
        residual = ref_pwam(stage.fusion, x.flatten(1, 2), words, word_mask).view(x.shape)
        features.append(ref_cam(stage.cam, x, residual, words, word_mask).permute(0, 3, 1, 2))
        words_residual = ref_language_fusion(language.pwams[k], words, x.flatten(1, 2), handed)
        words = words + ref_gate(language.res_gates[k], words_residual, F.relu) * words_residual
        x = x + ref_gate(stage.res_gate, residual, F.gelu) * residual
    return ref_decoder(model.classifier, features, model.cfg.decoder.num_heads)


def image_and_expressions(height: int = 72, width: int = 88) -> tuple[Tensor, Tensor, Tensor]:
    """72 x 88: grids 18x22, 9x11, 5x6, 3x3: every stage padded to the window, an odd merge."""
    g = torch.Generator().manual_seed(7)
    ids, mask = expressions()
    return torch.randn(2, 3, height, width, generator=g), ids, mask


def test_whole_model_matches_the_reference_forward(reference_model) -> None:
    image, ids, mask = image_and_expressions()
    with torch.no_grad():
        ours = reference_model(image, ids, mask).mask_logits
        expected = ref_forward(reference_model, image, ids, mask)
    assert ours.shape == (2, 1, 18, 22)
    assert relative_l2(ours, expected) < 1e-5


def test_unused_published_weights_leave_the_logits_alone(reference_model) -> None:
    """Point 18: lang_proj (our criterion.alignment.text_proj), the backbone's norm0..3 and
    the language norms.0..3 are loaded but the forward never reads them."""
    image, ids, mask = image_and_expressions()
    unused = [
        p
        for name, p in reference_model.named_parameters()
        if name.startswith(("criterion.alignment.text_proj.", "image_model.norm", "language_model.norms."))
    ]
    assert len(unused) == 2 + 8 + 8
    saved = [p.detach().clone() for p in unused]
    try:
        with torch.no_grad():
            before = reference_model(image, ids, mask).mask_logits
            for p in unused:
                p.mul_(-3.0).add_(1.0)
            after = reference_model(image, ids, mask).mask_logits
    finally:
        with torch.no_grad():
            for p, value in zip(unused, saved, strict=True):
                p.copy_(value)
    assert torch.equal(before, after)


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


# --------------------------------------------------------------- published layout round trip
@pytest.mark.skipif(not INVENTORY.is_file(), reason=f"published inventory {INVENTORY} is absent")
def test_published_layout_round_trips_on_the_paper_model() -> None:
    """ours -> published -> ours on the paper model (meta device): the published keys are the
    inventory's, every one maps back, each of our inference tensors returns to its own key."""
    from magnet.models import build_model
    from magnet.weights import imported_config, ours_to_published, published_to_ours

    model = build_model(imported_config().model, "meta")
    ours = model.state_dict()
    published = ours_to_published(ours, model)
    inventory = {entry["key"]: entry["shape"] for entry in json.loads(INVENTORY.read_text())["tensors"]}
    assert set(published) == set(inventory)
    assert all(list(published[key].shape) == shape for key, shape in inventory.items())
    back, report = published_to_ours(published, model)
    assert set(report.mapped) | set(report.dropped) == set(published)
    assert set(back) == {k for k in ours if not k.startswith("criterion.")} | set(report.kept_training_only)
    assert [key for key, value in back.items() if value is not ours[key]] == []  # each to its own key

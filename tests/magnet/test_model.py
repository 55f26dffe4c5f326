"""MagNet (magnet/models): shapes, parameter counts, zero-initialised gates, gradients, switches,
inference weights, bf16, and that the tiny model really learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_inputs import random_batch
from PIL import Image, ImageDraw
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformerStage

from magnet.config import CONFIG_DIR, ModelConfig, load_config
from magnet.models import MagNet, build_model
from magnet.models.decoders import DECODERS
from magnet.models.fusion import PADDING_BIAS, LanguageFusion
from magnet.models.magnet import TRAINING_ONLY_PREFIX, describe_model, special_token_ids, split_layers

PAPER_TOTAL = 297.0e6
PAPER_SPLIT = {"vision_fusion_cam": 152.8e6, "language_fusion": 126.0e6, "decoder": 18.0e6}


PRESETS = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def tiny_cfg(*overrides: str) -> ModelConfig:
    """The tiny preset's model section with ``section.key=value`` overrides inside ``model``."""
    return load_config("tiny", [f"model.{item}" for item in overrides]).model


@pytest.fixture(scope="module")
def paper_meta() -> MagNet:
    return build_model(load_config("paper").model, "meta")


# ------------------------------------------------------------------------- every variant
def quick_cfg(preset: str, *overrides: str) -> ModelConfig:
    """A preset's model with random weights and what makes it slow on CPU cut (image size, Swin
    depths past the shifted-window pair, widths, layer counts), its architecture choices kept
    (switches, decoder kind, window size, text encoder): a new preset is tested as it comes."""
    model = load_config(preset).model
    vision, decoder, grounding = model.vision, model.decoder, model.mask_grounding
    cut = [
        "text.pretrained=false",
        "vision.pretrained=null",
        f"image_size={min(model.image_size, 96)}",
        f"vision.embed_dim={min(vision.embed_dim, 32)}",
        f"vision.depths=[{','.join(str(min(depth, 2)) for depth in vision.depths)}]",
        f"decoder.hidden_dim={min(decoder.hidden_dim, 64)}",
        f"decoder.pixel_decoder_layers={min(decoder.pixel_decoder_layers, 1)}",
        f"decoder.pixel_decoder_ffn_dim={min(decoder.pixel_decoder_ffn_dim, 128)}",
        f"decoder.decoder_layers={min(decoder.decoder_layers, 2)}",
        f"decoder.decoder_ffn_dim={min(decoder.decoder_ffn_dim, 128)}",
        f"mask_grounding.hidden_dim={min(grounding.hidden_dim, 64)}",
        f"mask_grounding.num_layers={min(grounding.num_layers, 1)}",
        f"alignment.embed_dim={min(model.alignment.embed_dim, 64)}",
    ]
    return load_config(preset, [f"model.{item}" for item in (*cut, *overrides)]).model


def check_one_training_step(cfg: ModelConfig) -> None:
    """One forward and backward on a random batch: output shapes, a finite loss, finite gradients
    reaching the vision, text and decoder (classifier) parts."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    size = cfg.image_size
    out = model(**random_batch((size, size)))
    assert out.mask_logits.shape == (2, 1, size // 4, size // 4)
    assert all(a.shape == out.mask_logits.shape for a in out.aux_mask_logits)
    loss = out.losses["loss"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    for part in ("image_model.", "language_model.", "classifier."):
        assert any(name.startswith(part) and g.abs().sum() > 0 for name, g in grads.items()), part


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_a_step(preset: str) -> None:
    check_one_training_step(quick_cfg(preset))


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_every_registered_decoder_trains_a_step_in_the_model(kind: str) -> None:
    check_one_training_step(quick_cfg("tiny", f"decoder.kind={kind}", "image_size=64"))


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_tiny_shapes(tiny: MagNet, size: tuple[int, int]) -> None:
    b = random_batch(size)
    tiny.eval()
    with torch.no_grad():
        enc = tiny.encode(b["image"], b["input_ids"], b["attention_mask"])
        out = tiny(b["image"], b["input_ids"], b["attention_mask"])
    h, w = size
    for k, (feature, channels) in enumerate(zip(enc.features, (32, 64, 128, 256), strict=True)):
        stride = 4 * 2**k
        assert feature.shape == (2, channels, -(-h // stride), -(-w // stride))
    assert enc.words.shape == (2, 20, 384)
    assert out.mask_logits.shape == (2, 1, h // 4, w // 4)
    assert len(out.aux_mask_logits) == 2  # one per decoder layer but the last (2 layers + the query's)
    assert all(a.shape == out.mask_logits.shape for a in out.aux_mask_logits)
    assert out.losses is None


@pytest.mark.parametrize("size", [(480, 480), (480, 384)])
def test_paper_shapes_on_meta(paper_meta: MagNet, size: tuple[int, int]) -> None:
    b = random_batch(size)
    with torch.device("meta"):
        b = {k: v.to("meta") for k, v in b.items()}
        enc = paper_meta.encode(b["image"], b["input_ids"], b["attention_mask"])
        out = paper_meta(b["image"], b["input_ids"], b["attention_mask"])
    h, w = size
    assert [tuple(f.shape) for f in enc.features] == [
        (2, 128 * 2**k, h // (4 * 2**k), w // (4 * 2**k)) for k in range(4)
    ]
    assert enc.words.shape == (2, 20, 768)
    assert out.mask_logits.shape == (2, 1, h // 4, w // 4)
    assert len(out.aux_mask_logits) == 9


@pytest.mark.parametrize("switch", ["fusion.use_cam=false", "decoder.kind=lavt"])
def test_switches_keep_shapes(switch: str) -> None:
    model = build_model(tiny_cfg(switch))
    b = random_batch((64, 96))
    out = model(**b)
    assert out.mask_logits.shape == (2, 1, 16, 24)
    assert torch.isfinite(out.losses["loss"])


# ---------------------------------------------------------------------------- param counts
def test_paper_parameter_count(paper_meta: MagNet) -> None:
    counts = paper_meta.parameter_counts()
    assert abs(counts["inference"] - PAPER_TOTAL) / PAPER_TOTAL < 0.01
    for part, expected in PAPER_SPLIT.items():
        assert abs(counts[part] - expected) / expected < 0.01, (part, counts[part])
    assert counts["training_only"] > 0


def test_tiny_is_small(tiny: MagNet) -> None:
    counts = tiny.parameter_counts()
    assert counts["vision_fusion_cam"] + counts["decoder"] < 10e6


# ------------------------------------------------------------------------------- init, grads
def test_zero_gates_give_plain_swin(tiny: MagNet) -> None:
    """At init the fused main path is exactly timm's Swin on the same weights."""
    cfg = tiny.cfg.vision
    b = random_batch((128, 96))
    plain_embed = PatchEmbed(
        128,
        4,
        3,
        cfg.embed_dim,
        norm_layer=torch.nn.LayerNorm,
        output_fmt="NHWC",
        strict_img_size=False,
        dynamic_img_pad=True,
    )
    plain_embed.load_state_dict(tiny.image_model.patch_embed.state_dict())
    tiny.eval()
    with torch.no_grad():
        x = plain = plain_embed(b["image"])
        words = tiny.language_model.embeddings(input_ids=b["input_ids"])
        for k, stage in enumerate(tiny.image_model.layers):
            reference = SwinTransformerStage(
                dim=stage.blocks[0].dim if k == 0 else stage.downsample.reduction.in_features // 4,
                out_dim=stage.blocks[0].dim,
                input_resolution=(32 // 2**k, 32 // 2**k),
                depth=len(stage.blocks),
                downsample=k > 0,
                num_heads=stage.blocks[0].attn.num_heads,
                window_size=cfg.window_size,
                always_partition=True,
                dynamic_mask=True,
            )
            missing = reference.load_state_dict(stage.state_dict(), strict=False).missing_keys
            assert not [key for key in missing if "relative_position_index" not in key]
            reference.eval()
            x, pixels, _ = stage(x, words, b["attention_mask"].float())
            plain = reference(plain)
            torch.testing.assert_close(x, plain, rtol=0, atol=0)
            torch.testing.assert_close(pixels, plain, rtol=0, atol=0)


def test_gradients_reach_every_parameter() -> None:
    """All switches on. Checked after one optimizer step: at init some gradients are exactly 0
    by design (the zero gates' first linear, Deformable DETR's zero offset/weight projections
    in front of the level embeddings), and one step makes every path live."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("mask_grounding.mask_prob=1.0"))  # every word masked: MG loss > 0
    model.train()
    b = random_batch((64, 64), n=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**b).losses["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = model(**b)
    out.losses["loss"].backward()
    dead = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and not name.startswith(model.no_gradient_by_design())
        and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not dead, dead
    assert out.losses["mg"] > 0 and out.losses["cal"] > 0


def test_switched_off_heads_get_no_gradient() -> None:
    model = build_model(tiny_cfg("mask_grounding.enabled=false", "alignment.enabled=false"))
    assert sum(p.numel() for p in model.criterion.parameters()) == 0
    out = model(**random_batch((64, 64)))
    assert out.losses["mg"] == 0 and out.losses["cal"] == 0
    # MG on but in eval mode: the head exists and stays untouched.
    model = build_model(tiny_cfg())
    model.eval()
    out = model(**random_batch((64, 64)))
    out.losses["loss"].backward()
    assert out.losses["mg"] == 0
    assert all(p.grad is None for p in model.criterion.mask_grounding.parameters())


@pytest.mark.parametrize("pixel_features", ["mask_features", "cam_stage1"])
def test_alignment_loss_reads_its_pixels(tiny: MagNet, pixel_features: str) -> None:
    """By default CAL aligns the decoder's mask features (as the published lang_proj says), the
    sentence through one Linear; ``cam_stage1`` keeps the stage-1 CAM output and two MLPs."""
    model = (
        tiny
        if pixel_features == "mask_features"
        else build_model(tiny_cfg(f"alignment.pixel_features={pixel_features}"))
    )
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.classifier.register_forward_hook(
            lambda _, args, out: seen.update(mask_features=out.mask_features)
        ),
        model.criterion.alignment.register_forward_pre_hook(lambda _, args: seen.update(cal_pixels=args[0])),
    ]
    b = random_batch((64, 64))
    model.eval()  # no Mask Grounding: one pass, the one CAL reads
    try:
        with torch.no_grad():
            stage1 = model.encode(b["image"], b["input_ids"], b["attention_mask"]).features[0]
            model(**b)
    finally:
        for hook in hooks:
            hook.remove()
    text_proj = model.criterion.alignment.text_proj
    if pixel_features == "mask_features":
        assert seen["cal_pixels"] is seen["mask_features"]
        assert seen["cal_pixels"].shape == (2, model.cfg.decoder.hidden_dim, 16, 16)
        assert (
            isinstance(text_proj, torch.nn.Linear) and text_proj.out_features == model.cfg.decoder.hidden_dim
        )
        assert not list(model.criterion.alignment.pixel_proj.parameters())
    else:
        torch.testing.assert_close(seen["cal_pixels"], stage1, rtol=0, atol=0)
        assert (
            isinstance(text_proj, torch.nn.Sequential)
            and text_proj[-1].out_features == model.cfg.alignment.embed_dim
        )


def test_inference_weights_exclude_training_heads(tiny: MagNet) -> None:
    weights = tiny.inference_state_dict()
    assert not [k for k in weights if k.startswith(TRAINING_ONLY_PREFIX)]
    assert any(k.startswith(TRAINING_ONLY_PREFIX + "mask_grounding.") for k in tiny.state_dict())
    bare = build_model(tiny_cfg("mask_grounding.enabled=false", "alignment.enabled=false"))
    bare.load_state_dict(weights, strict=True)


def test_bf16_autocast_on_cpu(tiny: MagNet) -> None:
    tiny.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(**random_batch((64, 96)))
    assert out.mask_logits.dtype == torch.bfloat16
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.losses["loss"].backward()
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_pretrained_swin_from_local_file(tmp_path, layout: str) -> None:
    """A Swin checkpoint file (timm's layout, or the original one with patch merging at the end
    of each stage, wrapped in {'model': ...}) fills every Swin weight and nothing else."""
    import re

    import timm

    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=0,
        img_size=128,
        embed_dim=32,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        window_size=4,
    )
    state = swin.state_dict()
    if layout == "original":
        shift = lambda m: f"layers.{int(m.group(1)) - 1}.downsample"  # noqa: E731
        state = {"model": {re.sub(r"layers\.(\d+)\.downsample", shift, k): v for k, v in state.items()}}
    torch.save(state, tmp_path / "swin.pth")
    model = build_model(tiny_cfg(f"vision.pretrained={tmp_path / 'swin.pth'}"))
    loaded = model.image_model.state_dict()
    for key, value in swin.state_dict().items():
        if key.startswith(("patch_embed.", "layers.")):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert not model.image_model.layers[0].res_gate[2].weight.any()


def test_reference_mask_quirk_cuts_the_image_off_unpadded_words() -> None:
    """Handed the additive mask, the language fusion zeroes real words' queries; with no
    padding every word then reads the same thing and the instance norm erases it, so the words'
    update no longer depends on the image (design page). The 0/1 mask keeps the image in."""
    torch.manual_seed(0)
    fusion = LanguageFusion(word_dim=16, pixel_dim=8).eval()
    words = torch.randn(2, 5, 16)
    pixels_a, pixels_b = torch.randn(2, 2, 12, 8)
    full = torch.ones(2, 5)
    quirk = (1.0 - full) * PADDING_BIAS
    torch.testing.assert_close(fusion(words, pixels_a, quirk), fusion(words, pixels_b, quirk))
    assert not torch.allclose(fusion(words, pixels_a, full), fusion(words, pixels_b, full))
    cfg = tiny_cfg("fusion.reference_mask_quirk=true")
    model = build_model(cfg, "meta")
    assert model.language_model.fusion_mask(torch.tensor([[1, 1, 0]])).tolist() == [[0.0, 0.0, PADDING_BIAS]]


def test_model_info_on_meta() -> None:
    info = describe_model(load_config("paper").model, 480, 384)
    assert info["mask_logits"] == [1, 1, 120, 96]
    assert info["stages"][3] == [1, 1024, 15, 12]
    assert len(info["aux_mask_logits"]) == 9
    assert info["text_encoder"]["layers_per_stage"] == [3, 3, 3, 3]
    assert (
        info["parameters"]["inference"] + info["parameters"]["training_only"] == info["parameters"]["total"]
    )


def test_special_token_ids_are_the_configured_tokenizers(other_tokenizer: str) -> None:
    assert special_token_ids(other_tokenizer) == ([1, 3, 0, 2, 4], 4)  # its [UNK] [SEP] [PAD] [CLS] [MASK]
    assert special_token_ids("all-minilm-l6-v2")[1] == 103


def test_split_layers() -> None:
    assert split_layers(12, None) == (3, 3, 3, 3)
    assert split_layers(6, None) == (2, 2, 1, 1)
    with pytest.raises(ValueError, match="layers_per_stage"):
        split_layers(6, (1, 1, 1, 1))


# ------------------------------------------------------------------------------- learning
def shapes_batch(n: int, size: int) -> dict[str, torch.Tensor]:
    """Each image holds a red disc and a blue square; the expression names one of them."""
    rng = np.random.default_rng(0)
    images, masks, ids = [], [], []
    for i in range(n):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        mask = Image.new("L", (size, size), 0)
        boxes = []
        for _ in range(2):
            x, y = rng.integers(2, size // 2, 2)
            r = int(rng.integers(size // 4, size // 3))
            boxes.append((int(x), int(y), int(x) + r, int(y) + r))
        draw.ellipse(boxes[0], fill=(220, 30, 30))
        draw.rectangle(boxes[1], fill=(30, 30, 220))
        target = i % 2
        ImageDraw.Draw(mask).ellipse(boxes[0], fill=1) if target == 0 else ImageDraw.Draw(mask).rectangle(
            boxes[1], fill=1
        )
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        masks.append(torch.from_numpy(np.asarray(mask, dtype=np.float32)))
        ids.append([101, 2417 if target == 0 else 2630, 102])  # "red" / "blue"
    input_ids = torch.zeros(n, 20, dtype=torch.long)
    input_ids[:, :3] = torch.tensor(ids)
    return {
        "image": torch.stack(images),
        "input_ids": input_ids,
        "attention_mask": (input_ids != 0).long(),
        "target_mask": torch.stack(masks),
    }


def batch_iou(model: MagNet, b: dict[str, torch.Tensor]) -> float:
    """IoU over the whole batch of the thresholded, upsampled prediction (eval mode)."""
    model.eval()
    with torch.no_grad():
        logits = model(b["image"], b["input_ids"], b["attention_mask"]).mask_logits
    model.train()
    pred = torch.nn.functional.interpolate(logits, size=b["target_mask"].shape[-2:], mode="bilinear") > 0
    target = b["target_mask"].bool().unsqueeze(1)
    return float((pred & target).sum() / (pred | target).sum())


def test_tiny_overfits_a_batch() -> None:
    """Four drawn scenes, two expressions: IoU > 0.9 within 60 AdamW steps (about 30 needed)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("mask_grounding.enabled=false", "alignment.enabled=false"))
    model.train()
    b = shapes_batch(4, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = batch_iou(model, b)
    iou = start
    for step in range(1, 61):
        optimizer.zero_grad()
        model(**b).losses["loss"].backward()
        optimizer.step()
        if step % 10 == 0 and (iou := batch_iou(model, b)) > 0.9:
            break
    assert iou > 0.9, (start, iou)

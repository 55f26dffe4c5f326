"""Losses: segmentation (BCE + Dice, deep supervision), CAL, and the combined criterion."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from magnet.config import AlignmentLossConfig, LossConfig, MaskGroundingConfig
from magnet.losses import LOSS_KEYS, CrossModalAlignmentLoss, dice_loss, segmentation_loss, total_loss
from magnet.models.criterion import AlignmentInputs, MagNetCriterion, MaskGroundingInputs
from magnet.models.mask_grounding import IGNORE_INDEX


def _square_masks(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """[B, size, size] in {0, 1}: one random axis-aligned box per image (some images empty)."""
    gen = torch.Generator().manual_seed(seed)
    corners = torch.randint(0, size // 2, (batch, 2), generator=gen)
    extents = torch.randint(0, size // 2, (batch, 2), generator=gen)  # 0 = empty mask
    grid = torch.arange(size)
    rows = (grid >= corners[:, :1]) & (grid < corners[:, :1] + extents[:, :1])  # [B, size]
    cols = (grid >= corners[:, 1:]) & (grid < corners[:, 1:] + extents[:, 1:])
    return (rows[:, :, None] & cols[:, None, :]).float()


# ------------------------------------------------------------------------------- segmentation
def test_dice_and_bce_by_hand() -> None:
    logits = torch.zeros(1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # 1 - (2 * 0.5 + 1) / (2.0 + 1 + 1) = 0.5
    assert dice_loss(logits, target).item() == pytest.approx(0.5)
    out = segmentation_loss(logits.unsqueeze(1), [], target, LossConfig(bce_weight=2.0, dice_weight=3.0))
    assert out["bce"].item() == pytest.approx(math.log(2))
    assert out["dice"].item() == pytest.approx(0.5)
    assert out["seg"].item() == pytest.approx(2 * math.log(2) + 3 * 0.5)


def test_perfect_prediction_costs_nothing_and_inverted_costs_a_lot() -> None:
    target = _square_masks(4, 16)
    target[0, 2:6, 2:6] = 1  # at least one non-empty mask
    perfect = (30.0 * (2 * target - 1)).unsqueeze(1)  # [B, 1, 16, 16]
    good = segmentation_loss(perfect, [], target, LossConfig())
    assert good["bce"].item() < 1e-6
    assert good["dice"].item() < 1e-6
    bad = segmentation_loss(-perfect, [], target, LossConfig())
    assert bad["bce"].item() > 20
    assert bad["dice"].item() > 0.7


def test_target_is_area_resized_to_the_logit_grid() -> None:
    target = torch.zeros(2, 32, 32)
    target[0, 8:24, 4:16] = 1  # edges on the 4x grid: the 8x8 target is exactly 0/1
    target[1, 1:3, 1:3] = 1  # a thin object keeps a trace (a quarter of one cell)
    logits = torch.randn(2, 1, 8, 8)
    coarse = torch.zeros(2, 8, 8)
    coarse[0, 2:6, 1:4] = 1
    coarse[1, 0, 0] = 0.25
    full = segmentation_loss(logits, [], target, LossConfig())
    same_grid = segmentation_loss(logits, [], coarse, LossConfig())
    for key in ("bce", "dice", "seg"):
        assert full[key].item() == pytest.approx(same_grid[key].item(), rel=1e-6)


def test_auxiliary_masks_are_counted_with_their_weight() -> None:
    target = _square_masks(3, 16)
    logits = torch.randn(3, 1, 8, 8)
    cfg = LossConfig(aux_weight=0.5)
    alone = segmentation_loss(logits, [], target, cfg)
    with_aux = segmentation_loss(logits, [logits, logits, logits], target, cfg)
    assert with_aux["seg"].item() == pytest.approx(2.5 * alone["seg"].item(), rel=1e-5)
    # Auxiliary masks on another grid get their own resized target.
    other = segmentation_loss(logits, [torch.randn(3, 1, 4, 4)], target, cfg)
    assert torch.isfinite(other["seg"]) and other["seg"] > alone["seg"]


def test_segmentation_loss_is_float32_under_bf16_autocast() -> None:
    target = _square_masks(2, 16)
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = segmentation_loss(logits.bfloat16(), [], target, LossConfig())
    assert all(v.dtype == torch.float32 for v in out.values())
    out["seg"].backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------- CAL
def _identity_cal(dim: int, **kwargs: float) -> CrossModalAlignmentLoss:
    """CAL with identity projections, so the test controls the embeddings directly."""
    cal = CrossModalAlignmentLoss(dim, dim, AlignmentLossConfig(embed_dim=dim, **kwargs))
    cal.pixel_proj = nn.Identity()
    cal.text_proj = nn.Identity()
    return cal


def _aligned_batch(batch: int = 4, dim: int = 16, size: int = 8) -> tuple[torch.Tensor, ...]:
    """Foreground pixels of image i sit near sentence i; background pixels elsewhere."""
    gen = torch.Generator().manual_seed(0)
    sentences = torch.randn(batch, dim, generator=gen)
    masks = torch.zeros(batch, size * 4, size * 4)
    masks[:, 8:20, 4:24] = 1
    fg = torch.nn.functional.interpolate(masks[:, None], size=(size, size), mode="area")  # [B, 1, h, w]
    background = torch.randn(batch, dim, size, size, generator=gen)
    pixels = fg * (sentences[:, :, None, None] + 0.1 * torch.randn(batch, dim, size, size, generator=gen))
    pixels = pixels + (1 - fg) * background
    text = sentences[:, None, :].expand(-1, 3, -1)  # [B, L=3, D]: mean-pooled back to the sentence
    return pixels, text, torch.ones(batch, 3), masks


def test_aligned_embeddings_cost_less_than_shuffled_ones() -> None:
    cal = _identity_cal(16, temperature=0.1)
    pixels, text, attention, masks = _aligned_batch()
    aligned = cal(pixels, text, attention, masks)
    shuffled = cal(pixels, text.roll(1, dims=0), attention, masks)
    assert aligned["p2t"] < 0.2 * shuffled["p2t"]
    scrambled = cal(pixels[:, :, torch.randperm(8)][:, :, :, torch.randperm(8)], text, attention, masks)
    assert aligned["p2p"] < 0.5 * scrambled["p2p"]
    assert aligned["cal"].item() == pytest.approx((aligned["p2t"] + aligned["p2p"]).item())


def test_text_term_of_a_batch_of_one_needs_the_background() -> None:
    pixels, text, attention, masks = _aligned_batch(batch=1)
    cal = _identity_cal(16, temperature=0.1, negatives="sentences_and_background")
    aligned = cal(pixels, text, attention, masks)
    opposite = cal(pixels, -text, attention, masks)
    assert 0 < aligned["p2t"] < opposite["p2t"]  # background pixels are the negatives
    alone = _identity_cal(16, temperature=0.1, negatives="sentences")(pixels, -text, attention, masks)
    assert alone["p2t"].item() == 0  # no other sentence: nothing to tell apart


@pytest.mark.parametrize("negatives", ["sentences", "sentences_and_background"])
def test_pixel_to_text_by_hand(negatives: str) -> None:
    """-log softmax of the own sentence for each foreground pixel, over the batch's sentences (and,
    with the background, over own-sentence scores of the image's background pixels)."""
    temperature = 0.5
    cal = _identity_cal(16, temperature=temperature, negatives=negatives)
    pixels, text, attention, masks = _aligned_batch(batch=3)
    pixels = pixels + torch.randn(pixels.shape, generator=torch.Generator().manual_seed(1))
    got = cal(pixels, text, attention, masks)["p2t"]

    embedded = nn.functional.normalize(pixels.flatten(2).transpose(1, 2), dim=-1)  # [B, N, E]
    sentences = nn.functional.normalize(text[:, 0], dim=-1)  # [B, E]
    foreground = nn.functional.interpolate(masks[:, None], size=(8, 8), mode="area").flatten(1) >= 0.5
    nll = []
    for i in range(3):
        scores = embedded[i] @ sentences.T / temperature  # [N, B]
        for n in foreground[i].nonzero().flatten().tolist():
            terms = scores[n]
            if negatives == "sentences_and_background":
                terms = torch.cat([terms, scores[~foreground[i], i]])
            nll.append(terms.logsumexp(0) - scores[n, i])
    torch.testing.assert_close(got, torch.stack(nll).mean())


MLP_8_TO_16 = [(16, 8), (16,), (16, 16), (16,)]
MLP_12_TO_16 = [(16, 12), (16,), (16, 16), (16,)]


@pytest.mark.parametrize(
    ("pixel_features", "pixel_shapes", "text_shapes"),
    [("mask_features", [], [(8, 12), (8,)]), ("cam_stage1", MLP_8_TO_16, MLP_12_TO_16)],
)
def test_projections_per_pixel_source(pixel_features: str, pixel_shapes: list, text_shapes: list) -> None:
    """Mask features are aligned as the decoder made them, the sentence by ONE Linear to their width
    (the published lang_proj's layout); the stage-1 variant projects both sides by an MLP."""
    cal = CrossModalAlignmentLoss(8, 12, AlignmentLossConfig(pixel_features=pixel_features, embed_dim=16))
    assert [tuple(p.shape) for p in cal.pixel_proj.parameters()] == pixel_shapes
    assert [tuple(p.shape) for p in cal.text_proj.parameters()] == text_shapes


@pytest.mark.parametrize("pixel_features", ["mask_features", "cam_stage1"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cal_survives_empty_and_full_masks(batch: int, pixel_features: str) -> None:
    cfg = AlignmentLossConfig(pixel_features=pixel_features, embed_dim=16, max_pixels=64)
    cal = CrossModalAlignmentLoss(8, 12, cfg)
    pixels = torch.randn(batch, 8, 6, 6, requires_grad=True)
    text = torch.randn(batch, 5, 12)
    for masks in (torch.zeros(batch, 24, 24), torch.ones(batch, 24, 24)):
        out = cal(pixels, text, torch.ones(batch, 5), masks)
        assert all(torch.isfinite(v) for v in out.values())
        out["cal"].backward()
        assert all(torch.isfinite(p.grad).all() for p in cal.parameters() if p.grad is not None)
        assert torch.isfinite(pixels.grad).all()
    # Empty masks: no anchor anywhere, so both terms are exactly 0.
    empty = cal(pixels, text, torch.ones(batch, 5), torch.zeros(batch, 24, 24))
    assert empty["p2t"].item() == 0 and empty["p2p"].item() == 0


def test_cal_runs_under_bf16_autocast() -> None:
    cal = CrossModalAlignmentLoss(8, 12, AlignmentLossConfig(embed_dim=16, max_pixels=16))
    masks = _square_masks(3, 24, seed=1)
    masks[:, 2:10, 2:10] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cal(torch.randn(3, 8, 6, 6), torch.randn(3, 5, 12), torch.ones(3, 5), masks)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["cal"].backward()


# ----------------------------------------------------------------------------------- combined
TEXT_DIM, WORD_DIM, VOCAB = 12, 10, 40


def _criterion(mg: bool = True, cal: bool = True) -> tuple[MagNetCriterion, nn.Embedding]:
    torch.manual_seed(0)
    embeddings = nn.Embedding(VOCAB, WORD_DIM)
    criterion = MagNetCriterion(
        LossConfig(lambda_mg=0.3, lambda_cal=0.7),
        MaskGroundingConfig(enabled=mg, hidden_dim=16, num_heads=2, mask_grid=2),
        AlignmentLossConfig(enabled=cal, embed_dim=8, max_pixels=16),
        text_dim=TEXT_DIM,
        word_embeddings=embeddings,
        mg_visual_dim=6,
        cal_pixel_dim=5,
    )
    return criterion, embeddings


def _criterion_inputs(embeddings: nn.Embedding) -> tuple:
    batch, length = 2, 4
    target = _square_masks(batch, 16, seed=3)
    target[:, 4:12, 4:12] = 1
    labels = torch.full((batch, length), IGNORE_INDEX)
    labels[:, 1] = 7
    attention = torch.ones(batch, length)
    mg = MaskGroundingInputs(
        torch.randn(batch, length, TEXT_DIM),
        attention,
        torch.randn(batch, 6, 2, 2),
        labels,
        embeddings.weight,
    )
    cal = AlignmentInputs(torch.randn(batch, 5, 4, 4), torch.randn(batch, length, TEXT_DIM), attention)
    logits = torch.randn(batch, 1, 4, 4, requires_grad=True)
    return logits, [torch.randn(batch, 1, 4, 4)], target, mg, cal


def test_criterion_combines_every_part() -> None:
    criterion, embeddings = _criterion()
    out = criterion(*_criterion_inputs(embeddings))
    assert tuple(out) == LOSS_KEYS
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert out["mg"] > 0 and out["cal"] > 0
    expected = out["seg"] + 0.3 * out["mg"] + 0.7 * out["cal"]
    assert out["loss"].item() == pytest.approx(expected.item())
    out["loss"].backward()
    assert all(p.grad is not None for p in criterion.parameters())
    assert embeddings.weight.grad is not None


@pytest.mark.parametrize(("mg", "cal"), [(False, True), (True, False), (False, False)])
def test_disabled_parts_are_zero_and_absent(mg: bool, cal: bool) -> None:
    criterion, embeddings = _criterion(mg=mg, cal=cal)
    assert (criterion.mask_grounding is not None) == mg
    assert (criterion.alignment is not None) == cal
    out = criterion(*_criterion_inputs(embeddings))
    assert tuple(out) == LOSS_KEYS
    if not mg:
        assert out["mg"].item() == 0
        assert embeddings.weight.grad is None
    if not cal:
        assert out["cal"].item() == 0
    out["loss"].backward()
    assert (embeddings.weight.grad is not None) == mg


def test_mask_grounding_runs_only_in_training() -> None:
    criterion, embeddings = _criterion()
    criterion.eval()
    logits, aux, target, _, cal = _criterion_inputs(embeddings)
    out = criterion(logits, aux, target, mg=None, cal=cal)
    assert out["mg"].item() == 0
    out["loss"].backward()
    assert all(p.grad is None for p in criterion.mask_grounding.parameters())
    criterion.train()
    with pytest.raises(ValueError, match="MaskGroundingInputs"):
        criterion(logits, aux, target, mg=None, cal=cal)


def test_losses_import_on_their_own() -> None:
    """`import magnet.losses` first (before magnet.models) is no circular import."""
    done = subprocess.run([sys.executable, "-c", "import magnet.losses"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_total_loss_reports_zero_tensors_for_missing_parts() -> None:
    seg = {"bce": torch.tensor(1.0), "dice": torch.tensor(2.0), "seg": torch.tensor(3.0)}
    out = total_loss(seg, None, None, LossConfig())
    assert out["loss"].item() == 3.0
    assert isinstance(out["mg"], torch.Tensor) and out["mg"].item() == 0
    assert isinstance(out["cal"], torch.Tensor) and out["cal"].item() == 0

"""Mask Grounding: BERT-style masking statistics, the grounding head (shapes, gradients, tie,
and that it really learns from the mask), and that in the model its inputs never see the words
it predicts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_inputs import random_batch
from torch import Tensor, nn

from magnet.config import MaskGroundingConfig
from magnet.models import MagNet
from magnet.models.mask_grounding import IGNORE_INDEX, MaskGroundingHead, mask_tokens

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103  # bert-base-uncased
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 30522


def _expressions(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] [PAD]...: random lengths, words drawn from the ordinary vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (batch, length), generator=gen)
    real = torch.randint(3, length + 1, (batch, 1), generator=gen)  # ids used, [CLS] and [SEP] included
    positions = torch.arange(length)
    ids[:, 0] = CLS
    ids = torch.where(positions == real - 1, SEP, ids)
    ids = torch.where(positions >= real, PAD, ids)
    return ids, (positions < real).long()


def test_masking_never_touches_special_tokens_and_follows_its_probabilities() -> None:
    cfg = MaskGroundingConfig(mask_prob=0.15, replace_mask_prob=0.8, replace_random_prob=0.1)
    ids, attention = _expressions(4000, 20)
    masked, labels = mask_tokens(ids, attention, SPECIAL, MASK, VOCAB, cfg, torch.Generator().manual_seed(1))

    special = torch.isin(ids, torch.tensor(SPECIAL))
    assert torch.equal(masked[special], ids[special]), "a special or padding token was changed"
    assert (labels[special] == IGNORE_INDEX).all()
    picked = labels != IGNORE_INDEX
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked]), "an unpicked token was changed"

    candidates = (~special).sum().item()
    assert candidates > 30_000
    assert picked.sum().item() / candidates == pytest.approx(0.15, abs=0.01)
    n = picked.sum().item()
    to_mask = (masked[picked] == MASK).sum().item() / n
    kept = (masked[picked] == ids[picked]).sum().item() / n
    randomised = 1 - to_mask - kept
    assert (to_mask, randomised, kept) == pytest.approx((0.8, 0.1, 0.1), abs=0.03)
    replaced = picked & (masked != MASK) & (masked != ids)
    assert not torch.isin(masked[replaced], torch.tensor(SPECIAL)).any()


def test_random_replacements_are_never_special() -> None:
    cfg = MaskGroundingConfig(mask_prob=1.0, replace_mask_prob=0.0, replace_random_prob=1.0)
    ids, attention = _expressions(500, 20, seed=2)
    # A tiny vocabulary makes drawing a special id likely if the exclusion were missing.
    small_specials = (0, 1, 2)
    ids = torch.where(attention.bool(), torch.randint(3, 8, ids.shape), 0)
    masked, labels = mask_tokens(ids, attention, small_specials, 1, 8, cfg)
    real = attention.bool()
    assert (labels[real] == ids[real]).all()
    assert not torch.isin(masked[real], torch.tensor(small_specials)).any()
    assert set(masked[real].unique().tolist()) == {3, 4, 5, 6, 7}


def test_masking_is_reproducible_and_all_mask_when_asked() -> None:
    cfg = MaskGroundingConfig(mask_prob=1.0, replace_mask_prob=1.0, replace_random_prob=0.0)
    ids, attention = _expressions(8, 12)
    masked, _ = mask_tokens(ids, attention, SPECIAL, MASK, VOCAB, cfg)
    words = attention.bool() & ~torch.isin(ids, torch.tensor(SPECIAL))
    assert (masked[words] == MASK).all()

    cfg = MaskGroundingConfig()
    first = mask_tokens(ids, attention, SPECIAL, MASK, VOCAB, cfg, torch.Generator().manual_seed(3))
    second = mask_tokens(ids, attention, SPECIAL, MASK, VOCAB, cfg, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_masking_rejects_mismatched_shapes() -> None:
    ids, attention = _expressions(2, 6)
    with pytest.raises(ValueError, match="attention_mask"):
        mask_tokens(ids, attention[:, :4], SPECIAL, MASK, VOCAB, MaskGroundingConfig())


def _head(vocab: int = 50, word_dim: int = 24, text_dim: int = 20, visual_dim: int = 12):
    torch.manual_seed(0)
    embeddings = nn.Embedding(vocab, word_dim)
    nn.init.normal_(embeddings.weight, std=0.02)  # BERT's initialisation scale
    cfg = MaskGroundingConfig(hidden_dim=32, num_layers=2, num_heads=4, mask_grid=4)
    return MaskGroundingHead.from_config(cfg, text_dim, visual_dim, embeddings), embeddings


def test_head_shapes_loss_and_gradients() -> None:
    head, embeddings = _head()
    batch, length = 3, 7
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[0, 5:] = 0
    labels = torch.full((batch, length), IGNORE_INDEX)
    labels[:, 2] = torch.tensor([4, 9, 13])
    out = head(
        torch.randn(batch, length, 20),
        attention,
        torch.randn(batch, 12, 5, 6),  # non-square visual grid
        (torch.rand(batch, 33, 41) > 0.5).float(),  # any mask size
        labels,
        embeddings.weight,
    )
    assert out.logits.shape == (batch, 50)  # one row per predicted position
    assert out.logits.dtype == torch.float32
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(math.log(50), rel=0.3)  # near chance at initialisation
    out.loss.backward()
    for name, module in [("mask encoder", head.mask_encoder), ("predictor", head.predictor)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, name
    assert embeddings.weight.grad is not None and embeddings.weight.grad.abs().sum() > 0


def test_lm_head_is_tied_to_the_word_embeddings() -> None:
    head, embeddings = _head()
    # The head owns no vocabulary-by-width matrix: the embedding weight is the decoder.
    assert all(p.shape != embeddings.weight.shape for p in head.parameters())
    head.eval()
    args = (
        torch.randn(2, 5, 20),
        torch.ones(2, 5),
        torch.randn(2, 12, 4, 4),
        torch.ones(2, 16, 16),
        torch.randint(0, 50, (2, 5)),  # every position predicted
    )
    before = head(*args, embeddings.weight).logits
    with torch.no_grad():
        embeddings.weight[7] += 1.0  # an optimizer step on the text encoder's embedding row 7
    after = head(*args, embeddings.weight).logits
    changed = (after - before).abs().amax(dim=0) > 1e-6
    assert changed.nonzero().flatten().tolist() == [7]


def test_no_masked_token_gives_zero_loss_with_a_graph() -> None:
    head, embeddings = _head()
    labels = torch.full((2, 5), IGNORE_INDEX)
    out = head(
        torch.randn(2, 5, 20),
        torch.ones(2, 5),
        torch.randn(2, 12, 3, 3),
        torch.zeros(2, 8, 8),
        labels,
        embeddings.weight,
    )
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_head_runs_under_bf16_autocast() -> None:
    head, embeddings = _head()
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[:, 1] = 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(
            torch.randn(2, 5, 20),
            torch.ones(2, 5),
            torch.randn(2, 12, 3, 3),
            torch.ones(2, 8, 8),
            labels,
            embeddings.weight,
        )
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


def _train_on_quadrants(informative: bool, steps: int = 120) -> tuple[float, float]:
    """The masked word names the quadrant the mask covers; nothing else tells it apart.

    Language and visual inputs are identical for every sample, so only the mask can reveal the
    word: with an informative mask the loss must collapse, with a blank one it cannot go below
    log(4).
    """
    head, embeddings = _head(vocab=50)
    words = torch.tensor([10, 11, 12, 13])  # "top-left", "top-right", "bottom-left", "bottom-right"
    batch = 16
    quadrant = torch.arange(batch) % 4
    masks = torch.zeros(batch, 16, 16)
    for q in range(4):  # four fixed patterns, not a loop over batch items
        rows, cols = divmod(q, 2)
        masks[quadrant == q, rows * 8 : rows * 8 + 8, cols * 8 : cols * 8 + 8] = 1
    if not informative:
        masks = torch.ones_like(masks)
    ids = torch.tensor([CLS % 50, MASK % 50, SEP % 50]).repeat(batch, 1)  # [CLS] [MASK] [SEP]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 1] = words[quadrant]
    text = torch.randn(1, 3, 20).expand(batch, -1, -1)
    visual = torch.randn(1, 12, 4, 4).expand(batch, -1, -1, -1)
    attention = torch.ones(batch, 3)
    optimizer = torch.optim.AdamW([*head.parameters(), embeddings.weight], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = head(text, attention, visual, masks, labels, embeddings.weight).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_head_learns_the_word_from_an_informative_mask() -> None:
    first, last = _train_on_quadrants(informative=True)
    assert last < 0.1 * first and last < 0.3
    _, blank_last = _train_on_quadrants(informative=False)
    assert blank_last > 0.9 * math.log(4)


# ----------------------------------------------------------------------------- in the model
def _predictor_calls(model: MagNet, batch: dict[str, torch.Tensor], seed: int) -> tuple[tuple, Tensor]:
    """One training forward with a fixed seed (same masked positions and draws every time):
    the positional inputs the Mask Grounding predictor received, and the segmentation logits."""
    calls = []
    hook = model.criterion.mask_grounding.register_forward_pre_hook(lambda _, args: calls.append(args))
    torch.manual_seed(seed)
    try:
        logits = model(**batch).mask_logits
    finally:
        hook.remove()
    (inputs,) = calls
    return inputs, logits


@pytest.mark.parametrize("encoder_pass", ["shared", "separate"])
@pytest.mark.parametrize(("to_mask", "to_random"), [(1.0, 0.0), (0.0, 1.0)])
def test_predictor_inputs_never_see_the_masked_words(
    tiny: MagNet, encoder_pass: str, to_mask: float, to_random: float
) -> None:
    """Replacing the original words at the masked positions by other words changes the labels and
    nothing the predictor reads (language, visual and mask tokens, bitwise), whether a picked word
    becomes [MASK] or a random word. Only the 10% BERT keeps unchanged show the word, by design."""
    knobs = dict(
        encoder_pass=encoder_pass, mask_prob=0.5, replace_mask_prob=to_mask, replace_random_prob=to_random
    )
    # the model reads the section at every forward; its other fields (the head's sizes) stay
    tiny.cfg.mask_grounding = MaskGroundingConfig.model_validate(tiny.cfg.mask_grounding.model_dump() | knobs)
    batch = random_batch((64, 64), words=8)
    ids = batch["input_ids"]
    first, first_logits = _predictor_calls(tiny, batch, seed=1)
    picked = first[4] != IGNORE_INDEX  # labels [B, L]
    assert picked.any() and (~picked & batch["attention_mask"].bool()).any()

    swapped = dict(batch, input_ids=torch.where(picked, ids + 7, ids))  # "red" -> "blue" at masked spots
    second, second_logits = _predictor_calls(tiny, swapped, seed=1)
    assert torch.equal(second[4], torch.where(picked, ids + 7, IGNORE_INDEX)), "labels follow the new words"
    for name, index in [("language", 0), ("attention mask", 1), ("visual", 2), ("mask", 3)]:
        assert torch.equal(first[index], second[index]), f"{name} tokens changed with the masked words"
    # Segmentation: one pass on the masked ids ('shared'), or on the original words ('separate').
    assert torch.equal(first_logits, second_logits) == (encoder_pass == "shared")


def test_loss_is_the_mean_cross_entropy_over_the_predicted_positions_only() -> None:
    """Scoring only the predicted positions gives the loss that scoring every position and
    ignoring the rest gives."""
    head, embeddings = _head()
    head.eval()
    g = torch.Generator().manual_seed(0)
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 1], labels[1, 4], labels[2, 0], labels[2, 5] = 3, 17, 42, 8
    args = (
        torch.randn(3, 6, 20, generator=g),
        torch.ones(3, 6),
        torch.randn(3, 12, 3, 3, generator=g),
        (torch.rand(3, 16, 16, generator=g) > 0.5).float(),
    )
    out = head(*args, labels, embeddings.weight)
    every = head(*args, torch.randint(0, 50, (3, 6), generator=g), embeddings.weight).logits.view(3, 6, 50)
    expected = F.cross_entropy(every.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits, every[labels != IGNORE_INDEX])

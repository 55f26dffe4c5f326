"""Inference: preprocessing equals the shard reader's, masks come back at the image's own size,
and overlays show the prediction."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from magnet.config import load_config
from magnet.data import collate, resize_pair
from magnet.inference import grid, mask_to_png_image, predict, preprocess_images, render_overlay, tokenize


class RedFinder(torch.nn.Module):
    """Logit = how red a pixel is: a model whose right answer is known for any image."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, image, input_ids, attention_mask):
        self.calls.append(tuple(input_ids.shape))
        quarter = torch.nn.functional.avg_pool2d(image, 4)  # [B,3,S/4,S/4]
        redness = quarter[:, :1] - quarter[:, 1:2]  # [B,1,S/4,S/4]
        return SimpleNamespace(mask_logits=self.scale * redness)


def _picture(height: int, width: int) -> tuple[Image.Image, np.ndarray]:
    pixels = np.full((height, width, 3), 90, dtype=np.uint8)
    truth = np.zeros((height, width), dtype=np.uint8)
    truth[height // 4 : height // 2, width // 3 : width - 8] = 1
    pixels[truth == 1] = (230, 20, 20)
    return Image.fromarray(pixels), truth


def test_preprocessing_equals_the_shard_reader():
    cfg = load_config("tiny").model
    image, truth = _picture(70, 101)
    rgb, mask = resize_pair(image, truth, cfg.image_size, cfg.image_size)
    ids, attention = tokenize(["the red box"], cfg)
    reader = collate(
        [
            {
                "image": rgb,
                "mask": mask,
                "input_ids": ids[0].numpy(),
                "attention_mask": attention[0].numpy(),
                "sent_id": 1,
                "ref_id": 1,
                "image_id": 1,
                "raw": "the red box",
            }
        ]
    )
    torch.testing.assert_close(preprocess_images([image], cfg.image_size), reader["image"])
    assert ids.dtype == torch.int64 and ids.shape == (1, cfg.text.max_tokens)
    assert attention[0].sum() == 5  # [CLS] the red box [SEP]


def test_masks_come_back_at_each_images_size():
    cfg = load_config("tiny").model
    model = RedFinder()
    pairs = [_picture(70, 101), _picture(128, 64), _picture(200, 150)]
    masks = predict(model, cfg, [p[0] for p in pairs], ["red one", "the red thing", "red"], batch_size=2)
    assert model.calls == [(2, cfg.text.max_tokens), (1, cfg.text.max_tokens)]
    for mask, (image, truth) in zip(masks, pairs, strict=True):
        assert mask.shape == (image.height, image.width) and mask.dtype == np.uint8
        inter = np.logical_and(mask, truth).sum()
        union = np.logical_or(mask, truth).sum()
        assert inter / union > 0.7  # coarse: logits live on an S/4 grid


def test_bad_pairs_are_errors():
    cfg = load_config("tiny").model
    image, _ = _picture(32, 32)
    with pytest.raises(ValueError, match="pair them"):
        predict(RedFinder(), cfg, [image, image], ["one"])
    with pytest.raises(ValueError, match="empty"):
        predict(RedFinder(), cfg, [image], ["   "])


def test_overlay_marks_prediction_and_truth():
    image, truth = _picture(60, 80)
    pred = np.zeros_like(truth)
    pred[:20, :20] = 1
    plain = render_overlay(image, pred, truth)
    assert plain.size == image.size
    pixels = np.asarray(plain)
    assert tuple(pixels[5, 5]) != tuple(np.asarray(image)[5, 5])  # prediction tinted
    assert (pixels == (40, 220, 60)).all(axis=-1).any()  # true mask outlined
    captioned = render_overlay(image, pred, text="a long expression that has to wrap over lines")
    assert captioned.width == image.width and captioned.height > image.height
    with pytest.raises(ValueError, match="image's size"):
        render_overlay(image, pred[:10])
    assert grid([plain, captioned], columns=2).width > 2 * image.width
    assert mask_to_png_image(truth).getextrema() == (0, 255)

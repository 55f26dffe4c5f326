"""Model-side prediction: an image and an expression in, a mask at the image's own size out, and
the overlay pictures people look at (the `predict` command, the registry's pyfunc, the demo).

Preprocessing is the shard reader's (PIL bilinear resize to ``image_size`` with the aspect not
kept, ImageNet normalisation) and tokenisation is preparation's (``data_prep.tokenize``), so a
prediction here equals the one evaluation scores for the same sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data_prep.tokenize import encode_expressions, load_tokenizer
from magnet.config import ModelConfig
from magnet.data import IMAGENET_MEAN, IMAGENET_STD
from magnet.metrics import predict_masks

PRED_COLOUR = (255, 64, 32)  # filled, semi-transparent
TRUE_COLOUR = (40, 220, 60)  # outline
_ALPHA = 0.5


def preprocess_images(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """PIL images of any sizes -> float32 [B,3,S,S], resized like the shard reader and normalised."""
    arrays = [np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)  # [B,3,S,S]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def tokenize(texts: Sequence[str], cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Expressions -> (input_ids, attention_mask), both int64 [B,L], as preparation writes them."""
    for text in texts:
        if not text or not text.strip():
            raise ValueError("the expression is empty: say which object to segment")
    ids, mask, _ = encode_expressions(load_tokenizer(cfg.text.name_or_path), list(texts), cfg.text.max_tokens)
    return torch.from_numpy(ids).long(), torch.from_numpy(mask).long()


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    cfg: ModelConfig,
    images: Sequence[Image.Image],
    texts: Sequence[str],
    threshold: float = 0.5,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Masks, one uint8 [H_i,W_i] in {0,1} per (image, expression) pair, at each image's size.

    Args:
        model: a MagNet (``magnet.models.build_model``); put in eval mode here.
        cfg: its model config (input size, tokenizer, token length).
        images: PIL images, any sizes and modes.
        texts: one expression per image.
        threshold: probability above which a pixel belongs to the mask.
        batch_size: pairs per forward pass.
    """
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images but {len(texts)} expressions; pair them one to one")
    model.eval()
    device = next(model.parameters()).device
    masks: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        pixels = preprocess_images(chunk, cfg.image_size).to(device)  # [B,3,S,S]
        ids, attention = tokenize(texts[start : start + batch_size], cfg)  # [B,L]
        logits = model(pixels, ids.to(device), attention.to(device)).mask_logits  # [B,1,S/4,S/4]
        for row, image in enumerate(chunk):
            size = (image.height, image.width)
            mask = predict_masks(logits[row : row + 1], size, threshold)[0]  # bool [H,W]
            masks.append(mask.cpu().numpy().astype(np.uint8))
    return masks


def predict_one(
    model: torch.nn.Module, cfg: ModelConfig, image: Image.Image, text: str, threshold: float = 0.5
) -> np.ndarray:
    """uint8 [H,W] in {0,1}: the mask of the object ``text`` refers to in ``image``."""
    return predict(model, cfg, [image], [text], threshold)[0]


# -------------------------------------------------------------------------------- pictures
def mask_to_png_image(mask: np.ndarray) -> Image.Image:
    """{0,1} mask -> mode "L" image with 0/255, the shards' mask format."""
    return Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L")


def render_overlay(
    image: Image.Image,
    pred: np.ndarray,
    true: np.ndarray | None = None,
    text: str | None = None,
) -> Image.Image:
    """The image with the predicted mask filled (red), the true mask outlined (green) and the
    expression written in a strip above it.

    Args:
        image: the original image.
        pred: {0,1} mask [H,W] at the image's size.
        true: optional ground-truth {0,1} mask [H,W].
        text: optional expression (and score) to caption the picture with.
    """
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)  # [H,W,3]
    if pred.shape != rgb.shape[:2]:
        raise ValueError(f"mask is {pred.shape}, image is {rgb.shape[:2]}; predict at the image's size")
    fill = np.asarray(pred, dtype=bool)
    rgb[fill] = (1 - _ALPHA) * rgb[fill] + _ALPHA * np.array(PRED_COLOUR, dtype=np.float32)
    out = Image.fromarray(rgb.round().astype(np.uint8))
    if true is not None:
        truth = Image.fromarray((np.asarray(true) > 0).astype(np.uint8) * 255, mode="L")
        edge = np.asarray(truth.filter(ImageFilter.FIND_EDGES)) > 0  # [H,W]
        pixels = np.asarray(out).copy()
        pixels[edge] = TRUE_COLOUR
        out = Image.fromarray(pixels)
    if text:
        out = _caption(out, text)
    return out


def _caption(image: Image.Image, text: str) -> Image.Image:
    """Prepend a white strip holding ``text``, wrapped to the image's width."""
    font = ImageFont.load_default(size=max(10, min(18, image.width // 20)))
    draw = ImageDraw.Draw(image)
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= image.width - 8:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    line_height = int(font.size * 1.25)
    strip = Image.new("RGB", (image.width, line_height * len(lines) + 6), "white")
    writer = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        writer.text((4, 3 + row * line_height), line, fill="black", font=font)
    canvas = Image.new("RGB", (image.width, strip.height + image.height), "white")
    canvas.paste(strip, (0, 0))
    canvas.paste(image, (0, strip.height))
    return canvas


def grid(pictures: Sequence[Image.Image], columns: int = 4, pad: int = 4) -> Image.Image:
    """Pictures side by side in rows of ``columns``, each cell as large as the largest picture."""
    if not pictures:
        raise ValueError("no pictures to arrange")
    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures)
    columns = max(1, min(columns, len(pictures)))
    rows = -(-len(pictures) // columns)
    canvas = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    for index, picture in enumerate(pictures):
        row, col = divmod(index, columns)
        canvas.paste(picture, (pad + col * (cell_w + pad), pad + row * (cell_h + pad)))
    return canvas

"""Model-side prediction: an image and an expression in, a mask at the image's own size out, and
the overlay pictures people look at (the `predict` command, the registry's pyfunc, the demo).

Images are taken as a person sees them (``data_prep.images.as_shown``: upright by their EXIF
orientation, 16-bit grey over its full range, transparency over white), preprocessing is the shard
reader's (PIL bilinear resize to ``image_size`` with the aspect not kept, ImageNet normalisation)
and tokenisation is preparation's (``data_prep.tokenize``), so a prediction here equals the one
evaluation scores for the same sample, and masks are at the upright image's size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data_prep.images import as_shown
from data_prep.tokenize import encode_expressions, load_tokenizer
from magnet.config import ModelConfig
from magnet.data import IMAGENET_MEAN, IMAGENET_STD
from magnet.metrics import predict_masks

PRED_COLOUR = (255, 64, 32)  # filled, semi-transparent
TRUE_COLOUR = (40, 220, 60)  # outline
_ALPHA = 0.5
CAPTION_LINES = 3  # a longer expression is cut, ending in "…": the picture stays mostly picture
CAPTION_FONT = "DejaVuSans.ttf"  # shipped with matplotlib (a dependency): Latin, Greek, Cyrillic,
# Arabic, Hebrew and more; CJK and Indic scripts have no glyphs in it (see missing_glyphs)


def preprocess_images(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """PIL images of any sizes and modes, as shown (`as_shown`) -> float32 [B,3,S,S], resized like the
    shard reader and normalised."""
    arrays = [np.asarray(as_shown(im).resize((image_size, image_size), Image.BILINEAR)) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)  # [B,3,S,S]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@contextmanager
def _no_length_warning() -> Iterator[None]:
    """Mute transformers' "sequence length is longer than ... indexing errors" warning: the ids are
    cut to ``max_tokens`` before the model sees them, so no indexing error can follow."""
    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    level = tokenizer_log.level
    tokenizer_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tokenizer_log.setLevel(level)


def _encode(texts: Sequence[str], cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    for text in texts:
        if not text or not text.strip():
            raise ValueError("the expression is empty: say which object to segment")
    with _no_length_warning():
        return encode_expressions(load_tokenizer(cfg.text.name_or_path), list(texts), cfg.text.max_tokens)


def tokenize(texts: Sequence[str], cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Expressions -> (input_ids, attention_mask), both int64 [B,L], as preparation writes them."""
    ids, mask, _ = _encode(texts, cfg)
    return torch.from_numpy(ids).long(), torch.from_numpy(mask).long()


def words_read(text: str, cfg: ModelConfig) -> tuple[int, str] | None:
    """(word pieces in ``text``, the text the model reads) when ``text`` is longer than the model's
    ``max_tokens`` ([CLS] included) and so cut; None when the model reads all of it."""
    ids, _, n_words = _encode([text], cfg)
    if n_words[0] + 2 <= cfg.text.max_tokens:
        return None
    return int(n_words[0]), load_tokenizer(cfg.text.name_or_path).decode(ids[0, 1:].tolist())


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    cfg: ModelConfig,
    images: Sequence[Image.Image],
    texts: Sequence[str],
    threshold: float = 0.5,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Masks, one uint8 [H_i,W_i] in {0,1} per (image, expression) pair, at each image's upright size.

    Args:
        model: a MagNet (``magnet.models.build_model``); put in eval mode here.
        cfg: its model config (input size, tokenizer, token length).
        images: PIL images, any sizes and modes, read as shown (`data_prep.images.as_shown`).
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
        chunk = [as_shown(image) for image in images[start : start + batch_size]]
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
        image: the original image, drawn as shown (`data_prep.images.as_shown`).
        pred: {0,1} mask [H,W] at the image's upright size.
        true: optional ground-truth {0,1} mask [H,W].
        text: optional expression (and score) to caption the picture with.
    """
    rgb = np.asarray(as_shown(image)).astype(np.float32)  # [H,W,3]
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


@cache
def _caption_font_path() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / CAPTION_FONT


@cache
def _caption_codepoints() -> frozenset[int]:
    from fontTools.ttLib import TTFont

    return frozenset(TTFont(_caption_font_path()).getBestCmap())


def missing_glyphs(text: str) -> list[str]:
    """Characters of ``text`` the caption font cannot draw (they show as boxes), in order of appearance."""
    covered = _caption_codepoints()
    return list(dict.fromkeys(c for c in text if not c.isspace() and ord(c) not in covered))


def _wrap(text: str, fits: Callable[[str], bool], max_lines: int) -> list[str]:
    """Greedy wrap at spaces (a word wider than a line is split), at most ``max_lines``, the last
    ending in "…" when text is left over."""

    def cut(lines: list[str]) -> list[str]:
        last = lines[-1]
        while last and not fits(last + "…"):
            last = last[:-1]
        return [*lines[:-1], last + "…"]

    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        if len(lines) == max_lines:
            return cut(lines)
        lines.append("")
        for char in word:
            if not lines[-1] or fits(lines[-1] + char):
                lines[-1] += char
            elif len(lines) < max_lines:
                lines.append(char)
            else:
                return cut(lines)
    return lines or [""]


def _caption(image: Image.Image, text: str) -> Image.Image:
    """Prepend a white strip holding ``text``, wrapped to the image's width and cut at CAPTION_LINES."""
    font = ImageFont.truetype(str(_caption_font_path()), size=max(10, min(18, image.width // 20)))
    draw = ImageDraw.Draw(image)
    lines = _wrap(text, lambda line: draw.textlength(line, font=font) <= image.width - 8, CAPTION_LINES)
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

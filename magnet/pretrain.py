"""Pretraining of the Swin image side on generated scenes, without language.

The paper never trains its vision backbone from scratch: Swin-B starts from ImageNet-22k weights.
No such weights can be fetched here, and a tiny Swin at 64 px has none published, so this module
makes the offline equivalent for the synthetic data: the same Swin (``MultiModalSwin``'s patch
embedding, stages and patch merging, run without the fusion) learns to label every pixel of freshly
generated scenes (``data_prep.synth.render_scene``, a seed the dataset never uses) with its
object's colour, shape and size class and the offset to its object's centre. That is what a
referring expression's noun phrase and its spatial words need from the image, and no sentence is
seen. The result is a timm-format Swin state dict that ``model.vision.pretrained`` loads exactly
as a user loads ImageNet weights (``magnet.models.magnet.load_pretrained_vision``).

Shape legend: B batch, S image side, H_k x W_k grid of stage k, C_k its channels, W head width.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.swin_transformer import SwinTransformerStage
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.scenes import COLOURS, SHAPES, SIZES
from data_prep.synth import JPEG_QUALITY, render_scene
from magnet.config import ModelConfig
from magnet.data import IMAGENET_MEAN, IMAGENET_STD
from magnet.models.magnet import SWIN_KEY, MultiModalSwin

log = logging.getLogger(__name__)

SCENE_SEED = 7_919_000
"""Seed of the pretraining scenes: the synthetic datasets use small seeds (the demo's is 0), so no
pretraining scene is an image of theirs, of any split."""

HEADS = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1}
"""Per-pixel classes of each head; class 0 is the background."""


@dataclass(frozen=True)
class PretrainResult:
    """What ``pretrain_vision`` wrote and how well the heads label held-out scenes.

    Attributes:
        weights: the Swin state dict file (timm names), loadable by ``model.vision.pretrained``.
        steps, batch_size, image_size, seconds: the run.
        held_out: per head, the pixel accuracy on object pixels of unseen scenes (0-1), and
            ``offset_px``, the mean error of the centre offset in pixels.
    """

    weights: str
    steps: int
    batch_size: int
    image_size: int
    seconds: float
    held_out: dict[str, float]


# ------------------------------------------------------------------------------------- data
def scene_targets(seed: int, index: int, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One generated scene as the model reads it, and its per-pixel targets.

    Returns:
        image uint8 [S, S, 3] after the dataset's own JPEG round trip; labels int64 [3, S, S]
        (colour, shape, size classes, 0 = background); offsets float32 [2, S, S], the (dx, dy) from
        each object pixel to its object's centre in image sides (0 on the background).
    """
    rendered, _ = render_scene(seed, index, image_size)
    buffer = io.BytesIO()
    rendered.image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    image = np.array(Image.open(buffer).convert("RGB"))
    labels = np.zeros((3, image_size, image_size), dtype=np.int64)
    offsets = np.zeros((2, image_size, image_size), dtype=np.float32)
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    for obj, mask in zip(rendered.scene.objects, rendered.masks, strict=True):
        labels[0][mask] = list(COLOURS).index(obj.colour) + 1
        labels[1][mask] = SHAPES.index(obj.shape) + 1
        labels[2][mask] = SIZES.index(obj.size) + 1
        offsets[0][mask] = (obj.cx - xs[mask]) / image_size
        offsets[1][mask] = (obj.cy - ys[mask]) / image_size
    return image, labels, offsets


class SceneStream(IterableDataset):
    """Scenes ``start, start + 1, ...`` (split between loader processes) as normalised tensors."""

    def __init__(self, seed: int, image_size: int, start: int = 0, stop: int | None = None) -> None:
        self.seed, self.image_size, self.start, self.stop = seed, image_size, start, stop

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        info = get_worker_info()
        offset, step = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + offset
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        while self.stop is None or index < self.stop:
            image, labels, offsets = scene_targets(self.seed, index, self.image_size)
            pixels = torch.from_numpy(image).permute(2, 0, 1).float().div_(255).sub_(mean).div_(std)
            yield pixels, torch.from_numpy(labels), torch.from_numpy(offsets)
            index += step


# ------------------------------------------------------------------------------------ model
def swin_features(swin: MultiModalSwin, image: Tensor) -> list[Tensor]:
    """The plain Swin path of the image side (no words, no fusion): image [B, 3, S, S] -> four maps
    [B, H_k, W_k, C_k], exactly the stages' computation before MagNet's fusion."""
    x = swin.patch_embed(image)  # [B, S/4, S/4, C_1]
    features = []
    for stage in swin.layers:
        x = SwinTransformerStage.forward(stage, x)  # patch merging + Swin blocks, as in MagNet
        features.append(x)
    return features


class ScenePretrainer(nn.Module):
    """The Swin image side plus a light dense head (one projection per stage, summed at stride 4),
    labelling every pixel with colour, shape and size classes and its centre offset.

    Args:
        cfg: the model config whose ``vision`` section (and ``image_size``) the weights are for.
        width: W, channels of the head.
    """

    def __init__(self, cfg: ModelConfig, width: int = 64) -> None:
        super().__init__()
        self.swin = MultiModalSwin(cfg, word_dim=8)  # its fusion modules stay unused and unsaved
        self.lateral = nn.ModuleList(nn.Linear(c, width) for c in self.swin.channels)
        self.mix = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(width, sum(HEADS.values()) + 2, 1)

    def forward(self, image: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """image [B, 3, S, S] -> (logits per head [B, classes, S, S], offsets [B, 2, S, S])."""
        features = swin_features(self.swin, image)
        grid = features[0].shape[1:3]  # stride 4
        x = sum(
            F.interpolate(lat(f).permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
            for lat, f in zip(self.lateral, features, strict=True)
        )  # [B, W, S/4, S/4]
        out = F.interpolate(
            self.out(self.mix(x)), size=image.shape[-2:], mode="bilinear", align_corners=False
        )
        logits = dict(
            zip(HEADS, out[:, : sum(HEADS.values())].split(list(HEADS.values()), dim=1), strict=True)
        )
        return logits, out[:, sum(HEADS.values()) :]

    def swin_state_dict(self) -> dict[str, Tensor]:
        """The Swin weights alone, under the names ``load_pretrained_vision`` fills (timm's)."""
        return {k: v.detach().clone() for k, v in self.swin.state_dict().items() if SWIN_KEY.match(k)}


def pretrain_loss(
    logits: dict[str, Tensor], offsets: Tensor, labels: Tensor, target_offsets: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Per head, cross-entropy averaged over the object pixels and over the background separately
    (objects cover a tenth of a scene: a plain mean learns "background" first), plus the L1 centre
    offset on object pixels (in image sides x 10, near the classification terms' scale)."""
    on_object = labels[:, 1] > 0  # [B, S, S]
    weight = torch.where(on_object, 0.5 / on_object.sum().clamp(min=1), 0.5 / (~on_object).sum().clamp(min=1))
    terms = {
        name: (F.cross_entropy(logits[name], labels[:, k], reduction="none") * weight).sum()
        for k, name in enumerate(HEADS)
    }
    mask = on_object.unsqueeze(1).float()  # [B, 1, S, S]
    terms["offset"] = 10 * (mask * (offsets - target_offsets).abs()).sum() / mask.sum().clamp(min=1)
    total = sum(terms.values())
    return total, {k: float(v.detach()) for k, v in terms.items()}


@torch.no_grad()
def held_out_scores(model: ScenePretrainer, loader: DataLoader, image_size: int) -> dict[str, float]:
    """Pixel accuracy of each head on object pixels and the mean centre-offset error in pixels."""
    model.eval()
    right = dict.fromkeys(HEADS, 0.0)
    pixels, offset_error = 0.0, 0.0
    for image, labels, target_offsets in loader:
        logits, offsets = model(image)
        on_object = labels[:, 1] > 0
        pixels += float(on_object.sum())
        for k, name in enumerate(HEADS):
            right[name] += float((logits[name].argmax(1) == labels[:, k])[on_object].sum())
        error = (offsets - target_offsets).norm(dim=1)[on_object]  # [N] in image sides
        offset_error += float(error.sum()) * image_size
    model.train()
    scores = {name: round(right[name] / max(pixels, 1), 4) for name in HEADS}
    scores["offset_px"] = round(offset_error / max(pixels, 1), 3)
    return scores


# ---------------------------------------------------------------------------------- training
def pretrain_vision(
    cfg: ModelConfig,
    out: str | Path,
    *,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 100,
    seed: int = 0,
    held_out_scenes: int = 256,
    loader_workers: int = 1,
    log_every: int = 100,
) -> PretrainResult:
    """Pretrain ``cfg.vision`` at ``cfg.image_size`` on generated scenes and write its Swin weights.

    Writes ``out`` (the state dict, torch.save) and ``out`` with suffix ``.json`` (this result, the
    vision config and the training settings), so the file says how it was made.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ScenePretrainer(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "relative_position_bias_table" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim > 1 and "relative_position_bias_table" not in n)
    ]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(steps - warmup_steps, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scene_seed = SCENE_SEED + seed
    train_loader = DataLoader(
        SceneStream(scene_seed, cfg.image_size, start=held_out_scenes),
        batch_size=batch_size,
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
    )
    held_out = DataLoader(SceneStream(scene_seed, cfg.image_size, stop=held_out_scenes), batch_size=64)
    start = time.perf_counter()
    for step, (image, labels, target_offsets) in enumerate(train_loader):
        if step == steps:
            break
        logits, offsets = model(image)
        loss, terms = pretrain_loss(logits, offsets, labels, target_offsets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            log.info(
                "pretrain step %d/%d loss %.3f (%s) %.1f s",
                step + 1, steps, float(loss), ", ".join(f"{k} {v:.3f}" for k, v in terms.items()),
                time.perf_counter() - start,
            )  # fmt: skip
    seconds = time.perf_counter() - start
    scores = held_out_scores(model, held_out, cfg.image_size)
    torch.save(model.swin_state_dict(), out)
    result = PretrainResult(str(out), steps, batch_size, cfg.image_size, round(seconds, 1), scores)
    settings = {"lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "seed": seed,
                "scene_seed": scene_seed, "held_out_scenes": held_out_scenes}  # fmt: skip
    meta = {**asdict(result), "vision": cfg.vision.model_dump(mode="json"), "settings": settings}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return result

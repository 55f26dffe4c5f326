"""Evaluation over whole splits, sharded over ranks, and the picture of predictions.

Every expression of a split is scored once: the eval loader gives each rank a contiguous block,
each rank sums intersections and unions, and one all_reduce per split gives exact split metrics
(see magnet.metrics). Two protocols (../shared/design/refcoco-data-and-eval.md):

- ``lavt`` (default, LAVT and MagNet): the ground truth resized (nearest) to eval_size x eval_size,
  logits upsampled to it;
- ``original`` (CRIS, CGFormer): logits upsampled to each image's own size, compared with the
  original mask.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magnet.config import Config, EvalConfig
from magnet.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_loader, open_split
from magnet.metrics import IoUAccumulator, intersection_union, intersection_union_per_size, iou, predict_masks


@dataclass
class Example:
    """One scored sample kept for the picture: image [S,S,3] in [0,1], its text and both masks [S,S]."""

    image: np.ndarray
    text: str
    pred: np.ndarray
    target: np.ndarray


@dataclass
class SplitResult:
    """Sums of one split (already reduced across ranks); this rank's examples, and on request its
    per-expression rows (sent_id, image_id, raw, iou, area) and lowest-IoU examples."""

    split: str
    scores: IoUAccumulator
    examples: list[Example] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    worst: list[Example] = field(default_factory=list)


@dataclass
class Evaluation:
    """Metrics of every evaluated split, and how they were scored.

    ``metrics`` keys are ``<split>/<name>``: oIoU, mIoU, P@0.5 ... P@0.9 (percent) and n (samples).
    """

    protocol: str
    eval_size: int | None  # the comparison size of the lavt protocol; None for 'original'
    threshold: float
    metrics: dict[str, float]
    splits: dict[str, SplitResult]

    def as_dict(self) -> dict[str, Any]:
        """What a metrics.json holds: the protocol, its description and the metrics."""
        return {
            "protocol": self.protocol,
            "eval_size": self.eval_size,
            "threshold": self.threshold,
            "description": self.describe(),
            "metrics": self.metrics,
        }

    def describe(self) -> str:
        """One line naming the protocol, for every report."""
        where = f"{self.eval_size}x{self.eval_size}" if self.eval_size else "each image's original size"
        return f"protocol {self.protocol}: IoU at {where}, probability > {self.threshold}"


def _autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast on GPU only: CPU bf16 is slow and changes results for no gain."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _denormalise(images: torch.Tensor) -> np.ndarray:
    """[B,3,S,S] ImageNet-normalised -> [B,S,S,3] in [0,1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _examples(batch: Mapping[str, Any], logits: torch.Tensor, count: int, threshold: float) -> list[Example]:
    """The first ``count`` samples of a batch, masks brought to the image's size S."""
    images = batch["image"][:count]
    size = (images.shape[-2], images.shape[-1])
    pred = predict_masks(logits[:count], size, threshold).cpu().numpy()  # [k,S,S]
    target = F.interpolate(batch["mask"][:count, None].float(), size=size, mode="nearest")[:, 0]  # [k,S,S]
    return [
        Example(image=img, text=text, pred=p, target=t)
        for img, text, p, t in zip(
            _denormalise(images), batch["raw"][:count], pred, target.numpy() > 0, strict=True
        )
    ]


def _sample_rows(batch: Mapping[str, Any], ious: list[float]) -> list[dict[str, Any]]:
    """One row per sample; ``area`` is the referred object's share of the image (eval-size mask)."""
    areas = batch["mask"].flatten(1).float().mean(1).tolist()  # [B]
    return [
        {"sent_id": int(sent), "image_id": int(image), "raw": raw, "iou": value, "area": area}
        for sent, image, raw, value, area in zip(
            batch["sent_id"], batch["image_id"], batch["raw"], ious, areas, strict=True
        )
    ]


def _keep_worst(
    worst: list[tuple[float, Example]],
    batch: Mapping[str, Any],
    logits: torch.Tensor,
    ious: list[float],
    count: int,
    threshold: float,
) -> list[tuple[float, Example]]:
    """The ``count`` lowest-IoU (iou, example) pairs among ``worst`` and this batch; the example's
    text leads with its IoU, so the picture says how bad each one is."""
    bar = worst[-1][0] if len(worst) >= count else float("inf")
    picks = [i for i in sorted(range(len(ious)), key=ious.__getitem__)[:count] if ious[i] < bar]
    if not picks:
        return worst
    chosen = {
        "image": batch["image"][picks],
        "mask": batch["mask"][picks],
        "raw": [f"IoU {ious[i]:.2f}: {batch['raw'][i]}" for i in picks],
    }
    fresh = _examples(chosen, logits[picks], len(picks), threshold)
    return sorted([*worst, *zip((ious[i] for i in picks), fresh, strict=True)], key=lambda p: p[0])[:count]


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    eval_cfg: EvalConfig,
    *,
    split: str,
    device: torch.device,
    precision: str = "fp32",
    keep_examples: int = 0,
    keep_rows: bool = False,
    keep_worst: int = 0,
) -> SplitResult:
    """Score one split's batches (this rank's share) and reduce the sums across ranks.

    Args:
        model: MagNet, unwrapped (no DDP: ranks see different numbers of batches).
        batches: this rank's eval batches (magnet.data.build_eval_loader).
        eval_cfg: protocol and threshold.
        split: name used in the metric keys.
        device: where the model runs.
        precision: 'bf16' autocasts on GPU.
        keep_examples: samples of the first batch kept for the picture.
        keep_rows: keep a row per sample of this rank (the per-expression table).
        keep_worst: this rank's samples with the lowest IoU kept for a picture of failures.
    """
    was_training = model.training
    model.eval()
    scores = IoUAccumulator()
    examples: list[Example] = []
    rows: list[dict[str, Any]] = []
    worst: list[tuple[float, Example]] = []
    for batch in batches:
        with _autocast(device, precision):
            out = model(
                batch["image"].to(device, non_blocking=True),
                batch["input_ids"].to(device, non_blocking=True),
                batch["attention_mask"].to(device, non_blocking=True),
            )
        logits = out.mask_logits.float()  # [B,1,S/4,S/4]
        if eval_cfg.protocol == "original":
            inter, union = intersection_union_per_size(logits, batch["orig_mask"], eval_cfg.threshold)
        else:
            inter, union = intersection_union(logits, batch["mask"].to(device), eval_cfg.threshold)
        scores.update(inter, union)
        if keep_rows or keep_worst:
            ious = iou(inter, union).tolist()
            rows += _sample_rows(batch, ious) if keep_rows else []
            if keep_worst:
                worst = _keep_worst(worst, batch, logits.cpu(), ious, keep_worst, eval_cfg.threshold)
        if len(examples) < keep_examples:
            examples += _examples(batch, logits.cpu(), keep_examples - len(examples), eval_cfg.threshold)
    scores.all_reduce()
    model.train(was_training)
    worst_examples = [example for _, example in worst]
    return SplitResult(split=split, scores=scores, examples=examples, rows=rows, worst=worst_examples)


def evaluate(
    model: nn.Module,
    shards: str,
    cfg: Config,
    *,
    splits: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    keep_examples: int = 0,
    keep_rows: bool = False,
    keep_worst: int = 0,
) -> Evaluation:
    """Evaluate on whole splits of a prepared dataset; call on every rank (the sums are all-reduced).

    Args:
        model: MagNet, unwrapped.
        shards: prepared dataset root ``<out>/<dataset>-<splitBy>`` (directory or URL).
        cfg: the run's config: model.image_size, data (batch size, loader workers, checksums), eval.
        splits: split names; None = cfg.data.eval_splits.
        device: where the model runs.
        rank, world_size: this rank's share of every split.
        keep_examples: samples per split kept (on this rank) for the picture.
        keep_rows, keep_worst: per-expression rows and lowest-IoU examples kept (on this rank).

    Returns:
        Evaluation with metrics ``<split>/oIoU`` etc., the same on every rank.
    """
    device = torch.device(device)
    results: dict[str, SplitResult] = {}
    metrics: dict[str, float] = {}
    for split in splits if splits is not None else cfg.data.eval_splits:
        split_shards = open_split(
            shards, split, verify=cfg.data.verify_checksums, skip_corrupt=cfg.data.skip_corrupt_shards
        )
        loader = build_eval_loader(
            split_shards,
            cfg.data,
            cfg.eval,
            image_size=cfg.model.image_size,
            rank=rank,
            world_size=world_size,
        )
        result = evaluate_split(
            model,
            loader,
            cfg.eval,
            split=split,
            device=device,
            precision=cfg.train.precision,
            keep_examples=keep_examples,
            keep_rows=keep_rows,
            keep_worst=keep_worst,
        )
        results[split] = result
        metrics.update({f"{split}/{name}": value for name, value in result.scores.compute().items()})
    return Evaluation(
        protocol=cfg.eval.protocol,
        eval_size=cfg.eval.eval_size if cfg.eval.protocol == "lavt" else None,
        threshold=cfg.eval.threshold,
        metrics=metrics,
        splits=results,
    )


def prediction_figure(examples: Sequence[Example], title: str = "") -> bytes:
    """PNG of examples, one row each: the image with its expression, the prediction (red) and the
    ground truth (green) overlaid side by side."""
    from matplotlib.figure import Figure  # drawn with the Agg canvas; no pyplot state, no display

    if not examples:
        raise ValueError("no examples to draw")
    fig = Figure(figsize=(9, 3 * len(examples)))
    axes = fig.subplots(len(examples), 3, squeeze=False)
    for row, ex in zip(axes, examples, strict=True):
        for ax, mask, colour, label in (
            (row[0], None, None, ex.text),
            (row[1], ex.pred, (1.0, 0.1, 0.1), "predicted"),
            (row[2], ex.target, (0.1, 0.9, 0.1), "ground truth"),
        ):
            shown = ex.image
            if mask is not None:
                shown = np.where(mask[..., None], 0.45 * ex.image + 0.55 * np.array(colour), ex.image)
            ax.imshow(shown)
            ax.set_title(label, fontsize=9, wrap=True)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()

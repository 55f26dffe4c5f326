"""Referring-segmentation scores: per-sample intersection and union, and the split-level metrics.

The protocol (../shared/design/refcoco-data-and-eval.md): mask logits are upsampled bilinearly to
the target's size and thresholded on the probability (> threshold); per sample I = |pred & gt|,
U = |pred | gt| and IoU = I / U (0 where U = 0). Over a split: oIoU = sum I / sum U, mIoU = mean
IoU, P@t = share of samples with IoU >= t. Scores are reported in percent, like the papers.

Everything a split-level metric needs is a sum, so workers each accumulate their share of the
samples and one all_reduce of the sums gives the exact split metrics.

Shapes: B batch, h x w logit grid (S/4), H x W target size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

PRECISION_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def predict_masks(logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Binary masks at ``size`` from mask logits.

    Args:
        logits: [B,1,h,w] mask logits.
        size: (H, W) of the target.
        threshold: probability above which a pixel is foreground (strictly greater).

    Returns:
        bool [B,H,W].
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"mask logits must be [B,1,h,w], got {tuple(logits.shape)}")
    upsampled = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)  # [B,1,H,W]
    return upsampled.sigmoid()[:, 0] > threshold  # [B,H,W]


def intersection_union(
    logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample intersection and union (pixel counts) of predicted and true masks of one size.

    Args:
        logits: [B,1,h,w] mask logits.
        target: [B,H,W] true masks, nonzero = foreground.
        threshold: probability threshold of the prediction.

    Returns:
        (I, U), each float64 [B].
    """
    if target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be [B,H,W] with B={logits.shape[0]}, got {tuple(target.shape)}")
    pred = predict_masks(logits, (target.shape[-2], target.shape[-1]), threshold)  # [B,H,W]
    gt = target.to(pred.device) > 0
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return inter, union


def intersection_union_per_size(
    logits: torch.Tensor, targets: Sequence[torch.Tensor], threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`intersection_union` for targets of different sizes (the original-size protocol).

    Args:
        logits: [B,1,h,w] mask logits.
        targets: B masks, each [H_i,W_i].
        threshold: probability threshold of the prediction.

    Returns:
        (I, U), each float64 [B].
    """
    if len(targets) != logits.shape[0]:
        raise ValueError(f"got {len(targets)} target masks for {logits.shape[0]} predictions")
    pairs = [intersection_union(logits[i : i + 1], t[None], threshold) for i, t in enumerate(targets)]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def iou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU, 0 where the union is empty (both masks empty scores 0, as in LAVT)."""
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


class IoUAccumulator:
    """Running sums over a split: sum I, sum U, sum IoU, sample count, and hits per threshold.

    The sums live in one float64 vector so merging two accumulators, or all ranks' with one
    all_reduce, gives exactly the metrics of all their samples together.

    Args:
        thresholds: IoU thresholds of the precision metrics (a hit is IoU >= t).
    """

    def __init__(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        # [sum_I, sum_U, sum_IoU, count, hits@t...]
        self.sums = torch.zeros(4 + len(self.thresholds), dtype=torch.float64)

    def update(self, inter: torch.Tensor, union: torch.Tensor) -> None:
        """Add a batch of per-sample intersections and unions (float [B] each)."""
        inter, union = inter.detach().double().cpu(), union.detach().double().cpu()
        scores = iou(inter, union)
        hits = [(scores >= t).sum() for t in self.thresholds]
        batch = torch.stack([inter.sum(), union.sum(), scores.sum(), torch.tensor(float(len(scores))), *hits])
        self.sums += batch.double()

    def merge(self, other: IoUAccumulator) -> None:
        """Add another accumulator's sums (same thresholds) into this one."""
        if other.thresholds != self.thresholds:
            raise ValueError(f"cannot merge thresholds {other.thresholds} into {self.thresholds}")
        self.sums += other.sums

    def all_reduce(self) -> None:
        """Sum the accumulators of all ranks in place; a no-op outside torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        sums = self.sums.to(device) if device is not None else self.sums.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self.sums = sums.cpu()

    @property
    def count(self) -> int:
        return int(self.sums[3].item())

    def compute(self) -> dict[str, float]:
        """oIoU, mIoU and P@t in percent, and the sample count ``n``."""
        sum_i, sum_u, sum_iou, count = (float(v) for v in self.sums[:4])
        if count == 0:
            raise ValueError("no samples were scored")
        metrics = {
            "oIoU": 100.0 * sum_i / sum_u if sum_u > 0 else 0.0,
            "mIoU": 100.0 * sum_iou / count,
        }
        for t, hits in zip(self.thresholds, self.sums[4:].tolist(), strict=True):
            metrics[f"P@{t:g}"] = 100.0 * hits / count
        metrics["n"] = count
        return metrics

"""Referring-segmentation scores: per-sample intersection and union, and the split-level metrics.

The protocol (../shared/design/refcoco-data-and-eval.md): mask logits are upsampled bilinearly to
the target's size and thresholded on the probability (> threshold); per sample I = |pred & gt|,
U = |pred | gt| and IoU = I / U (0 where U = 0). Over a split: oIoU = sum I / sum U, mIoU = mean
IoU, P@t = share of samples with IoU >= t. Scores are reported in percent, like the papers.
LAVT and MagNet upsample with ``align_corners=True`` (reference-forward.md, point 17).

Where the shards carry every object of the image, two more tell a wrong object from a poor mask
(no RIS codebase reports them): the prediction *picks* the object it has the highest IoU with,
strictly above every other object of the image (a tie or an empty prediction picks none);
pick_acc = share of samples whose prediction picks the referred object, outline_IoU = mean IoU
over those samples (how well the right object is outlined once found).

Everything a split-level metric needs is a sum, so workers each accumulate their share of the
samples and one all_reduce of the sums gives the exact split metrics. ``GroupScores`` keeps the
same sums per group of samples (a kind of expression), so the breakdown is exact too.

Shapes: B batch, h x w logit grid (S/4), H x W target size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

PRECISION_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
GROUP_METRICS: tuple[str, ...] = ("oIoU", "mIoU", "pick_acc", "outline_IoU", "n")
PICK_METRICS: tuple[str, ...] = ("pick_acc", "outline_IoU")
"""Only where the shards carry the images' objects; outline_IoU only where some sample was picked right."""


def predict_masks(
    logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.5, align_corners: bool = False
) -> torch.Tensor:
    """Binary masks at ``size`` from mask logits.

    Args:
        logits: [B,1,h,w] mask logits.
        size: (H, W) of the target.
        threshold: probability above which a pixel is foreground (strictly greater).
        align_corners: of the bilinear upsampling; True is what LAVT and MagNet score with.

    Returns:
        bool [B,H,W].
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"mask logits must be [B,1,h,w], got {tuple(logits.shape)}")
    upsampled = F.interpolate(
        logits.float(), size=size, mode="bilinear", align_corners=align_corners
    )  # [B,1,H,W]
    return upsampled.sigmoid()[:, 0] > threshold  # [B,H,W]


def intersection_union(
    logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5, align_corners: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample intersection and union (pixel counts) of predicted and true masks of one size.

    Args:
        logits: [B,1,h,w] mask logits.
        target: [B,H,W] true masks, nonzero = foreground.
        threshold: probability threshold of the prediction.
        align_corners: of the logits' bilinear upsampling to the target's size.

    Returns:
        (I, U), each float64 [B].
    """
    if target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be [B,H,W] with B={logits.shape[0]}, got {tuple(target.shape)}")
    pred = predict_masks(logits, (target.shape[-2], target.shape[-1]), threshold, align_corners)  # [B,H,W]
    gt = target.to(pred.device) > 0
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return inter, union


def intersection_union_per_size(
    logits: torch.Tensor, targets: Sequence[torch.Tensor], threshold: float = 0.5, align_corners: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`intersection_union` for targets of different sizes (the original-size protocol).

    Args:
        logits: [B,1,h,w] mask logits.
        targets: B masks, each [H_i,W_i].
        threshold: probability threshold of the prediction.
        align_corners: of the logits' bilinear upsampling to each target's size.

    Returns:
        (I, U), each float64 [B].
    """
    if len(targets) != logits.shape[0]:
        raise ValueError(f"got {len(targets)} target masks for {logits.shape[0]} predictions")
    pairs = [
        intersection_union(logits[i : i + 1], t[None], threshold, align_corners)
        for i, t in enumerate(targets)
    ]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def iou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU, 0 where the union is empty (both masks empty scores 0, as in LAVT)."""
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def picks_referred(pred: torch.Tensor, target: torch.Tensor, others: torch.Tensor) -> bool:
    """Whether a prediction picks the referred object: its IoU with the target is above 0 and
    strictly above its IoU with each other object of the image. IoU, not intersection, so that a
    big neighbour the prediction merely touches is not the one picked; a tie picks nothing.

    Args:
        pred: bool [H,W] predicted mask.
        target: [H,W] the referred object, nonzero = foreground.
        others: [K,H,W] the image's other objects (K may be 0), at the target's size.
    """
    objects = torch.cat([target[None].to(pred.device) > 0, others.to(pred.device) > 0])  # [1+K,H,W]
    inter = (objects & pred).flatten(1).sum(1).double()
    union = (objects | pred).flatten(1).sum(1).double()
    scores = iou(inter, union)  # [1+K]
    return bool(scores[0] > 0 and (scores[1:] < scores[0]).all())


def pick_outcomes(
    logits: torch.Tensor,
    targets: torch.Tensor | Sequence[torch.Tensor],
    others: Sequence[torch.Tensor],
    threshold: float = 0.5,
    align_corners: bool = False,
) -> torch.Tensor:
    """Per sample, whether its prediction picks the referred object (``picks_referred``), scored at
    its target's size as its IoU is.

    Args:
        logits: [B,1,h,w] mask logits.
        targets: [B,H,W], or B masks [H_i,W_i] (the original-size protocol).
        others: B tensors [K_i,H_i,W_i], each image's other objects at its target's size.
        threshold, align_corners: as for the IoU.

    Returns:
        bool [B].
    """
    if not len(targets) == len(others) == logits.shape[0]:
        raise ValueError(
            f"got {len(targets)} targets and {len(others)} object sets for {logits.shape[0]} predictions"
        )
    picked = []
    for i, (target, objects) in enumerate(zip(targets, others, strict=True)):
        size = (target.shape[-2], target.shape[-1])
        pred = predict_masks(logits[i : i + 1], size, threshold, align_corners)[0]  # [H,W]
        picked.append(picks_referred(pred, target, objects))
    return torch.tensor(picked, dtype=torch.bool)


def _all_reduce_sum(sums: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over all ranks (a copy); the tensor itself outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    reduced = sums.to(device) if device is not None else sums.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


class IoUAccumulator:
    """Running sums over a split: sum I, sum U, sum IoU, sample count, hits per threshold, and for
    pick accuracy the samples scored for it, those picked right and the sum of their IoU.

    The sums live in one float64 vector so merging two accumulators, or all ranks' with one
    all_reduce, gives exactly the metrics of all their samples together.

    Args:
        thresholds: IoU thresholds of the precision metrics (a hit is IoU >= t).
    """

    def __init__(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        # [sum_I, sum_U, sum_IoU, count, hits@t..., pick_count, picked, sum_IoU_picked]
        self.sums = torch.zeros(4 + len(self.thresholds) + 3, dtype=torch.float64)

    def update(self, inter: torch.Tensor, union: torch.Tensor, picked: torch.Tensor | None = None) -> None:
        """Add a batch of per-sample intersections and unions (float [B] each) and, where the
        image's objects are known, whether each sample picked the referred object (bool [B])."""
        inter, union = inter.detach().double().cpu(), union.detach().double().cpu()
        scores = iou(inter, union)
        hits = [(scores >= t).sum() for t in self.thresholds]
        pick = [torch.tensor(0.0)] * 3
        if picked is not None:
            picked = picked.detach().bool().cpu()
            pick = [torch.tensor(float(len(picked))), picked.sum(), scores[picked].sum()]
        count = torch.tensor(float(len(scores)))
        batch = torch.stack([inter.sum(), union.sum(), scores.sum(), count, *hits, *pick])
        self.sums += batch.double()

    def merge(self, other: IoUAccumulator) -> None:
        """Add another accumulator's sums (same thresholds) into this one."""
        if other.thresholds != self.thresholds:
            raise ValueError(f"cannot merge thresholds {other.thresholds} into {self.thresholds}")
        self.sums += other.sums

    def all_reduce(self) -> None:
        """Sum the accumulators of all ranks in place; a no-op outside torch.distributed."""
        self.sums = _all_reduce_sum(self.sums)

    @property
    def count(self) -> int:
        return int(self.sums[3].item())

    def compute(self) -> dict[str, float]:
        """oIoU, mIoU, pick_acc and outline_IoU (where scored: PICK_METRICS) and P@t in percent,
        and the sample count ``n``."""
        sum_i, sum_u, sum_iou, count = (float(v) for v in self.sums[:4])
        pick_count, picked, picked_iou = (float(v) for v in self.sums[-3:])
        if count == 0:
            raise ValueError("no samples were scored")
        metrics = {
            "oIoU": 100.0 * sum_i / sum_u if sum_u > 0 else 0.0,
            "mIoU": 100.0 * sum_iou / count,
        }
        if pick_count > 0:
            metrics["pick_acc"] = 100.0 * picked / pick_count
        if picked > 0:
            metrics["outline_IoU"] = 100.0 * picked_iou / picked
        for t, hits in zip(self.thresholds, self.sums[4:-3].tolist(), strict=True):
            metrics[f"P@{t:g}"] = 100.0 * hits / count
        metrics["n"] = count
        return metrics


class GroupScores:
    """An ``IoUAccumulator`` per group of samples (a kind of expression, a text feature).

    A sample counts in every group it belongs to, or in none. The groups are fixed up front, so
    every rank reduces a vector of the same shape even when its share lacks some group.

    Args:
        groups: group names, in the order they are reported.
        thresholds: IoU thresholds of the precision metrics.
    """

    def __init__(self, groups: Sequence[str], thresholds: Sequence[float] = PRECISION_THRESHOLDS) -> None:
        self.groups = {name: IoUAccumulator(thresholds) for name in groups}

    def update(
        self,
        inter: torch.Tensor,
        union: torch.Tensor,
        memberships: Sequence[Iterable[str]],
        picked: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: per-sample I and U (float [B] each), each sample's group names and, where
        known, whether it picked the referred object (bool [B])."""
        if len(memberships) != len(inter):
            raise ValueError(f"got group names of {len(memberships)} samples for {len(inter)} scores")
        names = [set(m) for m in memberships]
        for name, scores in self.groups.items():
            keep = torch.tensor([name in sample for sample in names], dtype=torch.bool)
            if keep.any():
                scores.update(inter[keep], union[keep], None if picked is None else picked.cpu()[keep])

    def merge(self, other: GroupScores) -> None:
        """Add another GroupScores of the same groups into this one."""
        if list(other.groups) != list(self.groups):
            raise ValueError(f"cannot merge groups {list(other.groups)} into {list(self.groups)}")
        for name, scores in self.groups.items():
            scores.merge(other.groups[name])

    def all_reduce(self) -> None:
        """Sum every group over all ranks with one all_reduce; a no-op outside torch.distributed."""
        if not self.groups:
            return
        stacked = _all_reduce_sum(torch.stack([s.sums for s in self.groups.values()]))  # [G, 4+T+3]
        for scores, sums in zip(self.groups.values(), stacked, strict=True):
            scores.sums = sums.clone()

    def compute(self) -> dict[str, dict[str, float]]:
        """oIoU, mIoU, pick_acc and outline_IoU where scored (percent) and n of every group that
        has samples, in the groups' order."""
        return {
            name: {key: value for key, value in scores.compute().items() if key in GROUP_METRICS}
            for name, scores in self.groups.items()
            if scores.count > 0
        }


# ------------------------------------------------------------------- text features (real data)
# Real RefCOCO-family expressions carry no kind, so the breakdown uses simple features of the text:
# a word from these lists (lower-cased, split on anything but letters and digits), and the length.
SPATIAL_WORDS: frozenset[str] = frozenset(
    """left right top bottom middle center centre front back behind above below under underneath beneath
    over near next beside between close closest far farther farthest further furthest upper lower side
    corner edge across leftmost rightmost topmost bottommost uppermost lowermost frontmost""".split()  # noqa: SIM905 (a word list reads better as text)
)
ORDINAL_WORDS: frozenset[str] = frozenset(
    """first second third fourth fifth sixth 1st 2nd 3rd 4th 5th 6th last leftmost rightmost topmost
    bottommost uppermost lowermost frontmost closest nearest farthest furthest largest biggest smallest
    tallest shortest longest highest lowest widest darkest lightest brightest oldest youngest""".split()  # noqa: SIM905
)
LENGTH_BUCKETS: tuple[tuple[int, int | None], ...] = ((0, 3), (4, 6), (7, 10), (11, None))
"""Word-count buckets (inclusive; None = no upper bound), named ``length_1-3`` ... ``length_11-plus``."""


def _bucket_name(low: int, high: int | None) -> str:
    return f"text/length_{max(low, 1)}-{high if high is not None else 'plus'}"


TEXT_GROUPS: tuple[str, ...] = (
    "text/spatial",
    "text/ordinal",
    "text/plain",
    *(_bucket_name(low, high) for low, high in LENGTH_BUCKETS),
)
"""The text-feature groups in report order: ``spatial`` names a spatial relation or position,
``ordinal`` an ordinal or superlative, ``plain`` neither; exactly one length bucket each."""

_WORD = re.compile(r"[a-z0-9]+")


def text_groups(raw: str) -> tuple[str, ...]:
    """The text-feature groups (``TEXT_GROUPS``) an expression belongs to."""
    words = _WORD.findall(raw.lower())
    groups = [
        name
        for name, vocabulary in (("text/spatial", SPATIAL_WORDS), ("text/ordinal", ORDINAL_WORDS))
        if vocabulary.intersection(words)
    ]
    if not groups:
        groups.append("text/plain")
    low, high = next(b for b in LENGTH_BUCKETS if b[1] is None or len(words) <= b[1])
    groups.append(_bucket_name(low, high))
    return tuple(groups)


def grid_ceiling(
    targets: Sequence[torch.Tensor], stride: int, threshold: float = 0.5, align_corners: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union of the best a model predicting on a grid ``stride`` times coarser can
    do, per target: each cell's logit is the covered fraction of the target's cell (the map a perfect
    model would output), upsampled and thresholded as the evaluation does. Its oIoU is the ceiling
    of a split's oIoU at that output stride (82 for the 64 px synthetic data at stride 4).

    Args:
        targets: true masks [H, W] whose sides are multiples of ``stride`` (the model's input size).
        stride: output stride of the mask logits (4 for MagNet).

    Returns:
        (I, U), each float64 [N].
    """
    inter, union = [], []
    for target in targets:
        gt = target.float()[None, None]  # [1, 1, H, W]
        covered = F.avg_pool2d(gt, stride).clamp(1e-4, 1 - 1e-4)  # [1, 1, H/s, W/s]
        i, u = intersection_union(torch.logit(covered), gt[:, 0], threshold, align_corners)
        inter.append(i)
        union.append(u)
    return torch.cat(inter), torch.cat(union)

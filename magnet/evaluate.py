"""Evaluation over whole splits, sharded over ranks, and the picture of predictions.

Every expression of a split is scored once: the eval loader gives each rank a contiguous block,
each rank sums intersections and unions, and one all_reduce per split gives exact split metrics
(see magnet.metrics). Two protocols (../shared/design/refcoco-data-and-eval.md):

- ``lavt`` (default, LAVT and MagNet, reference-forward.md point 17): the ground truth resized
  (nearest) to the model's input size (480, or 448 for the combined-data model), logits upsampled
  to it bilinearly with align_corners=True;
- ``original`` (CRIS, CGFormer): logits upsampled (align_corners=False) to each image's own size,
  compared with the original mask.

Every result names its protocol and the mask convention the shards were prepared with
(summary.json ``settings.mask_mode``: union, or refer as LAVT / MagNet), and breaks the scores down
by kind of expression: the generator's kinds where the manifest has a ``kind`` column (synthetic
data), else simple features of the text (magnet.metrics.TEXT_GROUPS). Where the shards carry every
object of each image (format 3 on), the scores add pick accuracy and outline IoU (magnet.metrics):
wrong object, or bad mask?
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.contract import MANIFEST, read_summary
from magnet.config import Config, EvalConfig
from magnet.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_loader, open_split
from magnet.metrics import (
    GROUP_METRICS,
    PICK_METRICS,
    TEXT_GROUPS,
    GroupScores,
    IoUAccumulator,
    intersection_union,
    intersection_union_per_size,
    iou,
    pick_outcomes,
    predict_masks,
    text_groups,
)

ALIGN_CORNERS: dict[str, bool] = {"lavt": True, "original": False}
"""The logits' bilinear upsampling per protocol: LAVT and MagNet align corners, CRIS does not."""
PREDICTION_FILL = (1.0, 0.1, 0.1)
TRUTH_OUTLINE = (0.0, 0.85, 1.0)
"""The ground truth's outline in prediction pictures: cyan, a colour no synthetic scene uses
(data_prep.scenes.COLOURS), so it reads as a line and not as one more shape."""

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One scored sample kept for the picture: image [S,S,3] in [0,1], its text and both masks [S,S]."""

    image: np.ndarray
    text: str
    pred: np.ndarray
    target: np.ndarray


@dataclass(frozen=True)
class Breakdown:
    """The groups a split's samples are scored in besides the whole split.

    ``by`` is 'kind' (the synthetic generator's kinds, the manifest's ``kind`` column) or 'text'
    (features of the expression); group names carry it as a prefix ('kind/relation').
    """

    by: str
    groups: tuple[str, ...]
    of_sample: Mapping[int, tuple[str, ...]]  # sent_id -> the groups it counts in


@dataclass
class SplitResult:
    """Sums of one split and of its groups (already reduced across ranks); this rank's examples,
    and on request its per-expression rows (sent_id, image_id, raw, iou, area, picked: None where
    the shards lack the images' objects) and lowest-IoU examples."""

    split: str
    scores: IoUAccumulator
    groups: GroupScores = field(default_factory=lambda: GroupScores(()))
    examples: list[Example] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    worst: list[Example] = field(default_factory=list)


@dataclass
class Evaluation:
    """Metrics of every evaluated split, and how they were scored.

    ``metrics`` keys are ``<split>/<name>``: oIoU, mIoU, P@0.5 ... P@0.9 (percent) and n (samples),
    pick_acc and outline_IoU (percent) where the shards carry the images' objects, and per group
    ``<split>/<group>/<oIoU|mIoU|pick_acc|outline_IoU|n>`` with group 'kind/<kind>' or 'text/<feature>'.
    """

    protocol: str
    eval_size: int | None  # the comparison size of the lavt protocol; None for 'original'
    threshold: float
    metrics: dict[str, float]
    splits: dict[str, SplitResult]
    mask_mode: str | None = None  # the shards' mask convention (summary.json); None if not recorded
    breakdown: str | None = None  # 'kind' or 'text': what the group metrics are grouped by

    @property
    def align_corners(self) -> bool:
        return ALIGN_CORNERS[self.protocol]

    def as_dict(self) -> dict[str, Any]:
        """What a metrics.json holds: the protocol, the mask convention, the description and the
        metrics (the group metrics among them)."""
        return {
            "protocol": self.protocol,
            "eval_size": self.eval_size,
            "align_corners": self.align_corners,
            "threshold": self.threshold,
            "mask_mode": self.mask_mode,
            "breakdown": self.breakdown,
            "description": self.describe(),
            "metrics": self.metrics,
        }

    def describe(self) -> str:
        """One line naming the protocol and the mask convention, for every report."""
        where = f"{self.eval_size}x{self.eval_size}" if self.eval_size else "each image's original size"
        return (
            f"protocol {self.protocol}: IoU at {where} (logits bilinear, align_corners="
            f"{self.align_corners}), probability > {self.threshold}; masks {self.mask_mode or 'unrecorded'}"
        )


def breakdown_rows(metrics: Mapping[str, float]) -> list[dict[str, Any]]:
    """The breakdown table of flat metrics (``Evaluation.metrics``, or merged from several):
    per split a row 'all' and one per group, each with oIoU, mIoU, n and, where scored, pick_acc and
    outline_IoU, in the metrics' order."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in metrics.items():
        split, *group, name = key.split("/")  # '<split>/<name>' or '<split>/<prefix>/<group>/<name>'
        if name in GROUP_METRICS and len(group) in (0, 2):
            group_name = "/".join(group) or "all"
            rows.setdefault((split, group_name), {"split": split, "group": group_name})[name] = value
    return list(rows.values())


def mixed_precision(device: torch.device, precision: str) -> Any:
    """bf16 autocast on GPU only: CPU bf16 is slow and changes results for no gain."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _denormalise(images: torch.Tensor) -> np.ndarray:
    """[B,3,S,S] ImageNet-normalised -> [B,S,S,3] in [0,1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _examples(
    batch: Mapping[str, Any], logits: torch.Tensor, count: int, threshold: float, align_corners: bool
) -> list[Example]:
    """The first ``count`` samples of a batch, masks brought to the image's size S."""
    images = batch["image"][:count]
    size = (images.shape[-2], images.shape[-1])
    pred = predict_masks(logits[:count], size, threshold, align_corners).cpu().numpy()  # [k,S,S]
    target = F.interpolate(batch["mask"][:count, None].float(), size=size, mode="nearest")[:, 0]  # [k,S,S]
    return [
        Example(image=img, text=text, pred=p, target=t)
        for img, text, p, t in zip(
            _denormalise(images), batch["raw"][:count], pred, target.numpy() > 0, strict=True
        )
    ]


def _sample_rows(
    batch: Mapping[str, Any], ious: list[float], picked: torch.Tensor | None
) -> list[dict[str, Any]]:
    """One row per sample; ``area`` is the referred object's share of the image (eval-size mask),
    ``picked`` whether the prediction picked it (None where the image's objects are unknown)."""
    areas = batch["mask"].flatten(1).float().mean(1).tolist()  # [B]
    picks = picked.tolist() if picked is not None else [None] * len(ious)
    return [
        {"sent_id": int(sent), "image_id": int(image), "raw": raw, "iou": value, "area": area, "picked": pick}
        for sent, image, raw, value, area, pick in zip(
            batch["sent_id"], batch["image_id"], batch["raw"], ious, areas, picks, strict=True
        )
    ]


def _keep_worst(
    worst: list[tuple[float, Example]],
    batch: Mapping[str, Any],
    logits: torch.Tensor,
    ious: list[float],
    count: int,
    threshold: float,
    align_corners: bool,
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
    fresh = _examples(chosen, logits[picks], len(picks), threshold, align_corners)
    return sorted([*worst, *zip((ious[i] for i in picks), fresh, strict=True)], key=lambda p: p[0])[:count]


def _picture_picks(
    batch: Mapping[str, Any],
    groups_of: Callable[[int], tuple[str, ...]],
    shown_images: set[int],
    unshown_groups: set[str],
    count: int,
) -> tuple[list[int], list[int]]:
    """Samples of a batch for the picture: each from an image not shown yet and, while some group
    (kind of expression) has no example, one that adds a group. Returns (picks, spares): spares
    are new-image samples that add no group (one per image), kept in case a group never comes."""
    picks: list[int] = []
    spares: dict[int, int] = {}  # image -> its first sample
    for index, (sent, image) in enumerate(zip(batch["sent_id"], batch["image_id"], strict=True)):
        if len(picks) == count:
            break
        if int(image) in shown_images:
            continue
        adds = unshown_groups.intersection(groups_of(int(sent)))
        if adds or not unshown_groups:
            picks.append(index)
            unshown_groups -= adds
            shown_images.add(int(image))
        else:
            spares.setdefault(int(image), index)
    return picks, [index for image, index in spares.items() if image not in shown_images]


def _examples_at(
    batch: Mapping[str, Any],
    logits: torch.Tensor,
    picks: Sequence[int],
    threshold: float,
    align_corners: bool,
) -> list[Example]:
    """``_examples`` of the samples at ``picks`` (none for no picks)."""
    if not picks:
        return []
    chosen = {
        "image": batch["image"][picks],
        "mask": batch["mask"][picks],
        "raw": [batch["raw"][i] for i in picks],
    }
    return _examples(chosen, logits[picks].cpu(), len(picks), threshold, align_corners)


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
    breakdown: Breakdown | None = None,
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
        keep_examples: samples kept for the picture, from different images and covering every
            group of ``breakdown`` (kind of expression) while examples remain.
        breakdown: the groups each sample (by sent_id) is also scored in; None = none.
        keep_rows: keep a row per sample of this rank (the per-expression table).
        keep_worst: this rank's samples with the lowest IoU kept for a picture of failures.
    """
    was_training = model.training
    model.eval()
    align_corners = ALIGN_CORNERS[eval_cfg.protocol]
    scores = IoUAccumulator()
    groups = GroupScores(breakdown.groups if breakdown is not None else ())
    examples: list[Example] = []
    spare_examples: dict[int, Example] = {}  # image -> an example adding no kind: a fallback
    shown_images: set[int] = set()
    unshown_groups = set(groups.groups)
    groups_of = (
        (lambda sent: breakdown.of_sample.get(sent, ())) if breakdown is not None else (lambda sent: ())
    )
    rows: list[dict[str, Any]] = []
    worst: list[tuple[float, Example]] = []
    for batch in batches:
        with mixed_precision(device, precision):
            out = model(
                batch["image"].to(device, non_blocking=True),
                batch["input_ids"].to(device, non_blocking=True),
                batch["attention_mask"].to(device, non_blocking=True),
            )
        logits = out.mask_logits.float()  # [B,1,S/4,S/4]
        if eval_cfg.protocol == "original":
            targets = batch["orig_mask"]
            inter, union = intersection_union_per_size(logits, targets, eval_cfg.threshold, align_corners)
        else:
            targets = batch["mask"].to(device)
            inter, union = intersection_union(logits, targets, eval_cfg.threshold, align_corners)
        picked = None
        if "others" in batch:  # shards that carry every object of the image
            picked = pick_outcomes(logits, targets, batch["others"], eval_cfg.threshold, align_corners)
        scores.update(inter, union, picked)
        if breakdown is not None:
            memberships = [breakdown.of_sample.get(int(i), ()) for i in batch["sent_id"]]
            groups.update(inter, union, memberships, picked)
        if keep_rows or keep_worst:
            ious = iou(inter, union).tolist()
            rows += _sample_rows(batch, ious, picked) if keep_rows else []
            if keep_worst:
                worst = _keep_worst(
                    worst, batch, logits.cpu(), ious, keep_worst, eval_cfg.threshold, align_corners
                )
        if len(examples) < keep_examples:
            count = keep_examples - len(examples)
            picks, spares = _picture_picks(batch, groups_of, shown_images, unshown_groups, count)
            spares = [i for i in spares if int(batch["image_id"][i]) not in spare_examples]
            spares = spares[: keep_examples - len(spare_examples)]
            examples += _examples_at(batch, logits, picks, eval_cfg.threshold, align_corners)
            fresh = _examples_at(batch, logits, spares, eval_cfg.threshold, align_corners)
            spare_examples.update(zip((int(batch["image_id"][i]) for i in spares), fresh, strict=True))
    top_up = [example for image, example in spare_examples.items() if image not in shown_images]
    examples += top_up[: keep_examples - len(examples)]
    scores.all_reduce()
    groups.all_reduce()
    model.train(was_training)
    worst_examples = [example for _, example in worst]
    return SplitResult(
        split=split, scores=scores, groups=groups, examples=examples, rows=rows, worst=worst_examples
    )


def split_breakdowns(shards: str, splits: Sequence[str]) -> tuple[str, dict[str, Breakdown]]:
    """What the data is broken down by ('kind' where preparation carried the generator's ``kind``
    column, synthetic data; else 'text', the expression's features) and each split's breakdown."""
    with fsspec.open(f"{shards.rstrip('/')}/{MANIFEST}", "rb") as handle:
        manifest = pq.ParquetFile(handle)
        by = "kind" if "kind" in manifest.schema_arrow.names else "text"
        columns = ["split", "sent_id", "kind" if by == "kind" else "raw"]
        rows = manifest.read(columns=columns).to_pydict()
    of_split: dict[str, dict[int, tuple[str, ...]]] = {split: {} for split in splits}
    for split, sent_id, value in zip(*rows.values(), strict=True):
        if split in of_split:
            if by == "text":
                of_split[split][sent_id] = text_groups(value)
            elif value is not None:
                of_split[split][sent_id] = (f"kind/{value}",)
    breakdowns = {}
    for split, of_sample in of_split.items():
        groups = TEXT_GROUPS if by == "text" else tuple(sorted({g for gs in of_sample.values() for g in gs}))
        breakdowns[split] = Breakdown(by, groups, of_sample)
    return by, breakdowns


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
        Evaluation with metrics ``<split>/oIoU`` etc. and ``<split>/<group>/oIoU`` etc., the same on
        every rank.
    """
    device = torch.device(device)
    splits = list(splits if splits is not None else cfg.data.eval_splits)
    size = cfg.eval.size_for(cfg.model.image_size)
    settings = read_summary(shards).settings
    breakdown_by, breakdowns = split_breakdowns(shards, splits)
    results: dict[str, SplitResult] = {}
    metrics: dict[str, float] = {}
    for split in splits:
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
            breakdown=breakdowns[split],
            keep_rows=keep_rows,
            keep_worst=keep_worst,
        )
        results[split] = result
        metrics.update({f"{split}/{name}": value for name, value in result.scores.compute().items()})
        for group, values in result.groups.compute().items():
            metrics.update({f"{split}/{group}/{name}": value for name, value in values.items()})
    unpicked = [split for split in splits if f"{split}/{PICK_METRICS[0]}" not in metrics]
    if unpicked and rank == 0:
        _note_no_objects(shards, tuple(unpicked))
    return Evaluation(
        protocol=cfg.eval.protocol,
        eval_size=size if cfg.eval.protocol == "lavt" else None,
        threshold=cfg.eval.threshold,
        metrics=metrics,
        splits=results,
        mask_mode=settings.mask_mode,
        breakdown=breakdown_by,
    )


@functools.cache
def _note_no_objects(shards: str, splits: tuple[str, ...]) -> None:
    """Say once per process and data (an evaluation runs every eval_every steps) why the pick
    metrics are missing."""
    log.warning(
        "%s: the shards of %s carry no objects of the images (prepared before shard format 3): "
        "pick_acc and outline_IoU left out; prepare the data again to have them",
        shards,
        ", ".join(splits),
    )


def prediction_figure(examples: Sequence[Example], title: str = "") -> bytes:
    """PNG of examples, one row each: the image with its expression, the prediction (red fill) and
    the image alone, both with the ground truth's outline (TRUTH_OUTLINE): a filled truth looked
    like one more shape of the scene."""
    from matplotlib.figure import Figure  # drawn with the Agg canvas; no pyplot state, no display

    if not examples:
        raise ValueError("no examples to draw")
    fig = Figure(figsize=(9, 3 * len(examples)))
    axes = fig.subplots(len(examples), 3, squeeze=False)
    for row, ex in zip(axes, examples, strict=True):
        predicted = np.where(ex.pred[..., None], 0.45 * ex.image + 0.55 * np.array(PREDICTION_FILL), ex.image)
        for ax, shown, label, outline in (
            (row[0], ex.image, ex.text, False),
            (row[1], predicted, "predicted (red), truth (outline)", True),
            (row[2], ex.image, "ground truth (outline)", True),
        ):
            ax.imshow(shown)
            if outline and ex.target.any():
                ax.contour(ex.target.astype(np.float32), levels=[0.5], colors=[TRUTH_OUTLINE], linewidths=1.5)
            ax.set_title(label, fontsize=9, wrap=True)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()

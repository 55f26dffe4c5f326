"""Synthetic RefCOCO: flat-shape scenes written byte for byte in the `refer` toolkit's layout.

    <out>/refcoco/instances.json
    <out>/refcoco/refs(unc).p
    <out>/refcoco/kinds(unc).json
    <out>/images/mscoco/images/train2014/COCO_train2014_%012d.jpg
    <out>/synth_report.json

so the real-data path (reader, shards, training, evaluation) runs unchanged on it. Each image
is generated from its own seed ``(seed, index)``, in chunks across worker processes, and ids
are numbered in image order afterwards: the bytes depend only on the arguments, never on the
worker count. ``synth_report.json`` holds the scores of two language-blind baselines (the
largest object; a random object), the floor a model that reads the expression must beat, over
each split and each kind of expression. The refer layout has no field for what a sentence
tests, so ``kinds(unc).json`` lies beside it: per sent_id its kind (data_prep.scenes.KINDS) and
the words that carry it; preparation carries the kind into the manifest (``data_prep.refer.load_kinds``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_prep.processes import leave_sigint_to_parent
from data_prep.refer import IMAGE_SUBDIR, kinds_path
from data_prep.scenes import (
    COLOURS,
    KINDS,
    SHAPES,
    Expression,
    Scene,
    carrier_words,
    kind_of,
    make_scene,
    referring_expressions,
    render,
)

SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")
PICKLE_PROTOCOL = 4
JPEG_QUALITY = 92
MAX_REFS_PER_IMAGE = 3
MAX_EXPRESSIONS_PER_REF = 3
CATEGORIES: list[dict] = [
    {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)
]
CATEGORY_ID: dict[str, int] = {c["name"]: c["id"] for c in CATEGORIES}


def split_of(index: int) -> str:
    """70/10/10/10 by image: fixed by the index, so every split is filled from 10 images on."""
    return SPLITS[max(index % 10 - 6, 0)]


def image_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def scene_for(seed: int, index: int, image_size: int) -> Scene:
    """The scene of image ``index``: a pure function of its arguments (tests regenerate it)."""
    return make_scene(np.random.default_rng([seed, index, 0]), image_size)


@dataclass
class KindStats:
    """The expressions of one kind in a split, and the two baselines' overall IoU on them."""

    n_expressions: int = 0
    baseline_largest_oiou: float = 0.0
    baseline_random_oiou: float = 0.0


@dataclass
class SplitStats:
    """One split's size and the overall IoU of the two language-blind baselines, also per kind."""

    n_images: int = 0
    n_refs: int = 0
    n_expressions: int = 0
    baseline_largest_oiou: float = 0.0
    baseline_random_oiou: float = 0.0
    kinds: dict[str, KindStats] = field(default_factory=dict)


@dataclass
class SynthReport:
    """What ``synthesize`` wrote; ``splits`` carries the language-blind baselines."""

    out: str
    num_images: int
    image_size: int
    seed: int
    protocol: str = "original-size"
    splits: dict[str, SplitStats] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        """The report without run-dependent fields (where, how long), so the file is reproducible."""
        out = asdict(self)
        del out["out"], out["seconds"]
        return out


# ----------------------------------------------------------------------------------- per image
def _draw(scene: Scene, masks: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """Light textured background (gradient + noise) with each object's colour painted on its
    pycocotools mask, so the annotation is exactly the drawn region (PIL's own polygon fill is
    about half a pixel fatter, which costs small shapes a quarter of their IoU)."""
    s = scene.image_size
    base = rng.uniform(185, 235, size=3).astype(np.float32)
    tilt = rng.uniform(-25, 25, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(-0.5, 0.5, s, dtype=np.float32)
    pixels = base + ramp[:, None, None] * tilt[0] + ramp[None, :, None] * tilt[1]  # [S, S, 3]
    for obj, mask in zip(scene.objects, masks, strict=True):
        pixels[mask] = COLOURS[obj.colour]
    pixels += rng.integers(-6, 7, size=(s, s, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _rle(polygon: tuple[float, ...], size: int) -> dict:
    return mask_utils.merge(mask_utils.frPyObjects([list(polygon)], size, size))


@dataclass(frozen=True)
class RenderedScene:
    """Image ``index`` of a seed as drawn: the scene, each object's RLE and mask, and the image."""

    scene: Scene
    rles: list[dict]
    masks: list[np.ndarray]
    image: Image.Image


def render_scene(seed: int, index: int, image_size: int) -> tuple[RenderedScene, np.random.Generator]:
    """Draw image ``index`` (a pure function of the arguments); also returns the image's rng, which
    the caller goes on drawing from (expressions, baselines). Shared with the vision pretraining
    (magnet.pretrain), whose scenes are this data's without the language."""
    scene = scene_for(seed, index, image_size)
    rng = np.random.default_rng([seed, index, 1])
    rles = [_rle(o.polygon, image_size) for o in scene.objects]
    masks = [mask_utils.decode(r).astype(bool) for r in rles]  # [S, S] each
    return RenderedScene(scene, rles, masks, _draw(scene, masks, rng)), rng


def _make_image(seed: int, index: int, image_size: int, image_dir: Path) -> dict:
    """Render, save and describe image ``index``; ids are local (object order), numbered later."""
    rendered, rng = render_scene(seed, index, image_size)
    scene, rles, masks = rendered.scene, rendered.rles, rendered.masks
    image_id = index + 1
    rendered.image.save(image_dir / image_file_name(image_id), quality=JPEG_QUALITY, subsampling=0)
    areas = [float(mask_utils.area(r)) for r in rles]
    objects = [
        {
            "category_id": CATEGORY_ID[o.shape],
            "segmentation": [list(o.polygon)],
            "bbox": [float(v) for v in mask_utils.toBbox(r)],
            "area": area,
        }
        for o, r, area in zip(scene.objects, rles, areas, strict=True)
    ]

    refs = []
    order = rng.permutation(len(scene.objects))
    for target in order:
        if len(refs) == MAX_REFS_PER_IMAGE:
            break
        by_kind = referring_expressions(scene, int(target))
        chosen = _choose(by_kind, rng)
        # Two expressions or more per ref; one only if the image would otherwise have no ref.
        if len(chosen) >= 2 or (chosen and not refs):
            refs.append(
                {
                    "object": int(target),
                    "sentences": [render(e) for e in chosen],
                    "kinds": [kind_of(e) for e in chosen],
                    "words": [list(carrier_words(e)) for e in chosen],
                }
            )

    # Language-blind baselines, one sample per expression as in the evaluation protocol; the
    # sums per kind [n, I largest, I random, U largest, U random] add up to the image's.
    largest = int(np.argmax(areas))
    per_kind = {kind: np.zeros(5) for kind in KINDS}
    for ref in refs:
        gt = masks[ref["object"]]
        for kind in ref["kinds"]:
            sums = per_kind[kind]
            sums[0] += 1
            for k, guess in enumerate((largest, int(rng.integers(len(masks))))):
                sums[1 + k] += np.logical_and(masks[guess], gt).sum()
                sums[3 + k] += np.logical_or(masks[guess], gt).sum()
    return {
        "image_id": image_id,
        "split": split_of(index),
        "objects": objects,
        "refs": refs,
        "baseline_sums": {kind: sums.tolist() for kind, sums in per_kind.items()},
    }


def _choose(by_kind: dict[str, list[Expression]], rng: np.random.Generator) -> list[Expression]:
    """Two or three expressions (fewer only if fewer exist), one per kind first, so the data mixes
    attributes, relations, ordinals and superlatives rather than repeating the easiest."""
    kinds = [k for k in by_kind if by_kind[k]]
    rng.shuffle(kinds)
    chosen: list[Expression] = []
    for kind in kinds:
        pool = by_kind[kind]
        chosen.append(pool[int(rng.integers(len(pool)))])
    by_text = {render(e): e for pool in by_kind.values() for e in pool}  # one text per expression
    leftovers = sorted(set(by_text) - {render(e) for e in chosen})
    while len(chosen) < 2 and leftovers:
        chosen.append(by_text[leftovers.pop(int(rng.integers(len(leftovers))))])
    want = int(rng.integers(2, MAX_EXPRESSIONS_PER_REF + 1))
    return chosen[:want]


def _make_chunk(args: tuple[int, list[int], int, str]) -> list[dict]:
    seed, indices, image_size, image_dir = args
    return [_make_image(seed, i, image_size, Path(image_dir)) for i in indices]


# ------------------------------------------------------------------------------------- writing
def _assemble(records: list[dict], image_size: int) -> tuple[dict, list[dict], list[dict]]:
    """instances.json, the refs list and the kinds list, with ids numbered in image order."""
    images, annotations, refs, kinds = [], [], [], []
    ann_id = ref_id = sent_id = 0
    for rec in records:
        image_id = rec["image_id"]
        images.append(
            {
                "id": image_id,
                "file_name": image_file_name(image_id),
                "height": image_size,
                "width": image_size,
            }
        )
        ann_ids = []
        for obj in rec["objects"]:
            ann_id += 1
            ann_ids.append(ann_id)
            annotations.append({"id": ann_id, "image_id": image_id, **obj, "iscrowd": 0})
        for ref in rec["refs"]:
            ref_id += 1
            target_ann = ann_ids[ref["object"]]
            sentences = []
            for text, kind, words in zip(ref["sentences"], ref["kinds"], ref["words"], strict=True):
                sent_id += 1
                sentences.append({"raw": text, "sent": text, "sent_id": sent_id, "tokens": text.split()})
                kinds.append({"sent_id": sent_id, "kind": kind, "words": words})
            refs.append(
                {
                    "ref_id": ref_id,
                    "ann_id": target_ann,
                    "image_id": image_id,
                    "category_id": rec["objects"][ref["object"]]["category_id"],
                    "split": rec["split"],
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "file_name": f"COCO_train2014_{image_id:012d}_{target_ann}.jpg",
                    "sentences": sentences,
                }
            )
    instances = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    return instances, refs, kinds


def _canonical_pickle(obj: list[dict]) -> bytes:
    """Pickle bytes that depend only on the values: pickle shares repeated objects by identity,
    and identity differs between a one-process and a multi-process run, so rebuild the
    object graph from its JSON text first."""
    return pickle.dumps(json.loads(json.dumps(obj)), protocol=PICKLE_PROTOCOL)


def _baseline_oiou(sums: np.ndarray) -> tuple[float, float]:
    """(largest, random) overall IoU from summed [n, I largest, I random, U largest, U random]."""
    oiou = np.divide(sums[1:3], sums[3:5], out=np.zeros(2), where=sums[3:5] > 0)
    return round(float(oiou[0]), 6), round(float(oiou[1]), 6)


def _split_stats(records: list[dict]) -> dict[str, SplitStats]:
    stats = {}
    for split in SPLITS:
        recs = [r for r in records if r["split"] == split]
        by_kind = {
            kind: np.sum([r["baseline_sums"][kind] for r in recs] or [np.zeros(5)], axis=0) for kind in KINDS
        }
        largest, random = _baseline_oiou(np.sum(list(by_kind.values()), axis=0))
        stats[split] = SplitStats(
            n_images=len(recs),
            n_refs=sum(len(r["refs"]) for r in recs),
            n_expressions=sum(len(ref["sentences"]) for r in recs for ref in r["refs"]),
            baseline_largest_oiou=largest,
            baseline_random_oiou=random,
            kinds={
                kind: KindStats(int(sums[0]), *_baseline_oiou(sums))
                for kind, sums in by_kind.items()
                if sums[0]
            },
        )
    return stats


def synthesize(
    out: Path,
    num_images: int = 200,
    image_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
) -> SynthReport:
    """Write a synthetic RefCOCO (unc) dataset under ``out``; returns the report it also saves.

    Args:
        out: dataset root (the refer toolkit's ``data_root``); created if missing.
        num_images: number of images (ids 1..num_images); splits 70/10/10/10 by image.
        image_size: side of the square images in pixels; every shape scales with it.
        seed: the only source of randomness: same arguments, same bytes.
        workers: processes rendering images (default: the usable CPUs); no effect on the output.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    out = Path(out)
    if (out / "refcoco" / "instances.json").exists() and not (out / "synth_report.json").exists():
        raise FileExistsError(
            f"{out} holds a refer dataset that synth did not write; refusing to overwrite it"
        )
    image_dir = out / IMAGE_SUBDIR
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / "refcoco").mkdir(parents=True, exist_ok=True)

    chunk = max(1, min(250, -(-num_images // (4 * workers))))
    jobs = [
        (seed, list(range(a, min(a + chunk, num_images))), image_size, str(image_dir))
        for a in range(0, num_images, chunk)
    ]
    if workers == 1 or len(jobs) == 1:
        chunks = [_make_chunk(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(workers, leave_sigint_to_parent) as pool:
            chunks = pool.map(_make_chunk, jobs)
    records = [rec for part in chunks for rec in part]
    # Images of an earlier, larger run into the same root would otherwise linger unlisted.
    written = {image_file_name(rec["image_id"]) for rec in records}
    for stale in image_dir.glob("COCO_train2014_*.jpg"):
        if stale.name not in written:
            stale.unlink()

    instances, refs, kinds = _assemble(records, image_size)
    (out / "refcoco" / "instances.json").write_text(json.dumps(instances, separators=(",", ":")))
    (out / "refcoco" / "refs(unc).p").write_bytes(_canonical_pickle(refs))
    kinds_path(out, "refcoco", "unc").write_text(json.dumps({"sentences": kinds}, separators=(",", ":")))
    report = SynthReport(str(out), num_images, image_size, seed, splits=_split_stats(records))
    (out / "synth_report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    report.seconds = time.perf_counter() - start
    return report

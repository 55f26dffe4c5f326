"""The shard reader: WebDataset shards written by ``data_prep.shards`` -> model-ready batches.

Preparation already did the slow work (tokens, masks, sizes), so this module only streams tar
members, decodes one JPEG and one PNG per sample, resizes and normalises. Batches follow the
contract in DEVELOPERS.md:

    image           float32 [B, 3, S, S]  ImageNet-normalised, PIL bilinear resize (aspect not kept)
    mask            float32 [B, S', S']   {0, 1}, nearest-neighbour resize (S' = S for training,
                                          the protocol's eval_size for evaluation)
    input_ids       int64   [B, L]
    attention_mask  int64   [B, L]
    sent_id, ref_id, image_id  int64 [B]
    raw             list[str]
    orig_mask       list of uint8 [H_i, W_i] in {0, 1} (evaluation, 'original' protocol only)
    others          list of uint8 [K_i, S', S'] (or [K_i, H_i, W_i] with orig_mask) in {0, 1}: the
                    image's other objects (evaluation, shards of format 3 on: pick accuracy)

How work is split. Every quantity comes from summary.json and manifest.parquet, so no process
has to scan the data to know its share. An epoch is a virtual sequence of *units* (samples, or
referred objects when one expression per object is drawn) over the shards in an epoch-shuffled
order. Training pads that sequence by wrapping around to ``world * batch * n`` units (as
``DistributedSampler`` does), gives each rank one contiguous range and each loader worker a
contiguous run of whole batches inside it: every rank yields exactly ``n`` full batches, every
unit is seen at least once per epoch, and each worker reads only the stretch of shards it needs.
Evaluation splits the split's fixed order into contiguous per-rank ranges without padding, so
every expression is evaluated exactly once.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import random
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.contract import (
    ATTENTION_MASK_MEMBER,
    IMAGE_MEMBERS,
    INPUT_IDS_MEMBER,
    MANIFEST,
    MASK_MEMBER,
    META_MEMBER,
    OBJECTS_MEMBER,
    SUMMARY,
    SampleMeta,
    ShardError,
    read_summary,
    shard_path,
    split_of,
)
from data_prep.images import decode_image
from data_prep.masks import decode_rles
from magnet.config import DataConfig, EvalConfig, TextConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIXEL_SCALE = 1 / (255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
_PIXEL_SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
_HASH_CHUNK = 1 << 20
_HASH_THREADS = 8


# ------------------------------------------------------------------------------ the shard set
@dataclass(frozen=True)
class ShardInfo:
    """One verified shard: where it is, and how many samples and referred objects it holds."""

    name: str  # path relative to the dataset root, e.g. 'train/shard-000000.tar'
    url: str  # local path or fsspec URL
    samples: int
    refs: int


@dataclass(frozen=True)
class SplitShards:
    """The readable shards of one split, in the writer's order, and those skipped as corrupt."""

    root: str
    split: str
    shards: tuple[ShardInfo, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def units(self, one_expression_per_object: bool) -> list[int]:
        """Units per shard: referred objects when one expression is drawn per object, else samples."""
        return [s.refs if one_expression_per_object else s.samples for s in self.shards]


def _join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}"


_DIGESTS: dict[tuple[Any, ...], str] = {}
"""sha256 of the shards this process has hashed, by URL, size and modification stamp: the command,
the flow and the Ray driver of one run check the same splits, and each shard is read once."""


_STAMPS = ("mtime", "LastModified", "ETag")
"""What a file system's ``info`` says changes with the file (local files, S3); without one the
shard is hashed every time."""


def _sha256(url: str) -> str:
    """Hex sha256 of a file (hashed again only once it changed), or 'missing file'."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        stamps = tuple(info.get(name) for name in _STAMPS)
        if not any(stamps):
            return _hash_file(fs, path)
        key = (url, info.get("size"), *stamps)
        if key not in _DIGESTS:
            _DIGESTS[key] = _hash_file(fs, path)
    except FileNotFoundError:
        return "missing file"
    return _DIGESTS[key]


def _hash_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def open_split(root: str, split: str, *, verify: bool = True, skip_corrupt: bool = False) -> SplitShards:
    """Read the summary and manifest of a prepared dataset and check one split's shards.

    Args:
        root: ``<out>/<dataset>-<splitBy>`` directory or URL (anything fsspec opens).
        split: split name as written by the preparation ('train', 'val', 'testA', ...).
        verify: compare every shard's sha256 with the summary before it is used.
        skip_corrupt: drop shards failing the check (named in ``SplitShards.skipped``) instead of
            raising, so the trainer can count them.
    """
    summary = read_summary(root)
    entries = summary.split_shards(split)
    if not entries:
        known = sorted({split_of(entry.path) for entry in summary.shards})
        raise ShardError(f"{root} has no shards for split {split!r}; splits with shards: {known}")
    refs_per_shard = _refs_per_shard(root, split)

    urls = [_join(root, entry.path) for entry in entries]
    if verify:  # hashlib releases the GIL on large chunks: threads hash shards in parallel
        with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
            digests = list(pool.map(_sha256, urls))
    shards: list[ShardInfo] = []
    skipped: list[str] = []
    for index, (entry, url) in enumerate(zip(entries, urls, strict=True)):
        name = entry.path
        if verify:
            actual = digests[index]
            if actual != entry.sha256:
                if not skip_corrupt:
                    raise ShardError(
                        f"shard {url} is corrupt: sha256 {actual} but {SUMMARY} says {entry.sha256}"
                    )
                skipped.append(name)
                continue
        samples, refs = entry.samples, refs_per_shard.get(name, 0)
        if samples > 0 and refs == 0:
            raise ShardError(f"shard {url} holds {samples} samples but {MANIFEST} lists none of them")
        shards.append(ShardInfo(name, url, samples, refs))
    return SplitShards(root, split, tuple(shards), tuple(skipped))


def check_text_settings(root: str, text: TextConfig) -> None:
    """Refuse shards whose token ids the model would misread: tokenised with another vocabulary
    (ids mean other words) or cut to another length than ``text.max_tokens``.

    Raises:
        ShardError: naming the shards' value and the model's.
    """
    from data_prep.tokenize import load_tokenizer, vocabulary_hash

    summary = read_summary(root)
    written = summary.tokenizer.vocabulary_hash
    expected = vocabulary_hash(load_tokenizer(text.name_or_path))
    if written != expected:
        raise ShardError(
            f"{root} was tokenised with {summary.tokenizer.name} (vocabulary sha256 {written[:12]}) but "
            f"text.name_or_path {text.name_or_path} has vocabulary sha256 {expected[:12]}: "
            f"prepare the data again with --tokenizer {text.name_or_path}"
        )
    max_tokens = summary.settings.max_tokens
    if max_tokens != text.max_tokens:
        raise ShardError(
            f"{root} holds expressions of max_tokens {max_tokens} but the model reads "
            f"text.max_tokens {text.max_tokens}: prepare the data again with --max-tokens {text.max_tokens}"
        )


def _refs_per_shard(root: str, split: str) -> dict[str, int]:
    """Distinct referred objects per shard, from the manifest (a ref never spans two shards)."""
    url = _join(root, MANIFEST)
    try:
        with fsspec.open(url, "rb") as handle:
            table = pq.read_table(handle, columns=["split", "shard", "ref_id"])
    except FileNotFoundError:
        raise ShardError(f"{url} is missing: is {root} a prepared dataset (magnet prepare)?") from None
    rows = table.to_pydict()
    refs: dict[str, set[int]] = {}
    for row_split, shard, ref_id in zip(rows["split"], rows["shard"], rows["ref_id"], strict=True):
        if row_split == split:
            refs.setdefault(shard, set()).add(ref_id)
    return {shard: len(ids) for shard, ids in refs.items()}


# ---------------------------------------------------------------------- decoding, transforms
def resize_pair(
    image: Image.Image, mask: np.ndarray, image_size: int, mask_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image as shown (`data_prep.images.decode_image`) -> uint8 [S,S,3] (PIL bilinear, like the
    reference); {0,1} mask -> uint8 [S',S'] (nearest).

    Shared by the shard reader and the benchmark's naive reader so both do the same work.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
    rgb = np.asarray(rgb.resize((image_size, image_size), Image.BILINEAR))
    return rgb, resize_mask(mask, mask_size)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 mask [H,W] -> [size,size], nearest neighbour (PIL), as every target is resized."""
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack resized samples into the batch dict; normalisation runs here, once per batch."""
    pixels = torch.from_numpy(np.stack([s["image"] for s in samples]))  # uint8 [B,S,S,3]
    images = torch.empty(pixels.shape[0], 3, *pixels.shape[1:3])  # float32 [B,3,S,S]
    images.copy_(pixels.permute(0, 3, 1, 2))  # transpose and convert in one pass
    batch: dict[str, Any] = {
        "image": images.mul_(_PIXEL_SCALE).add_(_PIXEL_SHIFT),  # (x/255 - mean) / std, in place
        "mask": torch.from_numpy(np.stack([s["mask"] for s in samples])).float(),  # [B,S',S']
        "input_ids": torch.from_numpy(np.stack([s["input_ids"] for s in samples])).long(),
        "attention_mask": torch.from_numpy(np.stack([s["attention_mask"] for s in samples])).long(),
        "sent_id": torch.tensor([s["sent_id"] for s in samples], dtype=torch.int64),
        "ref_id": torch.tensor([s["ref_id"] for s in samples], dtype=torch.int64),
        "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "raw": [s["raw"] for s in samples],
    }
    for key in ("orig_mask", "others"):
        if key in samples[0]:
            batch[key] = [torch.from_numpy(s[key]) for s in samples]
    return batch


def decode_sample(
    raw: dict[str, Any], image_size: int, mask_size: int, keep_orig_mask: bool, keep_others: bool = False
) -> dict[str, Any]:
    """One tar sample (member suffix -> bytes) -> arrays ready for ``collate``. ``keep_others``
    adds the image's other objects where the shard carries them, at the size the target is
    scored at: the original with ``keep_orig_mask``, else ``mask_size``."""
    key = raw["__key__"]
    image_bytes = next((raw[m] for m in IMAGE_MEMBERS if m in raw), None)
    if image_bytes is None or MASK_MEMBER not in raw:
        raise ShardError(f"sample {key} in {raw.get('__url__')} lacks its image or {MASK_MEMBER} member")
    meta = SampleMeta.from_bytes(raw[META_MEMBER], f"sample {key} in {raw.get('__url__')}: {META_MEMBER}")
    mask_png = Image.open(io.BytesIO(raw[MASK_MEMBER]))
    if mask_png.mode != "L":
        raise ShardError(
            f"sample {key} in {raw.get('__url__')}: {MASK_MEMBER} is mode {mask_png.mode}, expected L"
        )
    mask = (np.asarray(mask_png) > 127).astype(np.uint8)  # [H,W] {0,1}
    if mask.shape != (meta.height, meta.width):
        raise ShardError(
            f"sample {key} in {raw.get('__url__')}: mask is {mask.shape}, "
            f"its json says {meta.height}x{meta.width}"
        )
    shown = decode_image(image_bytes)  # upright, RGB: as preparation judged it against the mask
    if shown.size != (meta.width, meta.height):
        raise ShardError(
            f"sample {key} in {raw.get('__url__')}: image is {shown.width}x{shown.height} upright, "
            f"its json says {meta.width}x{meta.height} (prepared before images were read upright?)"
        )
    image, small_mask = resize_pair(shown, mask, image_size, mask_size)
    sample = {
        "image": image,
        "mask": small_mask,
        "input_ids": np.load(io.BytesIO(raw[INPUT_IDS_MEMBER])),
        "attention_mask": np.load(io.BytesIO(raw[ATTENTION_MASK_MEMBER])),
        "sent_id": meta.sent_id,
        "ref_id": meta.ref_id,
        "image_id": meta.image_id,
        "raw": meta.raw,
    }
    if keep_orig_mask:
        sample["orig_mask"] = mask
    if keep_others and OBJECTS_MEMBER in raw:
        rles = [o["rle"] for o in json.loads(raw[OBJECTS_MEMBER]) if o["ann_id"] != meta.ann_id]
        others = decode_rles(rles, *mask.shape)  # [K,H,W]
        if not keep_orig_mask:
            resized = [resize_mask(m, mask_size) for m in others]
            others = np.array(resized, dtype=np.uint8).reshape(len(rles), mask_size, mask_size)
        sample["others"] = others
    return sample


# --------------------------------------------------------------------------- reading units
def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (member suffix -> bytes) of one shard, in stored order."""
    with fsspec.open(url, "rb") as handle:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": handle}])
        yield from wds.tariterators.group_by_keys(files)


def _pick_per_ref(samples: Iterable[dict[str, Any]], pick_seed: str) -> Iterator[dict[str, Any]]:
    """One expression of each run of samples sharing a ref_id, drawn from (seed, epoch, ref_id)."""
    group: list[dict[str, Any]] = []
    group_ref = None
    for sample in samples:
        where = f"sample {sample['__key__']} in {sample.get('__url__')}: {META_MEMBER}"
        ref_id = SampleMeta.from_bytes(sample[META_MEMBER], where).ref_id
        if group and ref_id != group_ref:
            yield group[random.Random(f"{pick_seed}:{group_ref}").randrange(len(group))]
            group = []
        group.append(sample)
        group_ref = ref_id
    if group:
        yield group[random.Random(f"{pick_seed}:{group_ref}").randrange(len(group))]


@dataclass(frozen=True)
class _Segment:
    """Units [first, stop) of one shard."""

    url: str
    first: int
    stop: int


def _read_segment(segment: _Segment, pick_seed: str | None) -> Iterator[dict[str, Any]]:
    samples = read_shard(segment.url)
    units = samples if pick_seed is None else _pick_per_ref(samples, pick_seed)
    count = 0
    for unit in islice(units, segment.first, segment.stop):
        count += 1
        yield unit
    if count != segment.stop - segment.first:
        raise ShardError(
            f"shard {segment.url} ended after {segment.first + count} units, the summary/manifest "
            f"promised at least {segment.stop}"
        )


def _segments(urls: list[str], units: list[int], start: int, stop: int) -> list[_Segment]:
    """Virtual units [start, stop) of the concatenated shards, wrapping around past the end."""
    kept = [(url, n) for url, n in zip(urls, units, strict=True) if n > 0]
    starts = np.cumsum([0] + [n for _, n in kept]).tolist()
    total = starts[-1]
    segments: list[_Segment] = []
    position = start
    while position < stop:
        virtual = position % total
        index = bisect.bisect_right(starts, virtual) - 1
        first = virtual - starts[index]
        take = min(kept[index][1] - first, stop - position)
        segments.append(_Segment(kept[index][0], first, first + take))
        position += take
    return segments


def _shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle through a buffer of ``buffer_size`` items (reproducible for the rng's seed)."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------- the stream
@dataclass(frozen=True)
class _WorkerPlan:
    """What one loader worker reads and yields."""

    segments: tuple[_Segment, ...]
    batches: int  # batches this worker yields, skipped ones included
    skip: int  # batches already consumed before a restart
    shuffle_seed: str | None  # None keeps the stored order


class _ShardStream(IterableDataset):
    """Yields whole batches; loader worker i follows ``plans[i]`` (one plan when there are no workers)."""

    def __init__(
        self,
        plans: list[_WorkerPlan],
        *,
        batch_size: int,
        image_size: int,
        mask_size: int,
        pick_seed: str | None,
        shuffle_buffer: int,
        keep_orig_mask: bool,
        keep_others: bool,
    ) -> None:
        self.plans = plans
        self.batch_size = batch_size
        self.image_size = image_size
        self.mask_size = mask_size
        self.pick_seed = pick_seed
        self.shuffle_buffer = shuffle_buffer
        self.keep_orig_mask = keep_orig_mask
        self.keep_others = keep_others

    def __len__(self) -> int:
        return sum(plan.batches - plan.skip for plan in self.plans)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        plan = self.plans[0 if info is None else info.id]
        units: Iterable[dict[str, Any]] = (
            unit for segment in plan.segments for unit in _read_segment(segment, self.pick_seed)
        )
        if plan.shuffle_seed is not None and self.shuffle_buffer > 1:
            units = _shuffled(units, self.shuffle_buffer, random.Random(plan.shuffle_seed))
        units = iter(units)
        for index in range(plan.batches):
            raw = list(islice(units, self.batch_size))
            if index < plan.skip:
                continue
            yield collate(
                [
                    decode_sample(r, self.image_size, self.mask_size, self.keep_orig_mask, self.keep_others)
                    for r in raw
                ]
            )


def _split_batches(total: int, parts: int) -> list[int]:
    """``total`` batches over ``parts`` workers, the first ones taking one more."""
    return [total // parts + (1 if part < total % parts else 0) for part in range(parts)]


def _round_robin_position(per_worker: list[int], consumed: int) -> tuple[list[int], int]:
    """After ``consumed`` batches taken round-robin from workers (as DataLoader does), how many
    came from each worker, and which worker yields the next one."""
    taken = [0] * len(per_worker)
    worker = 0
    for _ in range(consumed):
        while taken[worker] >= per_worker[worker]:
            worker = (worker + 1) % len(per_worker)
        taken[worker] += 1
        worker = (worker + 1) % len(per_worker)
    return taken, worker


def _loader(stream: _ShardStream, workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())


# --------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands: the epoch, and batches of it this rank already consumed."""

    epoch: int = 0
    batches_done: int = 0


def train_batches_per_epoch(shards: SplitShards, cfg: DataConfig, world_size: int) -> int:
    """Batches every rank yields per epoch: ceil(units / (world_size * batch_size)).

    Units are referred objects with ``cfg.one_expression_per_object``, else expressions.
    """
    units = sum(shards.units(cfg.one_expression_per_object))
    if units == 0:
        raise ShardError(f"split {shards.split!r} of {shards.root} has no readable samples")
    return math.ceil(units / (world_size * cfg.batch_size))


def build_train_loader(
    shards: SplitShards,
    cfg: DataConfig,
    *,
    image_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    position: DataPosition | None = None,
) -> DataLoader:
    """The loader of one rank for one epoch, starting after ``position.batches_done`` batches.

    Every rank yields exactly ``train_batches_per_epoch`` full batches (minus those already done);
    order and content depend only on (seed, epoch, rank, world_size, cfg), so a restart at a
    position replays exactly the batches an uninterrupted run would have produced.

    Args:
        shards: the training split, from ``open_split``.
        cfg: batch size, loader workers, per-object sampling, shuffle buffer.
        image_size: square model input size S.
        seed: run seed; each epoch shuffles with (seed, epoch).
        rank, world_size: this DDP rank and the number of ranks.
        position: epoch and batches already consumed; None = start of epoch 0.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    position = position or DataPosition()
    batches = train_batches_per_epoch(shards, cfg, world_size)
    if not 0 <= position.batches_done <= batches:
        raise ValueError(f"position {position} is outside the epoch's {batches} batches")
    epoch_seed = f"{seed}:{position.epoch}"

    order = random.Random(epoch_seed).sample(range(len(shards.shards)), len(shards.shards))
    urls = [shards.shards[i].url for i in order]
    units = [shards.units(cfg.one_expression_per_object)[i] for i in order]
    workers = max(1, cfg.loader_workers)
    per_worker = _split_batches(batches, workers)
    taken, next_worker = _round_robin_position(per_worker, position.batches_done)

    plans: list[_WorkerPlan] = []
    for logical in range(workers):
        first_batch = rank * batches + sum(per_worker[:logical])
        start = first_batch * cfg.batch_size
        segments = _segments(urls, units, start, start + per_worker[logical] * cfg.batch_size)
        plans.append(
            _WorkerPlan(
                tuple(segments), per_worker[logical], taken[logical], f"{epoch_seed}:{rank}:{logical}"
            )
        )
    # DataLoader starts its round robin at worker 0: rotate so worker 0 is the one due next.
    plans = plans[next_worker:] + plans[:next_worker]
    stream = _ShardStream(
        plans,
        batch_size=cfg.batch_size,
        image_size=image_size,
        mask_size=image_size,
        pick_seed=epoch_seed if cfg.one_expression_per_object else None,
        shuffle_buffer=cfg.shuffle_buffer,
        keep_orig_mask=False,
        keep_others=False,
    )
    return _loader(stream, cfg.loader_workers)


# ------------------------------------------------------------------------------- evaluation
def build_eval_loader(
    shards: SplitShards,
    cfg: DataConfig,
    eval_cfg: EvalConfig,
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Every expression of the split exactly once across ranks, in the stored order.

    Rank r takes a contiguous block of the split (sizes differ by at most one); images are
    resized to the model input ``image_size``, masks to ``eval_cfg.size_for(image_size)`` (the
    lavt protocol's comparison size: the model's input size unless eval_size says otherwise); the
    'original' protocol adds ``orig_mask``, shards carrying the images' objects add ``others`` (at
    the size the target is scored at). The last batch of a rank may be smaller.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    total = shards.num_samples
    if eval_cfg.max_samples is not None:
        total = min(total, eval_cfg.max_samples)
    start, stop = rank * total // world_size, (rank + 1) * total // world_size
    urls = [s.url for s in shards.shards]
    units = [s.samples for s in shards.shards]
    batches = math.ceil((stop - start) / cfg.batch_size)
    workers = max(1, cfg.loader_workers)
    plans: list[_WorkerPlan] = []
    first_batch = 0
    for count in _split_batches(batches, workers):
        begin = start + first_batch * cfg.batch_size
        end = min(stop, begin + count * cfg.batch_size)
        segments = _segments(urls, units, begin, end) if end > begin else []
        plans.append(_WorkerPlan(tuple(segments), count, 0, None))
        first_batch += count
    stream = _ShardStream(
        plans,
        batch_size=cfg.batch_size,
        image_size=image_size,
        mask_size=eval_cfg.size_for(image_size),
        pick_seed=None,
        shuffle_buffer=0,
        keep_orig_mask=eval_cfg.protocol == "original",
        keep_others=True,
    )
    return _loader(stream, cfg.loader_workers)


# ----------------------------------------------------------------------- the prepared dataset
def held_out_splits(shards: str, train_split: str) -> list[str]:
    """Every split of the prepared data except the training split, in summary.json's order."""
    return [split for split in read_summary(shards).counts if split != train_split]


def first_example(shards: str, split: str) -> tuple[bytes, str]:
    """(image bytes, expression) of a split's first sample: the registered model's input example."""
    with (
        fsspec.open(f"{shards}/{shard_path(split, 0)}", "rb") as handle,
        tarfile.open(fileobj=handle) as tar,
    ):
        members = {m.name: m for m in tar.getmembers()}
        key = min(name.split(".", 1)[0] for name in members)
        where = f"sample {key} in {shards}/{shard_path(split, 0)}: {META_MEMBER}"
        meta = SampleMeta.from_bytes(tar.extractfile(members[f"{key}.{META_MEMBER}"]).read(), where)
        image_name = next(f"{key}.{ext}" for ext in IMAGE_MEMBERS if f"{key}.{ext}" in members)
        return tar.extractfile(members[image_name]).read(), meta.raw

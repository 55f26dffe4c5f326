"""Samples per second: the shard reader (magnet.data) against a naive refer-layout reader,
with the data on local disk and on object storage.

The naive reader does at every step what the shards were made to avoid: open the image file,
rasterise the object's mask with pycocotools from instances.json, tokenise the expression. Both
readers then apply the same transforms (``magnet.data.resize_pair`` and ``collate``) with the
same batch size and the same number of DataLoader workers, over the same synthetic train split,
in one run. Object storage is moto's S3 server on 127.0.0.1 (tests/object_store.py) holding the
same refer layout and the same shards: the naive reader fetches each image with one GET
(instances.json and the refs are parsed once before timing, as the refer toolkit does), the shard
reader streams its tars. Both readers reach moto through the same relay (benchmarks/_latency_proxy.py)
and the same AWS_ENDPOINT_URL, twice: as it is on loopback (0 ms added) and with a modelled
first-byte latency added to every response (``--s3-latency-ms``; kernel netem is not available
here). Prints a table with samples/s and the shard/naive ratio per storage (target: >= 5x).

A second table says where one sample's time goes, timed in one process on the same samples: the
work both readers do (decode and resize the image, normalise the batch), the work only the naive
reader does (read the image, rasterise, tokenise; plus one GET on object storage), and the work
only the shard reader does (tar members, mask PNG, .npy). Its last column is the ceiling on the
ratio: naive time / shared time, what a shard reader whose own work cost nothing would reach.

    .venv/bin/python benchmarks/bench_reader.py --images 1000 --input-sizes 480 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from _latency_proxy import LatencyProxy
from torch.utils.data import DataLoader, Dataset

from data_prep.contract import META_MEMBER, SampleMeta
from data_prep.images import decode_image
from data_prep.masks import rasterize
from data_prep.refer import ReferData, load_refer
from data_prep.shards import prepare_dataset
from data_prep.synth import synthesize
from data_prep.tokenize import encode_expressions, load_tokenizer
from magnet.config import DataConfig
from magnet.data import (
    SplitShards,
    build_train_loader,
    collate,
    decode_sample,
    open_split,
    read_shard,
    resize_pair,
)

NAIVE, SHARDS = "naive refer reader", "shard reader"

# AWS: "When you make small requests (for example, less than 512 KB), where median latencies are
# often in the tens of milliseconds range, ..." (Amazon S3 User Guide, "Performance guidelines for
# Amazon S3", retry requests for latency-sensitive applications,
# https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance-guidelines.html, and
# the whitepaper "Best Practices Design Patterns: Optimizing Amazon S3 Performance"). 20 ms is the
# low end of "tens of milliseconds", so the modelled figure is conservative.
AWS_SMALL_GET_LATENCY = "AWS S3 performance guidelines: tens of ms median for GETs < 512 KB"
_S3_NOTE = """
Measured: every figure above, on this machine, in this run. Object storage is moto on 127.0.0.1 behind
a TCP relay (benchmarks/_latency_proxy.py) that both readers go through with the same AWS_ENDPOINT_URL.
Modelled: only the network/service latency of object storage, as a fixed {latency_ms:g} ms added before
the first byte of every response (kernel netem is not available here). AWS documents median latencies of
tens of ms for small GETs (< 512 KB): docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance-
guidelines.html. Not modelled: TCP/TLS handshakes, bandwidth limits, latency variance and tails, request
prices. Neither reader issues parallel GETs: each loader worker has one request in flight at a time."""
# The naive reader's GET: s3fs's cat_file asks for the size first (a HEAD) unless max_concurrency=1.
ONE_GET_PER_IMAGE = {"max_concurrency": 1}


@dataclass(frozen=True)
class Storage:
    """Where both readers read from in one column of the table.

    Args:
        name: column title.
        refer_root: the refer layout's root (directory or s3:// URL).
        shard_root: the prepared dataset's ``<dataset>-<splitBy>`` root.
        proxy: the relay both readers' requests go through (object storage only).
        max_batches: batches timed per reader.
    """

    name: str
    refer_root: str
    shard_root: str
    proxy: LatencyProxy | None
    max_batches: int

    @property
    def storage_options(self) -> dict[str, Any]:
        return ONE_GET_PER_IMAGE if self.proxy else {}


class NaiveReferDataset(Dataset):
    """One expression per item, everything derived from the refer layout when the item is read.

    Args:
        refer: the parsed refer annotations.
        split: the split to read.
        image_size: model input size S.
        image_root: where the image files are: a directory or an fsspec URL (s3://...).
        storage_options: fsspec options of ``image_root``'s filesystem.
        max_tokens: token ids per expression.
    """

    def __init__(
        self,
        refer: ReferData,
        split: str,
        image_size: int,
        image_root: str,
        storage_options: dict[str, Any],
        max_tokens: int = 20,
    ) -> None:
        self.refer = refer
        self.items = [(ref, sent) for ref in refer.select(split) for sent in ref.sentences]
        self.image_size = image_size
        self.image_root = image_root.rstrip("/")
        self.storage_options = storage_options
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref, sent = self.items[index]
        info = self.refer.images[ref.image_id]
        annotation = self.refer.annotations[ref.ann_id]
        image = decode_image(_read(f"{self.image_root}/{info.file_name}", self.storage_options))
        mask = rasterize(annotation.segmentation, info.height, info.width)  # [H,W] {0,1}
        ids, attention, _ = encode_expressions(load_tokenizer(), [sent.raw], self.max_tokens)
        rgb, small = resize_pair(image, mask, self.image_size, self.image_size)
        return {
            "image": rgb,
            "mask": small,
            "input_ids": ids[0],
            "attention_mask": attention[0],
            "sent_id": sent.sent_id,
            "ref_id": ref.ref_id,
            "image_id": ref.image_id,
            "raw": sent.raw,
        }


def _read(url: str, storage_options: dict[str, Any]) -> bytes:
    """The whole file at ``url``: one GET on object storage (fsspec caches the filesystem per process)."""
    filesystem, path = fsspec.core.url_to_fs(url, **storage_options)
    return filesystem.cat_file(path)


def _time(loader: DataLoader, max_batches: int) -> tuple[int, float]:
    """Samples read and seconds over ``max_batches`` batches after the first one: the steady rate of a
    long epoch, without worker start-up (spawn, S3 client set-up), which both readers pay once per epoch."""
    samples, start = 0, 0.0
    for index, batch in enumerate(loader):
        if index == 0:
            start = time.perf_counter()
            continue
        samples += len(batch["raw"])
        if index >= max_batches:
            break
    if samples == 0:
        raise RuntimeError(
            f"the loader gave fewer than 2 batches: nothing to time (max_batches={max_batches})"
        )
    return samples, time.perf_counter() - start


@dataclass
class Rate:
    """The best timed pass of one reader on one storage."""

    samples: int
    seconds: float
    requests: int | None  # object-storage requests answered meanwhile (prefetched batches included)

    @property
    def per_s(self) -> float:
        return self.samples / self.seconds


Readers = tuple[Storage, NaiveReferDataset, SplitShards]
"""One storage and both readers over it."""


def _best_rates(
    readers: dict[str, Readers],
    input_size: int,
    args: argparse.Namespace,
) -> dict[tuple[str, str], Rate]:
    """Best rate per (storage, reader) over ``args.repeats`` interleaved passes."""
    cfg = DataConfig(batch_size=args.batch_size, loader_workers=args.workers, one_expression_per_object=False)
    best: dict[tuple[str, str], Rate] = {}
    for repeat in range(args.repeats):
        for storage, naive, shards in readers.values():
            if storage.proxy:  # both readers' workers (forked when iteration starts) inherit it
                os.environ["AWS_ENDPOINT_URL"] = storage.proxy.endpoint
            naive.image_size = input_size
            naive_loader = DataLoader(
                naive, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate
            )
            shard_loader = build_train_loader(shards, cfg, image_size=input_size, seed=repeat)
            for name, loader in ((NAIVE, naive_loader), (SHARDS, shard_loader)):
                answered = storage.proxy.responses if storage.proxy else 0
                samples, seconds = _time(loader, storage.max_batches)  # its workers have stopped
                requests = storage.proxy.responses - answered if storage.proxy else None
                rate = Rate(samples, seconds, requests)
                key = (storage.name, name)
                if key not in best or rate.per_s > best[key].per_s:
                    best[key] = rate
    return best


def _read_ms(storage: Storage, path: str, times: int = 20) -> float:
    """Median milliseconds of the naive reader's I/O for one image, on ``storage``."""
    if storage.proxy:
        os.environ["AWS_ENDPOINT_URL"] = storage.proxy.endpoint
    options = {**storage.storage_options, "skip_instance_cache": True} if storage.proxy else {}
    filesystem, path = fsspec.core.url_to_fs(f"{storage.refer_root}/{path}", **options)
    durations = []
    for _ in range(times):
        start = time.perf_counter()
        filesystem.cat_file(path)
        durations.append(time.perf_counter() - start)
    return 1000 * statistics.median(durations)


@dataclass(frozen=True)
class Costs:
    """Milliseconds per sample in one process (no loader workers), the same samples for every figure."""

    shared: float  # image decode + resize + batch normalisation: both readers
    naive: float  # a whole naive item (local read, rasterise, tokenise, the shared work) + collate
    shard: float  # a whole shard sample (tar members, PNG, .npy, the shared work) + collate

    def ceiling(self, extra_read_ms: float = 0.0) -> float:
        """Best possible shard/naive ratio when the naive reader also pays ``extra_read_ms`` per image."""
        return (self.naive + extra_read_ms) / self.shared


def _per_sample_costs(naive: NaiveReferDataset, shards: SplitShards, input_size: int, batch: int) -> Costs:
    """Where one sample's time goes, for the samples of the split's first shard (local storage)."""
    naive.image_size = input_size
    start = time.perf_counter()
    raws = list(read_shard(shards.shards[0].url))
    tar_ms = 1000 * (time.perf_counter() - start) / len(raws)
    index_of = {sent.sent_id: i for i, (_, sent) in enumerate(naive.items)}
    items = [index_of[SampleMeta.from_bytes(raw[META_MEMBER], raw["__key__"]).sent_id] for raw in raws]
    masks = [decode_sample(raw, 1, 1, keep_orig_mask=True)["orig_mask"] for raw in raws]

    def timed(make: Callable[[int], Any]) -> tuple[list[Any], float]:
        start = time.perf_counter()
        made = [make(i) for i in range(len(raws))]
        return made, 1000 * (time.perf_counter() - start) / len(raws)

    def collate_ms(samples: list[dict[str, Any]]) -> float:
        start = time.perf_counter()
        for first in range(0, len(samples), batch):
            collate(samples[first : first + batch])
        return 1000 * (time.perf_counter() - start) / len(samples)

    shard_samples, shard_ms = timed(lambda i: decode_sample(raws[i], input_size, input_size, False))
    naive_samples, naive_ms = timed(lambda i: naive[items[i]])
    _, resize_ms = timed(
        lambda i: resize_pair(decode_image(raws[i]["jpg"]), masks[i], input_size, input_size)
    )
    normalise_ms = collate_ms(shard_samples)
    return Costs(
        shared=resize_ms + normalise_ms,
        naive=naive_ms + collate_ms(naive_samples),
        shard=tar_ms + shard_ms + normalise_ms,
    )


@contextlib.contextmanager
def _object_store(refer_root: Path, shards_dir: Path) -> Iterator[tuple[str, str, str]]:
    """Moto's S3 server on 127.0.0.1 holding copies of the refer layout and the shards:
    (its endpoint, refer root URL, shard root URL)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from object_store import moto_s3

    with moto_s3(bucket="bench") as store:
        filesystem = fsspec.filesystem("s3")
        filesystem.put(f"{refer_root}/", f"{store.bucket}/refer", recursive=True)
        filesystem.put(f"{shards_dir}/", f"{store.bucket}/shards/{shards_dir.name}", recursive=True)
        yield store.endpoint, store.url("refer"), store.url(f"shards/{shards_dir.name}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="synthetic images (~4.5 expressions each)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the synthetic images")
    parser.add_argument(
        "--input-sizes", type=int, nargs="+", default=[480, 128], help="model input sizes S to time"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both readers")
    parser.add_argument("--max-batches", type=int, default=100, help="batches timed per reader")
    parser.add_argument(
        "--latency-batches", type=int, default=100, help="batches timed per reader on S3 with added latency"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per reader (best is kept)")
    parser.add_argument(
        "--s3-latency-ms",
        type=float,
        default=20.0,
        help=f"first-byte latency added to each response in the modelled S3 column ({AWS_SMALL_GET_LATENCY})",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the data here (default: temp)")
    parser.add_argument(
        "--storages",
        nargs="+",
        choices=("local", "s3", "s3-latency"),
        default=["local", "s3", "s3-latency"],
        help="where data is read: local disk, loopback S3, S3 with --s3-latency-ms added",
    )
    return parser.parse_args()


@dataclass(frozen=True)
class Prepared:
    """The synthetic refer layout and its shards, both readers' data."""

    refer_root: Path
    refer: ReferData
    shard_dir: Path
    expressions: int
    seconds: float

    @property
    def image_subdir(self) -> str:
        return self.refer.image_dir.relative_to(self.refer_root).as_posix()


def _prepare(work: Path, args: argparse.Namespace) -> Prepared:
    """Generate the refer layout and prepare its shards (timed, for reference)."""
    refer_root = work / "refer"
    synthesize(refer_root, num_images=args.images, image_size=args.image_size, seed=0)
    start = time.perf_counter()
    prepared = prepare_dataset(
        refer_root, "refcoco", "unc", work / "shards", workers=args.workers, samples_per_shard=500
    )
    seconds = time.perf_counter() - start
    load_tokenizer()  # loaded once before the workers fork, as a real naive loader would
    refer = load_refer(refer_root, "refcoco", "unc")  # parsed once, whatever the storage
    written = sum(c.written for c in prepared.counts.values())
    return Prepared(refer_root, refer, prepared.out_dir, written, seconds)


def _readers_on(storage: Storage, data: Prepared, input_size: int) -> Readers:
    """Both readers of one storage: the naive one over its refer layout, its verified shards."""
    image_root = f"{storage.refer_root}/{data.image_subdir}"
    naive = NaiveReferDataset(data.refer, "train", input_size, image_root, storage.storage_options)
    return storage, naive, open_split(storage.shard_root, "train")


def _remote_storages(stack: contextlib.ExitStack, data: Prepared, args: argparse.Namespace) -> list[Storage]:
    """The S3 storages asked for: one moto server, reached through a relay per modelled latency."""
    if not {"s3", "s3-latency"} & set(args.storages):
        return []
    endpoint, refer_url, shard_url = stack.enter_context(_object_store(data.refer_root, data.shard_dir))
    storages = []
    for choice, latency_ms, batches, name in (
        ("s3", 0.0, args.max_batches, "S3 loopback (+0 ms)"),
        ("s3-latency", args.s3_latency_ms, args.latency_batches, f"S3 +{args.s3_latency_ms:g} ms"),
    ):
        if choice in args.storages:
            proxy = stack.enter_context(LatencyProxy(endpoint, latency_ms))
            storages.append(Storage(name, refer_url, shard_url, proxy, batches))
    return storages


def _print_rates(
    results: dict[int, dict[tuple[str, str], Rate]],
    storages: list[Storage],
    expressions: int,
    args: argparse.Namespace,
) -> None:
    print(
        f"\ntrain split: {expressions} expressions of {args.image_size}px images, batch {args.batch_size}, "
        f"{args.workers} loader workers each, timed after the first batch, best of {args.repeats} passes of "
        + ", ".join(f"{s.max_batches} batches ({s.name})" for s in storages)
    )
    header = f"{'input':>5}  {'reader':<19}" + "".join(f"{s.name + ' /s':>26}{'ratio':>7}" for s in storages)
    print(header)
    for size, best in results.items():
        for name in (NAIVE, SHARDS):
            row = f"{size:>5}  {name:<19}"
            for storage in storages:
                rate, naive = best[(storage.name, name)], best[(storage.name, NAIVE)]
                row += f"{rate.per_s:>26.1f}{rate.per_s / naive.per_s:>6.2f}x"
            print(row)


def _print_costs(
    costs: dict[int, Costs],
    shards: SplitShards,
    storages: list[Storage],
    read_ms: dict[str, float],
    local: Storage,
    batch_size: int,
) -> None:
    print(
        f"\nWhere one sample's time goes (ms, one process, the {shards.shards[0].samples} samples of "
        f"{shards.shards[0].name}, batch {batch_size}); ceiling = naive / shared, plus a GET:"
    )
    print(
        f"{'input':>5}{'shared':>9}{'naive only':>12}{'shard only':>12}"
        + "".join(f"{'ceiling ' + s.name:>28}" for s in storages)
    )
    for size, cost in costs.items():
        row = f"{size:>5}{cost.shared:>9.3f}"
        row += f"{cost.naive - cost.shared:>12.3f}{cost.shard - cost.shared:>12.3f}"
        for storage in storages:
            extra = read_ms[storage.name] - read_ms[local.name] if storage.proxy else 0.0
            row += f"{cost.ceiling(extra):>27.2f}x"
        print(row)
    print(
        "shared: JPEG decode + resize + normalisation; naive only: read the file, rasterise, tokenise; "
        "shard only: tar members, mask PNG, .npy, json."
    )


def _print_requests(
    first: dict[tuple[str, str], Rate],
    storages: list[Storage],
    read_ms: dict[str, float],
    args: argparse.Namespace,
) -> None:
    on_s3 = [s for s in storages if s.proxy]
    if on_s3:
        print(f"\nS3 requests per sample at input {args.input_sizes[0]} (relay count, prefetch included):")
    for storage in on_s3:
        rates = {name: first[(storage.name, name)] for name in (NAIVE, SHARDS)}
        print(
            f"  {storage.name}: " + ", ".join(f"{n} {r.requests / r.samples:.3f}" for n, r in rates.items())
        )
    print(
        "One image read as the naive reader does (median of 20): "
        + ", ".join(f"{ms:.2f} ms from {name}" for name, ms in read_ms.items())
    )
    if on_s3:
        print(_S3_NOTE.format(latency_ms=args.s3_latency_ms))


def main() -> None:
    args = _parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepare(args.work_dir or Path(tmp), args)
        local = Storage("local disk", str(data.refer_root), str(data.shard_dir), None, args.max_batches)
        on_local = _readers_on(local, data, args.input_sizes[0])
        _, local_naive, local_shards = on_local
        costs = {
            size: _per_sample_costs(local_naive, local_shards, size, args.batch_size)
            for size in args.input_sizes
        }
        with contextlib.ExitStack() as stack:
            storages = ([local] if "local" in args.storages else []) + _remote_storages(stack, data, args)
            readers = {
                s.name: on_local if s is local else _readers_on(s, data, args.input_sizes[0])
                for s in storages
            }
            results = {size: _best_rates(readers, size, args) for size in args.input_sizes}
            first_image = f"{data.image_subdir}/{next(iter(data.refer.images.values())).file_name}"
            read_ms = {
                storage.name: _read_ms(storage, first_image) for storage in dict.fromkeys([local, *storages])
            }

    _print_rates(results, storages, len(next(iter(readers.values()))[1]), args)
    _print_costs(costs, local_shards, storages, read_ms, local, args.batch_size)
    _print_requests(results[args.input_sizes[0]], storages, read_ms, args)
    print(f"\nprepare (for reference): {data.expressions} expressions in {data.seconds:.1f} s")


if __name__ == "__main__":
    main()

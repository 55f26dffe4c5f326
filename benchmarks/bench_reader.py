"""Samples per second: the shard reader (magnet.data) against a naive refer-layout reader,
with the data on local disk and on object storage.

The naive reader does at every step what the shards were made to avoid: open the image file,
rasterise the object's mask with pycocotools from instances.json, tokenise the expression. Both
readers then apply the same transforms (``magnet.data.resize_pair`` and ``collate``) with the
same batch size and the same number of DataLoader workers, over the same synthetic train split,
in one run. Object storage is moto's S3 server on 127.0.0.1 (tests/object_store.py) holding the
same refer layout and the same shards: the naive reader opens each image through fsspec
(instances.json and the refs are parsed once before timing, as the refer toolkit does), the shard
reader streams its tars. Prints a table with the ratio per storage (target: shard reader >= 5x).
Loopback moto answers in about a millisecond; real S3 takes tens of milliseconds per request, so
the per-image requests of the naive reader cost far more there and real ratios are larger.

    .venv/bin/python benchmarks/bench_reader.py --images 1000 --input-sizes 480 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_prep.masks import rasterize
from data_prep.refer import ReferData, load_refer
from data_prep.shards import prepare_dataset
from data_prep.synth import synthesize
from data_prep.tokenize import encode_expressions, load_tokenizer
from magnet.config import DataConfig
from magnet.data import SplitShards, build_train_loader, collate, open_split, resize_pair

NAIVE, SHARDS = "naive refer reader", "shard reader"
LOCAL, S3 = "local disk", "S3 (moto, loopback)"


class NaiveReferDataset(Dataset):
    """One expression per item, everything derived from the refer layout when the item is read.

    Args:
        refer: the parsed refer annotations.
        split: the split to read.
        image_size: model input size S.
        image_root: where the image files are: a directory or an fsspec URL (s3://...).
        max_tokens: token ids per expression.
    """

    def __init__(
        self, refer: ReferData, split: str, image_size: int, image_root: str, max_tokens: int = 20
    ) -> None:
        self.refer = refer
        self.items = [(ref, sent) for ref in refer.select(split) for sent in ref.sentences]
        self.image_size = image_size
        self.image_root = image_root.rstrip("/")
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref, sent = self.items[index]
        info = self.refer.images[ref.image_id]
        annotation = self.refer.annotations[ref.ann_id]
        with fsspec.open(f"{self.image_root}/{info.file_name}", "rb") as handle:
            image = Image.open(io.BytesIO(handle.read()))
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


def _time(loader: DataLoader, max_batches: int) -> tuple[int, float]:
    """Samples read and seconds, loader start-up (worker spawn) included."""
    start = time.perf_counter()
    samples = 0
    for index, batch in enumerate(loader):
        samples += len(batch["raw"])
        if index + 1 >= max_batches:
            break
    return samples, time.perf_counter() - start


def _best_rates(
    readers: dict[str, tuple[NaiveReferDataset, SplitShards]], input_size: int, args: argparse.Namespace
) -> dict[tuple[str, str], tuple[int, float]]:
    """Best (samples, seconds) per (storage, reader) over ``args.repeats`` interleaved passes."""
    cfg = DataConfig(batch_size=args.batch_size, loader_workers=args.workers, one_expression_per_object=False)
    best: dict[tuple[str, str], tuple[int, float]] = {}
    for repeat in range(args.repeats):
        for storage, (naive, shards) in readers.items():
            naive.image_size = input_size
            naive_loader = DataLoader(
                naive, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate
            )
            shard_loader = build_train_loader(shards, cfg, image_size=input_size, seed=repeat)
            for name, loader in ((NAIVE, naive_loader), (SHARDS, shard_loader)):
                samples, seconds = _time(loader, args.max_batches)
                key = (storage, name)
                if key not in best or samples / seconds > best[key][0] / best[key][1]:
                    best[key] = (samples, seconds)
    return best


def _open_read_ms(url: str, times: int = 20) -> float:
    """Median milliseconds to open and read one file through fsspec: the naive reader's I/O per image."""
    durations = []
    for _ in range(times):
        start = time.perf_counter()
        with fsspec.open(url, "rb") as handle:
            handle.read()
        durations.append(time.perf_counter() - start)
    return 1000 * statistics.median(durations)


@contextlib.contextmanager
def _object_store(refer_root: Path, shards_dir: Path) -> Iterator[tuple[str, str]]:
    """Moto's S3 server on 127.0.0.1 holding copies of the refer layout and the shards:
    (refer root URL, shard root URL)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from object_store import moto_s3

    with moto_s3(bucket="bench") as store:
        filesystem = fsspec.filesystem("s3")
        filesystem.put(f"{refer_root}/", f"{store.bucket}/refer", recursive=True)
        filesystem.put(f"{shards_dir}/", f"{store.bucket}/shards/{shards_dir.name}", recursive=True)
        yield store.url("refer"), store.url(f"shards/{shards_dir.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="synthetic images (~4.5 expressions each)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the synthetic images")
    parser.add_argument(
        "--input-sizes", type=int, nargs="+", default=[480, 128], help="model input sizes S to time"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both readers")
    parser.add_argument("--max-batches", type=int, default=100, help="batches timed per reader")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per reader (best is kept)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the data here (default: temp)")
    parser.add_argument(
        "--storages", nargs="+", choices=("local", "s3"), default=["local", "s3"], help="where data is read"
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        refer_root, out = work / "refer", work / "shards"
        synthesize(refer_root, num_images=args.images, image_size=args.image_size, seed=0)
        start = time.perf_counter()
        prepared = prepare_dataset(
            refer_root, "refcoco", "unc", out, workers=args.workers, samples_per_shard=500
        )
        prepare_s = time.perf_counter() - start
        written = sum(c.written for c in prepared.counts.values())

        load_tokenizer()  # loaded once before the workers fork, as a real naive loader would
        refer = load_refer(refer_root, "refcoco", "unc")  # parsed once, whatever the storage
        image_subdir = refer.image_dir.relative_to(refer_root).as_posix()
        with contextlib.ExitStack() as stack:
            roots: dict[str, tuple[str, str]] = {}
            if "local" in args.storages:
                roots[LOCAL] = (str(refer_root), str(prepared.out_dir))
            if "s3" in args.storages:
                roots[S3] = stack.enter_context(_object_store(refer_root, prepared.out_dir))
            readers = {
                storage: (
                    NaiveReferDataset(refer, "train", args.input_sizes[0], f"{refer_url}/{image_subdir}"),
                    open_split(shard_url, "train"),
                )
                for storage, (refer_url, shard_url) in roots.items()
            }
            results = {size: _best_rates(readers, size, args) for size in args.input_sizes}
            first_image = f"{image_subdir}/{next(iter(refer.images.values())).file_name}"
            open_ms = {
                storage: _open_read_ms(f"{refer_url}/{first_image}")
                for storage, (refer_url, _) in roots.items()
            }

    expressions = len(next(iter(readers.values()))[0])
    print(
        f"\ntrain split: {expressions} expressions of {args.image_size}px images, batch {args.batch_size}, "
        f"{args.workers} loader workers each, {args.max_batches} batches timed, "
        f"best of {args.repeats} interleaved passes"
    )
    header = f"{'input':>6}  {'reader':<20}"
    for storage in readers:
        header += f"{storage + ' samples/s':>32}{'ratio':>8}"
    print(header)
    for size, best in results.items():
        for name in (NAIVE, SHARDS):
            row = f"{size:>6}  {name:<20}"
            for storage in readers:
                samples, seconds = best[(storage, name)]
                naive_rate = best[(storage, NAIVE)][0] / best[(storage, NAIVE)][1]
                row += f"{samples / seconds:>32.1f}{samples / seconds / naive_rate:>7.2f}x"
            print(row)
    print(
        "\nOpening and reading one image through fsspec (median of 20): "
        + ", ".join(f"{ms:.2f} ms from {storage}" for storage, ms in open_ms.items())
    )
    if S3 in readers:
        print(
            "S3 here is moto on 127.0.0.1: its requests cost far less than real S3's (tens of ms each, paid "
            "per image by the\nnaive reader and per shard by the shard reader), so real ratios are larger."
        )
    print(f"\nprepare (for reference): {written} expressions in {prepare_s:.1f} s")


if __name__ == "__main__":
    main()

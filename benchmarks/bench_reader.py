"""Samples per second: the shard reader (magnet.data) against a naive refer-layout reader.

The naive reader does at every step what the shards were made to avoid: open the image file,
rasterise the object's mask with pycocotools from instances.json, tokenise the expression. Both
readers then apply the same transforms (``magnet.data.resize_pair`` and ``collate``) with the
same batch size and the same number of DataLoader workers, over the same synthetic train split,
in one run. Prints a table with the ratio (target: shard reader >= 5x).

    .venv/bin/python benchmarks/bench_reader.py --images 1000 --input-size 480 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

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


class NaiveReferDataset(Dataset):
    """One expression per item, everything derived from the refer layout when the item is read."""

    def __init__(self, refer: ReferData, split: str, image_size: int, max_tokens: int = 20) -> None:
        self.refer = refer
        self.items = [(ref, sent) for ref in refer.select(split) for sent in ref.sentences]
        self.image_size = image_size
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref, sent = self.items[index]
        info = self.refer.images[ref.image_id]
        annotation = self.refer.annotations[ref.ann_id]
        image = Image.open(self.refer.image_dir / info.file_name)
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
    naive: NaiveReferDataset, shards: SplitShards, input_size: int, args: argparse.Namespace
) -> dict[str, tuple[int, float]]:
    """Best (samples, seconds) of each reader over ``args.repeats`` interleaved passes."""
    naive.image_size = input_size
    naive_loader = DataLoader(
        naive, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate
    )
    cfg = DataConfig(batch_size=args.batch_size, loader_workers=args.workers, one_expression_per_object=False)
    best: dict[str, tuple[int, float]] = {}
    for repeat in range(args.repeats):
        shard_loader = build_train_loader(shards, cfg, image_size=input_size, seed=repeat)
        for name, loader in ((NAIVE, naive_loader), (SHARDS, shard_loader)):
            samples, seconds = _time(loader, args.max_batches)
            if name not in best or samples / seconds > best[name][0] / best[name][1]:
                best[name] = (samples, seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="synthetic images (~4.5 expressions each)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the synthetic images")
    parser.add_argument(
        "--input-sizes", type=int, nargs="+", default=[480, 128], help="model input sizes S to time"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both readers")
    parser.add_argument("--max-batches", type=int, default=300, help="batches timed per reader")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per reader (best is kept)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the data here (default: temp)")
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
        naive = NaiveReferDataset(load_refer(refer_root, "refcoco", "unc"), "train", args.input_sizes[0])
        shards = open_split(str(prepared.out_dir), "train")
        results = {size: _best_rates(naive, shards, size, args) for size in args.input_sizes}

    print(
        f"\ntrain split: {len(naive)} expressions of {args.image_size}px images, batch {args.batch_size}, "
        f"{args.workers} loader workers each, best of {args.repeats} interleaved passes"
    )
    print(f"{'input':>6}  {'reader':<20}{'samples':>9}{'seconds':>9}{'samples/s':>11}{'ratio':>8}")
    for size, best in results.items():
        naive_rate = best[NAIVE][0] / best[NAIVE][1]
        for name in (NAIVE, SHARDS):
            samples, seconds = best[name]
            rate = samples / seconds
            print(f"{size:>6}  {name:<20}{samples:>9}{seconds:>9.2f}{rate:>11.1f}{rate / naive_rate:>7.2f}x")
    print(f"\nprepare (for reference): {written} expressions in {prepare_s:.1f} s")


if __name__ == "__main__":
    main()

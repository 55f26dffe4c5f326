"""Throughput of the preparation (expressions per second) on a synthetic RefCOCO set.

Side by side in one run, on the same data: the library without an orchestrator (1 and N
worker processes), `magnet prepare` (the Prefect flow, with the temporary local Prefect server
it starts when PREFECT_API_URL is unset), and a re-run of `magnet prepare` that finds every
chunk done.

    .venv/bin/python benchmarks/bench_prepare.py --expressions 20000 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPRESSIONS_PER_IMAGE = 6.6  # what data_prep.synth writes on average


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--expressions", type=int, default=20_000, help="Target size of the synthetic set.")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=None, help="Kept if given; else a temporary one.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from data_prep.contract import INDEX_FILES, read_summary
    from data_prep.shards import prepare_dataset
    from data_prep.synth import synthesize

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    refer = workdir / "refer"
    images = max(1, round(args.expressions / EXPRESSIONS_PER_IMAGE))
    synth_s = _time(lambda: synthesize(refer, num_images=images, image_size=args.image_size, seed=0))

    def library(workers: int) -> None:
        shutil.rmtree(workdir / f"lib-{workers}", ignore_errors=True)
        prepare_dataset(
            refer, "refcoco", "unc", workdir / f"lib-{workers}",
            samples_per_shard=args.samples_per_shard, workers=workers,
        )  # fmt: skip

    magnet = Path(sys.executable).with_name("magnet")
    command = [str(magnet), "prepare", "--refer-root", str(refer), "--out", str(workdir / "cli")]
    command += ["--samples-per-shard", str(args.samples_per_shard), "--workers", str(args.workers)]
    shutil.rmtree(workdir / "cli", ignore_errors=True)

    def cli() -> None:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    rows = [
        ("library, 1 worker", _time(lambda: library(1))),
        (f"library, {args.workers} workers", _time(lambda: library(args.workers))),
        (f"magnet prepare (Prefect flow), {args.workers} workers", _time(cli)),
        ("magnet prepare re-run (all chunks done)", _time(cli)),
    ]
    summary = read_summary(str(workdir / "cli" / "refcoco-unc"))
    read = sum(c.read for c in summary.counts.values())
    written = sum(c.written for c in summary.counts.values())
    same = all(
        (workdir / d / "refcoco-unc" / name).read_bytes()
        == (workdir / "cli" / "refcoco-unc" / name).read_bytes()
        for d in ("lib-1", f"lib-{args.workers}")
        for name in INDEX_FILES
    )
    print(f"synthetic set: {images} images, {read} expressions ({written} written), "
          f"{args.image_size} px, synthesised in {synth_s:.1f} s; {os.cpu_count()} CPUs")  # fmt: skip
    print(f"outputs byte-identical across the runs: {same}")
    base = rows[0][1]
    print(f"| {'run':<48} | {'seconds':>8} | {'expressions/s':>13} | {'vs 1 worker':>11} |")
    print(f"|{'-' * 50}|{'-' * 9}:|{'-' * 14}:|{'-' * 12}:|")
    for name, seconds in rows:
        print(f"| {name:<48} | {seconds:>8.1f} | {read / seconds:>13.0f} | {base / seconds:>10.2f}x |")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

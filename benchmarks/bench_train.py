"""Training throughput: `tiny` on CPU through Ray Train with 1 and 2 workers, and `paper` on one
GPU (fp32 vs bf16 autocast vs bf16 + torch.compile) when a GPU is present.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--workdir DIR]

The CPU rows run the real pipeline (shards -> reader -> DDP loop) on generated data; samples/s
is the loop's own figure over the second half of the steps (the first half warms up). The GPU
rows time train_step alone on random batches, so they measure the model, not the reader.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def make_shards(workdir: Path, image_size: int) -> str:
    from data_prep.shards import prepare_dataset
    from data_prep.synth import synthesize

    synthesize(workdir / "refer", num_images=60, image_size=image_size, seed=0, workers=1)
    prepare_dataset(workdir / "refer", "refcoco", "unc", workdir / "shards", samples_per_shard=32)
    return str(workdir / "shards" / "refcoco-unc")


def cpu_rows(shards: str, workdir: Path, steps: int) -> list[tuple[str, float]]:
    import ray

    from magnet.config import load_config
    from pipelines.train_driver import run_training

    cfg = load_config(
        "tiny",
        [
            "data.batch_size=4",
            "data.loader_workers=1",
            "data.eval_splits=[]",
            f"train.max_steps={steps}",
            f"train.log_every={steps // 2}",
            f"train.checkpoint_every={steps}",
        ],
    )
    rows = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        for workers, cpus in ((1, 1), (1, os.cpu_count()), (2, 1)):
            result = run_training(
                cfg,
                shards,
                num_workers=workers,
                cpus_per_worker=cpus,
                storage_path=str(workdir / "runs"),
                max_failures=0,
            )
            rows.append(
                (f"tiny, CPU, {workers} worker(s) x {cpus} CPU", result.metrics["train/samples_per_s"])
            )
    finally:
        ray.shutdown()
    return rows


def gpu_rows(steps: int) -> list[tuple[str, float]]:
    from bench_step import random_batches  # benchmarks/ is the script's own directory

    from magnet.config import load_config
    from magnet.models import build_model
    from magnet.train import build_optimizer, build_scheduler, train_step

    rows = []
    device = torch.device("cuda")
    for label, precision, compiled in (
        ("fp32", "fp32", False),
        ("bf16", "bf16", False),
        ("bf16+compile", "bf16", True),
    ):
        cfg = load_config(
            "paper", ["model.vision.pretrained=null", "model.text.pretrained=false", "data.batch_size=8"]
        )
        cfg.train.precision = precision
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).train()
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, total_steps=10 * steps)
        trained = torch.compile(model) if compiled else model
        batch = next(random_batches(cfg))
        for _ in range(3):  # warm-up (and compilation)
            train_step(trained, [batch], optimizer, scheduler, cfg.train, device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(trained, [batch], optimizer, scheduler, cfg.train, device)
        torch.cuda.synchronize()
        rows.append((f"paper, GPU, {label}", steps * cfg.data.batch_size / (time.perf_counter() - start)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated data here")
    parser.add_argument(
        "--demo-summary",
        type=Path,
        default=Path("demo-run/demo-summary.json"),
        help="demo-summary.json of a `magnet demo` run, tabled against its baselines when present",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        shards = make_shards(workdir, image_size=128)
        rows = cpu_rows(shards, workdir, args.steps)
    if torch.cuda.is_available():
        rows += gpu_rows(args.steps)
    else:
        print("paper on GPU: skipped (no GPU on this machine)")

    base = rows[0][1]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs, load average {load} (other processes skew the CPU rows)")
    print(f"{'setting':<40} {'samples/s':>10} {'vs first':>9}")
    for label, rate in rows:
        print(f"{label:<40} {rate:>10.2f} {rate / base:>8.2f}x")
    print_demo_scores(args.demo_summary)


def print_demo_scores(summary_path: Path) -> None:
    """The demo's final oIoU per split beside the language-blind baselines, as ratios."""
    if not summary_path.is_file():
        print(f"\ndemo scores: skipped ({summary_path} not found; run `magnet demo` first)")
        return
    summary = json.loads(summary_path.read_text())
    print(f"\ndemo ({summary['config']}, {summary['protocol']}, {summary['seconds']['total']:.0f} s)")
    print(f"{'split':<8} {'oIoU':>7} {'largest':>8} {'random':>7} {'vs largest':>11} {'vs random':>10}")
    for split, row in summary["splits"].items():
        largest, rand = row["baseline_largest"], row["baseline_random"]
        ratios = f"{row['oIoU'] / largest:>10.2f}x {row['oIoU'] / rand:>9.2f}x"
        print(f"{split:<8} {row['oIoU']:>7.2f} {largest:>8.2f} {rand:>7.2f} {ratios}")


if __name__ == "__main__":
    main()

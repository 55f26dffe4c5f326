"""MagNet forward + backward throughput and peak memory, side by side in one run.

Rows: the tiny preset on CPU (fp32, bf16 autocast, and torch.compile with ``--compile``), and
the paper preset on a GPU when one is present (fp32, bf16 autocast, compiled; batch 8 at 480 by
default). Every row runs in a fresh process, so its peak memory is its own: peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU. Ratios are against the fp32 row of the same device.

    python benchmarks/bench_model.py [--steps 10] [--compile] [--gpu-batch 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    preset: str
    device: str
    mode: str  # fp32 | bf16 | compiled
    batch: int
    size: int


def run_case(case: Case, steps: int, warmup: int, threads: int | None) -> dict[str, float]:
    """Train-mode forward + backward with every loss on; returns images/s and peak memory (MiB)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from magnet.config import load_config
    from magnet.models import build_model

    torch.manual_seed(0)
    device = torch.device(case.device)
    model = build_model(load_config(case.preset).model, device).train()
    step_fn = torch.compile(model) if case.mode == "compiled" else model
    ids = torch.zeros(case.batch, 20, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1:9], ids[:, 9] = 101, 2000, 102
    inputs = {
        "image": torch.randn(case.batch, 3, case.size, case.size, device=device),
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "target_mask": (torch.rand(case.batch, case.size, case.size, device=device) > 0.5).float(),
    }
    dtype = torch.bfloat16 if case.mode in ("bf16", "compiled") else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = step_fn(**inputs).losses["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"images_per_s": case.batch * steps / (time.perf_counter() - start), "peak_mib": peak}


def _worker(case: Case, steps: int, warmup: int, threads: int | None, queue: mp.Queue) -> None:
    try:
        queue.put(run_case(case, steps, warmup, threads))
    except Exception as err:
        queue.put({"error": f"{type(err).__name__}: {err}"[:60]})


def measure(case: Case, steps: int, warmup: int, threads: int | None) -> dict[str, float | str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(case, steps, warmup, threads, queue))
    proc.start()
    proc.join()
    if queue.empty():
        return {"error": f"worker exited with code {proc.exitcode}"}
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per row.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (compilation included).")
    parser.add_argument(
        "--compile", action="store_true", help="Also time torch.compile on CPU (slow to build)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--cpu-batch", type=int, default=4)
    parser.add_argument("--gpu-batch", type=int, default=8)
    args = parser.parse_args()

    import torch

    cpu_modes = ["fp32", "bf16"] + (["compiled"] if args.compile else [])
    cases = [Case("tiny", "cpu", mode, args.cpu_batch, 128) for mode in cpu_modes]
    if torch.cuda.is_available():
        cases += [Case("paper", "cuda", mode, args.gpu_batch, 480) for mode in ("fp32", "bf16", "compiled")]
    columns = [("preset", "<7"), ("device", "<7"), ("mode", "<10"), ("batch", ">6"), ("size", ">6")]
    columns += [("img/s", ">10"), ("vs fp32", ">9"), ("peak MiB", ">10")]
    header = "".join(f"{name:{spec}}" for name, spec in columns)
    print(header)
    print("-" * len(header))
    baseline: dict[str, float] = {}
    for case in cases:
        result = measure(case, args.steps, args.warmup, args.threads)
        prefix = f"{case.preset:<7}{case.device:<7}{case.mode:<10}{case.batch:>6}{case.size:>6}"
        if "error" in result:
            print(f"{prefix}  failed: {result['error']}")
            continue
        speed = float(result["images_per_s"])
        baseline.setdefault(case.device, speed)
        print(f"{prefix}{speed:>10.2f}{speed / baseline[case.device]:>8.2f}x{result['peak_mib']:>10.0f}")
    if not torch.cuda.is_available():
        print(
            f"GPU rows (paper, batch {args.gpu_batch}, 480x480: fp32, bf16, compiled) skipped: no CUDA device"
        )
    print("CPU peak memory is the process's peak RSS (model, weights and activations); each row runs alone.")


if __name__ == "__main__":
    main()

"""MagNet forward + backward throughput and peak memory, side by side in one run.

Two tables:
- precision: the tiny preset on CPU (fp32, bf16 autocast, and torch.compile with ``--compile``),
  and the paper preset on a GPU when one is present (fp32, bf16 autocast, compiled; batch 8 at
  480 by default); ratios against the fp32 row of the same device.
- Mask Grounding designs (``mask_grounding.encoder_pass``): MG off, ``shared`` (one fused pass
  on the masked ids) and ``separate`` (a second fused pass for MG), tiny on CPU in fp32 and paper
  on a GPU in bf16 when one is present; step time and peak memory, ratios against MG off.

Every row runs in a fresh process, so its peak memory is its own: peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU.

    python benchmarks/bench_model.py [--steps 10] [--compile] [--gpu-batch 8] [--tables precision mg]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass

MG_DESIGNS: dict[str, tuple[str, ...]] = {
    "MG off": ("model.mask_grounding.enabled=false",),
    "shared": ("model.mask_grounding.encoder_pass=shared",),
    "separate": ("model.mask_grounding.encoder_pass=separate",),
}
"""Rows of the Mask Grounding table: config overrides per design (every other loss stays on)."""


@dataclass(frozen=True)
class Case:
    preset: str
    device: str
    mode: str  # fp32 | bf16 | compiled
    batch: int
    size: int
    overrides: tuple[str, ...] = ()


def run_case(case: Case, steps: int, warmup: int, threads: int | None) -> dict[str, float]:
    """Train-mode forward + backward with every loss on (but what ``case.overrides`` turns off);
    returns images/s, seconds per step and peak memory (MiB)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from magnet.config import load_config
    from magnet.models import build_model

    torch.manual_seed(0)
    device = torch.device(case.device)
    model = build_model(load_config(case.preset, case.overrides).model, device).train()
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
    elapsed = time.perf_counter() - start
    return {"images_per_s": case.batch * steps / elapsed, "step_s": elapsed / steps, "peak_mib": peak}


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


def precision_table(args: argparse.Namespace, cuda: bool) -> None:
    cpu_modes = ["fp32", "bf16"] + (["compiled"] if args.compile else [])
    cases = [Case("tiny", "cpu", mode, args.cpu_batch, 128) for mode in cpu_modes]
    if cuda:
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
    if not cuda:
        print(
            f"GPU rows (paper, batch {args.gpu_batch}, 480x480: fp32, bf16, compiled) skipped: no CUDA device"
        )


def mask_grounding_table(args: argparse.Namespace, cuda: bool) -> None:
    """Cost of each leak-free Mask Grounding design against MG off, per device."""
    settings = [("tiny", "cpu", "fp32", args.cpu_batch, 128)]
    if cuda:
        settings.append(("paper", "cuda", "bf16", args.gpu_batch, 480))
    columns = [("MG design", "<10"), ("preset", "<7"), ("device", "<7"), ("mode", "<6"), ("batch", ">6")]
    columns += [("size", ">6"), ("ms/step", ">10"), ("vs off", ">8"), ("peak MiB", ">10"), ("vs off", ">8")]
    header = "".join(f"{name:{spec}}" for name, spec in columns)
    print(header)
    print("-" * len(header))
    for preset, device, mode, batch, size in settings:
        off: dict[str, float] = {}
        for design, overrides in MG_DESIGNS.items():
            result = measure(
                Case(preset, device, mode, batch, size, overrides), args.steps, args.warmup, args.threads
            )
            prefix = f"{design:<10}{preset:<7}{device:<7}{mode:<6}{batch:>6}{size:>6}"
            if "error" in result:
                print(f"{prefix}  failed: {result['error']}")
                continue
            step_ms, peak = 1000 * float(result["step_s"]), float(result["peak_mib"])
            off = off or {"step_ms": step_ms, "peak": peak}
            print(
                f"{prefix}{step_ms:>10.0f}{step_ms / off['step_ms']:>7.2f}x"
                f"{peak:>10.0f}{peak / off['peak']:>7.2f}x"
            )
    if not cuda:
        print(f"GPU rows (paper, bf16, batch {args.gpu_batch}, 480x480, per design) skipped: no CUDA device")


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
    parser.add_argument(
        "--tables", nargs="+", choices=("precision", "mg"), default=["precision", "mg"], help="Tables to run."
    )
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if "precision" in args.tables:
        precision_table(args, cuda)
        print()
    if "mg" in args.tables:
        mask_grounding_table(args, cuda)
        print()
    print("CPU peak memory is the process's peak RSS (model, weights and activations); each row runs alone.")


if __name__ == "__main__":
    main()

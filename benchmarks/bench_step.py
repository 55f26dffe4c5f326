"""Where one training step's time goes, and how close it runs to this machine's arithmetic limit.

One process, one model, the real loop's ``train_step`` order (data, forward, backward, optimizer):
the forward is split by part with module hooks (exclusive time: a stage's fusion and CAM count as
fusion, not as vision), Mask Grounding and the alignment loss capture everything they run (MG's
masked language pass included). The parts add up to the measured step; the remainder is "other".
Achieved FLOP/s (torch's FlopCounterMode over one forward + backward) is set against the measured
peak of a large fp32 matrix product on the same threads: the physical ceiling here.

    .venv/bin/python benchmarks/bench_step.py [--preset demo] [--steps 8] [--threads 1]
    .venv/bin/python benchmarks/bench_step.py --against HEAD~5   # older code, side by side

``--against REV`` checks REV out in a temporary git worktree and runs this measurement there in a
subprocess (its own code on the path), then prints both steps and their ratio in one table. The
demo preset on one thread is what one of the demo's two Ray workers runs; the paper preset (batch
8 at 480) runs on a GPU when one is present.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
PARTS = (
    "data",
    "vision stages",
    "text groups",
    "fusions + CAM",
    "decoder",
    "Mask Grounding",
    "alignment loss",
    "segmentation loss",
    "backward",
    "optimizer step",
    "other",
)
CAPTURING = ("Mask Grounding", "alignment loss")
"""Parts that own all time spent inside them (MG re-runs encoder modules on the masked words)."""


class PartTimer:
    """Exclusive wall time per part: time goes to the innermost open part, unless a capturing
    part is open, which takes everything inside it."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.last = 0.0
        self.handles: list = []
        self.wrapped: list[tuple[object, str]] = []

    def _charge(self) -> None:
        self.sync()
        now = time.perf_counter()
        if self.stack:
            owner = next((part for part in self.stack if part in CAPTURING), self.stack[-1])
            self.totals[owner] += now - self.last
        self.last = now

    def enter(self, part: str) -> None:
        self._charge()
        self.stack.append(part)

    def leave(self) -> None:
        self._charge()
        self.stack.pop()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave()

    def watch(self, module: nn.Module | None, part: str) -> None:
        if module is None:
            return
        self.handles.append(module.register_forward_pre_hook(lambda *_: self.enter(part)))
        self.handles.append(module.register_forward_hook(lambda *_: self.leave()))

    def watch_method(self, owner: object, name: str, part: str) -> None:
        """Time a method of one instance (MG's input builder is a method, not a module)."""
        method = getattr(owner, name, None)
        if method is None:
            return

        def timed(*args, **kwargs):
            with self.part(part):
                return method(*args, **kwargs)

        setattr(owner, name, timed)
        self.wrapped.append((owner, name))

    def close(self) -> None:
        """Remove every hook and wrapper: later calls run untimed."""
        for handle in self.handles:
            handle.remove()
        for owner, name in self.wrapped:
            delattr(owner, name)  # the instance attribute; the class's method shows again


def watch_model(timer: PartTimer, model: nn.Module) -> None:
    """Label the model's modules by part (names of magnet.models.magnet.MagNet)."""
    vision, language = model.image_model, model.language_model
    timer.watch(vision.patch_embed, "vision stages")
    for stage in vision.layers:
        timer.watch(stage, "vision stages")
        for module in (stage.fusion, stage.res_gate, getattr(stage, "cam", None)):
            timer.watch(module, "fusions + CAM")
    timer.watch(language.embeddings, "text groups")
    for layer in language.encoder.layer:
        timer.watch(layer, "text groups")
    for module in (*language.pwams, *language.res_gates):
        timer.watch(module, "fusions + CAM")
    timer.watch(language, "Mask Grounding")  # the whole language path runs only for MG's masked words
    timer.watch(model.classifier, "decoder")
    timer.watch(model.criterion, "segmentation loss")
    timer.watch(getattr(model.criterion, "mask_grounding", None), "Mask Grounding")
    timer.watch(getattr(model.criterion, "alignment", None), "alignment loss")
    timer.watch_method(model, "_mask_grounding_inputs", "Mask Grounding")


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matrix product on this device and thread count (best of repeats)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_batches(cfg, workdir: Path) -> Iterator[dict[str, torch.Tensor]]:
    """The shard reader's batches, epoch after epoch, on the generated data the demo trains on."""
    from data_prep.shards import prepare_dataset
    from data_prep.synth import synthesize
    from magnet.data import DataPosition, build_train_loader, open_split

    size = cfg.model.image_size
    synthesize(workdir / "refer", num_images=60, image_size=size)
    prepare_dataset(workdir / "refer", "refcoco", "unc", workdir / "shards", splits=["train"])
    shards = open_split(str(workdir / "shards" / "refcoco-unc"), "train")
    for epoch in itertools.count():
        position = DataPosition(epoch, 0)
        yield from build_train_loader(
            shards, cfg.data, image_size=size, seed=0, rank=0, world_size=1, position=position
        )


def random_batches(cfg) -> Iterator[dict[str, torch.Tensor]]:
    """One random batch of the reader's contract, repeated (GPU rows time the model, not the reader)."""
    s, b, length = cfg.model.image_size, cfg.data.batch_size, cfg.model.text.max_tokens
    batch = {
        "image": torch.randn(b, 3, s, s),
        "mask": (torch.rand(b, s, s) > 0.5).float(),
        "input_ids": torch.randint(1000, 2000, (b, length)),
        "attention_mask": torch.ones(b, length, dtype=torch.int64),
    }
    return itertools.repeat(batch)


def measure(preset: str, overrides: list[str], steps: int, warmup: int, device_name: str) -> dict:
    """Per-part seconds per step, step time, samples/s, FLOPs per step and the matmul peak."""
    from torch.utils.flop_counter import FlopCounterMode

    from magnet.config import load_config
    from magnet.models import build_model
    from magnet.train import build_optimizer, build_scheduler, train_step

    try:  # the loop's allocator setting (older revisions measured with --against lack it)
        from magnet.train import keep_freed_memory
    except ImportError:
        pass
    else:
        keep_freed_memory()
    device = torch.device(device_name)
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, device).train()
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps=100 * (steps + warmup))
    workdir = tempfile.TemporaryDirectory()
    loader = synthetic_batches(cfg, Path(workdir.name)) if device.type == "cpu" else random_batches(cfg)

    for _ in range(warmup):
        train_step(model, [next(loader)], optimizer, scheduler, cfg.train, device)

    timer = PartTimer(lambda: _sync(device))
    watch_model(timer, model)
    loss_backward = torch.Tensor.backward
    optimizer_step = optimizer.step

    def timed_backward(tensor, *args, **kwargs):
        with timer.part("backward"):
            return loss_backward(tensor, *args, **kwargs)

    def timed_optimizer_step(*args, **kwargs):
        with timer.part("optimizer step"):
            return optimizer_step(*args, **kwargs)

    torch.Tensor.backward = timed_backward
    optimizer.step = timed_optimizer_step
    try:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            with timer.part("other"):
                with timer.part("data"):
                    batch = next(loader)
                train_step(model, [batch], optimizer, scheduler, cfg.train, device)
        _sync(device)
        step_seconds = (time.perf_counter() - start) / steps
    finally:
        torch.Tensor.backward = loss_backward
        del optimizer.step
        timer.close()

    batch = next(loader)
    workdir.cleanup()
    with FlopCounterMode(display=False) as counter:
        out = model(
            batch["image"].to(device),
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            target_mask=batch["mask"].to(device),
        )
        out.losses["loss"].backward()
    model.zero_grad(set_to_none=True)
    return {
        "preset": preset,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "batch": cfg.data.batch_size,
        "image_size": cfg.model.image_size,
        "parts": {part: timer.totals.get(part, 0.0) / steps for part in PARTS},
        "step_seconds": step_seconds,
        "samples_per_s": cfg.data.batch_size / step_seconds,
        "flops_per_step": counter.get_total_flops(),
        "matmul_peak": matmul_peak(device),
    }


def measure_at(revision: str, args: argparse.Namespace) -> dict:
    """The same measurement on the code of ``revision`` (a temporary git worktree)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision],
            check=True,
            capture_output=True,
        )
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            command = [sys.executable, __file__, "--json", *_measure_args(args)]
            out = subprocess.run(
                command, env=env, cwd=tree, capture_output=True, text=True, check=True
            ).stdout
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return json.loads(out.strip().splitlines()[-1])


def _measure_args(args: argparse.Namespace) -> list[str]:
    extra = [item for override in args.set for item in ("--set", override)]
    return [
        "--preset",
        args.preset,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        *extra,
    ]


def print_table(results: list[tuple[str, dict]]) -> None:
    labels = [label for label, _ in results]
    first = results[0][1]
    print(
        f"\n{first['preset']} on {first['device']}, {first['threads']} thread(s), batch {first['batch']}, "
        f"{first['image_size']} px; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )
    header = f"{'part (ms per step)':<22}" + "".join(f"{label:>14}{'share':>7}" for label in labels)
    print(header)
    print("-" * len(header))
    for part in PARTS:
        row = f"{part:<22}"
        for _, result in results:
            ms = 1e3 * result["parts"][part]
            row += f"{ms:>14.1f}{100 * result['parts'][part] / result['step_seconds']:>6.0f}%"
        print(row)
    print("-" * len(header))
    sums = "".join(f"{1e3 * sum(r['parts'].values()):>14.1f}{'':>7}" for _, r in results)
    print(f"{'sum of parts':<22}{sums}")
    steps = "".join(f"{1e3 * r['step_seconds']:>14.1f}{'':>7}" for _, r in results)
    print(f"{'measured step':<22}{steps}")
    print(f"{'samples/s':<22}" + "".join(f"{r['samples_per_s']:>14.2f}{'':>7}" for _, r in results))
    for label, result in results:
        achieved = result["flops_per_step"] / (
            result["step_seconds"] - result["parts"]["data"] - result["parts"]["optimizer step"]
        )
        print(
            f"{label}: {result['flops_per_step'] / 1e9:.2f} GFLOP per step (forward + backward), "
            f"{achieved / 1e9:.1f} GFLOP/s achieved vs {result['matmul_peak'] / 1e9:.1f} GFLOP/s "
            f"fp32 matmul peak ({100 * achieved / result['matmul_peak']:.0f}%)"
        )
    if len(results) > 1:
        base = results[0][1]["samples_per_s"]
        for label, result in results[1:]:
            print(f"{label} vs {labels[0]}: {result['samples_per_s'] / base:.2f}x samples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=[], help="config override, section.key=value")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a demo Ray worker has 1 CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--against", default=None, help="git revision to measure side by side (e.g. HEAD~3)")
    parser.add_argument("--json", action="store_true", help="print the measurement as one JSON line")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and args.preset == "demo":
        args.preset = "paper"
        args.set = [
            "model.vision.pretrained=null",
            "model.text.pretrained=false",
            "data.batch_size=8",
            *args.set,
        ]

    result = measure(args.preset, args.set, args.steps, args.warmup, args.device)
    if args.json:
        print(json.dumps(result))
        return
    results = [("this tree", result)]
    if args.against:
        results.insert(0, (args.against[:14], measure_at(args.against, args)))
    print_table(results)


if __name__ == "__main__":
    main()

"""`magnet plan`: the per-GPU batch, memory, time and GPU-hours of a config's training run on a
given card, before renting it.

How the figures are made:

- Memory. ``magnet.footprint.measure_step`` runs one real training step (forward, backward,
  gradient norm, AdamW) of the config's model on fake tensors at batch 2 and 4 and records the bytes
  of tensor storage held after every operator. Each operator's figure is a line over the batch
  (fixed: weights, AdamW's state, gradients, batch-independent temporaries; per sample: what one
  sample's activations add), and the step's peak at any batch is the highest of those lines there
  (``MemoryModel``). On a GPU that is PyTorch's "allocated" memory; the card also holds DDP's
  gradient buckets (one more copy of the gradients, with 2 GPUs or more), what the caching
  allocator keeps but cannot hand out (ALLOCATOR_OVERHEAD) and the CUDA context with the
  libraries' workspaces (CONTEXT_GIB), all three added here.
- Time. FLOPs per sample are torch's FlopCounterMode over that same step (matmuls, convolutions,
  attention; forward + backward), at a stated model FLOPs utilisation (MFU) of the card's dense peak
  for the precision: fp32 runs on the CUDA cores (PyTorch keeps TF32 off for matmuls unless told),
  bf16 on the tensor cores. Evaluation, checkpoints, data loading stalls and communication are not
  counted beyond what the MFU absorbs.

How far off: the fake-tensor step counts every tensor the real step allocates on the CPU within
10% (tests/pipelines/test_plan.py measures a real step of the tiny model with the allocator's own
accounting); on a GPU the allowances below are uncalibrated, so expect GPU memory within about 15%
and time within a factor of 2 until bench_train.py has measured them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from magnet.config import Config
    from magnet.footprint import Precision, StepFootprint

GIB = 2**30
MEASURED_BATCHES = (2, 4)
"""The batch sizes of the two fake-tensor steps (batch 1 runs other operators: a few squeezes)."""
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")


# --------------------------------------------------------------------------------------- cards
@dataclass(frozen=True)
class Gpu:
    """A card: its name, the memory nvidia-smi reports as total, and its dense peak TFLOP/s per
    precision (None where it has no fast path for it)."""

    label: str
    memory_mib: int
    tflops: dict[str, float | None]

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 2**20


GPUS: dict[str, Gpu] = {
    # NVIDIA's data sheets; fp32 = CUDA cores (no TF32), bf16 = tensor cores without sparsity.
    "v100-32gb": Gpu("V100 32GB (SXM2)", 32510, {"fp32": 15.7, "bf16": None}),
    "a100-40gb": Gpu("A100 40GB (SXM4)", 40536, {"fp32": 19.5, "bf16": 312.0}),
    "a100-80gb": Gpu("A100 80GB (SXM4)", 81920, {"fp32": 19.5, "bf16": 312.0}),
    "h100-80gb": Gpu("H100 80GB (SXM5)", 81559, {"fp32": 66.9, "bf16": 989.4}),
    "l4-24gb": Gpu("L4 24GB", 23034, {"fp32": 30.3, "bf16": 121.0}),
    "rtx4090-24gb": Gpu("GeForce RTX 4090 24GB", 24564, {"fp32": 82.6, "bf16": 165.2}),
}

# ----------------------------------------------------------------------------- calibration
# UNCALIBRATED: no GPU has been lent to this project yet, so these are stated assumptions, not
# measurements. benchmarks/bench_train.py's GPU rows are where they would be calibrated: run the
# paper step at batches 1, 2, 4 and 8 per precision, then
# - ALLOCATOR_OVERHEAD = torch.cuda.max_memory_reserved() / max_memory_allocated() - 1;
# - CONTEXT_GIB = the process's memory in nvidia-smi (NVML) minus max_memory_reserved();
# - MFU = samples/s x plan's FLOPs per sample / the card's peak below, per precision;
# and max_memory_allocated() against magnet.footprint's peak checks the fake-tensor step itself.
CONTEXT_GIB = 1.0
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL's buffers: memory outside PyTorch's allocator."""
ALLOCATOR_OVERHEAD = 0.10
"""Caching-allocator blocks held but not usable (fragmentation), as a share of allocated memory."""
MFU: dict[str, float] = {"fp32": 0.20, "bf16": 0.10}
"""Model FLOPs utilisation assumed per precision, everything included (data loading, evaluation,
communication). fp32 0.20: LAVT's published run, 40 epochs of RefCOCO in about 2 days on 4 V100s,
is 19% of their fp32 peak for the LAVT model as counted here (1.23 TFLOP per sample; README,
"Plan a run"). bf16 0.10: an assumption, no run of this family in bf16 being published: the tensor
cores speed up the matmuls, not the fp32 grid sampling, the norms and the window shuffles, so the
fraction of their far higher peak is lower."""


# ------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class TrainSplit:
    """A benchmark's published training split: referred objects and expressions."""

    name: str
    refs: int
    expressions: int

    def units(self, one_expression_per_object: bool) -> int:
        """What an epoch walks over, as the reader counts (magnet.data.SplitShards.units)."""
        return self.refs if one_expression_per_object else self.expressions


TRAIN_SPLITS = (
    # refs: shared/design/refcoco-data-and-eval.md; expressions: the refer toolkit's splits
    # (RefCOCO 142,210 in all, RefCOCO+ 141,564, G-Ref umd 95,010).
    TrainSplit("RefCOCO (unc)", 42_404, 120_624),
    TrainSplit("RefCOCO+ (unc)", 42_278, 120_191),
    TrainSplit("G-Ref (umd)", 42_226, 80_512),
)


# ---------------------------------------------------------------------------------- inputs
class PlanError(ValueError):
    """A plan that cannot be made from what the user asked, naming the option at fault."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option, self.problem = option, problem


def find_gpu(name: str) -> Gpu:
    """The card called ``name`` (case-insensitive), or a PlanError listing the known ones."""
    gpu = GPUS.get(name.strip().lower())
    if gpu is None:
        raise PlanError("--gpu", f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return gpu


def check_request(gpus: int, mfu: float | None, precisions: tuple[str, ...], gpu: Gpu, name: str) -> None:
    """Refuse what no plan can be made of, before anything is measured."""
    if gpus < 1:
        raise PlanError("--gpus", f"{gpus} GPUs: a run needs 1 or more")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError("--mfu", f"{mfu} is not a utilisation; give a fraction in (0, 1], e.g. 0.3")
    if all(gpu.tflops[precision] is None for precision in precisions):
        raise PlanError("--precision", f"{name}: {gpu.label} has no {' or '.join(precisions)}; plan fp32")


# ---------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Line:
    """bytes = intercept + slope x batch."""

    intercept: float
    slope: float

    def at(self, batch: int) -> float:
        return self.intercept + self.slope * batch

    @classmethod
    def through(cls, one: tuple[int, float], two: tuple[int, float]) -> Line:
        (b1, y1), (b2, y2) = one, two
        slope = (y2 - y1) / (b2 - b1)
        return cls(y1 - slope * b1, slope)


def upper_envelope(lines: list[Line], start: float = 1.0) -> tuple[Line, ...]:
    """The lines that are the highest somewhere from ``start`` on, in the order they take over:
    max(line.at(b) for line in lines) for every b >= start, from a handful of lines."""
    steepest: dict[float, Line] = {}
    for line in lines:  # of lines with one slope only the highest can be on top
        if line.slope not in steepest or line.intercept > steepest[line.slope].intercept:
            steepest[line.slope] = line
    candidates = list(steepest.values())
    current = max(candidates, key=lambda line: (line.at(start), line.slope))
    envelope, where = [current], start
    while True:  # the next line to overtake is the steeper one that crosses the current one first
        crossings = [
            (
                max(where, (current.intercept - line.intercept) / (line.slope - current.slope)),
                -line.slope,
                line,
            )
            for line in candidates
            if line.slope > current.slope
        ]
        if not crossings:
            return tuple(envelope)
        where, _, current = min(crossings, key=lambda crossing: crossing[:2])
        envelope.append(current)


@dataclass(frozen=True)
class MemoryModel:
    """Allocated bytes per GPU over the per-GPU batch: the most held at once during the step, plus
    DDP's gradient buckets with 2 GPUs or more.

    Every operator's bytes held are a line over the batch (each tensor either scales with it or
    does not), so two steps of the same operators at two batch sizes give the step's peak at any
    batch: the upper envelope of those lines. The envelope is what a line through the two peaks
    misses: the peak moves from a batch-independent moment (the optimizer step, the gradients of the
    word embeddings) to the end of the forward pass as the batch grows.
    """

    lines: tuple[Line, ...]
    gradient_bytes: int

    @classmethod
    def from_footprints(cls, low: StepFootprint, high: StepFootprint) -> MemoryModel:
        if low.operators != high.operators or len(low.timeline) != len(high.timeline):
            raise ValueError(
                f"the training step ran other operators at batch {low.batch} than at {high.batch}: "
                "their memory cannot be lined up"
            )
        lines = [
            Line.through((low.batch, a), (high.batch, b))
            for a, b in zip(low.timeline, high.timeline, strict=True)
        ]
        return cls(upper_envelope(lines), high.gradient_bytes)

    def line_at(self, batch: int) -> Line:
        """The line on top at ``batch``: its intercept is the fixed part, its slope the per-sample part."""
        return max(self.lines, key=lambda line: (line.at(batch), line.slope))

    def allocated(self, batch: int, gpus: int) -> float:
        buckets = self.gradient_bytes if gpus > 1 else 0
        return self.line_at(batch).at(batch) + buckets

    def on_gpu(self, batch: int, gpus: int) -> float:
        """What the card must hold: allocated, the allocator's overhead, the CUDA context."""
        return self.allocated(batch, gpus) * (1 + ALLOCATOR_OVERHEAD) + CONTEXT_GIB * GIB

    def largest_batch(self, gpu: Gpu, gpus: int, limit: int = 4096) -> int:
        """The largest per-GPU batch whose estimate fits the card (0: not even one sample)."""
        if self.on_gpu(1, gpus) > gpu.memory_bytes:
            return 0
        low, high = 1, limit  # on_gpu grows with the batch: bisect for the last that fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.on_gpu(mid, gpus) <= gpu.memory_bytes else (low, mid - 1)
        return low


# ----------------------------------------------------------------------------------- batch
@dataclass(frozen=True)
class BatchSplit:
    """Samples per GPU per micro-batch, micro-batches per optimizer step, and their product over GPUs."""

    per_gpu: int
    accum: int
    global_batch: int


def split_batch(global_batch: int, gpus: int, largest: int) -> BatchSplit:
    """The largest per-GPU batch up to ``largest`` and the fewest accumulation steps that give
    ``global_batch`` samples per optimizer step exactly; when no split is exact (a global batch
    that is no multiple of the GPUs), the fewest steps that reach at least it."""
    if largest < 1:
        raise ValueError("no per-GPU batch fits")
    per_gpu_target = math.ceil(global_batch / gpus)
    cap = min(largest, per_gpu_target)
    for accum in range(math.ceil(per_gpu_target / cap), per_gpu_target + 1):
        if global_batch % (gpus * accum) == 0 and global_batch // (gpus * accum) <= cap:
            return BatchSplit(global_batch // (gpus * accum), accum, global_batch)
    accum = math.ceil(per_gpu_target / cap)
    per_gpu = math.ceil(per_gpu_target / accum)
    return BatchSplit(per_gpu, accum, gpus * per_gpu * accum)


# ------------------------------------------------------------------------------------ time
@dataclass(frozen=True)
class Schedule:
    """Optimizer steps per epoch and in all, and the time they take on the GPUs."""

    steps_per_epoch: int
    total_steps: int
    step_seconds: float

    @property
    def epoch_seconds(self) -> float:
        return self.steps_per_epoch * self.step_seconds

    @property
    def total_seconds(self) -> float:
        return self.total_steps * self.step_seconds

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch


def schedule(
    units: int,
    gpus: int,
    split: BatchSplit,
    *,
    epochs: int,
    max_steps: int | None,
    flops_per_sample: float,
    peak_tflops: float,
    mfu: float,
) -> Schedule:
    """Steps as the training loop counts them (each rank reads ceil(units / (gpus x batch))
    micro-batches per epoch, grouped by accum; ``max_steps`` wins over ``epochs``), each taking the
    FLOPs of one GPU's share at ``mfu`` of its peak."""
    micro_batches = math.ceil(units / (gpus * split.per_gpu))
    steps_per_epoch = math.ceil(micro_batches / split.accum)
    step_seconds = flops_per_sample * split.per_gpu * split.accum / (peak_tflops * 1e12 * mfu)
    return Schedule(steps_per_epoch, max_steps or epochs * steps_per_epoch, step_seconds)


def gpu_hours(seconds: float, gpus: int) -> float:
    return seconds * gpus / 3600


def duration(seconds: float) -> str:
    """Seconds as the unit a person would say: 45 s, 12 min, 3.4 h, 2.1 d."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# ---------------------------------------------------------------------------- measurement
@lru_cache(maxsize=8)
def _measured(config_json: str, precision: Precision) -> tuple[MemoryModel, int, int]:
    from magnet.config import config_from_dict
    from magnet.footprint import measure_step

    cfg = config_from_dict(json.loads(config_json))
    low, high = (measure_step(cfg, batch, precision) for batch in MEASURED_BATCHES)
    return MemoryModel.from_footprints(low, high), high.flops // high.batch, high.parameters


def measure(cfg: Config, precision: Precision) -> tuple[MemoryModel, int, int]:
    """The memory model, FLOPs per sample and parameter count of ``cfg``'s training step (two
    fake-tensor steps, MEASURED_BATCHES; kept for the process, so one config is measured once)."""
    return _measured(cfg.model_dump_json(), precision)


# ------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class PrecisionPlan:
    """What one precision gives on the card: the batch split, or why there is none."""

    precision: str
    peak_tflops: float | None  # None: the card has no fast path for this precision
    mfu: float
    memory: MemoryModel | None = None
    largest: int = 0
    split: BatchSplit | None = None

    def memory_gib(self, gpus: int) -> float:
        assert self.memory is not None and self.split is not None
        return self.memory.on_gpu(self.split.per_gpu, gpus) / GIB


def plan_precision(
    precision: str, memory: MemoryModel, gpu: Gpu, gpus: int, global_batch: int, mfu: float
) -> PrecisionPlan:
    """The largest batch that fits and the split of the global batch it allows (none if 0 fits)."""
    largest = memory.largest_batch(gpu, gpus)
    split = split_batch(global_batch, gpus, largest) if largest else None
    return PrecisionPlan(precision, gpu.tflops[precision], mfu, memory, largest, split)


def over_by(memory: MemoryModel, gpu: Gpu, gpus: int) -> str:
    """How batch 1 misses the card: its estimate and the excess."""
    need = memory.on_gpu(1, gpus) / GIB
    return f"batch 1 needs {need:.1f} GiB per GPU, {need - gpu.memory_bytes / GIB:.1f} GiB more than the card"


@dataclass(frozen=True)
class Dataset:
    """A training split as the plan counts it: a name and the units an epoch walks over."""

    name: str
    units: int
    unit: str  # "refs" or "expressions"


def render(
    *,
    config_label: str,
    image_size: int,
    parameters: int,
    gpu: Gpu,
    gpus: int,
    global_batch: int,
    global_source: str,
    epochs: int,
    max_steps: int | None,
    flops_per_sample: int,
    plans: list[PrecisionPlan],
    datasets: list[Dataset],
) -> str:
    """The plan as the tables `magnet plan` prints."""
    schedule_text = f"{max_steps:,} steps (train.max_steps)" if max_steps else f"{epochs} epochs"
    lines = [
        f"MagNet {config_label} ({parameters / 1e6:.1f} M trained parameters, {image_size}x{image_size}) on "
        f"{gpus} x {gpu.label}, {gpu.memory_bytes / GIB:.1f} GiB each",
        f"global batch {global_batch} ({global_source}); {schedule_text}; "
        f"{flops_per_sample / 1e12:.2f} TFLOP per sample (forward + backward, counted on the model)",
        "",
        f"{'precision':<10}{'batch/GPU':>10}{'accum':>7}{'global':>8}{'memory/GPU':>12}"
        f"{'largest batch':>15}{'fixed':>10}{'per sample':>12}",
    ]
    for p in plans:
        if p.memory is None:
            lines.append(f"{p.precision:<10}  {gpu.label} has no {p.precision}")
        elif p.split is None:
            lines.append(f"{p.precision:<10}  does not fit: {over_by(p.memory, gpu, gpus)}")
        else:
            s, line = p.split, p.memory.line_at(p.split.per_gpu)
            fixed = p.memory.allocated(s.per_gpu, gpus) - line.slope * s.per_gpu
            lines.append(
                f"{p.precision:<10}{s.per_gpu:>10}{s.accum:>7}{s.global_batch:>8}"
                f"{p.memory_gib(gpus):>8.1f} GiB{p.largest:>15}"
                f"{fixed / GIB:>6.1f} GiB{line.slope / GIB:>8.2f} GiB"
            )
    lines += [
        f"memory/GPU = allocated x {1 + ALLOCATOR_OVERHEAD:.2f} + {CONTEXT_GIB:.1f} GiB CUDA context; "
        "allocated = fixed + per sample x batch/GPU,",
        "  from a training step on fake tensors"
        + ("; fixed includes DDP's gradient buckets" if gpus > 1 else ""),
        "",
        f"{'dataset':<16}{'units/epoch':>20}  {'precision':<10}{'steps/epoch':>12}{'epoch':>10}"
        f"{'steps' if max_steps else f'{epochs} epochs':>12}{'GPU-hours':>11}",
    ]
    fitting = [p for p in plans if p.split is not None and p.peak_tflops is not None]
    for data in datasets:
        for index, p in enumerate(fitting):
            assert p.split is not None and p.peak_tflops is not None
            run = schedule(
                data.units,
                gpus,
                p.split,
                epochs=epochs,
                max_steps=max_steps,
                flops_per_sample=flops_per_sample,
                peak_tflops=p.peak_tflops,
                mfu=p.mfu,
            )
            name, units = (data.name, f"{data.units:,} {data.unit}") if index == 0 else ("", "")
            lines.append(
                f"{name:<16}{units:>20}  {p.precision:<10}{run.steps_per_epoch:>12,}"
                f"{duration(run.epoch_seconds):>10}{duration(run.total_seconds):>12}"
                f"{gpu_hours(run.total_seconds, gpus):>11,.0f}"
            )
    lines += [
        "time = FLOPs / (GPUs x peak x MFU): "
        + "; ".join(f"{p.precision} {p.mfu:.0%} of {p.peak_tflops:g} TFLOP/s" for p in fitting)
        + " (--mfu);",
        "  evaluation and checkpoints not included; allowances and MFU uncalibrated (pipelines/plan.py)",
    ]
    return "\n".join(lines)

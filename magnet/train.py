"""The per-worker training loop: a plain function every rank runs, with Ray or without.

    train(cfg, shards, reporter=..., logger=...)      the loop: restore, step, log, evaluate, checkpoint
      train_step(model, micro_batches, ...)           one optimizer step over grad_accum micro-batches
      build_optimizer / build_scheduler               AdamW without decay on norms, biases and
                                                      position tables; poly decay with warm-up

Distribution comes from outside: when torch.distributed is initialised (Ray Train's TorchConfig
does it) the model is wrapped in DDP and every rank reads its share of the shards. Reporting goes
through two small protocols so the loop knows nothing of Ray or MLflow:

- ``Reporter``: where checkpoints go and come back from (Ray Train in pipelines/train_driver.py,
  a local directory in ``LocalReporter``). Every rank calls ``report`` the same number of times,
  at steps fixed by the config, because Ray Train's report is a barrier.
- ``RunLogger``: curves and pictures, called on rank 0 only (MLflow in pipelines/tracking.py).

Resume is exact: a checkpoint holds the model, optimizer, scheduler, step, the reader's position
and every rank's RNG state, so a run restored at step k continues with the batches and random
draws an uninterrupted run would have used at step k + 1.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from magnet import progress
from magnet.checkpoint import (
    CHECKPOINT_GLOB,
    TrainState,
    checkpoint_name,
    load_initial_weights,
    load_training_state,
    read_checkpoint_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from magnet.config import Config, TrainConfig
from magnet.data import (
    DataPosition,
    ShardError,
    SplitShards,
    build_train_loader,
    open_split,
    train_batches_per_epoch,
)
from magnet.evaluate import evaluate, mixed_precision, prediction_figure
from magnet.models import build_model
from magnet.models.magnet import PRETRAINED_TEXT_KEY, part_of

log = logging.getLogger(__name__)

# Checkpoint score: the first eval split's oIoU at that checkpoint's weights, NOT_EVALUATED
# otherwise (finite: Ray's run snapshot is JSON, where NaN would come back as null).
SCORE_KEY = "score"
NOT_EVALUATED = -1.0
PICTURE_EXAMPLES = 4
# Train shards dropped for a failed checksum (data.skip_corrupt_shards): logged at the run's first
# step and carried in every report, so a run that trained on less data says so where it is read.
SKIPPED_SHARDS_KEY = "data/skipped_shards"
# 1 at an evaluation that failed on its data (a shard corrupted or lost after the run's checks), 0 at
# one that scored: logged and reported at that step, whose checkpoint is kept either way.
EVAL_FAILED_KEY = "eval/failed"


# ----------------------------------------------------------------------------- the protocols
class RunLogger(Protocol):
    """Curves and pictures of a run (rank 0 only)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_predictions(self, figure_png: bytes, name: str, step: int) -> None: ...


class NullLogger:
    """A RunLogger that keeps nothing: other ranks, and runs without tracking."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_predictions(self, figure_png: bytes, name: str, step: int) -> None:
        pass


class Reporter(Protocol):
    """Where checkpoints go and where a restarted run finds the latest one."""

    def latest_checkpoint(self) -> AbstractContextManager[Path | None]:
        """A local directory holding the latest checkpoint while the context is open, or None."""
        ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        """Called by every rank at the same steps; ``checkpoint_dir`` is set on rank 0 only."""
        ...


class LocalReporter:
    """Checkpoints kept under a local directory as `checkpoint_name` names them: runs without Ray.

    Args:
        directory: where checkpoints are copied; a restart resumes from the newest one.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.reports: list[dict[str, float]] = []

    def checkpoints(self) -> list[Path]:
        return sorted(self.directory.glob(CHECKPOINT_GLOB))

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.directory / checkpoint_name(int(metrics["step"])))


@dataclass(frozen=True)
class StepEvent:
    """What one rank did in one optimizer step, for hooks (progress files, fault injection)."""

    rank: int
    step: int  # optimizer steps done, this one included
    epoch: int  # the epoch this step's batches came from
    sent_ids: list[int]
    losses: dict[str, float]


StepHook = Callable[[StepEvent], None]


# ------------------------------------------------------------------------ optimizer, schedule
def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_names: Sequence[str],
    *,
    lr: float,
    pretrained_text_lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW groups: decayed weights, and undecayed norms, biases (any 1-d tensor) and the
    position or query tables named by ``no_decay_names``, which decay would only pull towards zero;
    each split again when the pretrained text encoder (``PRETRAINED_TEXT_KEY``) trains at
    ``lr * pretrained_text_lr_scale`` (a recipe whose lr suits random-init layers would overwrite
    what pretraining taught). Empty groups are left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim <= 1 or any(key in name for key in no_decay_names))
        pretrained_text = pretrained_text_lr_scale != 1.0 and PRETRAINED_TEXT_KEY.match(name) is not None
        groups.setdefault((decayed, pretrained_text), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decayed else 0.0,
            "lr": lr * (pretrained_text_lr_scale if pretrained_text else 1.0),
        }
        for (decayed, pretrained_text), params in sorted(groups.items(), key=_decayed_first)
    ]


def _decayed_first(group: tuple[tuple[bool, bool], Any]) -> tuple[bool, bool]:
    """Decayed groups first, as checkpoints written before the text scale existed have them."""
    (decayed, pretrained_text), _ = group
    return (not decayed, pretrained_text)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters; the per-tensor loop took 16% of
    the demo's CPU step, bench_step.py); same update, same state dict."""
    groups = param_groups(
        model,
        cfg.weight_decay,
        cfg.no_decay_names,
        lr=cfg.lr,
        pretrained_text_lr_scale=cfg.pretrained_text_lr_scale,
    )
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def global_batch_mismatch(cfg: Config, world_size: int) -> str | None:
    """Why a run's samples per optimizer step differ from ``train.global_batch``, or None.

    The recipe's lr and schedule were tuned for that batch, so a run with another is not comparable.
    """
    expected = cfg.train.global_batch
    actual = world_size * cfg.data.batch_size * cfg.train.grad_accum
    if expected is None or actual == expected:
        return None
    return (
        f"global batch {actual} = {world_size} workers x data.batch_size {cfg.data.batch_size} x "
        f"train.grad_accum {cfg.train.grad_accum} differs from the preset's train.global_batch {expected}"
    )


def lr_factor(step: int, total_steps: int, power: float, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr at ``step``: (1 - step/total)**power, times a linear warm-up
    (step+1)/warmup over the first warmup_steps."""
    poly = max(0.0, 1.0 - step / total_steps) ** power
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return poly * warmup


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay stepped once per optimizer step, as the reference recipe."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.poly_power, cfg.warmup_steps)
    )


# -------------------------------------------------------------------------------- one step
def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("image", "mask", "input_ids", "attention_mask")
    return {key: batch[key].to(device, non_blocking=True) for key in keys}


def train_step(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """Forward and backward over the micro-batches, then clip (if train.grad_clip), step and schedule once.

    DDP synchronises gradients only on the last micro-batch (no_sync on the others).
    Returns the loss components averaged over the micro-batches.
    """
    totals: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        data = _to_device(batch, device)
        with sync:
            with mixed_precision(device, cfg.precision):
                out = model(
                    data["image"], data["input_ids"], data["attention_mask"], target_mask=data["mask"]
                )
            (out.losses["loss"] / len(micro_batches)).backward()
        for key, value in out.losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) / len(micro_batches)
    grad_norm, part_norms = _grad_norms(model)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg.grad_clip, grad_norm)
    totals["grad_norm"] = float(grad_norm)
    totals.update({f"grad_norm/{part}": norm for part, norm in part_norms.items()})
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return totals


def _grad_norms(model: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
    """The global gradient norm (before clipping) and the norm of each part's gradients
    (``magnet.models.magnet.PARTS``): which part the loss reaches, and how hard, step by step."""
    by_part: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            by_part.setdefault(part_of(name.removeprefix("module.").removeprefix("_orig_mod.")), []).append(
                param.grad
            )
    norms = {part: torch.nn.utils.get_total_norm(grads) for part, grads in by_part.items()}
    total = torch.linalg.vector_norm(torch.stack(list(norms.values()))) if norms else torch.zeros(())
    return total, {part: float(norm) for part, norm in sorted(norms.items())}


# --------------------------------------------------------------------------------- the loop
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS.

    A training step frees and re-allocates the same large blocks every step (activations, the
    gradients, the 47 MB word-embedding gradient). glibc maps every block over its mmap threshold
    afresh and unmaps it on free, so each step pays the page faults and the kernel's zeroing again:
    ~10% of the demo's CPU step (what jemalloc or tcmalloc fix in PyTorch's CPU tuning guides).
    No mmap'd blocks and no trimming keep the peak mapped instead. Returns False off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, gathered on all ranks (checkpoints are written by rank 0)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {k: v / dist.get_world_size() for k, v in zip(keys, tensor.cpu().tolist(), strict=True)}


@dataclass(frozen=True)
class _Plan:
    """The run's length, fixed by the config and the data, so every rank computes the same."""

    batches_per_epoch: int  # micro-batches each rank reads per epoch
    steps_per_epoch: int  # optimizer steps per epoch; the last may use fewer micro-batches
    total_steps: int


def _plan(cfg: Config, batches_per_epoch: int) -> _Plan:
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.grad_accum)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    return _Plan(batches_per_epoch, steps_per_epoch, total)


def _restore(
    reporter: Reporter,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
    world_size: int,
) -> TrainState | None:
    """Load the reporter's latest checkpoint, if any, into the model, optimizer and scheduler."""
    with reporter.latest_checkpoint() as directory:
        if directory is None:
            return None
        state, rng_states = load_training_state(
            directory, model=model, optimizer=optimizer, scheduler=scheduler
        )
    if len(rng_states) != world_size:
        raise RuntimeError(
            f"checkpoint {directory} was written by {len(rng_states)} workers, this run has {world_size}: "
            "resume with the same number of workers (the data position is per rank)"
        )
    set_rng_state(rng_states[rank])
    log.info("resumed from %s at step %d (epoch %d)", directory, state.step, state.epoch)
    return state


STAGING_PREFIX = "magnet-ckpt-"
"""Rank 0 stages each checkpoint in ``<temp dir>/magnet-ckpt-<pid>-<random>`` before reporting it."""


def remove_orphaned_staging(root: str | Path | None = None) -> list[Path]:
    """Remove the checkpoint staging directories under ``root`` (the temp directory) whose process
    is gone. A worker killed mid-checkpoint (preemption, OOM, a lost node) never removes its own,
    and each holds a whole checkpoint, model and optimizer: GBs at the paper's size. Directories of
    live processes, and any not named by pid, are left alone."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = path.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextmanager
def _step_checkpoint(
    *,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    cfg: Config,
) -> Iterator[Path | None]:
    """Every rank: gather RNG states; rank 0 writes the step's checkpoint into a temporary directory,
    open while the context is (None on the other ranks). Written before the step's evaluation, so
    whatever the evaluation does, the step's training is in it."""
    rng_states = _all_rng_states()
    if rank != 0:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-") as tmp:
        yield save_checkpoint(
            Path(tmp) / checkpoint_name(state.step),
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            cfg=cfg,
            rng_states=rng_states,
        )


def _report(reporter: Reporter, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    """Every rank reports (a barrier in Ray); rank 0 attaches the checkpoint, its meta.json given the
    metrics it is reported with."""
    if checkpoint_dir is not None:
        read_checkpoint_meta(checkpoint_dir).model_copy(update={"metrics": metrics}).write(checkpoint_dir)
    reporter.report(metrics, checkpoint_dir)


class _Curves:
    """Loss components and throughput over the steps since the last log line."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.tick = time.perf_counter()

    def add(self, losses: dict[str, float]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def pause_clock(self) -> None:
        """Leave evaluation and checkpointing time out of the next throughput figure."""
        self.tick = time.perf_counter()

    def flush(self) -> dict[str, float]:
        """Mean losses over the interval and all ranks (a collective: every rank calls it), samples/s."""
        elapsed = time.perf_counter() - self.tick
        means = _mean_across_ranks({k: v / self.steps for k, v in self.sums.items()})
        curves = {f"train/{k}": v for k, v in means.items()}
        curves["train/samples_per_s"] = self.steps * self.samples_per_step / elapsed
        self._reset()
        return curves


class _Pace:
    """The progress line rank 0 writes per ``log_every`` steps: step of total, loss, throughput and
    the time left at this life's pace so far (evaluations and checkpoints included)."""

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.start_step, self.total_steps = start_step, total_steps
        self.start = time.perf_counter()

    def report(self, step: int, curves: dict[str, float]) -> None:
        left = progress.time_left(
            step - self.start_step, self.total_steps - step, time.perf_counter() - self.start
        )
        progress.LOGGER.info(
            "step %d/%d (%d%%): loss %.4f, %.1f samples/s, %s left",
            step, self.total_steps, 100 * step // self.total_steps, curves["train/loss"],
            curves["train/samples_per_s"], left,
        )  # fmt: skip


def _epoch_steps(
    cfg: Config, train_shards: SplitShards, plan: _Plan, position: DataPosition, rank: int, world_size: int
) -> Iterator[list[dict[str, Any]]]:
    """The micro-batch groups of the rest of an epoch: grad_accum batches each, the last maybe fewer."""
    loader = build_train_loader(
        train_shards,
        cfg.data,
        image_size=cfg.model.image_size,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        position=position,
    )
    with torch.random.fork_rng(devices=[]):  # starting the loader's workers must not move the run's RNG
        batches = iter(loader)
    done = position.batches_done
    while done < plan.batches_per_epoch:
        group = list(islice(batches, min(cfg.train.grad_accum, plan.batches_per_epoch - done)))
        if not group:
            raise RuntimeError(
                f"the train loader of rank {rank} ended after {done} of {plan.batches_per_epoch}"
            )
        done += len(group)
        yield group


def _advance(state: TrainState, micro_batches: int, plan: _Plan) -> bool:
    """Count one optimizer step and move the data position; True when the epoch is over."""
    position = DataPosition(**state.data_position)
    done = position.batches_done + micro_batches
    epoch_over = done >= plan.batches_per_epoch
    state.step += 1
    if epoch_over:
        state.epoch, done = position.epoch + 1, 0
    state.data_position = asdict(DataPosition(epoch=state.epoch, batches_done=done))
    return epoch_over


def _evaluate_or_report_failure(
    model: nn.Module,
    shards: str,
    cfg: Config,
    logger: RunLogger,
    *,
    step: int,
    device: torch.device,
    rank: int,
    world_size: int,
) -> tuple[dict[str, float], float]:
    """Evaluate on cfg.data.eval_splits: (metrics, score). An evaluation that fails on its data (a
    shard corrupted or lost since the run started) is logged and reported as ``eval/failed`` = 1
    with no score, and training goes on: restarting the workers cannot mend a shard.

    A checksum or a missing file fails alike on every rank (they read the same files), so all
    ranks leave the evaluation at the same point and the next collective still matches.
    """
    keep = PICTURE_EXAMPLES if rank == 0 else 0
    try:
        with torch.random.fork_rng(devices=[]):  # the checkpoint already holds the RNG state
            evaluation = evaluate(
                model, shards, cfg, device=device, rank=rank, world_size=world_size, keep_examples=keep
            )
    except ShardError as error:
        log.error("evaluation at step %d failed on its data; training goes on: %s", step, error)
        logger.log_metrics({EVAL_FAILED_KEY: 1.0}, step)
        return {EVAL_FAILED_KEY: 1.0}, NOT_EVALUATED
    metrics = {**evaluation.metrics, EVAL_FAILED_KEY: 0.0}
    logger.log_metrics(metrics, step)
    first = next(iter(evaluation.splits.values()), None)
    if first is not None and first.examples:
        title = f"{first.split}, step {step} ({evaluation.describe()})"
        name = f"predictions_{first.split}_step{step:08d}.png"
        logger.log_predictions(prediction_figure(first.examples, title), name, step)
    return metrics, evaluation.metrics[f"{cfg.data.eval_splits[0]}/oIoU"]


@dataclass
class _Run:
    """What one rank trains: the model (checkpointed and evaluated), the module that takes the steps
    (compiled, wrapped in DDP), its optimizer and schedule, and where the run stands."""

    model: nn.Module
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState


def _open_train_split(cfg: Config, shards: str) -> SplitShards:
    """The train split, its corrupt shards skipped (and said) when the config allows."""
    train_shards = open_split(
        shards,
        cfg.data.train_split,
        verify=cfg.data.verify_checksums,
        skip_corrupt=cfg.data.skip_corrupt_shards,
    )
    if train_shards.skipped:
        log.warning(
            "skipped %d corrupt shards: %s", len(train_shards.skipped), ", ".join(train_shards.skipped)
        )
    return train_shards


def _set_up(
    cfg: Config, reporter: Reporter, total_steps: int, device: torch.device, rank: int, world_size: int
) -> _Run:
    """The same initial weights on every rank, then the run's own checkpoint restored if it has one."""
    _seed_everything(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    if cfg.train.init_from:  # a resumed run's own checkpoint, restored below, takes precedence
        fresh = load_initial_weights(model, cfg.train.init_from)
        log.info("initialised from %s (%d training-only tensors fresh)", cfg.train.init_from, len(fresh))
    model = model.to(device)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    _seed_everything(cfg.train.seed + rank)  # different masking and sampling draws per rank
    state = _restore(reporter, model, optimizer, scheduler, rank, world_size)
    state = state or TrainState(data_position=asdict(DataPosition()))

    trained: nn.Module = torch.compile(model) if cfg.train.compile else model
    if world_size > 1:
        # find_unused_parameters: some heads (kept for the reference's key names) get no gradient
        device_ids = [device.index] if device.type == "cuda" else None
        trained = DistributedDataParallel(trained, device_ids=device_ids, find_unused_parameters=True)
    trained.train()
    return _Run(model, trained, optimizer, scheduler, state)


def _checkpoint_and_evaluate(
    run: _Run,
    metrics: dict[str, float],
    *,
    evaluate_now: bool,
    cfg: Config,
    shards: str,
    reporter: Reporter,
    logger: RunLogger,
    device: torch.device,
    rank: int,
    world_size: int,
) -> dict[str, float]:
    """Write a checkpoint, evaluate first when due, and report both; returns the metrics so far."""
    state = run.state
    metrics.update({"step": state.step, "epoch": state.epoch})
    with _step_checkpoint(
        rank=rank, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, state=state, cfg=cfg
    ) as checkpoint_dir:
        score = NOT_EVALUATED
        if evaluate_now:
            stale = set(cfg.data.eval_splits)  # no earlier evaluation's figures under this step
            metrics = {k: v for k, v in metrics.items() if k.split("/", 1)[0] not in stale}
            evaluated, score = _evaluate_or_report_failure(
                run.model, shards, cfg, logger, step=state.step, device=device, rank=rank,
                world_size=world_size,
            )  # fmt: skip
            metrics.update(evaluated)
        _report(reporter, {**metrics, SCORE_KEY: score}, checkpoint_dir)
    return metrics


def train(
    cfg: Config,
    shards: str,
    *,
    reporter: Reporter,
    logger: RunLogger | None = None,
    device: torch.device | str | None = None,
    hooks: Sequence[StepHook] = (),
) -> dict[str, float]:
    """Train on every rank of the current process group (or alone) and return the final metrics.

    Checkpoints are reported every ``checkpoint_every`` steps, after every evaluation (each
    epoch, or every ``eval_every`` steps) and at the last step, which is always evaluated.

    Args:
        cfg: the resolved config.
        shards: prepared dataset root ``<out>/<dataset>-<splitBy>`` (absolute path or URL).
        reporter: checkpoint sink and source; the run restores from its latest checkpoint first.
        logger: curves and pictures; used on rank 0 only (None = keep nothing).
        device: where this rank trains; None = cuda if available, else cpu.
        hooks: called on every rank after every optimizer step.

    Returns:
        The metrics of the last report: step, epoch, data/skipped_shards, the latest logged train
        curves, and ``<split>/oIoU`` etc. of the final evaluation.
    """
    rank, world_size = _world()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    keep_freed_memory()
    if orphans := remove_orphaned_staging():
        log.info("removed %d checkpoint staging directories of killed workers", len(orphans))
    logger = logger if (logger is not None and rank == 0) else NullLogger()

    train_shards = _open_train_split(cfg, shards)
    plan = _plan(cfg, train_batches_per_epoch(train_shards, cfg.data, world_size))
    run = _set_up(cfg, reporter, plan.total_steps, device, rank, world_size)
    state, optimizer = run.state, run.optimizer

    curves = _Curves(cfg.data.batch_size * cfg.train.grad_accum * world_size)
    pace = _Pace(state.step, plan.total_steps)
    metrics: dict[str, float] = {"step": state.step, "epoch": state.epoch}
    metrics[SKIPPED_SHARDS_KEY] = len(train_shards.skipped)
    logger.log_metrics({SKIPPED_SHARDS_KEY: metrics[SKIPPED_SHARDS_KEY]}, state.step)
    while state.step < plan.total_steps:
        for micro_batches in _epoch_steps(
            cfg, train_shards, plan, DataPosition(**state.data_position), rank, world_size
        ):
            lr, epoch = optimizer.param_groups[0]["lr"], state.epoch
            losses = train_step(run.trained, micro_batches, optimizer, run.scheduler, cfg.train, device)
            epoch_over = _advance(state, len(micro_batches), plan)
            sent_ids = [int(i) for batch in micro_batches for i in batch["sent_id"]]
            event = StepEvent(rank=rank, step=state.step, epoch=epoch, sent_ids=sent_ids, losses=losses)
            for hook in hooks:
                hook(event)

            curves.add(losses)
            if state.step % cfg.train.log_every == 0:
                logged = curves.flush()
                logged["train/lr"] = lr
                logged["train/epoch"] = state.step / plan.steps_per_epoch
                logger.log_metrics(logged, state.step)
                metrics.update(logged)
                if rank == 0:
                    pace.report(state.step, logged)

            final = state.step == plan.total_steps
            every = cfg.train.eval_every
            evaluate_now = bool(cfg.data.eval_splits) and (
                final or (state.step % every == 0 if every else epoch_over)
            )
            if not (evaluate_now or final or state.step % cfg.train.checkpoint_every == 0):
                continue
            metrics = _checkpoint_and_evaluate(
                run, metrics, evaluate_now=evaluate_now, cfg=cfg, shards=shards, reporter=reporter,
                logger=logger, device=device, rank=rank, world_size=world_size,
            )  # fmt: skip
            curves.pause_clock()
            if final:
                break
    return metrics

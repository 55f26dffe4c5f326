"""Training checkpoints: one directory that restores a run exactly, or loads the model for inference.

Layout of a checkpoint directory:

    model.pt        the full MagNet state_dict (inference weights and the training-only heads:
                    Mask Grounding predictor, alignment projections), from the unwrapped model
    train_state.pt  optimizer, scheduler, step, epoch, the data reader's position and the RNG
                    states (python, numpy, torch, cuda) of every rank
    config.yaml     the resolved Config the run trained with
    meta.json       step, epoch, world size and the metrics reported with the checkpoint
                    (CheckpointMeta; an imported published model also says from which file)

A run's checkpoints are named ``checkpoint_step%08d`` by step (`checkpoint_name`), wherever they lie.

Ray Train copies the directory to the run's storage (a local directory or object storage); this
module knows nothing of Ray. Loading takes a local directory or a URL (s3://..., copied down).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict
from torch import nn

from data_prep.contract import parse_contract_file
from data_prep.paths import is_url
from magnet.config import Config, config_from_dict

MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_step"
CHECKPOINT_GLOB = f"{CHECKPOINT_PREFIX}*"
"""Matches the names `checkpoint_name` gives (in a run's directory)."""


def checkpoint_name(step: int) -> str:
    """The directory name of a run's checkpoint after ``step`` steps: zero-padded, so names sort by step."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory named by `checkpoint_name`; None for any other name."""
    digits = name.removeprefix(CHECKPOINT_PREFIX)
    return int(digits) if digits != name and digits.isdigit() else None


class CheckpointError(ValueError):
    """A checkpoint directory whose meta.json this code cannot read (broken, or another layout)."""


class ImportRecord(BaseModel):
    """Where imported weights came from (magnet.weights): the published file and what was mapped."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    file: str
    sha256: str
    tensors_mapped: int
    dropped: dict[str, str]
    training_only_kept: tuple[str, ...]


class CheckpointMeta(BaseModel):
    """meta.json: where the checkpoint stands and the metrics reported with it (Ray keeps the best
    by them); ``imported_from`` only for an imported published model."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    step: int
    epoch: int
    world_size: int
    metrics: dict[str, int | float] = {}
    imported_from: ImportRecord | None = None

    def write(self, directory: str | Path) -> None:
        """The one writing of meta.json (``imported_from`` left out when there is none)."""
        (Path(directory) / META_FILE).write_text(
            json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2)
        )

    @classmethod
    def from_bytes(cls, data: bytes | str, where: str) -> CheckpointMeta:
        """The file's content; CheckpointError naming ``where`` and what is wrong when it is not one."""
        return parse_contract_file(cls, data, where, CheckpointError)


def read_checkpoint_meta(directory: str | Path) -> CheckpointMeta:
    """The meta.json of a local checkpoint directory, the one reading of the file.

    Raises:
        FileNotFoundError: there is none (not a checkpoint directory).
        CheckpointError: it is not JSON, or a field is missing or of the wrong type.
    """
    path = _require(Path(directory), META_FILE)
    return CheckpointMeta.from_bytes(path.read_bytes(), str(path))


@dataclass
class TrainState:
    """Where a run stands: optimizer steps done, the epoch in progress, and the reader's position.

    Args:
        step: optimizer steps completed.
        epoch: epoch in progress (0-based).
        data_position: the shard reader's resume state (opaque here, owned by magnet.data).
    """

    step: int = 0
    epoch: int = 0
    data_position: dict[str, Any] = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers (whose state_dict keys are prefixed)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict[str, Any]:
    """This process's random states: python, numpy, torch and (when present) every CUDA device.

    Only plain Python values and tensors (numpy's key array becomes a list of ints), so the train
    state loads with ``torch.load(weights_only=True)`` like every other file of a checkpoint.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    cfg: Config,
    rng_states: list[dict[str, Any]],
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write a checkpoint directory (created if missing) and return its path.

    Args:
        directory: where to write.
        model: the model, possibly DDP- or compile-wrapped (saved unwrapped).
        optimizer: its state is saved.
        scheduler: its state is saved.
        state: step, epoch and data position.
        cfg: the resolved config.
        rng_states: the RNG state of every rank, indexed by rank.
        metrics: reported with the checkpoint, stored in meta.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap_model(model).state_dict(), directory / MODEL_FILE)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **asdict(state),
            "rng": rng_states,
        },
        directory / TRAIN_STATE_FILE,
    )
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    CheckpointMeta(
        step=state.step, epoch=state.epoch, world_size=len(rng_states), metrics=metrics or {}
    ).write(directory)
    return directory


class StateDictMismatch(ValueError):
    """Weights that do not fit the model they are loaded into (missing, unexpected or misshapen keys)."""


MISFIT_KEYS_SHOWN = 3


def describe_misfit(source: str, problems: Mapping[str, Sequence[str]]) -> str:
    """One line for weights that do not fit: per kind of problem its count and first few keys, and
    the file holding every key (a whole model that does not fit names a thousand keys or more).

    Args:
        source: what was being loaded, e.g. the checkpoint directory.
        problems: kind of problem (e.g. "missing") -> the keys with that problem; empty kinds are left out.
    """
    found = {kind: list(keys) for kind, keys in problems.items() if keys}
    with tempfile.NamedTemporaryFile(
        "w", prefix="magnet-misfit-", suffix=".txt", delete=False, encoding="utf-8"
    ) as listing:
        for kind, keys in found.items():
            listing.write(f"# {len(keys)} {kind}\n" + "".join(f"{key}\n" for key in keys))
    parts = []
    for kind, keys in found.items():
        more = f", ... {len(keys) - MISFIT_KEYS_SHOWN} more" if len(keys) > MISFIT_KEYS_SHOWN else ""
        parts.append(f"{len(keys)} {kind}: {', '.join(keys[:MISFIT_KEYS_SHOWN])}{more}")
    return f"{source} does not fit this model: {'; '.join(parts)}; every key: {listing.name}"


def check_fit(source: str, weights: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor]) -> None:
    """Raise StateDictMismatch, summarised, unless ``weights`` has exactly ``ours``'s keys and shapes."""
    misshapen = [
        f"{key} {list(value.shape)} (ours {list(ours[key].shape)})"
        for key, value in weights.items()
        if key in ours and value.shape != ours[key].shape
    ]
    problems = {
        "misshapen": misshapen,
        "unexpected": sorted(set(weights) - set(ours)),
        "missing": sorted(set(ours) - set(weights)),
    }
    if any(problems.values()):
        raise StateDictMismatch(describe_misfit(source, problems))


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a MagNet checkpoint: {name} is missing")
    return path


def load_config_from_checkpoint(directory: str | Path) -> Config:
    """The resolved config a checkpoint was trained with."""
    path = _require(Path(directory), CONFIG_FILE)
    return config_from_dict(yaml.safe_load(path.read_text()), source=str(path))


def load_training_state(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Restore model, optimizer and scheduler in place; return the train state and per-rank RNG states.

    The caller restores its own rank's RNG state (see :func:`set_rng_state`) when the world size
    is unchanged, since a restart on a different number of workers cannot replay the same draws.
    """
    directory = Path(directory)
    weights = torch.load(_require(directory, MODEL_FILE), map_location="cpu", weights_only=True)
    unwrap_model(model).load_state_dict(weights)
    saved = torch.load(_require(directory, TRAIN_STATE_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = TrainState(step=saved["step"], epoch=saved["epoch"], data_position=saved["data_position"])
    return state, saved["rng"]


def load_initial_weights(model: nn.Module, directory: str | Path) -> list[str]:
    """Fill ``model`` from a checkpoint's weights to start a new run (fine-tuning).

    Every weight the checkpoint has must fit; the only keys allowed to be absent are training-only
    heads (an imported published model has none), which keep their fresh initialisation and are
    returned. Anything else missing, unexpected or misshapen is an error naming the keys.
    """
    from magnet.models.magnet import TRAINING_ONLY_PREFIX

    weights = torch.load(_require(Path(directory), MODEL_FILE), map_location="cpu", weights_only=True)
    target = unwrap_model(model)
    ours = target.state_dict()
    fresh = [key for key in ours if key not in weights and key.startswith(TRAINING_ONLY_PREFIX)]
    check_fit(str(directory), weights, {key: value for key, value in ours.items() if key not in fresh})
    target.load_state_dict(weights, strict=False)
    return fresh


def fetch_checkpoint(location: str | Path, into: str | Path) -> Path:
    """A checkpoint directory on this machine: a local path as it is, a URL (s3://...; credentials
    and endpoint from the environment) copied to ``<into>/<its name>``."""
    if not is_url(location):
        return Path(location)
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(str(location))
    target = Path(into) / Path(path.rstrip("/")).name
    try:
        filesystem.get(f"{path.rstrip('/')}/", str(target), recursive=True)  # "dir/": its content into target
    except FileNotFoundError:
        raise FileNotFoundError(f"{location} is not a MagNet checkpoint: nothing is stored there") from None
    return target


@contextmanager
def local_checkpoint(location: str | Path | None) -> Iterator[Path]:
    """A checkpoint directory on this machine while the context is open: a local path as it is, a
    URL copied down to a temporary directory that goes with the context (a whole checkpoint: GBs at
    the paper's size)."""
    if location is None:
        raise RuntimeError("training finished without a checkpoint: nothing to evaluate or register")
    if not is_url(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="magnet-checkpoint-") as tmp:
        yield fetch_checkpoint(location, tmp)


def load_model_from_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Config]:
    """The trained MagNet (eval mode, on ``device``) and its config, from a checkpoint directory.

    The model is built without loading pretrained backbone or text weights: the checkpoint
    holds every weight, so nothing is read from the network or the hub. ``directory`` may be a
    URL on object storage.
    """
    if is_url(directory):
        with local_checkpoint(directory) as local:
            return load_model_from_checkpoint(local, device)
    from magnet.models import build_model

    directory = Path(directory)
    cfg = load_config_from_checkpoint(directory)
    blank = cfg.model.model_copy(deep=True)
    blank.vision.pretrained = None
    blank.text.pretrained = False
    model = build_model(blank)
    weights = torch.load(_require(directory, MODEL_FILE), map_location="cpu", weights_only=True)
    check_fit(f"{directory}/{MODEL_FILE}", weights, model.state_dict())
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg

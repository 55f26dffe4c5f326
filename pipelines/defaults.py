"""Defaults of the train, tune and promote stages, in one place: the library functions, the Prefect
flows and the `magnet` commands read them here. It imports nothing heavy, so `magnet --help` stays
quick (the commands import Prefect only once their arguments are good)."""

from __future__ import annotations

from dataclasses import dataclass

from data_prep.paths import absolute_location

DEFAULT_STORAGE = "ray-results"
"""Where Ray Train and Tune keep runs when no --storage-path is given (relative to the working folder)."""


def absolute_storage(storage_path: str | None) -> str:
    """Object-storage URLs pass through; local paths become absolute (default ./ray-results): Ray
    changes its workers' working folder."""
    return absolute_location(storage_path or DEFAULT_STORAGE)


# Ray's placement group strategies, for a Train run's workers (`magnet train --placement-strategy`).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class TrainDefaults:
    """pipelines.flows.train.train_magnet and `magnet train`."""

    config: str = "tiny"
    num_workers: int = 2
    use_gpu: bool = False
    placement_strategy: str = "PACK"
    experiment: str = "magnet"
    resume: bool = False
    register_model: bool = True


@dataclass(frozen=True)
class TuneDefaults:
    """pipelines.sweep.driver.run_sweep, pipelines.flows.tune.tune_magnet and `magnet tune`."""

    space: str = "configs/sweeps/loss-weights.yaml"
    config: str = "tiny"
    experiment: str = "magnet-sweeps"
    workers_per_trial: int = 1
    gpus_per_trial: int = 0
    max_failures: int = 2  # worker-group restarts within a trial (a lost worker or node)
    register_best: bool = True


@dataclass(frozen=True)
class PromoteDefaults:
    """pipelines.promote.promote, pipelines.flows.tune.promote_magnet and `magnet promote`."""

    metric: str = "val_oIoU"
    min_gain: float = 0.0
    protocol: str = "lavt"
    device: str = "cpu"


@dataclass(frozen=True)
class ConfigDefaults:
    """The preset each command starts from when --config is not given (train and tune: above)."""

    show: str = "tiny"  # `magnet config`
    model_info: str = "tiny"  # `magnet model-info`
    plan: str = "paper"  # `magnet plan`: what a GPU run needs
    pretrain: str = "demo"  # `magnet pretrain-vision`: the model the demo trains


TRAIN = TrainDefaults()
TUNE = TuneDefaults()
PROMOTE = PromoteDefaults()
CONFIGS = ConfigDefaults()

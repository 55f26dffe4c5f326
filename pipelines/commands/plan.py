"""`magnet plan`: memory, time and cost of a training run on rented GPUs, before renting them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import typer

from pipelines.defaults import CONFIGS
from pipelines.plan import GPUS, MFU

if TYPE_CHECKING:
    from magnet.config import Config
    from magnet.footprint import Precision
    from pipelines.plan import Dataset

PRECISION_CHOICES = ("both", "fp32", "bf16")


def plan(
    config: str = typer.Option(CONFIGS.plan, "--config", "-c", help="Preset name or YAML path."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. model.image_size=384."),
    gpu: str = typer.Option(
        "a100-80gb",
        "--gpu",
        help=f"The card: {', '.join(GPUS)}.",
    ),
    gpus: int = typer.Option(1, "--gpus", help="GPUs of that card, one Train worker each."),
    shards: Path | None = typer.Option(
        None,
        "--shards",
        help="A prepared dataset: plan an epoch of its training split instead of "
        "the published RefCOCO, RefCOCO+ and G-Ref sizes.",
    ),
    mfu: float | None = typer.Option(
        None,
        "--mfu",
        help="Model FLOPs utilisation for both precisions (default: "
        + ", ".join(f"{name} {value:g}" for name, value in MFU.items())
        + ", pipelines.plan.MFU).",
    ),
    precision: str = typer.Option("both", "--precision", help="fp32, bf16 or both."),
) -> None:
    """Per-GPU batch, gradient accumulation, peak memory per GPU, time per epoch and for the whole
    schedule, and GPU-hours of a config's training run on GPUS x GPU, for fp32 and bf16.

    Memory comes from one training step of the real model (forward, backward, AdamW) run on fake
    tensors at batch 2 and 4 (torch's FakeTensorMode: shapes only, no memory; two minutes of one
    core for the paper model in both precisions): the bytes held after every operator, each a line
    over the batch, whose highest is the peak; plus DDP's gradient buckets on 2 GPUs or more, 10%
    for the caching allocator's fragmentation and 1 GiB for the CUDA context. FLOPs per sample are
    torch's FlopCounterMode over that step; time is FLOPs / (GPUs x the card's dense peak x MFU).
    The allowances and the MFU are not calibrated on a GPU yet: expect memory within about 15% and
    time within a factor of 2 (DEVELOPERS.md, "Planning a run").
    """
    from magnet.config import ConfigError, load_config
    from pipelines.plan import PRECISIONS, PlanError, check_request, find_gpu

    if precision not in PRECISION_CHOICES:
        message = f"{precision!r}: choose one of {', '.join(PRECISION_CHOICES)}"
        raise typer.BadParameter(message, param_hint="--precision")
    chosen = PRECISIONS if precision == "both" else (cast("Precision", precision),)
    try:
        card = find_gpu(gpu)
        check_request(gpus, mfu, chosen, card, gpu)
    except PlanError as err:
        raise typer.BadParameter(err.problem, param_hint=err.option) from None
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--config/--set") from None
    datasets = _datasets(cfg, shards)
    label = f"'{cfg.name}'" + (f" with {len(overrides)} --set" if overrides else "")
    typer.echo(
        _plan_text(cfg, label, card_name=gpu, gpus=gpus, precisions=chosen, mfu=mfu, datasets=datasets)
    )


def _datasets(cfg: Config, shards: Path | None) -> list[Dataset]:
    """The training splits to time: the prepared one's units as the trainer counts them, else the
    published benchmarks'."""
    from pipelines.plan import TRAIN_SPLITS, Dataset

    unit = "refs" if cfg.data.one_expression_per_object else "expressions"
    if shards is None:
        return [
            Dataset(split.name, split.units(cfg.data.one_expression_per_object), unit)
            for split in TRAIN_SPLITS
        ]
    from magnet.data import ShardError, open_split
    from pipelines.commands import require_prepared

    location = require_prepared(shards)
    try:
        split = open_split(location, cfg.data.train_split, verify=False)
    except ShardError as err:
        raise typer.BadParameter(str(err), param_hint="--shards") from None
    name = f"{Path(location).name} {cfg.data.train_split}"
    return [Dataset(name, sum(split.units(cfg.data.one_expression_per_object)), unit)]


def _plan_text(
    cfg: Config,
    label: str,
    *,
    card_name: str,
    gpus: int,
    precisions: tuple[Precision, ...],
    mfu: float | None,
    datasets: list[Dataset],
) -> str:
    """Measure the step per precision, fit the card, and render the tables; a config whose batch 1
    fits the card in no precision is refused (BadParameter, one line)."""
    from pipelines.plan import MFU, PrecisionPlan, find_gpu, measure, over_by, plan_precision, render

    card = find_gpu(card_name)
    global_batch = cfg.train.global_batch or gpus * cfg.data.batch_size
    source = "train.global_batch" if cfg.train.global_batch else f"{gpus} GPUs x data.batch_size"
    plans: list[PrecisionPlan] = []
    flops = parameters = 0
    for precision in precisions:
        rate = mfu or MFU[precision]
        if card.tflops[precision] is None:
            plans.append(PrecisionPlan(precision, None, rate))
            continue
        memory, flops, parameters = measure(cfg, precision)
        plans.append(plan_precision(precision, memory, card, gpus, global_batch, rate))
    fitting = [p for p in plans if p.split is not None]
    if not fitting:
        worst = ", ".join(f"{p.precision}: {over_by(p.memory, card, gpus)}" for p in plans if p.memory)
        raise typer.BadParameter(f"{card_name}: no batch fits the {card.label} ({worst})", param_hint="--gpu")
    return render(
        config_label=label,
        image_size=cfg.model.image_size,
        parameters=parameters,
        gpu=card,
        gpus=gpus,
        global_batch=global_batch,
        global_source=source,
        epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        flops_per_sample=flops,
        plans=plans,
        datasets=datasets,
    )


def register(app: typer.Typer) -> None:
    """Add this group's commands to the `magnet` app."""
    app.command("plan")(plan)

"""`magnet pretrain-vision`: the Swin image side pretrained on generated scenes (magnet.pretrain)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines.commands import require_writable
from pipelines.defaults import CONFIGS


def pretrain_vision(
    out: Path = typer.Option(..., "--out", help="Weights file to write (.pt; a .json beside it says how)."),
    config: str = typer.Option(
        CONFIGS.pretrain, "--config", "-c", help="Preset whose model.vision and image_size to pretrain."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override: model.vision.embed_dim=64."),
    steps: int = typer.Option(1500, "--steps", min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Generated scenes per step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Peak AdamW learning rate (warm-up, cosine decay)."),
    seed: int = typer.Option(0, "--seed", help="Initial weights and the scenes drawn (never the datasets')."),
    loader_workers: int = typer.Option(1, "--loader-workers", min=0, help="Processes generating scenes."),
) -> None:
    """Pretrain the vision encoder on generated scenes, without language, for `model.vision.pretrained`.

    The image side learns to label every pixel of freshly drawn shape scenes with its object's
    colour, shape and size and its offset to the object's centre: the offline stand-in, for the
    synthetic data, of the ImageNet weights the paper's Swin starts from. Reproducible: the same
    options give the same weights on the same machine.
    """
    import logging

    from magnet.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--config/--set") from None
    if out.suffix != ".pt":
        raise typer.BadParameter(f"{out}: the weights file must end in .pt", param_hint="--out")
    require_writable(out.parent, "--out")
    from magnet.pretrain import pretrain_vision as run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    typer.echo(
        f"pretraining the vision encoder of '{cfg.name}' at {cfg.model.image_size} px: "
        f"{steps} steps x {batch_size} scenes"
    )
    result = run(
        cfg.model, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, loader_workers=loader_workers
    )
    scores = ", ".join(f"{k} {v}" for k, v in result.held_out.items())
    typer.echo(f"wrote {result.weights} in {result.seconds:.0f} s; held-out scenes: {scores}")
    typer.echo(f"use it with: --set model.vision.pretrained={result.weights}")


def register(app: typer.Typer) -> None:
    """Add this group's commands to the `magnet` app."""
    app.command("pretrain-vision")(pretrain_vision)

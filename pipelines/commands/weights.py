"""`magnet` commands of the weights group: importing the published MagNet checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines.commands import require_writable


def import_weights(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", exists=True, dir_okay=False, help="Published file, e.g. magnet_refcoco.pth."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Checkpoint directory to write (model.pt, config.yaml, meta.json)."
    ),
    image_size: int = typer.Option(
        480, "--image-size", help="480, or 448 for the model trained on all datasets."
    ),
    quirk: bool = typer.Option(
        True,
        "--quirk/--no-quirk",
        help="Reproduce the reference's language-side mask (exact published outputs); "
        "--no-quirk runs the corrected fusion.",
    ),
) -> None:
    """Map a published MagNet checkpoint onto the `paper` model and save it as our checkpoint.

    The result is a checkpoint directory, loaded by `magnet evaluate --model DIR` and `magnet predict`.
    """
    import logging

    from magnet.weights import PUBLISHED_IMAGE_SIZES, import_published

    if image_size not in PUBLISHED_IMAGE_SIZES:
        raise typer.BadParameter(
            f"{image_size}: the published models take {PUBLISHED_IMAGE_SIZES}", param_hint="--image-size"
        )
    require_writable(out, "--out")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = import_published(checkpoint, out, image_size=image_size, reference_mask_quirk=quirk)
    typer.echo(
        f"imported {checkpoint} -> {written} "
        f"(image size {image_size}, reference mask quirk {'on' if quirk else 'off'})"
    )


def register(app: typer.Typer) -> None:
    """Add this group's commands to the `magnet` app."""
    app.command("import-weights")(import_weights)

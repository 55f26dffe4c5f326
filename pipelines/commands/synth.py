"""`magnet` commands of the synth group."""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines.commands import require_writable


def synth(
    out: Path = typer.Option(..., "--out", help="Dataset root to write (the refer toolkit's data_root)."),
    images: int = typer.Option(200, "--images", min=1, help="Number of images."),
    image_size: int = typer.Option(128, "--image-size", min=32, help="Side of the square images in pixels."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed: same arguments give the same bytes."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Processes (default: CPU count)."),
) -> None:
    """Write a synthetic RefCOCO (unc) dataset of shape scenes in the refer layout, with the
    scores of two language-blind baselines (largest object, random object) per split."""
    from data_prep.synth import synthesize

    require_writable(out, "--out")
    report = synthesize(out, num_images=images, image_size=image_size, seed=seed, workers=workers)
    typer.echo(f"wrote {images} images of {image_size} px to {out} in {report.seconds:.1f} s")
    typer.echo(
        f"{'split':<6} {'images':>7} {'refs':>6} {'exprs':>6}  oIoU largest  oIoU random  ({report.protocol})"
    )
    for name, s in report.splits.items():
        typer.echo(
            f"{name:<6} {s.n_images:>7} {s.n_refs:>6} {s.n_expressions:>6}  "
            f"{s.baseline_largest_oiou:>12.4f}  {s.baseline_random_oiou:>11.4f}"
        )


def register(app: typer.Typer) -> None:
    """Add this group's commands to the `magnet` app."""
    app.command("synth")(synth)

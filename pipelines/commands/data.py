"""`magnet` commands of the data group."""

from __future__ import annotations

from pathlib import Path

import typer


def _check_input(
    refer_root: Path, dataset: str, split_by: str, mask_mode: str, image_dir: Path | None
) -> None:
    """Refuse what the flow would only find after a Prefect server started (and retry, for a
    missing file, as if it were a flaky disk): the dataset and splitBy names, the refer files,
    the image directory and the mask mode."""
    from data_prep.masks import MASK_MODES
    from data_prep.refer import DATASETS, IMAGE_SUBDIR, refer_files

    try:
        refer_files(refer_root, dataset, split_by)
    except ValueError as err:
        raise typer.BadParameter(
            str(err), param_hint="--split-by" if dataset in DATASETS else "--dataset"
        ) from None
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="--refer-root") from None
    images = image_dir or refer_root / IMAGE_SUBDIR
    if not images.is_dir():
        raise typer.BadParameter(
            f"{images} is not a directory (where the images are)", param_hint="--image-dir"
        )
    if mask_mode not in MASK_MODES:
        raise typer.BadParameter(
            f"{mask_mode!r} is not one of {', '.join(MASK_MODES)}", param_hint="--mask-mode"
        )


def prepare(
    refer_root: Path = typer.Option(..., "--refer-root", help="Refer-layout root: <dataset>/ and images/."),
    dataset: str = typer.Option("refcoco", "--dataset", help="refcoco, refcoco+ or refcocog."),
    split_by: str = typer.Option("unc", "--split-by", help="unc / google (refcoco, refcoco+), umd / google."),
    splits: list[str] = typer.Option(
        [], "--splits", help="Split to prepare (repeat the option); default every stored split."
    ),
    out: str = typer.Option(
        ...,
        "--out",
        help="Output root: a directory or a URL (s3://bucket/prefix); writes <out>/<dataset>-<splitBy>/.",
    ),
    tokenizer: str = typer.Option(
        "all-minilm-l6-v2", "--tokenizer", help="Hugging Face tokenizer name or path, or the offline alias."
    ),
    max_tokens: int = typer.Option(20, "--max-tokens", min=2, help="Token ids per expression."),
    samples_per_shard: int = typer.Option(
        1000, "--samples-per-shard", min=1, help="Expressions per shard (cut at the next image)."
    ),
    workers: int = typer.Option(2, "--workers", min=1, help="Processes for the chunks."),
    mask_mode: str = typer.Option(
        "union", "--mask-mode", help="union, or refer (sum then keep ones, as LAVT / MagNet)."
    ),
    image_dir: Path | None = typer.Option(
        None, "--image-dir", help="Image directory, if not <refer-root>/images/mscoco/images/train2014."
    ),
) -> None:
    """Run the `prepare-refcoco` Prefect flow: refer-format data into WebDataset shards,
    manifest.parquet, rejects.parquet and summary.json. A re-run skips finished chunks."""
    _check_input(refer_root, dataset, split_by, mask_mode, image_dir)
    from data_prep.shards import dataset_dir, is_url
    from pipelines.flows.prepare import run_prepare

    try:
        summary = run_prepare(
            workers=workers,
            refer_root=str(refer_root.resolve()),
            out=out if is_url(out) else str(Path(out).resolve()),
            dataset=dataset,
            split_by=split_by,
            splits=list(splits) or None,
            tokenizer=tokenizer,
            max_tokens=max_tokens,
            samples_per_shard=samples_per_shard,
            mask_mode=mask_mode,
            image_dir=str(image_dir.resolve()) if image_dir else None,
        )
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"wrote {dataset_dir(out, dataset, split_by)}: {len(summary['shards'])} shards")
    typer.echo(f"{'split':<8} {'read':>8} {'written':>8} {'rejected':>8}")
    for split, counts in summary["counts"].items():
        typer.echo(f"{split:<8} {counts['read']:>8} {counts['written']:>8} {counts['rejected']:>8}")


def register(app: typer.Typer) -> None:
    """Add this group's commands to the `magnet` app."""
    app.command("prepare")(prepare)

"""`magnet prepare`: refer-format or folder datasets -> WebDataset shards, through the prepare flow."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from data_prep.defaults import PREPARE
from pipelines import interrupts


def _refer_names(
    refer_root: Path, dataset: str | None, split_by: str | None, image_dir: Path | None
) -> tuple[str, str]:
    """The refer layout's dataset and splitBy (default refcoco, unc), checked with its files, its
    refs (readable, split names fit for directories) and image directory."""
    from data_prep.refer import DATASETS, IMAGE_SUBDIR, ReferFormatError, load_refs, refer_files

    dataset, split_by = dataset or PREPARE.dataset, split_by or PREPARE.split_by
    try:
        refs_path, _ = refer_files(refer_root, dataset, split_by)
    except ValueError as err:
        raise typer.BadParameter(
            str(err), param_hint="--split-by" if dataset in DATASETS else "--dataset"
        ) from None
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="--refer-root") from None
    try:
        load_refs(refs_path)
    except ReferFormatError as err:
        raise typer.BadParameter(str(err), param_hint="--refer-root") from None
    images = image_dir or refer_root / IMAGE_SUBDIR
    if not images.is_dir():
        raise typer.BadParameter(
            f"{images} is not a directory (where the images are)", param_hint="--image-dir"
        )
    return dataset, split_by


def _folder_names(
    folder: Path, dataset: str | None, split_by: str | None, image_dir: Path | None
) -> tuple[str, str]:
    """A folder dataset's name (default the folder's) and splitBy (`folder`), its annotation
    rows' structure checked."""
    from data_prep.folder import FOLDER_SPLIT_BY, read_rows
    from data_prep.paths import UnsafeNameError, check_name
    from data_prep.refer import ReferFormatError

    name = dataset or folder.resolve().name
    try:
        check_name(name, "dataset" if dataset else "dataset (the folder's name)")
    except UnsafeNameError as err:
        hint = "" if dataset else ": give one with --dataset"
        raise typer.BadParameter(f"{err}{hint}", param_hint="--dataset") from None
    if split_by not in (None, FOLDER_SPLIT_BY):
        raise typer.BadParameter(
            f"a folder dataset is prepared as {FOLDER_SPLIT_BY!r}, not {split_by!r}", param_hint="--split-by"
        )
    if image_dir is not None:
        raise typer.BadParameter(
            "is for the refer layout: a folder's paths are relative to the folder", param_hint="--image-dir"
        )
    try:
        read_rows(folder)
    except ReferFormatError as err:
        raise typer.BadParameter(str(err), param_hint="--folder") from None
    return name, FOLDER_SPLIT_BY


def prepare(
    refer_root: Path = typer.Option(
        ...,
        "--refer-root",
        "--folder",
        help="Refer-layout root (<dataset>/ and images/), or a folder of one's own holding "
        "annotations.jsonl or annotations.csv (see README).",
    ),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="refcoco (default), refcoco+ or refcocog; for a folder, the name to write under "
        "(default: the folder's name).",
    ),
    split_by: str | None = typer.Option(
        None,
        "--split-by",
        help="unc (default) / google (refcoco, refcoco+), umd / google; a folder's is folder.",
    ),
    splits: list[str] = typer.Option(
        [], "--splits", help="Split to prepare (repeat the option); default every stored split."
    ),
    out: str = typer.Option(
        ...,
        "--out",
        help="Output root: a directory or a URL (s3://bucket/prefix); writes <out>/<dataset>-<splitBy>/.",
    ),
    tokenizer: str = typer.Option(
        PREPARE.tokenizer, "--tokenizer", help="Hugging Face tokenizer name or path, or the offline alias."
    ),
    max_tokens: int = typer.Option(
        PREPARE.max_tokens, "--max-tokens", min=2, help="Token ids per expression."
    ),
    samples_per_shard: int = typer.Option(
        PREPARE.samples_per_shard,
        "--samples-per-shard",
        min=1,
        help="Expressions per shard (cut at the next image).",
    ),
    workers: int = typer.Option(PREPARE.workers, "--workers", min=1, help="Processes for the chunks."),
    mask_mode: str = typer.Option(
        PREPARE.mask_mode, "--mask-mode", help="union, or refer (sum then keep ones, as LAVT / MagNet)."
    ),
    image_dir: Path | None = typer.Option(
        None, "--image-dir", help="Image directory, if not <refer-root>/images/mscoco/images/train2014."
    ),
) -> None:
    """Run the `prepare-refcoco` Prefect flow: refer-format data, or a folder of one's own, into
    WebDataset shards, manifest.parquet, rejects.parquet and summary.json. A re-run skips
    finished chunks."""
    from data_prep.contract import check_split
    from data_prep.folder import is_folder_dataset
    from data_prep.masks import MASK_MODES
    from data_prep.paths import UnsafeNameError

    # Checked here, before the flow starts a Prefect server (and retries a missing file as I/O).
    try:
        splits = [check_split(split) for split in splits]
    except UnsafeNameError as err:
        raise typer.BadParameter(str(err), param_hint="--splits") from None
    names = _folder_names if is_folder_dataset(refer_root) else _refer_names
    dataset, split_by = names(refer_root, dataset, split_by, image_dir)
    if mask_mode not in MASK_MODES:
        raise typer.BadParameter(
            f"{mask_mode!r} is not one of {', '.join(MASK_MODES)}", param_hint="--mask-mode"
        )
    from data_prep.output import describe, is_permanent
    from data_prep.paths import absolute_location
    from data_prep.shards import dataset_dir
    from pipelines.commands import require_writable
    from pipelines.flows.prepare import run_prepare

    location = absolute_location(out)
    require_writable(location, "--out")
    written_to = dataset_dir(location, dataset, split_by)
    interrupts.on_interrupt(lambda: _stopped(written_to))
    try:
        with _write_failures_in_one_line():
            summary = run_prepare(
                workers=workers,
                refer_root=str(refer_root.resolve()),
                out=location,
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
    except OSError as err:
        if not is_permanent(err):
            raise
        # Partial files are removed (data_prep.output.written_whole); finished chunks are kept.
        message = f"cannot write to {location}: {describe(err, location)}; a re-run keeps the finished shards"
        raise typer.BadParameter(message, param_hint="--out") from None
    typer.echo(f"wrote {dataset_dir(out, dataset, split_by)}: {len(summary.shards)} shards")
    typer.echo(f"{'split':<8} {'read':>8} {'written':>8} {'rejected':>8}")
    for split, counts in summary.counts.items():
        typer.echo(f"{split:<8} {counts.read:>8} {counts.written:>8} {counts.rejected:>8}")


def _stopped(out_dir: str | Path) -> str:
    """What an interrupted `magnet prepare` left: whole chunks only (each written to a temporary
    name, then renamed), which the same command keeps and completes."""
    import fsspec

    from data_prep.shards import done_markers

    filesystem, root = fsspec.core.url_to_fs(str(out_dir))
    done = len(filesystem.glob(done_markers(root)))
    again = interrupts.magnet_command()
    return f"prepare of {out_dir} stopped with {done} chunks written; continue with: {again}"


@contextmanager
def _write_failures_in_one_line() -> Iterator[None]:
    """While the flow runs, Prefect's terminal log shows a write error no retry can mend (full disk,
    read-only place: `data_prep.output.is_permanent`) as its one line, without the traceback, which
    holds nothing a person can act on; the server's log keeps it. The command ends with its own
    line naming the output."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from data_prep.output import is_permanent

    class NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and is_permanent(record.exc_info[1]):
                record.exc_info = record.exc_text = None
            return True

    loggers = (logging.getLogger(), logging.getLogger("prefect"))  # where Prefect's config may put it
    consoles = [h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]
    quiet = NoTraceback()
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)


def register(app: typer.Typer) -> None:
    """Add this command to the `magnet` app."""
    app.command("prepare")(prepare)

"""The `magnet` commands, one module each, and what they share: the argument checks (each refuses a
bad input with one line, typer.BadParameter, before Prefect, Ray or a model load starts) and the
options several commands take, declared once.

| command | module |
|---|---|
| synth | synth.py |
| prepare | prepare.py |
| model-info | model.py |
| import-weights | weights.py |
| pretrain-vision | pretrain.py |
| train | train.py |
| evaluate | evaluate.py |
| predict | predict.py |
| register | register.py |
| demo | demo.py |
| stack up / down / status | stack.py |
| tune | tune.py |
| sweep-report | sweep_report.py |
| promote | promote.py |
| plan | plan.py |
| config | config.py |
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from data_prep.paths import absolute_location

if TYPE_CHECKING:
    from PIL import Image


# Options several commands share, declared once.
TRACKING_URI = typer.Option(
    None,
    "--tracking-uri",
    help="MLflow store; default: MLFLOW_TRACKING_URI, else sqlite ./mlflow.db (where models:/ resolves).",
)
DEVICE = typer.Option("cpu", "--device", help="cpu or cuda.")
RAY_ADDRESS = typer.Option(
    None, "--ray-address", help="Ray cluster to run on; default: RAY_ADDRESS, else a local Ray."
)


def require_prepared(shards: str | Path) -> str:
    """Refuse a --shards location that `magnet prepare` did not write, before Prefect or Ray start;
    return it as Ray workers need it: a local path absolute, a URL (s3://...) as it is."""
    import fsspec

    from data_prep.contract import SUMMARY

    location = absolute_location(shards)
    filesystem, root = fsspec.core.url_to_fs(location)
    if not filesystem.isfile(f"{root.rstrip('/')}/{SUMMARY}"):
        message = f"{shards} holds no {SUMMARY}: not a prepared dataset"
        raise typer.BadParameter(message, param_hint="--shards")
    return location


def require_store(tracking_uri: str | None) -> str:
    """The MLflow store a command only reads from (promote, sweep-report), absolute; refused when
    it is not there, since MLflow would create an empty one (a ./mlflow.db) on first contact."""
    from pipelines.tracking import resolve_tracking_uri

    try:
        return resolve_tracking_uri(tracking_uri, existing=True)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="--tracking-uri") from None


def require_writable(location: str | Path, param_hint: str) -> None:
    """Refuse a local output place that cannot be written (read-only, forbidden, full, a path
    through a file) in a moment, before the slow work (Prefect's retries, a model load, training);
    the directory is made, as the command would. Object storage is not checked."""
    from data_prep.output import check_writable, describe
    from data_prep.paths import is_url

    if is_url(str(location)):
        return
    try:
        check_writable(Path(location))
    except OSError as err:
        message = f"cannot write to {location}: {describe(err, location)}"
        raise typer.BadParameter(message, param_hint=param_hint) from None


def require_local_cpus(workers: int, ray_address: str | None, param_hint: str) -> None:
    """Refuse more Train workers than a local Ray can place (one CPU each), which would otherwise
    wait for resources that never come; a cluster (--ray-address or RAY_ADDRESS) is not checked."""
    import os

    cpus = os.cpu_count() or 1
    if not (ray_address or os.environ.get("RAY_ADDRESS")) and workers > cpus:
        raise typer.BadParameter(
            f"{workers} workers need {workers} CPUs (one each) but this machine has {cpus}; "
            f"use at most {cpus}, or join a Ray cluster with --ray-address",
            param_hint=param_hint,
        )


def require_placement(strategy: str, workers: int, ray_address: str | None) -> str:
    """Refuse a placement strategy Ray does not know, and STRICT_SPREAD (a node per worker) for
    more workers than the one node of a local Ray, which would wait for nodes that never come."""
    import os

    from pipelines.defaults import PLACEMENT_STRATEGIES

    chosen = strategy.upper()
    if chosen not in PLACEMENT_STRATEGIES:
        raise typer.BadParameter(
            f"{strategy!r} is not one of {', '.join(PLACEMENT_STRATEGIES)}", param_hint="--placement-strategy"
        )
    cluster = ray_address or os.environ.get("RAY_ADDRESS")
    if chosen == "STRICT_SPREAD" and workers > 1 and not cluster:
        raise typer.BadParameter(
            f"STRICT_SPREAD puts each of the {workers} workers on a node of its own, and a local Ray is "
            "one node; join a Ray cluster with --ray-address",
            param_hint="--placement-strategy",
        )
    return chosen


def require_device(device: str) -> str:
    """Refuse a --device torch does not know, or a GPU this machine does not have."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        message = f"{device!r} is not a device; use cpu or cuda"
        raise typer.BadParameter(message, param_hint="--device") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(
            f"{device}: no CUDA GPU is available here (torch {torch.__version__}); use --device cpu",
            param_hint="--device",
        )
    return device


def require_image(path: Path) -> Image.Image:
    """The image at ``path`` as a person sees it (`data_prep.images.decode_image`: upright, RGB),
    fully decoded: a file that is no image, a truncated one or one of too many pixels is refused
    here rather than after the model has loaded."""
    from data_prep.images import UnreadableImage, decode_image

    try:
        return decode_image(path.read_bytes())
    except UnreadableImage as err:
        raise typer.BadParameter(f"{path} is {err}", param_hint="--image") from None


def require_picture_path(path: Path, param_hint: str) -> Path:
    """Refuse an output path whose extension names no image format PIL can write (e.g. overlay.txt)."""
    from PIL import Image

    formats = Image.registered_extensions()
    if formats.get(path.suffix.lower()) not in Image.SAVE:
        raise typer.BadParameter(
            f"{path}: {path.suffix or 'no extension'} is not an image format to write; use .png or .jpg",
            param_hint=param_hint,
        )
    return path

"""`magnet` commands of the train group: train, evaluate, predict, demo, and the local stack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from pipelines.commands import require_device, require_image, require_picture_path, require_prepared
from pipelines.defaults import TRAIN

stack_app = typer.Typer(help="The local stack: Prefect server, MLflow server and the served deployments.")


def train(
    config: str = typer.Option(TRAIN.config, "--config", "-c", help="Preset name or YAML path."),
    shards: str = typer.Option(
        ..., "--shards", help="Prepared dataset root <out>/<dataset>-<splitBy> (directory or s3:// URL)."
    ),
    num_workers: int = typer.Option(TRAIN.num_workers, "--num-workers", min=1, help="Ray Train workers."),
    use_gpu: bool = typer.Option(TRAIN.use_gpu, "--use-gpu", help="One GPU per worker."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. train.lr=1e-4."),
    experiment: str = typer.Option(TRAIN.experiment, "--experiment", help="MLflow experiment."),
    run_name: str | None = typer.Option(None, "--run-name", help="Default: unique per run."),
    resume: bool = typer.Option(
        TRAIN.resume, "--resume", help="Continue the run --run-name from its checkpoint."
    ),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Default: RAY_ADDRESS or local Ray."),
    storage_path: str | None = typer.Option(
        None, "--storage-path", help="Ray storage; default ./ray-results."
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or sqlite ./mlflow.db."
    ),
    register_model: bool = typer.Option(
        TRAIN.register_model, "--register/--no-register", help="Register the model."
    ),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Checkpoint whose weights start the run (e.g. from import-weights)."
    ),
) -> None:
    """Train MagNet with Ray Train through the train-magnet flow, tracked in MLflow."""
    from magnet.config import ConfigError, load_config
    from magnet.data import check_text_settings, open_split

    if init_from is not None:
        if not (init_from / "model.pt").is_file():
            raise typer.BadParameter(
                f"{init_from} holds no model.pt: not a checkpoint", param_hint="--init-from"
            )
        overrides = [*overrides, f"train.init_from={init_from.resolve()}"]  # absolute: Ray changes cwd
    try:
        cfg = load_config(config, overrides)  # fail here, before Prefect and Ray start
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--config/--set") from None
    shards = require_prepared(shards)
    # A corrupt shard named now, not in a Prefect task's traceback; the driver checks again (one
    # more read of the split) because the flow is also started without this command
    check_text_settings(shards, cfg.model.text)
    data = cfg.data
    open_split(shards, data.train_split, verify=data.verify_checksums, skip_corrupt=data.skip_corrupt_shards)
    from pipelines.flows.train import train_magnet  # Prefect only once the arguments are good

    result = train_magnet(
        config=config,
        shards=shards,
        overrides=overrides,
        ray_address=ray_address,
        num_workers=num_workers,
        use_gpu=use_gpu,
        experiment=experiment,
        run_name=run_name,
        resume=resume,
        tracking_uri=tracking_uri,
        storage_path=storage_path,
        register_model=register_model,
    )
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))


def evaluate(
    model: str = typer.Option(
        ..., "--model", help="models:/magnet@alias, models:/magnet/N, run id, or checkpoint."
    ),
    shards: str = typer.Option(..., "--shards", help="Prepared dataset root (directory or s3:// URL)."),
    splits: list[str] = typer.Option(["val"], "--split", help="Split to score (repeatable)."),
    protocol: str | None = typer.Option(None, "--protocol", help="lavt (model input size) or original."),
    out: Path | None = typer.Option(None, "--out", help="Write the metrics JSON here."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="For models:/ and runs:/ URIs."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Score a model on whole splits (every expression) and write oIoU, mIoU and P@t."""
    from magnet.data import check_text_settings, open_split
    from magnet.evaluate import evaluate as run_evaluation
    from pipelines.registry import check_model_reference, load_model

    if protocol not in (None, "lavt", "original"):
        raise typer.BadParameter(
            f"{protocol!r} is not a protocol; use lavt or original", param_hint="--protocol"
        )
    require_device(device)
    shards = require_prepared(shards)
    for split in splits:  # names a split the data lacks; checksums are verified as each is scored
        open_split(shards, split, verify=False)
    check_model_reference(model, tracking_uri)
    try:
        net, cfg = load_model(model, tracking_uri=tracking_uri, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    check_text_settings(shards, cfg.model.text)
    if protocol is not None:
        cfg.eval.protocol = protocol
    result = run_evaluation(net, shards, cfg, splits=splits, device=device)
    report = {"model": model, "shards": shards, **result.as_dict()}
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)


def predict(
    model: str = typer.Option(
        ..., "--model", help="models:/magnet@alias, models:/magnet/N, run id, or checkpoint."
    ),
    image: Path = typer.Option(..., "--image", exists=True, dir_okay=False, help="Image file."),
    text: str = typer.Option(..., "--text", help="The referring expression."),
    out: Path = typer.Option(Path("overlay.png"), "--out", help="Overlay picture to write."),
    mask_out: Path | None = typer.Option(None, "--mask-out", help="Also write the mask (PNG, 0/255)."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="For models:/ and runs:/ URIs."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    logits_out: Path | None = typer.Option(
        None, "--logits-out", help="Also write the raw mask logits, float32 [S/4, S/4] (.npy)."
    ),
) -> None:
    """Segment the object an expression refers to; write an overlay (and the mask)."""
    from magnet.inference import mask_to_png_image, missing_glyphs, predict_one, render_overlay, words_read
    from pipelines.registry import check_model_reference, load_model

    if not text.strip():
        raise typer.BadParameter("the expression is empty: say which object to segment", param_hint="--text")
    require_picture_path(out, "--out")
    if mask_out is not None:
        require_picture_path(mask_out, "--mask-out")
    if logits_out is not None and logits_out.suffix != ".npy":
        raise typer.BadParameter(f"{logits_out}: numpy writes .npy files", param_hint="--logits-out")
    require_device(device)
    picture = require_image(image)
    check_model_reference(model, tracking_uri)
    try:
        net, cfg = load_model(model, tracking_uri=tracking_uri, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    cut = words_read(text, cfg.model)
    if cut is not None:
        max_tokens = cfg.model.text.max_tokens
        typer.echo(
            f"note: the expression has {cut[0]} word pieces; the model reads only its first "
            f"{max_tokens - 1} (text.max_tokens {max_tokens} with [CLS]): {cut[1]!r}"
        )
    unseen = missing_glyphs(text)
    if unseen:
        typer.echo(
            f"note: the caption font has no glyphs for {''.join(unseen[:10])!r}"
            f"{f' and {len(unseen) - 10} more characters' if len(unseen) > 10 else ''}: "
            "they show as boxes in the overlay (the model reads the text as typed)"
        )
    mask = predict_one(net, cfg.model, picture, text, cfg.eval.threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(picture, mask, text=text).save(out)
    if mask_out is not None:
        mask_out.parent.mkdir(parents=True, exist_ok=True)
        mask_to_png_image(mask).save(mask_out)
    if logits_out is not None:
        _save_logits(net, cfg.model, picture, text, logits_out)
    share = 100 * mask.mean()
    typer.echo(
        f"mask covers {share:.1f}% of the image; overlay: {out}" + (f", mask: {mask_out}" if mask_out else "")
    )


def _save_logits(net: Any, model_cfg: Any, picture: Any, text: str, path: Path) -> None:
    """The model's raw mask logits for one pair, at its output resolution (S/4 x S/4, before
    any resize or sigmoid), so they compare number by number with the reference model's."""
    import numpy as np
    import torch

    from magnet.inference import preprocess_images, tokenize

    device = next(net.parameters()).device
    ids, attention = tokenize([text], model_cfg)  # [1, L]
    with torch.inference_mode():
        pixels = preprocess_images([picture], model_cfg.image_size).to(device)  # [1, 3, S, S]
        logits = net.eval()(pixels, ids.to(device), attention.to(device)).mask_logits  # [1, 1, S/4, S/4]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, logits[0, 0].float().cpu().numpy())


def demo(
    workdir: Path = typer.Option(Path("demo-run"), "--workdir", help="Everything the demo writes goes here."),
) -> None:
    """The whole pipeline in minutes on a laptop: synthetic data, shards, Ray training on 2 CPU
    workers, evaluation against language-blind baselines, MLflow registry."""
    from pipelines.demo import run_demo

    run_demo(workdir)


def register_checkpoint(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="Checkpoint directory (from magnet import-weights, or a run's)."
    ),
    shards: str = typer.Option(
        ..., "--shards", help="Prepared dataset it is meant for: tagged on the run, first sample = example."
    ),
    split: str = typer.Option("val", "--split", help="Split whose first sample is the input example."),
    experiment: str = typer.Option("magnet", "--experiment", help="MLflow experiment."),
    aliases: list[str] = typer.Option([], "--alias", help="Registry alias to point at the new version."),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or sqlite ./mlflow.db."
    ),
) -> None:
    """Register a checkpoint that no training run produced (e.g. imported published weights) as a
    new version of `magnet`, in a run of its own carrying its config and the dataset's tags."""
    from magnet.checkpoint import load_config_from_checkpoint
    from pipelines import mlflow_record, registry
    from pipelines import tracking as mlflow_tracking
    from pipelines.flows.train import first_example

    shards = require_prepared(shards)
    try:
        cfg = load_config_from_checkpoint(checkpoint)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="--checkpoint") from None
    tracking = mlflow_tracking.start_run(
        cfg,
        shards=shards,
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=f"register-{checkpoint.resolve().name}",
        trains=False,
    )
    try:
        example = first_example(shards, split)
        version = registry.log_and_register(tracking, checkpoint, example, aliases=tuple(aliases))
        card = mlflow_record.model_card(tracking, checkpoint, shards, None, "none here (registered as is)")
        mlflow_record.describe_version(tracking["tracking_uri"], version, card)
    except BaseException:
        mlflow_tracking.end_run(tracking, status="FAILED")
        raise
    mlflow_tracking.end_run(tracking)
    typer.echo(json.dumps({"version": version, "run_id": tracking["run_id"], "aliases": aliases}))


@stack_app.command("up")
def stack_up(
    state_dir: Path = typer.Option(Path(".magnet-stack"), "--state-dir", help="Databases, pid files, logs."),
    prefect_port: int = typer.Option(4200, "--prefect-port"),
    mlflow_port: int = typer.Option(5000, "--mlflow-port"),
) -> None:
    """Start a Prefect server, an MLflow server and the served deployments, on 127.0.0.1."""
    from pipelines.stack import StackError, up

    try:
        typer.echo(up(state_dir, prefect_port=prefect_port, mlflow_port=mlflow_port))
    except StackError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


@stack_app.command("down")
def stack_down(state_dir: Path = typer.Option(Path(".magnet-stack"), "--state-dir")) -> None:
    """Stop what `magnet stack up` started."""
    from pipelines.stack import down

    typer.echo(down(state_dir))


@stack_app.command("status")
def stack_status(state_dir: Path = typer.Option(Path(".magnet-stack"), "--state-dir")) -> None:
    """Which stack processes run, and the addresses to use."""
    from pipelines.stack import status

    typer.echo(status(state_dir))


def register(app: typer.Typer) -> None:
    """Add this group's commands to the `magnet` app."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)
    app.command("register")(register_checkpoint)
    app.command("demo")(demo)
    app.add_typer(stack_app, name="stack")

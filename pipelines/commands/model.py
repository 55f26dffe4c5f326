"""`magnet` commands of the model group."""

from __future__ import annotations

import json

import typer

from pipelines.defaults import CONFIGS

PARTS = (
    ("vision_fusion_cam", "vision + fusion + CAM"),
    ("language_fusion", "language + fusion"),
    ("decoder", "decoder"),
    ("inference", "inference total"),
    ("training_only", "training-only heads (MG, CAL)"),
    ("total", "total"),
)


def model_info(
    config: str = typer.Option(CONFIGS.model_info, "--config", "-c", help="Preset name or YAML path."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override: model.fusion.use_cam=false."),
    image_size: tuple[int, int] | None = typer.Option(
        None, "--image-size", help="Input height and width (default: model.image_size square)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Parameter count per part and output shapes, from the model built on the meta device
    (no memory and no weights, so the paper config is as cheap as the tiny one)."""
    from magnet.config import ConfigError, load_config
    from magnet.models.magnet import describe_model

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--config/--set") from None
    height, width = image_size if image_size else (None, None)
    info = describe_model(cfg.model, height, width)
    info["config"] = cfg.name
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    params = info["parameters"]
    text = info["text_encoder"]
    typer.echo(f"MagNet '{cfg.name}'  input {tuple(info['input'])}")
    typer.echo(f"{'part':<32}{'parameters':>16}{'M':>10}")
    for key, label in PARTS:
        typer.echo(f"{label:<32}{params[key]:>16,}{params[key] / 1e6:>10.2f}")
    typer.echo(
        f"text encoder {text['name_or_path']}: {sum(text['layers_per_stage'])} layers "
        f"{tuple(text['layers_per_stage'])} x {text['width']}, {text['parameters'] / 1e6:.2f} M "
        f"({text['word_embedding_parameters'] / 1e6:.2f} M word embeddings), inside 'language + fusion'"
    )
    for k, shape in enumerate(info["stages"]):
        typer.echo(f"stage {k + 1} features (decoder input): {tuple(shape)}")
    typer.echo(f"mask logits: {tuple(info['mask_logits'])}  + {len(info['aux_mask_logits'])} auxiliary")


def register(app: typer.Typer) -> None:
    """Add this group's commands to the `magnet` app."""
    app.command("model-info")(model_info)

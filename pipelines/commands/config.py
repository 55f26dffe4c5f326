"""`magnet config`: the fully resolved configuration of a preset and its overrides."""

from __future__ import annotations

import typer

from pipelines.defaults import CONFIGS


def show_config(
    config: str = typer.Option(CONFIGS.show, "--config", "-c", help="Preset name or YAML path."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. train.lr=1e-4."),
) -> None:
    """Print the fully resolved configuration (preset + overrides) as YAML."""
    import yaml

    from magnet.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--config/--set") from None
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def register(app: typer.Typer) -> None:
    """Add this command to the `magnet` app."""
    app.command("config")(show_config)

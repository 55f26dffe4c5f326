"""The `magnet` command line. Each command group lives in pipelines/commands/<group>.py and
registers itself here; heavy libraries are imported inside the commands, so `--help` is quick."""

from __future__ import annotations

import typer

from pipelines.commands import data, model, synth, train, tune, weights

app = typer.Typer(
    name="magnet",
    help="MagNet Pipeline: prepare RefCOCO-family data, train, tune, evaluate and promote MagNet models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """MagNet Pipeline command line."""


for group in (synth, data, model, weights, train, tune):
    group.register(app)


@app.command("config")
def show_config(
    config: str = typer.Option("tiny", "--config", "-c", help="Preset name or YAML path."),
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


if __name__ == "__main__":
    app()

"""Where each `magnet` command lives: the table in pipelines/commands/__init__.py is the truth, and
options several commands share are declared once there."""

from __future__ import annotations

import re
from pathlib import Path

import pipelines.commands
from pipelines.cli import app

COMMANDS = Path(pipelines.commands.__file__).parent


def documented_modules() -> dict[str, str]:
    """command name -> module file, from the package docstring's table."""
    rows = re.findall(
        r"^\| ([a-z-]+(?: up / down / status)?) \| ([a-z_]+\.py) \|$", pipelines.commands.__doc__, re.M
    )
    return {command.split()[0]: module for command, module in rows}


def test_every_command_lives_where_the_table_says():
    registered = {info.name: info.callback.__module__ for info in app.registered_commands}
    registered.update({group.name: group.typer_instance.registered_commands[0].callback.__module__
                       for group in app.registered_groups})  # fmt: skip
    table = documented_modules()
    assert sorted(table) == sorted(registered)
    for command, module in registered.items():
        assert f"{module.rsplit('.', 1)[1]}.py" == table[command], command


def test_shared_options_are_declared_once():
    for option in ("--tracking-uri", "--device", "--ray-address"):
        declared = [
            path.name for path in sorted(COMMANDS.glob("*.py"))
            for _ in re.finditer(rf'typer\.Option\([^)]*"{option}"', path.read_text(), re.S)
        ]  # fmt: skip
        assert declared == ["__init__.py"], (option, declared)

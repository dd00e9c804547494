"""The ops command line (``python manage.py``): a click group; each command family is a module
that attaches its commands with ``register(cli)``, so entry points stay thin."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict

import click

from rules_service.config import ConfigError, load_settings

#: Modules whose ``register(group)`` adds commands. One line per command family.
COMMAND_MODULES: list[str] = [
    "percolators.cli",
    "workers.cli",
    "rules_service.cli_api",
    "workers.replay_cli",
    "rules_service.demo",
    "rules_service.cli_redis",
]


class CliError(click.ClickException):
    """A clean, traceback-free error; exit status 2 (bad input) unless given."""

    exit_code = 2

    def show(self, file: object = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@click.group()
def cli() -> None:
    """Audience rule engine: operations."""


@cli.command("config")
def show_config() -> None:
    """Print the effective settings (RULES_* environment over defaults) as JSON."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    click.echo(json.dumps({k: str(v) if not isinstance(v, int | tuple) else v
                           for k, v in asdict(settings).items()}, indent=2))


def main(argv: list[str] | None = None) -> int:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(cli)
    try:
        cli.main(args=argv, prog_name="manage.py", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

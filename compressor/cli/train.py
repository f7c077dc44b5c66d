"""Command-line pieces for training runs (registered in the main ``compress`` group by cli.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import click

from compressor.core.errors import CompressorError
from compressor.train.checkpoint import format_checkpoints, list_checkpoints
from compressor.train.heal import HealConfig, setting_types


@click.command("checkpoints")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def checkpoints(directory: Path, as_json: bool) -> None:
    """List the checkpoints in DIRECTORY: step, metrics, size, valid or why not, best marked.

    Exits with code 2 when a checkpoint is malformed or unsafe (resuming would refuse it); a damaged
    one (a crash's leftover, which resuming skips) is listed as INVALID and does not change the code.
    """
    try:
        rows = list_checkpoints(directory)
    except CompressorError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    click.echo(json.dumps([asdict(r) for r in rows], indent=1) if as_json else format_checkpoints(rows))
    refused = [r for r in rows if r.refused]
    if refused:
        click.echo(f"error: checkpoint {refused[0].path} is {refused[0].reason} "
                   f"({len(refused)} refused in all); delete it (--resume would stop there)", err=True)
        sys.exit(2)


def heal_config_options(f: Callable) -> Callable:
    """One ``compress heal`` option per :class:`HealConfig` field: ``--kebab-case`` name, type, default,
    help, and choices from its ``Literal``. A new heal setting is a new field there, and nothing here."""
    types = setting_types()
    for setting in reversed(fields(HealConfig)):
        kind, choices, _ = types[setting.name]
        f = click.option("--" + setting.name.replace("_", "-"), setting.name,
                         type=click.Choice(choices) if choices else kind, default=setting.default,
                         show_default=setting.default is not None, help=setting.metadata["help"])(f)
    return f

"""Command-line pieces for training runs (registered in the main ``compress`` group by cli.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from compressor.train.checkpoint import format_checkpoints, list_checkpoints


@click.command("checkpoints")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def checkpoints(directory: Path, as_json: bool) -> None:
    """List the checkpoints in DIRECTORY: step, metrics, size, valid or why not, best marked."""
    rows = list_checkpoints(directory)
    click.echo(json.dumps([asdict(r) for r in rows], indent=1) if as_json else format_checkpoints(rows))

"""What every command does with a :class:`CompressorError`: one line on stderr and its exit code."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from compressor.core.errors import CompressorError


def fail(err: CompressorError, debug: bool = False) -> NoReturn:
    """Print ``error: <problem>; <fix>`` and exit with the error's code (``--debug``: raise it instead)."""
    if debug:
        raise err
    click.echo(f"error: {err.for_cli()}", err=True)
    sys.exit(err.exit_code)

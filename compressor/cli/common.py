"""What every command does with a :class:`CompressorError` (one line on stderr and its exit code), and with
its own command line (recorded in the reports)."""

from __future__ import annotations

import shlex
import sys
from typing import NoReturn

import click

from compressor.core.errors import CompressorError

# A written file failed its validation: the output folder is kept for inspection (bad input exits 2).
EXIT_VALIDATION_FAILED = 3


def fail(err: CompressorError, debug: bool = False) -> NoReturn:
    """Print ``error: <problem>; <fix>`` and exit with the error's code (``--debug``: raise it instead)."""
    if debug:
        raise err
    click.echo(f"error: {err.for_cli()}", err=True)
    sys.exit(err.exit_code)


def command_line() -> str:
    """The command as typed (``compress MODEL --energy 0.9``), for report.md."""
    return "compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])

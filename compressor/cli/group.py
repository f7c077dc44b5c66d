"""The ``compress`` group's behaviour: a MODEL first means ``compress run`` (or ``search`` with a budget),
usage errors and interrupts end in one line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from compressor.core.output import interrupt_exit_code, interrupt_on_sigterm

# Options that make `compress MODEL ...` a recipe search: a budget rather than a policy.
_CONSTRAINT_OPTIONS = ("--max-size", "--min-fidelity", "--max-latency", "--max-perplexity-ratio")



class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a sub-command, is the MODEL of ``compress run``, or of
    ``compress search`` when a constraint (``--max-size``, ``--min-fidelity``, ``--max-latency``) is given."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            search = any(a.split("=", 1)[0] in _CONSTRAINT_OPTIONS for a in args)
            args = ["search" if search else "run", *args]
        return super().parse_args(ctx, args)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        interrupt_on_sigterm()  # from here on SIGTERM unwinds like Ctrl-C
        with _interrupts_exit():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _interrupts_exit():
            return super().invoke(ctx)


    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """As click's, but a usage error (unknown option, a value of the wrong type) is one line too:
        ``error: <what click says>; see compress [COMMAND] --help``, exit code 2."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rc = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as err:
            name = err.ctx.command_path if err.ctx is not None else "compress"
            click.echo(f"error: {err.format_message().rstrip('.')}; see {name} --help", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        sys.exit(rc if isinstance(rc, int) else 0)


@contextmanager
def _interrupts_exit() -> Iterator[None]:
    """Ctrl-C, and SIGTERM turned into the same exception, end every command the same way: temporary
    outputs are removed while the exception unwinds, then one line and the shell's code for the signal."""
    try:
        yield
    except KeyboardInterrupt as err:
        if "--debug" in sys.argv[1:]:
            raise
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(interrupt_exit_code(err))


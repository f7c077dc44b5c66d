"""Errors a user can act on.

Every problem caused by the user's input (a bad file, a bad option, a plan that does not fit the model)
is raised as a :class:`CompressorError` whose message is one line naming the problem and the fix. A fix
that names options is spelled for Python (``exclude=['0']``); ``cli_fix`` spells it for the command line
(``--exclude '0'``), and the command-line tool prints :meth:`CompressorError.for_cli`.
The command-line tool prints that line and exits with code 2, without a traceback.
"""

from __future__ import annotations


class CompressorError(Exception):
    """A problem with the user's input; ``str(err)`` is one line: the problem, then the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None, *, cli_fix: str | None = None):
        self.problem = problem
        self.fix = fix
        self.cli_fix = cli_fix  # the fix spelled for the command line (--exclude 'x'), when it differs
        super().__init__(f"{problem}; {fix}" if fix else problem)

    def for_cli(self) -> str:
        """The one line the command-line tool prints: the fix in its option spelling where one was given."""
        fix = self.cli_fix or self.fix
        return f"{self.problem}; {fix}" if fix else self.problem


class PlanError(CompressorError):
    """A plan that cannot be applied to the model it was given."""

"""Errors a user can act on.

Every problem caused by the user's input (a bad file, a bad option, a plan that does not fit the model)
is raised as a :class:`CompressorError` whose message is one line naming the problem and the fix.
The command-line tool prints that line and exits with code 2, without a traceback.
"""

from __future__ import annotations


class CompressorError(Exception):
    """A problem with the user's input; ``str(err)`` is one line: the problem, then the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class PlanError(CompressorError):
    """A plan that cannot be applied to the model it was given."""

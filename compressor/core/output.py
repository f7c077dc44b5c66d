"""The output folder of a command: refused when it would overwrite an input, built in a temporary
folder beside it, renamed into place at the end (see :func:`compressor.core.fileio.atomic_folder`).

A failure or an interrupt (SIGINT, or SIGTERM once :func:`interrupt_on_sigterm` ran) at any step leaves
no partial folder behind, and an existing folder is only replaced when the user asked for it
(``--force``), after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_folder, check_destination


class OutputDir:
    """``with OutputDir(path, force) as tmp:`` write into ``tmp``; on success it becomes ``path``."""

    def __init__(self, path: Path, force: bool = False):
        self.path = Path(path)
        self.force = force
        self._cm: contextlib.AbstractContextManager[Path] | None = None

    def check(self) -> None:
        """Raise now if the folder could not be published (exists without --force, or is a file)."""
        check_destination(self.path, self.force)

    def __enter__(self) -> Path:
        self._cm = atomic_folder(self.path, self.force)
        return self._cm.__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool | None:
        assert self._cm is not None
        return self._cm.__exit__(exc_type, exc, tb)


def check_not_over_inputs(out: Path, inputs: Iterable[tuple[str, Path | str | None]]) -> None:
    """Refuse an output folder that is, contains, or lies inside one of the command's ``inputs``
    (``(what, path)`` pairs; None paths are skipped): writing or replacing it would change or delete
    that input. Symbolic links are resolved first."""
    target = Path(os.path.realpath(out))
    for what, path in inputs:
        if path is None:
            continue
        real = Path(os.path.realpath(path))
        if target == real or target in real.parents or real in target.parents:
            how = ("is" if target == real else "contains" if target in real.parents else "lies inside")
            raise CompressorError(f"the output folder '{out}' {how} the {what} '{path}', which writing it "
                                  "would change or delete", "choose an --out outside every input")


class Interrupted(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so every temporary output is removed on the way out."""

    signum = signal.SIGTERM


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Interrupted` (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is threading.main_thread():  # elsewhere signal.signal refuses
        signal.signal(signal.SIGTERM, _on_sigterm)


def interrupt_exit_code(err: KeyboardInterrupt) -> int:
    """The shell's code for death by the signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(getattr(err, "signum", signal.SIGINT))

"""The output folder of a command: built in a temporary folder beside it, renamed into place at the end.

A failure at any step leaves no partial folder behind, and an existing folder is only replaced when
the user asked for it (``--force``), after the new one is complete.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from compressor.core.errors import CompressorError
from compressor.core.fileio import publish_mode


class OutputDir:
    """``with OutputDir(path, force) as tmp:`` write into ``tmp``; on success it becomes ``path``."""

    def __init__(self, path: Path, force: bool = False):
        self.path = Path(path)
        self.force = force
        self.tmp: Path | None = None

    def check(self) -> None:
        """Raise now if the folder could not be published (exists without --force, or is a file)."""
        if self.path.exists() and not self.force:
            raise CompressorError(f"output folder '{self.path}' already exists",
                                  "pass --force to replace it, or choose another with --out")
        if self.path.exists() and not self.path.is_dir():
            raise CompressorError(f"output path '{self.path}' is a file, not a folder",
                                  "choose another path with --out")

    def __enter__(self) -> Path:
        self.check()
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent))
        except OSError as err:
            raise CompressorError(f"cannot write the output folder in '{parent}' ({err.strerror})",
                                  "choose a writable location with --out") from None
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        publish_mode(self.tmp)
        old = None
        if self.path.exists():  # --force: move the old folder aside until the new one is in place
            old = self.path.with_name(f".{self.path.name}.old-{self.tmp.name.rsplit('.', 2)[-2]}")
            self.path.rename(old)
        self.tmp.rename(self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

"""File helpers shared by every stage: outputs appear whole or not at all, and leave nothing behind.

* :func:`atomic_file` / :func:`atomic_write`: one file, written beside its target and renamed onto it;
* :func:`atomic_files`: a file with companions (an ONNX model and its external data), the main file last;
* :func:`atomic_folder`: a whole folder, built beside its target, locked against a second writer, then
  renamed into place (an existing one is replaced only when ``force``);
* :func:`temp_folder`: scratch space beside a path, removed at the end whatever happens.

Every temporary name is ``.NAME.tmp-compressor-PID-RAND`` (``.old-`` for a folder being replaced), so
one whose process is gone is recognisably ours and is removed by the next run writing beside it
(:func:`clean_stale`). Files are fsynced before the rename and the folder after it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from compressor.core.errors import CompressorError

TAG = "compressor"
# .NAME.tmp-compressor-PID-RAND  or  .NAME.old-compressor-PID-RAND
_OURS = re.compile(rf"^\.(?P<name>.+)\.(?:tmp|old)-{TAG}-(?P<pid>\d+)-[0-9a-f]{{6}}$")
# Errors that mean "this location cannot take the output", told to the user in one line.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A fresh name beside ``path`` in our own recognisable form (``kind`` is ``tmp`` or ``old``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{TAG}-{os.getpid()}-{secrets.token_hex(3)}")


def is_ours(name: str) -> bool:
    return _OURS.match(name) is not None


def clean_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove our temporary files and folders in ``folder`` (only those for ``name``, if given) whose
    writing process is no longer alive; returns what was removed. Anything else is left alone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _OURS.match(p.name)
        if m is None or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """``with atomic_file(path) as tmp:`` write ``tmp``; on success it is fsynced and renamed onto ``path``.

    A crash or an exception leaves either the old file or the new one, never a truncated mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    tmp = temp_name(path)
    try:
        yield tmp
        _publish_file(tmp, path)
    except BaseException:
        with signals_deferred():
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _publish_file(tmp: Path, path: Path) -> None:
    os.chmod(tmp, 0o666 & ~umask())
    fsync_file(tmp)
    os.replace(tmp, path)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then publish it as :func:`atomic_file` does."""
    with atomic_file(path) as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def temp_folder(beside: Path) -> Iterator[Path]:
    """A new empty folder named after ``beside`` in its parent, removed when the block ends."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(beside.parent, beside.name)
    tmp = temp_name(beside)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(path: Path) -> Iterator[Path]:
    """``with atomic_files(path) as tmpdir:`` write ``tmpdir / path.name`` and any companion files it needs
    beside it (an ONNX file's external data); on success every file is fsynced and renamed into
    ``path.parent``, ``path.name`` last, so a reader never sees it without its companions."""
    path = Path(path)
    with temp_folder(path) as tmpdir:
        yield tmpdir
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):
            _publish_file(f, path.parent / f.name)
        fsync_dir(path.parent)


def check_destination(path: Path, force: bool) -> None:
    """Raise if a folder could not be published at ``path``: it exists (without ``force``) or is a file."""
    path = Path(path)
    if path.is_symlink():
        raise CompressorError(f"output path '{path}' is a symbolic link", "choose another path with --out")
    if path.exists() and not path.is_dir():
        raise CompressorError(f"output path '{path}' is a file, not a folder", "choose another path with --out")
    if path.exists() and not force:
        raise CompressorError(f"output folder '{path}' already exists",
                              "pass --force to replace it, or choose another with --out")


@contextlib.contextmanager
def atomic_folder(path: Path, force: bool = False, lock: bool = True) -> Iterator[Path]:
    """``with atomic_folder(path, force) as tmp:`` write into ``tmp``; on success it becomes ``path``.

    While the block runs, ``.NAME.lock`` beside the target keeps a second writer out (it is told so in
    one line). On success the files are fsynced and the folder renamed into place; an existing folder is
    refused without ``force`` (checked at the start and again just before publishing) and otherwise
    swapped out only once the new one is complete. On failure or interrupt, the temporary folder goes.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):  # '.' or 'a/..': name it, so the temp and lock names have one
        path = Path(os.path.abspath(path))
    check_destination(path, force)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _write_error(path, err) from None
        with folder_lock(path) if lock else contextlib.nullcontext(), _built_beside(path, force) as tmp:
            yield tmp
    except BaseException:
        for p in made:  # the parents this run made, when nothing else was put in them
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


@contextlib.contextmanager
def _built_beside(path: Path, force: bool) -> Iterator[Path]:
    """The temporary folder of :func:`atomic_folder` (its caller holds the lock), renamed at the end."""
    clean_stale(path.parent, path.name)
    check_destination(path, force)
    tmp = temp_name(path)
    try:
        tmp.mkdir()
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        try:
            yield tmp
        except Exception as err:
            code = write_errno(err)
            if code is not None:
                raise _write_error(path, OSError(code, os.strerror(code))) from None
            raise
        publish_mode(tmp)
        fsync_tree(tmp)
        check_destination(path, force)  # again, under the lock: someone may have made it meanwhile
        with signals_deferred():
            _replace_folder(tmp, path)
    except BaseException:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
    else:  # move the old folder aside until the new one is in place
        old = temp_name(path, "old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


def write_errno(err: BaseException | None) -> int | None:
    """The errno when ``err`` (or what caused it) says the disk cannot take the output: full, over a size
    or quota limit, read-only, not permitted. Libraries written in Rust (safetensors) only say it in
    their message, as ``(os error 28)``."""
    seen = 0
    while err is not None and seen < 8:
        code = err.errno if isinstance(err, OSError) else None
        if code is None and (m := re.search(r"\(os error (\d+)\)", str(err))):
            code = int(m[1])
        if code in _WRITE_ERRNOS:
            return code
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _write_error(path: Path, err: OSError) -> CompressorError:
    return CompressorError(f"cannot write the output folder '{path}' ({err.strerror or err})",
                           "choose a writable location with free space with --out")


@contextlib.contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``path`` (flock, not waiting); a second holder gets a one-line error.

    The lock file is removed on release. A lock file left by a dead process is free (the kernel drops a
    dead process's flock), so it is simply taken over.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise _write_error(path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CompressorError(f"another compress run is writing '{path}'",
                                  "wait for it to finish, or choose another --out") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs (a rename pair, a clean-up); they arrive after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(folder: Path) -> None:
    """Give a folder built as a temporary and its contents the modes a plain mkdir/open would."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (and it), so a rename publishes durable content."""
    for p in sorted(Path(folder).rglob("*"), key=lambda p: -len(p.parts)):
        if p.is_file() and not p.is_symlink():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(folder)


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries: a rename in it is durable only then (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def regular_file(path: str | Path, what: str = "file") -> Path:
    """``path`` when it is a regular file (or a link to one); else a :class:`CompressorError`.

    Opening a FIFO blocks until someone writes to it and a device can be endless, so every file a user
    names is checked with ``stat`` (which never blocks) before it is opened.
    """
    import stat

    from compressor.core.errors import CompressorError

    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CompressorError(f"{what} '{path}' does not exist", "check the path") from None
    except OSError as err:  # a symlink loop (ELOOP), a path through a file (ENOTDIR), no permission
        raise CompressorError(f"{what} '{path}' cannot be read ({err.strerror})", "check the path") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise CompressorError(f"{what} '{path}' is {kind}, not a regular file", "pass a regular file")
    return path


def file_in_folder(folder: str | Path, path: str | Path, what: str = "file") -> Path:
    """``path`` when it is a regular file that lies inside ``folder`` once every link is resolved; else a
    :class:`CompressorError`. The one rule for the files a model folder names or holds (shards, companion
    files, adapter files, ONNX external data): a link out of the folder would read (or copy into an
    output) a file the user never handed over, and a special file would block or never end."""
    folder, path = Path(folder), Path(path)
    try:
        real, root = path.resolve(strict=True), folder.resolve(strict=True)
    except FileNotFoundError:
        raise CompressorError(f"{what} '{path}' does not exist", "check the folder") from None
    except (OSError, RuntimeError) as err:  # a symlink loop (ELOOP / RuntimeError), no permission
        raise CompressorError(f"{what} '{path}' cannot be read ({getattr(err, 'strerror', None) or err})",
                              "check the folder") from None
    # A Hugging Face hub cache folder (REPO/snapshots/REV/) is links into REPO/blobs/: that one place too.
    roots = [root, *([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])]
    if not any(r in real.parents for r in roots):
        raise CompressorError(f"{what} '{path}' leads outside its folder '{folder}' (to '{real}')",
                              f"copy the file itself into '{folder}' instead of linking it")
    regular_file(real, what)
    return path

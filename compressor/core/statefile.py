"""State the tool writes and reads back later (a streamed run's resume state, checkpoint summaries), trusted
only once verified.

* :func:`load_json` / :func:`read_json`: JSON with a bound on its size and nesting depth, and a type
  check of the top level, so a damaged or hostile file is one line (never a ``RecursionError``);
* :func:`write_sealed` / :func:`read_sealed`: bytes published atomically, then a seal beside them
  (``NAME.sha256``: their sha256 and size). A file without its seal is unfinished (a crash between the
  two writes) and reads as absent; a seal that does not match, or cannot be read, is damage and is
  refused in one line with the caller's fix, never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_bytes, atomic_write_text, regular_file

# Nothing compressor writes nests deeper than a few levels; 64 leaves room for users' configs.
MAX_DEPTH = 64
MAX_JSON_BYTES = 64 << 20
SEAL_SUFFIX = ".sha256"
_SEAL_BYTES = 200  # "<64 hex digits> <size>\n", with room to spare


def json_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply ``value`` nests lists and dicts (1 for a scalar), counted without recursion; stops
    counting once past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def load_json(text: str | bytes, what: str, fix: str, *, kind: type | None = dict,
              cli_fix: str | None = None) -> Any:
    """``text`` parsed as JSON, nested at most :data:`MAX_DEPTH` deep and (unless ``kind`` is None) of
    type ``kind`` at the top; anything else is a :class:`CompressorError` naming ``what``."""
    def bad(problem: str) -> CompressorError:
        return CompressorError(f"{what} {problem}", fix, cli_fix=cli_fix)

    try:
        value = json.loads(text)
    except RecursionError:
        raise bad(f"nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"is not valid JSON ({str(err).splitlines()[0][:80]})") from None
    if json_depth(value) > MAX_DEPTH:
        raise bad(f"nests deeper than {MAX_DEPTH} levels")
    if kind is not None and not isinstance(value, kind):
        raise bad(f"holds a {type(value).__name__}, not a {'JSON object' if kind is dict else kind.__name__}")
    return value


def read_json(path: str | Path, what: str, fix: str, *, kind: type | None = dict, cli_fix: str | None = None) -> Any:
    """The JSON file ``path`` through :func:`load_json`, refused when it is not a regular file (a FIFO
    would block the read forever) or larger than :data:`MAX_JSON_BYTES`."""
    path = regular_file(path, what)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CompressorError(f"{what} '{path}' is {size:,} bytes, more than any JSON file compressor writes",
                              fix, cli_fix=cli_fix)
    return load_json(path.read_bytes(), f"{what} '{path}'", fix, kind=kind, cli_fix=cli_fix)


def seal_of(path: Path) -> Path:
    """Where the seal of ``path`` lies: ``NAME.sha256`` beside it."""
    return path.with_name(path.name + SEAL_SUFFIX)


def write_sealed(path: str | Path, data: bytes) -> None:
    """Publish ``data`` at ``path`` and then its seal. An old seal goes first, so a crash part-way leaves
    an unsealed file (read as absent), never new bytes under an old seal (read as damage)."""
    path = Path(path)
    seal_of(path).unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    atomic_write_text(seal_of(path), f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")


def is_sealed(path: str | Path) -> bool:
    """Whether ``path`` and its seal both exist (not yet whether they agree: :func:`read_sealed` checks)."""
    path = Path(path)
    return seal_of(path).exists() and path.exists()


def read_sealed(path: str | Path, what: str, fix: str, *, cli_fix: str | None = None) -> bytes | None:
    """The bytes at ``path`` once they match their seal; None when the file or its seal is missing.
    A special file, an unreadable seal or a mismatch is a :class:`CompressorError` with ``fix``."""
    path = Path(path)
    if not is_sealed(path):
        return None

    def damaged(problem: str) -> CompressorError:
        return CompressorError(f"{what} '{path}' {problem}", fix, cli_fix=cli_fix)

    seal = regular_file(seal_of(path), what)
    regular_file(path, what)
    with open(seal, "rb") as f:
        text = f.read(_SEAL_BYTES).decode("ascii", "replace").split()
    if len(text) != 2 or len(text[0]) != 64 or not text[1].isdigit():
        raise damaged(f"has an unreadable checksum ({seal.name})")
    digest, size = text[0], int(text[1])
    if path.stat().st_size != size:
        raise damaged(f"is {path.stat().st_size} bytes but was written with {size}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise damaged("fails its sha256 checksum (changed since it was written)")
    return data

"""Files a kill cannot leave half-written: the atomic write and the append-only JSONL reader every package uses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (str as UTF-8, or bytes) to `path` through a unique temporary file in the same folder, fsync'd,
    then renamed over `path`: readers see the old file or the new one, never a torn one (POSIX rename is atomic
    within a file system). Creates the folder; removes the temporary file if writing fails. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def complete_lines(path: str | Path) -> list[bytes]:
    """The whole lines of an append-only JSONL file (without their newlines); a last line that a kill left
    without its newline is cut off the file (truncated and fsync'd), so the next append starts on a fresh line."""
    path = Path(path)
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        with path.open("r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return data[:good].splitlines()

"""Files written atomically: the one way canopy_rs writes a file a reader may open meanwhile (run-folder
tables and records, figures)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["write_atomically"]


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes ``path`` through a temporary file in the same directory, renamed over it once complete and
    flushed: a reader sees the old file or the new one, never a part. The file is created by a plain open,
    so the umask decides its mode (as for any other file the user writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

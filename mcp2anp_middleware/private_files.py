"""Writing a file that holds secrets (session ids, a private key) so that nobody else reads it.

The data goes to a temporary file of its own beside the target (a fresh name, made with mode 0600
and no other writer's), synced, given its mode, then renamed over the target, and the directory
synced: a reader sees the old file or the whole new one, never part of it; two writers at once
each write whole files (the last rename wins); a link at the target is replaced, not followed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_private_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            if hasattr(os, "fchmod"):  # (by descriptor: a link swapped in is not followed)
                os.fchmod(file.fileno(), mode)
            else:  # pragma: no cover - not POSIX
                os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX; elsewhere, and on file systems that refuse, skipped)."""
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

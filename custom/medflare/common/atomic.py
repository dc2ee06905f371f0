"""One way to write a file that readers never see half-written: write a temporary file next to it, then rename.

The temporary file is flushed to disk before the rename and the folder after it, so a power loss leaves the old
file or the new one, never an empty or partial file under ``path``.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO, Any, Callable


def atomic_write(path: str, write: Callable[[IO[Any]], None], text: bool = False) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder (created if needed), then rename it to ``path``.

    A crash or an exception in ``write`` leaves the previous file (or none) and no temporary file behind; the file
    is fsynced before the rename and the folder after it, so a power loss leaves the old or the new content.

    Args:
        path: the file to (re)write.
        write: writes the content to the open file it is given.
        text: open the temporary file in text mode (default: binary).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_directory(directory: str) -> None:
    """Flush ``directory``'s entries (the rename) to disk, where the OS lets a folder be opened (not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def torch_save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))

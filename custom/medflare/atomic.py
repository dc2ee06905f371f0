"""One way to write a file that readers never see half-written: write a temporary file next to it, then rename."""

from __future__ import annotations

import os
import tempfile
from typing import IO, Any, Callable


def atomic_write(path: str, write: Callable[[IO[Any]], None], text: bool = False) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder (created if needed), then rename it to ``path``.

    A crash or an exception in ``write`` leaves the previous file (or none) and no temporary file behind.

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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def torch_save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))

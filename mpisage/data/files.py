"""What every dataset reader shares: its errors, the user cache directory, atomic file writes."""
from __future__ import annotations

import os
import tempfile


class DataError(RuntimeError):
    """A user-facing data problem: the message names the dataset, the paths tried and the fix."""


class DataNotFound(DataError):
    """The dataset is in none of the places looked at (as opposed to found but unreadable)."""


def user_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpisage")



def write_atomically(path: str, write) -> None:
    """write(f) into a temporary file beside `path`, then rename it onto `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".tmp.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

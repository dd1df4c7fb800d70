"""Writing files so that a crash never leaves half of one: write a temporary file beside it, flush
it to the disk, then rename it over the old one (a rename within a folder is atomic). A reader sees
the old file or the new one, never a mix; an interrupted write leaves at most a `.tmp` file behind.
Errors a person can fix (disk full, a read-only folder, a path that is a file) become one
TegakiError naming the file.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tegaki.errors import TegakiError


def explain_os_error(path: str | os.PathLike, e: OSError, doing: str = "write") -> TegakiError:
    """An OSError as one sentence that says what to do."""
    why = {
        errno.ENOSPC: "the disk is full: free some space, or write somewhere else",
        errno.EDQUOT: "the disk quota is used up: free some space, or write somewhere else",
        errno.EROFS: "the file system is read-only: choose a writable folder",
        errno.EACCES: "permission denied: choose a folder you can write to",
        errno.EPERM: "permission denied: choose a folder you can write to",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
        errno.EISDIR: "the path is a folder, not a file: choose another path",
    }.get(e.errno, e.strerror or str(e))
    return TegakiError(f"could not {doing} {path}: {why}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(temp_path) to make the file, then put it in place atomically. Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # ... and the new name is on the disk too
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise explain_os_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some systems cannot open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

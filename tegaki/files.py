"""Writing files so that a crash never leaves half of one: write a temporary file beside it, flush
it to the disk, then rename it over the old one (a rename within a folder is atomic). A reader sees
the old file or the new one, never a mix; an interrupted write leaves at most a `.tmp` file behind.
Errors a person can fix (disk full, a read-only folder, a path that is a file) become one
TegakiError naming the file.

`FolderLock` keeps a second process out of a folder one is writing (a run folder while it trains).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tegaki.errors import TegakiError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock relies on the PID it records
    fcntl = None


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
        errno.EEXIST: "it is a file, not a folder: choose another path",
    }.get(e.errno, e.strerror or str(e))
    return TegakiError(f"could not {doing} {path}: {why}")


def explain_write_error(path: str | os.PathLike, e: Exception) -> TegakiError | None:
    """An error from a writer that is not an OSError but carries one (safetensors reports a full
    disk as "SafetensorError: ... os error 28"), explained like one; None when it is not that."""
    if isinstance(e, OSError):
        return explain_os_error(path, e)
    match = re.search(r"os error (\d+)", str(e))
    if match is None:
        return None
    code = int(match.group(1))
    return explain_os_error(path, OSError(code, os.strerror(code)))


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
    except Exception as e:
        tmp.unlink(missing_ok=True)
        explained = explain_write_error(path, e)
        if explained is None:
            raise
        raise explained from None
    except BaseException:  # a KeyboardInterrupt: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(temp_folder) to fill a folder, then put it in place of `path` by renames.

    The old folder, if any, steps aside as `.NAME.old` until the new one has its name, so a kill
    leaves the old folder or the new one (and a leftover beside it that the next call clears)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(f".{path.name}.old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        if old.exists() and not path.exists():
            os.replace(old, path)  # a kill between the two renames below: the old folder comes back
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        explained = explain_write_error(path, e)
        if explained is None:
            raise
        raise explained from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


class FolderLock:
    """One process at a time in a folder: `FOLDER/.lock` holds the PID of the process inside.

    The lock is a kernel lock (flock) on that file, so it ends with its process however the process
    ends (kill -9 included): a lock file left by a dead process is simply taken over. A second
    process is refused with the holder's PID. Use as a context manager, or acquire() / release()."""

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.what = what
        self.fd: int | None = None
        self.took_over: str | None = None  # the PID a dead holder left in the file, if any

    def acquire(self) -> FolderLock:
        while self.fd is None:
            fd = self._open()
            holder = _read_pid(fd)
            if not _try_lock(fd, holder):
                os.close(fd)
                raise TegakiError(
                    f"{self.folder} is in use: tegaki process {holder or '(unknown PID)'} is "
                    f"writing this {self.what} ({self.path}). Wait for it to finish, stop it, "
                    "or choose another folder"
                )
            if _same_file(fd, self.path):  # not removed by its last holder between our open and lock
                self.fd, self.took_over = fd, holder
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def _open(self) -> int:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise explain_os_error(self.folder, e, doing="use") from None

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: the next process makes a new one
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str | None:
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return text if text.isdigit() else None


def _try_lock(fd: int, holder: str | None) -> bool:
    """Take the kernel lock; where there is none (or the file system refuses it), trust the PID."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            pass  # a file system without flock (some network ones): the PID decides
    return holder is None or int(holder) == os.getpid() or not _alive(int(holder))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False

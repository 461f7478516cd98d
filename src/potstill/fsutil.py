"""Small file-system primitives every long job relies on: atomic writes, locks, hashes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota: leave no partial file, and say which file it was
        tmp.unlink(missing_ok=True)
        if exc.filename is None:
            exc.filename = str(path)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written `tmp_dir` into place as `final_dir`, replacing any old one."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes never prepare the same thing at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class LockHeld(Exception):
    """Another open lock holds the file: `pid` is the process that wrote its pid there (None if
    it has not yet, or the file holds none)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is locked by pid {pid}")
        self.path, self.pid = path, pid


def try_lock(path: Path) -> IO[str]:
    """Take an exclusive lock on `path` without waiting, and write this process's pid into it
    (for the message of whoever is refused next). The lock lasts until `unlock` or the end of the
    process, however it ends: the OS drops an flock with its last open file. Raises `LockHeld`.
    Each call opens its own file, so a second lock on one path is refused in one process too."""
    path = Path(path).absolute()  # `unlock(remove=True)` unlinks it by name, whatever the cwd
    while True:
        lock = open(path, "a+")  # noqa: SIM115 - the open file is the lock; `unlock` closes it
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise LockHeld(path, int(holder) if holder.isdigit() else None) from None
        if _same_file(lock, path):
            break
        # The holder removed the file between our open and our lock: we hold a file no one else
        # will open again, so lock the one now at `path` instead.
        lock.close()
    lock.truncate(0)  # "a+" writes at the end whatever the position: empty it first
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _same_file(lock: IO[str], path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(lock.fileno())
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def unlock(lock: IO[str], *, remove: bool = False) -> None:
    """Release a `try_lock`; `remove` deletes the lock file first (still holding it, so no one
    can take a lock on it that `try_lock`'s check would not catch)."""
    if lock.closed:
        return
    if remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock.name)
    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    lock.close()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

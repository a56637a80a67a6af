"""Files written whole or not at all: unique temporaries beside their target, renamed into place when complete.

A temporary is `{name}.tmp-{host}-{pid}-{random}`, created with O_EXCL (never an existing file or a planted
symlink); cleanup removes only temporaries that provably belong to no running process (this host's name, a pid that
is gone), so processes on other hosts sharing the directory over NFS never lose each other's files. Used by the
shard writer, the remote cache and anything else that writes a JSON record (`write_json_atomic`). Also the
file lock under which one process at a time prepares a run_dir or fetches into a cache (`exclusive`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout


@contextmanager
def exclusive(lock_path: Path, waiting: str, log: Callable[[str], None]) -> Iterator[None]:
    """Holds the file lock `lock_path`; when another process holds it, logs `waiting` once, then waits for it."""
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` as the file `path`: written to a temporary beside it, flushed to disk, renamed into place."""
    fd, tmp = temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "_"


_TMP = re.compile(r"(?P<final>.+)\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")
_LEGACY_TMP = re.compile(r"(?P<final>.+)\.tmp(?P<pid>\d+)")  # `{name}.tmp{pid}`, written before host names


def temporary(path: Path) -> tuple[int, Path]:
    """(open fd, path) of a new temporary beside `path`, for writing it and renaming it to `path`. mkstemp
    creates it with O_EXCL (and O_NOFOLLOW), so a file or symlink planted under the name is never written
    through; the name carries host and pid, for `remove_temporaries`. Readable by all like any other output."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-{_host()}-{os.getpid()}-")
    os.fchmod(fd, 0o644)
    return fd, Path(name)


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True  # os.kill(0) would mean the process group; our own temporaries are removed by their writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False  # no such pid can exist
    except PermissionError:
        return True  # another user's process
    return True


def stale_temporary(name: str) -> bool:
    """Whether `name` is a temporary of a process that is gone: made on this host by a pid not running. Another
    host's (a directory shared over NFS), or a live process's, are not."""
    m = _TMP.fullmatch(name)
    if m is not None and m["host"] != _host():
        return False
    m = m or _LEGACY_TMP.fullmatch(name)
    return m is not None and not _alive(int(m["pid"]))



def remove_temporaries(directory: Path, name: str) -> None:
    """Leftovers of killed runs for this split and slice: only those `stale_temporary` proves stale."""
    for p in directory.glob(f"{glob.escape(name)}.*.tmp*"):
        if stale_temporary(p.name):
            p.unlink(missing_ok=True)


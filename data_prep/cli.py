"""What the two command lines (`python -m data_prep`, `python -m pretrain`) share: how a command ends.

An error the user can fix is one line, `error: <message>` on stderr (the message names the file or key and the
fix), and a non-zero exit code; never a traceback. Anything else is a bug and keeps its traceback.

The operating system's refusals are the user's to fix too (a read-only or full disk, a run_dir that is a file),
but only those of `OS_ERRORS` and only when they name a path (`OSError.filename`): an OSError without one is
the code's (a socket, a pipe, a signal), with a single exception: a write that failed for want of space names
no file (`write()` and `fsync()` of an open file do not), and is never a bug, so it is one line too, also when
a library turned it into an error of its own (`torch.save` raises a RuntimeError in handling it). The commands
name what they were writing (`naming`).
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from .config import ConfigError
from .corpus import CorpusError
from .redact import redact_text
from .shards import ShardError
from .tokenizer import TokenizerError
from .workers import WorkerError

USER_ERRORS = (ConfigError, CorpusError, TokenizerError, ShardError, WorkerError, FileNotFoundError)
"""Errors of every command that the user fixes: exit code 2."""

_ELSEWHERE = "or point the config at another path"
OS_ERRORS = {
    errno.EACCES: f"permission denied; give this user access (chmod, chown) {_ELSEWHERE}",
    errno.EPERM: f"operation not permitted; give this user access (chmod, chown, chattr) {_ELSEWHERE}",
    errno.EROFS: f"read-only file system; make it writable {_ELSEWHERE} on a writable disk",
    errno.ENOSPC: "no space left on the device; free some (`df -h` shows it) or point the config at a larger "
                  "disk, then run again (finished steps are reused)",
    errno.EDQUOT: "disk quota exceeded; free some of your quota or point the config at another disk, then run "
                  "again (finished steps are reused)",
    errno.EFBIG: "file too large for the file system or the file size limit (`ulimit -f`); raise the limit "
                 f"{_ELSEWHERE} on another file system",
    errno.ENOTDIR: f"not a directory; move the file away {_ELSEWHERE}",
    errno.EISDIR: f"is a directory where a file was expected; move it away {_ELSEWHERE}",
}
"""errno -> what it means and what to do: the OSErrors that end a command with one line (exit 2)."""
SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error_line(e: OSError) -> str | None:
    """The one line for an `OS_ERRORS` refusal, naming its path; None for any other OSError (a bug: traceback).
    For ENOTDIR the line names the file that stands where a directory should be."""
    if e.errno not in OS_ERRORS or (e.filename is None and e.errno not in SPACE):
        return None
    if e.filename is None:
        return f"a write failed (the system named no file): {OS_ERRORS[e.errno]}"
    path = str(e.filename) if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    if e.errno == errno.ENOTDIR:
        target = Path(e.filename)
        blocker = next((p for p in [*reversed(target.parents), target] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            it = "it" if blocker == target else str(blocker)
            return f"{path}: not a directory ({it} is a file); move it away {_ELSEWHERE}"
    return f"{path}: {OS_ERRORS[e.errno]}"


def os_error_of(e: BaseException) -> OSError | None:
    """`e` itself when it is an OSError; else the failed write for want of space (`SPACE`) that it was raised in
    handling, if any: `torch.save` answers a failed write with RuntimeError("unexpected pos ...")."""
    if isinstance(e, OSError):
        return e
    cause, seen = e.__cause__ or e.__context__, 0
    while cause is not None and seen < 20:
        if isinstance(cause, OSError) and cause.errno in SPACE:
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """A failed write inside for want of space, which names no file (`write()` or `fsync()` of an open file:
    ENOSPC, EDQUOT, EFBIG), names `path`, what was being written. Other errors pass as they are."""
    try:
        yield
    except Exception as e:
        error = os_error_of(e)
        if error is not None and error.filename is None and error.errno in SPACE:
            error.filename = str(path)
        raise


TERMINATED = 143
"""The exit code of a command stopped by SIGTERM (128 + 15, as a shell reports it)."""


class Terminated(Exception):
    """SIGTERM arrived while a command that stops on it ran."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def run_command(body: Callable[[], int | None], errors: dict[type[BaseException], int] | None = None,
                stop_on_sigterm: bool = False) -> int:
    """The exit code of `body()` (0 when it returns None). A `USER_ERRORS` error (exit 2), one of `errors` (type
    -> exit code; the most specific type of the error decides) or an `OS_ERRORS` refusal of the operating system
    (exit 2, `os_error_line`) is printed as one line; Ctrl-C is `interrupted`, 130, as a shell reports SIGINT.
    With `stop_on_sigterm` (data preparation: nothing to save), SIGTERM (a job's time limit, `scancel`, `kill`)
    ends the command as Ctrl-C does, its temporary files removed on the way out: `terminated`, 143.
    Training leaves SIGTERM to its preemption save (pretrain/training/checkpoint.py)."""
    codes: dict[type[BaseException], int] = {kind: 2 for kind in USER_ERRORS} | (errors or {})
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if stop_on_sigterm else None
    try:
        return body() or 0
    except tuple(codes) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)  # a URL in a message never shows its credentials
        return next(codes[kind] for kind in type(e).__mro__ if kind in codes)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return TERMINATED
    except Exception as e:
        error = os_error_of(e)
        line = os_error_line(error) if error is not None else None
        if line is None:
            raise  # a bug: its traceback
        print(f"error: {redact_text(line)}", file=sys.stderr)
        return 2
    finally:
        if stop_on_sigterm:
            signal.signal(signal.SIGTERM, previous)

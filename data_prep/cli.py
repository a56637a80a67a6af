"""What the two command lines (`python -m data_prep`, `python -m pretrain`) share: how a command ends.

An error the user can fix is one line, `error: <message>` on stderr (the message names the file or key and the
fix), and a non-zero exit code; never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from .config import ConfigError
from .corpus import CorpusError
from .shards import ShardError
from .tokenizer import TokenizerError
from .workers import WorkerError

USER_ERRORS = (ConfigError, CorpusError, TokenizerError, ShardError, WorkerError, FileNotFoundError)
"""Errors of every command that the user fixes: exit code 2."""


TERMINATED = 143
"""The exit code of a command stopped by SIGTERM (128 + 15, as a shell reports it)."""


class Terminated(Exception):
    """SIGTERM arrived while a command that stops on it ran."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def run_command(body: Callable[[], int | None], errors: dict[type[BaseException], int] | None = None,
                stop_on_sigterm: bool = False) -> int:
    """The exit code of `body()` (0 when it returns None). A `USER_ERRORS` error (exit 2) or one of `errors` (type
    -> exit code; the most specific type of the error decides) is printed as one line; Ctrl-C is `interrupted`,
    130, as a shell reports SIGINT. With `stop_on_sigterm` (data preparation: nothing to save), SIGTERM (a job's
    time limit, `scancel`, `kill`) ends the command as Ctrl-C does, its temporary files removed on the way out:
    `terminated`, 143. Training leaves SIGTERM to its preemption save (pretrain/checkpoint.py)."""
    codes: dict[type[BaseException], int] = {kind: 2 for kind in USER_ERRORS} | (errors or {})
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if stop_on_sigterm else None
    try:
        return body() or 0
    except tuple(codes) as e:
        print(f"error: {e}", file=sys.stderr)
        return next(codes[kind] for kind in type(e).__mro__ if kind in codes)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return TERMINATED
    finally:
        if stop_on_sigterm:
            signal.signal(signal.SIGTERM, previous)

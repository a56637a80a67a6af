"""Worker processes that apply one function to a stream of tasks, results in order, and never hang.

`concurrent.futures.ProcessPoolExecutor` shares one result pipe among its workers, and the parent holds a write
end of it too. A worker killed while it sends a result (SIGTERM to a SLURM job step or the OOM killer, which both
reach workers) leaves the executor reading the rest of that message for ever, and a parent that then waits for
the pool, or exits (the interpreter joins the executor's thread), hangs with it. Seen: `python -m data_prep data`
under SIGTERM to its process group.

Workers start before they know their function: `WorkerPool(n, preload=...)` spawns them at once (each imports the
modules named, in parallel with whatever the parent does next), and `initialize(init, args)` later sends each one
`init` and its arguments through its task queue, whose feeder thread sends them: the parent never waits for a
worker to start. (A spawned process reads its arguments only after it has imported the parent's main module, so
big arguments given at `Process` creation held the parent for each worker's start-up in turn: 0.8 s for two.)
`initialize` may come again once every result is read: the workers then apply the new function.

Here each worker has a task queue and a result pipe of its own, and holds that pipe's only write end: a worker's
death is end-of-file to the parent, at once, whatever it was doing. The parent sends task k to worker k mod n and
reads result k from it, so results come in submission order. A worker ignores Ctrl-C (the parent acts on it and
stops the pool) and ends by itself when its parent is gone (SIGKILL gives the parent no chance to stop it).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple


class WorkerError(RuntimeError):
    """A worker process died: `pid`, `exitcode` (negative: the signal that killed it)."""

    def __init__(self, message: str, pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.pid, self.exitcode = pid, exitcode


class WorkerFailed(RuntimeError):
    """The function raised in a worker; the message holds the worker's traceback."""


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def peak_rss_bytes() -> int:
    """This process's peak resident set: `VmHWM` on Linux. Not `ru_maxrss`, which a spawned process inherits from
    the fork that precedes its exec, so a worker of a big parent reported the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux (bytes on macOS: rarer)


class _Init(NamedTuple):
    """A message that (re)makes a worker's function: `init(*args)`."""

    init: Callable[..., Callable[[Any], Any]]
    args: tuple


def _worker_main(preload: tuple[str, ...], tasks: Any, results: Any, parent: int) -> None:
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="exit-with-parent").start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C that came while it started (blocked) is discarded
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    for name in preload:
        importlib.import_module(name)
    function: Callable[[Any], Any] | None = None
    while (task := tasks.get()) is not None:
        if isinstance(task, _Init):  # an exception here ends the worker: the parent sees it die
            function = task.init(*task.args)
            continue
        assert function is not None, "a task before the pool was initialized"
        try:
            result = ("ok", function(task))
        except Exception:
            result = ("error", traceback.format_exc())
        results.send(result)
    results.send(("peak", peak_rss_bytes()))  # asked to finish: the last word


class WorkerPool:
    """`num_proc` spawned processes, each running `init(*init_args)` once for the function it then applies to its
    tasks (given here, or later to `initialize`; `preload`: modules each worker imports as it starts). `submit`
    and `result` alternate freely; results come in submission order. Use as a context manager: leaving it
    normally lets the workers finish and end; leaving it by an exception (Ctrl-C, SIGTERM, an error) kills them,
    since nothing they do then is wanted."""

    def __init__(self, num_proc: int, init: Callable[..., Callable[[Any], Any]] | None = None, init_args: tuple = (),
                 preload: tuple[str, ...] = ()) -> None:
        context = mp.get_context("spawn")  # not fork: the parent may hold tokenizer threads
        self._workers: list[tuple[Any, Any, Any]] = []  # (process, task queue, result reader)
        self.peak_rss_bytes = 0  # the largest worker's peak resident set, once the workers finished (`close`)
        self._submitted = self._received = 0
        for _ in range(num_proc):
            tasks = context.Queue()  # its feeder thread sends, so the parent never blocks on a full pipe
            tasks.cancel_join_thread()  # a dead worker's unread tasks must not hold up the parent's exit
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_worker_main, args=(tuple(preload), tasks, writer, os.getpid()),
                                      daemon=True)
            # started with Ctrl-C blocked until it ignores it: a Ctrl-C while the worker was still importing
            # printed a KeyboardInterrupt traceback from it (seen in the group-signal test on a loaded machine)
            blocked = (signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                       if hasattr(signal, "pthread_sigmask") else None)
            try:
                process.start()
            finally:
                if blocked is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            writer.close()  # the worker's is the only write end left: its death is end-of-file here
            self._workers.append((process, tasks, reader))
        if init is not None:
            self.initialize(init, init_args)

    def initialize(self, init: Callable[..., Callable[[Any], Any]], init_args: tuple = ()) -> None:
        """Each worker's function from now on: `init(*init_args)`, run in the worker (before any task submitted
        after this call; none may be in flight)."""
        assert self._received == self._submitted, "results in flight"
        for _, tasks, _ in self._workers:
            tasks.put(_Init(init, init_args))

    @property
    def num_proc(self) -> int:
        return len(self._workers)

    @property
    def in_flight(self) -> int:
        return self._submitted - self._received

    def submit(self, task: Any) -> None:
        self._workers[self._submitted % len(self._workers)][1].put(task)
        self._submitted += 1

    def result(self) -> Any:
        """The result of the oldest task not yet returned."""
        assert self._received < self._submitted, "no task in flight"
        process, _, reader = self._workers[self._received % len(self._workers)]
        try:
            kind, value = reader.recv()  # ("ok", result) or ("error", traceback)
        except (EOFError, OSError):
            process.join(timeout=5)
            raise WorkerError(f"worker process {process.pid} died (exit code {process.exitcode})", process.pid,
                              process.exitcode) from None
        self._received += 1
        if kind != "ok":
            raise WorkerFailed(f"in worker process {process.pid}:\n{value}")
        return value

    def close(self, finish: bool) -> None:
        """End the workers: let them finish and exit (`finish`, once every result is read: a worker with results
        unread could block sending them), or kill them."""
        assert not finish or self._received == self._submitted, "results left unread"
        for process, tasks, _ in self._workers:
            if finish and process.is_alive():
                tasks.put(None)
            elif process.is_alive():
                process.kill()
        for process, tasks, reader in self._workers:
            if finish:
                try:
                    kind, value = reader.recv()
                    if kind == "peak":
                        self.peak_rss_bytes = max(self.peak_rss_bytes, value)
                except (EOFError, OSError):
                    pass  # it had died: nothing to report
            process.join()
            reader.close()
            if finish:  # a killed worker's queue stays open: its feeder thread may be writing to the dead worker,
                tasks.close()  # and closing our read end would turn that into a BrokenPipeError traceback
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(finish=exc_type is None)

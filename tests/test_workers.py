"""The worker pool of data preparation (data_prep/workers.py): results in order, a failure or a death reported at
once, and no worker left behind however the pool is left."""

from __future__ import annotations

import os
import signal

import pytest

from data_prep.workers import WorkerError, WorkerFailed, WorkerPool


def _square_or_fail(offset: int):
    def apply(task: int) -> tuple[int, int]:
        if task < 0:
            raise ValueError(f"negative task {task}")
        return os.getpid(), task * task + offset
    return apply


def test_workers_start_before_their_function_and_take_a_new_one_between_streams() -> None:
    """`initialize` after the start (the workers import `preload` meanwhile), and again once every result is read:
    every task runs the function that was current when it was submitted."""
    with WorkerPool(2, preload=("json",)) as pool:
        pool.initialize(_square_or_fail, (1,))
        for k in range(4):
            pool.submit(k)
        got = [pool.result()[1] for _ in range(4)]
        pool.initialize(_square_or_fail, (100,))
        for k in range(3):
            pool.submit(k)
        got += [pool.result()[1] for _ in range(3)]
    assert got == [1, 2, 5, 10, 100, 101, 104]


def test_results_come_in_submission_order_from_every_worker() -> None:
    with WorkerPool(3, _square_or_fail, (1,)) as pool:
        got = []
        for k in range(20):
            pool.submit(k)
            if k >= 5:
                got.append(pool.result())
        got += [pool.result() for _ in range(5)]
        processes = [process for process, _, _ in pool._workers]
    assert [value for _, value in got] == [k * k + 1 for k in range(20)]
    assert len({pid for pid, _ in got}) == 3
    assert all(not p.is_alive() and p.exitcode == 0 for p in processes)  # finished and ended by themselves


def test_an_exception_in_a_worker_is_reported_with_its_traceback_and_the_pool_goes_on() -> None:
    with WorkerPool(2, _square_or_fail, (0,)) as pool:
        pool.submit(-3)
        pool.submit(4)
        with pytest.raises(WorkerFailed, match=r"(?s)ValueError: negative task -3"):
            pool.result()
        assert pool.result()[1] == 16


def test_a_dead_worker_is_an_error_at_once_and_leaving_by_an_error_kills_the_rest() -> None:
    with pytest.raises(WorkerError) as caught:
        with WorkerPool(2, _square_or_fail, (0,)) as pool:
            processes = [process for process, _, _ in pool._workers]
            pool.submit(1)
            pool.result()  # both are up
            os.kill(processes[1].pid, signal.SIGKILL)
            pool.submit(2)  # to worker 1, dead
            pool.result()
    assert caught.value.pid == processes[1].pid and caught.value.exitcode == -signal.SIGKILL
    assert not processes[0].is_alive() and processes[0].exitcode == -signal.SIGKILL  # killed on the way out


def test_a_worker_reports_its_own_peak_memory_not_its_parents() -> None:
    """A spawned process's ru_maxrss includes the fork before its exec, so the old report ('largest worker')
    showed the parent's peak; the pool reports VmHWM."""
    import numpy as np

    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB resident in the parent
    with WorkerPool(2, _square_or_fail, (0,)) as pool:
        pool.submit(3)
        assert pool.result()[1] == 9
        pool.close(finish=True)
    assert 0 < pool.peak_rss_bytes < 200 * 2**20 < ballast.nbytes


class _OneThatPressesCtrlC(int):
    """The int 1, which sends SIGINT to the process that unpickles it: in a worker, as it starts, before its main
    function runs (a Ctrl-C at that moment)."""

    def __new__(cls) -> _OneThatPressesCtrlC:
        return super().__new__(cls, 1)

    def __reduce__(self):  # noqa: ANN204 - rebuilt in the worker through __setstate__
        return (_OneThatPressesCtrlC, (), {})

    def __setstate__(self, state: dict) -> None:
        os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_that_reaches_a_worker_while_it_starts_is_ignored() -> None:
    """Workers start with Ctrl-C blocked until they ignore it: one still importing when the terminal's SIGINT
    reached the process group died with a KeyboardInterrupt traceback (the group-signal test, loaded machine)."""
    with WorkerPool(2, _square_or_fail, (_OneThatPressesCtrlC(),)) as pool:
        for k in range(4):
            pool.submit(k)
        assert [value for _, value in (pool.result() for _ in range(4))] == [k * k + 1 for k in range(4)]

"""The one thread clamp: run a block of torch work on one intra-op thread, safely under Python threads.

Why clamp at all: the compiler, the planners and small kernel calls are many
tiny torch ops; waking the intra-op pool costs more than it saves, and on a
busy machine every parallel region can wait a whole scheduler slice.

Why one home: ``torch.set_num_threads`` is process state in a subtle way. With
torch's OpenMP backend (the CPU wheels) it sets the *calling* thread's OpenMP
count, MKL's global count and the default of threads created later. A naive
``before = get(); set(1); ...; set(before)`` in two Python threads at once can
then save a count another thread's clamp had lowered and "restore" 1 for good.
This clamp never saves a count of 1 (a thread already on one thread has
nothing to clamp and nothing to restore), pairs every read with its write
under one lock, and restores the count its own thread had, so after any
interleaving each caller finds ``torch.get_num_threads()`` as it left it.
Results never depend on the thread count (the kernels split work by rows and
heads, never a reduction), so a clamp another thread lifts early costs speed,
not bits.

:func:`run_tasks` runs independent pieces of work (the heads of a per-head mask
list on the ATen path; the fused kernel's jobs where torch's OpenMP runtime is
not found, or in a forked child: the kernel otherwise runs on torch's own
OpenMP team, see ``engines/fused.py``) on as many Python threads as torch has intra-op threads, each on ONE
intra-op thread: small kernel calls gain little from a second intra-op thread
(measured: nine per-head problems at L = 1024 ran 11.1 ms on one thread, 9.9 on
two), while two such calls side by side on two cores take the time of one. The
kernels release the GIL; each worker pins its own count once, when it starts.

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with single_thread():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
"""

from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["single_thread", "threads_for", "run_tasks"]

_lock = threading.Lock()

#: Below this many scores a whole call runs on one thread (waking the pool costs more).
SMALL_WORK = 1 << 18
#: The same rule per kernel call inside a larger call. Measured on a quiet machine, two
#: threads already halve a 64 x 64 x 8-head call (64 vs 118 us), so only tiny calls stay on one.
SMALL_OP = 1 << 15


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block on one torch intra-op thread; the caller's count is restored after.

    ``enabled=False`` makes it a no-op (so call sites can say ``single_thread(work < limit)``).

        >>> with single_thread(False):
        ...     pass
    """
    if not enabled:
        yield
        return
    with _lock:
        before = torch.get_num_threads()
        if before != 1:
            torch.set_num_threads(1)
    if before == 1:
        yield
        return
    try:
        yield
    finally:
        with _lock:
            torch.set_num_threads(before)


def threads_for(work: int, limit: int = SMALL_WORK):
    """The clamp for a call of ``work`` scores: one thread below ``limit``, else untouched.

        >>> with threads_for(10):
        ...     torch.get_num_threads()
        1
    """
    return single_thread(work < limit and torch.get_num_threads() > 1)


class _Workers:
    """Daemon threads, each pinned to one intra-op thread, taking jobs from one queue.

    The pool only grows (:meth:`grow`), to the largest count ever asked for, and is never
    rebuilt in one process: calls that ask for different counts share it, so no thread is
    left behind waiting on a queue nobody feeds.
    """

    def __init__(self):
        self.n, self.pid = 0, os.getpid()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()

    def grow(self, n: int) -> None:
        if n <= self.n:
            return
        ready = threading.Barrier(n - self.n + 1)
        for i in range(self.n, n):
            threading.Thread(target=self._loop, args=(ready,), name=f"attnmask-worker-{i}", daemon=True).start()
        ready.wait()
        self.n = n
        with _lock:
            # A worker's set_num_threads(1) also set the default of threads created later;
            # give that default back (this thread's own count is unchanged by it).
            torch.set_num_threads(torch.get_num_threads())

    def _loop(self, ready: threading.Barrier) -> None:
        with _lock:
            torch.get_num_threads()          # this thread's lazy init now, so it keeps the 1 set next
            torch.set_num_threads(1)
        ready.wait()
        while True:
            self.jobs.get()()


_workers: _Workers | None = None
_workers_lock = threading.Lock()


def _pool(n: int) -> _Workers:
    """The process's worker pool with at least ``n`` workers (a forked child gets a new one)."""
    global _workers
    with _workers_lock:
        if _workers is None or _workers.pid != os.getpid():
            _workers = _Workers()            # (a forked child has the object but not its threads)
        _workers.grow(n)
        return _workers


def run_tasks(tasks: Sequence[Callable[[], None]], costs: Sequence[float]) -> None:
    """Run independent tasks (disjoint outputs) side by side, each on one intra-op thread, costliest first.

    With ``torch.get_num_threads()`` = n > 1, n workers take the tasks in order of decreasing
    ``costs`` (each takes the next when it is done: longest first), under ``torch.no_grad()``,
    while the caller waits; with n = 1, or one task, they run here in order.
    The results do not depend on which thread ran what (the tasks write disjoint outputs,
    and no kernel's bits depend on its thread count). The first exception is raised here
    once every task has finished.

        >>> out = [0] * 4
        >>> run_tasks([lambda i=i: out.__setitem__(i, i * i) for i in range(4)], [1, 4, 2, 3])
        >>> out
        [0, 1, 4, 9]
    """
    n = min(torch.get_num_threads(), len(tasks))
    if n <= 1:
        for task in tasks:
            task()
        return
    order = sorted(range(len(tasks)), key=lambda i: -costs[i])
    lock = threading.Lock()
    nxt = [0]
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def drain() -> None:
        try:
            with torch.no_grad():
                while True:
                    with lock:
                        if nxt[0] >= len(order) or errors:
                            return
                        i = order[nxt[0]]
                        nxt[0] += 1
                    try:
                        tasks[i]()
                    except BaseException as exc:          # noqa: BLE001 (re-raised by the caller)
                        with lock:
                            errors.append(exc)
        finally:
            done.release()

    # The caller only waits: taking tasks itself under single_thread() measured slower (each
    # clamp sets the count twice), 12.5 against 8.6 ms for nine head problems at L = 1024.
    pool = _pool(n)
    for _ in range(n):
        pool.jobs.put(drain)
    for _ in range(n):
        done.acquire()
    if errors:
        raise errors[0]

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

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with single_thread():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["single_thread", "threads_for"]

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

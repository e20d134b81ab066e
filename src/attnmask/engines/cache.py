"""A least-recently-used cache bounded in bytes: the engines' plans live in these.

A model calls attention with many (mask, shape) combinations (30 layers x 9
per-head masks x a few lengths is ~800 plans); a cache bounded by a count
either evicts what the next layer needs or holds an unknown amount of memory.
Each entry states its size, and the cache evicts the oldest entries past its
byte budget. Entries may also name *shared* tensors (a partial-tile mask that
the plans of one mask at every length hold): each is counted once, for as long
as some entry holds it, so the total is the memory the entries really keep.
Values derived from a shared tensor (its additive float copy) are kept with it
(:meth:`ByteLRU.derived`): made once for all the entries that hold it, counted
when made, and dropped with it.

    >>> c = ByteLRU(100)
    >>> c.put("a", "plan a", 60); c.put("b", "plan b", 60)
    >>> c.get("a") is None, c.get("b"), c.nbytes
    (True, 'plan b', 60)
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import Any, Hashable

import torch

__all__ = ["ByteLRU", "tensor_bytes", "interned"]

#: Live tensors by content (shape, dtype, digest of their bytes); an entry goes when its tensor does.
_pool: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
_pool_lock = threading.Lock()


def interned(t: torch.Tensor) -> torch.Tensor:
    """One tensor object for equal contents: ``t``, or a live tensor equal to it (CPU tensors).

    The plans of one mask at several lengths, and of masks that share tiles (every causal
    window has the same diagonal tile), hold equal partial-tile masks; interned, they hold
    one, and a :class:`ByteLRU` counts it once.

        >>> a, b = torch.ones(3, 3, dtype=torch.bool).tril(), torch.ones(3, 3, dtype=torch.bool).tril()
        >>> one = interned(a)                 # a, or an equal tensor some plan already holds
        >>> interned(b) is one, torch.equal(one, b)
        (True, True)
    """
    key = (tuple(t.shape), t.dtype, hashlib.blake2b(t.numpy().tobytes(), digest_size=16).digest())
    with _pool_lock:
        hit = _pool.get(key)
        if hit is not None and torch.equal(hit, t):
            return hit
        _pool[key] = t
        return t


def tensor_bytes(*tensors) -> int:
    """Bytes held by tensors (None entries and lists of tensors allowed).

        >>> tensor_bytes(torch.zeros(4, dtype=torch.float32), None, [torch.zeros(2, dtype=torch.bool)])
        18
    """
    total = 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, (list, tuple)):
            total += tensor_bytes(*t)
        else:
            total += t.numel() * t.element_size()
    return total


class ByteLRU:
    """Entries with a size in bytes; the oldest go first once the total passes ``budget``.

    Thread-safe (one lock; values are built outside it, so two threads may build
    the same entry once each, which is harmless for immutable plans). An entry
    larger than the whole budget is not kept.

        >>> c = ByteLRU(1 << 20)
        >>> c.put(("mask", 1024), [1, 2], 128)
        >>> c.get(("mask", 1024))
        [1, 2]
    """

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._items: "OrderedDict[Hashable, tuple[Any, int, tuple]]" = OrderedDict()
        # id(tensor) -> [entries holding it, bytes (its own and its derived values'), tensor, {key: derived}]
        self._shared: dict[int, list] = {}
        self.nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value, nbytes: int, shared=()) -> None:
        """Keep ``value`` at ``nbytes`` of its own plus ``shared``: (tensor, bytes) pairs counted
        once across all entries that hold the same tensor object.

            >>> c, t = ByteLRU(1000), torch.zeros(100, dtype=torch.bool)
            >>> c.put("a", 1, 10, [(t, 500)]); c.put("b", 2, 10, [(t, 500)])
            >>> c.nbytes, len(c)
            (520, 2)
        """
        nbytes = int(nbytes)
        shared = tuple((t, int(n)) for t, n in shared)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._drop(old)
            if nbytes + sum(n for _, n in shared) > self.budget:      # alone it would not fit
                return
            self._items[key] = (value, nbytes, tuple(t for t, _ in shared))
            self.nbytes += nbytes
            for t, n in shared:
                hold = self._shared.get(id(t))
                if hold is None:
                    self._shared[id(t)] = [1, n, t, {}]
                    self.nbytes += n
                else:
                    hold[0] += 1
            self._evict()

    def derived(self, t: torch.Tensor, key: Hashable, build):
        """``build()``, a tensor made from the shared tensor ``t``, made once while some entry holds ``t``.

        Kept (and its bytes counted) with ``t`` until the last entry holding ``t`` goes, so every
        entry that shares ``t`` shares it. When no entry holds ``t`` (never put, or evicted) it is
        built and returned, not kept.

            >>> c, t = ByteLRU(1000), torch.zeros(100, dtype=torch.bool)
            >>> c.put("a", 1, 10, [(t, 100)]); c.put("b", 2, 10, [(t, 100)])
            >>> f = c.derived(t, torch.float32, lambda: t.float())
            >>> c.derived(t, torch.float32, lambda: t.float()) is f, c.nbytes
            (True, 520)
            >>> c.put("a", 1, 10); c.put("b", 2, 10); c.nbytes           # t's last holders gone: f too
            20
        """
        with self._lock:
            hold = self._shared.get(id(t))
            if hold is not None and key in hold[3]:
                return hold[3][key]
        value = build()                                 # outside the lock (see the class docstring)
        with self._lock:
            hold = self._shared.get(id(t))
            if hold is None:
                return value
            if key not in hold[3]:
                hold[3][key] = value
                n = tensor_bytes(value)
                hold[1] += n
                self.nbytes += n
                self._evict()
            return hold[3][key]

    def _evict(self) -> None:
        while self.nbytes > self.budget and len(self._items) > 1:
            _, entry = self._items.popitem(last=False)
            self._drop(entry)

    def _drop(self, entry: tuple) -> None:
        self.nbytes -= entry[1]
        for t in entry[2]:
            hold = self._shared[id(t)]
            hold[0] -= 1
            if hold[0] == 0:
                del self._shared[id(t)]
                self.nbytes -= hold[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._shared.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

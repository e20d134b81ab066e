"""A least-recently-used cache bounded in bytes: the engines' plans live in these.

A model calls attention with many (mask, shape) combinations (30 layers x 9
per-head masks x a few lengths is ~800 plans); a cache bounded by a count
either evicts what the next layer needs or holds an unknown amount of memory.
Each entry states its size, and the cache evicts the oldest entries past its
byte budget.

    >>> c = ByteLRU(100)
    >>> c.put("a", "plan a", 60); c.put("b", "plan b", 60)
    >>> c.get("a") is None, c.get("b"), c.nbytes
    (True, 'plan b', 60)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

import torch

__all__ = ["ByteLRU", "tensor_bytes"]


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
        self._items: "OrderedDict[Hashable, tuple[Any, int]]" = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value, nbytes: int) -> None:
        nbytes = int(nbytes)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if nbytes > self.budget:
                return
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.budget:
                _, (_, n) = self._items.popitem(last=False)
                self.nbytes -= n

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

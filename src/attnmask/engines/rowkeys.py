"""Which keys one query position attends, as sorted disjoint intervals, read off the mask's structure.

A decode step asks, per head, which of the cache's keys its query row attends. Evaluating
the mask on the row's Lk cells costs a few torch calls per node of the mask's tree (about
0.5 ms a step for nine per-head masks on the project's machine), and a cache that grows by
one key a step changes Lk every step, so nothing can be cached by shape. Here the answer
is a short list of key intervals ``[(a, b), ...]`` (``a <= k < b``), built from what each
subtree depends on, with no torch call in the common case:

- a subtree of one axis (structure class Q, K or D: ``causal & sliding(64)``, ``sink(4)``,
  ``rows(0, 40)``) is evaluated once on its axis (query positions, key positions or offsets
  ``q - k``) and kept as intervals of that axis, for a range that doubles when a later call
  needs more; a row then maps and clips them (kept in the mask's row program, one per mask
  object in the byte-bounded ``programs`` cache, never on the nodes);
- a SEG primitive gives the query's segment (its ``segments`` hook), a RECT primitive the
  keys of a one-query range (``key_ranges``, used when every range it names is FULL), a
  primitive that lowers to an expression is read through that expression;
- ``|``, ``&``, ``-`` and ``~`` combine interval lists.

What it cannot describe cheaply gives None and the caller evaluates the mask instead: a
``from_mask_mod`` leaf, or an axis pattern of more than ``MAX_INTERVALS`` intervals
(``strided(2)`` over a long cache).

    >>> import attnmask as am
    >>> row_keys(am.causal & (am.sliding(4) | am.sink(2)), 99, 100)
    [(0, 2), (96, 100)]
    >>> row_keys(am.causal & am.chunked(16), 40, 100), row_keys(am.cols(0, 9, 2), 5, 6)
    ([(32, 41)], [(0, 1), (2, 3), (4, 5)])
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np
import torch

from ..kinds import StructureClass, TileState
from ..masks import Complement, Difference, Intersection, Mask, Primitive, Union
from .cache import ByteLRU

__all__ = ["row_keys", "merge_intervals", "MAX_INTERVALS"]

#: An axis pattern with more intervals than this (within the range asked) is not described.
MAX_INTERVALS = 256

Intervals = list  # list[tuple[int, int]]: sorted, disjoint, never touching


#: Row programs by mask object, bounded in bytes (:meth:`_Program.nbytes`). An entry holds its mask,
#: so the id names that one object while the entry lives; a decode loop passes the same mask objects
#: step after step. Nothing is kept on the mask nodes themselves (frozen values, shared by any number
#: of masks and plans).
programs = ByteLRU(16 << 20)

#: Bytes counted per node of a program (its closure) and per cached axis interval (a tuple of two
#: ints in a list, ~120 bytes in CPython).
_NODE_BYTES = 512
_INTERVAL_BYTES = 128


def row_keys(mask: Mask, p: int, n: int) -> Intervals | None:
    """The keys in ``[0, n)`` that query position ``p`` attends under ``mask``, or None (evaluate instead).

    Exact wherever it answers: ``row_keys(m, p, n)`` lists the True runs of
    ``m.evaluate(p, arange(n))`` (tests/test_rowkeys.py holds it to the dense oracle).
    """
    if n <= 0:
        return []
    prog = programs.get(id(mask))
    fresh = prog is None or prog.mask is not mask
    if fresh:
        prog = _Program(mask)
    grown = prog.grown
    out = prog.run(p, n)
    if fresh or prog.grown != grown:             # new, or an axis reached further: (re)count its bytes
        programs.put(id(mask), prog, prog.nbytes())
    return None if out is None else list(out)      # a copy: axis runs are cached in the program


class _Program:
    """One mask's row: ``run(p, n)`` -> intervals or None, a closure per node made once (a decode
    step calls it for every head's mask: a closure per node costs a fraction of walking the tree's
    types), and the runs its one-axis subtrees cached (``axes``), for a range that doubles when a
    later call needs more (``grown`` counts those evaluations)."""

    def __init__(self, mask: Mask):
        self.mask = mask
        self.nodes = 0
        self.axes: list[list] = []                   # per one-axis subtree: [(lo, hi, runs or None)]
        self.grown = 0
        self.run = self._make(mask, {})

    def nbytes(self) -> int:
        return _NODE_BYTES * self.nodes + sum(_INTERVAL_BYTES * len(a[0][2] or ()) for a in self.axes if a[0])

    def _make(self, node: Mask, memo: dict):
        """``f(p, n)``: the node's row as intervals, or None; one per node object of the tree."""
        hit = memo.get(id(node))
        if hit is None:
            hit = memo[id(node)] = self._build(node, memo)
            self.nodes += 1 + (len(node.args) // 16 if isinstance(node, Primitive) else 0)
        return hit

    def _build(self, node: Mask, memo: dict):
        c = node.structure_class()
        if c is StructureClass.K:
            axis = self._axis(node, c)
            return lambda p, n: axis(0, n)
        if c is StructureClass.D:
            axis = self._axis(node, c)

            def offsets(p, n):
                runs = axis(p - n + 1, p + 1)              # offsets p - k for k in [0, n)
                if runs is None:
                    return None
                # offsets [a, b) are keys (p - b, p - a], ascending once reversed; inside [0, n) already
                return [(p - b + 1, p - a + 1) for a, b in reversed(runs)]
            return offsets
        if c is StructureClass.Q:
            axis = self._axis(node, c)

            def query(p, n):
                runs = axis(p, p + 1)
                return None if runs is None else ([(0, n)] if runs else [])
            return query
        if c is StructureClass.CONST:
            zero = torch.zeros((), dtype=torch.int64)
            on = bool(node.evaluate(zero, zero))
            return (lambda p, n: [(0, n)]) if on else (lambda p, n: [])
        if isinstance(node, Union):
            parts = [self._make(x, memo) for x in node.parts]

            def union(p, n):
                got = []
                for part in parts:
                    x = part(p, n)
                    if x is None:
                        return None
                    got += x
                return merge_intervals(got)
            return union
        if isinstance(node, Intersection):
            first, rest = self._make(node.parts[0], memo), [self._make(x, memo) for x in node.parts[1:]]

            def intersection(p, n):
                out = first(p, n)
                for part in rest:
                    if not out:
                        return out                  # None: cannot say; []: empty whatever the rest is
                    x = part(p, n)
                    out = None if x is None else _intersect(out, x)
                return out
            return intersection
        if isinstance(node, Difference):
            left, right = self._make(node.left, memo), self._make(node.right, memo)

            def difference(p, n):
                a = left(p, n)
                if not a:
                    return a
                b = right(p, n)
                return None if b is None else _intersect(a, _complement(b, n))
            return difference
        if isinstance(node, Complement):
            inner = self._make(node.inner, memo)

            def complement(p, n):
                x = inner(p, n)
                return None if x is None else _complement(x, n)
            return complement
        if isinstance(node, Primitive):
            if c is StructureClass.SEG:
                return _segment_row(node.kind.segments(node.args))
            if c is StructureClass.RECT:
                return lambda p, n: _rect_row(node, p, n)
            lowered = node.lowered()
            if lowered is not None:
                return self._make(lowered, memo)
        return lambda p, n: None                          # a mask_mod leaf, or anything else opaque

    def _axis(self, node: Mask, c: StructureClass):
        """``f(lo, hi)``: the node's True runs on its one axis within [lo, hi) (None: too many), from
        runs evaluated once over a range that doubles when a call reaches past it."""
        cell: list = [None]                               # [(lo, hi, runs)]: one tuple, swapped whole
        self.axes.append(cell)

        def axis(lo: int, hi: int) -> Intervals | None:
            hit = cell[0]
            if hit is not None and hit[0] <= lo and hi <= hit[1]:
                runs = hit[2]
            else:
                reach = max(1024, abs(lo), abs(hi)) if hit is None else max(2 * hit[1], abs(lo), abs(hi))
                reach = 1 << (reach - 1).bit_length()
                runs = _runs(node, c, -reach, reach)
                cell[0] = (-reach, reach, runs)
                self.grown += 1
            if runs is None:
                return None
            out = _clip(runs, lo, hi)
            return out if len(out) <= MAX_INTERVALS else None
        return axis


def _segment_row(seg):
    def row(p: int, n: int) -> Intervals:
        if seg.real is not None and not seg.real[0] <= p < seg.real[1]:
            return []
        s = seg.of(np.array([p], dtype=np.int64))
        return _clip([(int(seg.start(s)[0]), int(seg.end(s)[0]))], 0, n)
    return row


def _rect_row(node: Primitive, p: int, n: int) -> Intervals | None:
    owner, lo, hi, state = node.kind.key_ranges(node.args, np.array([p], dtype=np.int64),
                                                np.array([p + 1], dtype=np.int64))
    if len(state) > MAX_INTERVALS or not bool((state == int(TileState.FULL)).all()):
        return None
    return _clip(merge_intervals(list(zip(lo.tolist(), hi.tolist()))), 0, n)


def _runs(node: Mask, c: StructureClass, lo: int, hi: int) -> Intervals | None:
    x = torch.arange(lo, hi, dtype=torch.int64)
    zero = torch.zeros(1, dtype=torch.int64)
    on = node.evaluate(zero, x) if c is StructureClass.K else node.evaluate(x, zero)   # Q: q = x; D: q - k = x
    edges = torch.diff(on.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    if len(starts) > 4 * MAX_INTERVALS:       # the whole cached range: a generous bound, clipped per call
        return None
    return [(lo + a, lo + b) for a, b in zip(starts.tolist(), ends.tolist())]


# -- interval lists ---------------------------------------------------------------------------------

def _clip(runs: Intervals, lo: int, hi: int) -> Intervals:
    """The parts of ``runs`` inside [lo, hi)."""
    if not runs:
        return []
    if runs[0][0] >= lo and runs[-1][1] <= hi:
        return runs
    i = bisect_right(runs, (lo, float("inf")))
    if i > 0 and runs[i - 1][1] > lo:
        i -= 1
    j = bisect_left(runs, (hi,))
    out = runs[i:j]
    if out:
        if out[0][0] < lo:
            out[0] = (lo, out[0][1])
        if out[-1][1] > hi:
            out[-1] = (out[-1][0], hi)
    return out


def merge_intervals(runs: Intervals) -> Intervals:
    """Sorted, disjoint, non-touching union of any intervals."""
    runs = sorted(r for r in runs if r[1] > r[0])
    out: Intervals = []
    for a, b in runs:
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _intersect(x: Intervals, y: Intervals) -> Intervals:
    out: Intervals = []
    i = j = 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def _complement(x: Intervals, n: int) -> Intervals:
    out: Intervals = []
    at = 0
    for a, b in x:
        if a > at:
            out.append((at, a))
        at = b
    if at < n:
        out.append((at, n))
    return out

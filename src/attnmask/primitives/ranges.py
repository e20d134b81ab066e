"""Primitives of the query only (class Q: ``rows``) or the key only (class K: ``sink``, ``cols``).

    >>> from attnmask.primitives.ranges import cols, rows, sink
    >>> str(rows(3)), str(rows(2, 9, 3)), sink(2).to_dense(1, 4).int().tolist()
    ('rows(3)', 'rows(2, 9, 3)', [[1, 1, 0, 0]])
"""

from __future__ import annotations

import torch

from ..errors import MaskValueError
from ..kinds import StructureClass
from ..masks import Mask
from .base import PrimitiveKind, register


@register
class SINK(PrimitiveKind):
    name = "sink"
    params = ("n",)
    signature = "sink(n)"
    structure = StructureClass.K
    min_args = max_args = 1
    minimum = 0

    def evaluate(self, node, q, k):
        return k < node.args[0]

    def retained(self, node, k, t):
        return k < node.args[0] + 0 * t


class _Range(PrimitiveKind):
    """``a <= x < b`` and ``(x - a) % s == 0`` on one axis; b defaults to a + 1, s to 1."""

    params = ("a", "b", "s")
    min_args, max_args = 1, 3

    def normalize(self, args):
        self.check_count(args)
        n = len(args)
        a = self.whole("a", args[0])
        b = self.whole("b", args[1]) if n > 1 and args[1] is not None else a + 1   # may be MAX_PARAM + 1
        s = self.whole("s", args[2]) if n > 2 else 1
        if a < 0:
            raise MaskValueError(f"{self.signature} needs a >= 0, got a={a}")
        if b < a:
            raise MaskValueError(f"{self.signature} needs b >= a, got a={a}, b={b}")
        if s < 1:
            raise MaskValueError(f"{self.signature} needs s >= 1, got s={s}")
        return (a, b, s)

    def text(self, args):
        a, b, s = args
        shown = (a,) if (s == 1 and b == a + 1) else ((a, b) if s == 1 else (a, b, s))
        return f"{self.name}({', '.join(str(x) for x in shown)})"

    @staticmethod
    def _inside(x: torch.Tensor, args) -> torch.Tensor:
        lo, hi, s = args
        return (x >= lo) & (x < hi) & (torch.remainder(x - lo, s) == 0)

    def display_extent(self, args):
        return 2 * args[1]                  # the end of the range


@register
class ROWS(_Range):
    name = "rows"
    signature = "rows(a, b=a+1, s=1)"
    structure = StructureClass.Q

    def evaluate(self, node, q, k):
        return self._inside(q, node.args)   # any key: Mask.evaluate broadcasts

    def retained(self, node, k, t):
        lo, hi, s = node.args
        if hi <= lo:                        # selects no row: no later query attends anything
            return torch.zeros_like(k - t, dtype=torch.bool)
        last = lo + ((hi - 1 - lo) // s) * s     # the last query row it selects
        return (t <= last) & (k == k)


@register
class COLS(_Range):
    name = "cols"
    signature = "cols(a, b=a+1, s=1)"
    structure = StructureClass.K

    def evaluate(self, node, q, k):
        return self._inside(k, node.args)   # any query

    def retained(self, node, k, t):
        return self._inside(k, node.args) & (t == t)


def sink(n: int) -> Mask:
    """The first ``n`` keys: ``k < n``.

        >>> str(sink(4))
        'sink(4)'
    """
    return SINK.make(n)


def _range_args(a, b, s) -> tuple:
    # Defaults are filled by the primitive itself, exactly as for parsed text.
    if b is None:
        return (a,) if s == 1 else (a, None, s)
    return (a, b, s)


def rows(a: int, b: int | None = None, s: int = 1) -> Mask:
    """Query rows ``a <= q < b`` with ``(q - a) % s == 0`` (any key); b defaults to a + 1.

        >>> rows(1).to_dense(3).int().tolist()
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    """
    return ROWS.make(*_range_args(a, b, s))


def cols(a: int, b: int | None = None, s: int = 1) -> Mask:
    """Key columns ``a <= k < b`` with ``(k - a) % s == 0`` (any query); b defaults to a + 1.

        >>> cols(0, 3, 2).to_dense(1, 4).int().tolist()
        [[1, 0, 1, 0]]
    """
    return COLS.make(*_range_args(a, b, s))


__all__ = ["sink", "rows", "cols"]

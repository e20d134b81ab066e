"""Primitives of the offset ``q - k`` only (structure class D): the compiler evaluates them once
on the 1-D axis of offsets, whatever their combination.

    >>> from attnmask.primitives.offsets import causal, sliding
    >>> (causal & sliding(2)).to_dense(3).int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
"""

from __future__ import annotations

import torch

from ..kinds import StructureClass
from ..masks import Mask
from .base import PrimitiveKind, register


class _Offset(PrimitiveKind):
    structure = StructureClass.D


@register
class CAUSAL(_Offset):
    name = "causal"
    signature = "causal"

    def evaluate(self, node, q, k):
        return k <= q

    def covers_causal(self, args):
        return True

    def is_causal(self, args):
        return True


@register
class DIAGONAL(_Offset):
    name = "diagonal"
    signature = "diagonal"

    def evaluate(self, node, q, k):
        return k == q

    def retained(self, node, k, t):
        return torch.zeros_like(k - t, dtype=torch.bool)     # a later query sees only itself


@register
class BAND(_Offset):
    name = "band"
    params = ("l", "r")
    signature = "band(l, r)"
    min_args = max_args = 2
    minimum = 0

    def evaluate(self, node, q, k):
        lo, hi = node.args
        return (q - k <= lo) & (k - q <= hi)

    def retained(self, node, k, t):
        return k >= t - node.args[0]


@register
class SLIDING(_Offset):
    name = "sliding"
    params = ("w",)
    signature = "sliding(w)"
    min_args = max_args = 1
    minimum = 1

    def evaluate(self, node, q, k):
        return (q - k < node.args[0]) & (k <= q)

    def retained(self, node, k, t):
        return k > t - node.args[0]


@register
class DILATED(_Offset):
    name = "dilated"
    params = ("w", "d")
    signature = "dilated(w, d)"
    min_args = max_args = 2
    minimum = 1

    def evaluate(self, node, q, k):
        w, d = node.args
        diff = q - k
        return (diff >= 0) & (diff < w * d) & (torch.remainder(diff, d) == 0)

    def retained(self, node, k, t):
        w, d = node.args
        return k > t - w * d        # the span of the lattice (a superset: every residue kept)

    def residue_window(self, args):
        return args[0], args[1]

    def display_extent(self, args):
        return 2 * args[0] * args[1]


@register
class STRIDED(_Offset):
    name = "strided"
    params = ("s",)
    signature = "strided(s)"
    min_args = max_args = 1
    minimum = 1

    def evaluate(self, node, q, k):
        return torch.remainder(q - k, node.args[0]) == 0


causal = CAUSAL.make()
diagonal = DIAGONAL.make()


def band(l: int, r: int) -> Mask:
    """``q - l <= k <= q + r``: l keys back and r keys ahead.

        >>> band(1, 0).to_dense(3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    return BAND.make(l, r)


def sliding(w: int) -> Mask:
    """The last ``w`` positions, itself included: ``q - w < k <= q``.

        >>> str(sliding(256))
        'sliding(256)'
    """
    return SLIDING.make(w)


def dilated(w: int, d: int) -> Mask:
    """``w`` keys spaced ``d`` apart, itself included.

        >>> dilated(2, 2).to_dense(3).int().tolist()
        [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    """
    return DILATED.make(w, d)


def strided(s: int) -> Mask:
    """``(q - k) % s == 0``.

        >>> strided(2).to_dense(3).int().tolist()
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    return STRIDED.make(s)


__all__ = ["causal", "diagonal", "band", "sliding", "dilated", "strided"]

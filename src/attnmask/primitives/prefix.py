"""``prefix_lm(p)``: causal plus a bidirectional prefix, ``k <= q or k < p``.

It is ``causal | sink(p)``, and the compiler classifies it as that expression.

    >>> from attnmask.primitives.prefix import prefix_lm
    >>> prefix_lm(2).to_dense(3).int().tolist()
    [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
"""

from __future__ import annotations

from ..kinds import StructureClass
from ..masks import Mask
from .base import PrimitiveKind, register
from .offsets import causal
from .ranges import sink


@register
class PREFIX_LM(PrimitiveKind):
    name = "prefix_lm"
    params = ("p",)
    signature = "prefix_lm(p)"
    structure = StructureClass.MIXED
    min_args = max_args = 1
    minimum = 0

    def evaluate(self, node, q, k):
        return (k <= q) | (k < node.args[0])

    def lower(self, args):
        return causal | sink(args[0])

    def covers_causal(self, args):
        return True


def prefix_lm(p: int) -> Mask:
    """Causal plus a bidirectional prefix: ``k <= q or k < p``.

        >>> str(prefix_lm(16))
        'prefix_lm(16)'
    """
    return PREFIX_LM.make(p)


__all__ = ["prefix_lm"]

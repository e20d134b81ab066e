"""``full`` and ``none``: every pair, and no pair.

    >>> from attnmask.primitives.constant import full, none
    >>> full.to_dense(2).all().item(), none.to_dense(2).any().item()
    (True, False)
"""

from __future__ import annotations

import torch

from ..kinds import StructureClass
from .base import PrimitiveKind, register


@register
class FULL(PrimitiveKind):
    name = "full"
    signature = "full"
    structure = StructureClass.CONST

    def evaluate(self, node, q, k):
        return torch.ones_like(q - k, dtype=torch.bool)

    def covers_causal(self, args):
        return True


@register
class NONE(PrimitiveKind):
    name = "none"
    signature = "none"
    structure = StructureClass.CONST

    def evaluate(self, node, q, k):
        return torch.zeros_like(q - k, dtype=torch.bool)

    def retained(self, node, k, t):
        return torch.zeros_like(k - t, dtype=torch.bool)


full = FULL.make()
none = NONE.make()

__all__ = ["full", "none", "FULL", "NONE"]

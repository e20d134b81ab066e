"""Attention engines: exact masked attention from a Mask or a compiled BlockLayout.

``attention`` validates and dispatches; ``blocksparse`` (CPU default), ``dense``
(reference) and ``flex`` (FlexAttention) do the work. Backends never import
each other.

    >>> import torch, attnmask as am
    >>> q = torch.randn(1, 2, 64, 16)
    >>> am.attention(q, q, q, am.causal).shape
    torch.Size([1, 2, 64, 16])
"""

from __future__ import annotations

from .dispatch import BACKENDS, PerBatch, attention, per_batch

__all__ = ["attention", "per_batch", "PerBatch", "BACKENDS"]

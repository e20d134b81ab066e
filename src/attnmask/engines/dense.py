"""The dense reference engine: masked softmax on the full score matrix.

Simple enough to trust, O(Lq x Lk) memory, so meant for small sizes and
tests. Scores, softmax and the weighted sum run in float32 (float64 for
float64 inputs); autograd works through it naturally.
"""

from __future__ import annotations

import torch

__all__ = ["dense_attention", "DENSE_MAX_CELLS"]

DENSE_MAX_CELLS = 1 << 28
"""Largest B x H x Lq x Lk score matrix the dense backend agrees to build (1 GiB in float32)."""


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a dense bool mask ``allowed`` broadcastable to ``[B, H, Lq, Lk]``.

    q ``[B, H, Lq, D]``, k/v ``[B, H, Lk, D]`` (kv heads already expanded).
    Returns (out ``[B, H, Lq, D]`` in q's dtype, lse ``[B, H, Lq]`` float32, float64 for
    float64 inputs);
    rows with no allowed key give zeros and lse = -inf.

        >>> import torch, attnmask as am
        >>> q = torch.randn(1, 1, 4, 8)
        >>> out, lse = dense_attention(q, q, q, am.causal.to_dense(4), 0.35)
        >>> out.shape
        torch.Size([1, 1, 4, 8])
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A row with no allowed key has lse = -inf; subtracting 0 instead keeps its
    # weights exp(-inf) = 0 (and its gradient finite) rather than NaN.
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))
    out = torch.matmul(probs, v.to(acc))
    return out.to(q.dtype), lse                      # lse in the accumulation dtype

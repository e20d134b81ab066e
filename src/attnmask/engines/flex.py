"""The FlexAttention engine: torch's ``flex_attention`` fed with attnmask's block layout.

The BlockMask comes from ``layout.to_flex_block_mask()`` (no
``create_block_mask`` scan), so only the tiles the layout keeps are computed
and ``mask_mod`` runs on partial tiles only. ``flex_attention`` is wrapped in
``torch.compile`` (one wrapper per process); torch compiles it per shape, so
the first call at a shape costs seconds on CPU. Meant for GPUs; runs compiled
on CPU for checks and benchmarks (forward only there: torch has no CPU
backward for it).
"""

from __future__ import annotations

import torch

from ..errors import MaskError
from ..layout import BlockLayout

__all__ = ["flex_forward", "compiled_flex"]

_compiled = None


def compiled_flex():
    """The process-wide ``torch.compile(flex_attention)`` (created on first use)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _call(*args, **kwargs):
    """The compiled flex_attention, refusing torch's silent eager fallback.

    Every new mask (and shape) recompiles; past ``torch._dynamo.config.recompile_limit``
    (8 by default) dynamo would run flex_attention eagerly, which materializes all the
    scores (an H200 was asked for 256 GiB at 64K tokens). Say so instead.
    """
    import torch._dynamo
    try:
        from torch._dynamo.exc import FailOnRecompileLimitHit
    except ImportError:                                   # older torch: no such switch
        return compiled_flex()(*args, **kwargs)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return compiled_flex()(*args, **kwargs)
    except FailOnRecompileLimitHit as e:
        limit = torch._dynamo.config.recompile_limit
        raise MaskError(
            f"FlexAttention was compiled for {limit} masks or shapes in this process (torch's recompile limit, "
            "torch._dynamo.config.recompile_limit); past it torch would run flex_attention eagerly and "
            "materialize every score. Call torch._dynamo.reset() between masks, raise the limit, or use "
            "backend='blocksparse' on CPU") from e


def flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, scale: float,
                 enable_gqa: bool, return_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run compiled ``flex_attention`` with ``layout`` for every batch element and head.

    q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]``. Returns (out in q's dtype,
    lse float32 ``[B, H, Lq]``, natural log, -inf on rows with no key; None when
    not ``return_lse``: compiled flex on CPU cannot return it).

        >>> import torch, attnmask as am
        >>> q = torch.randn(1, 1, 128, 16)
        >>> out, lse = flex_forward(q, q, q, am.causal.compile(128), 0.25, False)  # doctest: +SKIP
    """
    block_mask = layout.to_flex_block_mask(device=q.device)
    if not return_lse:
        return _call(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa), None
    out, lse = _call(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True)
    lse = lse.float()
    # Rows with no key: flex gives lse = -inf already on recent torch; make the zeros exact either way.
    dead = ~torch.isfinite(lse)
    if bool(dead.any()):
        out = out.masked_fill(dead.unsqueeze(-1), 0)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse

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

from typing import Callable

import operator

import numpy as np
import torch

from .. import late
from ..errors import DenseTooLargeError, MaskError, MaskValueError
from ..kinds import TileState
from ..layout import BlockLayout, compile_layout
from ..masks import DEFAULT_DENSE_LIMIT, Frame, Mask, Primitive

__all__ = ["flex_forward", "compiled_flex", "block_mask_for", "make_mask_mod", "layout_block_mask"]


# ---------------------------------------------------------------------------
# mask_mods and BlockMasks from attnmask's values (Mask.mask_mod, BlockLayout.to_flex_block_mask)
# ---------------------------------------------------------------------------

def warm_tables(mask: Mask, device=None) -> None:
    """Build the tables primitives evaluate from (document ids) before tracing, so torch.compile only reads them.

    On ``device`` if given; else on the CPU and, once the program uses CUDA, on the
    current GPU too (``create_block_mask(m.mask_mod, ..., device="cuda")`` traces there).
    """
    devices = [device] if device is not None else \
        [None] + (["cuda"] if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    stack = [mask]
    while stack:
        m = stack.pop()
        if isinstance(m, Primitive):
            for dev in devices:
                m.kind.prepare(m, dev)
        stack.extend(m.children())


def make_mask_mod(mask: Mask, q_offset: int, device=None, b: int | None = None, h: int | None = None) -> Callable:
    """A FlexAttention mask_mod for ``mask`` with query row i at q_offset + i (tables ready on ``device``).

    mask_mod leaves (attnmask.maskmod) get FlexAttention's own b, h and row index, or the
    fixed ``b``/``h`` when given (a layout compiled for one batch element or head).

        >>> import torch, attnmask as am
        >>> mm = make_mask_mod(am.causal, 2)
        >>> bool(mm(0, 0, torch.tensor(0), torch.tensor(2)))
        True
    """
    warm_tables(mask, device)
    # FlexAttention may pass int32 indices; positions plus parameters (up to
    # 2**31 - 1) must not wrap, so evaluate in int64.
    if mask.has_mask_mod():
        frame = Frame(q_offset, direct=True)      # FlexAttention calls with valid indices (and vmaps scalars)

        def mask_mod(b_, h_, q_idx, kv_idx):
            return mask._eval_at(b_ if b is None else b, h_ if h is None else h,
                                 q_idx.to(torch.int64) + q_offset, kv_idx.to(torch.int64), frame)
    elif q_offset == 0:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask._eval(q_idx.to(torch.int64), kv_idx.to(torch.int64))
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return mask._eval(q_idx.to(torch.int64) + q_offset, kv_idx.to(torch.int64))
    mask_mod.__name__ = f"attnmask_{_safe_name(str(mask))}"
    return mask_mod


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:60]


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < 1:
        raise MaskValueError(f"to_flex_block_mask needs {name} >= 1 (or None), got {value!r}")
    return operator.index(value)


def _flex_tables(layout: BlockLayout, dev, edge_tiles: str) -> list[torch.Tensor]:
    """[kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices] of one layout, each [nqb(, nkb)] on ``dev``."""
    nqb, nkb = layout.n_q_blocks, layout.n_kv_blocks
    rows_all, c_all, state_all = layout.flex_tile_states(edge_tiles=edge_tiles)
    tensors = []
    for state in (TileState.PARTIAL, TileState.FULL):
        sel = state_all == state
        rows, c = rows_all[sel], c_all[sel]                # sorted by (row, key block)
        num = np.bincount(rows, minlength=nqb).astype(np.int32)
        # position of each tile within its row's list (rows come sorted)
        slot = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
        # The dense index table is FlexAttention's format: fill it where it will live,
        # sending only the tiles (a 1M-token window: 73K tiles, not 8192^2 slots).
        idx = torch.zeros((nqb, max(nkb, 1)), dtype=torch.int32, device=dev)
        if len(rows):
            idx[torch.from_numpy(rows).to(dev), torch.from_numpy(slot).to(dev)] = \
                torch.from_numpy(c.astype(np.int32)).to(dev)
        tensors += [torch.from_numpy(num).to(dev), idx]
    return tensors


def layout_block_mask(layout: BlockLayout, batch: int | None = None, heads: int | None = None, device=None, *,
                      edge_tiles: str = "exact"):
    """``layout.to_flex_block_mask()``: a torch BlockMask ``(batch or 1, heads or 1, q_len, kv_len)`` from the runs.

    A mask that is the same for every (b, h) shares one set of tables (expanded); one whose
    mask_mod reads ``b`` or ``h`` gets the tables of the layout compiled for each (b, h).
    """
    from torch.nn.attention.flex_attention import BlockMask
    nqb, nkb = layout.n_q_blocks, layout.n_kv_blocks
    nb, nh = (1 if batch is None else _count("batch", batch)), (1 if heads is None else _count("heads", heads))
    varies = layout.mask.depends_on()
    own_b, own_h = ("batch" in varies and batch is not None), ("head" in varies and heads is not None)
    tb, th = (nb if own_b else 1), (nh if own_h else 1)
    cells = tb * th * nqb * nkb
    if cells > DEFAULT_DENSE_LIMIT // 4:
        raise DenseTooLargeError(f"FlexAttention's BlockMask needs {cells:,} index entries here; use a larger "
                                 f"block_size")
    dev = torch.device("cpu") if device is None else torch.device(device)
    grid = []
    for bi in range(tb):
        for hi in range(th):
            lay = layout
            if own_b or own_h:
                lay = compile_layout(layout.mask, layout.q_len, layout.kv_len, block_size=layout.block_size,
                                     q_offset=layout.q_offset, b=bi if own_b else layout.b,
                                     h=hi if own_h else layout.h)
            grid.append(_flex_tables(lay, dev, edge_tiles))
    tensors = []
    for i in range(4):
        t = torch.stack([g[i] for g in grid]).reshape(tb, th, *grid[0][i].shape)
        tensors.append(t.expand(nb, nh, *t.shape[2:]))
    mod = make_mask_mod(layout.mask, layout.q_offset, dev, b=None if own_b else layout.b,
                        h=None if own_h else layout.h)
    return BlockMask.from_kv_blocks(*tensors, BLOCK_SIZE=layout.block_size, mask_mod=mod,
                                    seq_lengths=(layout.q_len, layout.kv_len))


late.provide("mask_mod", make_mask_mod)
late.provide("block_mask", layout_block_mask)

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


def block_mask_for(layouts: list[BlockLayout], head_layout: torch.Tensor, device):
    """One BlockMask for masks that differ per head or batch element (``head_layout[b, h]`` picks the layout).

    FlexAttention's index tables are per (batch, head): each layout's tables are built once
    and gathered, with a batch dimension of 1 when every batch element uses the same heads.
    The mask_mod evaluates each distinct mask and keeps the one of the head asking.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if len(layouts) == 1:
        return layouts[0].to_flex_block_mask(device=device)
    first = layouts[0]
    for lay in layouts[1:]:
        if (lay.q_len, lay.kv_len, lay.q_offset, lay.block_size) != \
                (first.q_len, first.kv_len, first.q_offset, first.block_size):
            raise MaskValueError("per-head layouts for FlexAttention must share lengths, q_offset and block size")
    table = head_layout[:1] if bool((head_layout == head_layout[:1]).all()) else head_layout     # [B or 1, H]
    cells = table.numel() * first.n_q_blocks * first.n_kv_blocks
    if cells > DEFAULT_DENSE_LIMIT // 4:
        raise MaskValueError(f"FlexAttention's per-head BlockMask needs {cells:,} index entries here; "
                             "use a larger block_size or fewer distinct heads")
    parts = [lay.to_flex_block_mask(device=device) for lay in layouts]
    pick = table.to(device)

    def gather(name: str) -> torch.Tensor:
        stacked = torch.cat([getattr(bm, name) for bm in parts])[:, 0]        # [L, nqb(, nkb)]
        return stacked[pick]                                                  # [B or 1, H, nqb(, nkb)]

    mods = [bm.mask_mod for bm in parts]          # each layout's own, tables already on the device
    which = head_layout.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        li = which[b, h]
        out = (li == 0) & mods[0](b, h, q_idx, kv_idx)
        for i in range(1, len(mods)):
            out = out | ((li == i) & mods[i](b, h, q_idx, kv_idx))
        return out

    if _one_mask_per_bh(layouts, head_layout):
        # one mask_mod that reads b / h itself: every (b, h) sits on its own layout, so
        # FlexAttention's b and h are the ones each layout was compiled for (one evaluation a cell)
        mask_mod = make_mask_mod(first.mask, first.q_offset, device)

    return BlockMask.from_kv_blocks(gather("kv_num_blocks"), gather("kv_indices"),
                                    gather("full_kv_num_blocks"), gather("full_kv_indices"),
                                    BLOCK_SIZE=first.block_size, mask_mod=mask_mod,
                                    seq_lengths=(first.q_len, first.kv_len))


def _one_mask_per_bh(layouts: list[BlockLayout], head_layout: torch.Tensor) -> bool:
    """Whether all layouts hold one mask that varies per (b, h), each placed at the (b, h) it was compiled for."""
    mask = layouts[0].mask
    varies = mask.depends_on()
    if not varies or any(lay.mask is not mask for lay in layouts):
        return False
    B, H = head_layout.shape
    for b in range(B):
        for h in range(H):
            lay = layouts[int(head_layout[b, h])]
            if ("batch" in varies and lay.b != b) or ("head" in varies and lay.h != h):
                return False
    return True


def flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: list[BlockLayout],
                 head_layout: torch.Tensor, scale: float, enable_gqa: bool,
                 return_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run compiled ``flex_attention`` with ``layouts[head_layout[b, h]]`` for batch element b, head h.

    q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]``. Returns (out in q's dtype,
    lse ``[B, H, Lq]`` float32 (float64 for float64 inputs), natural log, -inf on rows with no key; None when
    not ``return_lse``: compiled flex on CPU cannot return it).

        >>> import torch, attnmask as am
        >>> q = torch.randn(1, 1, 128, 16)
        >>> lay = am.causal.compile(128)
        >>> out, lse = flex_forward(q, q, q, [lay], torch.zeros(1, 1, dtype=torch.int64), 0.25, False)  # doctest: +SKIP
    """
    block_mask = block_mask_for(layouts, head_layout, q.device)
    if not return_lse:
        return _call(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa), None
    out, lse = _call(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    # Rows with no key: flex gives lse = -inf already on recent torch; make the zeros exact either way.
    dead = ~torch.isfinite(lse)
    if bool(dead.any()):
        out = out.masked_fill(dead.unsqueeze(-1), 0)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse

"""The block-sparse CPU engine: exact masked attention at the cost of the tiles a layout keeps.

A compiled :class:`~attnmask.BlockLayout` says, per query block, which runs of
key blocks are full, partial or (by omission) empty. This module turns a
layout into a cached *plan* of calls of PyTorch's fused CPU flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the LSE):

- each query block's runs become a few contiguous key ranges, trimmed to the
  keys some row uses, with a small additive mask only where a range holds
  partial tiles (built from ``layout.tile_masks``; full tiles are never evaluated);
- a partial block may run as row pieces (64 rows, and cuts where a document or
  chunk boundary falls inside the block; shorter heights where the block's shape
  repeats when ``costs.MIN_SUB_ROWS`` allows, off by default), each trimmed to its own
  keys, when a cost model of the kernel says so (``costs.kernel_cost``: the kernel
  slices queries into 32-, 64- or 256-row pieces by the call's length, and small
  slices cost more per score). A 1024-key window at block 128 then computes 1087
  keys a row instead of 1151;
- key sets (the keys that key-only parts of a mask select: ``sink(4)``, ``cols(p)``)
  are split off the mask (``_key_set_split``): the rest plans as if they were not
  there, and their keys are gathered into the rest's calls where those are tall
  enough, else into calls of their own merged by log-sum-exp;
- consecutive pieces whose ranges have the same shape and mask and advance by
  constant steps run as ONE call on strided views (a sliding window's whole
  interior is one call per row piece; no copies);
- a run of blocks ending in an exact lower-triangular diagonal tile (causal,
  chunks, the signature cuts) runs as one top-left ``is_causal`` call, plus one
  call for the keys left of it that all its rows share, when that beats row
  pieces trimmed to the diagonal (the kernel computes whole 512-key slices of
  a short triangle: ``costs.causal_call_cost``);
- results covering the same rows are merged in place by log-sum-exp (float32,
  float64 for float64 inputs), so memory stays O(N x D + masks of partial tiles);
  calls are cut so that their output temporaries stay near 16 MB (``costs.CHUNK_BYTES``;
  a long shared-key call only at bit-stable 256-row multiples of at least 1024 rows);
- ``dilated(w, d)`` runs as d window problems on strided views (cost of the w
  keys kept, not of the w * d spanned); a plain ``causal`` layout is one call.

Every call covers all batch elements and heads sharing a layout. No JIT, no
compile step; deterministic (fixed plan, fixed reduction order). Rows with no
key come out as zeros with lse = -inf (the kernel itself reports lse 0 there;
the plan knows those rows and fixes them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..errors import MaskValueError
from ..kinds import StructureClass
from ..layout import BlockLayout
from .cache import ByteLRU, interned, tensor_bytes
from ..threads import SMALL_OP as _SMALL_OP, SMALL_WORK as _SMALL_WORK, run_tasks, single_thread, threads_for
from . import costs, fused
from .costs import BACKWARD, FORWARD, KERNEL, Direction

__all__ = ["blocksparse_forward", "plan_for", "kernel_items", "Plan", "head_runs", "plans"]

_FULL, _PARTIAL = 2, 1
# Tiles evaluated per tile_masks call while planning (bounds the planner's memory).
_TILES_PER_EVAL = 64

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class Op:
    """One kernel call over ``G`` query blocks at once (strided views, no copies).

    Query rows ``r0 + g * dr + [0, rows)`` attend keys ``k0 + g * dk + [0, span)``
    for g in ``range(G)`` (``dk`` may be 0: all blocks share the keys). ``mask``
    indexes ``Plan.masks`` (bool ``[rows, span]``, the same for every g) or is
    None; ``causal`` means the top-left causal mask of the kernel (rows == span);
    ``rows_empty`` indexes ``Plan.row_empty``; ``first`` says no earlier op wrote
    these rows (copy instead of merging). ``extra``: key ranges ``[a, b)`` at fixed
    positions (a sink, key columns) gathered in front of every item's keys, so the
    call's keys are ``extra + [k0 + g * dk, + span)`` and the mask covers them all.
    """
    r0: int
    dr: int
    rows: int
    k0: int
    dk: int
    span: int
    G: int
    mask: int | None
    causal: bool
    rows_empty: int | None
    first: bool
    extra: tuple[tuple[int, int], ...] = ()


@dataclass
class Plan:
    """The ops that compute a layout exactly, in a fixed order (see the module docstring)."""
    ops: list[Op]
    masks: list[torch.Tensor]                   # bool [rows, span] masks of partial ops (deduplicated)
    row_empty: list[torch.Tensor]               # bool [rows]: rows with no key in an op
    causal: bool                                # the whole layout is exactly causal (one is_causal call)
    _typed: dict
    covered: bool = False                       # every row's first op writes it whole (no zero-fill needed)
    kernel_items: object = None                 # the fused kernel's item table (engines/fused.py), on first use

    def nbytes(self) -> int:
        """Bytes the plan holds: masks, rows-empty vectors, ops, and a bound on the fused kernel's
        item table (engines/fused.py, made on first use: 72 bytes an item, 16 a gathered range, the
        masks packed 16 rows to 2 bytes a key). The masks' additive copies (the ATen path) are
        counted by ``plans`` when made (``ByteLRU.derived``)."""
        kernel = sum(72 * op.G + 16 * len(op.extra) for op in self.ops) \
            + sum(2 * -(-m.shape[0] // 16) * m.shape[-1] + 8 for m in self.masks)
        return tensor_bytes(self.masks) + tensor_bytes(self.row_empty) + 128 * len(self.ops) + kernel + 256

    def items(self):
        """Every op's items one by one: ``(row0, rows, k0, span, mask, causal, extra)``."""
        for op in self.ops:
            for g in range(op.G):
                yield op.r0 + g * op.dr, op.rows, op.k0 + g * op.dk, op.span, op.mask, op.causal, op.extra

    def additive(self, idx: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask ``idx`` as 0 / -inf in ``dtype`` (the kernel wants the query's dtype).

        Kept by ``plans`` with the interned mask (``ByteLRU.derived``), so plans that share the mask
        (see plan_for) share it, it is counted once, and it goes when the last of them is evicted."""
        key = (idx, dtype)
        hit = self._typed.get(key)
        if hit is None:
            m = self.masks[idx]
            hit = self._typed[key] = plans.derived(
                m, dtype, lambda: torch.zeros(m.shape, dtype=dtype).masked_fill_(~m, float("-inf")))
        return hit


#: Plans of every direction, keyed by the layout's value (mask, shape, offset, blocks) and the
#: direction, bounded in bytes (masks, ops, and the masks' additive copies once made). Masks are
#: interned (plans of one mask at every length hold the same tiles), so each is counted once: 30
#: layers of nine different masks at 256 / 512 / 1K, both directions, hold ~39 MB, ~136 MB with
#: every float32 copy made (tests/test_engine_models.py).
plans = ByteLRU(256 << 20)


def _layout_key(layout: BlockLayout) -> tuple:
    # b and h: a mask_mod that reads them has one layout (and plan) per batch element / head
    return (layout.mask, layout.q_len, layout.kv_len, layout.q_offset, layout.block_q, layout.block_k,
            layout.b, layout.h)


def plan_for(layout: BlockLayout, direction: Direction = FORWARD) -> Plan:
    """The cached execution plan of ``layout`` for a pass (built once, O(runs + partial tiles)).

    One planner for every direction; ``direction`` (:data:`~attnmask.engines.costs.FORWARD`, ``KERNEL`` or
    ``BACKWARD``) says how rows are cut (see :mod:`attnmask.engines.costs`).

        >>> import attnmask as am
        >>> plan = plan_for((am.causal & am.sliding(256)).compile(1024, block_size=128))
        >>> [(op.r0, op.rows, op.span, op.G) for op in plan.ops][-2:]   # 64-row pieces; then one call for 12
        [(192, 64, 256, 1), (256, 64, 319, 12)]
        >>> from attnmask.engines.costs import BACKWARD
        >>> back = plan_for((am.causal & am.sliding(256)).compile(1024, block_size=128), BACKWARD)
        >>> [(op.r0, op.rows, op.span, op.G) for op in back.ops][-1]       # the backward's items (backward_cost)
        (256, 64, 319, 12)
    """
    key = _layout_key(layout) + (direction,)
    plan = plans.get(key)
    if plan is None:
        # Planning is many small tensor ops: on one thread they never wait for a busy pool.
        with single_thread():
            plan = _build_plan(layout, direction)
            plan.masks = [interned(m) for m in plan.masks]
        masks = tensor_bytes(plan.masks)
        plans.put(key, plan, plan.nbytes() - masks, [(m, tensor_bytes(m)) for m in plan.masks])
    return plan


def _segments(runs: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Split runs (of one query block) into groups that become one kernel call each."""
    groups: list[list[tuple[int, int, int]]] = []
    for run in runs:
        if groups and groups[-1][-1][1] == run[0]:
            groups[-1].append(run)
        else:
            groups.append([run])
    out = []
    for g in groups:
        if not any(t == _PARTIAL for _, _, t in g):
            out.append([(g[0][0], g[-1][1], _FULL)])
            continue
        if g[-1][1] - g[0][0] <= costs.ONE_CALL_BLOCKS:
            out.append(g)      # a window-sized range: one masked call beats several calls and merges
            continue
        # Long full runs go alone (maskless); the rest stays together with its partial tiles,
        # in stretches of at most costs.ONE_CALL_BLOCKS blocks cut at fixed key positions: a mask is
        # then at most one stretch wide, and the stretches of different query blocks repeat
        # and are stored once (causal - cols(0, N, 2) kept N^2 / 2 mask cells before).
        cur: list[tuple[int, int, int]] = []
        for run in g:
            if run[2] == _FULL and run[1] - run[0] >= costs.SPLIT_FULL_BLOCKS:
                if cur:
                    out += _cut_at_stretches(cur)
                    cur = []
                out.append([run])
            else:
                cur.append(run)
        if cur:
            out += _cut_at_stretches(cur)
    return out


def _cut_at_stretches(group: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Cut contiguous runs at multiples of costs.ONE_CALL_BLOCKS key blocks (left as is if narrower)."""
    if group[-1][1] - group[0][0] <= costs.ONE_CALL_BLOCKS:
        return [group]
    out: list[list[tuple[int, int, int]]] = []
    for s, e, t in group:
        while s < e:
            stop = min(e, (s // costs.ONE_CALL_BLOCKS + 1) * costs.ONE_CALL_BLOCKS)
            if out and out[-1][-1][1] == s and s % costs.ONE_CALL_BLOCKS:
                out[-1].append((s, stop, t))
            else:
                out.append([(s, stop, t)])
            s = stop
    return out


class _Builder:
    """Tiles -> deduplicated masks -> items, for the forward plan and the backward's.

    ``direction`` says how a partial segment's rows are cut (the forward: the cost model of
    :func:`_row_chunks`; the backward, whose kernel prefers taller calls: fixed heights).
    """

    def __init__(self, layout: BlockLayout, direction: Direction = FORWARD):
        self.layout = layout
        self.direction = direction
        if direction.kernel:
            self.chunks = lambda m, fine=False, n=direction.fixed_rows: _kernel_row_chunks(m, n)
        elif direction.fixed_rows is None:
            self.chunks = _row_chunks
        else:
            self.chunks = lambda m, fine=False, n=direction.fixed_rows: _fixed_row_chunks(m, n, fine)
        self.bq, self.bk = layout.block_size
        self.masks: list[torch.Tensor] = []
        self.mask_ids: dict[bytes, int] = {}
        self.row_empty: list[torch.Tensor] = []
        self.row_ids: dict[bytes, int] = {}
        self.tile_id: dict[tuple[int, int], int] = {}
        self.tiles: list[torch.Tensor] = []
        self.items_by_sig: dict[tuple, list[tuple]] = {}
        self.repeats: dict[tuple, int] = {}          # signature -> blocks with it (see count_repeats)

    def eval_tiles(self, need: list[tuple[int, int]]) -> None:
        """Evaluate partial tiles once (in chunks) and give identical tiles one id."""
        lay, bq, bk = self.layout, self.bq, self.bk
        if lay.mask.structure_class() in (StructureClass.D, StructureClass.CONST):
            # A mask of q - k alone has the same tile wherever q0 - k0 (and the clipping) agree:
            # evaluate one tile per class (a sliding window has two, whatever the length).
            rep: dict[tuple[int, int, int], tuple[int, int]] = {}
            cls_of = []
            for qb, c in need:
                key = (lay.q_offset + qb * bq - c * bk, min(bq, lay.q_len - qb * bq), min(bk, lay.kv_len - c * bk))
                rep.setdefault(key, (qb, c))
                cls_of.append(key)
            self._eval_exact(list(rep.values()))
            for (qb, c), key in zip(need, cls_of):
                self.tile_id[(qb, c)] = self.tile_id[rep[key]]
            return
        self._eval_exact(need)

    def _eval_exact(self, need: list[tuple[int, int]]) -> None:
        seen: dict[bytes, int] = {}
        for i in range(0, len(need), _TILES_PER_EVAL):
            chunk = need[i:i + _TILES_PER_EVAL]
            tm = self.layout.tile_masks(torch.tensor([c[0] for c in chunk], dtype=torch.int64),
                                        torch.tensor([c[1] for c in chunk], dtype=torch.int64))
            flat = tm.reshape(len(chunk), -1).numpy()
            for j, key in enumerate(chunk):
                digest = hashlib.blake2b(flat[j].tobytes(), digest_size=16).digest()
                tid = seen.get(digest)
                if tid is None:
                    tid = seen[digest] = len(self.tiles)
                    self.tiles.append(tm[j])
                self.tile_id[key] = tid

    def items(self, qb: int, rows: int, seg: list[tuple[int, int, int]]) -> list[tuple]:
        """Kernel items of one segment of block qb: ``(row offset, rows, k0, span, mask id, rows-empty id)``.

        A partial segment may be cut into row chunks, each trimmed to the keys its rows reach
        (see :func:`_row_chunks`); all-empty chunks are dropped.
        """
        bk, kv_len = self.bk, self.layout.kv_len
        k0, k1 = seg[0][0] * bk, min(seg[-1][1] * bk, kv_len)
        if all(t == _FULL for _, _, t in seg):
            return [(0, rows, k0, k1 - k0, None, None)]
        # Segments with the same shape and the same tiles give the same trimmed masks
        # (every interior block of a window): assemble them once.
        sig = self.signature(qb, rows, seg)
        hit = self.items_by_sig.get(sig)
        if hit is None:
            # Pieces shorter than costs.SUB_ROWS only where the segment's shape repeats: there they
            # join one batched call; elsewhere each piece would be a call of its own.
            fine = self.repeats.get(sig, 0) >= costs.FINE_PIECES_REPEATS
            hit = self.items_by_sig[sig] = self._assemble(qb, rows, seg, k0, k1, fine)
        return [(r, n, k0 + lo, span, idx, ridx) for r, n, lo, span, idx, ridx in hit]

    def count_repeats(self, blocks: list[tuple[int, int, list]]) -> None:
        """Count the blocks each partial segment signature occurs in: ``blocks`` = (qb, rows, runs)."""
        for qb, rows, runs in blocks:
            for sig in {self.signature(qb, rows, seg) for seg in _segments(runs)
                        if any(t == _PARTIAL for _, _, t in seg)}:
                self.repeats[sig] = self.repeats.get(sig, 0) + 1

    def signature(self, qb: int, rows: int, seg: list[tuple[int, int, int]]) -> tuple:
        """What a partial segment's items depend on: its shape and its tiles (not its position)."""
        bk, kv_len = self.bk, self.layout.kv_len
        k0, k1 = seg[0][0] * bk, min(seg[-1][1] * bk, kv_len)
        c0 = seg[0][0]
        return (rows, k1 - k0, tuple((s - c0, e - c0, t, tuple(self.tile_id[(qb, c)] for c in range(s, e))
                                      if t == _PARTIAL else ()) for s, e, t in seg))

    def _assemble(self, qb: int, rows: int, seg, k0: int, k1: int, fine: bool = False) -> list[tuple]:
        bk, kv_len = self.bk, self.layout.kv_len
        m = torch.ones((rows, k1 - k0), dtype=torch.bool)
        for s, e, t in seg:
            if t == _PARTIAL:
                for c in range(s, e):
                    a, b = c * bk - k0, min((c + 1) * bk, kv_len) - k0
                    m[:, a:b] = self.tiles[self.tile_id[(qb, c)]][:rows, :b - a]
        out = []
        for r, n in self.chunks(m, fine):
            sub = m[r:r + n]
            for lo, hi in _key_clusters(sub.any(0)):
                out.append((r, n, lo, hi - lo) + self._mask_ids(sub[:, lo:hi].contiguous()))
        return out

    def gather_small(self, items: list[tuple]) -> list[tuple]:
        """Gather the key-set items of one query block: fewer calls and merges, no gap computed.

        ``items``: ``(row offset, rows, k0, span, mask id, rows-empty id)`` of one block, from
        all its segments (disjoint keys). Items of at most ``costs.GATHER_KEYS`` keys (a sink, key
        columns) are *small*. Returns items with a 7th field, gathered absolute key ranges
        (``()`` when none) that the call reads in front of its own ``[k0, k0 + span)``:

        - when every large item that covers a small item's rows is short (its keys plus the
          gathered ones at most ``costs.GATHER_SPAN_ROWS`` x its rows, so copying them costs less
          than a call and a merge), the small items join those calls;
        - otherwise all small items of the block that cover the same rows become ONE item
          whose keys are only the gathered ones (``span`` 0): one small extra call merged by
          log-sum-exp, instead of one per item (32 key columns: 1 call, not 32).
        """
        out = [it + ((),) for it in items]
        small = [it for it in items if it[3] <= costs.GATHER_KEYS]
        large = [it for it in items if it[3] > costs.GATHER_KEYS]
        if not small or (len(small) == 1 and not large):
            return out
        e = sum(it[3] for it in small)
        # (the fused kernel reads gathered keys as pieces of their own: no copy per call to weigh)
        if large and (self.direction.kernel
                      or all(span + e <= costs.GATHER_SPAN_ROWS * n for _, n, _, span, _, _ in large)):
            folded = self._fold(small, large)
            if folded is not None:
                return folded
        if len(small) < 2 or any((rs, ns) != small[0][:2] for rs, ns, *_ in small):
            return out
        r, n = small[0][:2]
        cols = [torch.ones((n, ss), dtype=torch.bool) if ms is None else self.masks[ms] for _, _, _, ss, ms, _ in small]
        mid, rid = self._mask_ids(torch.cat(cols, 1))
        return [it + ((),) for it in large] + [(r, n, 0, 0, mid, rid, tuple((ks, ks + ss) for _, _, ks, ss, _, _ in small))]

    def _fold(self, small: list[tuple], large: list[tuple]) -> list[tuple] | None:
        """Small items folded into the large items that cover their rows (None if some row has none)."""
        # Each row of a small item must join exactly one large item (large items of two
        # segments may share rows: the second one gets nothing).
        covered = [np.zeros(it[1], dtype=bool) for it in small]
        merged = []
        for r, n, k0, span, m, re_ in large:
            extra, cols = [], []
            for j, (rs, ns, ks, ss, ms, _) in enumerate(small):
                if rs <= r and r + n <= rs + ns and not covered[j][r - rs:r - rs + n].any():
                    covered[j][r - rs:r - rs + n] = True
                    extra.append((ks, ks + ss))
                    cols.append(torch.ones((n, ss), dtype=torch.bool) if ms is None else
                                self.masks[ms][r - rs:r - rs + n])
            if not extra:
                merged.append((r, n, k0, span, m, re_, ()))
                continue
            own = torch.ones((n, span), dtype=torch.bool) if m is None else self.masks[m]
            mid, rid = self._mask_ids(torch.cat(cols + [own], 1))
            merged.append((r, n, k0, span, mid, rid, tuple(extra)))
        if not all(c.all() for c in covered):
            return None
        return merged

    def _mask_ids(self, m: torch.Tensor) -> tuple[int | None, int | None]:
        """(mask id, rows-empty id) of a trimmed bool mask, deduplicated; (None, None) if all True."""
        if bool(m.all()):
            return None, None
        key = hashlib.blake2b(m.numpy().tobytes(), digest_size=16).digest() + repr(m.shape).encode()
        idx = self.mask_ids.get(key)
        if idx is None:
            idx = self.mask_ids[key] = len(self.masks)
            self.masks.append(m)
        ridx = None
        empty = ~m.any(1)
        if bool(empty.any()):
            rkey = empty.numpy().tobytes()
            ridx = self.row_ids.get(rkey)
            if ridx is None:
                ridx = self.row_ids[rkey] = len(self.row_empty)
                self.row_empty.append(empty)
        return idx, ridx


def _key_clusters(used: torch.Tensor) -> list[tuple[int, int]]:
    """Key ranges ``[lo, hi)`` one row chunk runs on, from the bool of the keys its rows use.

    Normally one range, from the first key used to the last. Small clusters of keys (at most
    costs.GATHER_KEYS wide, e.g. a sink) separated from the rest by a gap of at least costs.GATHER_KEYS
    unused keys are split off at either end, so the plan can gather them instead of computing
    the gap (``_Builder.gather_small``).

        >>> used = torch.zeros(300, dtype=torch.bool); used[:4] = True; used[200:300] = True
        >>> _key_clusters(used)
        [(0, 4), (200, 300)]
        >>> used[200:300] = False; used[290] = True
        >>> _key_clusters(used)
        [(0, 4), (290, 291)]
    """
    idx = used.nonzero().flatten().tolist()
    if not idx:
        return []
    clusters = [[idx[0], idx[0] + 1]]
    for i in idx[1:]:
        if i - clusters[-1][1] < costs.GATHER_KEYS:
            clusters[-1][1] = i + 1
        else:
            clusters.append([i, i + 1])
    large = [j for j, (a, b) in enumerate(clusters) if b - a > costs.GATHER_KEYS]
    if not large:
        return [tuple(c) for c in clusters]          # only small key sets (columns far apart)
    first, last = large[0], large[-1]
    return ([tuple(c) for c in clusters[:first]] + [(clusters[first][0], clusters[last][1])]
            + [tuple(c) for c in clusters[last + 1:]])


def _row_chunks(m: torch.Tensor, fine: bool = False) -> list[tuple[int, int]]:
    """Row chunks ``(offset, rows)`` of a partial mask: whole, or pieces when cheaper.

    Pieces are cut where consecutive rows see disjoint key ranges (a document or chunk
    boundary inside the block), then every costs.SUB_ROWS rows (or a half, a quarter ... of
    it down to costs.MIN_SUB_ROWS, whichever costs least). Trimming each piece to the keys
    its rows reach pays when rows see shifted key ranges (a window: 1151 keys for 128 rows
    of sliding(1024), 1087 for 64; a block straddling two documents: the first document's
    keys for the second's rows), minus the cost of smaller kernel calls (costs.kernel_cost).
    """
    rows = m.shape[0]
    starts = _boundaries(m)
    # Narrow windows want shorter pieces (sliding(16): 79 keys a row for 64-row pieces, 31 for
    # 16): with ``fine``, every height from SUB_ROWS down to MIN_SUB_ROWS by halves is weighed.
    ends = starts[1:] + [rows]

    def pieces(height: int) -> list[tuple[int, int]]:
        return [(r, min(height, b - r)) for a, b in zip(starts, ends) for r in range(a, b, height)]

    whole = [(0, rows)], costs.kernel_cost(rows, _span(m.any(0))) * costs.SPLIT_GAIN
    return _cheapest_height(m, pieces, costs.kernel_cost, costs.SUB_ROWS, costs.MIN_SUB_ROWS, fine, whole)


def _boundaries(m: torch.Tensor) -> list[int]:
    """Rows of a partial mask where a piece must start: 0, and every row whose keys all lie right of
    every key of the rows above it (a document or chunk boundary inside the block)."""
    any_row = m.any(1)
    first = torch.where(any_row, m.int().argmax(1), m.shape[1])
    last = torch.where(any_row, m.shape[1] - 1 - m.flip(1).int().argmax(1), -1)
    # (the running maximum restarts there on its own: the new rows reach further right)
    reach = last.cummax(0).values
    cut = any_row[1:] & (first[1:] > reach[:-1]) & (reach[:-1] >= 0)
    return [0] + (cut.nonzero().flatten() + 1).tolist()


def _kernel_row_chunks(m: torch.Tensor, height: int) -> list[tuple[int, int]]:
    """The fused kernel's row chunks: every ``height`` rows from each boundary (:func:`_boundaries`).

    The kernel visits only the live 16 x 16 pieces of an item, so taller items cost no extra
    scores (their keys are trimmed per 16-row group by the mask bits); they mean fewer items and
    fewer copies of gathered keys (and, in bf16, of packed values) per row."""
    starts = _boundaries(m)
    ends = starts[1:] + [m.shape[0]]
    return [(r, min(height, b - r)) for a, b in zip(starts, ends) for r in range(a, b, height)]


def _fixed_row_chunks(m: torch.Tensor, height: int, fine: bool = False) -> list[tuple[int, int]]:
    """The backward's row chunks: every ``height`` rows, or (``fine``: a segment that repeats, so one
    batched call runs its pieces) a half or a quarter of it where ``costs.backward_cost`` says so."""
    rows = m.shape[0]
    return _cheapest_height(m, lambda h: [(r, min(h, rows - r)) for r in range(0, rows, h)],
                            costs.backward_cost, height, costs.MIN_BACKWARD_ROWS, fine)


def _cheapest_height(m: torch.Tensor, pieces, cost, height: int, floor: int, fine: bool,
                     best: tuple | None = None) -> list[tuple[int, int]]:
    """The cheapest row pieces of mask ``m`` among ``pieces(h)`` for h = ``height`` and, with ``fine``,
    its halves down to ``floor``: the one search of both directions' row cuts.

    ``cost(rows, keys)`` prices one piece trimmed to its keys; ``best`` = (pieces, cost) to beat
    (the forward's whole block), else the first height's cut is the start. A cut into one piece
    never replaces a best found (it is the whole block); ties keep the taller pieces.
    """
    best, best_cost = best if best is not None else (None, float("inf"))
    while True:
        cut = pieces(height)
        if best is None or len(cut) > 1:
            c = sum(cost(n, _span(m[r:r + n].any(0))) for r, n in cut)
            if c < best_cost:
                best, best_cost = cut, c
        if not fine or height // 2 < floor:
            return best
        height //= 2


def _span(cols: torch.Tensor) -> int:
    """Distance from the first to the last True of a bool vector (0 if none)."""
    idx = cols.nonzero()
    return int(idx[-1]) - int(idx[0]) + 1 if len(idx) else 0


def block_runs(layout: BlockLayout) -> list[list[tuple[int, int, int]]]:
    """Per query block, its runs ``(first key block, end, state)`` as Python tuples."""
    run_ptr = layout.run_ptr.tolist()
    starts, ends, states = layout.run_start.tolist(), layout.run_end.tolist(), layout.run_state.tolist()
    return [[(starts[i], ends[i], states[i]) for i in range(run_ptr[b], run_ptr[b + 1])]
            for b in range(layout.n_q_blocks)]


def partial_tiles(runs: list[list[tuple[int, int, int]]]) -> list[tuple[int, int]]:
    """(query block, key block) of every partial tile, in order."""
    return [(b, c) for b in range(len(runs)) for s, e, t in runs[b] if t == _PARTIAL for c in range(s, e)]


def _without_key_sets(mask, small) -> tuple:
    """(the mask without its key-set terms, those terms).

    A key-set term is a part of a union that depends on the key alone (``sink(n)``, ``cols(...)``)
    and for which ``small(term)`` holds, found through unions, intersections and the left side
    of differences (where removing a union's part only removes pairs). With T the terms'
    keys, the rest W is inside the mask and holds every pair of it whose key is not in T.
    """
    from ..masks import Difference, Intersection, Union
    if isinstance(mask, Union):
        kept, dropped = [], []
        for part in mask.parts:
            if part.structure_class() is StructureClass.K and small(part):
                dropped.append(part)
            else:
                rest, terms = _without_key_sets(part, small)
                kept.append(rest)
                dropped += terms
        if not dropped:
            return mask, []
        if not kept:
            from ..primitives import none
            return none, dropped
        rest = kept[0]
        for part in kept[1:]:
            rest = rest | part
        return rest, dropped
    if isinstance(mask, Intersection):
        split = [_without_key_sets(part, small) for part in mask.parts]
        if not any(terms for _, terms in split):
            return mask, []
        rest = split[0][0]
        for part, _ in split[1:]:
            rest = rest & part
        return rest, [t for _, terms in split for t in terms]
    if isinstance(mask, Difference):
        rest, terms = _without_key_sets(mask.left, small)
        return (rest - mask.right, terms) if terms else (mask, [])
    return mask, []


def _key_set_split(layout: BlockLayout) -> tuple[BlockLayout, np.ndarray, torch.Tensor] | None:
    """Key sets gathered, not tiled: (the layout without them, their keys, their cells), or None.

    The keys that key-only parts of a mask select (``sink(4)``, 32 ``cols(p)``: at most
    ``costs.KEY_SET_KEYS`` keys) are read by every query block right of them; as tiles they keep
    each block's mask partial (and unique: no batched calls) or cost a call and a merge per
    block. Split off, the rest (a window) plans as if they were not there, and the key set runs
    as calls of ``costs.KEY_SET_ROWS`` rows against its gathered keys, each with the mask of the
    cells the rest does not cover (``rows x keys`` booleans per call; equal masks are stored once),
    or inside the rest's narrow calls (:func:`_with_key_set`). Returns the cells as one bool
    ``[q_len, keys]`` tensor: at most ``costs.KEY_SET_CELLS`` booleans, else None.
    """
    mask = layout.mask
    if mask.has_mask_mod():
        return None
    kv_len = layout.kv_len
    kpos = torch.arange(kv_len)[None, :]
    zero = torch.zeros(1, 1, dtype=torch.int64)
    key_of: dict = {}

    def small(term) -> bool:
        keys = torch.broadcast_to(term.evaluate(zero, kpos), (1, kv_len))[0]
        key_of[term] = keys
        return int(keys.sum()) <= costs.KEY_SET_KEYS

    if mask.structure_class() is StructureClass.K and small(mask):
        from ..primitives import none
        rest, terms = none, [mask]
    else:
        rest, terms = _without_key_sets(mask, small)
    if not terms:
        return None
    used = torch.zeros(kv_len, dtype=torch.bool)
    for t in terms:
        used |= key_of[t]
    keys = used.nonzero().flatten()
    q_len = layout.q_len
    if len(keys) == 0 or len(keys) > costs.KEY_SET_KEYS or q_len * len(keys) > costs.KEY_SET_CELLS:
        return None
    rest_layout = rest.compile(q_len, kv_len, q_offset=layout.q_offset, block_size=layout.block_size)
    qq, kk = (layout.q_offset + torch.arange(q_len))[:, None], keys[None, :]
    shape = (q_len, len(keys))
    cells = torch.broadcast_to(mask.evaluate(qq, kk), shape) & ~torch.broadcast_to(rest.evaluate(qq, kk), shape)
    return rest_layout, keys.numpy(), cells


class _MaskBook:
    """Deduplicated masks and rows-empty vectors of a plan under construction."""

    def __init__(self, masks: list[torch.Tensor], row_empty: list[torch.Tensor]):
        self.masks, self.row_empty = masks, row_empty
        self._ids: dict[bytes, int] = {}
        self._rows: dict[bytes, int] = {}

    def add(self, m: torch.Tensor) -> tuple[int | None, int | None]:
        """(mask id, rows-empty id) of a bool mask; (None, None) if it is all True."""
        if bool(m.all()):
            return None, None
        key = hashlib.blake2b(m.numpy().tobytes(), digest_size=16).digest() + repr(m.shape).encode()
        mid = self._ids.get(key)
        if mid is None:
            mid = self._ids[key] = len(self.masks)
            self.masks.append(m)
        empty = ~m.any(1)
        if not bool(empty.any()):
            return mid, None
        rkey = empty.numpy().tobytes()
        rid = self._rows.get(rkey)
        if rid is None:
            rid = self._rows[rkey] = len(self.row_empty)
            self.row_empty.append(empty)
        return mid, rid


def _with_key_set(base: Plan, keys: np.ndarray, cells: torch.Tensor, direction: Direction = FORWARD) -> Plan:
    """The plan of the rest with the key set's keys gathered (``cells``: bool [q_len, keys]).

    Where an op of the rest is narrow (its keys plus the key set's at most
    ``costs.GATHER_SPAN_ROWS`` x its rows) and its items' rows attend the same key-set cells,
    the gathered keys join that op's calls (one copy of the keys it reads, no extra call, no
    merge). The cells left run as key-set calls of ``costs.KEY_SET_ROWS`` rows against the
    gathered keys, merged by LSE after every op of the rest (a wide window: copying its keys
    for the join would cost more than the merge). For the fused kernel (``direction.kernel``)
    every op joins them whatever its width: the kernel reads them as pieces of their own, and a
    key-set call would store and reload every row it covers.
    """
    book = _MaskBook(list(base.masks), list(base.row_empty))
    ranges: list[tuple[int, int]] = []
    for key in keys.tolist():
        if ranges and ranges[-1][1] == key:
            ranges[-1] = (ranges[-1][0], key + 1)
        else:
            ranges.append((key, key + 1))
    extra = tuple(ranges)
    E = len(keys)
    left = cells.clone()
    ops = []
    for op in base.ops:
        own = op.span + sum(b_ - a_ for a_, b_ in op.extra)
        if op.causal or (not direction.kernel and own + E > costs.GATHER_SPAN_ROWS * op.rows):
            ops.append(op)
            continue
        # The op's items in runs with equal key-set cells (a window's first items see the sink
        # inside their own keys, the rest all four): each run joins the keys, if there are few runs.
        rows_of = [slice(op.r0 + g * op.dr, op.r0 + g * op.dr + op.rows) for g in range(op.G)]
        runs: list[list[int]] = [[0, 1]]
        for g in range(1, op.G):
            if torch.equal(left[rows_of[g]], left[rows_of[runs[-1][0]]]):
                runs[-1][1] = g + 1
            else:
                runs.append([g, g + 1])
        most = costs.KEY_SET_JOIN_RUNS
        if direction.kernel:
            most = max(most, costs.KERNEL_JOIN_CELLS // (op.rows * (own + E)))
        if len(runs) > most or not bool(left[op.r0:rows_of[-1].stop].any()):
            ops.append(op)
            continue
        mine = torch.ones((op.rows, own), dtype=torch.bool) if op.mask is None else base.masks[op.mask]
        for g0, g1 in runs:
            part = dataclasses.replace(op, r0=op.r0 + g0 * op.dr, k0=op.k0 + g0 * op.dk, G=g1 - g0,
                                       dr=op.dr if g1 - g0 > 1 else 0, dk=op.dk if g1 - g0 > 1 else 0)
            sub = left[rows_of[g0]]
            if not bool(sub.any()):
                ops.append(part)
                continue
            mid, rid = book.add(torch.cat([sub, mine], 1))
            ops.append(dataclasses.replace(part, mask=mid, rows_empty=rid, extra=extra + op.extra))
            for r in rows_of[g0:g1]:
                left[r] = False
    chunks = []
    for r in range(0, cells.shape[0], costs.KEY_SET_ROWS):
        m = left[r:r + costs.KEY_SET_ROWS]
        if bool(m.any()):
            chunks.append((r, m.shape[0]) + book.add(m.contiguous()))
    # Consecutive chunks with one mask run as one batched call (a sink: all rows past the window).
    j = 0
    while j < len(chunks):
        r0, rows, mid, rid = chunks[j]
        g = j + 1
        while g < len(chunks) and chunks[g][1:] == (rows, mid, rid) and chunks[g][0] == r0 + (g - j) * rows:
            g += 1
        ops.append(Op(r0=r0, dr=rows if g - j > 1 else 0, rows=rows, k0=0, dk=0, span=0, G=g - j, mask=mid,
                      causal=False, rows_empty=rid, first=False, extra=extra))
        j = g
    return Plan(ops, book.masks, book.row_empty, False, {}, base.covered)


def _build_plan(layout: BlockLayout, direction: Direction = FORWARD) -> Plan:
    if _is_exact_causal(layout):
        return Plan([], [], [], True, {}, True)
    split = _key_set_split(layout)
    if split is not None:
        rest, keys, cells = split
        base = plan_for(rest, direction)
        if base.causal:
            # The rest is exactly causal: its one is_causal call becomes an op of the plan.
            L = layout.q_len
            base = Plan([Op(r0=0, dr=0, rows=L, k0=0, dk=0, span=L, G=1, mask=None, causal=True, rows_empty=None,
                            first=True)], [], [], False, {}, True)
        return _with_key_set(base, keys, cells, direction)
    bq, bk = layout.block_size
    q_len, kv_len, nqb = layout.q_len, layout.kv_len, layout.n_q_blocks
    runs = block_runs(layout)
    bld = _Builder(layout, direction)
    bld.eval_tiles(partial_tiles(runs))
    bld.count_repeats([(b, min((b + 1) * bq, q_len) - b * bq, runs[b]) for b in range(nqb)])

    # Causal regions: consecutive full-height blocks whose last run is the exact lower-triangular
    # diagonal tile, preceded by full tiles back to the region's first diagonal column, and whose
    # keys left of that column are identical. The triangle is one top-left is_causal call; the
    # shared left part is one call for the whole region.
    tril_id = None
    if bq == bk and layout.q_offset % bk == 0:
        tril = torch.ones(bq, bq, dtype=torch.bool).tril_()
        for tid, t in enumerate(bld.tiles):
            if torch.equal(t, tril):
                tril_id = tid
                break
    diag_col = [-1] * nqb
    f0 = [0] * nqb
    if tril_id is not None:
        for b in range(nqb):
            c = (layout.q_offset + b * bq) // bk
            r = runs[b]
            if (b + 1) * bq > q_len or (c + 1) * bk > kv_len or not r or r[-1] != (c, c + 1, _PARTIAL) \
                    or bld.tile_id[(b, c)] != tril_id:
                continue
            diag_col[b] = c
            f0[b] = r[-2][0] if len(r) >= 2 and r[-2][1] == c and r[-2][2] == _FULL else c

    def left_sig(b: int, ca: int) -> tuple:
        out = []
        for s, e, t in runs[b][:-1]:
            if s >= ca:
                continue
            e = min(e, ca)
            out.append((s, e, t, tuple(bld.tile_id[(b, c)] for c in range(s, e)) if t == _PARTIAL else ()))
        return tuple(out)

    items: list[tuple[int, int, int, int, int | None, int | None]] = []   # (row0, rows, k0, span, mask, empty)
    region_ops: list[tuple] = []
    b = 0
    scanned = 0                                  # blocks below this were part of a region already weighed
    while b < nqb:
        if diag_col[b] >= 0 and b >= scanned:
            a, ca = b, diag_col[b]
            sig = left_sig(b, ca)
            j = b + 1
            while j < nqb and diag_col[j] == ca + (j - a) and f0[j] <= ca and left_sig(j, ca) == sig:
                j += 1
            # One is_causal call for the triangle, unless row pieces trimmed to the diagonal are
            # cheaper (short triangles: the kernel computes whole 512-key slices of them).
            n = (j - a) * bq
            if j - a >= 2 and costs.causal_call_cost(n) <= costs.REGION_GAIN * costs.pieces_cost(n):
                region_ops.append((a, j - a, ca, sig))
                b = j
                continue
            scanned = j          # rejected: its tails are not weighed again (O(k^2) scans for k blocks)
        rows = min((b + 1) * bq, q_len) - b * bq
        block_items = [it for seg in _segments(runs[b]) for it in bld.items(b, rows, seg)]
        gathered = bld.gather_small(block_items) if direction.gather else [it + ((),) for it in block_items]
        for r, n, k0, span, m, re_, extra in gathered:
            items.append((b * bq + r, n, k0, span, m, re_, extra))
        b += 1

    written = np.zeros(q_len, dtype=bool)       # rows some op has written so far
    mixed = False                                # an op merged into rows no op had written yet
    ops: list[Op] = []

    def add(*, r0: int, dr: int, rows: int, G: int, **kw) -> None:
        nonlocal mixed
        if G > 1 and kw.get("dk") == 0 and dr == rows and kw.get("mask") is None \
                and kw.get("rows_empty") is None:
            # Consecutive row ranges sharing unmasked keys: one long query range, so the kernel
            # works on large query tiles instead of G small ones.
            rows, G, dr = G * rows, 1, 0
        assert r0 + (G - 1) * dr + rows <= q_len     # as_strided below does not check bounds
        rows_of = written[r0:r0 + rows] if G == 1 else \
            np.lib.stride_tricks.as_strided(written[r0:], (G, rows), (dr, 1), writeable=True)
        seen = int(rows_of.sum())
        if 0 < seen < rows_of.size:
            mixed = True             # those rows must then start at 0 / -inf
        rows_of[...] = True
        ops.append(Op(first=seen == 0, r0=r0, dr=dr, rows=rows, G=G, **kw))

    for a, G, ca, sig in region_ops:
        add(r0=a * bq, dr=0, rows=G * bq, k0=ca * bk, dk=0, span=G * bq, G=1, mask=None, causal=True,
            rows_empty=None)
        # The left part, identical for every block of the region: one call with the keys shared (dk = 0).
        left = [(s, e, t) for s, e, t, _ in sig]
        for seg in _segments(left):
            for r, n, k0, span, m, re_ in bld.items(a, bq, seg):
                add(r0=a * bq + r, dr=bq, rows=n, k0=k0, dk=0, span=span, G=G, mask=m, causal=False,
                    rows_empty=re_)

    # Generic items: batch consecutive items with equal shape and mask whose query and key starts
    # advance by constant steps (a sliding window's interior is one call per row piece).
    buckets: dict[tuple, list[tuple[int, int]]] = {}
    for row0, rows, k0, span, m, re_, extra in items:
        buckets.setdefault((rows, span, m, re_, extra), []).append((row0, k0))
    for (rows, span, m, re_, extra), members in buckets.items():
        # Query-block order batches a window's interior (keys advance with the rows); key order
        # batches stretches that many blocks share (a mask's column pattern repeated down the rows).
        runs = min((_strided_runs(members, rows), _strided_runs(sorted(members, key=lambda x: (x[1], x[0])), rows)),
                   key=len)
        for (r0, k0), dr, dk, G in runs:
            add(r0=r0, dr=dr, rows=rows, k0=k0, dk=dk, span=span, G=G, mask=m, causal=False, rows_empty=re_,
                extra=extra)
    return Plan(ops, bld.masks, bld.row_empty, False, {}, bool(written.all()) and not mixed)


def _strided_runs(members: list[tuple[int, int]], rows: int) -> list[tuple[tuple[int, int], int, int, int]]:
    """Greedy runs ``(first (row0, k0), dr, dk, G)`` of consecutive members advancing by constant steps."""
    out = []
    i = 0
    while i < len(members):
        j, dr, dk = i + 1, 0, 0
        # strided views cannot step backwards (keys must not move left as rows go down),
        # and the rows of one call must not overlap
        if j < len(members) and members[j][0] - members[i][0] >= rows and members[j][1] >= members[i][1]:
            dr = members[j][0] - members[i][0]
            dk = members[j][1] - members[i][1]
            j += 1
            while j < len(members) and members[j][0] - members[j - 1][0] == dr \
                    and members[j][1] - members[j - 1][1] == dk:
                j += 1
        out.append((members[i], dr, dk, j - i))      # a run of one member keeps dr = dk = 0
        i = j
    return out


def _is_exact_causal(layout: BlockLayout) -> bool:
    """True when the layout is exactly ``k <= q`` on a square grid (one is_causal call suffices).

    Checked from the runs (full blocks left of the diagonal, a partial diagonal
    block) and the diagonal tiles themselves, which must be lower triangular.
    """
    if layout.q_len != layout.kv_len or layout.q_offset != 0 or layout.block_q != layout.block_k:
        return False
    n = layout.n_q_blocks
    if layout.n_runs != 2 * n - 1:
        return False
    qb = layout.run_q_blocks()
    start, end, state = layout.run_start, layout.run_end, layout.run_state
    diag = torch.ones(layout.n_runs, dtype=torch.bool)
    diag[layout.run_ptr[1:-1]] = False          # the first run of every block but block 0 is its full prefix
    blocks = torch.arange(n)
    if not (torch.equal(qb[diag], blocks) and torch.equal(start[diag], blocks) and torch.equal(end[diag], blocks + 1)
            and bool((state[diag] == _PARTIAL).all())):
        return False
    if n > 1:
        pre = ~diag
        if not (torch.equal(start[pre], torch.zeros(n - 1, dtype=torch.int64)) and torch.equal(end[pre], blocks[1:])
                and bool((state[pre] == _FULL).all())):
            return False
    b = layout.block_q
    tril = torch.ones(b, b, dtype=torch.bool).tril_()
    for i in range(0, n, _TILES_PER_EVAL):
        ids = blocks[i:i + _TILES_PER_EVAL]
        tm = layout.tile_masks(ids, ids)
        # Cells past the length are False in tile_masks; compare within the valid square only.
        valid = ((ids * b)[:, None] + torch.arange(b)[None, :]) < layout.q_len       # [T, b]
        expect = tril[None] & valid[:, :, None] & valid[:, None, :]
        if not torch.equal(tm, expect):
            return False
    return True


def _view(t: torch.Tensor, start: int, step: int, G: int, n: int) -> torch.Tensor:
    """[Z, G, n, D] strided view of a [Z, L, D] tensor: rows start + g * step + [0, n)."""
    sz, sl, sd = t.stride()
    return t.as_strided((t.shape[0], G, n, t.shape[2]), (sz, step * sl, sl, sd), t.storage_offset() + start * sl)


def _run_plan(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              out: torch.Tensor, lse: torch.Tensor) -> None:
    """Execute a plan on 3-D views q [Z, Lq, D], k/v [Z, Lk, D] (k/v may have stride 0 on Z).

    ``out`` [Z, Lq, D] (float32/float64 accumulator or the result itself) and ``lse``
    [Z, Lq] start as 0 / -inf; ops either copy into them or merge by log-sum-exp.
    """
    neg_inf = float("-inf")
    for op in plan.ops:
        if op.span == 0 and not op.causal:
            _run_key_set(plan, op, q, k, v, scale, out, lse)
            continue
        per_row = q.shape[0] * q.shape[2] * max(q.element_size(), 4)
        with threads_for(q.shape[0] * op.G * op.rows * op.span, _SMALL_OP):
            if op.G == 1 and not op.causal and op.mask is None and op.rows * per_row > costs.CHUNK_BYTES:
                # One long query range on shared keys: cut its rows (a causal call cannot be cut,
                # its triangle is anchored at the first row; masked ops are one block tall).
                for r, n in _row_cuts(op.rows, costs.CHUNK_BYTES // per_row):
                    part = dataclasses.replace(op, r0=op.r0 + r, rows=n)
                    _run_op(plan, part, 0, 1, q, k, v, scale, out, lse, neg_inf)
                continue
            step = max(1, costs.CHUNK_BYTES // (op.rows * per_row))
            if op.extra:          # the gathered K and V are temporaries too
                step = max(1, min(step, costs.CHUNK_BYTES // (2 * (op.span + _extra_keys(op)) * per_row)))
            for g0 in range(0, op.G, step):
                _run_op(plan, op, g0, min(step, op.G - g0), q, k, v, scale, out, lse, neg_inf)


def _run_key_set(plan: Plan, op: Op, q, k, v, scale: float, out, lse) -> None:
    """A key-set op (only gathered keys: a sink, key columns) as two small matmuls merged by LSE in place.

    The fused kernel pays a fixed cost per query row that dwarfs a few keys' work (1024
    rows x 4 keys: ~60 ns per score against ~4 for wide calls, one thread), so the rows x E
    scores are computed directly, in the accumulator's dtype (float32 for bf16 inputs: exact
    products summed in float32, as the kernel's), with the additive mask of the cells the
    rest does not cover. The merge (:func:`_merge_lse`, pre-weighted) is folded into the
    second matmul: ``out`` is rescaled once and ``p @ v`` (its rows pre-weighted) is added
    onto it, so no [rows, D] temporary is made. Rows whose cells are all masked keep their
    values (weight an exact 0); an op that writes its rows first (a mask of key sets only)
    writes them, zeros / -inf included.
    """
    acc = out.dtype
    Z, D = q.shape[0], q.shape[2]
    kz, vz = (k[:1], v[:1]) if k.stride(0) == 0 and v.stride(0) == 0 else (k, v)   # shared kv: once
    kE = torch.cat([kz[:, a:b] for a, b in op.extra], 1).to(acc)                   # [Z|1, E, D]
    vE = torch.cat([vz[:, a:b] for a, b in op.extra], 1).to(acc)
    E = kE.shape[1]
    kT = kE.transpose(1, 2)
    vB = vE.expand(Z, E, D)
    add = None if op.mask is None else plan.additive(op.mask, acc)                  # [rows, E]
    # Consecutive items are one range of rows: as many per step as keep the scores (and bf16
    # queries converted to float32) under costs.CHUNK_BYTES; larger steps measured faster.
    row_bytes = Z * op.rows * (E + (D if q.dtype != acc else 0)) * out.element_size()
    per = max(1, costs.CHUNK_BYTES // row_bytes) if op.dr == op.rows else 1
    tiny = torch.finfo(acc).tiny
    for g0 in range(0, op.G, per):
        n = min(per, op.G - g0)
        r, R = op.r0 + g0 * op.dr, n * op.rows
        s = torch.matmul(q[:, r:r + R].to(acc), kT).mul_(scale)                    # [Z, R, E]
        if add is not None:
            s.view(Z, n, op.rows, E).add_(add)
        m = s.amax(-1, keepdim=True)
        has = torch.isfinite(m)                                                    # the row has a key here
        m.masked_fill_(~has, 0.0)
        p = s.sub_(m).exp_()
        total = p.sum(-1, keepdim=True)
        ov, lv = out[:, r:r + R], lse[:, r:r + R].unsqueeze(-1)
        if op.first:                                                               # nothing to merge with
            ov.copy_(torch.matmul(p.mul_(total.clamp_min(tiny).reciprocal_()), vB))
            lv.copy_(torch.where(has, m + total.log(), float("-inf")))
            continue
        _merge_lse(ov, lv, torch.where(has, m + total.log(), float("-inf")),
                   lambda w: ov.baddbmm_(p.mul_(w), vB), peak=m, total=total)


def _merge_lse(ov: torch.Tensor, lv: torch.Tensor, l: torch.Tensor, add, *, peak: torch.Tensor | None = None,
               total: torch.Tensor | None = None) -> None:
    """Merge a new part into rows that earlier ops wrote, by log-sum-exp, in place (the one merge).

    ``ov [..., R, D]`` and ``lv [..., R, 1]`` are the accumulator (its dtype throughout); the new
    part's log-sum-exp is ``l [..., R, 1]`` (-inf: the row has no key in it). ``add(w)`` must add
    ``w [..., R, 1]`` times the new part onto ``ov`` (after ``ov`` is rescaled), so the caller picks
    the fused op and no [R, D] temporary is made. The new part is either normalised (a kernel's
    output, weight ``exp(l - top)``), or pre-weighted: unnormalised ``exp(s - peak)`` rows that sum
    to ``total`` (``l = peak + log total``), weight ``exp(peak - top)`` and mass ``total`` times it,
    which spares dividing by ``total`` first. ``top`` is the larger lse (0 where both are -inf:
    no NaN; the weights are then 0 and the row keeps its zeros).
    """
    top = torch.maximum(lv, l)
    top.masked_fill_(~torch.isfinite(top), 0.0)
    wa = (lv - top).exp_()
    if total is None:
        wb = (l - top).exp_()
        den = wa + wb
    else:
        wb = torch.where(torch.isfinite(l), (peak - top).exp_(), 0.0)            # peak <= top: no overflow
        den = wa + total * wb
    inv = den.clamp_min(torch.finfo(den.dtype).tiny).reciprocal_()
    ov.mul_(wa * inv)
    add(wb * inv)
    lv.copy_(top + den.log())


def _extra_keys(op: Op) -> int:
    return sum(b - a for a, b in op.extra)


def _row_cuts(rows: int, want: int) -> list[tuple[int, int]]:
    """Cut ``rows`` query rows into pieces of about ``want`` rows that give the same bits.

    The kernel slices a call of >= 768 rows into 256-row pieces, each computed alone;
    pieces that are multiples of 256 rows, none shorter than 1024, keep those slices
    (and so every bit) unchanged.
    """
    step = max(1024, want // 256 * 256)
    if rows < 2 * step:
        return [(0, rows)]
    last = (rows // step - 1) * step          # the last piece takes the remainder too
    return [(r, step) for r in range(0, last, step)] + [(last, rows - last)]


def _run_op(plan: Plan, op: Op, g0: int, G: int, q, k, v, scale: float, out, lse, neg_inf: float) -> None:
    r0, k0 = op.r0 + g0 * op.dr, op.k0 + g0 * op.dk
    qs = _view(q, r0, op.dr, G, op.rows)
    ks = _view(k, k0, op.dk, G, op.span)
    vs = _view(v, k0, op.dk, G, op.span)
    if op.extra:
        # Gathered keys (a sink, key columns) in front of every item's own: one copy of the
        # keys the call reads (1 / rows of its work), instead of one more call and merge.
        Z = k.shape[0]
        ks = torch.cat([k[:, a:b].unsqueeze(1).expand(Z, G, b - a, k.shape[2]) for a, b in op.extra] + [ks], 2)
        vs = torch.cat([v[:, a:b].unsqueeze(1).expand(Z, G, b - a, v.shape[2]) for a, b in op.extra] + [vs], 2)
    if op.causal:
        o, l = _flash(qs, ks, vs, 0.0, True, scale=scale)
    elif op.mask is None:
        o, l = _flash(qs, ks, vs, 0.0, False, scale=scale)
    else:
        o, l = _flash(qs, ks, vs, 0.0, False, attn_mask=plan.additive(op.mask, q.dtype), scale=scale)
        if op.rows_empty is not None:
            # The kernel returns lse 0 (and zeros) for rows it saw no key for; mark them -inf.
            l.masked_fill_(plan.row_empty[op.rows_empty], neg_inf)
    ov = _view(out, r0, op.dr, G, op.rows)
    lv = _view(lse.unsqueeze(-1), r0, op.dr, G, op.rows).squeeze(-1)
    if op.first:
        ov.copy_(o)
        lv.copy_(l)
        return
    # Merge with what earlier ops wrote for these rows (all in the accumulator's precision;
    # addcmul_ promotes o itself, so no temporary the size of the output).
    _merge_lse(ov, lv.unsqueeze(-1), l.to(lv.dtype).unsqueeze(-1), lambda w: ov.addcmul_(o, w))


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp's dtype for inputs of ``dtype``: float64 for float64 (gradcheck), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """[X, Y, L, D] -> [X*Y, L, D] as a view when the strides allow it (else None)."""
    X, Y, L, D = t.shape
    sx, sy, sl, sd = t.stride()
    if X == 1 or sx == Y * sy:
        return t.as_strided((X * Y, L, D), (sy, sl, sd), t.storage_offset())
    return None


def _dilation(mask) -> tuple[int, int] | None:
    """(w, d) when ``mask`` is one residue-class window (``dilated(w, d)``), alone or intersected
    with primitives that cover every causal pair (``causal``, ``full``: it lies inside them).

    Asked of the primitive definitions (``kind.residue_window``, ``kind.covers_causal``).
    """
    from ..masks import Intersection, Primitive
    parts = mask.parts if isinstance(mask, Intersection) else (mask,)
    if not all(isinstance(p, Primitive) for p in parts):
        return None
    windows = [p.kind.residue_window(p.args) for p in parts]
    found = [wd for wd in windows if wd is not None]
    rest = [p for p, wd in zip(parts, windows) if wd is None and not p.kind.covers_causal(p.args)]
    if len(found) == 1 and not rest:
        return found[0]
    return None


def _causal_segments(layout: BlockLayout) -> list[tuple[int, int]] | None:
    """[(start, end)] when the layout is top-left causal within consecutive segments, else None.

    ``causal`` on a square layout is one segment; ``causal & document(n1, ...)`` is one per
    document (positions past the documents attend nothing: no segment, zero gradient).
    """
    from ..masks import Intersection, Primitive
    if layout.q_len != layout.kv_len or layout.q_offset != 0:
        return None
    parts = layout.mask.parts if isinstance(layout.mask, Intersection) else (layout.mask,)
    if not all(isinstance(p, Primitive) for p in parts):
        return None
    L = layout.q_len
    # Asked of the primitive definitions: exactly one part is `k <= q`, at most one packs segments.
    causal_parts = [p for p in parts if p.kind.is_causal(p.args)]
    packings = [p for p in parts if not p.kind.is_causal(p.args)]
    if len(causal_parts) != 1:
        return None
    if not packings:
        return [(0, L)]
    if len(packings) == 1:
        return packings[0].kind.causal_segments(packings[0].args, L)
    return None


def _forward_one_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                        scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """q [X, Y, Lq, D], k/v [X, Y, Lk, D] (possibly stride-0 expanded) -> fills out, lse in place."""
    kernel_jobs, calls = _split_jobs(_layout_jobs(q, k, v, layout, scale, out, lse))
    for call in calls:
        call()
    _run_kernel_jobs(kernel_jobs, scale)


class _KernelJob(NamedTuple):
    """A forward through the fused kernel: ``items`` on q/k/v into out / lse (``covered``: whether
    its items write every row; see :func:`kernel_items`)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    items: fused.Items
    covered: bool
    out: torch.Tensor
    lse: torch.Tensor


def _split_jobs(jobs: list) -> tuple[list[_KernelJob], list]:
    """:func:`_layout_jobs`'s jobs as (kernel jobs, calls to make)."""
    kernel = [job for job in jobs if isinstance(job, _KernelJob)]
    return kernel, [job for job in jobs if not isinstance(job, _KernelJob)]


def _run_kernel_jobs(jobs: list[_KernelJob], scale: float) -> None:
    """Kernel jobs with disjoint outputs as one :func:`fused.run` (its threads take them costliest first).

    Outputs are float32 or the inputs' dtype (:func:`blocksparse_forward` upcasts fp16); a bf16
    output is written by the kernel itself (from a float32 scratch per batch-head). Rows no item
    writes get zeros and lse -inf."""
    calls = []
    for j in jobs:
        if not j.covered:
            j.lse.fill_(float("-inf"))
            if j.out.dtype == torch.float32:
                j.out.zero_()
        calls.append([fused.forward_call(j.items, j.q, j.k, j.v, scale, j.out, j.lse, zero_rows=not j.covered)])
    fused.run(calls)


def _layout_jobs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                 scale: float, out: torch.Tensor, lse: torch.Tensor) -> list:
    """The forward of one layout as jobs with disjoint outputs, planned here (the caller's thread):
    kernel jobs (:class:`_KernelJob`, for :func:`_run_kernel_jobs`) and calls to make.

    Every compile and plan look-up happens now, so the calls may run on a worker
    (:func:`attnmask.threads.run_tasks`; the layout cache is not thread-safe).

    ``dilated(w, d)`` only pairs positions of one residue class mod d, where it is a
    sliding window of w: it runs as d window problems on strided views (no copies),
    so its cost is that of the w keys each row keeps, not of the w * d they span.
    """
    dil = _dilation(layout.mask)
    if dil is None or dil[1] == 1:
        if fused.usable(q.dtype, q.shape[-1]):
            return [_KernelJob(q, k, v, *kernel_items(layout), out, lse)]
        segments = _causal_segments(layout)
        if segments is not None and len(segments) * costs.MIN_SEGMENT_ROWS <= layout.q_len:
            # causal & document(...): each document is its own causal problem, one top-left
            # is_causal call on its rows and keys (the kernel visits only the triangle).
            work = layout.attended_pairs() * q.shape[0] * q.shape[1]

            def segments_job():
                with threads_for(work, _SMALL_WORK):
                    _forward_segments(q, k, v, segments, layout.q_len, scale, out, lse)
            return [segments_job]
        plan = plan_for(layout)
        return [lambda: _forward_plain(q, k, v, plan, scale, out, lse)]
    from ..primitives import causal, sliding
    w, d = dil
    Lq, Lk, q_offset = layout.q_len, layout.kv_len, layout.q_offset
    sub_mask = causal & sliding(w)
    jobs = []
    # Only the residues of the first min(d, Lq) rows have rows: loop over those (d can be huge).
    for i0 in range(min(d, Lq)):
        r = (q_offset + i0) % d                  # the residue class of row i0 (first row at position r mod d)
        if r >= Lk:
            def empty(i0=i0):                    # rows with no key: zeros / -inf
                out[:, :, i0::d].zero_()
                lse[:, :, i0::d].fill_(float("-inf"))
            jobs.append(empty)
            continue
        sub = sub_mask.compile(len(range(i0, Lq, d)), len(range(r, Lk, d)), q_offset=(q_offset + i0 - r) // d,
                               block_size=layout.block_size)
        qs, ks, vs, os_, ls = q[:, :, i0::d], k[:, :, r::d], v[:, :, r::d], out[:, :, i0::d], lse[:, :, i0::d]
        if fused.usable(q.dtype, q.shape[-1]):
            jobs.append(_KernelJob(qs, ks, vs, *kernel_items(sub), os_, ls))
        else:
            jobs.append(lambda qs=qs, ks=ks, vs=vs, os_=os_, ls=ls, plan=plan_for(sub): _forward_plain(
                qs, ks, vs, plan, scale, os_, ls))
    return jobs


def kernel_items(layout: BlockLayout) -> tuple[fused.Items, bool]:
    """The fused kernel's item table of ``layout`` (not a dilated one: see :func:`_layout_jobs`), and
    whether its items write every row (else rows no item writes must start at zeros / -inf).

    The one choice of a table, for the forward and the kernel's backward (which runs the same
    items: they cover every attended pair exactly once): causal segments (``causal``,
    ``causal & document(...)``) are one top-left causal item each (the kernel visits only their
    triangles, however short the documents); a plan that is exactly causal is one causal item;
    anything else is the items of the plan for the kernel (:data:`~attnmask.engines.costs.KERNEL`).
    """
    segments = _causal_segments(layout)
    if segments is not None:
        return fused.causal_items(tuple(segments)), sum(b - a for a, b in segments) == layout.q_len
    plan = plan_for(layout, KERNEL)
    if plan.causal:
        return fused.causal_items(((0, layout.q_len),)), True
    return fused.plan_items(plan), plan.covered


def _forward_segments(q, k, v, segments: list[tuple[int, int]], L: int, scale: float, out, lse) -> None:
    """One is_causal call per segment [a, b) of rows and keys; rows outside every segment attend nothing."""
    covered = 0
    for a, b in segments:
        o, l = _flash(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 0.0, True, scale=scale)
        out[:, :, a:b].copy_(o)
        lse[:, :, a:b].copy_(l)
        covered += b - a
    if covered < L:
        seen = torch.zeros(L, dtype=torch.bool)
        for a, b in segments:
            seen[a:b] = True
        out[:, :, ~seen] = 0
        lse[:, :, ~seen] = float("-inf")


def _forward_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan,
                   scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """A plan through ATen's flash calls (the fused kernel's path is :func:`kernel_items`)."""
    if plan.causal:
        o, l = _flash(q, k, v, 0.0, True, scale=scale)
        out.copy_(o)
        lse.copy_(l)
        return
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc = out if out.dtype == acc_dtype else torch.empty(out.shape, dtype=acc_dtype)
    acc_lse = lse if lse.dtype == acc_dtype else torch.empty(lse.shape, dtype=acc_dtype)
    if not plan.covered:
        # Rows no op writes have no key: zeros and lse -inf.
        acc.zero_()
        acc_lse.fill_(float("-inf"))
    views = [_flat(t) for t in (q, k, v, acc)]
    X, Y, L = acc_lse.shape
    sx, sy, sl = acc_lse.stride()
    lflat = acc_lse.as_strided((X * Y, L), (sy, sl), acc_lse.storage_offset()) if X == 1 or sx == Y * sy else None
    if all(x is not None for x in views) and lflat is not None:
        _run_plan(plan, *views[:3], scale, views[3], lflat)
    else:
        # Heads that share kv (stride 0) cannot be flattened with the batch: one x at a time.
        for x in range(q.shape[0]):
            _run_plan(plan, q[x], k[x], v[x], scale, acc[x], acc_lse[x])
    if acc is not out:
        out.copy_(acc)
    if acc_lse is not lse:
        lse.copy_(acc_lse)


def blocksparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: list[BlockLayout],
                        head_layout: torch.Tensor, scale: float,
                        out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact masked attention computed only on the non-empty tiles of ``layouts``.

    q ``[B, H, Lq, D]``; k, v ``[B, Hkv, Lk, D]`` with H a multiple of Hkv (query
    head h reads kv head ``h // (H // Hkv)``); ``head_layout`` int64 ``[B, H]``
    says which entry of ``layouts`` applies to batch element b, head h.
    Returns (out ``[B, H, Lq, D]`` in q's dtype (or ``out_dtype``: float32 keeps a bf16 call's
    accumulator unrounded, for the backward), lse ``[B, H, Lq]`` float32, float64 for
    float64 inputs): the
    natural-log log-sum-exp of the scaled scores of each row, -inf (and an
    all-zero output row) where a row attends to no key. Inputs are assumed
    validated by :func:`attnmask.engines.attention`; no autograd.

        >>> import torch, attnmask as am
        >>> q = k = v = torch.randn(1, 2, 300, 16)
        >>> lay = (am.causal & am.sliding(64)).compile(300)
        >>> out, lse = blocksparse_forward(q, k, v, [lay], torch.zeros(1, 2, dtype=torch.int64), 0.25)
        >>> out.shape, lse.dtype
        (torch.Size([1, 2, 300, 16]), torch.float32)
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    for lay in layouts:
        lay._check_lengths(Lq, Lk)
    if D == 0 or Lq == 0 or B == 0 or H == 0 or Lk == 0:
        return q.new_zeros(q.shape, dtype=out_dtype or q.dtype), torch.full((B, H, Lq), float("-inf"), dtype=lse_dtype(q.dtype))
    if q.dtype == torch.float16 and fused.usable(torch.float32, D):
        # float16: no CPU path here computes in it (ATen's fp16 route took 5.3x the float32
        # kernel's time at 8K: benchmarks/probe_fp16.py); the float32 kernel on upcast copies
        # (exact; 2x q, k, v's bytes), its float32 output rounded once, as the backward does.
        o32, lse = blocksparse_forward(q.float(), k.float(), v.float(), layouts, head_layout, scale)
        return (o32 if out_dtype == torch.float32 else o32.to(out_dtype or q.dtype)), lse
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype)
    lse = torch.empty((B, H, Lq), dtype=lse_dtype(q.dtype))
    head_layout = torch.as_tensor(head_layout, dtype=torch.int64)
    if head_layout.shape != (B, H):
        raise MaskValueError(f"head_layout must be [B, H] = [{B}, {H}], got {list(head_layout.shape)}")
    used = torch.unique(head_layout).tolist()
    # Attended pairs x heads: exact from structure, no plan needed (dilated masks never plan the original).
    # The fused kernel picks its own thread count per call (fused.run); the clamp is for the
    # ATen path's many small ops.
    kernel = fused.usable(q.dtype, D)
    work = 0 if kernel else sum(layouts[li].attended_pairs() * int((head_layout == li).sum()) for li in used)
    with contextlib.nullcontext() if kernel else threads_for(work, _SMALL_WORK):
        return _forward_groups(q, k, v, layouts, head_layout, used, scale, out, lse)


def _forward_groups(q, k, v, layouts, head_layout, used, scale, out, lse):
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rep = H // Hkv
    if len(used) == 1:
        lay = layouts[used[0]]
        if rep == 1:
            _forward_one_layout(q, k, v, lay, scale, out, lse)
        else:
            # Heads that share a kv head: view q as [B*Hkv, rep, L, D] and broadcast k/v
            # with a zero stride, so no copy of the keys is made.
            qv = q.reshape(B * Hkv, rep, Lq, D)
            kv_shape = (B * Hkv, rep, Lk, D)
            ke = k.reshape(B * Hkv, 1, Lk, D).expand(kv_shape)
            ve = v.reshape(B * Hkv, 1, Lk, D).expand(kv_shape)
            _forward_one_layout(qv, ke, ve, lay, scale, out.view(B * Hkv, rep, Lq, D),
                                lse.view(B * Hkv, rep, Lq))
        return out, lse
    # Heads (or batch elements) with different layouts: each run of neighbouring heads with one
    # layout inside a kv group is one problem on views (q[b, h0:h1] against k[b, j] broadcast with
    # a zero stride), so nothing is gathered and GQA never repeats K/V. The problems write
    # disjoint rows of out / lse. Kernel problems are one fused.run (its threads take them
    # costliest first); ATen problems with enough work (costs.SIDE_BY_SIDE_PAIRS) run side by
    # side, one intra-op thread each (run_tasks: small per-head calls gain little from a second
    # intra-op thread, while two problems at once run nearly twice as fast).
    kernel_jobs, tasks, work = [], [], []
    for bs, h0, h1, j, li in head_runs(head_layout, Hkv):
        n = h1 - h0
        kv_shape = (bs.stop - bs.start, n, Lk, D)
        jobs = _layout_jobs(q[bs, h0:h1], k[bs, j:j + 1].expand(kv_shape), v[bs, j:j + 1].expand(kv_shape),
                            layouts[li], scale, out[bs, h0:h1], lse[bs, h0:h1])
        kernel, calls = _split_jobs(jobs)
        kernel_jobs += kernel
        if calls:
            tasks.append(lambda calls=calls: [call() for call in calls])
            work.append(layouts[li].attended_pairs() * (bs.stop - bs.start) * n)
    if sum(work) >= costs.SIDE_BY_SIDE_PAIRS:
        run_tasks(tasks, work)
    else:
        for task in tasks:
            task()
    _run_kernel_jobs(kernel_jobs, scale)
    return out, lse


def head_runs(head_layout: torch.Tensor, Hkv: int) -> list[tuple[slice, int, int, int, int]]:
    """``(batch slice, h0, h1, kv head, layout)``: maximal runs of query heads with one layout in one kv group.

    O(B x H) Python work, no tensors. When every batch element has the same heads' layouts
    (per-head masks, no per_batch), the batch slice covers them all.

        >>> head_runs(torch.tensor([[0, 0, 1, 2, 2, 2]]), 2)
        [(slice(0, 1, None), 0, 2, 0, 0), (slice(0, 1, None), 2, 3, 0, 1), (slice(0, 1, None), 3, 6, 1, 2)]
    """
    B, H = head_layout.shape
    rep = H // Hkv
    rows = head_layout.tolist()
    batches = [slice(0, B)] if all(r == rows[0] for r in rows) else [slice(b, b + 1) for b in range(B)]
    out = []
    for bs in batches:
        row = rows[bs.start]
        for j in range(Hkv):
            h = j * rep
            while h < (j + 1) * rep:
                h1 = h + 1
                while h1 < (j + 1) * rep and row[h1] == row[h]:
                    h1 += 1
                out.append((bs, h, h1, j, row[h]))
                h = h1
    return out

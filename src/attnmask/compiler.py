"""The structural compiler: a Mask and a shape -> exact tile states, in ~linear time.

The grid of tiles is (query block ``qb``) x (key block ``c``). For every query
block the compiler keeps a partition of the key-block axis into *pieces*
``[c0, c1)`` with one state each: 0 empty, 1 partial, 2 full, 3 unknown. A
partial or unknown piece also carries a *residual*: the simplest sub-expression
that decides the piece (on a tile where ``a`` is full, ``a & b`` is just ``b``).
All piece arrays are flat numpy vectors sorted by (qb, c0), so every step is a
handful of vectorised passes over O(number of pieces), never over N^2 cells.

How each kind of subtree is classified exactly:

* ``q``/``k``/``d`` classes (any boolean combination of primitives that depend
  only on q, only on k, or only on q - k) are evaluated once on a 1-D axis
  (length Lq, Lk or Lq + Lk). A tile covers a contiguous range of that axis, so
  prefix sums answer "any attended? all attended?" exactly. For ``d`` a tile's
  diagonal window slides with ``c``; only runs of the 1-D array longer than a
  window can hold a constant tile, which gives closed-form key-block ranges.
* ``seg`` (``chunked``, ``document``): segment boundaries give, per query
  block, the key range it can see and where that range is full, analytically.
* operators combine piece lists by merging breakpoints; when both sides are
  partial the result is *unknown* with the combined residual.
* unknown pieces are resolved at the end: by the 1-D route when the residual is
  a pure class, otherwise by evaluating the residual densely on just those
  tiles (opaque ``mask_mod`` leaves and rare cross-class combinations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import maskmod
from .errors import LayoutTooLargeError
from .kinds import StructureClass, TileState
from .masks import Complement, Difference, Frame, Intersection, Mask, Primitive, Union, evaluate_at
from .primitives import full, none

# numpy arrays of states hold the enum's int8 codes; these names keep the vector code short.
EMPTY, PARTIAL, FULL, UNKNOWN = (int(TileState.EMPTY), int(TileState.PARTIAL), int(TileState.FULL),
                                 int(TileState.UNKNOWN))
SC = StructureClass
_I64 = np.int64

# Cells evaluated per batch when tiles must be checked densely.
_DENSE_BATCH_CELLS = 1 << 22
# Largest number of pieces (or tiles) one step may enumerate: ~0.5 GB per int64 array.
MAX_PIECES = 1 << 26
# Query rows compiled per pass of row-level refinement.
_REFINE_BATCH_ROWS = 1 << 18


@dataclass(frozen=True)
class Grid:
    """The shape being compiled: lengths, offset and block sizes."""

    q_len: int
    kv_len: int
    q_offset: int
    block_q: int
    block_k: int
    b: int = 0          # batch element and head that mask_mod leaves are evaluated for
    h: int = 0

    @property
    def frame(self) -> Frame:
        """The evaluation frame of mask_mod leaves (row index = position - q_offset, lengths known)."""
        return Frame(self.q_offset, self.q_len, self.kv_len)

    @property
    def n_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def n_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    def q_bounds(self, qb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions [qs, qe) of query blocks ``qb``."""
        r0 = qb * self.block_q
        r1 = np.minimum(r0 + self.block_q, self.q_len)
        return r0 + self.q_offset, r1 + self.q_offset

    def k_bounds(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Key positions [ks, ke) of key blocks ``c``."""
        ks = c * self.block_k
        return ks, np.minimum(ks + self.block_k, self.kv_len)


@dataclass
class Pieces:
    """Flat arrays, sorted by (qb, c0): piece i covers key blocks [c0, c1) of row qb."""

    qb: np.ndarray
    c0: np.ndarray
    c1: np.ndarray
    state: np.ndarray   # int8
    res: np.ndarray     # int32 residual id (-1: none)

    def __len__(self) -> int:
        return len(self.qb)

    def take(self, idx) -> "Pieces":
        return Pieces(self.qb[idx], self.c0[idx], self.c1[idx], self.state[idx], self.res[idx])

    @staticmethod
    def concat(parts: list["Pieces"]) -> "Pieces":
        return Pieces(*(np.concatenate([getattr(p, f) for p in parts])
                        for f in ("qb", "c0", "c1", "state", "res")))


class Residuals:
    """Interning table: residual masks <-> small integer ids."""

    def __init__(self):
        self.masks: list[Mask] = []
        self.ids: dict[Mask, int] = {}

    def id(self, mask: Mask) -> int:
        i = self.ids.get(mask)
        if i is None:
            i = len(self.masks)
            self.masks.append(mask)
            self.ids[mask] = i
        return i


def _sort_key(grid: Grid, qb: np.ndarray, c: np.ndarray) -> np.ndarray:
    return qb.astype(_I64) * (grid.n_kv_blocks + 1) + c


def _sorted(grid: Grid, p: Pieces) -> Pieces:
    order = np.argsort(_sort_key(grid, p.qb, p.c0), kind="stable")
    return p.take(order)


def coalesce(grid: Grid, p: Pieces) -> Pieces:
    """Merge neighbouring pieces of the same row with equal state and residual."""
    if len(p) <= 1:
        return p
    same = ((p.qb[1:] == p.qb[:-1]) & (p.c0[1:] == p.c1[:-1]) &
            (p.state[1:] == p.state[:-1]) & (p.res[1:] == p.res[:-1]))
    if not same.any():
        return p
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    ends = np.concatenate((starts[1:], [len(p)])) - 1
    return Pieces(p.qb[starts], p.c0[starts], p.c1[ends], p.state[starts], p.res[starts])


def _assemble(grid: Grid, regions: Pieces, seg_region: np.ndarray, seg_c0: np.ndarray,
              seg_c1: np.ndarray, seg_state: np.ndarray, seg_res: np.ndarray,
              gap_state: int, gap_res: int) -> Pieces:
    """Pieces covering each region: the given disjoint segments plus filled gaps.

    ``seg_region`` indexes ``regions``; segments must lie inside their region.
    """
    keep = seg_c1 > seg_c0
    seg_region, seg_c0, seg_c1 = seg_region[keep], seg_c0[keep], seg_c1[keep]
    seg_state, seg_res = seg_state[keep], seg_res[keep]
    order = np.lexsort((seg_c0, seg_region))
    seg_region, seg_c0, seg_c1 = seg_region[order], seg_c0[order], seg_c1[order]
    seg_state, seg_res = seg_state[order], seg_res[order]
    n = len(seg_region)
    # gap before each segment: from the previous segment's end (same region) or region start
    prev_end = np.empty(n, dtype=_I64)
    if n:
        prev_end[0] = regions.c0[seg_region[0]]
        same_region = seg_region[1:] == seg_region[:-1]
        prev_end[1:] = np.where(same_region, seg_c1[:-1], regions.c0[seg_region[1:]])
    # gap after the last segment of each region, and regions without segments
    last_end = regions.c0.copy()
    if n:
        is_last = np.ones(n, dtype=bool)
        is_last[:-1] = seg_region[1:] != seg_region[:-1]
        last_end[seg_region[is_last]] = seg_c1[is_last]
    gap_region = np.concatenate((seg_region, np.arange(len(regions))))
    gap_c0 = np.concatenate((prev_end, last_end))
    gap_c1 = np.concatenate((seg_c0, regions.c1))
    gkeep = gap_c1 > gap_c0
    m = int(gkeep.sum())
    out_region = np.concatenate((seg_region, gap_region[gkeep]))
    out = Pieces(
        regions.qb[out_region],
        np.concatenate((seg_c0, gap_c0[gkeep])),
        np.concatenate((seg_c1, gap_c1[gkeep])),
        np.concatenate((seg_state.astype(np.int8), np.full(m, gap_state, dtype=np.int8))),
        np.concatenate((seg_res.astype(np.int32), np.full(m, gap_res, dtype=np.int32))),
    )
    return coalesce(grid, _sorted(grid, out))


def _states_from_counts(count: np.ndarray, total: np.ndarray) -> np.ndarray:
    return np.where(count == 0, EMPTY, np.where(count == total, FULL, PARTIAL)).astype(np.int8)


def _runs_1d(values: np.ndarray):
    """Run-length encode a 1-D array: (starts, ends, values)."""
    if len(values) == 0:
        return np.zeros(0, _I64), np.zeros(0, _I64), values[:0]
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(_I64)
    ends = np.concatenate((change, [len(values)])).astype(_I64)
    return starts, ends, values[starts]


def _merge_unique(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two sorted int arrays (np.union1d hashes, ~100x slower here)."""
    x = np.concatenate((a, b))
    x.sort(kind="stable")  # timsort: two sorted runs merge in linear time
    keep = np.empty(len(x), dtype=bool)
    keep[:1] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def expand_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [lo_i, hi_i): (owner index i, value) for every value in every range."""
    n = np.maximum(hi - lo, 0)
    total = int(n.sum())
    if total > MAX_PIECES:
        raise LayoutTooLargeError(
            f"this layout needs {total:,} pieces (limit {MAX_PIECES:,}): the mask's pattern changes faster "
            f"than the block size over this length; use a larger block_size")
    owner = np.repeat(np.arange(len(lo)), n)
    if len(owner) == 0:
        return owner.astype(_I64), np.zeros(0, _I64)
    first = np.repeat(np.cumsum(n) - n, n)
    return owner.astype(_I64), np.repeat(lo, n) + (np.arange(len(owner)) - first)


# ---------------------------------------------------------------------------
# 1-D evaluation of pure classes
# ---------------------------------------------------------------------------

class Axis1D:
    """A pure q/k/d subtree evaluated on its 1-D axis, with prefix sums."""

    def __init__(self, mask: Mask, cls: StructureClass, grid: Grid):
        self.cls = cls
        if cls == SC.Q:
            self.lo = grid.q_offset
            pos = torch.arange(grid.q_offset, grid.q_offset + grid.q_len, dtype=torch.int64)
            vals = mask.evaluate(pos, torch.zeros(1, dtype=torch.int64))
        elif cls == SC.K:
            self.lo = 0
            pos = torch.arange(grid.kv_len, dtype=torch.int64)
            vals = mask.evaluate(torch.zeros(1, dtype=torch.int64), pos)
        else:  # d = q - k
            self.lo = grid.q_offset - grid.kv_len + 1
            pos = torch.arange(self.lo, grid.q_offset + grid.q_len, dtype=torch.int64)
            vals = mask.evaluate(pos, torch.zeros(1, dtype=torch.int64))
        self.values = vals.numpy().view(np.int8)
        self.n = len(self.values)
        self._csum: np.ndarray | None = None
        self._csum_d: np.ndarray | None = None

    # Prefix sums are built on first use: classification of d-class masks
    # needs only the run-length encoding, counting needs the sums.
    @property
    def csum(self) -> np.ndarray:
        if self._csum is None:
            self._csum = np.zeros(self.n + 1, dtype=_I64)
            np.cumsum(self.values, out=self._csum[1:])
        return self._csum

    @property
    def csum_d(self) -> np.ndarray:
        if self._csum_d is None:
            self._csum_d = np.zeros(self.n + 1, dtype=_I64)
            np.cumsum(self.values * (np.arange(self.n, dtype=_I64) + self.lo), out=self._csum_d[1:])
        return self._csum_d

    def runs(self):
        """Run-length encoding of the values (cached)."""
        if not hasattr(self, "_runs"):
            self._runs = _runs_1d(self.values)
        return self._runs

    def window_states(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """int8 tile state of the axis positions [a, b] (inclusive, inside the axis), from the runs alone.

        No prefix sums: a window is constant exactly when one run holds it.
        """
        rs, re, rv = self.runs()
        i = np.searchsorted(rs, a - self.lo, side="right") - 1
        one = re[i] > b - self.lo
        return np.where(one, np.where(rv[i] == 1, FULL, EMPTY), PARTIAL).astype(np.int8)

    def count(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Attended values at axis positions [a, b] (inclusive), clipped to the axis."""
        i0 = np.clip(a - self.lo, 0, self.n)
        i1 = np.clip(b + 1 - self.lo, 0, self.n)
        return np.where(i1 > i0, self.csum[np.maximum(i1, i0)] - self.csum[i0], 0)

    def _sum_d(self, a, b):
        """sum of d over attended d in [a, b] (inclusive)."""
        i0 = np.clip(a - self.lo, 0, self.n)
        i1 = np.clip(b + 1 - self.lo, 0, self.n)
        return np.where(i1 > i0, self.csum_d[np.maximum(i1, i0)] - self.csum_d[i0], 0)

    def count_rect(self, qs, qe, ks, ke) -> np.ndarray:
        """Exact attended cells in rectangles of positions [qs, qe) x [ks, ke)."""
        h = qe - qs
        w = ke - ks
        if self.cls == SC.Q:
            return self.count(qs, qe - 1) * w
        if self.cls == SC.K:
            return self.count(ks, ke - 1) * h
        # Cells with q - k = d number m(d) = min(d - dlo + 1, dhi - d + 1, h, w):
        # a trapezoid. Sum attended d weighted by m(d) in three linear pieces.
        dlo = qs - (ke - 1)
        dhi = (qe - 1) - ks
        mn = np.minimum(h, w)
        rise_end = dlo + mn - 2          # d in [dlo, rise_end]: m = d - dlo + 1 (< mn)
        fall_start = dhi - mn + 2        # d in [fall_start, dhi]: m = dhi - d + 1 (< mn)
        total = (self._sum_d(dlo, rise_end) - (dlo - 1) * self.count(dlo, rise_end))
        total += mn * self.count(rise_end + 1, fall_start - 1)
        total += (dhi + 1) * self.count(fall_start, dhi) - self._sum_d(fall_start, dhi)
        return total


# ---------------------------------------------------------------------------
# classifiers: each takes regions (Pieces used as (qb, c0, c1)) and returns
# pieces that partition exactly those regions
# ---------------------------------------------------------------------------

class Compiler:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.residuals = Residuals()
        self._axis_cache: dict[Mask, Axis1D] = {}
        self.dense_tiles = 0    # tiles evaluated cell by cell (residuals with mask_mod leaves)
        self.refined_tiles = 0  # tiles resolved by compiling their residual row by row
        self._fine: "Compiler | None" = None

    def axis(self, mask: Mask, cls: str) -> Axis1D:
        ax = self._axis_cache.get(mask)
        if ax is None:
            ax = self._axis_cache[mask] = Axis1D(mask, cls, self.grid)
        return ax

    # -- entry point --
    def run(self, mask: Mask) -> Pieces:
        g = self.grid
        nqb = g.n_q_blocks
        regions = Pieces(np.arange(nqb, dtype=_I64), np.zeros(nqb, _I64), np.full(nqb, g.n_kv_blocks, _I64),
                         np.zeros(nqb, np.int8), np.full(nqb, -1, np.int32))
        pieces = self.classify(mask, regions)
        return self.resolve(pieces)

    def classify(self, mask: Mask, regions: Pieces) -> Pieces:
        cls = mask.structure_class()
        if cls == SC.CONST:
            full = bool(mask.evaluate(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))[0])
            return self._uniform(regions, FULL if full else EMPTY, -1)
        if cls == SC.Q:
            return self._classify_q(mask, regions)
        if cls == SC.K:
            return self._classify_k(mask, regions)
        if cls == SC.D:
            return self._classify_d(mask, regions)
        if cls == SC.SEG:
            return self._classify_seg(mask, regions)
        if cls == SC.RECT:
            return self._classify_rect(mask, regions)
        if cls == SC.OPAQUE:
            return self._classify_opaque(mask, regions)
        if isinstance(mask, Primitive) and mask.lowered() is not None:
            return self.classify(mask.lowered(), regions)   # e.g. prefix_lm(p) as causal | sink(p)
        if isinstance(mask, Complement):
            return self._complement(self.classify(mask.inner, regions))
        if isinstance(mask, (Union, Intersection)):
            op = "|" if isinstance(mask, Union) else "&"
            out = self.classify(mask.parts[0], regions)
            for part in mask.parts[1:]:
                out = self._combine(op, out, self.classify(part, regions))
            return out
        if isinstance(mask, Difference):
            return self._combine("-", self.classify(mask.left, regions), self.classify(mask.right, regions))
        raise AssertionError(f"cannot classify {mask!r}")  # pragma: no cover

    # -- leaves --
    def _classify_opaque(self, leaf: Mask, regions: Pieces) -> Pieces:
        """A mask_mod leaf: tiles its bounds prove full or empty, the rest unknown (maskmod.py)."""
        if isinstance(leaf, Complement):           # ~leaf is opaque too: classify the leaf, flip it
            return self._complement(self.classify(leaf.inner, regions))
        g = self.grid
        rid = self.residuals.id(leaf)
        if not isinstance(leaf, maskmod.MaskMod):
            return self._uniform(regions, UNKNOWN, rid)
        found = maskmod.classify_regions(leaf, g.frame, g.b, g.h, g.block_q, g.block_k,
                                         regions.qb, regions.c0, regions.c1)
        if found is None:
            return self._uniform(regions, UNKNOWN, rid)
        owner, c0, c1, state = found
        return Pieces(regions.qb[owner], c0, c1, state, np.where(state == UNKNOWN, rid, -1).astype(np.int32))

    def _uniform(self, regions: Pieces, state: int, res: int) -> Pieces:
        return Pieces(regions.qb, regions.c0, regions.c1, np.full(len(regions), state, np.int8),
                      np.full(len(regions), res if state in (PARTIAL, UNKNOWN) else -1, np.int32))

    def _classify_q(self, mask: Mask, regions: Pieces) -> Pieces:
        ax = self.axis(mask, SC.Q)
        qs, qe = self.grid.q_bounds(regions.qb)
        state = _states_from_counts(ax.count(qs, qe - 1), qe - qs)
        rid = self.residuals.id(mask)
        return Pieces(regions.qb, regions.c0, regions.c1, state,
                      np.where(state == PARTIAL, rid, -1).astype(np.int32))

    def _classify_k(self, mask: Mask, regions: Pieces) -> Pieces:
        g = self.grid
        ax = self.axis(mask, SC.K)
        rid = self.residuals.id(mask)
        if int((regions.c1 - regions.c0).sum()) < g.n_kv_blocks:
            # Few narrow regions (row-level refinement of a handful of tiles): classify just
            # their key blocks, not every block of the key axis.
            owner, c = expand_ranges(regions.c0, regions.c1)
            ks, ke = g.k_bounds(c)
            st = _states_from_counts(ax.count(ks, ke - 1), ke - ks)
            return coalesce(g, Pieces(regions.qb[owner], c, c + 1, st,
                                      np.where(st == PARTIAL, rid, -1).astype(np.int32)))
        c = np.arange(g.n_kv_blocks, dtype=_I64)
        ks, ke = g.k_bounds(c)
        col_state = _states_from_counts(ax.count(ks, ke - 1), ke - ks)
        rs, re, rv = _runs_1d(col_state)
        # runs overlapping each region
        i0 = np.searchsorted(re, regions.c0, side="right")
        i1 = np.searchsorted(rs, regions.c1, side="left")
        owner, run = expand_ranges(i0, i1)
        c0 = np.maximum(rs[run], regions.c0[owner])
        c1 = np.minimum(re[run], regions.c1[owner])
        st = rv[run]
        return Pieces(regions.qb[owner], c0, c1, st, np.where(st == PARTIAL, rid, -1).astype(np.int32))

    def _classify_d(self, mask: Mask, regions: Pieces) -> Pieces:
        g = self.grid
        ax = self.axis(mask, SC.D)
        rid = self.residuals.id(mask)
        bk = g.block_k
        qs, qe = g.q_bounds(regions.qb)
        n_full_k = g.kv_len // bk   # key blocks of full size; a shorter last one is checked apart
        # Runs of the d-array (absolute d, inclusive ends) that can contain a tile's window.
        rs, re, rv = ax.runs()
        a_run = rs + ax.lo
        b_run = re - 1 + ax.lo
        min_window = int((qe - qs).min()) + bk - 1 if len(regions) else 0
        long = (re - rs) >= min_window
        a_run, b_run, rv = a_run[long], b_run[long], rv[long]
        # Runs overlapping each region's d-range.
        lo_c = regions.c0
        hi_c = np.minimum(regions.c1, n_full_k)      # only full-size blocks here
        d_min = qs - np.minimum(hi_c * bk, g.kv_len) + 1
        d_max = qe - 1 - lo_c * bk
        i0 = np.searchsorted(b_run, d_min, side="left")
        i1 = np.searchsorted(a_run, d_max, side="right")
        owner, run = expand_ranges(i0, np.where(hi_c > lo_c, i1, i0))
        # window of tile c is [qs - (c+1) bk + 1, qe - 1 - c bk]; inside run [A, B] iff
        # ceil((qe - 1 - B) / bk) <= c <= floor((qs + 1 - A - bk) / bk)
        o_qs, o_qe = qs[owner], qe[owner]
        c_lo = -((-(o_qe - 1 - b_run[run])) // bk)
        c_hi = (o_qs + 1 - a_run[run] - bk) // bk + 1
        c_lo = np.maximum(c_lo, lo_c[owner])
        c_hi = np.minimum(c_hi, hi_c[owner])
        seg_state = np.where(rv[run] == 1, FULL, EMPTY).astype(np.int8)
        seg_region, seg_c0, seg_c1 = owner, c_lo, c_hi
        seg_res = np.full(len(owner), -1, np.int32)
        # The shorter last key block: check its window directly.
        if g.kv_len % bk:
            last = g.n_kv_blocks - 1
            has_last = (regions.c0 <= last) & (regions.c1 > last)
            idx = np.flatnonzero(has_last)
            ks = last * bk
            st = ax.window_states(qs[idx] - (g.kv_len - 1), qe[idx] - 1 - ks)
            seg_region = np.concatenate((seg_region, idx))
            seg_c0 = np.concatenate((seg_c0, np.full(len(idx), last, _I64)))
            seg_c1 = np.concatenate((seg_c1, np.full(len(idx), last + 1, _I64)))
            seg_state = np.concatenate((seg_state, st))
            seg_res = np.concatenate((seg_res, np.where(st == PARTIAL, rid, -1).astype(np.int32)))
        # Whatever no run covers sees both values: partial.
        return _assemble(g, regions, seg_region, seg_c0, seg_c1, seg_state, seg_res, PARTIAL, rid)

    def _segments(self, prim: Primitive):
        """(segment_of(pos) -> ids, start(ids), end(ids), real-position range) of a SEG primitive."""
        segs = prim.kind.segments(prim.args)
        return segs.of, segs.start, segs.end, segs.real

    def _classify_rect(self, prim: Primitive, regions: Pieces) -> Pieces:
        """A RECT primitive from the key ranges it names (see ``PrimitiveKind.key_ranges``).

        A tile inside a FULL range is full; a tile inside a PARTIAL range, or at the edge of
        any range, is partial; tiles of UNKNOWN ranges are counted in closed form
        (``count_rects``); every other tile is empty. Work is O(ranges + counted tiles).
        """
        g = self.grid
        bk, nkb, kv = g.block_k, g.n_kv_blocks, g.kv_len
        qs, qe = g.q_bounds(regions.qb)
        owner, lo, hi, st = prim.kind.key_ranges(prim.args, qs, qe)
        lo, hi = np.clip(lo, 0, kv), np.clip(hi, 0, kv)
        keep = hi > lo
        owner, lo, hi, st = owner[keep], lo[keep], hi[keep], np.asarray(st, np.int8)[keep]
        # touching ranges of one state become one (a tile across two FULL ranges is full)
        if len(owner) > 1:
            join = (owner[1:] == owner[:-1]) & (hi[:-1] == lo[1:]) & (st[1:] == st[:-1])
            if join.any():
                starts = np.flatnonzero(np.concatenate(([True], ~join)))
                ends = np.concatenate((starts[1:], [len(owner)])) - 1
                owner, lo, hi, st = owner[starts], lo[starts], hi[ends], st[starts]
        r0, r1 = regions.c0[owner], regions.c1[owner]
        # interior tiles lie inside one range; edge tiles (at most two a range) may be shared
        i0 = -(-lo // bk)
        i1 = np.maximum(np.where(hi >= kv, nkb, hi // bk), i0)
        left, right = lo // bk, i1
        has_left = left < i0
        has_right = (right < -(-hi // bk)) & ~(has_left & (right == left))
        edge_state = np.where(st == UNKNOWN, UNKNOWN, PARTIAL).astype(np.int8)
        e_owner = np.stack((owner, owner), 1).ravel()
        e_c = np.stack((left, right), 1).ravel()
        e_state = np.stack((edge_state, edge_state), 1).ravel()
        e_keep = np.stack((has_left, has_right), 1).ravel()
        e_keep &= (e_c >= np.repeat(r0, 2)) & (e_c < np.repeat(r1, 2))
        e_owner, e_c, e_state = e_owner[e_keep], e_c[e_keep], e_state[e_keep]
        if len(e_c) > 1:        # ranges come sorted, so edge tiles do: merge equal neighbours
            key = e_owner * (nkb + 1) + e_c
            if not bool((key[1:] >= key[:-1]).all()):
                order = np.argsort(key, kind="stable")
                e_owner, e_c, e_state, key = e_owner[order], e_c[order], e_state[order], key[order]
            first = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
            e_state = np.maximum.reduceat(e_state, first)     # UNKNOWN (3) wins over PARTIAL (1)
            e_owner, e_c = e_owner[first], e_c[first]
        i0, i1 = np.maximum(i0, r0), np.minimum(i1, r1)
        inner = i1 > i0
        seg_region = np.concatenate((owner[inner], e_owner))
        seg_c0 = np.concatenate((i0[inner], e_c))
        seg_c1 = np.concatenate((i1[inner], e_c + 1))
        seg_state = np.concatenate((st[inner], e_state))
        unknown = seg_state == UNKNOWN
        if unknown.any():
            t_owner, c = expand_ranges(seg_c0[unknown], seg_c1[unknown])
            t_region = seg_region[unknown][t_owner]
            ks, ke = g.k_bounds(c)
            counts = prim.kind.count_rects(prim.args, qs[t_region], qe[t_region], ks, ke)
            t_state = _states_from_counts(counts, (qe[t_region] - qs[t_region]) * (ke - ks))
            known = ~unknown
            seg_region = np.concatenate((seg_region[known], t_region))
            seg_c0 = np.concatenate((seg_c0[known], c))
            seg_c1 = np.concatenate((seg_c1[known], c + 1))
            seg_state = np.concatenate((seg_state[known], t_state))
        rid = self.residuals.id(prim)
        return _assemble(g, regions, seg_region, seg_c0, seg_c1, seg_state,
                         np.where(seg_state == PARTIAL, rid, -1), EMPTY, -1)

    def _classify_seg(self, prim: Primitive, regions: Pieces) -> Pieces:
        g = self.grid
        bk = g.block_k
        seg_of, seg_start, seg_end, real = self._segments(prim)
        qs, qe = g.q_bounds(regions.qb)
        if real is None:
            rq0, rq1 = qs, qe
        else:
            rq0, rq1 = np.maximum(qs, real[0]), np.minimum(qe, real[1])
        has_rows = rq1 > rq0
        padded = (rq0 > qs) | (rq1 < qe)
        safe0 = np.where(has_rows, rq0, 0 if real is None else real[0])
        safe1 = np.where(has_rows, rq1 - 1, 0 if real is None else real[0])
        sa, sb = seg_of(safe0), seg_of(safe1)
        key_lo = np.clip(seg_start(sa), 0, g.kv_len)
        key_hi = np.clip(seg_end(sb), 0, g.kv_len)
        has_keys = has_rows & (key_hi > key_lo)
        touch0 = key_lo // bk
        touch1 = -(-key_hi // bk)
        single = (sa == sb) & ~padded
        full0 = -(-key_lo // bk)
        full1 = np.where(key_hi == g.kv_len, g.n_kv_blocks, key_hi // bk)
        full1 = np.maximum(full1, full0)
        full0 = np.where(single, full0, touch1)
        full1 = np.where(single, full1, touch1)
        # three candidate segments per region: partial head, full middle, partial tail
        r = np.arange(len(regions))
        clip = lambda x: np.clip(x, regions.c0, regions.c1)  # noqa: E731
        head = (clip(touch0), clip(np.minimum(full0, touch1)))
        mid = (clip(full0), clip(full1))
        tail = (clip(np.maximum(full1, touch0)), clip(touch1))
        rid = self.residuals.id(prim)
        seg_region = np.concatenate((r, r, r))
        keep = np.concatenate((has_keys, has_keys, has_keys))
        seg_c0 = np.concatenate((head[0], mid[0], tail[0]))
        seg_c1 = np.concatenate((head[1], mid[1], tail[1]))
        n = len(r)
        seg_state = np.concatenate((np.full(n, PARTIAL), np.full(n, FULL), np.full(n, PARTIAL))).astype(np.int8)
        seg_res = np.where(seg_state == PARTIAL, rid, -1).astype(np.int32)
        return _assemble(g, regions, seg_region[keep], seg_c0[keep], seg_c1[keep], seg_state[keep],
                         seg_res[keep], EMPTY, -1)

    # -- operators --
    def _complement(self, p: Pieces) -> Pieces:
        state = p.state.copy()
        state[p.state == EMPTY] = FULL
        state[p.state == FULL] = EMPTY
        res = p.res.copy()
        for rid in np.unique(p.res[p.res >= 0]):
            res[p.res == rid] = self.residuals.id(~self.residuals.masks[rid])
        res[(state == EMPTY) | (state == FULL)] = -1
        return Pieces(p.qb, p.c0, p.c1, state, res)

    def _combine(self, op: str, a: Pieces, b: Pieces) -> Pieces:
        g = self.grid
        ka = _sort_key(g, a.qb, a.c0)
        kb = _sort_key(g, b.qb, b.c0)
        starts = _merge_unique(ka, kb)
        ia = np.searchsorted(ka, starts, side="right") - 1
        ib = np.searchsorted(kb, starts, side="right") - 1
        qb = a.qb[ia]
        c0 = starts - qb * (g.n_kv_blocks + 1)
        c1 = np.minimum(a.c1[ia], b.c1[ib])
        sa, sb = a.state[ia], b.state[ib]
        ra, rb = a.res[ia], b.res[ib]
        E, F, U = EMPTY, FULL, UNKNOWN
        state = np.full(len(starts), U, np.int8)
        res = np.full(len(starts), -1, np.int32)
        # Where one side is constant the other side passes through (maybe negated);
        # where both sides are undecided the result is unknown with a joint residual.
        if op == "&":
            state[(sa == E) | (sb == E)] = E
            pass_b = (sa == F) & (sb != E)
            pass_a = (sb == F) & (sa != E) & ~pass_b
        elif op == "|":
            state[(sa == F) | (sb == F)] = F
            pass_b = (sa == E) & (sb != F)
            pass_a = (sb == E) & (sa != F) & ~pass_b
        else:  # a - b
            state[(sa == E) | (sb == F)] = E
            pass_a = (sb == E) & (sa != E)
            pass_b = np.zeros_like(pass_a)
            negate_b = (sa == F) & (sb != F) & (sb != E)
            state[(sa == F) & (sb == E)] = F
        state[pass_a] = sa[pass_a]
        res[pass_a] = ra[pass_a]
        state[pass_b] = sb[pass_b]
        res[pass_b] = rb[pass_b]
        if op == "-":
            state[negate_b] = sb[negate_b]
            for rid in np.unique(rb[negate_b]):
                sel = negate_b & (rb == rid)
                res[sel] = self.residuals.id(~self.residuals.masks[rid])
        both = (state == U) & (res == -1)
        if both.any():
            width = len(self.residuals.masks) + 1
            pair_key = ra[both].astype(_I64) * width + rb[both]
            uniq, inverse = np.unique(pair_key, return_inverse=True)
            joint = np.empty(len(uniq), np.int32)
            for i, key in enumerate(uniq.tolist()):
                ma, mb = self.residuals.masks[key // width], self.residuals.masks[key % width]
                joint[i] = self.residuals.id(ma & mb if op == "&" else ma | mb if op == "|" else ma - mb)
            res[both] = joint[inverse.reshape(-1)]
        return coalesce(g, Pieces(qb, c0, c1, state, res))

    # -- resolution of unknown pieces --
    def resolve(self, p: Pieces) -> Pieces:
        unknown = p.state == UNKNOWN
        if not unknown.any():
            return p
        keep = p.take(~unknown)
        parts = [keep]
        u = p.take(unknown)
        for rid in np.unique(u.res):
            sel = u.take(u.res == rid)
            residual = self.residuals.masks[rid]
            cls = residual.structure_class()
            if cls.one_axis or cls in (SC.SEG, SC.RECT):
                parts.append(self.classify(residual, Pieces(sel.qb, sel.c0, sel.c1, sel.state, sel.res)))
            else:
                parts.append(self._resolve_dense(residual, rid, sel))
        return coalesce(self.grid, _sorted(self.grid, Pieces.concat(parts)))

    def _resolve_dense(self, residual: Mask, rid: int, sel: Pieces) -> Pieces:
        g = self.grid
        if _has_opaque(residual):   # refuse before enumerating the tiles, not after
            maskmod.check_open_tiles(residual, int((sel.c1 - sel.c0).sum()), g.block_q, g.block_k, g.q_len, g.kv_len)
        owner, c = expand_ranges(sel.c0, sel.c1)
        qb = sel.qb[owner]
        if isinstance(residual, maskmod.MaskMod):
            # a lone mask_mod leaf: probed witnesses prove most open tiles partial (maskmod.tile_states)
            self.dense_tiles += len(c)
            state = maskmod.tile_states(residual, g.frame, g.b, g.h, g.block_q, g.block_k, qb, c)
            return Pieces(qb, c, c + 1, state, np.where(state == PARTIAL, rid, -1).astype(np.int32))
        qs, qe = g.q_bounds(qb)
        ks, ke = g.k_bounds(c)
        counts = self.count_tiles(residual, qb, c)
        state = _states_from_counts(counts, (qe - qs) * (ke - ks))
        return Pieces(qb, c, c + 1, state, np.where(state == PARTIAL, rid, -1).astype(np.int32))

    def count_tiles(self, mask: Mask, qb: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Exact attended cells of tiles (qb[i], c[i]) of a cross-class residual."""
        return self.count_block_ranges(mask, qb, c, c + 1)

    def count_block_ranges(self, mask: Mask, qb: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
        """Exact attended cells of query block qb[i] x key blocks [c0[i], c1[i]) of a cross-class residual.

        Cheapest exact route first: cut at segment boundaries (closed form),
        else cell evaluation when rows would meet too many breakpoints (or a
        mask_mod leaf is involved), else row-level compilation.
        """
        g = self.grid
        qs, qe = g.q_bounds(qb)
        ks = c0 * g.block_k
        ke = np.minimum(c1 * g.block_k, g.kv_len)
        by_segments = self.count_rects_by_segments(mask, qs, qe, ks, ke)
        if by_segments is not None:
            return by_segments
        if isinstance(mask, maskmod.MaskMod):
            # a lone mask_mod leaf: its bounds settle sub-rectangles, only open 8 x 8 ones are evaluated
            counts = maskmod.count_rects(mask, g.frame, g.b, g.h, qs - g.q_offset, qe - g.q_offset, ks, ke)
            if counts is not None:
                self.dense_tiles += int((c1 - c0).sum())
                return counts
        if not self.refine_pays(mask):
            owner, c = expand_ranges(c0, c1)
            if _has_opaque(mask):
                maskmod.check_dense_budget(mask, len(c) * g.block_q * g.block_k, g.q_len, g.kv_len)
            self.dense_tiles += len(c)
            per_tile = tile_counts_dense(mask, g, qb[owner], c)
            return np.bincount(owner, weights=per_tile, minlength=len(qb)).astype(_I64)
        self.refined_tiles += int((c1 - c0).sum())
        r0 = qb * g.block_q
        owner, row = expand_ranges(r0, np.minimum(r0 + g.block_q, g.q_len))
        per_row = self.count_rows(mask, row, ks[owner], ke[owner])
        return np.bincount(owner, weights=per_row, minlength=len(qb)).astype(_I64)

    def count_rects_by_segments(self, mask: Mask, qs, qe, ks, ke) -> np.ndarray | None:
        """Closed-form cell counts of rectangles for masks with one segment leaf, or None.

        Cut each rectangle at the segment boundaries on both axes: on every
        piece the ``chunked``/``document`` leaf is constant (its query and key
        segments are equal or not), so the mask becomes a pure q/k/d class
        there and counts in closed form. ``causal & document(...)`` on the
        tiles a boundary crosses costs a handful of pieces, not 128 rows.
        """
        seg_leaves = {leaf for leaf, cls in _pure_parts(mask) if cls == SC.SEG}
        if len(seg_leaves) != 1:
            return None
        (leaf,) = seg_leaves
        when_same = _substitute(mask, leaf, full)
        when_apart = _substitute(mask, leaf, none)
        if not (closed_form_countable(when_same) and closed_form_countable(when_apart)):
            return None
        seg_of, seg_start, seg_end, real = self._segments(leaf)
        lo_real, hi_real = (-(1 << 62), 1 << 62) if real is None else real

        def pieces_of(a, b):
            """Per rectangle, its cuts along one axis: (owner, start, end, segment id or -1 for padding)."""
            ra, rb = np.clip(a, lo_real, hi_real), np.clip(b, lo_real, hi_real)
            has = rb > ra
            s0 = np.where(has, seg_of(np.where(has, ra, lo_real)), 0)
            s1 = np.where(has, seg_of(np.where(has, rb - 1, lo_real)) + 1, 0)
            owner, sid = expand_ranges(s0, s1)
            start = np.maximum(seg_start(sid), a[owner])
            end = np.minimum(seg_end(sid), b[owner])
            # padding before and after the real positions: one piece each, matching nothing
            pad_lo = np.flatnonzero(a < np.minimum(b, lo_real))
            pad_hi = np.flatnonzero(b > np.maximum(a, hi_real))
            owner = np.concatenate((owner, pad_lo, pad_hi))
            start = np.concatenate((start, a[pad_lo], np.maximum(a[pad_hi], hi_real)))
            end = np.concatenate((end, np.minimum(b[pad_lo], lo_real), b[pad_hi]))
            sid = np.concatenate((sid, np.full(len(pad_lo) + len(pad_hi), -1, _I64)))
            return owner, start, end, sid

        qo, qa, qz, qsid = pieces_of(qs, qe)
        ko, ka, kz, ksid = pieces_of(ks, ke)
        if len(qo) > 64 * max(len(qs), 1) or len(ko) > 64 * max(len(ks), 1):
            return None        # many tiny segments: rows or cells are cheaper
        # all (query piece, key piece) pairs of the same rectangle
        korder = np.argsort(ko, kind="stable")
        ko, ka, kz, ksid = ko[korder], ka[korder], kz[korder], ksid[korder]
        kfirst = np.searchsorted(ko, np.arange(len(qs)), side="left")
        klast = np.searchsorted(ko, np.arange(len(qs)), side="right")
        pair_q, kidx = expand_ranges(kfirst[qo], klast[qo])
        owner = qo[pair_q]
        same = (qsid[pair_q] == ksid[kidx]) & (qsid[pair_q] >= 0)
        out = np.zeros(len(qs), _I64)
        for flag, m in ((True, when_same), (False, when_apart)):
            sel = same == flag
            cnt = count_rects(self, m, qa[pair_q][sel], qz[pair_q][sel], ka[kidx][sel], kz[kidx][sel], None)
            out += np.bincount(owner[sel], weights=cnt, minlength=len(qs)).astype(_I64)
        return out

    def count_rows(self, mask: Mask, row: np.ndarray, ks: np.ndarray, ke: np.ndarray) -> np.ndarray:
        """Attended keys of query rows ``row[i]`` within keys [ks[i], ke[i]), exactly.

        Compiles ``mask`` on a grid of single cells restricted to these
        segments: at that grain no piece is partial, so every piece is exact
        and the count is the length of the full pieces. The ranges of one row
        must not overlap. Cost grows with the breakpoints per row, not cells.
        """
        if not self.refine_pays(mask):
            return self._count_rows_dense(mask, row, ks, ke)
        if len(row) > _REFINE_BATCH_ROWS:   # bound the piece arrays of one pass
            return np.concatenate([self.count_rows(mask, row[i:i + _REFINE_BATCH_ROWS], ks[i:i + _REFINE_BATCH_ROWS],
                                                   ke[i:i + _REFINE_BATCH_ROWS])
                                   for i in range(0, len(row), _REFINE_BATCH_ROWS)])
        if self._fine is None:
            g = self.grid
            self._fine = Compiler(Grid(g.q_len, g.kv_len, g.q_offset, 1, 1, g.b, g.h))
            self._fine._axis_cache = self._axis_cache  # 1-D evaluations ignore block sizes
        fine = self._fine
        n = len(row)
        if n == 0:
            return np.zeros(0, _I64)
        order = np.lexsort((ks, row))
        regions = Pieces(row[order].astype(_I64), ks[order], ke[order], np.zeros(n, np.int8),
                         np.full(n, -1, np.int32))
        pieces = fine.resolve(fine.classify(mask, regions))
        self.dense_tiles += fine.dense_tiles
        fine.dense_tiles = 0
        full = pieces.take(pieces.state == FULL)
        # G(key) = full cells before a global key (row * (kv_len + 1) + k): prefix sums over pieces.
        stride = fine.grid.n_kv_blocks + 1
        start = full.qb * stride + full.c0
        length = full.c1 - full.c0
        before = np.concatenate(([0], np.cumsum(length)))

        def cells_before(r, x):
            key = r * stride + x
            i = np.searchsorted(start, key, side="right") - 1
            ok = i >= 0
            j = np.maximum(i, 0)
            inside = np.clip(key - start[j], 0, length[j]) if len(start) else np.zeros_like(key)
            return np.where(ok, before[j] + inside, 0)

        r = regions.qb
        counts = cells_before(r, regions.c1) - cells_before(r, regions.c0)
        out = np.empty(n, _I64)
        out[order] = counts
        return out


    def _count_rows_dense(self, mask: Mask, row: np.ndarray, ks: np.ndarray, ke: np.ndarray) -> np.ndarray:
        """count_rows by evaluating cells: each segment cut into pieces of <= block_k keys."""
        g = self.grid
        bk = g.block_k
        owner, k0 = expand_ranges(np.zeros(len(ks), _I64), -(-(ke - ks) // bk))
        k0 = ks[owner] + k0 * bk
        k1 = np.minimum(k0 + bk, ke[owner])
        out = np.zeros(len(owner), _I64)
        per_batch = max(1, _DENSE_BATCH_CELLS // bk)
        ar = torch.arange(bk, dtype=torch.int64)
        for i in range(0, len(owner), per_batch):
            sl = slice(i, i + per_batch)
            keys = torch.from_numpy(k0[sl])[:, None] + ar[None, :]
            valid = keys < torch.from_numpy(k1[sl])[:, None]
            q = torch.from_numpy(row[owner[sl]] + g.q_offset)[:, None]
            out[sl] = (evaluate_at(mask, q, keys, g.frame, g.b, g.h) & valid).sum(1).numpy()
        self.dense_tiles += -(-len(owner) // max(g.block_q, 1))
        return np.bincount(owner, weights=out, minlength=len(row)).astype(_I64)

    def refine_pays(self, mask: Mask) -> bool:
        """Whether row-level compilation of ``mask`` beats evaluating its tiles cell by cell.

        Row-level work grows with the breakpoints a row meets inside a key
        block; periodic parts (``cols(0, n, 2)``, ``strided(3)``) put one every
        few keys, and then plain evaluation is cheaper. mask_mod leaves are
        only ever evaluated cell by cell.
        """
        if _has_opaque(mask):
            return False
        per_row = 0.0
        for part, cls in _pure_parts(mask):
            if cls in (SC.K, SC.D):
                ax = self.axis(part, cls)
                per_row += len(ax.runs()[0]) / max(ax.n, 1) * self.grid.block_k
            elif cls in (SC.SEG, SC.RECT):
                per_row += 2
            else:
                per_row += 1
        return per_row * 16 < self.grid.block_k


def _pure_parts(mask: Mask):
    """The maximal subtrees of one structure class (what the compiler classifies whole)."""
    cls = mask.structure_class()
    if cls != SC.MIXED:
        yield mask, cls
        return
    if isinstance(mask, Primitive):          # classified as its lowering (prefix_lm(p): causal | sink(p))
        yield from _pure_parts(mask.lowered())
        return
    for ch in mask.children():
        yield from _pure_parts(ch)


def _substitute(mask: Mask, leaf: Mask, value: Mask) -> Mask:
    """``mask`` with every occurrence of ``leaf`` replaced by ``value``."""
    if mask == leaf:
        return value
    if isinstance(mask, (Union, Intersection)):
        return type(mask).chain([_substitute(p, leaf, value) for p in mask.parts])
    if isinstance(mask, Difference):
        return Difference(_substitute(mask.left, leaf, value), _substitute(mask.right, leaf, value))
    if isinstance(mask, Complement):
        return Complement(_substitute(mask.inner, leaf, value))
    return mask


def _has_opaque(mask: Mask) -> bool:
    if mask.structure_class() == SC.OPAQUE:
        return True
    return any(_has_opaque(ch) for ch in mask.children())


def tile_counts_dense(mask: Mask, grid: Grid, qb: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Attended cells of tiles (qb[i], c[i]) by evaluating every cell, in bounded batches."""
    out = np.zeros(len(c), dtype=_I64)
    if len(c) == 0:
        return out
    bq, bk = grid.block_q, grid.block_k
    per_batch = max(1, _DENSE_BATCH_CELLS // (bq * bk))
    ar_q = torch.arange(bq, dtype=torch.int64)
    ar_k = torch.arange(bk, dtype=torch.int64)
    for i in range(0, len(c), per_batch):
        tq = torch.from_numpy(qb[i:i + per_batch])
        tc = torch.from_numpy(c[i:i + per_batch])
        rows = tq[:, None] * bq + ar_q[None, :]                     # [T, bq] row index
        keys = tc[:, None] * bk + ar_k[None, :]                     # [T, bk] key index
        valid = (rows < grid.q_len)[:, :, None] & (keys < grid.kv_len)[:, None, :]
        m = evaluate_at(mask, (rows + grid.q_offset)[:, :, None], keys[:, None, :], grid.frame, grid.b, grid.h) & valid
        out[i:i + per_batch] = m.sum(dim=(1, 2)).numpy()
    return out


def closed_form_countable(mask: Mask) -> bool:
    """Whether :func:`count_rects` counts any rectangle of ``mask`` in closed form."""
    cls = mask.structure_class()
    if cls.one_axis or cls in (SC.CONST, SC.SEG, SC.RECT):
        return True
    return isinstance(mask, Complement) and closed_form_countable(mask.inner)


def row_counts(compiler: Compiler, mask: Mask, p: Pieces) -> np.ndarray:
    """int64 [q_len]: keys attended by every query row, exactly, from final pieces.

    Full pieces give their key count to every row of their query block;
    partial pieces are counted row by row through their residual: closed forms
    for pure classes, row-level compilation or cell evaluation otherwise.
    """
    g = compiler.grid
    bq, bk, n = g.block_q, g.block_k, g.q_len
    if closed_form_countable(mask):
        # One closed-form count per row: cheaper than walking many pieces
        # (causal & strided(s) has ~N^2 / (s * block) partial tiles).
        out = np.empty(n, _I64)
        for r0 in range(0, n, _REFINE_BATCH_ROWS):        # bounded temporaries
            q = np.arange(r0, min(n, r0 + _REFINE_BATCH_ROWS), dtype=_I64) + g.q_offset
            zero = np.zeros(len(q), _I64)
            out[r0:r0 + len(q)] = count_rects(compiler, mask, q, q + 1, zero, zero + g.kv_len, None)
        return out
    ks = p.c0 * bk
    ke = np.minimum(p.c1 * bk, g.kv_len)
    full = p.state == FULL
    per_block = np.bincount(p.qb[full], weights=(ke - ks)[full], minlength=g.n_q_blocks).astype(_I64)
    out = np.repeat(per_block, bq)[:n].copy()
    partial = np.flatnonzero(p.state == PARTIAL)
    for rid in np.unique(p.res[partial]):
        sel = partial[p.res[partial] == rid]
        residual = compiler.residuals.masks[rid]
        r0 = p.qb[sel] * bq
        owner, row = expand_ranges(r0, np.minimum(r0 + bq, n))
        if closed_form_countable(residual):
            q = row + g.q_offset
            cnt = count_rects(compiler, residual, q, q + 1, ks[sel][owner], ke[sel][owner], None)
        else:
            cnt = compiler.count_rows(residual, row, ks[sel][owner], ke[sel][owner])
        out += np.bincount(row, weights=cnt, minlength=n).astype(_I64)
    return out


def count_pieces(compiler: Compiler, p: Pieces) -> np.ndarray:
    """Exact attended cells of every piece (full: its area; partial: via its residual)."""
    g = compiler.grid
    qs, qe = g.q_bounds(p.qb)
    ks = p.c0 * g.block_k
    ke = np.minimum(p.c1 * g.block_k, g.kv_len)
    out = np.where(p.state == FULL, (qe - qs) * (ke - ks), 0).astype(_I64)
    partial = p.state == PARTIAL
    for rid in np.unique(p.res[partial]):
        sel = np.flatnonzero(partial & (p.res == rid))
        out[sel] = count_rects(compiler, compiler.residuals.masks[rid], qs[sel], qe[sel], ks[sel], ke[sel],
                               p.take(sel))
    return out


def count_rects(compiler: Compiler, mask: Mask, qs, qe, ks, ke, pieces: Pieces) -> np.ndarray:
    """Attended cells of mask in rectangles [qs, qe) x [ks, ke) (positions)."""
    cls = mask.structure_class()
    area = (qe - qs) * (ke - ks)
    if cls.one_axis:
        return compiler.axis(mask, cls).count_rect(qs, qe, ks, ke)
    if cls == SC.CONST:
        full = bool(mask.evaluate(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))[0])
        return area if full else np.zeros_like(area)
    if isinstance(mask, Complement):
        return area - count_rects(compiler, mask.inner, qs, qe, ks, ke, pieces)
    if cls == SC.SEG:
        return _count_seg(compiler, mask, qs, qe, ks, ke)
    if cls == SC.RECT:
        return mask.kind.count_rects(mask.args, qs, qe, ks, ke)
    # Anything else: segment cuts, rows or cells, whichever is exact and cheapest.
    return compiler.count_block_ranges(mask, pieces.qb, pieces.c0, pieces.c1)


def _count_seg(compiler: Compiler, prim: Primitive, qs, qe, ks, ke) -> np.ndarray:
    seg_of, seg_start, seg_end, real = compiler._segments(prim)
    if real is not None:
        qs, qe = np.maximum(qs, real[0]), np.minimum(qe, real[1])
        ks, ke = np.maximum(ks, real[0]), np.minimum(ke, real[1])
    ok = (qe > qs) & (ke > ks)
    qs, qe = np.where(ok, qs, 0), np.where(ok, qe, 1)
    ks, ke = np.where(ok, ks, 0), np.where(ok, ke, 1)
    s_lo = np.maximum(seg_of(qs), seg_of(ks))
    s_hi = np.minimum(seg_of(qe - 1), seg_of(ke - 1))
    ok &= s_hi >= s_lo

    def overlap(s, a, b):
        return np.maximum(np.minimum(b, seg_end(s)) - np.maximum(a, seg_start(s)), 0)

    lo_safe = np.where(ok, s_lo, seg_of(qs))
    hi_safe = np.where(ok, s_hi, seg_of(qs))
    total = overlap(lo_safe, qs, qe) * overlap(lo_safe, ks, ke)
    total += np.where(hi_safe > lo_safe, overlap(hi_safe, qs, qe) * overlap(hi_safe, ks, ke), 0)
    # whole segments strictly between the first and the last
    total += prim.kind.segments(prim.args).square_sum(lo_safe + 1, np.maximum(hi_safe, lo_safe + 1))
    return np.where(ok, total, 0)

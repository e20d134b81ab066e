"""``window2d(w, h, kw, kh)``: 2-D neighbourhood attention on a canvas (class RECT).

Positions are laid out row by row on a canvas of ``h`` rows of ``w`` columns:
``p -> (row, col) = (p // w, p % w)``. A query on the canvas sees the ``kh x kw`` keys
around its kernel centre, which is its own (row, col) clamped to
``[kh//2, h-1-kh//2] x [kw//2, w-1-kw//2]`` (NATTEN's rule: every query sees exactly
``kh * kw`` keys, near the borders the window shifts inwards). Positions past the canvas
(and negative ones) attend nothing.

The compiler needs no cell: the condition splits into a row part and a column part, so
the attended cells of any rectangle of positions are a sum of products of two 1-D counts
(:meth:`WINDOW2D.count_rects`), and the keys a range of queries can reach are at most
``kh`` ranges, one per canvas row (:meth:`WINDOW2D.key_ranges`).

    >>> from attnmask.primitives.canvas import window2d
    >>> m = window2d(4, 3, 3, 1)           # 4 columns, 3 rows, a 1 x 3 kernel
    >>> m.to_dense(12)[0].int().tolist()   # (0, 0): the window shifts right, to columns 0..2
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    >>> int(m.to_dense(12).sum(1).min()), int(m.to_dense(12).sum(1).max())
    (3, 3)
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MaskValueError
from ..kinds import StructureClass, TileState
from ..masks import Mask
from .base import PrimitiveKind, register

_I64 = np.int64


def _clamp(x, lo, hi):
    return np.minimum(np.maximum(x, lo), hi)


def _ramp_sum(z0, z1, cap):
    """sum over integers z in [z0, z1] of clip(z, 0, cap) (0 where z1 < z0)."""
    def upto(z):   # sum over z' <= z of clip(z', 0, cap)
        zc = np.clip(z, 0, cap)
        return zc * (zc + 1) // 2 + np.maximum(z - cap, 0) * cap
    return np.where(z1 >= z0, upto(z1) - upto(z0 - 1), 0)


def _pairs_within(u0, u1, y0, y1, r):
    """#{(c, y): c in [u0, u1), y in [y0, y1), |c - y| <= r}, elementwise (closed form)."""
    n2 = np.maximum(y1 - y0, 0)

    def at_most(t):   # #{(c, y): c - y <= t} = sum over c of clip(y1 - (c - t), 0, n2), and y >= y0 caps it
        # for each c the count is clip(y1 - max(y0, c - t), 0, n2) = clip(y1 + t - c, 0, n2)
        return _ramp_sum(y1 + t - (u1 - 1), y1 + t - u0, n2)

    out = at_most(r) - at_most(-r - 1)
    return np.where((u1 > u0) & (n2 > 0), out, 0)


def _clamped_band(x0, x1, cmin, cmax, r, y0, y1):
    """sum over x in [x0, x1) of |[c(x) - r, c(x) + r] & [y0, y1)|, c(x) = clamp(x, cmin, cmax)."""
    def width(c):
        return np.maximum(np.minimum(c + r + 1, y1) - np.maximum(c - r, y0), 0)
    below = np.maximum(np.minimum(x1, cmin) - x0, 0)           # x < cmin: centre cmin
    above = np.maximum(x1 - np.maximum(x0, cmax + 1), 0)       # x > cmax: centre cmax
    u0, u1 = np.maximum(x0, cmin), np.minimum(x1, cmax + 1)    # centre x
    return below * width(cmin) + above * width(cmax) + _pairs_within(u0, u1, y0, y1, r)


def _row_pieces(a, b, w):
    """Positions [a, b) (inside the canvas, a < b) as three products rows x columns:
    the first (partial) canvas row, the whole rows between, the last partial row."""
    r0, r1 = a // w, (b - 1) // w
    one = r0 == r1
    zero = np.zeros_like(a)
    head = (r0, r0 + 1, a % w, np.where(one, (b - 1) % w + 1, w))
    middle = (r0 + 1, np.maximum(r1, r0 + 1), zero, zero + w)
    tail = (r1, np.where(one, r1, r1 + 1), zero, (b - 1) % w + 1)
    return head, middle, tail


@register
class WINDOW2D(PrimitiveKind):
    name = "window2d"
    params = ("w", "h", "kw", "kh")
    signature = "window2d(w, h, kw, kh)"
    structure = StructureClass.RECT
    min_args = max_args = 4

    def normalize(self, args):
        self.check_count(args)
        w, h, kw, kh = (self.whole(p, a) for p, a in zip(self.params, args))
        for p, v in (("w", w), ("h", h), ("kw", kw), ("kh", kh)):
            if v < 1:
                raise MaskValueError(f"{self.signature} needs {p} >= 1, got {p}={v}")
        for p, v in (("kw", kw), ("kh", kh)):
            if v % 2 == 0:
                raise MaskValueError(f"{self.signature} needs an odd {p} (a kernel with a centre), got {p}={v}")
        if kw > w:
            raise MaskValueError(f"{self.signature} needs kw <= w, got kw={kw}, w={w}")
        if kh > h:
            raise MaskValueError(f"{self.signature} needs kh <= h, got kh={kh}, h={h}")
        if w * h > (1 << 62):
            raise MaskValueError(f"{self.signature}: the canvas w * h = {w * h} positions is too large")
        return (w, h, kw, kh)

    def evaluate(self, node, q, k):
        w, h, kw, kh = node.args
        a, b = kh // 2, kw // 2
        n = w * h
        rc = torch.div(q, w, rounding_mode="floor").clamp(a, h - 1 - a)
        cc = torch.remainder(q, w).clamp(b, w - 1 - b)
        rk = torch.div(k, w, rounding_mode="floor")
        ck = torch.remainder(k, w)
        on = (q >= 0) & (q < n) & (k >= 0) & (k < n)
        return on & ((rc - rk).abs() <= a) & ((cc - ck).abs() <= b)

    def display_extent(self, args):
        return args[0] * args[1]           # the canvas

    # ----- compiler hooks ---------------------------------------------------
    def key_ranges(self, args, qs, qe):
        w, h, kw, kh = args
        a, b = kh // 2, kw // 2
        n = w * h
        on_canvas = (qs >= 0) & (qe <= n)         # else some rows attend nothing: no FULL keys
        qs, qe = np.clip(qs, 0, n), np.clip(qe, 0, n)
        has = qe > qs
        last = np.maximum(qe - 1, qs)
        # kernel centre rows of the first and last query (clamping keeps them in order)
        rc0 = _clamp(qs // w, a, h - 1 - a)
        rc1 = _clamp(last // w, a, h - 1 - a)
        one_row = qs // w == last // w
        # Queries of one canvas row share their kernel row; their centre columns are every
        # integer of [cc0, cc1], so keys [cc1 - b, cc0 + b] are seen by all, the rest of
        # [cc0 - b, cc1 + b] by some. Queries across canvas rows: whole key rows, counted.
        cc0 = np.where(one_row, _clamp(qs % w, b, w - 1 - b), b)
        cc1 = np.where(one_row, _clamp(last % w, b, w - 1 - b), w - 1 - b)
        nrows = np.where(has, rc1 - rc0 + 2 * a + 1, 0)
        owner = np.repeat(np.arange(len(qs), dtype=_I64), nrows)
        first = np.repeat(np.cumsum(nrows) - nrows, nrows)
        rk = np.repeat(rc0 - a, nrows) + (np.arange(len(owner), dtype=_I64) - first)
        base = rk * w
        o_one, o_on = one_row[owner], on_canvas[owner]
        lo, hi = base + cc0[owner] - b, base + cc1[owner] + b + 1
        f_lo, f_hi = base + cc1[owner] - b, base + cc0[owner] + b + 1
        exact = o_one & (f_lo < f_hi)              # a part every query sees
        unknown, partial, full = int(TileState.UNKNOWN), int(TileState.PARTIAL), int(TileState.FULL)
        mid_state = np.where(o_on, full, partial)
        # three ranges a key row: left (seen by some), middle, right (seen by some)
        r_lo = np.stack((lo, np.where(exact, f_lo, lo), np.where(exact, f_hi, hi)), 1)
        r_hi = np.stack((np.where(exact, f_lo, lo), np.where(exact, f_hi, hi), hi), 1)
        r_state = np.stack((np.full_like(lo, partial), np.where(exact, mid_state, np.where(o_one, partial, unknown)),
                            np.full_like(lo, partial)), 1)
        owner = np.repeat(owner, 3)
        lo, hi, state = r_lo.ravel(), r_hi.ravel(), r_state.ravel()
        keep = hi > lo
        return owner[keep], lo[keep], hi[keep], state[keep].astype(np.int8)

    def count_rects(self, args, qs, qe, ks, ke):
        w, h, kw, kh = args
        a, b = kh // 2, kw // 2
        n = w * h
        qs, qe = np.clip(qs, 0, n), np.clip(qe, 0, n)
        ks, ke = np.clip(ks, 0, n), np.clip(ke, 0, n)
        ok = (qe > qs) & (ke > ks)
        qs, qe = np.where(ok, qs, 0), np.where(ok, qe, 1)
        ks, ke = np.where(ok, ks, 0), np.where(ok, ke, 1)
        total = np.zeros(len(qs), _I64)
        # Rows and columns are independent on products of row ranges x column ranges. Most
        # pieces are empty (a tile inside one canvas row has only its head): skip those.
        q_pieces, k_pieces = _row_pieces(qs, qe, w), _row_pieces(ks, ke, w)
        for qr0, qr1, qc0, qc1 in q_pieces:
            for kr0, kr1, kc0, kc1 in k_pieces:
                sel = np.flatnonzero((qr1 > qr0) & (qc1 > qc0) & (kr1 > kr0) & (kc1 > kc0))
                if len(sel) == 0:
                    continue
                rows = _clamped_band(qr0[sel], qr1[sel], a, h - 1 - a, a, kr0[sel], kr1[sel])
                sel, rows = sel[rows > 0], rows[rows > 0]
                cols = _clamped_band(qc0[sel], qc1[sel], b, w - 1 - b, b, kc0[sel], kc1[sel])
                total[sel] += rows * cols
        return np.where(ok, total, 0)


def window2d(w: int, h: int, kw: int, kh: int) -> Mask:
    """2-D neighbourhood attention: a ``kh x kw`` kernel on a canvas of ``h`` rows of ``w`` columns.

    Positions run row by row; the kernel centre is the query's (row, col) clamped inside
    the canvas, so every query on the canvas sees exactly ``kh * kw`` keys.

        >>> str(window2d(32, 32, 7, 7))
        'window2d(32, 32, 7, 7)'
        >>> int(window2d(8, 8, 3, 3).to_dense(64).sum(1).min())
        9
    """
    return WINDOW2D.make(w, h, kw, kh)


__all__ = ["window2d"]

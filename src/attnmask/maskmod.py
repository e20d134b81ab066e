"""FlexAttention predicates as masks: the opaque ``from_mask_mod`` leaf and how it is evaluated.

A wrapped ``mask_mod(b, h, q_idx, kv_idx)`` means exactly what it means in
FlexAttention, at every shape:

* it is called with FlexAttention's indices: the batch element ``b``, the head
  ``h``, the query's **row index** ``q_idx`` (0 for the first query row, whatever
  ``q_offset`` is) and the key index ``kv_idx``;
* never with a padded or out-of-range index: tiles that overhang the lengths are
  evaluated on clamped indices and the overhang is discarded;
* through ``torch.vmap`` when it only handles scalars (a predicate that indexes
  with a scalar, branches on a value, ...). The route is chosen once per leaf by
  trying the fast broadcasting call and checking it against vmap on a sample of
  cells; ``leaf.route`` says which was taken, and the vmap route warns once
  (:class:`MaskModWarning`) because it is several times slower.

Inside an expression the language's primitives keep reading query *positions*
(``q_offset + row``), so at a rectangular shape ``causal & from_mask_mod(fn)``
means: key k is attended from query row i when ``k <= q_offset + i`` and
``fn(b, h, i, k)``. At square shapes (q_offset 0) the two coincide.

Whether a leaf varies with ``b`` or ``h`` is found out, not guessed: the
predicate is called once with a two-element ``b`` (and ``h``) of zeros; an output
without that axis cannot depend on it. (On the vmap route the same question is
asked of vmap: is the output batched along ``b``?) Masks that vary are compiled
per (b, h) (``mask.compile(..., h=i)``); ``am.attention`` does that by itself.

The compiler asks this module for the tile states of an opaque leaf
(:func:`classify_pieces`); it first proves what it can from the predicate's
traced arithmetic over whole tile ranges (:mod:`attnmask.maskmod_bounds`), and only
the tiles left undecided are evaluated cell by cell, in bounded batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import MaskValueError
from .kinds import StructureClass, TileState
from .masks import FREE_FRAME, Frame, Mask, broadcast_shape

__all__ = ["MaskMod", "MaskModWarning", "from_mask_mod"]

#: Cells compared between the broadcasting call and vmap when a leaf's route is chosen.
_PROBE_CELLS = 64


class MaskModWarning(UserWarning):
    """A mask_mod runs on a slow route (through vmap, cell by cell)."""


@dataclass(frozen=True, repr=False, eq=False)
class MaskMod(Mask):
    """A FlexAttention ``mask_mod`` wrapped as a Mask (see :func:`from_mask_mod`).

    Equal only to itself (functions have no structural equality). ``str()``
    shows ``<name>``, which the parser does not read back.

        >>> import attnmask as am
        >>> leaf = am.from_mask_mod(lambda b, h, q, k: k <= q, "lower")
        >>> leaf.to_dense(2, 3).int().tolist()     # q_idx is the row index: 0, 1
        [[1, 0, 0], [1, 1, 0]]
        >>> leaf.route
        'broadcast'
    """

    fn: Callable
    name: str
    depth: int = field(default=1, compare=False, hash=False)
    pin_b: int | None = None       # set by mask.at(b=...): the batch element it is evaluated for
    pin_h: int | None = None       # set by mask.at(h=...): the head

    def _key(self):
        return (self.fn, self.name, self.pin_b, self.pin_h)

    def __eq__(self, other):
        return isinstance(other, MaskMod) and other.fn is self.fn and other._key()[1:] == self._key()[1:]

    def __hash__(self):
        return hash((id(self.fn),) + self._key()[1:])

    def _text(self) -> str:
        pins = [f"{n}={v}" for n, v in (("b", self.pin_b), ("h", self.pin_h)) if v is not None]
        return f"<{self.name}{'@' + ','.join(pins) if pins else ''}>"

    def _pinned(self, b, h):
        leaf = MaskMod(self.fn, self.name, pin_b=self.pin_b if b is None else b,
                       pin_h=self.pin_h if h is None else h)
        for key in ("_route", "_depends"):           # what was learnt about the predicate carries over
            if key in self.__dict__:
                object.__setattr__(leaf, key, self.__dict__[key])
        return leaf

    def structure_class(self) -> StructureClass:
        return StructureClass.OPAQUE

    def has_mask_mod(self) -> bool:
        return True

    @property
    def route(self) -> str | None:
        """How the predicate is called: ``"broadcast"`` (whole tiles at once), ``"vmap"``
        (cell by cell through torch.vmap: it handles only scalars), or None before its first use."""
        return self.__dict__.get("_route")

    def depends_on(self) -> frozenset:
        found = self.__dict__.get("_depends")
        if found is None:
            found = _find_dependence(self)
            object.__setattr__(self, "_depends", found)
        return found - {n for n, v in (("batch", self.pin_b), ("head", self.pin_h)) if v is not None}

    def _eval(self, q, k):
        return self._eval_at(0, 0, q, k, FREE_FRAME)

    def _eval_at(self, b, h, q, k, frame: Frame):
        if self.pin_b is not None:
            b = self.pin_b
        if self.pin_h is not None:
            h = self.pin_h
        rows = q - frame.q_offset if frame.q_offset else q
        if frame.direct:                       # FlexAttention is calling: indices as it gives them
            return _as_bool(self, self.fn(b, h, rows, k))
        return evaluate_leaf(self, b, h, rows, k, frame)


def from_mask_mod(fn: Callable, name: str | None = None) -> Mask:
    """Turn any FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` into a Mask.

    The predicate sees FlexAttention's indices: batch ``b``, head ``h``, the query's
    row index and the key index, never a padded or out-of-range one. Write it
    with broadcasting tensor operations for speed; one that handles only scalars
    works too, through ``torch.vmap`` (``leaf.route`` says which). Inside an
    expression the language's primitives read positions (row + q_offset) while
    the predicate reads rows. Per-batch and per-head predicates are detected and
    evaluated per (b, h). ``str()`` shows ``<name>``, which cannot be parsed back.

        >>> import attnmask as am
        >>> even = am.from_mask_mod(lambda b, h, q, k: (k % 2 == 0) & (k <= q), "even_causal")
        >>> (even & am.sliding(3)).to_dense(4).int().tolist()
        [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]]
    """
    if not callable(fn):
        raise MaskValueError(f"from_mask_mod needs a callable mask_mod(b, h, q_idx, kv_idx), got {type(fn).__name__}")
    if name is None:
        name = getattr(fn, "__name__", "mask_mod")
    if not isinstance(name, str) or not name:
        raise MaskValueError(f"from_mask_mod needs a non-empty name, got {name!r}")
    return MaskMod(fn, name)


# ---------------------------------------------------------------------------
# calling the predicate
# ---------------------------------------------------------------------------

def _as_bool(leaf: MaskMod, out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        if isinstance(out, bool):
            return torch.tensor(out)
        raise MaskValueError(f"mask_mod {leaf.name!r} returned {type(out).__name__}, expected a bool tensor")
    if out.dtype != torch.bool:
        raise MaskValueError(f"mask_mod {leaf.name!r} returned {out.dtype}, expected a bool tensor")
    return out


def _index_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(int(x), dtype=torch.int64)


def evaluate_leaf(leaf: MaskMod, b, h, rows: torch.Tensor, keys: torch.Tensor, frame: Frame) -> torch.Tensor:
    """The predicate at row indices ``rows`` and key indices ``keys`` (broadcastable), bool.

    Indices outside ``[0, q_len) x [0, kv_len)`` (known from ``frame``) are never
    shown to the predicate: they are clamped in and their cells come out False.
    """
    b, h = _index_tensor(b), _index_tensor(h)
    inside = None
    if frame.q_len is not None:
        ok = (rows >= 0) & (rows < frame.q_len)
        ok = ok & ((keys >= 0) & (keys < frame.kv_len))
        if not bool(ok.all()):
            inside = ok
            rows = rows.clamp(0, frame.q_len - 1)
            keys = keys.clamp(0, frame.kv_len - 1)
    route = leaf.route
    if route is None:
        out = _choose_route(leaf, b, h, rows, keys)
    elif route == "broadcast":
        out = _as_bool(leaf, leaf.fn(b, h, rows, keys))
    else:
        out = _vmap_call(leaf, b, h, rows, keys)
    return out if inside is None else out & inside


def _target_shape(*tensors) -> tuple[int, ...]:
    return broadcast_shape(*(t.shape for t in tensors))


def _broadcast_call(leaf: MaskMod, b, h, rows, keys) -> torch.Tensor:
    out = _as_bool(leaf, leaf.fn(b, h, rows, keys))
    target = _target_shape(b, h, rows, keys)
    if broadcast_shape(target, out.shape) != target:
        raise MaskValueError(f"mask_mod {leaf.name!r} returned shape {tuple(out.shape)} for indices "
                             f"broadcasting to {target}")
    return out


def _vmap_call(leaf: MaskMod, b, h, rows, keys) -> torch.Tensor:
    """Cell by cell through torch.vmap (what FlexAttention's create_mask does)."""
    target = _target_shape(b, h, rows, keys)
    flat = [t.expand(target).reshape(-1) for t in (b, h, rows, keys)]
    if flat[0].numel() == 0:
        return torch.zeros(target, dtype=torch.bool)
    out = torch.vmap(leaf.fn)(*flat)
    return _as_bool(leaf, out).reshape(target)


def _probe_agrees(leaf: MaskMod, b, h, rows, keys) -> bool:
    """Broadcasting equals vmap on a 3 x 5 grid of valid cells spread over the call's ranges.

    The call's own shape can hide a scalar-only predicate: at [4, 1] x [1, 2] the
    ``interval[0]`` of ``intervals[span[q]]`` has the keys' shape by chance. Three
    rows against five keys rarely line up like that."""
    def spread(t, n):
        t = t.reshape(-1)
        return t.min() + (t.max() - t.min()) * torch.arange(n) // (n - 1)
    b0, h0 = b.reshape(-1)[:1].reshape(()), h.reshape(-1)[:1].reshape(())
    pr, pk = spread(rows, 3)[:, None], spread(keys, 5)[None, :]
    try:
        got = _broadcast_call(leaf, b0, h0, pr, pk).expand(3, 5)
    except Exception:                       # noqa: BLE001 - broadcasting fails on the grid: not written for it
        return False
    try:
        ref = _as_bool(leaf, torch.vmap(leaf.fn)(*[t.expand(3, 5).reshape(-1) for t in (b0, h0, pr, pk)]))
    except Exception:                       # noqa: BLE001 - vmap cannot run it: broadcasting is the only way
        return True
    return torch.equal(got.reshape(-1), ref.reshape(-1))


def _choose_route(leaf: MaskMod, b, h, rows, keys) -> torch.Tensor:
    """Try the broadcasting call, check it against vmap on a sample of cells, remember the winner."""
    try:
        if not _probe_agrees(leaf, b, h, rows, keys):
            raise MaskValueError("broadcasting differs from vmap on the probe grid")
        out = _broadcast_call(leaf, b, h, rows, keys)
    except MaskValueError as e:
        if "expected a bool tensor" in str(e):
            raise
        out = None
    except Exception:                       # noqa: BLE001 - any failure means "not written for tensors"
        out = None
    if out is not None:
        target = _target_shape(b, h, rows, keys)
        n = 1
        for s in target:
            n *= s
        pick = torch.linspace(0, max(n - 1, 0), min(n, _PROBE_CELLS)).round().to(torch.int64)
        sample = [t.expand(target).reshape(-1)[pick] for t in (b, h, rows, keys)]
        try:
            ref = _as_bool(leaf, torch.vmap(leaf.fn)(*sample))
        except Exception:                   # noqa: BLE001 - vmap cannot run it: broadcasting is the only way
            ref = None
        if ref is None or torch.equal(ref.reshape(-1), out.expand(target).reshape(-1)[pick]):
            object.__setattr__(leaf, "_route", "broadcast")
            return out
    try:
        result = _vmap_call(leaf, b, h, rows, keys)
    except Exception as e:
        raise MaskValueError(
            f"mask_mod {leaf.name!r} failed on index tensors and through torch.vmap ({type(e).__name__}: "
            f"{e}); it must return a bool tensor for tensor indices (b, h, q_idx, kv_idx)") from e
    object.__setattr__(leaf, "_route", "vmap")
    warnings.warn(f"mask_mod {leaf.name!r} handles only scalars (or differs on broadcast tensors): attnmask "
                  f"evaluates it cell by cell through torch.vmap, several times slower; write it with "
                  f"broadcasting tensor operations for speed", MaskModWarning, stacklevel=4)
    return result


def _find_dependence(leaf: MaskMod) -> frozenset:
    """Which of batch/head the predicate reads, found by calling it with two-element b and h of zeros."""
    zero = torch.zeros((1, 1, 1, 1), dtype=torch.int64)
    b2 = torch.zeros((2, 1, 1, 1), dtype=torch.int64)
    h2 = torch.zeros((1, 2, 1, 1), dtype=torch.int64)
    try:
        out = leaf.fn(b2, h2, zero, zero)
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.dim() <= 4 and \
                broadcast_shape(out.shape, (2, 2, 1, 1)) == (2, 2, 1, 1):
            shape = (1,) * (4 - out.dim()) + tuple(out.shape)
            return frozenset(n for n, s in (("batch", shape[0]), ("head", shape[1])) if s == 2)
    except Exception:                       # noqa: BLE001 - scalar-only: ask vmap instead
        pass
    found = set()
    z = torch.zeros((), dtype=torch.int64)
    for name, pos in (("batch", 0), ("head", 1)):
        seen = []

        def probe(x, pos=pos, seen=seen):
            args = [z, z, z, z]
            args[pos] = x
            out = leaf.fn(*args)
            seen.append(torch._C._functorch.is_batchedtensor(out) if isinstance(out, torch.Tensor) else False)
            return out if isinstance(out, torch.Tensor) else torch.tensor(bool(out))

        try:
            torch.vmap(probe)(torch.zeros(2, dtype=torch.int64))
            if seen and seen[0]:
                found.add(name)
        except Exception:                   # noqa: BLE001 - cannot tell: assume it varies (exact, slower)
            found.add(name)
    return frozenset(found)


# ---------------------------------------------------------------------------
# tile states of an opaque leaf
# ---------------------------------------------------------------------------

#: The int8 codes of kinds.TileState, as the compiler's state arrays hold them.
TILE_EMPTY, TILE_PARTIAL, TILE_FULL, TILE_UNKNOWN = (int(TileState.EMPTY), int(TileState.PARTIAL),
                                                     int(TileState.FULL), int(TileState.UNKNOWN))
#: Sub-spans a key-block span is cut into when its bounds do not decide it.
_SPLIT = 16
#: Cells of decided tiles re-evaluated as a check on the bounds (a cheap guard, not the proof).
_CHECK_CELLS = 1024


def _traced(leaf: MaskMod):
    """The leaf's traced graph for interval bounds, or None when it cannot be traced (cached)."""
    if "_traced" not in leaf.__dict__:
        from .maskmod_bounds import Unsupported, trace
        try:
            t = trace(leaf.fn, vmapped=leaf.route == "vmap")
        except Unsupported as e:
            t = None
            object.__setattr__(leaf, "_bounds_note", str(e))
        object.__setattr__(leaf, "_traced", t)
    return leaf.__dict__["_traced"]


def _unbounded(leaf: MaskMod, why: str) -> None:
    """Remember that the leaf's tiles cannot be bounded (and why): every later step evaluates cells."""
    object.__setattr__(leaf, "_traced", None)
    object.__setattr__(leaf, "_bounds_note", why)


def bounds_note(leaf: MaskMod) -> str | None:
    """Why the leaf's tiles are evaluated cell by cell (its predicate could not be bounded), or None."""
    return leaf.__dict__.get("_bounds_note")


def classify_regions(leaf: MaskMod, frame: Frame, b: int, h: int, block_q: int, block_k: int,
                     qb, c0, c1):
    """Tile states of ``leaf`` on regions (query block ``qb[i]``, key blocks ``[c0[i], c1[i])``).

    Returns numpy (owner, c0, c1, state) pieces that partition the regions, sorted by
    (owner, c0), with states TILE_EMPTY / TILE_FULL proven from interval bounds of the
    traced predicate and TILE_UNKNOWN for tiles it leaves open (the caller evaluates
    those cell by cell). Spans are refined coarse to fine: a span the bounds decide is
    settled whole, so a window over 8192 key blocks costs a few hundred bound checks per
    query block, not 8192. Returns None when the predicate cannot be bounded.

        >>> import numpy as np, attnmask as am
        >>> lower = am.from_mask_mod(lambda b, h, q, k: k <= q, "lower")
        >>> owner, c0, c1, state = classify_regions(lower, Frame(0, 256, 256), 0, 0, 128, 128,
        ...                                         np.array([0, 1]), np.array([0, 0]), np.array([2, 2]))
        >>> state.tolist()        # row 0: diagonal open, then empty; row 1: full, then diagonal open
        [3, 0, 2, 3]
    """
    import numpy as np
    from .maskmod_bounds import Unsupported, bounds
    # the route decides whether the graph is traced plainly or through vmap: learn it first
    if leaf.route is None:
        evaluate_leaf(leaf, b, h, torch.zeros((1, 1), dtype=torch.int64), torch.zeros((1, 1), dtype=torch.int64),
                      frame)
    traced = _traced(leaf)
    if traced is None:
        return None
    q_len, kv_len = frame.q_len, frame.kv_len
    i64 = np.int64
    owner = np.arange(len(qb), dtype=i64)
    qb = np.asarray(qb, i64)
    a, e = np.asarray(c0, i64), np.asarray(c1, i64)
    keep = e > a
    owner, a, e = owner[keep], a[keep], e[keep]
    out_o, out_a, out_e, out_s = [], [], [], []
    try:
        while len(owner):
            r_lo = qb[owner] * block_q
            r_hi = np.minimum(r_lo + block_q, q_len) - 1
            k_lo = a * block_k
            k_hi = np.minimum(e * block_k, kv_len) - 1
            may_t, may_f = bounds(traced, b, h, r_lo, r_hi, k_lo, k_hi)
            decided = ~(may_t & may_f)
            single = (e - a == 1) & ~decided
            done = decided | single
            state = np.where(~may_f, TILE_FULL, np.where(~may_t, TILE_EMPTY, TILE_UNKNOWN))
            out_o.append(owner[done]), out_a.append(a[done]), out_e.append(e[done]), out_s.append(state[done])
            split = ~done
            owner, a, e = owner[split], a[split], e[split]
            step = -(-(e - a) // _SPLIT)
            parts = -(-(e - a) // step)
            idx = np.repeat(np.arange(len(owner)), parts)
            j = np.arange(len(idx)) - np.repeat(np.cumsum(parts) - parts, parts)
            owner, a, e = owner[idx], a[idx] + j * step[idx], np.minimum(a[idx] + (j + 1) * step[idx], e[idx])
    except Unsupported as exc:
        _unbounded(leaf, str(exc))
        return None
    o, a, e, s = (np.concatenate(x) for x in (out_o, out_a, out_e, out_s))
    order = np.lexsort((a, o))
    o, a, e, s = o[order], a[order], e[order], s[order].astype(np.int8)
    if not _spot_check(leaf, frame, b, h, block_q, block_k, qb, o, a, e, s):
        _unbounded(leaf, "bounds disagreed with the predicate on a sampled cell")
        return None
    return o, a, e, s


def _spot_check(leaf, frame, b, h, block_q, block_k, qb, o, a, e, s) -> bool:
    """Evaluate a few cells of decided pieces: a wrong interval rule would show here."""
    import numpy as np
    sel = np.flatnonzero(s != TILE_UNKNOWN)
    if not len(sel):
        return True
    rng = np.random.default_rng(0)
    pick = sel[rng.integers(0, len(sel), _CHECK_CELLS)]
    r0 = qb[o[pick]] * block_q
    rows = r0 + rng.integers(0, np.minimum(block_q, frame.q_len - r0))
    k0 = a[pick] * block_k
    k1 = np.minimum(e[pick] * block_k, frame.kv_len)
    keys = k0 + (rng.random(len(pick)) * (k1 - k0)).astype(np.int64)
    got = evaluate_leaf(leaf, b, h, torch.from_numpy(rows), torch.from_numpy(keys), frame).numpy()
    return bool(np.all(got == (s[pick] == TILE_FULL)))


#: Most cells of mask_mod tiles one compile may evaluate one by one (memory stays bounded, time does not).
DENSE_CELL_BUDGET = 1 << 34


def check_dense_budget(mask: Mask, cells: int, q_len: int, kv_len: int) -> None:
    """Refuse, with the way out, a compile that would evaluate more than DENSE_CELL_BUDGET cells one by one."""
    if cells <= DENSE_CELL_BUDGET:
        return
    from .errors import LayoutTooLargeError
    notes = sorted({f"<{leaf.name}>: {bounds_note(leaf)}" for leaf in _leaves(mask) if bounds_note(leaf)})
    why = f" ({'; '.join(notes)})" if notes else ""
    raise LayoutTooLargeError(
        f"compiling {mask} at {q_len:,} x {kv_len:,} would evaluate up to {cells:,} cells of mask_mod tiles one by one, "
        f"over the budget of {DENSE_CELL_BUDGET:,}{why}; write the predicate with integer tensor arithmetic, "
        f"comparisons and table lookups (then its tiles are bounded without evaluating them), write it in the "
        f"mask language, intersect it with a language mask that rules tiles out (e.g. causal & sliding(w) & ...), "
        f"compile a shorter length, or raise attnmask.maskmod.DENSE_CELL_BUDGET")


#: Most open tiles of mask_mod residuals one compile enumerates (int64 arrays of this length).
MAX_OPEN_TILES = 1 << 24


def check_open_tiles(mask: Mask, tiles: int, block_q: int, block_k: int, q_len: int, kv_len: int) -> None:
    """Refuse, before they are enumerated, open tiles that cells alone would settle past the budget.

    Tiles of leaves with bounds are mostly proven partial by a few probed cells, so only
    their count is capped; tiles of leaves without bounds cost all their cells.
    """
    unbounded = any(_traced(leaf) is None for leaf in _leaves(mask) if leaf.route is not None) or \
        not isinstance(mask, MaskMod)
    if unbounded:
        check_dense_budget(mask, tiles * block_q * block_k, q_len, kv_len)
    if tiles > MAX_OPEN_TILES:
        check_dense_budget(mask, max(tiles * block_q * block_k, DENSE_CELL_BUDGET + 1), q_len, kv_len)


def _leaves(mask: Mask):
    if isinstance(mask, MaskMod):
        yield mask
    for c in mask.children():
        yield from _leaves(c)


#: Sub-rectangles cut per side when bounds leave a rectangle open, and the side at which cells are evaluated.
_SUB_SPLIT, _CELL_SIDE = 4, 8
#: Cells evaluated per batch when counting.
_COUNT_BATCH_CELLS = 1 << 21


def count_rects(leaf: MaskMod, frame: Frame, b: int, h: int, r_lo, r_hi, k_lo, k_hi):
    """Attended cells of ``leaf`` in rectangles of rows ``[r_lo, r_hi)`` x keys ``[k_lo, k_hi)``, or None.

    Bounds settle whole sub-rectangles; only sub-rectangles of at most 8 x 8 cells that
    the bounds leave open are evaluated, so a tile a window's edge crosses costs a few
    hundred cells instead of 16,384. None when the predicate cannot be bounded.

        >>> import attnmask as am
        >>> lower = am.from_mask_mod(lambda b, h, q, k: k <= q, "lower")
        >>> lower.to_dense(1)[0].tolist(), lower.route            # the route is learnt on first use
        ([True], 'broadcast')
        >>> count_rects(lower, Frame(0, 256, 256), 0, 0, [0], [128], [0], [128]).tolist()   # 128 * 129 / 2
        [8256]
    """
    import numpy as np
    from .maskmod_bounds import Unsupported, bounds
    traced = _traced(leaf) if leaf.route is not None else None
    if traced is None:
        return None
    i64 = np.int64
    r_lo, r_hi, k_lo, k_hi = (np.asarray(x, i64) for x in (r_lo, r_hi, k_lo, k_hi))
    r_hi, k_hi = np.minimum(r_hi, frame.q_len), np.minimum(k_hi, frame.kv_len)
    total = np.zeros(len(r_lo), i64)
    owner = np.flatnonzero((r_hi > r_lo) & (k_hi > k_lo))
    r0, r1, k0, k1 = r_lo[owner], r_hi[owner], k_lo[owner], k_hi[owner]
    cells_o, cells_r, cells_k, cells_rn, cells_kn = [], [], [], [], []
    try:
        while len(owner):
            may_t, may_f = bounds(traced, b, h, r0, r1 - 1, k0, k1 - 1)
            area = (r1 - r0) * (k1 - k0)
            full = ~may_f
            total += np.bincount(owner[full], weights=area[full], minlength=len(total)).astype(i64)
            open_ = may_t & may_f
            small = open_ & (r1 - r0 <= _CELL_SIDE) & (k1 - k0 <= _CELL_SIDE)
            for lst, arr in zip((cells_o, cells_r, cells_k, cells_rn, cells_kn),
                                (owner, r0, k0, r1 - r0, k1 - k0)):
                lst.append(arr[small])
            split = open_ & ~small
            owner, r0, r1, k0, k1 = owner[split], r0[split], r1[split], k0[split], k1[split]
            rs = np.maximum(-(-(r1 - r0) // _SUB_SPLIT), 1)
            ks = np.maximum(-(-(k1 - k0) // _SUB_SPLIT), 1)
            sub = np.arange(_SUB_SPLIT * _SUB_SPLIT)
            i, j = sub // _SUB_SPLIT, sub % _SUB_SPLIT
            nr0 = (r0[:, None] + i[None] * rs[:, None])
            nk0 = (k0[:, None] + j[None] * ks[:, None])
            nr1 = np.minimum(nr0 + rs[:, None], r1[:, None])
            nk1 = np.minimum(nk0 + ks[:, None], k1[:, None])
            keep = (nr1 > nr0) & (nk1 > nk0)
            owner = np.broadcast_to(owner[:, None], keep.shape)[keep]
            r0, r1, k0, k1 = nr0[keep], nr1[keep], nk0[keep], nk1[keep]
    except Unsupported as exc:
        _unbounded(leaf, str(exc))
        return None
    o, rr, kk, rn, kn = (np.concatenate(x) for x in (cells_o, cells_r, cells_k, cells_rn, cells_kn))
    ar = torch.arange(_CELL_SIDE, dtype=torch.int64)
    per_batch = max(1, _COUNT_BATCH_CELLS // (_CELL_SIDE * _CELL_SIDE))
    for s in range(0, len(o), per_batch):
        sl = slice(s, s + per_batch)
        rows = torch.from_numpy(rr[sl])[:, None] + ar[None, :]                      # [S, 8]
        keys = torch.from_numpy(kk[sl])[:, None] + ar[None, :]
        valid = (ar[None, :] < torch.from_numpy(rn[sl])[:, None])[:, :, None] & \
            (ar[None, :] < torch.from_numpy(kn[sl])[:, None])[:, None, :]
        hit = evaluate_leaf(leaf, b, h, rows[:, :, None], keys[:, None, :], frame) & valid
        total += np.bincount(o[sl], weights=hit.sum(dim=(1, 2)).numpy(), minlength=len(total)).astype(i64)
    return total


#: Cells probed per open tile: one true and one false cell prove it partial without evaluating the rest.
_PROBE_PER_TILE = 32
#: ... of which the first stage probes this many (the 4 corners first) on every open tile.
_PROBE_FIRST = 8


def tile_states(leaf: MaskMod, frame: Frame, b: int, h: int, block_q: int, block_k: int, qb, c):
    """Exact states (0 empty, 1 partial, 2 full) of tiles (qb[i], c[i]) of a lone leaf.

    Each tile is first probed at 32 fixed cells (its corners and a scattered pattern;
    the corners and 4 more first, the rest only where those agree): a tile where both
    values show up is partial, proven by the two witnesses. Only the
    tiles whose probes all agree are settled exactly, by bounds on sub-rectangles
    and cell evaluation (:func:`count_rects`), or by evaluating every cell.

        >>> import attnmask as am
        >>> lower = am.from_mask_mod(lambda b, h, q, k: k <= q, "lower")
        >>> tile_states(lower, Frame(0, 256, 256), 0, 0, 128, 128, [0, 1, 0], [0, 0, 1]).tolist()
        [1, 2, 0]
    """
    import numpy as np
    i64 = np.int64
    qb, c = np.asarray(qb, i64), np.asarray(c, i64)
    if _traced(leaf) is None:                           # nothing but cells will settle these tiles
        check_dense_budget(leaf, len(qb) * block_q * block_k, frame.q_len, frame.kv_len)
    r0, k0 = qb * block_q, c * block_k
    hq = np.minimum(r0 + block_q, frame.q_len) - r0
    hk = np.minimum(k0 + block_k, frame.kv_len) - k0
    rng = np.random.default_rng(0)
    off_r = np.concatenate(([0, 0, block_q - 1, block_q - 1], rng.integers(0, block_q, _PROBE_PER_TILE - 4)))
    off_k = np.concatenate(([0, block_k - 1, 0, block_k - 1], rng.integers(0, block_k, _PROBE_PER_TILE - 4)))
    state = np.zeros(len(qb), np.int8)
    # in two stages: the corners and 4 more cells first (they split most tiles an edge crosses), the
    # other 24 only on tiles where those agreed; the states come out the same as probing all 32 at once
    seen_t, seen_f = np.zeros(len(qb), bool), np.zeros(len(qb), bool)
    todo = np.arange(len(qb))
    for lo, hi in ((0, _PROBE_FIRST), (_PROBE_FIRST, _PROBE_PER_TILE)):
        per_batch = max(1, _COUNT_BATCH_CELLS // (hi - lo))
        for s in range(0, len(todo), per_batch):
            t = todo[s:s + per_batch]
            rows = r0[t, None] + np.minimum(off_r[None, lo:hi], hq[t, None] - 1)
            keys = k0[t, None] + np.minimum(off_k[None, lo:hi], hk[t, None] - 1)
            hit = evaluate_leaf(leaf, b, h, torch.from_numpy(rows), torch.from_numpy(keys), frame).numpy()
            seen_t[t] |= hit.any(1)
            seen_f[t] |= ~hit.all(1)
        todo = todo[~(seen_t[todo] & seen_f[todo])]
    state[:] = np.where(seen_t & seen_f, TILE_PARTIAL, np.where(seen_t, TILE_FULL, TILE_EMPTY))
    settle = np.flatnonzero(state != TILE_PARTIAL)                # probes agree: the tile may still hide the other value
    if len(settle):
        counts = count_rects(leaf, frame, b, h, r0[settle], r0[settle] + hq[settle], k0[settle],
                             k0[settle] + hk[settle])
        if counts is None:
            counts = _count_cells(leaf, frame, b, h, r0[settle], hq[settle], k0[settle], hk[settle],
                                  block_q, block_k)
        area = hq[settle] * hk[settle]
        state[settle] = np.where(counts == 0, TILE_EMPTY, np.where(counts == area, TILE_FULL, TILE_PARTIAL))
    return state


def _count_cells(leaf, frame, b, h, r0, hq, k0, hk, block_q, block_k):
    """Attended cells of tiles by evaluating every cell, in bounded batches."""
    import numpy as np
    check_dense_budget(leaf, len(r0) * block_q * block_k, frame.q_len, frame.kv_len)
    out = np.zeros(len(r0), np.int64)
    ar_q, ar_k = torch.arange(block_q), torch.arange(block_k)
    per_batch = max(1, (1 << 22) // (block_q * block_k))
    for s in range(0, len(r0), per_batch):
        sl = slice(s, s + per_batch)
        rows = torch.from_numpy(r0[sl])[:, None] + ar_q[None, :]
        keys = torch.from_numpy(k0[sl])[:, None] + ar_k[None, :]
        valid = (ar_q[None, :] < torch.from_numpy(hq[sl])[:, None])[:, :, None] & \
            (ar_k[None, :] < torch.from_numpy(hk[sl])[:, None])[:, None, :]
        hit = evaluate_leaf(leaf, b, h, rows[:, :, None], keys[:, None, :], frame) & valid
        out[sl] = hit.sum(dim=(1, 2)).numpy()
    return out

"""BlockLayout: the exact, compact tile map that engines, renderers and analysis consume.

See :class:`BlockLayout` for the fields and how to rebuild the dense mask from them.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Iterator

import numpy as np
import torch

from .compiler import EMPTY, FULL, PARTIAL, Compiler, Grid, Pieces, coalesce, count_pieces, expand_ranges, row_counts
from .errors import DenseTooLargeError, MaskValueError
from . import late
from .kinds import TileState
from .masks import DEFAULT_DENSE_LIMIT, Mask, evaluate_at, resolve_batch_head, resolve_shape
from .threads import single_thread  # the one thread clamp (re-exported: analysis uses it)

#: Default bound on the bytes the layout cache holds (runs, partial pieces, residual tables).
DEFAULT_CACHE_BYTES = 256 << 20
_cache_limit = DEFAULT_CACHE_BYTES
_cache: "OrderedDict[tuple, BlockLayout]" = OrderedDict()
_cache_bytes = 0


def _block_pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise MaskValueError(f"block_size must be an int or a (query, key) pair, got {block_size!r}")
        pair = tuple(block_size)
    else:
        pair = (block_size, block_size)
    out = []
    for b in pair:
        if isinstance(b, bool) or not hasattr(b, "__index__"):
            raise MaskValueError(f"block_size must be whole numbers, got {block_size!r}")
        b = operator.index(b)
        if b < 1:
            raise MaskValueError(f"block_size must be >= 1, got {b}")
        out.append(b)
    return out[0], out[1]


def compile_layout(mask: Mask, q_len: int, kv_len: int | None = None, *, block_size=128,
                   q_offset: int | None = None, b: int | None = None, h: int | None = None) -> "BlockLayout":
    """Compile ``mask`` for a shape; results are cached by (mask, shape, blocks, and (b, h) where it varies)."""
    if not isinstance(mask, Mask):
        raise MaskValueError(f"compile needs a Mask, got {type(mask).__name__}")
    q_len, kv_len, q_offset = resolve_shape(q_len, kv_len, q_offset)
    bq, bk = _block_pair(block_size)
    b, h = resolve_batch_head(mask, b, h, "compile") if mask.has_mask_mod() else (0, 0)
    key = (mask, q_len, kv_len, q_offset, bq, bk, b, h)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    grid = Grid(q_len, kv_len, q_offset, bq, bk, b, h)
    compiler = Compiler(grid)
    with single_thread():
        pieces = compiler.run(mask)
    layout = BlockLayout(mask, grid, pieces, tuple(compiler.residuals.masks),
                         dense_tiles=compiler.dense_tiles, refined_tiles=compiler.refined_tiles)
    del compiler, pieces          # the layout keeps only what it needs (its own arrays)
    _remember(key, layout)
    return layout


def _remember(key: tuple, layout: "BlockLayout") -> None:
    global _cache_bytes
    size = layout.nbytes
    if size > _cache_limit:
        return                    # larger than the whole cache: not kept
    _cache[key] = layout
    _cache_bytes += size
    while _cache_bytes > _cache_limit:
        _, old = _cache.popitem(last=False)
        _cache_bytes -= old.nbytes


def set_cache_limit(nbytes: int) -> int:
    """Bound the layout cache to ``nbytes`` (layouts' own arrays); returns the previous bound.

    The default is 256 MiB; 0 turns caching off. Older layouts are dropped first.

        >>> import attnmask as am
        >>> previous = am.set_cache_limit(64 << 20)
        >>> am.cache_info()["limit_bytes"]
        67108864
        >>> _ = am.set_cache_limit(previous)
    """
    global _cache_limit, _cache_bytes
    if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__") or operator.index(nbytes) < 0:
        raise MaskValueError(f"the cache limit must be a whole number of bytes >= 0, got {nbytes!r}")
    previous, _cache_limit = _cache_limit, operator.index(nbytes)
    while _cache and _cache_bytes > _cache_limit:
        _, old = _cache.popitem(last=False)
        _cache_bytes -= old.nbytes
    return previous


def cache_info() -> dict[str, int]:
    """The layout cache: number of layouts, their bytes, and the bound.

        >>> import attnmask as am
        >>> am.clear_cache(); _ = am.causal.compile(4096); am.cache_info()["layouts"]
        1
    """
    return {"layouts": len(_cache), "bytes": _cache_bytes, "limit_bytes": _cache_limit}


def clear_cache() -> None:
    """Forget every cached layout (benchmarks call this to time first compiles).

        >>> import attnmask as am
        >>> am.clear_cache(); am.cache_info()["bytes"]
        0
    """
    global _cache_bytes
    _cache.clear()
    _cache_bytes = 0


class BlockLayout:
    """The exact tile map of a mask at one shape, stored as runs of key blocks.

    The score matrix ``[q_len, kv_len]`` is cut into tiles of ``block_q`` query
    rows by ``block_k`` keys; the last row of tiles and the last column may be
    shorter and count only positions that exist. Each tile is *empty* (no pair
    attended), *full* (every pair attended) or *partial* (some of each).

    The edge-tile rule, exactly: a tile's pairs are those with row < q_len and key
    < kv_len; it is full when all of them are attended, empty when none is. So a
    short tile at the end of a length that is not a multiple of the block can be
    full here. FlexAttention's ``create_block_mask`` pads both lengths up to whole
    blocks and counts the padding as masked, so there a short tile is never full
    (partial if any pair is attended); ``to_flex_block_mask(edge_tiles="flex")``
    and ``flex_tile_states(edge_tiles="flex")`` give that classification. Both
    rules have the same non-empty tiles, and agree everywhere at multiples of the block.

    Only
    non-empty tiles are stored, as maximal runs of consecutive key blocks with
    the same state, per query block, in CSR form:

    ``run_ptr``   int64 ``[n_q_blocks + 1]``: runs of query block ``i`` are
                  ``run_ptr[i]:run_ptr[i + 1]`` (sorted by key block).
    ``run_start`` int64 ``[n_runs]``: first key block of the run.
    ``run_end``   int64 ``[n_runs]``: one past its last key block.
    ``run_state`` int8  ``[n_runs]``: 1 partial, 2 full.

    Memory is O(runs): a causal mask has two runs per query block, whatever the
    length. To rebuild the dense mask: start from all False; for each run,
    set its rectangle of rows ``[i * block_q, (i + 1) * block_q)`` x keys
    ``[run_start * block_k, run_end * block_k)`` (clipped to the lengths) to
    True if full, or to ``mask.evaluate`` of those positions if partial
    (query row r is position ``q_offset + r``). :meth:`to_dense` does exactly this.

        >>> import attnmask as am
        >>> lay = (am.causal & am.sliding(256)).compile(1024, block_size=128)
        >>> lay.runs(3)
        [(1, 2, 'partial'), (2, 3, 'full'), (3, 4, 'partial')]
        >>> lay.attended_pairs() == int(am.sliding(256).to_dense(1024).sum())
        True
    """

    __slots__ = ("mask", "_grid", "run_ptr", "run_start", "run_end", "run_state", "_run_qb", "_partial",
                 "_residuals", "_dense_tiles", "_refined_tiles", "_pairs", "__weakref__")

    def __init__(self, mask: Mask, grid: Grid, pieces: Pieces, residuals: tuple[Mask, ...], *,
                 dense_tiles: int = 0, refined_tiles: int = 0):
        set_ = object.__setattr__
        set_(self, "mask", mask)
        set_(self, "_grid", grid)
        nz = pieces.state != EMPTY
        runs = Pieces(pieces.qb[nz], pieces.c0[nz], pieces.c1[nz], pieces.state[nz],
                      np.zeros(int(nz.sum()), np.int32))
        # Runs merge neighbours of equal state even if their residuals differ.
        runs = coalesce(grid, runs)
        ptr = np.zeros(grid.n_q_blocks + 1, dtype=np.int64)
        np.cumsum(np.bincount(runs.qb, minlength=grid.n_q_blocks), out=ptr[1:])
        set_(self, "run_ptr", torch.from_numpy(ptr))
        set_(self, "run_start", torch.from_numpy(runs.c0.astype(np.int64)))
        set_(self, "run_end", torch.from_numpy(runs.c1.astype(np.int64)))
        set_(self, "run_state", torch.from_numpy(runs.state.astype(np.int8)))
        set_(self, "_run_qb", _frozen(runs.qb.astype(np.int64)))
        # What exact counting needs beyond the runs: partial pieces with the residual that decides them.
        partial = pieces.take(pieces.state == PARTIAL)
        set_(self, "_partial", Pieces(*(_frozen(getattr(partial, f)) for f in ("qb", "c0", "c1", "state", "res"))))
        set_(self, "_residuals", residuals)
        set_(self, "_dense_tiles", dense_tiles)
        set_(self, "_refined_tiles", refined_tiles)
        set_(self, "_pairs", None)

    def __setattr__(self, name, value):
        raise AttributeError(f"BlockLayout is an immutable value; cannot set {name!r}")

    def __eq__(self, other):
        return isinstance(other, BlockLayout) and (self.mask, self._grid) == (other.mask, other._grid)

    def __hash__(self):
        return hash((self.mask, self._grid))

    @property
    def nbytes(self) -> int:
        """Bytes of the layout's own arrays (what the compile cache counts against its bound)."""
        arrays = [self.run_ptr, self.run_start, self.run_end, self.run_state]
        return (sum(t.numel() * t.element_size() for t in arrays) + self._run_qb.nbytes
                + sum(getattr(self._partial, f).nbytes for f in ("qb", "c0", "c1", "state", "res")))

    @property
    def refined_tiles(self) -> int:
        """Tiles the compiler resolved by compiling their residual row by row (no cells)."""
        return self._refined_tiles

    def _counter(self) -> Compiler:
        """A compiler for exact counts, made for one call and dropped after it (layouts keep none)."""
        compiler = Compiler(self._grid)
        for m in self._residuals:
            compiler.residuals.id(m)     # the same ids as at compile time
        return compiler

    def _nonempty_pieces(self) -> Pieces:
        """Every non-empty piece: full runs, then partial pieces with their residuals (sorted)."""
        full = self.run_state.numpy() == FULL
        n = int(full.sum())
        runs = Pieces(self._run_qb[full], self.run_start.numpy()[full], self.run_end.numpy()[full],
                      np.full(n, FULL, np.int8), np.full(n, -1, np.int32))
        p = Pieces.concat([runs, self._partial])
        order = np.lexsort((p.c0, p.qb))
        return p.take(order)

    # -- shape --
    @property
    def q_len(self) -> int:
        return self._grid.q_len

    @property
    def kv_len(self) -> int:
        return self._grid.kv_len

    @property
    def q_offset(self) -> int:
        return self._grid.q_offset

    @property
    def block_q(self) -> int:
        return self._grid.block_q

    @property
    def block_k(self) -> int:
        return self._grid.block_k

    @property
    def block_size(self) -> tuple[int, int]:
        return (self._grid.block_q, self._grid.block_k)

    @property
    def n_q_blocks(self) -> int:
        return self._grid.n_q_blocks

    @property
    def n_kv_blocks(self) -> int:
        return self._grid.n_kv_blocks

    @property
    def n_runs(self) -> int:
        return len(self.run_start)

    @property
    def dense_tiles_evaluated(self) -> int:
        """Tiles the compiler had to check cell by cell (opaque or cross-class residuals)."""
        return self._dense_tiles

    def __repr__(self) -> str:
        c = self.counts()
        return (f"BlockLayout({str(self.mask)!r}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"q_offset={self.q_offset}, block_size={self.block_size}, "
                + ", ".join(f"{s.label}={c[s.label]}" for s in (TileState.FULL, TileState.PARTIAL, TileState.EMPTY))
                + ")")

    # -- counts --
    def counts(self) -> dict[str, int]:
        """Number of empty, partial and full tiles."""
        length = (self.run_end - self.run_start).numpy()
        state = self.run_state.numpy()
        full = int(length[state == FULL].sum())
        partial = int(length[state == PARTIAL].sum())
        return {TileState.EMPTY.label: self.n_q_blocks * self.n_kv_blocks - full - partial,
                TileState.PARTIAL.label: partial, TileState.FULL.label: full}

    @property
    def blocks_full(self) -> int:
        return self.counts()[TileState.FULL.label]

    @property
    def blocks_partial(self) -> int:
        return self.counts()[TileState.PARTIAL.label]

    @property
    def blocks_empty(self) -> int:
        return self.counts()[TileState.EMPTY.label]

    def attended_pairs(self) -> int:
        """Exact number of attended (query, key) pairs, from structure (no dense matrix)."""
        if self._pairs is None:
            with single_thread():
                object.__setattr__(self, "_pairs", int(count_pieces(self._counter(), self._nonempty_pieces()).sum()))
        return self._pairs

    @property
    def density(self) -> float:
        """attended pairs / (q_len * kv_len)."""
        return self.attended_pairs() / (self.q_len * self.kv_len)

    def row_counts(self) -> torch.Tensor:
        """int64 ``[q_len]``: how many keys each query row attends, exactly (no dense matrix).

            >>> import attnmask as am
            >>> (am.causal & am.sliding(3)).compile(6, block_size=4).row_counts().tolist()
            [1, 2, 3, 3, 3, 3]
        """
        with single_thread():
            return torch.from_numpy(row_counts(self._counter(), self.mask, self._nonempty_pieces()))

    # -- iteration for engines --
    def runs(self, q_block: int) -> list[tuple[int, int, str]]:
        """Runs of query block ``q_block`` as (first key block, end key block, state)."""
        a, b = int(self.run_ptr[q_block]), int(self.run_ptr[q_block + 1])
        return [(int(s), int(e), TileState(int(t)).label) for s, e, t in
                zip(self.run_start[a:b], self.run_end[a:b], self.run_state[a:b])]

    def iter_runs(self) -> Iterator[tuple[int, int, int, int]]:
        """Every run as (q_block, first key block, end key block, state)."""
        qb, s, e, t = self._run_qb, self.run_start.numpy(), self.run_end.numpy(), self.run_state.numpy()
        for i in range(len(s)):
            yield int(qb[i]), int(s[i]), int(e[i]), int(t[i])

    def run_q_blocks(self) -> torch.Tensor:
        """int64 [n_runs]: the query block of each run."""
        return torch.from_numpy(self._run_qb.astype(np.int64))

    def tiles(self, state: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_block, key_block) int64 vectors of every non-empty tile, or of one state.

        Materialises one entry per tile: O(non-empty tiles).
        """
        sel = np.ones(self.n_runs, bool) if state is None else (self.run_state.numpy() == state)
        owner, c = expand_ranges(self.run_start.numpy()[sel], self.run_end.numpy()[sel])
        return torch.from_numpy(self._run_qb[sel][owner].astype(np.int64)), torch.from_numpy(c)

    def evaluate(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The layout's mask at query positions ``q`` and keys ``k`` (broadcastable int64), in its shape.

        Like ``mask.evaluate``, but mask_mod leaves see this layout's row indices, lengths,
        batch element and head (see attnmask.maskmod).

            >>> import torch, attnmask as am
            >>> am.causal.compile(4).evaluate(torch.tensor([[2]]), torch.arange(4)[None]).int().tolist()
            [[1, 1, 1, 0]]
        """
        g = self._grid
        return evaluate_at(self.mask, q, k, g.frame, g.b, g.h)

    def tile_masks(self, q_blocks: torch.Tensor, kv_blocks: torch.Tensor) -> torch.Tensor:
        """bool ``[T, block_q, block_k]``: the mask on tiles (q_blocks[i], kv_blocks[i]).

        Rows or keys past the lengths (in short last blocks) are False.
        """
        q_blocks = torch.as_tensor(q_blocks, dtype=torch.int64)
        kv_blocks = torch.as_tensor(kv_blocks, dtype=torch.int64)
        bq, bk = self.block_size
        rows = q_blocks[:, None] * bq + torch.arange(bq)[None, :]
        keys = kv_blocks[:, None] * bk + torch.arange(bk)[None, :]
        valid = (rows < self.q_len)[:, :, None] & (keys < self.kv_len)[:, None, :]
        return self.evaluate((rows + self.q_offset)[:, :, None], keys[:, None, :]) & valid

    def tile_counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_block, key_block, attended cells) for every non-empty tile, exactly.

        Used for block-level pictures: cell value = count / tile area.
        """
        p = self._nonempty_pieces()
        owner, c = expand_ranges(p.c0, p.c1)
        tiles = Pieces(p.qb[owner], c, c + 1, p.state[owner], p.res[owner])
        with single_thread():
            counts = count_pieces(self._counter(), tiles)
        return torch.from_numpy(tiles.qb.astype(np.int64)), torch.from_numpy(c), torch.from_numpy(counts)

    # -- dense views (guarded) --
    def block_states(self, *, limit: int = DEFAULT_DENSE_LIMIT) -> torch.Tensor:
        """int8 ``[n_q_blocks, n_kv_blocks]``: 0 empty, 1 partial, 2 full (for inspection)."""
        cells = self.n_q_blocks * self.n_kv_blocks
        if cells > limit:
            raise DenseTooLargeError(
                f"block_states() would be {self.n_q_blocks} x {self.n_kv_blocks} = {cells:,} cells, over the "
                f"limit of {limit:,}; iterate runs with layout.runs(i) / layout.iter_runs(), or use a "
                f"larger block_size")
        out = torch.zeros((self.n_q_blocks, self.n_kv_blocks), dtype=torch.int8)
        for qb, s, e, t in self.iter_runs():
            out[qb, s:e] = t
        return out

    def to_dense(self, *, limit: int = DEFAULT_DENSE_LIMIT) -> torch.Tensor:
        """The exact bool ``[q_len, kv_len]`` matrix rebuilt from the runs (guarded like Mask.to_dense)."""
        cells = self.q_len * self.kv_len
        if cells > limit:
            raise DenseTooLargeError(
                f"a dense {self.q_len} x {self.kv_len} mask has {cells:,} cells, over the limit of {limit:,}; "
                f"use the layout's runs, or attnmask.analyze(...) for exact figures")
        bq, bk = self.block_size
        out = torch.zeros((self.q_len, self.kv_len), dtype=torch.bool)
        for qb, s, e, t in self.iter_runs():
            r0, r1 = qb * bq, min((qb + 1) * bq, self.q_len)
            k0, k1 = s * bk, min(e * bk, self.kv_len)
            if t == FULL:
                out[r0:r1, k0:k1] = True
            else:
                q = torch.arange(r0, r1, dtype=torch.int64)[:, None] + self.q_offset
                k = torch.arange(k0, k1, dtype=torch.int64)[None, :]
                out[r0:r1, k0:k1] = self.evaluate(q, k)
        return out

    # -- FlexAttention --
    @property
    def b(self) -> int:
        """The batch element this layout was compiled for (0 unless a mask_mod leaf reads ``b``)."""
        return self._grid.b

    @property
    def h(self) -> int:
        """The head this layout was compiled for (0 unless a mask_mod leaf reads ``h``)."""
        return self._grid.h

    def flex_tile_states(self, *, edge_tiles: str = "exact") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q_block, key_block, state) of every non-empty tile, sorted, as FlexAttention will see them.

        ``edge_tiles="exact"``: a tile is full when every pair of it *that exists* is attended (the
        layout's rule). ``"flex"``: FlexAttention's rule in ``create_block_mask``, which pads the
        lengths up to whole blocks and counts the padding as masked, so a tile in a short last block
        row or column is never full (it is partial if any pair is attended). The non-empty tiles are
        the same under both rules.
        """
        if edge_tiles not in ("exact", "flex"):
            raise MaskValueError(f"edge_tiles must be 'exact' or 'flex', got {edge_tiles!r}")
        s, e, t = self.run_start.numpy(), self.run_end.numpy(), self.run_state.numpy()
        owner, c = expand_ranges(s, e)                     # one entry per tile: O(tiles), not O(cells)
        rows = self._run_qb[owner].astype(np.int64)
        state = t[owner].copy()
        if edge_tiles == "flex":
            short = np.zeros(len(rows), bool)
            if self.q_len % self.block_q:
                short |= rows == self.n_q_blocks - 1
            if self.kv_len % self.block_k:
                short |= c == self.n_kv_blocks - 1
            state[short & (state == FULL)] = PARTIAL
        return rows, c.astype(np.int64), state

    def to_flex_block_mask(self, batch: int | None = None, heads: int | None = None, device=None, *,
                           edge_tiles: str = "exact"):
        """A torch ``BlockMask`` for ``flex_attention``, built from the runs (no ``create_block_mask``).

        Its shape is ``(batch or 1, heads or 1, q_len, kv_len)``. For a mask that is the same for
        every batch element and head the tables are shared (expanded). For a mask whose mask_mod
        reads ``b`` or ``h``, each (b, h) gets its own tables from the layout of that batch element
        and head (compiled, cached); a dimension left as None keeps this layout's own b / h.
        Full and partial tiles are passed separately, so FlexAttention skips ``mask_mod`` on full
        tiles; ``mask_mod`` carries the layout's q_offset. ``edge_tiles="flex"`` classifies tiles
        as ``create_block_mask`` does (see :meth:`flex_tile_states`); the default keeps the
        layout's exact states (fewer partial tiles when a length is not a multiple of the block).
        FlexAttention's own format is dense per query block: ``kv_indices`` is
        ``[B, H, n_q_blocks, n_kv_blocks]`` int32, i.e. (N / block)^2 entries per (b, h).
        Requires ``block_q == block_k`` as FlexAttention does on CPU.

            >>> import attnmask as am
            >>> bm = am.causal.compile(256, block_size=128).to_flex_block_mask(2, 4)
            >>> bm.shape
            (2, 4, 256, 256)
        """
        return late.call("block_mask", self, batch, heads, device, edge_tiles=edge_tiles)

    def _check_lengths(self, q_len: int, kv_len: int) -> None:
        if (q_len, kv_len) != (self.q_len, self.kv_len):
            raise MaskValueError(
                f"layout was compiled for q_len={self.q_len}, kv_len={self.kv_len} but the inputs have "
                f"q_len={q_len}, kv_len={kv_len}; recompile with mask.compile({q_len}, {kv_len}, "
                f"block_size={self.block_size})")


late.provide("compile", compile_layout)

def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


__all__ = ["BlockLayout", "compile_layout", "clear_cache", "set_cache_limit", "cache_info", "single_thread",
           "DEFAULT_CACHE_BYTES"]

"""Long-context analysis of a mask: what it costs, what it can see, what it must keep.

:func:`analyze` answers, exactly and at a million tokens, the questions one asks
when choosing a mask for long context (square case: queries and keys are the
positions ``0 .. length - 1``):

* cost: attended pairs, density, tiles full/partial/empty, forward and
  backward FLOPs, beside plain causal attention;
* memory when decoding: the KV-cache curve and its peak;
* reach through depth: the receptive field of the last position through
  ``layers`` stacked layers, residual path included;
* per-row reach: keys attended per query row (min, median, max, masked rows).

Every figure comes from the mask's structure (compiled block layouts, runs,
intervals and 1-D prefix sums), never from a dense ``N x N`` matrix. Cells are
evaluated one by one only on the few tiles where structure cannot decide, and
then only for the rows that matter. Internally three layouts are used:
``(128, 128)`` tiles for per-row counts and the receptive field, ``(16, 1)``
tiles (one key per column) for "last query attending each key", and the
caller's ``block_size`` for the tile counts. matplotlib is imported only by
:func:`plot_analysis`.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

from .compiler import FULL, PARTIAL, expand_ranges
from .errors import LayoutTooLargeError, MaskValueError
from .layout import single_thread
from .language import as_mask
from .kinds import TileState
from .masks import Mask, check_length
from .primitives import causal

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

MaskLike = Union[Mask, str]

#: Longest sequence analysed: the analysis keeps a few int64 vectors of this length.
MAX_LENGTH = 1 << 25
#: Most layers accepted (the per-layer sizes are kept in the report).
MAX_LAYERS = 1 << 16
#: Tiles used for per-row counts and the receptive field.
_ROW_TILE = (128, 128)
#: Tiles used for the last query attending each key: one key per column, so a
#: non-empty tile always holds an attended cell of its key.
_KEY_TILE = (16, 1)
#: Cells evaluated per batch where structure cannot decide.
_BATCH_CELLS = 1 << 21
#: Most cells the receptive field may evaluate one by one (~5 s on one core);
#: beyond it the figure is refused rather than left running for hours.
RECEPTIVE_BUDGET_CELLS = 1 << 30
#: Partial tiles listed at once by the receptive-field walk.
_TILE_CHUNK = 1 << 22

#: FLOPs per attended pair and head dimension: QK^T and PV, one multiply-add (2 FLOPs) each.
FORWARD_FLOPS_PER_PAIR_DIM = 4
#: Backward as FlashAttention counts it: recompute QK^T, then dV, dP, dQ, dK: 5 matmuls = 2.5x forward.
BACKWARD_FLOPS_PER_PAIR_DIM = 10


class AnalysisTooCostlyError(MaskValueError):
    """A figure would need more cell-by-cell evaluation than the budget allows."""


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------

def _check_length(length) -> int:
    n = check_length("length", length)
    if n > MAX_LENGTH:
        raise MaskValueError(f"length={n:,} is too long to analyse (limit {MAX_LENGTH:,}: the analysis keeps "
                             f"a few int64 vectors of that length); analyse a shorter length")
    return n


def _check_count(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise MaskValueError(f"{name} must be a whole number, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise MaskValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise MaskValueError(f"{name} must be <= {maximum:,}, got {value:,}")
    return value


def _check_query(query, length: int) -> int:
    if query is None:
        return length - 1
    if isinstance(query, bool) or not hasattr(query, "__index__"):
        raise MaskValueError(f"query must be a whole number, got {query!r}")
    query = operator.index(query)
    if not 0 <= query < length:
        raise MaskValueError(f"query must be a position in 0..{length - 1} (length={length}), got {query}")
    return query


# ---------------------------------------------------------------------------
# per-row counts
# ---------------------------------------------------------------------------

def row_counts(mask: MaskLike, length: int) -> torch.Tensor:
    """int64 ``[length]``: how many keys each query row attends (square case), exactly.

        >>> import attnmask as am
        >>> from attnmask.analysis import row_counts
        >>> row_counts(am.causal & am.sliding(3), 6).tolist()
        [1, 2, 3, 3, 3, 3]
        >>> int(row_counts("causal", 1 << 20)[-1])
        1048576
    """
    mask, n = as_mask(mask, "analyze"), _check_length(length)
    with single_thread():
        return mask.compile(n, block_size=_ROW_TILE).row_counts()


# ---------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------

def _cover_max(starts: np.ndarray, ends: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """int64 [n]: the largest ``values[i]`` over intervals [starts[i], ends[i]) covering each position, or -1.

    Each interval is split into two overlapping power-of-two blocks (a sparse
    table in reverse), then the levels are pushed down: O(intervals + n log n).
    """
    keep = ends > starts
    starts, ends, values = starts[keep], ends[keep], values[keep]
    if len(starts) == 0:
        return np.full(n, -1, np.int64)
    lengths = ends - starts
    level = np.frexp(lengths.astype(np.float64))[1].astype(np.int64) - 1   # floor(log2(length)), exact
    cur = None
    for lev in range(int(level.max()), -1, -1):
        h = 1 << lev
        arr = np.full(n, -1, np.int64)
        sel = level == lev
        if sel.any():
            np.maximum.at(arr, starts[sel], values[sel])
            np.maximum.at(arr, ends[sel] - h, values[sel])
        if cur is not None:
            # cur[i] (level lev + 1) covers [i, i + 2h) = [i, i + h) and [i + h, i + 2h).
            np.maximum(arr, cur, out=arr)
            np.maximum(arr[h:], cur[:n - h], out=arr[h:])
        cur = arr
    return cur


def _last_query(mask: Mask, n: int) -> np.ndarray:
    """int64 [n]: for each key k, the largest query position attending k, or -1 if none does."""
    layout = mask.compile(n, block_size=_KEY_TILE)
    bq = layout.block_q
    qb = layout.run_q_blocks().numpy()
    state = layout.run_state.numpy().astype(np.int64)
    # With one key per tile column, the last non-empty tile of a column holds
    # the last query of that key; encode (query block, state) so max picks it.
    best = _cover_max(layout.run_start.numpy(), layout.run_end.numpy(), qb * 4 + state, n)
    some = best >= 0
    last_qb = best >> 2
    last = np.where(some, np.minimum((last_qb + 1) * bq, n) - 1, -1)
    part_keys = np.flatnonzero(some & ((best & 3) == PARTIAL))
    if len(part_keys):
        ar = torch.arange(bq, dtype=torch.int64)
        per_batch = max(1, _BATCH_CELLS // bq)
        for i in range(0, len(part_keys), per_batch):
            keys = part_keys[i:i + per_batch]
            rows = torch.from_numpy(last_qb[keys] * bq)[:, None] + ar[None, :]          # [T, bq]
            k = torch.from_numpy(keys)[:, None]                                            # [T, 1]
            hit = layout.evaluate(rows + layout.q_offset, k) & (rows < n)
            # last attended row of each tile: the largest (row index + 1) where hit, minus 1
            idx = (hit * (ar + 1)[None, :]).amax(dim=1) - 1
            last[keys] = last_qb[keys] * bq + idx.numpy()
    return last


def _kv_curve(last: np.ndarray) -> np.ndarray:
    n = len(last)
    k = np.arange(n, dtype=np.int64)
    live = last >= k                     # keys a query at or after their own step still needs
    diff = np.zeros(n + 1, np.int64)
    np.add.at(diff, k[live], 1)
    np.add.at(diff, last[live] + 1, -1)
    return np.cumsum(diff[:n])


def kv_cache_curve(mask: MaskLike, length: int) -> torch.Tensor:
    """int64 ``[length]``: keys that must be held in the KV cache at each decoding step.

    Decoding positions 0..length-1 one at a time, step ``t`` must hold every
    key ``k <= t`` that some query ``q >= t`` attends: with ``last(k)`` the
    largest query attending ``k``, that is ``#{k : k <= t <= last(k)}``.

        >>> import attnmask as am
        >>> from attnmask.analysis import kv_cache_curve
        >>> kv_cache_curve(am.causal & am.sliding(3), 6).tolist()
        [1, 2, 3, 3, 3, 3]
        >>> int(kv_cache_curve("causal & (sliding(4096) | sink(4))", 1 << 20).max())
        4100
    """
    mask, n = as_mask(mask, "analyze"), _check_length(length)
    with single_thread():
        return torch.from_numpy(_kv_curve(_last_query(mask, n)))


# ---------------------------------------------------------------------------
# receptive field
# ---------------------------------------------------------------------------

def _receptive(mask: Mask, n: int, layers: int, query: int, last: np.ndarray) -> tuple[list[int], int]:
    """Sizes of R_1..R_layers from R_0 = {query}, and min R_layers.

    Only rows added by the previous layer are expanded (older rows' keys are
    already in R). Full tiles of their query blocks add whole key ranges;
    partial tiles are evaluated for just those rows, and skipped when no key of
    the tile outside R is attended by a query at or after the block's first new
    row (``last[k]``: the last query attending key k, -1 if none).
    """
    layout = mask.compile(n, block_size=_ROW_TILE)
    bq, bk = layout.block_size
    ptr = layout.run_ptr.numpy()
    r_start, r_end, r_state = layout.run_start.numpy(), layout.run_end.numpy(), layout.run_state.numpy()
    in_r = np.zeros(n, dtype=bool)
    in_r[query] = True
    new = np.array([query], dtype=np.int64)
    size = 1
    sizes: list[int] = []
    kar = torch.arange(bk, dtype=torch.int64)
    cells = 0
    for _ in range(layers):
        if len(new) == 0:           # fixed point: no later layer adds anything
            sizes.extend([size] * (layers - len(sizes)))
            break
        blocks, first = np.unique(new // bq, return_index=True)
        rows_end = np.append(first[1:], len(new))
        owner, run = expand_ranges(ptr[blocks], ptr[blocks + 1])
        if len(run) == 0:           # these rows attend nothing
            new = new[:0]
            sizes.append(size)
            continue
        # Work on the key span these blocks touch only ([k_lo, k_hi), block-aligned
        # start), so a narrow window costs O(window) a layer, not O(n).
        c_lo, c_hi = int(r_start[run].min()), int(r_end[run].max())
        k_lo, k_hi = c_lo * bk, min(c_hi * bk, n)
        span = k_hi - k_lo
        ks, ke = r_start[run] * bk - k_lo, np.minimum(r_end[run] * bk, n) - k_lo
        full = r_state[run] == FULL
        diff = np.zeros(span + 1, np.int32)
        np.add.at(diff, ks[full], 1)
        np.add.at(diff, ke[full], -1)
        gained = np.cumsum(diff[:span]) > 0          # keys k_lo + i
        in_span = in_r[k_lo:k_hi]
        # Partial tiles of these blocks, skipping those that cannot add a key:
        # reach[c - c_lo] is the latest query attending a key of block c not yet in R.
        reach = np.full((c_hi - c_lo) * bk, -1, np.int64)
        reach[:span] = np.where(in_span | gained, -1, last[k_lo:k_hi])
        reach = reach.reshape(c_hi - c_lo, bk).max(axis=1)
        part = np.flatnonzero(~full)
        # Tiles are listed a bounded chunk of runs at a time (a layer of a dense
        # non-causal mask can have tens of millions of partial tiles).
        tiles_before = np.concatenate(([0], np.cumsum(r_end[run[part]] - r_start[run[part]])))
        lo = 0
        while lo < len(part):
            hi = max(lo + 1, int(np.searchsorted(tiles_before, tiles_before[lo] + _TILE_CHUNK, side="right")) - 1)
            chunk = part[lo:hi]
            lo = hi
            t_owner, t_c = expand_ranges(r_start[run[chunk]], r_end[run[chunk]])
            t_blk = owner[chunk][t_owner]
            useful = reach[t_c - c_lo] >= new[first[t_blk]]
            t_blk, t_c = t_blk[useful], t_c[useful]
            pairs = int((rows_end[t_blk] - first[t_blk]).sum())
            cells += pairs * bk
            if cells > RECEPTIVE_BUDGET_CELLS:
                raise AnalysisTooCostlyError(
                    f"the receptive field of {mask} at length {n:,} through {layers} layers needs more than "
                    f"{RECEPTIVE_BUDGET_CELLS:,} cells evaluated one by one (partial tiles with no structural "
                    f"shortcut, reached at layer {len(sizes) + 1}); analyse a shorter length or fewer layers")
            # (new row, tile) pairs, evaluated in bounded batches
            p_tile, p_row = expand_ranges(first[t_blk], rows_end[t_blk])
            per_batch = max(1, _BATCH_CELLS // bk)
            for i in range(0, len(p_tile), per_batch):
                q = torch.from_numpy(new[p_row[i:i + per_batch]])[:, None]                      # [P, 1]
                k = torch.from_numpy(t_c[p_tile[i:i + per_batch]] * bk)[:, None] + kar[None, :]  # [P, bk]
                hit = layout.evaluate(q + layout.q_offset, k) & (k < n)
                gained[k[hit].numpy() - k_lo] = True
        added = gained & ~in_span
        new = np.flatnonzero(added) + k_lo
        in_span |= added
        size += len(new)
        sizes.append(size)
    earliest = int(np.argmax(in_r))
    return sizes, earliest


def receptive_field(mask: MaskLike, length: int, layers: int = 1, query: int | None = None
                    ) -> tuple[list[int], int]:
    """Receptive field of ``query`` (default: the last position) through stacked layers.

    R_0 = {query}; R_l = R_(l-1) plus every key some position of R_(l-1)
    attends to (the residual path keeps R_(l-1)). Returns
    ``(sizes, earliest)``: ``sizes[l - 1] = |R_l|`` for l = 1..layers and
    ``earliest = min R_layers``.

        >>> import attnmask as am
        >>> from attnmask.analysis import receptive_field
        >>> receptive_field(am.causal & am.sliding(3), 10, layers=3)
        ([3, 5, 7], 3)
        >>> receptive_field("causal & sliding(4096)", 1 << 20, layers=32)[0][-1]
        131041
    """
    mask, n = as_mask(mask, "analyze"), _check_length(length)
    layers = _check_count("layers", layers, 0, MAX_LAYERS)
    query = _check_query(query, n)
    with single_thread():
        sizes, earliest = _receptive(mask, n, layers, query, _last_query(mask, n))
    if layers == 0:
        earliest = query
    return sizes, earliest


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AnalysisReport:
    """Exact long-context figures of one mask at one length (see :func:`analyze`).

    FLOPs count 2 per multiply-add: forward = 4 x pairs x head_dim x heads
    (QK^T and PV), backward = 10 x pairs x head_dim x heads (2.5x forward, as
    FlashAttention counts: QK^T recomputed, dV, dP, dQ, dK). ``causal_*`` are
    the same figures for plain causal attention at this length;
    ``flops_ratio`` = pairs / causal pairs. ``receptive_field`` and
    ``earliest_key`` are None (and the per-layer sizes empty) when computing
    them would exceed :data:`RECEPTIVE_BUDGET_CELLS` cell evaluations.
    ``str(report)`` is a table, ``report.to_dict()`` plain JSON-safe types.
    """

    mask: str
    length: int
    layers: int
    block_size: int | tuple[int, int]
    head_dim: int
    heads: int
    attended_pairs: int
    density: float
    blocks_full: int
    blocks_partial: int
    blocks_empty: int
    flops_forward: int
    flops_backward: int
    causal_pairs: int
    causal_density: float
    causal_flops_forward: int
    causal_flops_backward: int
    flops_ratio: float
    kv_cache_peak: int | None        # None: pattern too fine to resolve at this length
    kv_cache_peak_step: int | None
    receptive_field: int | None
    earliest_key: int | None
    receptive_field_per_layer: tuple[int, ...]
    row_keys_min: int
    row_keys_median: float
    row_keys_max: int
    rows_fully_masked: int

    def to_dict(self) -> dict:
        """Every field as plain JSON-safe types (tuples become lists)."""
        out = asdict(self)
        out["receptive_field_per_layer"] = list(self.receptive_field_per_layer)
        if isinstance(self.block_size, tuple):
            out["block_size"] = list(self.block_size)
        return out

    def __str__(self) -> str:
        n = self.length
        bs = self.block_size if isinstance(self.block_size, int) else "x".join(map(str, self.block_size))

        def num(x) -> str:
            if x is None:
                return "not computed (too costly)"
            return f"{x:,}" if isinstance(x, int) else f"{x:.6g}"

        def ratio(a, b) -> str:
            return f"{a / b:.4g}x" if a is not None and b else ""

        head = f"{self.mask}  (length {n:,}, {self.layers} layer{'s' * (self.layers != 1)})"
        rows = [
            ("", "this mask", str(causal), "ratio"),
            ("attended pairs", num(self.attended_pairs), num(self.causal_pairs),
             ratio(self.attended_pairs, self.causal_pairs)),
            ("density", f"{self.density:.6g}", f"{self.causal_density:.6g}", ""),
            (f"forward FLOPs (D={self.head_dim}, H={self.heads})", f"{self.flops_forward:.4g}",
             f"{self.causal_flops_forward:.4g}", ratio(self.flops_forward, self.causal_flops_forward)),
            ("backward FLOPs (2.5x forward)", f"{self.flops_backward:.4g}", f"{self.causal_flops_backward:.4g}",
             ratio(self.flops_backward, self.causal_flops_backward)),
            (f"tiles {bs}: full / partial / empty",
             f"{self.blocks_full:,} / {self.blocks_partial:,} / {self.blocks_empty:,}", "", ""),
            ("KV-cache peak (at step)", num(self.kv_cache_peak) if self.kv_cache_peak is None else
             f"{self.kv_cache_peak:,} (t={self.kv_cache_peak_step:,})",
             f"{n:,} (t={n - 1:,})", ratio(self.kv_cache_peak, n)),
            (f"receptive field, {self.layers} layers", num(self.receptive_field),
             num(n if self.layers else 1), ratio(self.receptive_field, n if self.layers else 1)),
            ("earliest key reached", num(self.earliest_key), num(0 if self.layers else n - 1), ""),
            ("keys per row: min / median / max",
             f"{self.row_keys_min:,} / {self.row_keys_median:,g} / {self.row_keys_max:,}",
             f"1 / {(n + 1) / 2:,g} / {n:,}", ""),
            ("fully masked rows", num(self.rows_fully_masked), "0", ""),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [head]
        for r in rows:
            lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
                         .rstrip())
        per_layer = ", ".join(f"{s:,}" for s in self.receptive_field_per_layer[:8])
        if len(self.receptive_field_per_layer) > 8:
            per_layer += f", ... {self.receptive_field_per_layer[-1]:,}"
        if per_layer:
            lines.append(f"receptive field per layer: {per_layer}")
        lines.append("FLOPs: forward 4 x pairs x D x H (QK^T and PV, multiply-add = 2); backward 2.5x forward")
        return "\n".join(lines)


def analyze(mask: MaskLike, length: int, *, layers: int = 1, block_size: int | tuple[int, int] = 128,
            head_dim: int = 128, heads: int = 1) -> AnalysisReport:
    """Exact long-context figures of ``mask`` over ``length`` positions (queries = keys = 0..length-1).

    ``mask`` is a Mask or mask text. Cost: attended pairs, density, tiles at
    ``block_size``, FLOPs (forward 4 x pairs x head_dim x heads, backward 2.5x
    that), beside plain causal attention. Memory: the KV-cache peak when
    decoding one position at a time (see :func:`kv_cache_curve`). Reach: the
    receptive field of the last position through ``layers`` layers (see
    :func:`receptive_field`) and keys attended per row (see
    :func:`row_counts`). All exact, from structure, in seconds at 1M tokens.

        >>> import attnmask as am
        >>> r = am.analyze("causal & (sliding(4096) | sink(4))", 1 << 20, layers=32)
        >>> r.kv_cache_peak, r.receptive_field, r.earliest_key
        (4100, 131045, 0)
        >>> r.to_dict()["receptive_field_per_layer"][:3]
        [4100, 8195, 12290]
    """
    mask = as_mask(mask, "analyze")
    n = _check_length(length)
    layers = _check_count("layers", layers, 0, MAX_LAYERS)
    head_dim = _check_count("head_dim", head_dim, 1)
    heads = _check_count("heads", heads, 1)
    with single_thread():
        return _report(mask, n, layers, block_size, head_dim, heads)


def _report(mask: Mask, n: int, layers: int, block_size, head_dim: int, heads: int) -> AnalysisReport:
    blocks = mask.compile(n, block_size=block_size)
    counts = blocks.counts()
    pairs = blocks.attended_pairs()
    causal_pairs = n * (n + 1) // 2
    per_pair = head_dim * heads
    try:
        last = _last_query(mask, n)
    except LayoutTooLargeError:   # a pattern finer than one key per tile column at this length
        last = None
    peak = peak_step = None
    sizes, earliest, reach = [], None, None
    if last is not None:
        curve = _kv_curve(last)
        peak_step = int(np.argmax(curve))
        peak = int(curve[peak_step])
        try:
            sizes, earliest = _receptive(mask, n, layers, n - 1, last)
            if layers == 0:
                earliest = n - 1
            reach = sizes[-1] if sizes else 1
        except AnalysisTooCostlyError:
            sizes, earliest, reach = [], None, None
    rc = mask.compile(n, block_size=_ROW_TILE).row_counts().numpy()
    bs = blocks.block_size
    return AnalysisReport(
        mask=str(mask), length=n, layers=layers, block_size=bs[0] if bs[0] == bs[1] else bs,
        head_dim=head_dim, heads=heads,
        attended_pairs=pairs, density=pairs / (n * n),
        blocks_full=counts[TileState.FULL.label], blocks_partial=counts[TileState.PARTIAL.label],
        blocks_empty=counts[TileState.EMPTY.label],
        flops_forward=FORWARD_FLOPS_PER_PAIR_DIM * pairs * per_pair,
        flops_backward=BACKWARD_FLOPS_PER_PAIR_DIM * pairs * per_pair,
        causal_pairs=causal_pairs, causal_density=causal_pairs / (n * n),
        causal_flops_forward=FORWARD_FLOPS_PER_PAIR_DIM * causal_pairs * per_pair,
        causal_flops_backward=BACKWARD_FLOPS_PER_PAIR_DIM * causal_pairs * per_pair,
        flops_ratio=pairs / causal_pairs,
        kv_cache_peak=peak, kv_cache_peak_step=peak_step,
        receptive_field=reach, earliest_key=earliest,
        receptive_field_per_layer=tuple(sizes),
        row_keys_min=int(rc.min()), row_keys_median=float(np.median(rc)), row_keys_max=int(rc.max()),
        rows_fully_masked=int((rc == 0).sum()),
    )


# ---------------------------------------------------------------------------
# the picture
# ---------------------------------------------------------------------------

def plot_analysis(mask: MaskLike, length: int, *, layers: int = 32, block_size: int | None = None,
                  path=None) -> "Figure":
    """A figure: the mask's block heatmap, the KV-cache curve, the receptive field by depth.

    ``block_size`` is the heatmap's tile (default: chosen for ~1024 cells a
    side). With ``path`` the figure is also saved (.png, .svg or .pdf).

        >>> from attnmask.analysis import plot_analysis
        >>> fig = plot_analysis("causal & (sliding(64) | sink(4))", 4096, layers=8)
        >>> len(fig.axes) >= 3
        True
    """
    mask, n = as_mask(mask, "analyze"), _check_length(length)
    layers = _check_count("layers", layers, 1, MAX_LAYERS)
    from matplotlib.figure import Figure

    from matplotlib.ticker import FuncFormatter

    from .render import draw_mask, format_position
    commas = FuncFormatter(lambda v, _: f"{int(round(v)):,}")
    fig = Figure(figsize=(16, 5), dpi=100, layout="constrained")
    ax_map, ax_kv, ax_rf = fig.subplots(1, 3, width_ratios=[1.15, 1, 1])
    draw_mask(ax_map, mask, n, block_size=block_size)
    ax_map.set_title("mask (fraction attended per tile)")

    with single_thread():
        last = _last_query(mask, n)
        curve = _kv_curve(last)
        try:
            sizes, earliest = _receptive(mask, n, layers, n - 1, last)
        except AnalysisTooCostlyError:
            sizes, earliest = None, None
    step = int(np.argmax(curve))
    # Exact envelope for long curves: max and min of each bucket of steps.
    buckets = max(1, -(-n // 4096))
    pad = (-n) % buckets
    c = np.concatenate((curve, np.repeat(curve[-1:], pad))).reshape(-1, buckets)
    x = np.arange(c.shape[0]) * buckets
    ax_kv.fill_between(x, c.min(axis=1), c.max(axis=1), color="#21918c", alpha=0.4, linewidth=0)
    ax_kv.plot(x, c.max(axis=1), color="#21918c", linewidth=1.2, label="this mask")
    ax_kv.plot([0, n - 1], [1, n], color="0.5", linestyle="--", linewidth=1, label=str(causal))
    ax_kv.plot([step], [curve[step]], "o", color="#440154")
    ax_kv.annotate(f"peak {int(curve[step]):,} at step {step:,}", (step, curve[step]),
                   textcoords="offset points", xytext=(8 if step <= n / 2 else -8, -10), va="top",
                   ha="right" if step > n / 2 else "left", fontsize=9)
    ax_kv.set_yscale("log")
    ax_kv.set_xlim(0, n)
    # Steps ticked at powers of two, like the heatmap's axes (1M, 512K, ...).
    tick = 1 << max(0, (n // 8).bit_length() - 1)
    ax_kv.set_xticks(range(0, n + 1, tick * max(1, -(-n // (8 * tick)))))
    ax_kv.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_position(int(round(v)))))
    ax_kv.set_xlabel("decoding step t")
    ax_kv.set_ylabel("keys held in the KV cache")
    ax_kv.set_title("KV cache while decoding")
    ax_kv.legend(loc="lower right", fontsize=9)

    if sizes is None:
        ax_rf.text(0.5, 0.5, f"receptive field not computed:\nover the budget of {RECEPTIVE_BUDGET_CELLS:,}\n"
                   "cells evaluated one by one", ha="center", va="center", transform=ax_rf.transAxes)
        ax_rf.set_title("receptive field", fontsize=10)
    else:
        depth = np.arange(layers + 1)
        # Linear axes show the growth per layer (a window adds w - 1 positions a layer);
        # causal reaches all n positions after one layer, stated rather than drawn.
        ax_rf.plot(depth, [1] + sizes, marker="o", markersize=3, color="#3b528b", label="|R_l| this mask")
        ax_rf.plot([], [], " ", label=f"causal: all {n:,} from layer 1")
        ax_rf.set_ylim(0, max(sizes) * 1.1)
        ax_rf.set_xlim(0, layers)
        ax_rf.yaxis.set_major_formatter(commas)
        ax_rf.set_xlabel("layers l")
        ax_rf.set_ylabel("positions reaching the last query")
        ax_rf.set_title(f"receptive field: {sizes[-1]:,} after {layers} (earliest key {earliest:,})", fontsize=10)
        ax_rf.legend(loc="best", fontsize=9)
    fig.suptitle(f"{mask}  at length {n:,}")
    if path is not None:
        fig.savefig(path)
    return fig


__all__ = ["analyze", "AnalysisReport", "plot_analysis", "kv_cache_curve", "receptive_field", "row_counts"]

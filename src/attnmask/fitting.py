"""How much of a head's attention a mask keeps, and the cheapest mask that keeps enough.

``coverage(mask, weights)`` is the share of attention mass a mask keeps, row by
row: ``sum(weights * mask) / sum(weights)`` per query row (a row with no mass
counts as fully kept), then the mean and the minimum over chosen rows.

``fit(maps_per_text, keep=0.95)`` picks, for every layer and head, the mask
with the fewest attended pairs that keeps at least ``keep`` of the mass (mean
over the chosen rows) on **every** calibration text. Candidate families, all
under ``causal``:

- ``window``: ``sliding(w) | sink(s)`` (``sliding(1)`` is the self head,
  ``sink(1) | sliding(1)`` a dormant head that reads token 0);
- ``dilated``: ``dilated(w, d) | sink(s)``;
- ``chunked``: ``chunked(c) | sink(s)``;
- ``columns`` (opt in): a window and sink plus K static key columns ``cols(p)``
  at the positions that carry the most mass over the calibration texts (on
  SmolLM2 they do not carry over to held-out text: see
  benchmarks/results/models.md);
- ``dynamic`` (opt in): a window and sink plus the K key columns that the last
  ``last_queries`` queries of *each input* weigh most, like MInference's
  vertical lines. The plan holds the base mask as language text and, beside
  it, ``{"family": "top_columns", "columns": K, "last_queries": n, ...}``;
  :meth:`MaskPlan.resolve` turns that into language text for one input
  (``base | cols(p1) | cols(p2, p3) ...`` under causal).

Cost is the exact attended-pair count at the calibration length (the mean over
texts for the dynamic family). The mass kept per candidate is computed from
per-row prefix sums of the weights (intervals) and gathers (dilated lattices),
never from a dense mask per candidate; the tests check it against
:func:`coverage`. ``fit`` also names the best uniform mask (one mask for every
head) whose density is at most the plan's, so a per-head plan is always shown
beside the simple alternative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .errors import MaskValueError
from .language import as_mask
from .masks import Mask
from .primitives import causal, chunked, cols, dilated, sink, sliding
from .primitives.offsets import DILATED
from .primitives.segments import CHUNKED
from .plan import MaskPlan, dynamic_spec, resolve_columns, top_column_positions, with_columns

# A family built on one primitive is labelled with that primitive's name, read from its definition (so
# the label and the text of the heads' masks agree); a head the fit leaves causal is labelled "causal".
CAUSAL_FAMILY, DILATED_FAMILY, CHUNKED_FAMILY = causal.name, DILATED.name, CHUNKED.name
FAMILIES = ("window", DILATED_FAMILY, CHUNKED_FAMILY, "columns", "dynamic")
DEFAULT_FAMILIES = FAMILIES[:3]   # window, dilated, chunked; static columns overfit on SmolLM2: opt in
WINDOWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072)
SINKS = (0, 1, 2, 4, 8, 16, 64)
DILATIONS = ((2, (8, 16, 32, 64, 128)), (3, (8, 16, 32, 64)), (4, (8, 16, 32)))
CHUNKS = (32, 64, 128, 256, 512, 1024, 2048)
COLUMN_WINDOWS = (4, 16, 64, 256)
COLUMN_SINKS = (1, 4)
COLUMN_COUNTS = (4, 8, 16, 32, 64, 128)


# ---------------------------------------------------------------------------
# rows and coverage
# ---------------------------------------------------------------------------

def row_range(rows, q_len: int, q_offset: int = 0) -> tuple[int, int]:
    """The query rows ``[start, stop)`` (row indices) that ``rows`` names.

    ``None`` or ``"all"``: every row; ``"last:N"``: the last N rows;
    ``"from:P"``: rows at query positions >= P; ``"half"``: the last half;
    a ``(start, stop)`` pair of row indices.

        >>> row_range("last:512", 1024), row_range("from:32", 100), row_range("half", 9)
        ((512, 1024), (32, 100), (5, 9))
    """
    if rows is None or rows == "all":
        return 0, q_len
    if isinstance(rows, str):
        kind, _, value = rows.partition(":")
        if kind == "half" and not value:
            return q_len - q_len // 2, q_len
        if kind in ("last", "from") and value.strip().isdigit():
            n = int(value)
            if kind == "last":
                if n < 1:
                    raise MaskValueError(f"rows='last:N' needs N >= 1, got {rows!r}")
                return max(0, q_len - n), q_len
            return min(q_len, max(0, n - q_offset)), q_len
        raise MaskValueError(f"rows must be 'all', 'half', 'last:N', 'from:P' or (start, stop), got {rows!r}")
    try:
        start, stop = (int(v) for v in rows)
    except (TypeError, ValueError):
        raise MaskValueError(f"rows must be 'all', 'half', 'last:N', 'from:P' or (start, stop), got {rows!r}") from None
    if not 0 <= start < stop <= q_len:
        raise MaskValueError(f"rows (start, stop) must satisfy 0 <= start < stop <= {q_len}, got {rows!r}")
    return start, stop


@dataclass(frozen=True)
class Coverage:
    """Share of attention mass a mask keeps. ``per_row`` is ``[..., R]`` (the weights' leading dims)."""

    per_row: torch.Tensor
    rows: tuple[int, int]

    @property
    def per_head(self) -> torch.Tensor:
        """Mean over the rows: ``[...]``."""
        return self.per_row.mean(-1)

    @property
    def mean(self) -> float:
        return float(self.per_row.mean())

    @property
    def min(self) -> float:
        return float(self.per_row.min())

    def __repr__(self) -> str:
        return f"Coverage(mean={self.mean:.4f}, min={self.min:.4f}, rows={self.rows[0]}..{self.rows[1]})"


def _normalized(w: torch.Tensor, start: int = 0) -> torch.Tensor:
    """float64 rows ``[..., R, Lk]`` (rows ``start..`` of a square map) that sum to 1. A row with no mass
    becomes all mass on its own key, which every candidate keeps, as coverage counts such a row as kept."""
    w = w.to(torch.float64)
    total = w.sum(-1, keepdim=True)
    w = w / torch.where(total > 0, total, torch.ones_like(total))
    empty = (total[..., 0] == 0).nonzero()
    if empty.numel():
        w[(*empty.unbind(-1), empty[:, -1] + start)] = 1.0
    return w


def coverage(mask: Mask | str | Sequence[Mask | str], weights: torch.Tensor, *, rows=None,
             q_offset: int | None = None) -> Coverage:
    """The share of attention mass ``mask`` keeps in ``weights [..., Lq, Lk]``, per query row.

    ``mask`` is one mask for all heads or a list with one per head (the
    weights' dim -3). ``rows`` chooses the query rows (see :func:`row_range`:
    ``"last:512"``, ``"from:32"``, ``"half"``, ``(start, stop)``). A row whose
    weights sum to zero counts as fully kept. The dense mask is as large as the
    weights themselves (which are dense already).

        >>> import torch, attnmask as am
        >>> w = torch.softmax(torch.randn(2, 8, 8).masked_fill(~am.causal.to_dense(8), -torch.inf), -1)
        >>> am.coverage("causal", w).min
        1.0
        >>> round(am.coverage(am.diagonal, torch.eye(8)[None].expand(2, 8, 8), rows="last:4").mean, 6)
        1.0
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() < 2:
        raise MaskValueError(f"weights must be a tensor [..., Lq, Lk], got {getattr(weights, 'shape', type(weights).__name__)}")
    q_len, kv_len = weights.shape[-2:]
    start, stop = row_range(rows, q_len, kv_len - q_len if q_offset is None else q_offset)
    if isinstance(mask, (list, tuple)):
        if weights.dim() < 3 or weights.shape[-3] != len(mask):
            raise MaskValueError(f"{len(mask)} per-head masks for weights of shape {tuple(weights.shape)}; "
                                 f"give one mask per head (dim -3) or a single mask")
        dense = torch.stack([as_mask(m).to_dense(q_len, kv_len, q_offset=q_offset) for m in mask])[:, start:stop]
    else:
        dense = as_mask(mask).to_dense(q_len, kv_len, q_offset=q_offset)[start:stop]
    return Coverage(_kept_rows(dense, weights[..., start:stop, :]), (start, stop))


def _kept_rows(dense: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row, the share of ``w``'s mass where ``dense`` is True (1 where a row has no mass)."""
    w = w.to(torch.float64)
    total = w.sum(-1)
    kept = (w * dense).sum(-1)
    return torch.where(total > 0, kept / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.ones_like(total))


# ---------------------------------------------------------------------------
# candidates and their kept mass from prefix sums
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """A static candidate: its mask and how to compute its kept mass cheaply."""

    family: str
    mask: Mask
    kind: str            # 'window' (w, s), 'chunk' (c, s), 'dilated' (w, d, s)
    params: tuple


def _window_mask(w: int, s: int, length: int) -> Mask:
    if w >= length:
        return causal
    if s == 0:
        return causal & sliding(w)
    return causal & (sliding(w) | sink(s))


def static_candidates(length: int, families: Sequence[str] = DEFAULT_FAMILIES) -> list[Candidate]:
    """The static candidate masks tried at one length (``causal`` always among them).

        >>> [str(c.mask) for c in static_candidates(8, ["window"])][:3]
        ['causal', 'causal & sliding(1)', 'causal & (sliding(1) | sink(1))']
    """
    out = [Candidate("window", causal, "window", (length, 0))]
    seen = {causal}

    def add(c: Candidate):
        if c.mask not in seen:
            seen.add(c.mask)
            out.append(c)

    if "window" in families or "columns" in families or "dynamic" in families:
        for w in WINDOWS:
            if w >= length:
                break
            for s in SINKS:
                if s < length and (s == 0 or s < length - w):
                    add(Candidate("window", _window_mask(w, s, length), "window", (w, s)))
    if DILATED_FAMILY in families:
        for d, ws in DILATIONS:
            for w in ws:
                if w * d < length:
                    for s in (0, 4):
                        m = causal & (dilated(w, d) | sink(s)) if s else causal & dilated(w, d)
                        add(Candidate(DILATED_FAMILY, m, DILATED_FAMILY, (w, d, s)))
    if CHUNKED_FAMILY in families:
        for c in CHUNKS:
            if c < length:
                for s in (0, 4):
                    m = causal & (chunked(c) | sink(s)) if s else causal & chunked(c)
                    add(Candidate(CHUNKED_FAMILY, m, "chunk", (c, s)))
    return out


def _interval_index(cands: Sequence[Candidate], q: torch.Tensor, lk: int) -> torch.Tensor:
    """``[R, 3, n]`` key bounds per row of every interval candidate: kept = P(top) - P(lo) + P(sink_end),
    with P(j) the mass of keys < j (window or chunk ``lo..top-1``, and the sink keys below ``lo``)."""
    cols_ = []
    top = torch.clamp(q + 1, max=lk)                                # keys <= q
    for c in cands:
        if c.kind == "window":
            w, s = c.params
            lo = torch.clamp(q - w + 1, min=0)
        else:                                                       # chunk
            size, s = c.params
            lo = q - q % size
        cols_.append(torch.stack([top, lo, torch.clamp(lo, max=s)], 1))
    return torch.stack(cols_, 2)


def _kept_static(wn: torch.Tensor, cands: Sequence[Candidate], start: int, q_offset: int) -> torch.Tensor:
    """Mean kept mass ``[H, C]`` over rows ``start..`` of normalized weights ``wn [H, R, Lk]``.

    Interval candidates (windows, chunks, with sinks) from one prefix sum along
    the keys and three gathers for all of them at once; dilated lattices from
    the mean mass at each distance q - k (with and without the sink keys)."""
    h, r, lk = wn.shape
    dev = wn.device
    q = torch.arange(r, device=dev) + start + q_offset              # query positions of the rows
    out = torch.empty(h, len(cands), dtype=wn.dtype, device=dev)
    interval = [i for i, c in enumerate(cands) if c.kind in ("window", "chunk")]
    if interval:
        csum = torch.cumsum(wn, -1)                                    # csum[..., j] = mass of keys <= j
        idx = _interval_index([cands[i] for i in interval], q, lk).reshape(r, -1)   # [R, 3n]: "keys < j"
        g = csum.gather(-1, (idx - 1).clamp(min=0).unsqueeze(0).expand(h, r, idx.shape[-1]))
        g = (g * (idx > 0)).view(h, r, 3, len(interval))
        out[:, interval] = (g[:, :, 0] - g[:, :, 1] + g[:, :, 2]).mean(1)
    lattice = [i for i, c in enumerate(cands) if c.kind == DILATED_FAMILY]
    if lattice:
        sinks = sorted({cands[i].params[2] for i in lattice})
        profiles = dict(zip(sinks, _distance_profiles(wn, q, sinks)))
        for i in lattice:
            w, step, s = cands[i].params
            profile, sink_mass = profiles[s]
            out[:, i] = profile[:, 0:w * step:step].sum(-1) + sink_mass
    return out


def _distance_profiles(wn: torch.Tensor, q: torch.Tensor, sinks: Sequence[int]) -> list:
    """Per sink size s: ``[H, Lk]`` mean mass over the rows at each distance d = q - k from keys k >= s, and
    ``[H]`` the mean mass of the keys < s. The distances are a strided view of the flipped, padded rows."""
    h, r, lk = wn.shape
    start = int(q[0])
    padded = torch.nn.functional.pad(wn, (lk, 0))                          # key k at column lk + k
    # row i (query q_i) holds distance d = q_i - k at column lk + q_i - d; with e = lk - 1 - d that is
    # column q_i + 1 + e: a view with row stride (stride + 1), reversed distances left to right
    view = padded.as_strided((h, r, lk), (padded.stride(0), padded.stride(1) + 1, 1),
                             padded.storage_offset() + start + 1)
    whole = torch.flip(view.sum(1), [-1])
    out = []
    for s in sinks:
        profile, sink = whole, torch.zeros(h, dtype=wn.dtype, device=wn.device)
        if s:
            head = wn[..., :s]                                                # [H, R, s]: the sink keys
            sink = head.sum(-1).mean(1)
            dist = q.view(r, 1) - torch.arange(s, device=wn.device).view(1, s)  # each sink key's distance
            profile = whole.scatter_add(-1, dist.clamp(min=0).reshape(1, -1).expand(h, -1),
                                        -(head * (dist >= 0)).reshape(h, -1))
        out.append((profile / r, sink))
    return out


def _column_mass(wn: torch.Tensor, start: int, widths: Sequence[int]) -> torch.Tensor:
    """``[H, n_widths, Lk]``: mean over the rows of the mass at key p from queries q >= p + w."""
    h, r, lk = wn.shape
    upto = torch.cumsum(wn, 1)                                            # upto[:, i, p] = mass of rows <= i
    total = upto[:, r - 1]
    p = torch.arange(lk, device=wn.device)
    out = []
    for w in widths:
        first = torch.clamp(p + w - start, min=0, max=r)                  # first row index with q >= p + w
        before = upto.gather(1, (first - 1).clamp(min=0).view(1, 1, lk).expand(h, 1, lk))[:, 0] * (first > 0)
        out.append((total - before) / r)
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------
# per-text statistics
# ---------------------------------------------------------------------------

def _as_layers(maps) -> dict[int, torch.Tensor]:
    """One text's maps as {layer: [H, L, L]}: a dict or a list of per-layer tensors, each [H, L, L] or [1, H, L, L]."""
    items = maps.items() if isinstance(maps, Mapping) else enumerate(maps)
    out = {}
    for layer, w in items:
        if not isinstance(w, torch.Tensor) or w.dim() not in (3, 4) or (w.dim() == 4 and w.shape[0] != 1):
            raise MaskValueError(f"layer {layer}: weights must be [H, L, L] or [1, H, L, L], got "
                                 f"{getattr(w, 'shape', type(w).__name__)} (fit one text at a time: batch 1)")
        w = w[0] if w.dim() == 4 else w
        if w.shape[-1] != w.shape[-2]:
            raise MaskValueError(f"layer {layer}: fit needs square weights [H, L, L] (a prefill), got {tuple(w.shape)}")
        out[int(layer)] = w
    if not out:
        raise MaskValueError("a text's maps are empty: give {layer: weights} for at least one layer")
    return out


@dataclass
class _TextStats:
    length: int
    kept: dict[int, torch.Tensor]                 # layer -> [H, C_static]
    colmass: dict[int, torch.Tensor]              # layer -> [H, n_column_windows, L]: mean mass per key, q - k >= w
    dyn_kept: dict[int, torch.Tensor] = field(default_factory=dict)    # layer -> [H, n_dyn]
    dyn_pairs: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [H, n_dyn]
    dyn_cols: dict[int, list] = field(default_factory=dict)            # layer -> per head, per dyn candidate


def _column_bases(length: int) -> list[tuple[int, int]]:
    return [(w, s) for w in COLUMN_WINDOWS for s in COLUMN_SINKS if w + s < length]


def _column_pairs(positions: torch.Tensor, w: int, length: int) -> torch.Tensor:
    """Pairs added by columns at ``positions`` (all >= the sink) outside a window w: rows q >= p + w."""
    return torch.clamp(length - positions - w, min=0).sum(-1)


def _text_stats(maps: dict[int, torch.Tensor], cands: Sequence[Candidate], rows, families, last_queries: int,
                column_counts: Sequence[int], base_index: dict) -> _TextStats:
    length = next(iter(maps.values())).shape[-1]
    start, stop = row_range(rows, length)
    bases = _column_bases(length)
    want_cols = "columns" in families or "dynamic" in families
    stats = _TextStats(length, {}, {})
    k_idx = torch.arange(length)
    q_last = torch.arange(max(0, length - last_queries), length)
    dist_last = q_last.view(-1, 1) - k_idx.view(1, -1)
    for layer, w in maps.items():
        if w.shape[-1] != length:
            raise MaskValueError(f"every layer of a text must have the same length; layer {layer} has "
                                 f"{w.shape[-1]}, expected {length}")
        wn = _normalized(w[:, start:stop], start)
        stats.kept[layer] = _kept_static(wn, cands, start, 0)
        if not want_cols:
            continue
        widths = sorted({b[0] for b in bases})
        colmass = _column_mass(wn, start, widths)                              # [H, nw, L]
        stats.colmass[layer] = colmass
        if "dynamic" in families:
            wl = _normalized(w[:, q_last], int(q_last[0]))
            kept, pairs, chosen = [], [], []
            for (cw, s) in bases:
                score = (wl * (dist_last >= cw)).sum(1)                # [H, L]: the last queries' mass per key
                score[:, :s] = -1.0                                    # the sink holds those keys already
                wi = widths.index(cw)
                base_kept = stats.kept[layer][:, base_index[(cw, s)]]
                for count in column_counts:
                    n = min(count, length - s)
                    top = torch.topk(score, n, dim=-1).indices         # [H, n]
                    kept.append(base_kept + colmass[:, wi].gather(-1, top).sum(-1))
                    pairs.append(_column_pairs(top, cw, length))
                    chosen.append(top)
            stats.dyn_kept[layer] = torch.stack(kept, 1)
            stats.dyn_pairs[layer] = torch.stack(pairs, 1).to(torch.float64)
            stats.dyn_cols[layer] = chosen
    return stats


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------

def _check_families(families) -> tuple[str, ...]:
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise MaskValueError(f"unknown families {unknown or list(families)!r}; choose from {', '.join(FAMILIES)}")
    return families


class Calibration:
    """The per-text statistics a fit needs, gathered once; :meth:`plan` picks masks for any target share.

    Holds, per text, layer and head, the kept share of every static candidate,
    the mass per key column outside a few windows, and the data-dependent
    columns' kept share and pairs: a few MB for a 30-layer model at 1024
    tokens, not the weights. ``add`` takes one text's maps at a time.

        >>> import torch, attnmask as am
        >>> from attnmask.fitting import Calibration
        >>> w = am.causal.to_dense(32).float() * (torch.arange(32) >= torch.arange(32)[:, None] - 3)
        >>> cal = Calibration(families=["window"]); cal.add({0: (w / w.sum(-1, keepdim=True))[None]})
        >>> str(cal.plan(keep=0.99).layer(0)[0]), str(cal.plan(keep=0.5).layer(0)[0])
        ('causal & sliding(4)', 'causal & sliding(2)')
    """

    def __init__(self, *, rows="half", families: Sequence[str] = DEFAULT_FAMILIES,
                 column_counts: Sequence[int] = COLUMN_COUNTS, last_queries: int = 64):
        self.families = _check_families(families)
        if isinstance(last_queries, bool) or not isinstance(last_queries, int) or last_queries < 1:
            raise MaskValueError(f"last_queries must be a whole number >= 1, got {last_queries!r}")
        counts = tuple(column_counts)
        if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
            raise MaskValueError(f"column_counts must be whole numbers >= 1, got {column_counts!r}")
        if not (rows is None or isinstance(rows, str)):
            rows = tuple(rows)
        self.rows, self.counts, self.last_queries = rows, counts, last_queries
        self.texts: list[_TextStats] = []
        self.names: list[str] = []
        self.cands: list[Candidate] = []
        self.layers: list[int] = []
        self.heads = 0
        self._base_index: dict = {}

    @property
    def length(self) -> int:
        if not self.texts:
            raise MaskValueError("no calibration text yet: add() at least one text's maps")
        return self.texts[0].length

    def add(self, maps, name: str | None = None) -> None:
        """Gather one text's statistics from its maps ``{layer: [H, L, L]}`` (or ``[1, H, L, L]``)."""
        maps = _as_layers(maps)
        length = next(iter(maps.values())).shape[-1]
        t = len(self.texts)
        if not self.texts:
            row_range(self.rows, length)    # a bad rows value fails before any work
            self.cands = static_candidates(length, self.families)
            self._base_index = {c.params: i for i, c in enumerate(self.cands) if c.kind == "window"}
            self.layers = sorted(maps)
            self.heads = next(iter(maps.values())).shape[0]
        elif length != self.length:
            raise MaskValueError(f"every calibration text must have the same length; text {t} has {length} "
                                 f"tokens, text 0 has {self.length} (cut them to the same length)")
        elif sorted(maps) != self.layers or any(w.shape[0] != self.heads for w in maps.values()):
            raise MaskValueError(f"text {t} has layers {sorted(maps)} or head counts unlike text 0 "
                                 f"({self.layers}, {self.heads} heads); capture the same layers of every text")
        self.texts.append(_text_stats(maps, self.cands, self.rows, self.families, self.last_queries,
                                      self.counts, self._base_index))
        self.names.append(name if name is not None else f"text {t}")

    def plan(self, keep: float = 0.95, families: Sequence[str] | None = None) -> MaskPlan:
        """Per layer and head, the cheapest candidate keeping ``keep`` on every text (see :func:`fit`)."""
        if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep <= 1:
            raise MaskValueError(f"keep must be a share in (0, 1], got {keep!r}")
        families = self.families if families is None else _check_families(families)
        missing = [f for f in families if f not in self.families]
        if missing:
            raise MaskValueError(f"families {missing} were not calibrated; calibrate with families="
                                 f"{list(self.families) + missing}")
        texts, cands, layers, heads, counts = self.texts, self.cands, self.layers, self.heads, self.counts
        length = self.length
        causal_pairs = length * (length + 1) // 2
        static_pairs = torch.tensor([float(c.mask.compile(length).attended_pairs()) for c in cands],
                                    dtype=torch.float64)
        use_static = torch.tensor([c.family in families or c.mask == causal for c in cands])
        bases = _column_bases(length)
        widths = sorted({b[0] for b in bases})
        base_index = self._base_index
        n_layers = max(layers) + 1

        masks = [[causal] * heads for _ in range(n_layers)]
        figures = [[{"fitted": False, "family": CAUSAL_FAMILY, "density": 1.0} for _ in range(heads)]
                   for _ in range(n_layers)]
        dynamic = [[None] * heads for _ in range(n_layers)]
        kept_all = []          # per fitted layer: [T, H, C] static kept (for the uniform comparison)
        for layer in layers:
            kept = torch.stack([s.kept[layer] for s in texts])                 # [T, H, C]
            kept_all.append(kept)
            worst = kept.min(0).values                                          # [H, C]
            for h in range(heads):
                ok = (worst[h] >= keep) & use_static
                ok[0] = True                                                    # causal keeps everything
                costs = torch.where(ok, static_pairs, torch.full_like(static_pairs, math.inf))
                best_i = int(torch.argmin(costs))
                best = ("static", best_i, float(static_pairs[best_i]))
                if "columns" in families:
                    # static columns: the positions with the most calibration mass, one set for every input
                    cm = torch.stack([s.colmass[layer][h] for s in texts])      # [T, nw, L]
                    total = cm.sum(0)
                    for (cw, s) in bases:
                        wi = widths.index(cw)
                        score = total[wi].clone()
                        score[:s] = -1.0
                        base_k = kept[:, h, base_index[(cw, s)]]
                        for count in counts:
                            top = torch.topk(score, min(count, length - s)).indices
                            pairs = float(static_pairs[base_index[(cw, s)]] + _column_pairs(top, cw, length))
                            k_t = base_k + cm[:, wi].gather(-1, top.view(1, -1).expand(len(texts), -1)).sum(-1)
                            if float(k_t.min()) >= keep and pairs < best[2]:
                                best = ("columns", (cw, s, top.tolist(), k_t), pairs)
                if "dynamic" in families:
                    dk = torch.stack([s.dyn_kept[layer][h] for s in texts])     # [T, n_dyn]
                    dp = torch.stack([s.dyn_pairs[layer][h] for s in texts]).mean(0)
                    i = 0
                    for (cw, s) in bases:
                        for count in counts:
                            pairs = float(static_pairs[base_index[(cw, s)]] + dp[i])
                            if float(dk[:, i].min()) >= keep and pairs < best[2]:
                                best = ("dynamic", (cw, s, count, dk[:, i]), pairs)
                            i += 1
                kind, what, pairs = best
                if kind == "static":
                    cand = cands[what]
                    k_t = kept[:, h, what]
                    masks[layer][h] = cand.mask
                    fig = {"family": cand.family if cand.mask != causal else CAUSAL_FAMILY}
                elif kind == "columns":
                    cw, s, positions, k_t = what
                    masks[layer][h] = with_columns(cw, s, positions)
                    fig = {"family": "columns"}
                else:
                    cw, s, count, k_t = what
                    masks[layer][h] = _window_mask(cw, s, length)
                    dynamic[layer][h] = dynamic_spec(cw, s, count, self.last_queries)
                    fig = {"family": "dynamic"}
                fig.update(fitted=True, pairs=int(round(pairs)), density=pairs / causal_pairs,
                           kept_mean=float(k_t.mean()), kept_worst_text=float(k_t.min()))
                figures[layer][h] = fig

        fitted = [figures[l][h] for l in layers for h in range(heads)]
        plan_density = sum(f["density"] for f in fitted) / len(fitted)
        # the honest comparison: one mask for every head, no denser than the plan
        kept_cat = torch.cat([k.permute(2, 0, 1).reshape(len(cands), -1) for k in kept_all], 1)   # [C, T*L*H]
        uniform = None
        for i in torch.argsort(kept_cat.mean(1), descending=True).tolist():
            if static_pairs[i] / causal_pairs <= plan_density + 1e-12 and use_static[i]:
                per_head = torch.cat([k[:, :, i].mean(0) for k in kept_all])
                uniform = {"mask": str(cands[i].mask), "density": float(static_pairs[i] / causal_pairs),
                           "kept_mean": float(kept_cat[i].mean()), "kept_worst_head": float(per_head.min())}
                break
        # and what one mask for every head must cost to keep as much as the plan does on average
        plan_kept = sum(f["kept_mean"] for f in fitted) / len(fitted)
        matching = None
        for i in torch.argsort(static_pairs).tolist():
            if use_static[i] and float(kept_cat[i].mean()) >= plan_kept:
                per_head = torch.cat([k[:, :, i].mean(0) for k in kept_all])
                matching = {"mask": str(cands[i].mask), "density": float(static_pairs[i] / causal_pairs),
                            "kept_mean": float(kept_cat[i].mean()), "kept_worst_head": float(per_head.min())}
                break
        rows = self.rows if isinstance(self.rows, (str, type(None))) else list(self.rows)
        # the settings under the names of fit()'s parameters (keep, rows, families, last_queries), then totals
        meta = dict(keep=keep, rows=rows, length=length, texts=list(self.names),
                    families=list(families), last_queries=self.last_queries,
                    density_mean=plan_density, pairs_total=int(sum(f["pairs"] for f in fitted)),
                    kept_mean=sum(f["kept_mean"] for f in fitted) / len(fitted),
                    kept_worst_head=min(f["kept_worst_text"] for f in fitted),
                    heads_causal=sum(f["family"] == CAUSAL_FAMILY for f in fitted), uniform=uniform,
                    uniform_matching=matching)
        has_dynamic = any(d is not None for layer in dynamic for d in layer)
        return MaskPlan(tuple(tuple(layer) for layer in masks), figures=tuple(tuple(f) for f in figures),
                        meta=meta, dynamic=tuple(tuple(d) for d in dynamic) if has_dynamic else None)


def fit(maps_per_text: Iterable, keep: float = 0.95, *, rows="half", families: Sequence[str] = DEFAULT_FAMILIES,
        column_counts: Sequence[int] = COLUMN_COUNTS, last_queries: int = 64, names: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None) -> MaskPlan:
    """Per layer and head, the cheapest candidate mask keeping ``keep`` of the mass on every text.

    ``maps_per_text`` yields, per calibration text, that text's weights as
    ``{layer: [H, L, L]}`` (or ``[1, H, L, L]``, what :func:`attnmask.models.capture`
    returns); a generator keeps only one text in memory at a time. All texts
    have the same length L. The criterion is the mean kept share over
    ``rows`` (default ``"half"``: the last half of the rows, which a wide
    window does not cover trivially), on each text separately. Cost: exact
    attended pairs at L. ``families`` chooses among :data:`FAMILIES`
    (default windows, dilated and chunked; ``"columns"`` and ``"dynamic"``,
    whose columns depend on each input, are opt-in).
    ``progress`` is called with the number of texts done. To fit several
    targets from one pass over the texts, use :class:`Calibration`.

    The plan's ``figures[l][h]`` hold the family, pairs, density (pairs /
    causal pairs) and the kept share (mean and worst text); ``meta`` the
    settings, totals, ``uniform``: the best single mask for every head whose
    density is at most the plan's, and ``uniform_matching``: the cheapest
    single mask that keeps as much as the plan on average.

        >>> import torch, attnmask as am
        >>> w = am.causal.to_dense(64).float() * (torch.arange(64) >= torch.arange(64)[:, None] - 7)
        >>> maps = [{0: (w / w.sum(-1, keepdim=True))[None].repeat(2, 1, 1)}]
        >>> plan = am.fit(maps, keep=0.99, families=["window"])
        >>> str(plan.layer(0)[0])
        'causal & sliding(8)'
    """
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep <= 1:
        raise MaskValueError(f"keep must be a share in (0, 1], got {keep!r}")
    cal = Calibration(rows=rows, families=families, column_counts=column_counts, last_queries=last_queries)
    names = list(names) if names is not None else None
    for t, maps in enumerate(maps_per_text):
        cal.add(maps, names[t] if names is not None and t < len(names) else None)
        if progress is not None:
            progress(t + 1)
    if not cal.texts:
        raise MaskValueError("fit needs at least one calibration text")
    return cal.plan(keep)


def plan_coverage(plan: MaskPlan, maps: Mapping[int, torch.Tensor] | Sequence[torch.Tensor], *,
                  rows="half") -> torch.Tensor:
    """float64 ``[layers, H]``: the share each head's planned mask keeps on one text (mean over ``rows``).

    Data-dependent heads are resolved on this text first (their columns from
    its last queries), exactly as they would be when running it. Layers
    missing from ``maps`` are NaN.

        >>> import torch, attnmask as am
        >>> plan = am.MaskPlan.uniform("causal", layers=1, heads=2)
        >>> plan_coverage(plan, {0: torch.eye(4)[None].repeat(2, 1, 1)}).tolist()
        [[1.0, 1.0]]
    """
    layers = _as_layers(maps)
    out = torch.full((plan.n_layers, plan.n_heads), math.nan, dtype=torch.float64)
    dense: dict[Mask, torch.Tensor] = {}     # plans repeat masks across layers: build each dense rows once
    for layer, w in layers.items():
        if layer >= plan.n_layers or w.shape[0] != plan.n_heads:
            raise MaskValueError(f"maps layer {layer} with {w.shape[0]} heads does not fit the plan "
                                 f"({plan.n_layers} layers x {plan.n_heads} heads)")
        q_len, kv_len = w.shape[-2:]
        start, stop = row_range(rows, q_len, kv_len - q_len)
        specs = plan.dynamic[layer] if plan.dynamic is not None else (None,) * plan.n_heads
        for h, (m, spec) in enumerate(zip(plan.layer(layer), specs)):
            if m not in dense:
                if len(dense) >= 128:        # bounded: 128 x rows x keys bools
                    dense.clear()
                dense[m] = m.to_dense(q_len, kv_len)[start:stop]
            kept = _kept_rows(dense[m], w[h, start:stop])
            if spec is not None:
                # the resolved mask is the base plus columns outside it: their mass adds to the base's
                # (the same as coverage(plan.resolve(...)), without a dense mask per input)
                positions = torch.tensor(top_column_positions(spec, w[h, -int(spec["last_queries"]):]))
                rows_w = _normalized(w[h, start:stop], start)
                q = torch.arange(start, stop).view(-1, 1)
                outside = (q - positions.view(1, -1)) >= int(spec["window"])
                kept = kept + (rows_w[:, positions] * outside).sum(-1)
            out[layer, h] = kept.mean()
    return out


__all__ = ["coverage", "Coverage", "fit", "Calibration", "plan_coverage", "row_range", "static_candidates", "with_columns",
           "resolve_columns", "FAMILIES", "DEFAULT_FAMILIES", "CAUSAL_FAMILY", "DILATED_FAMILY", "CHUNKED_FAMILY"]

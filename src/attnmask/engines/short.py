"""Short calls and decoding: 1 to ``SHORT_ROWS`` query rows against any number of keys, in few fused calls.

A decode step (one query row against a KV cache) has a new shape every step,
so a layout compiled for it is used once: compiling costs 3-8 ms at 4K-64K keys
on this project's machine while the step itself is 0.1-10 ms. This path
compiles nothing. It finds, for every query row of every head, the keys it
attends, then runs one fused flash call per run of kv heads that read the same
keys (usually one call for all heads):

- the keys of a row come from the mask's structure as a few intervals
  (:func:`attnmask.engines.rowkeys.row_keys`: no evaluation over the Lk cells, so a
  cache that grows by one key a step costs a few microseconds per distinct mask to
  re-plan); a mask it cannot describe (a ``from_mask_mod`` leaf that matters,
  ``strided(2)`` over a long cache) is evaluated on the call's ``[Lq, Lk]`` cells in
  the call's frame, so a mask_mod leaf sees what it sees everywhere (row index
  0..Lq-1, key index, the lengths, and the b / h the dispatcher pinned it at);
- query heads that share a kv head are folded into the query rows
  (q ``[B, H, Lq, D]`` viewed as ``[B, Hkv, rep * Lq, D]``), so K/V are never
  repeated for GQA and each head's rows carry their own mask;
- kv heads whose rows need different keys (a ``causal`` head next to narrow
  windows) run as separate calls when reading fewer keys saves more than a call
  costs (``_CALL_COST``), so a narrow head does not read the whole cache;
- keys: the contiguous range from the first to the last key used, as views
  (no copy), when at least half of it is used; otherwise the used keys are
  gathered (a copy of just the keys attended, e.g. the w + s keys of
  ``sliding(w) | sink(s)`` at 64K cached keys);
- no mask at all when every row attends every selected key (a ``causal``
  decode step is then the very call SDPA makes).

Rows with no key give zeros and lse = -inf. Plans are cached per (masks, offsets,
shape, heads) in a byte-bounded cache, so a repeated shape costs one lookup and the
30 layers of a model at one decode step share one plan.

    >>> import torch, attnmask as am
    >>> q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 100, 16)
    >>> out, lse = short_forward(q, k, k, [(am.causal & am.sliding(8), 99), (am.causal, 99)],
    ...                          torch.tensor([[0, 1, 0, 1]]), 0.25)
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 1, 16]), torch.Size([1, 4, 1]))
"""

from __future__ import annotations

from bisect import bisect_right

import torch

from ..masks import Frame, Mask, evaluate_at
from ..threads import single_thread, threads_for
from .cache import ByteLRU, tensor_bytes
from .rowkeys import merge_intervals, row_keys

__all__ = ["short_forward", "SHORT_ROWS", "SHORT_MAX_CELLS", "short_plans"]

#: Calls with at most this many query rows take this path (decode steps, speculative drafts).
SHORT_ROWS = 16
#: ... when their masks' cells (distinct masks x Lq x Lk) stay under this bound (64 MB of booleans).
SHORT_MAX_CELLS = 1 << 26
#: The key range is used as views when at least this share of it is attended, else keys are gathered.
_VIEW_SHARE = 0.5
#: The cost model that splits a short call into kernel calls, in units of one folded query row
#: reading one key (~6.5 ns): a call costs _CALL_COST, and each of its kv heads reads each selected
#: key once for all its rows (about two rows' worth) plus one unit per row. Measured on the
#: project's machine, one thread, fp32, D = 64: a call ~11 us, 4096 keys ~84 us for one row and
#: ~135 us for three folded rows.
_CALL_COST = 1536
#: Rows (distinct masks x query rows) whose keys are read off the masks' structure; more are
#: evaluated as one tensor (each row walks its mask's tree in Python, a few us a row).
_ROW_WALKS = 64
#: Gathered keys of at most this many intervals are concatenated slices, more an index_select.
_CAT_PIECES = 4

#: Plans of short calls (key selections, masks), bounded in bytes.
short_plans = ByteLRU(64 << 20)
#: Row masks by what they hold (shape and every row's key columns): a cache that grows by one key
#: a step moves a window and its gathered keys together, so the step's mask is the last one's.
_row_masks = ByteLRU(16 << 20)

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class _RowMask:
    """Which selected keys each row of a call attends: bool [B or 1, kv heads, rows, n]."""

    def __init__(self, allowed: torch.Tensor, empty: torch.Tensor | None):
        self.allowed = allowed
        self.empty = empty                # bool, the shape of allowed without n: rows with no key, or None
        self._additive: dict[torch.dtype, torch.Tensor] = {}

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        hit = self._additive.get(dtype)
        if hit is None:
            hit = self._additive[dtype] = torch.zeros(self.allowed.shape, dtype=dtype).masked_fill_(
                ~self.allowed, float("-inf"))
        return hit

    def nbytes(self) -> int:
        # the additive masks (one per dtype seen, at most 8 bytes a cell) are counted up front
        return tensor_bytes(self.allowed, self.empty) + 8 * tensor_bytes(self.allowed) + 128


class _Call:
    """One kernel call of a plan: kv heads ``kv0:kv1``, their folded query rows ``rows`` (None: all),
    keys ``lo:hi`` as views, or the concatenated intervals ``pieces``, or ``index``; its mask or None
    (every row attends every selected key)."""

    def __init__(self, kv0: int, kv1: int, rows: torch.Tensor | None, lo: int, hi: int, pieces: list | None,
                 index: torch.Tensor | None, mask: _RowMask | None):
        self.kv0, self.kv1, self.rows, self.lo, self.hi = kv0, kv1, rows, lo, hi
        self.pieces, self.index, self.mask = pieces, index, mask

    def nbytes(self) -> int:
        return tensor_bytes(self.rows, self.index) + (self.mask.nbytes() if self.mask is not None else 0) + 256


class _ShortPlan:
    """The calls of a short call; rows in no call attend nothing (zeros, lse -inf)."""

    def __init__(self, calls: list[_Call], Hkv: int):
        self.calls = calls
        self.whole = len(calls) == 1 and calls[0].kv0 == 0 and calls[0].kv1 == Hkv and calls[0].rows is None

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.calls) + 128


def fits(n_masks: int, Lq: int, Lk: int) -> bool:
    """Whether a call of Lq rows against Lk keys with ``n_masks`` distinct masks takes this path.

        >>> fits(9, 1, 65536), fits(1, 64, 4096)
        (True, False)
    """
    return 0 < Lq <= SHORT_ROWS and n_masks * Lq * Lk <= SHORT_MAX_CELLS


# -- plans from key intervals (the masks' structure) ------------------------------------------------

def _rows_of(items: list[tuple[Mask, int]], Lq: int, Lk: int) -> list | None:
    """Per item, per query row: the keys attended as intervals; None if any mask cannot say."""
    out = []
    for m, off in items:
        rows = []
        for r in range(Lq):
            got = row_keys(m, off + r, Lk)
            if got is None:
                return None
            rows.append(got)
        out.append(rows)
    return out


def _union(lists) -> list:
    """Sorted, disjoint, non-touching union of interval lists (equal lists counted once)."""
    distinct = {id(x): x for x in lists}
    if len(distinct) == 1:
        return next(iter(distinct.values()))
    return merge_intervals([r for x in distinct.values() for r in x])


def _cost(kv_heads: int, rows: int, width: int) -> int:
    """What one kernel call of ``rows`` folded rows per kv head over ``width`` keys costs (see _CALL_COST)."""
    return _CALL_COST + kv_heads * width * (2 + rows)


def _width(keys: list) -> int:
    """Keys one call reads for a union of intervals: the whole range as views, or the keys gathered."""
    if not keys:
        return 0
    span = keys[-1][1] - keys[0][0]
    used = sum(b - a for a, b in keys)
    return span if used >= _VIEW_SHARE * span else used


def _plan_from_rows(ivs: list, head_index: torch.Tensor, Lq: int, Hkv: int,
                    units: list | None = None) -> tuple[_ShortPlan | None, list]:
    """The plan of rows given as intervals, and its units (which rows of which kv heads share a call).

    ``units`` from an earlier step of the same call site (a growing cache) are used instead of
    choosing again; every call is still built from these rows, so the plan is exact either way,
    provided every row the units leave out has no key (else None: choose again)."""
    B, H = head_index.shape
    rep = H // Hkv
    same_rows = B == 1 or bool((head_index == head_index[:1]).all())
    heads = (head_index[:1] if same_rows else head_index).tolist()          # [B'][H] item of each head
    Bp, R = len(heads), rep * Lq
    # rows of kv head g in the kernel's order (b, then query head of the group, then query row)
    per_kv = [[ivs[heads[b][g * rep + j]][r] for b in range(Bp) for j in range(rep) for r in range(Lq)]
              for g in range(Hkv)]
    if units is None:
        units = _choose_units(per_kv, Bp, R)
    elif not _covers(units, per_kv, Bp, R):
        return None, units
    calls = []
    for a, b, rows in units:
        picked = range(R) if rows is None else rows
        keys = _union([per_kv[g][x * R + i] for x in range(Bp) for g in range(a, b) for i in picked])
        if keys:
            calls.append(_call_from_rows(a, b, rows, keys, per_kv, Bp, R))
    return _ShortPlan(calls, Hkv), units


def _choose_units(per_kv: list, Bp: int, R: int) -> list:
    """[(kv0, kv1, rows or None)]: kv heads, and rows of one kv head, that share a call (see _cost)."""
    units: list[list] = []                                 # [kv0, kv1, rows (tuple or None), keys]
    for g in range(len(per_kv)):
        for rows, keys in _split_rows(per_kv[g], Bp):
            prev = next((u for u in reversed(units) if u[1] == g and u[2] == rows), None)
            if prev is not None:
                if prev[3] == keys:
                    prev[1] = g + 1
                    continue
                both = _union([prev[3], keys])
                n, r = prev[1] - prev[0], R if rows is None else len(rows)
                if _cost(n + 1, r, _width(both)) <= _cost(n, r, _width(prev[3])) + _cost(1, r, _width(keys)):
                    prev[1], prev[3] = g + 1, both
                    continue
            units.append([g, g + 1, rows, keys])
    return [(a, b, rows) for a, b, rows, _ in units]


def _covers(units: list, per_kv: list, Bp: int, R: int) -> bool:
    """Whether every row with a key is in some unit."""
    partial: dict[int, set] = {}
    whole = set()
    for a, b, rows in units:
        for g in range(a, b):
            if rows is None:
                whole.add(g)
            else:
                partial.setdefault(g, set()).update(rows)
    for g, rows in enumerate(per_kv):
        if g in whole:
            continue
        seen = partial.get(g, ())
        if any(rows[x * R + i] for x in range(Bp) for i in range(R) if i not in seen):
            return False
    return True


def _split_rows(rows: list, Bp: int) -> list[tuple]:
    """One kv head's rows as (row subset or None for all, their keys) units: rows that read many keys
    (a ``causal`` head) apart from rows that read few, when a call of their own saves reading keys."""
    keys = _union(rows)
    if not keys:
        return []
    whole = [(None, keys)]
    if Bp != 1 or len(rows) == 1:
        return whole
    w = _width(keys)
    widths = {id(r): _width(r) for r in rows}             # rows of one mask are one list object
    wide = tuple(i for i, r in enumerate(rows) if 2 * widths[id(r)] >= w)
    narrow = tuple(i for i, r in enumerate(rows) if 2 * widths[id(r)] < w and r)
    if not wide or not narrow:
        return whole
    narrow_keys = _union([rows[i] for i in narrow])
    wide_keys = _union([rows[i] for i in wide])
    if _cost(1, len(wide), _width(wide_keys)) + _cost(1, len(narrow), _width(narrow_keys)) >= _cost(1, len(rows), w):
        return whole
    return [(wide, wide_keys), (narrow, narrow_keys)]


_row_index: dict = {}


def _call_from_rows(kv0: int, kv1: int, subset: tuple | None, keys: list, per_kv: list, Bp: int, R: int) -> _Call:
    lo, hi = keys[0][0], keys[-1][1]
    used = sum(b - a for a, b in keys)
    picked = range(R) if subset is None else subset
    rows = [per_kv[g][b * R + i] for b in range(Bp) for g in range(kv0, kv1) for i in picked]
    pieces = index = None
    if used >= _VIEW_SHARE * (hi - lo):
        n, selected = hi - lo, [(lo, hi)]
    else:
        n, selected = used, keys
        if len(keys) <= _CAT_PIECES:
            pieces = keys
        else:
            starts = torch.tensor([a for a, _ in keys])
            lengths = torch.tensor([b - a for a, b in keys])
            index = torch.arange(n) + torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths)
    row_t = None
    if subset is not None:
        row_t = _row_index.get(subset)
        if row_t is None:
            row_t = _row_index.setdefault(subset, torch.tensor(subset, dtype=torch.int64))
    if all(r == selected for r in rows):
        return _Call(kv0, kv1, row_t, lo, hi, pieces, index, None)
    # each row's intervals as columns of the selected keys
    starts_l, cols, at = [], [], 0
    for a, b in selected:
        starts_l.append(a)
        cols.append(at)
        at += b - a
    mapped = []
    for r in rows:
        m = []
        for a, b in r:
            j = bisect_right(starts_l, a) - 1                 # the selected interval holding [a, b)
            ca = cols[j] + a - starts_l[j]
            m.append((ca, ca + b - a))
        mapped.append(tuple(m))
    shape = (Bp, kv1 - kv0, len(picked), n)
    signature = (shape, tuple(mapped))
    mask = _row_masks.get(signature)
    if mask is None:
        mask = _row_mask(mapped, shape)
        _row_masks.put(signature, mask, mask.nbytes() + 64 * len(rows))
    return _Call(kv0, kv1, row_t, lo, hi, pieces, index, mask)


def _row_mask(mapped: list, shape: tuple) -> _RowMask:
    """The rows' key columns drawn as +1 / -1 steps and summed along each row."""
    n = shape[-1]
    where, step = [], []
    for i, r in enumerate(mapped):
        for a, b in r:
            where += [(i, a), (i, b)]
            step += [1, -1]
    edges = torch.zeros(len(mapped), n + 1, dtype=torch.int32)
    if where:
        at = torch.tensor(where).T
        edges.index_put_((at[0], at[1]), torch.tensor(step, dtype=torch.int32), accumulate=True)
    allowed = (edges.cumsum(1, dtype=torch.int32)[:, :n] > 0).reshape(shape)
    empty = None
    if any(not r for r in mapped):
        empty = torch.tensor([not r for r in mapped]).reshape(shape[:-1])
    return _RowMask(allowed, empty)


# -- plans by evaluating the masks on the call's cells (any mask) -----------------------------------

def _plan_by_evaluation(items: list[tuple[Mask, int]], head_index: torch.Tensor, Lq: int, Lk: int,
                        Hkv: int) -> _ShortPlan:
    kpos = torch.arange(Lk)
    rows = torch.arange(Lq)[:, None]
    allowed = torch.stack([torch.broadcast_to(evaluate_at(m, off + rows, kpos[None, :], Frame(off, Lq, Lk)),
                                              (Lq, Lk)) for m, off in items])          # [M, Lq, Lk]
    used = allowed.any(1).any(0)
    idx = used.nonzero().flatten()
    if len(idx) == 0:
        return _ShortPlan([], Hkv)
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    index = None
    if len(idx) < _VIEW_SHARE * (hi - lo):
        index = idx
        sel = allowed.index_select(2, idx)
    else:
        sel = allowed[:, :, lo:hi]
    B, H = head_index.shape
    same_rows = B == 1 or bool((head_index == head_index[:1]).all())
    hi_ = head_index[:1] if same_rows else head_index
    per_head = sel[hi_]                                                   # [B', H, Lq, n]
    if bool(per_head.all()):
        return _ShortPlan([_Call(0, Hkv, None, lo, hi, None, index, None)], Hkv)
    n = per_head.shape[-1]
    folded = per_head.reshape(hi_.shape[0], Hkv, (H // Hkv) * Lq, n).contiguous()
    empty = ~folded.any(-1)
    mask = _RowMask(folded, empty if bool(empty.any()) else None)
    return _ShortPlan([_Call(0, Hkv, None, lo, hi, None, index, mask)], Hkv)


#: Units chosen at a call site (masks, offsets from the end, heads), with the Lk they were chosen
#: at: a growing cache reuses them for later steps up to _REUSE_GROWTH x that Lk.
_site_units = ByteLRU(1 << 20)
_REUSE_GROWTH = 1.25


def _build(items: list[tuple[Mask, int]], head_index: torch.Tensor, Lq: int, Lk: int, Hkv: int,
           site=None) -> _ShortPlan:
    ivs = _rows_of(items, Lq, Lk) if len(items) * Lq <= _ROW_WALKS else None
    if ivs is None:
        return _plan_by_evaluation(items, head_index, Lq, Lk, Hkv)
    if site is not None:
        hit = _site_units.get(site)
        if hit is not None and hit[0] <= Lk < _REUSE_GROWTH * hit[0]:
            plan, _ = _plan_from_rows(ivs, head_index, Lq, Hkv, hit[1])
            if plan is not None:
                return plan
    plan, units = _plan_from_rows(ivs, head_index, Lq, Hkv)
    if site is not None:
        _site_units.put(site, (Lk, units), 64 + 32 * len(units))
    return plan


#: The last masks seen, by identity: (their ids, the masks themselves, their token).
#: A decode loop passes the same mask objects every step; hashing their trees each step costs
#: more than the step's other Python work (the masks are kept alive here, so ids stay theirs).
_last_masks: list = [None]
#: Equal mask lists share one token (an int, cheap to hash in plan keys). Tokens are never reused,
#: so clearing this table (past _MAX_TOKENS) can only make old plans unreachable, never wrong.
_tokens: dict = {}
_next_token = [0]
_MAX_TOKENS = 4096


def _masks_key(items: list[tuple[Mask, int]]) -> int:
    """A token for the masks of ``items`` (offsets aside): equal lists of masks get the same one."""
    ids = tuple(id(m) for m, _ in items)
    hit = _last_masks[0]
    if hit is not None and hit[0] == ids:
        return hit[2]
    masks = tuple(m for m, _ in items)
    token = _tokens.get(masks)
    if token is None:
        if len(_tokens) >= _MAX_TOKENS:
            _tokens.clear()
        token = _tokens[masks] = _next_token[0]
        _next_token[0] += 1
    _last_masks[0] = (ids, masks, token)
    return token


def short_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, items: list[tuple[Mask, int]],
                  head_index: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention for a short call: (out ``[B, H, Lq, D]`` in q's dtype, lse ``[B, H, Lq]``).

    q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (query head h reads kv head
    ``h // (H // Hkv)``); ``items[i] = (mask, q_offset)``: query row r of a head
    with ``head_index[b, h] == i`` sits at position ``q_offset + r``; mask_mod leaves
    that read b or h must come pinned (``mask.at(b=, h=)``), as the dispatcher gives them. lse is
    float32 (float64 for float64 inputs), -inf where a row has no key. No autograd.

        >>> import torch, attnmask as am
        >>> q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 50, 8)
        >>> out, lse = short_forward(q, k, k, [(am.none, 49)], torch.zeros(1, 1, dtype=torch.int64), 0.3)
        >>> bool((out == 0).all()), lse.item()
        (True, -inf)
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    token, heads = _masks_key(items), head_index.numpy().tobytes()
    key = (token, tuple(off for _, off in items), Lq, Lk, B, H, Hkv, heads)
    plan = short_plans.get(key)
    if plan is None:
        site = (token, tuple(off - Lk for _, off in items), Lq, B, H, Hkv, heads)
        with single_thread():        # many small ops: the pool's wake-ups cost more than they save
            plan = _build(items, head_index, Lq, Lk, Hkv, site)
        short_plans.put(key, plan, plan.nbytes())
    rep = H // Hkv
    qf = q.reshape(B, Hkv, rep * Lq, D)
    if plan.whole:
        o, lse = _run(plan.calls[0], qf, k, v, scale)
        return o.reshape(B, H, Lq, D), lse.to(lse_dtype).reshape(B, H, Lq)
    out = q.new_zeros(B, Hkv, rep * Lq, D)
    lse_out = torch.full((B, Hkv, rep * Lq), float("-inf"), dtype=lse_dtype)
    for call in plan.calls:
        o, lse = _run(call, qf, k, v, scale)
        if call.rows is None:
            out[:, call.kv0:call.kv1] = o
            lse_out[:, call.kv0:call.kv1] = lse
        else:
            out[:, call.kv0:call.kv1].index_copy_(2, call.rows, o)
            lse_out[:, call.kv0:call.kv1].index_copy_(2, call.rows, lse.to(lse_dtype))
    return out.reshape(B, H, Lq, D), lse_out.reshape(B, H, Lq)


def _run(call: _Call, qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """One call of a plan: (out ``[B, kv heads, rows, D]``, lse ``[B, kv heads, rows]``)."""
    if call.kv0 != 0 or call.kv1 != k.shape[1]:
        qf, k, v = qf[:, call.kv0:call.kv1], k[:, call.kv0:call.kv1], v[:, call.kv0:call.kv1]
    if call.rows is not None:
        qf = qf.index_select(2, call.rows)
    if call.pieces is not None:
        ks = torch.cat([k[:, :, a:b] for a, b in call.pieces], 2)
        vs = torch.cat([v[:, :, a:b] for a, b in call.pieces], 2)
    elif call.index is not None:
        ks, vs = k.index_select(2, call.index), v.index_select(2, call.index)
    else:
        ks, vs = k[:, :, call.lo:call.hi], v[:, :, call.lo:call.hi]
    with threads_for(qf.shape[0] * qf.shape[1] * qf.shape[2] * ks.shape[2]):
        if call.mask is None:
            return _flash(qf, ks, vs, 0.0, False, scale=scale)
        o, lse = _flash(qf, ks, vs, 0.0, False, attn_mask=call.mask.additive(qf.dtype), scale=scale)
        if call.mask.empty is not None:
            lse = lse.masked_fill(call.mask.empty, float("-inf"))     # the kernel reports 0 (and zeros) there
        return o, lse

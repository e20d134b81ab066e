"""The block-sparse CPU engine: exact masked attention at the cost of the tiles a layout keeps.

A compiled :class:`~attnmask.BlockLayout` says, per query block, which runs of
key blocks are full, partial or (by omission) empty. This module turns a
layout into a cached *plan*: per query block, a few calls of PyTorch's fused
CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``), each
on one contiguous key range, with a small additive mask only when that range
holds partial tiles (built from ``layout.tile_masks``, never from full tiles).
Calls of one query block are merged through their log-sum-exp, so memory
stays O(N x D + one block's mask) whatever the length. Every call covers all
batch elements and heads that share the layout, so Python overhead is one
loop over query blocks. A layout that is exactly ``causal`` runs as one
``is_causal`` kernel call.

No JIT, no compile step; deterministic (fixed plan, fixed reduction order).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass

import torch

from ..errors import MaskValueError
from ..layout import BlockLayout

__all__ = ["blocksparse_forward", "plan_for", "Plan"]

_FULL, _PARTIAL = 2, 1
# A full run at least this many blocks long inside a partially masked segment
# is split off into its own maskless call: the mask would cost more than the merge.
_SPLIT_FULL_BLOCKS = 4
# Tiles evaluated per tile_masks call while planning (bounds the planner's memory).
_TILES_PER_EVAL = 64

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class Call:
    """One kernel call: query rows [r0, r1) against keys [k0, k1).

    ``mask`` is None (every pair attended) or an index into ``Plan.masks``;
    ``rows_empty`` indexes ``Plan.row_empty`` (rows with no key in this call) or is None.
    """
    k0: int
    k1: int
    mask: int | None
    rows_empty: int | None


@dataclass
class Plan:
    """Per query block, the calls that compute it exactly (see the module docstring)."""
    layout_ref: "weakref.ref[BlockLayout]"
    blocks: list[tuple[int, int, list[Call]]]   # (r0, r1, calls) for every query block
    masks: list[torch.Tensor]                   # bool [rows, keys] masks of partial calls (deduplicated)
    row_empty: list[torch.Tensor]               # bool [rows]: rows with no key in a call
    causal: bool                                # the whole layout is exactly causal (top-left)
    _typed: dict

    def additive(self, idx: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask ``idx`` as 0 / -inf in ``dtype`` (the kernel wants the query's dtype)."""
        key = (idx, dtype)
        hit = self._typed.get(key)
        if hit is None:
            m = self.masks[idx]
            hit = torch.zeros(m.shape, dtype=dtype).masked_fill_(~m, float("-inf"))
            self._typed[key] = hit
        return hit


_plans: "weakref.WeakKeyDictionary[BlockLayout, Plan]" = weakref.WeakKeyDictionary()


def plan_for(layout: BlockLayout) -> Plan:
    """The cached execution plan of ``layout`` (built once, O(runs + partial tiles)).

        >>> import attnmask as am
        >>> plan = plan_for((am.causal & am.sliding(256)).compile(1024, block_size=128))
        >>> [(c.k0, c.k1, c.mask is not None) for c in plan.blocks[3][2]]
        [(129, 512, True)]
    """
    plan = _plans.get(layout)
    if plan is None:
        plan = _build_plan(layout)
        _plans[layout] = plan
    return plan


def _segments(runs: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Split the runs of one query block into groups that become one kernel call each."""
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
        # Long full runs go alone (maskless); the rest stays together with its partial tiles.
        cur: list[tuple[int, int, int]] = []
        for run in g:
            if run[2] == _FULL and run[1] - run[0] >= _SPLIT_FULL_BLOCKS:
                if cur:
                    out.append(cur)
                    cur = []
                out.append([run])
            else:
                cur.append(run)
        if cur:
            out.append(cur)
    return out


def _build_plan(layout: BlockLayout) -> Plan:
    if _is_exact_causal(layout):
        return Plan(weakref.ref(layout), [], [], [], True, {})
    bq, bk = layout.block_size
    q_len, kv_len = layout.q_len, layout.kv_len
    run_ptr = layout.run_ptr.tolist()
    starts, ends, states = layout.run_start.tolist(), layout.run_end.tolist(), layout.run_state.tolist()

    # Pass 1: the calls of each query block, and the partial tiles they need.
    raw: list[tuple[int, int, list[tuple[int, int, list[tuple[int, int, int]]]]]] = []
    need_q: list[int] = []
    need_k: list[int] = []
    for qb in range(layout.n_q_blocks):
        r0, r1 = qb * bq, min((qb + 1) * bq, q_len)
        runs = [(starts[i], ends[i], states[i]) for i in range(run_ptr[qb], run_ptr[qb + 1])]
        calls = []
        for seg in _segments(runs):
            c0, c1 = seg[0][0], seg[-1][1]
            calls.append((c0, c1, seg))
            for s, e, t in seg:
                if t == _PARTIAL:
                    need_q.extend([qb] * (e - s))
                    need_k.extend(range(s, e))
        raw.append((r0, r1, calls))

    # Evaluate every partial tile once, in chunks (bounded memory).
    tile_mask: dict[tuple[int, int], torch.Tensor] = {}
    for i in range(0, len(need_q), _TILES_PER_EVAL):
        qs = torch.tensor(need_q[i:i + _TILES_PER_EVAL], dtype=torch.int64)
        ks = torch.tensor(need_k[i:i + _TILES_PER_EVAL], dtype=torch.int64)
        tm = layout.tile_masks(qs, ks)
        for j in range(len(qs)):
            tile_mask[(need_q[i + j], need_k[i + j])] = tm[j]

    # Pass 2: assemble per-call masks, trim all-false key columns at both ends,
    # and deduplicate identical masks (a sliding window has a handful, whatever N).
    masks: list[torch.Tensor] = []
    mask_ids: dict[bytes, int] = {}
    row_empty: list[torch.Tensor] = []
    row_ids: dict[bytes, int] = {}
    blocks = []
    for r0, r1, calls in raw:
        rows = r1 - r0
        out_calls: list[Call] = []
        for c0, c1, seg in calls:
            k0, k1 = c0 * bk, min(c1 * bk, kv_len)
            if all(t == _FULL for _, _, t in seg):
                out_calls.append(Call(k0, k1, None, None))
                continue
            m = torch.ones((rows, k1 - k0), dtype=torch.bool)
            for s, e, t in seg:
                if t == _PARTIAL:
                    for c in range(s, e):
                        a, b = c * bk - k0, min((c + 1) * bk, kv_len) - k0
                        m[:, a:b] = tile_mask[(r0 // bq, c)][:rows, :b - a]
            cols = m.any(0).nonzero()
            if len(cols) == 0:
                continue   # the layout said partial, but these rows see nothing here
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            m = m[:, lo:hi].contiguous()
            k0, k1 = k0 + lo, k0 + hi
            if bool(m.all()):
                out_calls.append(Call(k0, k1, None, None))
                continue
            key = hashlib.blake2b(m.numpy().tobytes(), digest_size=16).digest() + repr(m.shape).encode()
            idx = mask_ids.get(key)
            if idx is None:
                idx = mask_ids[key] = len(masks)
                masks.append(m)
            empty = ~m.any(1)
            ridx = None
            if bool(empty.any()):
                rkey = empty.numpy().tobytes()
                ridx = row_ids.get(rkey)
                if ridx is None:
                    ridx = row_ids[rkey] = len(row_empty)
                    row_empty.append(empty)
            out_calls.append(Call(k0, k1, idx, ridx))
        blocks.append((r0, r1, out_calls))

    return Plan(weakref.ref(layout), blocks, masks, row_empty, False, {})


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


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attentions over disjoint key sets through their LSE (float32, or float64 inputs in float64)."""
    acc = torch.float64 if parts[0][1].dtype == torch.float64 else torch.float32
    lses = torch.stack([l for _, l in parts]).to(acc)                   # [P, ..., rows]
    m = lses.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)                                             # exp(-inf) = 0 for empty parts
    s = w.sum(0)
    out = parts[0][0].to(acc) * w[0].unsqueeze(-1)
    for i in range(1, len(parts)):
        out.add_(parts[i][0].to(acc) * w[i].unsqueeze(-1))
    # Rows with no key anywhere: s == 0 -> out 0 / tiny = 0, lse = log 0 = -inf.
    out.div_(s.clamp_min(torch.finfo(acc).tiny).unsqueeze(-1))
    return out, m + torch.log(s)


def _forward_one_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                        scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """q [B, H, Lq, D], k/v [B, H, Lk, D] (possibly stride-0 expanded) -> fills out, lse in place."""
    plan = plan_for(layout)
    if plan.causal:
        o, l = _flash(q, k, v, 0.0, True, scale=scale)
        out.copy_(o)
        lse.copy_(l)
        return
    neg_inf = float("-inf")
    for r0, r1, calls in plan.blocks:
        if not calls:
            out[:, :, r0:r1].zero_()
            lse[:, :, r0:r1].fill_(neg_inf)
            continue
        qs = q[:, :, r0:r1]
        parts = []
        for c in calls:
            ks, vs = k[:, :, c.k0:c.k1], v[:, :, c.k0:c.k1]
            if c.mask is None:
                o, l = _flash(qs, ks, vs, 0.0, False, scale=scale)
            else:
                o, l = _flash(qs, ks, vs, 0.0, False, attn_mask=plan.additive(c.mask, q.dtype), scale=scale)
                if c.rows_empty is not None:
                    # The kernel returns lse 0 (and zeros) for rows it saw no key for; mark them -inf.
                    l.masked_fill_(plan.row_empty[c.rows_empty], neg_inf)
            parts.append((o, l))
        if len(parts) == 1:
            out[:, :, r0:r1] = parts[0][0]
            lse[:, :, r0:r1] = parts[0][1]
        else:
            o, l = _merge(parts)
            out[:, :, r0:r1] = o
            lse[:, :, r0:r1] = l


def blocksparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: list[BlockLayout],
                        head_layout: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact masked attention computed only on the non-empty tiles of ``layouts``.

    q ``[B, H, Lq, D]``; k, v ``[B, Hkv, Lk, D]`` with H a multiple of Hkv (query
    head h reads kv head ``h // (H // Hkv)``); ``head_layout`` int64 ``[B, H]``
    says which entry of ``layouts`` applies to batch element b, head h.
    Returns (out ``[B, H, Lq, D]`` in q's dtype, lse ``[B, H, Lq]`` float32): the
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
    Hkv, Lk = k.shape[1], k.shape[2]
    rep = H // Hkv
    for lay in layouts:
        lay._check_lengths(Lq, Lk)
    if D == 0 or Lq == 0 or B == 0 or H == 0:
        return q.new_zeros(q.shape), torch.full((B, H, Lq), float("-inf"))
    if Lk == 0:
        return q.new_zeros(q.shape), torch.full((B, H, Lq), float("-inf"))
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty((B, H, Lq), dtype=torch.float32)
    head_layout = torch.as_tensor(head_layout, dtype=torch.int64)
    if head_layout.shape != (B, H):
        raise MaskValueError(f"head_layout must be [B, H] = [{B}, {H}], got {list(head_layout.shape)}")
    used = torch.unique(head_layout).tolist()
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
    # Heads (or batch elements) with different layouts: gather each group's rows.
    for li in used:
        bs, hs = (head_layout == li).nonzero(as_tuple=True)
        qg = q[bs, hs].unsqueeze(0)                       # [1, G, Lq, D]
        kg = k[bs, hs // rep].unsqueeze(0)
        vg = v[bs, hs // rep].unsqueeze(0)
        og = torch.empty(qg.shape, dtype=q.dtype)
        lg = torch.empty(qg.shape[:-1], dtype=torch.float32)
        _forward_one_layout(qg, kg, vg, layouts[li], scale, og, lg)
        out[bs, hs] = og[0]
        lse[bs, hs] = lg[0]
    return out, lse

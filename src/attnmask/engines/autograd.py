"""Exact gradients for the block-sparse engine (the FlashAttention backward, tile range by tile range).

The forward pass (:func:`~attnmask.engines.blocksparse.blocksparse_forward`)
saves only ``q, k, v``, the output and the log-sum-exp of every query row, so
memory stays linear in the sequence length. The backward pass walks the
layout's runs: per query block, each maximal stretch of non-empty key tiles is
one contiguous key range (empty tiles are never visited), with a mask only if
the range holds partial tiles (``layout.tile_masks``; full tiles never evaluate
the mask). For each range it recomputes the scores and applies the
FlashAttention recipe::

    P  = exp(S * scale - lse)          (S = Q K^T on the range, lse of the whole row)
    dV += P^T dO                       dP = dO V^T
    dS = P * (dP - delta)              delta = rowsum(dO * O)   (- dlse when lse is used)
    dQ += dS K * scale                 dK += dS^T Q * scale

Because lse and delta are those of the whole row, each key range contributes
its exact share independently; contributions are summed in a fixed order into
float32 buffers (float64 for float64 inputs), so gradients are bit-identical
run to run. The work of each range is PyTorch's fused CPU flash backward kernel
(``aten._scaled_dot_product_flash_attention_for_cpu_backward``, all batch
elements and heads in one call), fed float32 copies of bf16/fp16 inputs so that
every sum is accumulated in float32; or, where it runs, the fused kernel's
backward over the forward plan's items (:mod:`.fused`), which reads bf16 inputs
as they are and accumulates in float32 too. A gradient that also flows into the
returned lse needs delta = ``rowsum(dO * O) - dlse``: the fused kernel is given
dlse and forms exactly that itself (one pass, whatever dO is); ATen's kernel has no
input for dlse and forms delta from O, so on that path each row's output is
shifted in one component until its delta is that (``_fold_lse_gradient``; rows
whose dO is 0 get a second pass of their own).

GQA: gradients of a key/value head are summed over the query heads that share
it. Rows with no allowed key have lse = -inf in the forward; the backward uses
0 there, and since all their scores are masked, their P and gradients are 0.
Double backward is not implemented and says so (:class:`MaskValueError`).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import MaskValueError
from ..layout import BlockLayout
from ..threads import threads_for
from .blocksparse import Plan, _causal_segments, _dilation, blocksparse_forward, head_runs, kernel_items, plan_for
from . import costs
from . import fused as _fused
from .costs import BACKWARD, KEY_MAJOR_ROWS, KEYS_PER_CALL

__all__ = ["blocksparse_attention_with_grad", "blocksparse_backward"]

_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _check_inputs(q, k, v, layouts, head_layout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise MaskValueError(f"q, k, v must be [B, H, L, D]; got shapes {list(q.shape)}, {list(k.shape)}, "
                             f"{list(v.shape)}")
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise MaskValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv}) for GQA, got q "
                             f"{list(q.shape)} and k {list(k.shape)}")
    if tuple(head_layout.shape) != (B, H):
        raise MaskValueError(f"head_layout must be [B, H] = [{B}, {H}], got {list(head_layout.shape)}")
    if not layouts:
        raise MaskValueError("layouts is empty; pass at least one compiled BlockLayout")
    if head_layout.numel() and (int(head_layout.min()) < 0 or int(head_layout.max()) >= len(layouts)):
        raise MaskValueError(f"head_layout indexes {len(layouts)} layouts, got values in "
                             f"[{int(head_layout.min())}, {int(head_layout.max())}]")
    for lay in layouts:
        lay._check_lengths(Lq, Lk)


def _plan(layout: BlockLayout) -> Plan:
    """The backward's plan: the one planner's, cut for the backward kernel (see engines/costs.py)."""
    return plan_for(layout, BACKWARD)


def _one_layout(q, k, v, out, dout, lse0, layout: BlockLayout, scale: float, dq, dk, dv, *,
                dlse=None, fused: bool = False, calls: list | None = None) -> None:
    """Accumulate the gradients of one layout's heads into dq, dk, dv (all in the compute dtype).

    q/out/dout [b, h, Lq, D], lse0 [b, h, Lq], k/v [b, hk, Lk, D] with h a multiple of hk. ``out``
    is only read for delta = rowsum(dout * out) - dlse: the fused kernel (``fused``) forms it
    itself, given ``dlse`` [b, h, Lq] (None: no lse gradient); the ATen path has no dlse and
    takes an ``out`` shifted to carry it (see :func:`_fold_lse_gradient`).
    ``dilated(w, d)`` pairs only positions of one residue class mod d, where it is a sliding
    window of w: it runs as d window problems on strided views (as the forward does), so it
    costs the w keys a row keeps, not the w * d positions they span.
    ``calls``: a list to append the fused kernel's calls to, as (batch element or None, call)
    (:func:`_fused_backward_calls`), run by the caller (:func:`_backward_layouts`); None runs them
    here, side by side (they write disjoint gradients: the residues of a dilated window, or batch
    elements).
    """
    if fused and calls is None:
        calls = []
        _one_layout(q, k, v, out, dout, lse0, layout, scale, dq, dk, dv, dlse=dlse, fused=True, calls=calls)
        _fused.run([[call] for _, call in calls])
        return
    dil = _dilation(layout.mask)
    if dil is not None and dil[1] > 1:
        from ..primitives import causal, sliding
        w, d = dil
        Lq, Lk, q_offset = layout.q_len, layout.kv_len, layout.q_offset
        # Only the residues of the first min(d, Lq) rows have rows: loop over those (d can be huge).
        for i0 in range(min(d, Lq)):
            r = (q_offset + i0) % d                  # the residue class of row i0
            if r >= Lk:
                continue                             # no rows, or rows with no key: zero gradient
            sub = (causal & sliding(w)).compile(len(range(i0, Lq, d)), len(range(r, Lk, d)),
                                               q_offset=(q_offset + i0 - r) // d, block_size=layout.block_size)
            qr, kr = (slice(None), slice(None), slice(i0, None, d)), (slice(None), slice(None), slice(r, None, d))
            _one_layout(q[qr], k[kr], v[kr], out[qr], dout[qr], lse0[qr], sub, scale, dq[qr], dk[kr], dv[kr],
                        dlse=None if dlse is None else dlse[qr], fused=fused, calls=calls)
        return
    if fused:
        _fused_backward_calls(q, k, v, out, dout, lse0, dlse, layout, scale, dq, dk, dv, calls)
        return
    segments = _causal_segments(layout)
    if segments is not None:
        # Exact causal blocks along the diagonal: one is_causal kernel call each, which
        # visits only the lower triangle, as the forward does for causal regions.
        for a, b in segments:
            sl = (slice(None), slice(None), slice(a, b))
            ga, gb, gc = _flash_bwd(dout[sl], q[sl], k[sl], v[sl], out[sl], lse0[sl], 0.0, True, scale=scale)
            dq[sl].add_(ga), dk[sl].add_(gb), dv[sl].add_(gc)
        return
    _run_ops(_plan(layout), q, k, v, out, dout, lse0, scale, dq, dk, dv)


def _fused_backward_calls(q, k, v, out, dout, lse0, dlse, layout: BlockLayout, scale: float, dq, dk, dv,
                          calls: list, batch: int | None = None) -> None:
    """Append the fused kernel's backward calls (engines/fused.py) over the forward's items
    (:func:`kernel_items`) to ``calls`` as (``batch``, call): the batch element a call is limited
    to (index into q's batch), or None for all of them; dlse [b, h, Lq] or None.

    The forward's items cover every attended (row, key) pair exactly once, so their
    contributions sum to the exact gradient; query heads that share a key head are viewed as
    [b * hk, rep] with the keys broadcast (stride 0), and run on one thread in a fixed order.
    """
    b, h, Lq, D = q.shape
    hk, Lk = k.shape[1], k.shape[2]
    rep = h // hk
    items, _ = kernel_items(layout)

    def heads(t):                      # [b, h, L, .] -> [b * hk, rep, L, .] (a view: strides allow it)
        s = t.stride()
        return t.as_strided((b * hk, rep) + tuple(t.shape[2:]), (rep * s[1], s[1]) + s[2:], t.storage_offset()) \
            if b == 1 or s[0] == h * s[1] else None

    def keys(t):                       # [b, hk, L, D] -> [b * hk, rep (stride 0), L, D]
        s = t.stride()
        return t.as_strided((b * hk, rep) + tuple(t.shape[2:]), (s[1], 0) + s[2:], t.storage_offset()) \
            if b == 1 or s[0] == hk * s[1] else None

    views = [heads(t) for t in (q, out, dout, lse0, dq)] + [keys(t) for t in (k, v, dk, dv)]
    dlv = None if dlse is None else heads(dlse)
    if any(x is None for x in views) or (dlse is not None and dlv is None):
        for i in range(b):             # batch elements whose strides do not merge: one at a time
            _fused_backward_calls(q[i:i + 1], k[i:i + 1], v[i:i + 1], out[i:i + 1], dout[i:i + 1],
                                  lse0[i:i + 1], None if dlse is None else dlse[i:i + 1], layout, scale,
                                  dq[i:i + 1], dk[i:i + 1], dv[i:i + 1], calls, i)
        return
    qv, ov, dov, lv, dqv, kv, vv, dkv, dvv = views
    calls.append((batch, _fused.backward_call(items, qv, kv, vv, ov, dov, lv, dlv, dqv, dkv, dvv, scale)))


def _view(t: torch.Tensor, start: int, step: int, G: int, n: int) -> torch.Tensor | None:
    """[G, B * X, n, ...] strided view of rows ``start + g * step + [0, n)`` of a [B, X, L, ...] tensor.

    None when B and X cannot be merged in one stride (then items run one by one).
    """
    B, X = t.shape[0], t.shape[1]
    st = t.stride()
    if B > 1 and st[0] != X * st[1]:
        return None
    return t.as_strided((G, B * X, n) + tuple(t.shape[3:]), (step * st[2], st[1], st[2]) + st[3:],
                        t.storage_offset() + start * st[2])


def _run_ops(plan: Plan, q, k, v, out, dout, lse0, scale: float, dq, dk, dv) -> None:
    """The fused-kernel backward over a plan's ops: one kernel call per op (or per chunk of it).

    The kernel sees the G items of an op as G batch entries and the (batch, head) pairs as
    heads (kv head = query head // (H / Hkv) holds for the merged index too, so GQA is native).
    dQ lands in non-overlapping row views; dK/dV of overlapping key ranges are added item by
    item in a fixed order. Gathered keys (``op.extra``) sit in front of each item's own; their
    gradients are summed over the items and added back where those keys live.
    """
    if plan.causal:
        # The layout is exactly causal: one is_causal call.
        ga, gb, gc = _flash_bwd(dout, q, k, v, out, lse0, 0.0, True, scale=scale)
        dq.add_(ga), dk.add_(gb), dv.add_(gc)
        return
    for op in plan.ops:
        if _key_major(plan, op, q, k, v, out, dout, lse0, scale, dq, dk, dv):
            continue
        mask = None if op.mask is None else plan.additive(op.mask, q.dtype)
        e = sum(b_ - a_ for a_, b_ in op.extra)
        step = max(1, KEYS_PER_CALL // max(op.span + e, 1))
        for g0 in range(0, op.G, step):
            G = min(step, op.G - g0)
            r0, k0 = op.r0 + g0 * op.dr, op.k0 + g0 * op.dk
            views = [_view(t, r0, op.dr, G, op.rows) for t in (dout, q, out, dq)]
            kvs = [_view(t, k0, op.dk, G, op.span) for t in (k, v)]
            lv = _view(lse0.unsqueeze(-1), r0, op.dr, G, op.rows)
            extra = [[_view(t, a_, 0, G, b_ - a_) for a_, b_ in op.extra] for t in (k, v)]
            if any(x is None for x in views + kvs + extra[0] + extra[1]) or lv is None:
                for g in range(G):                  # strides do not allow batching: item by item
                    a_, b_ = r0 + g * op.dr, k0 + g * op.dk
                    rows = (slice(None), slice(None), slice(a_, a_ + op.rows))
                    keys = (slice(None), slice(None), slice(b_, b_ + op.span))
                    kk = torch.cat([k[:, :, x:y] for x, y in op.extra] + [k[keys]], 2)
                    vv = torch.cat([v[:, :, x:y] for x, y in op.extra] + [v[keys]], 2)
                    ga, gb, gc = _flash_bwd(dout[rows], q[rows], kk, vv, out[rows], lse0[rows], 0.0,
                                            op.causal, attn_mask=mask, scale=scale)
                    dq[rows].add_(ga)
                    dk[keys].add_(gb[:, :, e:])
                    dv[keys].add_(gc[:, :, e:])
                    _add_extra(op.extra, dk, dv, gb[:, :, :e], gc[:, :, :e])
                continue
            do_v, q_v, o_v, dq_v = views
            k_v, v_v = kvs
            if op.extra:
                k_v = torch.cat(extra[0] + [k_v], 2)
                v_v = torch.cat(extra[1] + [v_v], 2)
            ga, gb, gc = _flash_bwd(do_v, q_v, k_v, v_v, o_v, lv.squeeze(-1), 0.0, op.causal, attn_mask=mask,
                                    scale=scale)
            dq_v.add_(ga)
            if op.extra:
                # [G, B * X, e, D] summed over the items (their gathered keys are the same ones).
                B, X = dk.shape[0], dk.shape[1]
                _add_extra(op.extra, dk, dv, gb[:, :, :e].sum(0).view(B, X, e, -1),
                           gc[:, :, :e].sum(0).view(B, X, e, -1))
                gb, gc = gb[:, :, e:], gc[:, :, e:]
            if op.dk >= op.span or G == 1:
                _view(dk, k0, op.dk, G, op.span).add_(gb)
                _view(dv, k0, op.dk, G, op.span).add_(gc)
            elif op.dk == 0 or G <= -(-op.span // op.dk):
                for g in range(G):                   # overlapping ranges: one item at a time
                    _view(dk, k0 + g * op.dk, 0, 1, op.span)[0].add_(gb[g])
                    _view(dv, k0 + g * op.dk, 0, 1, op.span)[0].add_(gc[g])
            else:
                # Overlapping ranges, many items: cut every range into pieces of dk keys; the
                # i-th pieces of all items do not overlap, so each i is one strided add (the
                # order of the sums is fixed either way).
                for c0 in range(0, op.span, op.dk):
                    w = min(op.dk, op.span - c0)
                    _view(dk, k0 + c0, op.dk, G, w).add_(gb[:, :, c0:c0 + w])
                    _view(dv, k0 + c0, op.dk, G, w).add_(gc[:, :, c0:c0 + w])


def _key_major_mask(plan: Plan, op, m: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive [m * rows, rows] mask of a key block under m items of ``op``, the first item on top.

    Row a of the item t blocks left of the key block (t = m - 1 for the first) sees column b where
    the op's mask allows column t * rows + b (past the op's span: never).
    """
    d = op.rows
    allowed = (torch.ones(d, op.span, dtype=torch.bool) if op.mask is None else plan.masks[op.mask])
    padded = torch.zeros(d, m * d, dtype=torch.bool)
    padded[:, :op.span] = allowed
    blocks = padded.view(d, m, d).permute(1, 0, 2).flip(0).reshape(m * d, d)     # [t, a, b], t = m-1 first
    return torch.zeros(m * d, d, dtype=dtype).masked_fill_(~blocks, float("-inf"))


def _key_major(plan: Plan, op, q, k, v, out, dout, lse0, scale: float, dq, dk, dv) -> bool:
    """Run ``op`` key block by key block when it is a diagonal band of equal items; False if it is not.

    An op whose G items of ``rows`` rows step down by ``rows`` rows and keys (a sliding window's
    steady state) covers key block j = keys ``k0 + j * rows + [0, rows)`` with the items g = j - m + 1
    .. j (m = ceil(span / rows)). One kernel call per key block, over those items' rows, computes the
    same scores (the kernel's backward is exact on any cut of the scores, lse and delta being the
    rows'); its dK/dV are the block's alone, and the overlapping dQ of the rows are added in m
    strided pieces of ``rows`` rows (fixed order: deterministic). Interior blocks (all m items)
    share one mask and batch; the m - 1 blocks at either end have fewer items: one call each.
    """
    d = op.rows
    if op.extra or op.causal or op.G < 2 or op.dr != d or op.dk != d:
        return False
    m = -(-op.span // d)
    # The 2(m - 1) end blocks run one call each: key-major pays when interior blocks dominate.
    if m < 2 or m * d < KEY_MAJOR_ROWS or op.G < 2 * m:
        return False
    lse3 = lse0.unsqueeze(-1)
    inner_views = [_view(t, op.r0, d, 1, d) for t in (dout, q, out, dq, lse3)] + \
        [_view(t, op.k0, d, 1, d) for t in (k, v, dk, dv)]
    if any(x is None for x in inner_views):
        return False                                    # strides do not merge: the item path runs
    mask = _key_major_mask(plan, op, m, q.dtype)
    n_blocks = op.G + m - 1
    last_keys = op.span - (m - 1) * d                   # the last key block is cut at the band's end
    step = max(1, KEYS_PER_CALL // (m * d))

    def call(j0: int, G: int, g_lo: int, items: int, keys: int) -> None:
        # Key blocks j0 .. j0 + G - 1, each under ``items`` items starting at item j - (j0 - g_lo).
        r0, kb = op.r0 + g_lo * d, op.k0 + j0 * d
        n = items * d
        t_hi = j0 - g_lo                                # the first item sits t_hi blocks left
        rows_mask = mask[(m - 1 - t_hi) * d:(m - 1 - t_hi) * d + n, :keys]
        if keys < d:
            rows_mask = rows_mask.contiguous()
        ga, gb, gc = _flash_bwd(_view(dout, r0, d, G, n), _view(q, r0, d, G, n), _view(k, kb, d, G, keys),
                                _view(v, kb, d, G, keys), _view(out, r0, d, G, n),
                                _view(lse3, r0, d, G, n).squeeze(-1), 0.0, False, attn_mask=rows_mask,
                                scale=scale)
        _view(dk, kb, d, G, keys).add_(gb)
        _view(dv, kb, d, G, keys).add_(gc)
        for c in range(items):                          # item c's rows of every call: no overlap
            _view(dq, r0 + c * d, d, G, d).add_(ga[:, :, c * d:(c + 1) * d])

    j = 0
    while j < n_blocks:
        g_lo, g_hi = max(0, j - m + 1), min(op.G - 1, j)
        keys = last_keys if j == n_blocks - 1 else d
        if g_hi - g_lo + 1 == m and keys == d:
            # interior blocks: all m items, full width; batched while that holds
            G = min(step, op.G - j)
            call(j, G, g_lo, m, d)
            j += G
        else:
            call(j, 1, g_lo, g_hi - g_lo + 1, keys)
            j += 1
    return True


def _add_extra(extra, dk, dv, gk, gv) -> None:
    """Add the gradients of gathered keys ([B, X, e, D], in ``extra``'s order) where those keys live."""
    c = 0
    for a_, b_ in extra:
        dk[:, :, a_:b_].add_(gk[:, :, c:c + b_ - a_])
        dv[:, :, a_:b_].add_(gv[:, :, c:c + b_ - a_])
        c += b_ - a_


def blocksparse_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, dout: torch.Tensor, layouts: list[BlockLayout],
                         head_layout: torch.Tensor, scale: float,
                         dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of block-sparse attention, exact, in the input dtype.

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D], out/dout [B, H, Lq, D], lse (and the
    optional gradient of lse, dlse) [B, H, Lq]; query head h uses key head
    h // (H // Hkv); head_layout int64 [B, H] indexes ``layouts``. Extra memory:
    float32 copies of the inputs when they are fp16 (bf16 too where the fused kernel does not
    run its bf16 backward), float32 gradient
    buffers, and one key range's scores at a time: O((Lq + Lk) * D), no N^2.

        >>> import torch, attnmask as am
        >>> from attnmask.engines.blocksparse import blocksparse_forward
        >>> q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
        >>> lay, hl = am.causal.compile(64, block_size=16), torch.zeros(1, 2, dtype=torch.int64)
        >>> out, lse = blocksparse_forward(q, k, v, [lay], hl, 0.25)
        >>> dq, dk, dv = blocksparse_backward(q, k, v, out, lse, torch.ones_like(out), [lay], hl, 0.25)
        >>> dq.shape, dk.shape
        (torch.Size([1, 2, 64, 16]), torch.Size([1, 2, 64, 16]))
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    # float64 stays float64 (gradcheck); everything else accumulates in float32. The fused kernel's
    # backward reads bf16 inputs as they are; elsewhere they are upcast to float32 copies. The output
    # only forms delta and stays in the accumulation dtype (the forward saved it in float32).
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    kd = q.dtype if q.dtype == torch.bfloat16 and _fused.usable_backward(q.dtype, D) else cd
    # Contiguous copies only where needed (a model's permuted q/k/v), so strided views can batch items.
    q_, k_, v_, do_ = (x.to(kd).contiguous() for x in (q, k, v, dout))
    o_ = out.to(cd).contiguous()
    empty = torch.isneginf(lse)
    lse0 = lse.to(cd).masked_fill(empty, 0.0)
    dq = torch.zeros(B, H, Lq, D, dtype=cd)
    dk = torch.zeros(B, Hkv, Lk, D, dtype=cd)
    dv = torch.zeros(B, Hkv, Lk, v.shape[-1], dtype=cd)
    if q.numel() and k.numel():
        used = torch.unique(head_layout).tolist()
        work = sum(layouts[li].attended_pairs() * int((head_layout == li).sum()) for li in used)

        def run(out_, dout_, v_run, dv_run, **fused_kw) -> None:
            _backward_layouts(q_, k_, v_run, out_, dout_, lse0, layouts, head_layout, used, scale,
                              dq, dk, dv_run, **fused_kw)

        # Rows with no key have a constant lse: no gradient flows through it.
        dlse_ = None if dlse is None else dlse.to(cd).nan_to_num(0.0, 0.0, 0.0).masked_fill(empty, 0.0)
        # The fused kernel picks its own thread count per call (fused.run); the clamp is for the
        # ATen path's many small ops.
        kernel = _fused.usable_backward(kd, D)
        with contextlib.nullcontext() if kernel else threads_for(work):
            if kernel:
                # The fused kernel forms delta = rowsum(dO * O) - dlse itself: one pass for any dout.
                run(o_, do_, v_, dv, dlse=dlse_, fused=True)
            elif dlse_ is None:
                run(o_, do_, v_, dv)
            else:
                o_shifted, alone = _fold_lse_gradient(o_, do_, dlse_)
                if bool(do_.any()):
                    run(o_shifted, do_, v_, dv)
                if alone is not None:
                    # dlse alone on rows whose dout cannot carry it: dS = P * dlse is the kernel's
                    # dS = P * (dO V^T - rowsum(dO * O)) with V = 0, dO = e_0 and O = -dlse e_0
                    # (exact; rows outside ``alone`` get dO = 0, so delta = 0: no contribution). dV is unused.
                    do_alone = torch.zeros_like(do_)
                    o_alone = torch.zeros_like(o_)
                    do_alone[..., 0] = alone.to(cd)
                    o_alone[..., 0] = dlse_.neg()
                    run(o_alone, do_alone, torch.zeros_like(v_), torch.zeros_like(dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _fold_lse_gradient(out: torch.Tensor, dout: torch.Tensor,
                       dlse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out', alone): ``rowsum(dout * out') = rowsum(dout * out) - dlse`` on every row it can, and the rest.

    A gradient into lse adds ``dlse * P`` to dS: the backward is FlashAttention's with delta
    = rowsum(dO * O) - dlse. The ATen path needs this (the fused kernel is given dlse): ATen's
    kernel has no input for dlse and reads O only to form delta, so shifting one
    component of each row of O (the one where dO is largest, j) by ``-dlse / dO_j`` runs it
    exactly, with no extra pass. The rounding stays that of the delta itself: fl(O_j - dlse / dO_j)
    * dO_j is off by eps * (|O_j dO_j| + |dlse|). ``alone`` (bool [B, H, Lq], None when empty) marks
    the rows where that shift does not exist (dO = 0, or a quotient past the dtype's range) and
    dlse is not 0; the caller adds their share with a second kernel pass.

    out/dout [B, H, Lq, D], dlse [B, H, Lq] in the compute dtype (0 on rows with no key).
    """
    j = dout.abs().argmax(-1, keepdim=True)                          # [B, H, Lq, 1]
    d_j = dout.gather(-1, j)
    shifted = out.gather(-1, j) - dlse.unsqueeze(-1) / d_j
    ok = (d_j != 0) & torch.isfinite(shifted) & torch.isfinite(shifted * d_j)
    out_ = out.clone()
    out_.scatter_(-1, j, torch.where(ok, shifted, out.gather(-1, j)))
    alone = ~ok.squeeze(-1) & (dlse != 0)
    return out_, (alone if bool(alone.any()) else None)


def _backward_layouts(q_, k_, v_, o_, do_, lse0, layouts, head_layout, used, scale, dq, dk, dv, *,
                      dlse=None, fused: bool = False) -> None:
    """Run every layout's heads; dq, dk, dv (compute dtype) are accumulated in place (``dlse``,
    ``fused``: see :func:`_one_layout`)."""
    if len(used) == 1:
        _one_layout(q_, k_, v_, o_, do_, lse0, layouts[used[0]], scale, dq, dk, dv, dlse=dlse, fused=fused)
        return
    # Heads with different layouts: each run of neighbouring heads with one layout inside a kv
    # group runs on views (no gather, no K/V repetition); dK/dV of a kv head are accumulated run
    # after run in a fixed order, so the sums are deterministic.
    runs = head_runs(head_layout, k_.shape[1])

    def one(bs, h0, h1, j, li, calls=None) -> None:
        _one_layout(q_[bs, h0:h1], k_[bs, j:j + 1], v_[bs, j:j + 1], o_[bs, h0:h1], do_[bs, h0:h1],
                    lse0[bs, h0:h1], layouts[li], scale, dq[bs, h0:h1], dk[bs, j:j + 1], dv[bs, j:j + 1],
                    dlse=None if dlse is None else dlse[bs, h0:h1], fused=fused, calls=calls)

    if fused:
        # The fused kernel's calls as one run: the runs of one key head are one chain (one thread,
        # in order: they add into its dK / dV); chains of different key heads run side by side.
        # Where every call of a key head is limited to one batch element (per-head runs of a batch
        # take one call per element), each element's calls are a chain of their own (disjoint dK /
        # dV rows), so one key head (MQA) still runs on every thread.
        tagged: dict[tuple, list] = {}
        for run in runs:
            one(*run, calls=tagged.setdefault((run[0].start, run[0].stop, run[3]), []))
        chains = []
        for calls in tagged.values():
            if all(b is not None for b, _ in calls):
                by_batch: dict[int, list] = {}
                for b, call in calls:
                    by_batch.setdefault(b, []).append(call)
                chains += by_batch.values()
            else:
                chains.append([call for _, call in calls])
        _fused.run(chains)
        return
    for run in runs:
        one(*run)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layouts, head_layout, scale):
        # Reduced-precision inputs: the forward accumulates in float32, and the backward gets that
        # float32 output, not its bf16 rounding: delta = rowsum(dO * O) from a rounded O puts the
        # output's rounding error into dQ and dK (measured: 3x the gradients' own bf16 rounding).
        # It costs holding O in float32 (the backward makes a float32 copy of O anyway).
        reduced = q.dtype in (torch.bfloat16, torch.float16)
        out, lse = blocksparse_forward(q, k, v, layouts, head_layout, scale,
                                       out_dtype=torch.float32 if reduced else None)
        ctx.save_for_backward(q, k, v, out, lse, head_layout)
        if reduced:
            out = out.to(q.dtype)
        ctx.layouts, ctx.scale = layouts, scale
        ctx.set_materialize_grads(False)   # an unused lse sends None: take the fused kernel path
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():
            raise MaskValueError(
                "double backward through block-sparse attention is not supported (create_graph=True "
                "asks for gradients of gradients); use am.attention(..., backend='dense') for "
                "higher-order gradients, or call backward without create_graph")
        q, k, v, out, lse, head_layout = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = blocksparse_backward(q, k, v, out, lse, dout, ctx.layouts, head_layout, ctx.scale, dlse)
        return dq, dk, dv, None, None, None


def blocksparse_attention_with_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    layouts: list[BlockLayout], head_layout: torch.Tensor,
                                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention that supports ``.backward()``: returns (out, lse).

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (query head h uses key head h // (H // Hkv));
    ``head_layout`` int64 [B, H] picks each head's layout in ``layouts``; out
    [B, H, Lq, D] in q's dtype, lse float32 [B, H, Lq] (float64 for float64 inputs; -inf and a zero output row
    where a row has no allowed key). Gradients flow to q, k, v, also through lse
    if it is used; only q, k, v, out and lse are kept for the backward.
    First-order gradients only. ``am.attention`` calls this when gradients are needed.

        >>> import torch, attnmask as am
        >>> from attnmask.engines.autograd import blocksparse_attention_with_grad
        >>> q, k, v = (torch.randn(1, 2, 100, 16, requires_grad=True) for _ in range(3))
        >>> lay = (am.causal & am.sliding(32)).compile(100, block_size=32)
        >>> hl = torch.zeros(1, 2, dtype=torch.int64)
        >>> out, lse = blocksparse_attention_with_grad(q, k, v, [lay], hl, 0.25)
        >>> out.sum().backward()
        >>> q.grad.shape
        torch.Size([1, 2, 100, 16])
    """
    head_layout = torch.as_tensor(head_layout, dtype=torch.int64)
    _check_inputs(q, k, v, layouts, head_layout)
    return _BlockSparseAttention.apply(q, k, v, list(layouts), head_layout, float(scale))

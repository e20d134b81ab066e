"""The engine at the shapes real models use: decode steps, per-head lists with GQA, sinks and key columns.

Every result is held to a float64 attention computed here in plain PyTorch from
the mask's dense oracle (``Mask.to_dense``, tested against a naive evaluator in
test_masks.py); bf16 results to twice the error of a same-dtype SDPA call on
the same inputs (the measuring stick). Errors are scaled by the size of v (an
input), never by a reference that can be zero.
"""

from __future__ import annotations

import threading

import pytest
import torch

import attnmask as am
from attnmask.engines.blocksparse import plan_for
from attnmask.engines.cache import ByteLRU
from attnmask.engines.short import short_plans

NINE = ["causal & (sliding(16) | sink(4))", "causal & (sliding(32) | sink(4))", "causal & sliding(64)",
        "causal & (sliding(128) | sink(1))", "causal", "causal & sliding(8) - rows(0, 40)",
        "causal & (sliding(24) | cols(3, 200, 37))", "none", "causal & chunked(48)"]


def inputs(B, H, Hkv, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k, v


def allowed_of(masks, B, H, Lq, Lk, q_offset=None):
    """bool [B, H, Lq, Lk] from one mask, a per-head list, or a list of per-head lists (per batch)."""
    rows = masks if isinstance(masks[0], list) else [masks] * B
    return torch.stack([torch.stack([m.to_dense(Lq, Lk, q_offset=q_offset) for m in row]) for row in rows])


def reference(q, k, v, allowed, scale=None):
    """float64 attention; rows with no key give zeros and lse -inf."""
    H, Hkv = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(H // Hkv, 1)
    vv = v.double().repeat_interleave(H // Hkv, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    return p @ vv, lse


def stick(q, k, v, allowed):
    """Error of a same-dtype SDPA call (bool mask) against float64: what the dtype itself costs."""
    H, Hkv = q.shape[1], k.shape[1]
    rep = H // Hkv
    safe = allowed | ~allowed.any(-1, keepdim=True)          # SDPA gives NaN on rows with no key
    o = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                         attn_mask=safe)
    o = o.masked_fill(~allowed.any(-1, keepdim=True), 0)
    return float((o.double() - reference(q, k, v, allowed)[0]).abs().max())


def scaled(got, ref, v):
    return float((got.detach().double() - ref).abs().max()) / max(float(v.detach().double().abs().max()), 1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk", [(1, 3000), (3, 515), (16, 700)])
def test_decode_steps_with_per_head_lists_match_float64(dtype, lq, lk):
    B, H, Hkv, D = 2, 9, 3, 32
    masks = [am.parse(t) for t in NINE]
    q, k, v = inputs(B, H, Hkv, lq, lk, D, dtype, seed=lq)
    allowed = allowed_of(masks, B, H, lq, lk)
    out, lse = am.attention(q, k, v, masks, enable_gqa=True, return_lse=True)
    ref, ref_lse = reference(q, k, v, allowed)
    assert out.dtype == dtype and lse.dtype == torch.float32
    err = scaled(out, ref, v)
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:
        assert err <= 2 * stick(q, k, v, allowed) / float(v.double().abs().max()) + 1e-6, err
    empty = ~allowed.any(-1)                               # head 7 is `none`; rows(0, 40) empties rows too
    assert empty[:, 7].all()
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
    finite = ~empty
    assert float((lse[finite].double() - ref_lse[finite]).abs().max()) < (1e-5 if dtype == torch.float32 else 0.05)


def test_decode_per_batch_masks_and_offsets_match_float64():
    # Padding as am.per_batch: batch element 0 sees all keys, element 1 not the first 40 (left padding).
    B, H, Hkv, D, Lk = 2, 4, 2, 16, 600
    pad = am.causal - am.cols(0, 40)
    pb = am.per_batch([am.causal & (am.sliding(50) | am.sink(2)), [pad, pad, am.causal & am.sliding(9), pad]])
    q, k, v = inputs(B, H, Hkv, 2, Lk, D, seed=4)
    out = am.attention(q, k, v, pb, enable_gqa=True, q_offset=300)
    rows = [[am.causal & (am.sliding(50) | am.sink(2))] * H, [pad, pad, am.causal & am.sliding(9), pad]]
    ref, _ = reference(q, k, v, allowed_of(rows, B, H, 2, Lk, q_offset=300))
    assert scaled(out, ref, v) < 1e-5


def test_decode_is_deterministic_and_its_plan_cached_per_shape():
    q, k, v = inputs(1, 9, 3, 1, 2048, 64, torch.bfloat16, seed=9)
    masks = [am.parse(t) for t in NINE]
    short_plans.clear()
    a = am.attention(q, k, v, masks, enable_gqa=True)
    n = len(short_plans)
    b = am.attention(q, k, v, masks, enable_gqa=True)
    assert torch.equal(a, b) and len(short_plans) == n == 1
    am.attention(q, k[:, :, :2047], v[:, :, :2047], masks, enable_gqa=True)     # a new shape: one more plan
    assert len(short_plans) == 2
    # Equal masks as new objects find the same plan; lists taking turns each get their own result.
    again = [am.parse(t) for t in NINE]
    assert torch.equal(am.attention(q, k, v, again, enable_gqa=True), a) and len(short_plans) == 2
    other = [am.parse(t) for t in reversed(NINE)]
    q32, k32, v32 = (t.float() for t in (q, k, v))
    for ms in (masks, other, masks, other):
        ref, _ = reference(q32.double(), k32.double(), v32.double(), allowed_of(ms, 1, 9, 1, 2048))
        assert scaled(am.attention(q32, k32, v32, ms, enable_gqa=True), ref, v32) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_growing_cache_matches_float64_at_every_step(dtype):
    # One key more every step (a new Lk each call, q_offset = Lk - 1), across the row-keys module's
    # first axis range (1024) and past 2048; per-head lists with GQA, two batch elements, a head with
    # no key (`none`), rows cut out of a window (`- rows(0, 40)`), strided columns, segments.
    from attnmask.engines import short
    B, H, Hkv, D = 2, 9, 3, 16
    masks = [am.parse(t) for t in NINE]
    q, k, v = inputs(B, H, Hkv, 1, 2200, D, dtype, seed=11)
    for Lk in list(range(1000, 1030)) + [2047, 2048, 2049, 2200]:
        kk, vv = k[:, :, :Lk], v[:, :, :Lk]
        out, lse = am.attention(q, kk, vv, masks, enable_gqa=True, return_lse=True)
        allowed = allowed_of(masks, B, H, 1, Lk)
        ref, ref_lse = reference(q, kk, vv, allowed)
        err = scaled(out, ref, v)
        bound = 1e-5 if dtype == torch.float32 else 2 * stick(q, kk, vv, allowed) / float(v.double().abs().max()) + 1e-6
        assert err < bound, (Lk, err)
        empty = ~allowed.any(-1)
        assert empty[:, 7].all() and bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())
        assert float((lse[~empty].double() - ref_lse[~empty]).abs().max()) < (1e-5 if dtype == torch.float32 else 0.05)
    # the plan came from the masks' structure (no evaluation over the Lk cells) and split the causal
    # head (4) from its narrow neighbours: no call over all keys holds a head that reads few of them
    plan = short._build([(m, 2199) for m in masks], torch.arange(H).reshape(1, H), 1, 2200, Hkv)
    wide = [c for c in plan.calls if c.pieces is None and c.index is None and c.hi - c.lo > 1100]
    assert wide and all(c.kv0 == 1 and c.kv1 == 2 and c.rows is not None and c.rows.tolist() == [1] for c in wide)


def test_decode_with_patterns_the_row_keys_cannot_describe_is_evaluated_exactly():
    # Thousands of key columns (every other key) and a strided offset pattern: the plan comes from
    # evaluating the masks on the call's cells, next to a head the structure describes.
    window = am.causal & (am.sliding(16) | am.sink(2))
    for masks in ([am.causal & am.cols(0, 3000, 2), window], [am.causal - am.strided(2), window],
                  [am.cols(0, 3000, 2) | am.rows(0, 9000, 3), window]):
        for Lk in (2999, 3000, 3001):
            q, k, v = inputs(1, 4, 2, 1, Lk, 16, seed=Lk)
            out = am.attention(q, k, v, masks * 2, enable_gqa=True)
            ref, _ = reference(q, k, v, allowed_of(masks * 2, 1, 4, 1, Lk))
            assert scaled(out, ref, v) < 1e-5, (masks, Lk)


def test_a_growing_cache_chooses_its_calls_again_when_a_row_without_keys_gets_some(monkeypatch):
    # Steps of a growing cache reuse the first step's grouping of rows into calls; a row left out
    # because it had no key (here: rows cut until position 3000) must make the step choose again.
    from attnmask.engines import short
    chosen = []
    choose = short._choose_units
    monkeypatch.setattr(short, "_choose_units", lambda *a: chosen.append(1) or choose(*a))
    masks = [am.causal, am.causal & am.sliding(16), am.causal & am.sliding(8) - am.rows(0, 3000)]
    q, k, v = inputs(1, 3, 1, 1, 3010, 16, seed=13)
    for Lk in range(2995, 3010):
        out, lse = am.attention(q, k[:, :, :Lk], v[:, :, :Lk], masks, enable_gqa=True, return_lse=True)
        allowed = allowed_of(masks, 1, 3, 1, Lk)
        ref, _ = reference(q, k[:, :, :Lk], v[:, :, :Lk], allowed)
        assert scaled(out, ref, v) < 1e-5, Lk
        assert bool(torch.isneginf(lse[0, 2, 0])) == (Lk <= 3000)
    assert len(chosen) == 2                     # the first step, and the step whose cut row got keys


def test_a_growing_cache_reuses_its_row_masks_and_one_mask_needs_none():
    # A window and its sink move together: each step's gathered keys hold the same columns, so the
    # row masks are found again, not rebuilt; one mask for every head needs no mask at all.
    from attnmask.engines import short
    q, k, v = inputs(1, 9, 3, 1, 5000, 64, seed=12)
    nine = [am.parse(t) for t in NINE[:5]] + [am.parse(t) for t in NINE[:4]]
    one = am.causal & (am.sliding(64) | am.sink(4))
    short._row_masks.clear()
    for Lk in range(4000, 4024):
        out = am.attention(q, k[:, :, :Lk], v[:, :, :Lk], nine, enable_gqa=True)
        ref, _ = reference(q, k[:, :, :Lk], v[:, :, :Lk], allowed_of(nine, 1, 9, 1, Lk))
        assert scaled(out, ref, v) < 1e-5
        out = am.attention(q, k[:, :, :Lk], v[:, :, :Lk], one, enable_gqa=True)
        ref, _ = reference(q, k[:, :, :Lk], v[:, :, :Lk], allowed_of([one] * 9, 1, 9, 1, Lk))
        assert scaled(out, ref, v) < 1e-5
    assert len(short._row_masks) <= 4          # a handful for 24 steps, none for the single mask
    plan = short._build([(one, 4999)], torch.zeros(1, 9, dtype=torch.int64), 1, 5000, 3)
    assert len(plan.calls) == 1 and plan.calls[0].mask is None and plan.calls[0].pieces == [(0, 4), (4936, 5000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_gqa_prefill_forward_and_backward_match_float64(dtype):
    # Heads with equal layouts next to each other in a kv group (0, 1) and apart (2 vs 5), per-batch rows.
    B, H, Hkv, L, D = 2, 6, 2, 300, 16
    m = [am.parse(t) for t in ["causal & sliding(40)", "causal & sliding(40)", "causal & (sliding(20) | sink(3))",
                               "causal", "causal - rows(100, 180)", "causal & (sliding(20) | sink(3))"]]
    q, k, v = (t.requires_grad_() for t in inputs(B, H, Hkv, L, L, D, dtype, seed=2))
    out = am.attention(q, k, v, m, enable_gqa=True, block_size=64)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * w).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(q64, k64, v64, allowed_of(m, B, H, L, L))
    (ref * w.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert scaled(out, ref.detach(), v) < tol
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert float((got.double() - want).abs().max()) / float(want.abs().max()) < (1e-5 if dtype == torch.float32
                                                                                     else 3e-2)


@pytest.mark.parametrize("expr", ["causal & (sliding(200) | sink(4))", "causal & (sliding(64) | sink(4))",
                                  "causal & (sliding(300) | cols(5, 1200, 97)) - rows(700, 720)",
                                  "(causal & sliding(100)) | cols(0, 3) | cols(650)",
                                  # key sets alone, beside an exactly causal rest, under a difference
                                  "sink(3)", "cols(5) | cols(900) | diagonal", "causal | cols(7)",
                                  "(causal & (sliding(64) | sink(4))) - cols(2)"])
def test_gathered_key_sets_match_float64(expr):
    # Forward and backward (the fused kernel path, and the matmul path when the lse gets a gradient).
    L, D = 1200, 32
    mask = am.parse(expr)
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 1, L, L, D, seed=5))
    out, lse = am.attention(q, k, v, mask, enable_gqa=True, return_lse=True)
    allowed = mask.to_dense(L)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference(q64, k64, v64, allowed)
    assert scaled(out, ref.detach(), v) < 1e-5
    empty = ~allowed.any(-1)
    assert bool((out[:, :, empty] == 0).all()) and bool(torch.isneginf(lse[:, :, empty]).all())
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    for with_lse in (False, True):
        for t in (q, k, v, q64, k64, v64):
            t.grad = None
        extra = lambda x: x.masked_fill(torch.isneginf(x), 0).sum() if with_lse else 0      # noqa: E731
        (out * w).sum().add(extra(lse)).backward(retain_graph=True)
        (ref * w.double()).sum().add(extra(ref_lse)).backward(retain_graph=True)
        for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert float((got.double() - want).abs().max()) / float(want.abs().max()) < 1e-5, with_lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_set_calls_of_their_own_match_float64(dtype):
    # A wide window leaves its key sets to calls of their own (matmuls merged by LSE in place):
    # several 1024-row chunks, a shorter last one, a row with no key at all, heads sharing a kv head.
    L, D = 2100, 32
    mask = am.parse("(causal & (sliding(700) | sink(4) | cols(100, 1000, 300))) - rows(1500)")
    plan = plan_for(mask.compile(L))
    assert sum(op.G for op in plan.ops if op.span == 0) >= 3           # the path under test runs
    q, k, v = inputs(1, 2, 1, L, L, D, dtype, seed=21)
    out, lse = am.attention(q, k, v, mask, enable_gqa=True, return_lse=True)
    allowed = mask.to_dense(L)[None, None].expand(1, 2, L, L)
    ref, ref_lse = reference(q, k, v, allowed)
    if dtype == torch.float32:
        assert scaled(out, ref, v) < 1e-5
    else:
        assert scaled(out, ref, v) <= 2 * stick(q, k, v, allowed) / float(v.double().abs().max())
    assert bool((out[:, :, 1500] == 0).all()) and bool(torch.isneginf(lse[:, :, 1500]).all())
    live = torch.isfinite(ref_lse)
    assert float((lse[live].double() - ref_lse[live]).abs().max()) < (1e-5 if dtype == torch.float32 else 0.05)


def test_a_gathered_call_that_writes_its_rows_first_ignores_what_was_there():
    # Found by hypothesis (test_backward, 2026-12-01): a mask of key columns only, whose one
    # gathered call (keys only, no span of its own) writes its rows first. Its outputs start as
    # torch.empty: run on NaN-filled buffers, a merge with them (instead of a write) shows.
    from attnmask.engines.blocksparse import _run_plan
    lay = am.parse("strided(3)").compile(1, 5, block_size=(1, 2))
    plan = plan_for(lay)
    assert plan.covered and any(op.first and op.span == 0 for op in plan.ops)
    q, k, v = inputs(1, 2, 2, 1, 5, 8, seed=1)
    out, lse = torch.full((2, 1, 8), float("nan")), torch.full((2, 1), float("nan"))
    _run_plan(plan, q[0], k[0], v[0], 0.3, out, lse)
    ref, ref_lse = reference(q, k, v, lay.mask.to_dense(1, 5, q_offset=4)[None, None].expand(1, 2, 1, 5), 0.3)
    assert scaled(out[None], ref, v) < 1e-5 and float((lse[None].double() - ref_lse).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_head_problems_side_by_side_match_float64(dtype, monkeypatch):
    # Nine different masks over three kv groups, two batch elements with different per-head rows:
    # the head problems run on worker threads (run_tasks; its work bound lowered to reach it at
    # this size); each must read its own mask and its own kv head (a problem taking another's
    # mask, or kv head 0 for every group, fails here), give the bits of the one-thread run, and
    # leave the caller's thread count as it was.
    from attnmask.engines import costs
    monkeypatch.setattr(costs, "SIDE_BY_SIDE_PAIRS", 0)
    B, H, Hkv, L, D = 2, 9, 3, 600, 32
    masks = [am.parse(t) for t in ["causal & (sliding(32) | sink(4))", "causal & sliding(64)", "causal",
                                   "causal & (sliding(256) | sink(4))", "causal & (sliding(16) | sink(1))",
                                   "causal & sliding(64) - rows(0, 30)", "causal & (sliding(128) | cols(0, 8))",
                                   "causal & chunked(100)", "causal & (sliding(300) | sink(2))"]]
    rows = [masks, masks[::-1]]
    q, k, v = inputs(B, H, Hkv, L, L, D, dtype, seed=13)
    before = torch.get_num_threads()
    out = am.attention(q, k, v, am.per_batch(rows), enable_gqa=True)
    assert torch.get_num_threads() == before
    ref, _ = reference(q, k, v, allowed_of(rows, B, H, L, L))
    if dtype == torch.float32:
        assert scaled(out, ref, v) < 1e-5
    else:
        assert scaled(out, ref, v) <= 2 * stick(q, k, v, allowed_of(rows, B, H, L, L)) / float(v.double().abs().max())
    from attnmask.threads import single_thread
    with single_thread():                                          # run_tasks then runs them in order, here
        alone = am.attention(q, k, v, am.per_batch(rows), enable_gqa=True)
    assert torch.equal(out, alone)
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [before]                                        # the workers' pin did not leak


def test_run_tasks_runs_each_task_once_and_raises_the_first_error():
    from attnmask.threads import run_tasks
    seen = []
    lock = threading.Lock()

    def task(i):
        with lock:
            seen.append((i, torch.get_num_threads(), torch.is_grad_enabled()))
    run_tasks([lambda i=i: task(i) for i in range(7)], [3, 1, 4, 1, 5, 9, 2])
    assert sorted(i for i, _, _ in seen) == list(range(7))
    if torch.get_num_threads() > 1:
        assert all(n == 1 and not grad for _, n, grad in seen)     # one intra-op thread each, no autograd

    def boom():
        raise ValueError("task failed")
    with pytest.raises(ValueError, match="task failed"):
        run_tasks([boom, lambda: None, lambda: None], [1, 2, 3])


def test_run_tasks_keeps_one_pool_whatever_the_task_counts():
    # The pool grows to the largest count asked for and is shared: calls with 2, 3, 4, ... tasks
    # must not each leave a pool of threads behind, blocked on a queue nobody feeds.
    from attnmask.threads import run_tasks
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for n_tasks in (2, 3, 4, 2, 5, 3, 6):
            out = [0] * n_tasks
            run_tasks([lambda i=i: out.__setitem__(i, i + 1) for i in range(n_tasks)], [1] * n_tasks)
            assert out == list(range(1, n_tasks + 1))
        workers = [t for t in threading.enumerate() if t.name.startswith("attnmask-worker-")]
        assert len(workers) <= 4, [t.name for t in workers]
        assert len({t.name for t in workers}) == len(workers)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before


def _work(plan) -> int:
    """Scores a plan's calls compute per head (gathered keys included)."""
    return sum(op.G * op.rows * (op.span + sum(b - a for a, b in op.extra)) for op in plan.ops)


def test_a_sink_costs_about_its_keys():
    # A sink is a key set: split off the mask, the window plans as if it were not there. Calls
    # tall enough to take its 4 keys into their own (the backward's 128-row calls of a narrow
    # window) do so: no call of its own, no merge. Short or wide calls (the forward's: copying
    # their keys would cost more than a merge) keep their ops and leave the sink to batched
    # calls over the gathered keys (one more for the rows whose window still holds part of it).
    from attnmask.engines.costs import BACKWARD
    merges = lambda p: sum(not op.first for op in p.ops)                                       # noqa: E731
    L = 4096
    for w in (64, 512):
        plain = plan_for((am.causal & am.sliding(w)).compile(L))
        sink = plan_for((am.causal & (am.sliding(w) | am.sink(4))).compile(L))
        assert _work(sink) <= _work(plain) + 5 * L       # ~4 keys a row, plus a few rows near the start
        key_set_calls = [op for op in sink.ops if op.span == 0]
        assert all(op.extra == ((0, 4),) for op in key_set_calls)
        own = lambda p: sum(op.G * op.rows * op.span for op in p.ops)                   # noqa: E731
        assert own(sink) == own(plain)                # the window's own cells, unchanged
        assert len(sink.ops) <= len(plain.ops) + 2 and len(key_set_calls) <= 2
    plain = plan_for((am.causal & am.sliding(64)).compile(L), BACKWARD)
    sink = plan_for((am.causal & (am.sliding(64) | am.sink(4))).compile(L), BACKWARD)
    assert not [op for op in sink.ops if op.span == 0] and merges(sink) == merges(plain)
    assert len(sink.ops) <= len(plain.ops) + 1 and any(op.extra == ((0, 4),) for op in sink.ops)
    assert _work(sink) <= _work(plain) + 4 * L


def test_key_columns_cost_about_their_keys():
    # 32 columns under a wide window: the window keeps its own (batched) ops, and the columns'
    # keys are gathered into a few calls of their own: about 32 keys a row, not a call (and a
    # merge) per column or per query block.
    from attnmask.engines.costs import KEY_SET_ROWS
    L = 8192
    cols = " | ".join(f"cols({7 + 230 * i})" for i in range(32))
    plain = plan_for(am.parse("causal & sliding(1024)").compile(L))
    plan = plan_for(am.parse(f"causal & (sliding(1024) | {cols})").compile(L))
    assert plan.ops[:len(plain.ops)] == plain.ops
    assert _work(plan) <= _work(plain) + 32 * L
    assert len(plan.ops) <= len(plain.ops) + L // KEY_SET_ROWS
    calls_per_row = torch.zeros(L, dtype=torch.int64)
    for op in plan.ops:
        for g in range(op.G):
            calls_per_row[op.r0 + g * op.dr:op.r0 + g * op.dr + op.rows] += 1
    assert int(calls_per_row.max()) <= 3          # the window (at most two ranges) and the columns
    assert max(len(op.extra) for op in plan.ops) == 32


def test_two_python_threads_get_right_results_and_keep_their_thread_count():
    before = torch.get_num_threads()
    cases = [(inputs(1, 4, 2, n, n, 16, seed=n), am.causal & (am.sliding(n // 4) | am.sink(2))) for n in (64, 700)]
    cases.append((inputs(1, 4, 2, 1, 900, 16, seed=3), am.causal & am.sliding(100)))
    want = [am.attention(q, k, v, m, enable_gqa=True) for (q, k, v), m in cases]
    errors, counts = [], []

    def worker():
        try:
            mine = torch.get_num_threads()
            for _ in range(15):
                for ((q, k, v), m), w in zip(cases, want):
                    if not torch.equal(am.attention(q, k, v, m, enable_gqa=True), w):
                        errors.append("result differs")
            counts.append(torch.get_num_threads() == mine)
        except Exception as e:          # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and counts == [True, True]
    assert torch.get_num_threads() == before


def test_a_30_layer_model_with_nine_masks_a_layer_at_three_lengths_fits_the_caches(monkeypatch):
    # 30 layers x 9 different per-head masks x 3 lengths, forward and backward plans: a second pass
    # compiles nothing and plans nothing (counted, not timed), and the caches stay within their bytes.
    # The plans hold ~4x fewer mask bytes than their sum: tiles equal across lengths and masks are
    # interned and counted once (measured: 96 MB of masks in the plans, 24 MB distinct, 39 MB counted
    # in all with the bound on the fused kernel's tables; the float32 copies the ATen path makes, 4
    # bytes a cell, are counted when made: 39 + 4 x 24 = ~136 MB with every one made). (Windows'
    # plans do not grow with the length: at 1K / 2K / 4K the same model held ~95 MB of plans,
    # measured with the copies counted up front.)
    import attnmask.layout as layout_module
    from attnmask.engines import blocksparse
    from attnmask.engines.costs import BACKWARD
    counts = {"compiles": 0, "plans": 0}

    class CountingCompiler(layout_module.Compiler):
        def run(self, mask):
            counts["compiles"] += 1
            return super().run(mask)

    build = blocksparse._build_plan

    def counting_build(*args):
        counts["plans"] += 1
        return build(*args)

    monkeypatch.setattr(layout_module, "Compiler", CountingCompiler)
    monkeypatch.setattr(blocksparse, "_build_plan", counting_build)
    widths = [16, 32, 64, 128, 256]                 # + 5 * layer: all distinct (see the assert)
    model = [[am.causal & am.sliding(w + 5 * layer) for w in widths]
             + [am.causal & (am.sliding(w + 5 * layer) | am.sink(4)) for w in widths[:3]]
             + [am.causal & (am.sliding(100 + layer) | am.cols(0, 8))] for layer in range(30)]
    assert len({m for masks in model for m in masks}) == 270
    am.clear_cache()
    blocksparse.plans.clear()

    def one_pass():
        for L in (256, 512, 1024):
            for masks in model:
                for m in masks:
                    lay = m.compile(L)
                    blocksparse.plan_for(lay)
                    blocksparse.plan_for(lay, BACKWARD)

    one_pass()
    first = dict(counts)
    assert first["compiles"] >= 810 and first["plans"] >= 1620
    kept = [v[0] for v in blocksparse.plans._items.values()]
    held = sum(blocksparse.tensor_bytes(p.masks) for p in kept)
    distinct = blocksparse.tensor_bytes(list({id(m): m for p in kept for m in p.masks}.values()))
    own = sum(p.nbytes() - blocksparse.tensor_bytes(p.masks) for p in kept)
    assert blocksparse.plans.nbytes <= 0.75 * blocksparse.plans.budget       # room to spare
    assert held > 3 * distinct                                              # tiles shared ...
    assert blocksparse.plans.nbytes == own + distinct                       # ... and counted once
    assert am.cache_info()["bytes"] < am.cache_info()["limit_bytes"] // 10
    one_pass()
    assert counts == first, (first, counts)


def test_additive_mask_copies_are_shared_counted_and_dropped_with_their_plans(monkeypatch):
    # A plan's masks run as float copies (0 / -inf). Plans of one mask at two lengths share an
    # interned mask and so its copy; the plan cache counts each copy when it is made (4 bytes a
    # cell for float32) and lets it go when the last plan holding the mask is evicted, even if the
    # mask tensor itself lives on (the copies hung on the tensor then, counted only up front, and
    # lived as long as it).
    import gc
    import weakref
    from attnmask.engines import blocksparse
    monkeypatch.setenv("ATTNMASK_KERNEL", "0")        # the ATen path (the fused kernel makes no copies)
    mask = am.causal & am.sliding(64)
    blocksparse.plans.clear()
    plans = [plan_for(mask.compile(L)) for L in (512, 1024)]
    used = [{id(p.masks[op.mask]): p.masks[op.mask] for op in p.ops if op.mask is not None} for p in plans]
    shared = used[0].keys() & used[1].keys()
    assert shared, "the case must be one where the plans share a mask"
    held = blocksparse.plans.nbytes
    for L in (512, 1024):
        q, k, v = inputs(1, 2, 2, L, L, 16)
        am.attention(q, k, v, mask)
    distinct = {**used[0], **used[1]}
    assert blocksparse.plans.nbytes - held == 4 * sum(m.numel() for m in distinct.values())
    i0 = {id(m): i for i, m in enumerate(plans[0].masks)}
    i1 = {id(m): i for i, m in enumerate(plans[1].masks)}
    one = next(iter(shared))
    copy = plans[0].additive(i0[one], torch.float32)
    assert plans[1].additive(i1[one], torch.float32) is copy
    assert torch.equal(copy, torch.zeros(copy.shape).masked_fill_(~distinct[one], float("-inf")))
    kept, gone = distinct[one], weakref.ref(copy)
    del plans, copy
    blocksparse.plans.clear()
    gc.collect()
    assert gone() is None and blocksparse.plans.nbytes == 0
    assert kept.dtype == torch.bool                             # the mask itself lives on, here


def test_byte_lru_evicts_by_bytes():
    c = ByteLRU(1000)
    for i in range(10):
        c.put(i, i, 300)
    assert len(c) == 3 and c.nbytes == 900 and c.get(9) == 9 and c.get(0) is None
    c.put("huge", 0, 5000)
    assert c.get("huge") is None and len(c) == 3


def test_byte_lru_keeps_entries_that_fill_its_budget_exactly():
    # "the oldest go first once the total passes the budget": a total equal to it is kept
    c = ByteLRU(1000)
    c.put("a", 1, 600)
    c.put("b", 2, 400)
    assert len(c) == 2 and c.nbytes == 1000 and c.get("a") == 1
    c.put("whole", 3, 1000)
    assert len(c) == 1 and c.get("whole") == 3


def test_short_plans_stay_within_their_byte_budget(monkeypatch):
    # Decode-shaped calls (16 rows) on eight distinct windows: each plan holds a bool mask of
    # 16 x (w + 15) keys and, once used, its float32 additive copy: >= 5 bytes a cell, counted
    # here from the mask, not from the cache's own accounting. A budget of 1 MB holds at most
    # that many plans (a plan size computed with the wrong sign kept all eight).
    from attnmask.engines import short
    budget = 1 << 20
    monkeypatch.setattr(short, "short_plans", ByteLRU(budget))
    Lq, Lk, widths = 16, 8192, range(4000, 4008)
    q, k, v = inputs(1, 1, 1, Lq, Lk, 8)
    for w in widths:
        out = am.attention(q, k, v, am.causal & am.sliding(w))
        assert out.shape == (1, 1, Lq, 8)
    held = len(short.short_plans)
    assert 1 <= held <= budget // (5 * Lq * (min(widths) + Lq - 1))


def test_each_pass_gets_its_own_plan_whatever_planned_first():
    # The forward and the backward cut rows differently (engines/costs.py); the plan a pass gets
    # must not depend on which pass planned the layout first (one cache entry for both directions
    # survived the suite: the backward then ran the forward's row pieces).
    from attnmask.engines import blocksparse
    from attnmask.engines.costs import BACKWARD, FORWARD
    lay = (am.causal & am.sliding(1024)).compile(4096)
    blocksparse.plans.clear()
    back_first, fwd_second = plan_for(lay, BACKWARD), plan_for(lay, FORWARD)
    blocksparse.plans.clear()
    fwd_first, back_second = plan_for(lay, FORWARD), plan_for(lay, BACKWARD)
    assert fwd_first.ops != back_first.ops, "the case must be one where the passes differ"
    assert fwd_second.ops == fwd_first.ops and back_second.ops == back_first.ops

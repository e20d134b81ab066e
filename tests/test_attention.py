"""Exactness, edge cases and errors of ``attnmask.attention`` against a float64 dense reference.

The reference (``numerics.reference``) is computed by the tests in float64 from
``mask.to_dense`` (the semantics oracle), never by an engine; every backend is
held to it. Errors are scaled to the inputs (``numerics.scaled_error``: outputs
against max |v|), so an exactly-zero reference is measured sensibly.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask.engines import attention, per_batch
from attnmask.engines.blocksparse import blocksparse_forward
from distribution import record
from numerics import output_unit, reference, scaled_error

# -- helpers -------------------------------------------------------------------------------------


def leaf(draw):
    kind = draw(st.sampled_from(["causal", "full", "none", "diagonal", "band", "sliding", "sink", "prefix_lm",
                                 "chunked", "dilated", "strided", "document", "rows", "cols"]))
    n = st.integers(0, 70)
    p = st.integers(1, 40)
    if kind in ("causal", "full", "none", "diagonal"):
        return getattr(am, kind)
    if kind == "band":
        return am.band(draw(n), draw(n))
    if kind in ("sliding", "chunked", "strided"):
        return getattr(am, kind)(draw(p))
    if kind in ("sink", "prefix_lm"):
        return getattr(am, kind)(draw(n))
    if kind == "dilated":
        return am.dilated(draw(st.integers(1, 12)), draw(st.integers(1, 6)))
    if kind == "document":
        return am.document(*draw(st.lists(st.integers(1, 60), min_size=1, max_size=5)))
    a = draw(n)
    return getattr(am, kind)(a, a + draw(n), draw(st.integers(1, 5)))


@st.composite
def masks(draw, depth=2):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        m = leaf(draw)
    else:
        op = draw(st.sampled_from(["|", "&", "-", "~"]))
        a = draw(masks(depth=depth - 1))
        if op == "~":
            m = ~a
        else:
            b = draw(masks(depth=depth - 1))
            m = {"|": a | b, "&": a & b, "-": a - b}[op]
    return m


@st.composite
def problems(draw):
    mask = draw(masks())
    lq = draw(st.integers(1, 150))
    lk = draw(st.sampled_from([lq, draw(st.integers(1, 200))]))
    q_offset = draw(st.one_of(st.none(), st.integers(0, 80)))
    hkv = draw(st.integers(1, 2))
    h = hkv * draw(st.integers(1, 2))
    b = draw(st.integers(1, 2))
    d = draw(st.sampled_from([4, 16]))
    bs = draw(st.sampled_from([16, 32, (16, 32), 128]))
    seed = draw(st.integers(0, 2**31 - 1))
    return mask, b, h, hkv, lq, lk, q_offset, d, bs, seed


def tensors(b, h, hkv, lq, lk, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# -- exactness -----------------------------------------------------------------------------------


@given(problems())
def test_random_masks_match_float64(problem):
    mask, b, h, hkv, lq, lk, q_offset, d, bs, seed = problem
    record("test_random_masks_match_float64", mask=str(mask), Lq=lq, Lk=lk, q_offset=q_offset, block=bs)
    q, k, v = tensors(b, h, hkv, lq, lk, d, seed)
    allowed = mask.to_dense(lq, lk, q_offset=q_offset)
    ref, ref_lse = reference(q, k, v, allowed, 0.3)
    dead = ~allowed.any(1)
    for backend in ("blocksparse", "dense"):
        out, lse = attention(q, k, v, mask, scale=0.3, q_offset=q_offset, enable_gqa=True, return_lse=True,
                             backend=backend, block_size=bs)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert out.shape == q.shape and lse.shape == (b, h, lq)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert scaled_error(out, ref, output_unit(v)) < 1e-5, backend
        live = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), live), backend
        if live.any():
            assert float((lse.double() - ref_lse)[live].abs().max()) < 1e-5 * max(1.0, float(ref_lse[live].abs().max()))
        # Rows with no allowed key: exact zeros and -inf.
        assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
        assert bool((lse[:, :, dead] == float("-inf")).all())


@given(problems(), st.sampled_from([4, 8, 16]))
def test_row_pieces_and_their_cuts_match_float64(problem, sub_rows):
    # The planner cuts partial blocks into row pieces (every _SUB_ROWS rows and at document
    # boundaries) and decides between one is_causal call and pieces by a cost model; with
    # pieces of a few rows, the small random problems exercise all of it.
    import attnmask.engines.blocksparse as bs_mod
    import attnmask.engines.costs as costs
    mask, b, h, hkv, lq, lk, q_offset, d, bs, seed = problem
    q, k, v = tensors(b, h, hkv, lq, lk, d, seed)
    ref, _ = reference(q, k, v, mask.to_dense(lq, lk, q_offset=q_offset), 0.3)
    saved = costs.SUB_ROWS, costs.SPLIT_GAIN
    costs.SUB_ROWS, costs.SPLIT_GAIN = sub_rows, 2.0          # always cut when there is anything to cut
    try:
        lay = mask.compile(lq, lk, q_offset=q_offset, block_size=bs)
        bs_mod.plans.clear()
        out = attention(q, k, v, lay, scale=0.3, enable_gqa=True)
        plan = bs_mod.plan_for(lay)
    finally:
        costs.SUB_ROWS, costs.SPLIT_GAIN = saved
        bs_mod.plans.clear()
    assert scaled_error(out, ref, output_unit(v)) < 1e-5
    # (key-set calls, against gathered keys only (span 0), are cut by costs.KEY_SET_ROWS instead; a call
    # that carries gathered keys (op.extra) is masked for those keys, not because its own tiles are
    # partial, e.g. causal | prefix_lm(8) | cols(0, 9): the prefix's full rows take the column's keys)
    assert all(op.rows <= sub_rows for op in plan.ops if op.mask is not None and op.span > 0 and not op.extra)


def test_window_blocks_run_as_row_pieces_trimmed_to_their_keys():
    import attnmask.engines.blocksparse as bs_mod
    lay = (am.causal & am.sliding(256)).compile(2048, block_size=128)
    plan = bs_mod.plan_for(lay)
    interior = max(plan.ops, key=lambda op: op.G)
    assert (interior.rows, interior.span) == (64, 64 + 255)        # not 128 rows x 383 keys
    computed = sum(op.G * op.rows * op.span for op in plan.ops)
    assert computed < 2048 * (128 + 255) * 0.9
    q, k, v = tensors(1, 2, 2, 2048, 2048, 16, seed=3)
    ref, _ = reference(q, k, v, lay.to_dense(), 0.25)
    assert scaled_error(attention(q, k, v, lay, scale=0.25), ref, output_unit(v)) < 1e-5


def test_narrow_windows_can_run_as_short_pieces_in_one_call():
    # With costs.MIN_SUB_ROWS lowered (off by default: measured slower in the engine at model
    # shapes), sliding(16)'s repeated blocks take 8-row pieces (23 keys a row instead of 79),
    # all in one batched call; results stay exact.
    import attnmask.engines.blocksparse as bs_mod
    import attnmask.engines.costs as costs
    lay = (am.causal & am.sliding(16)).compile(4096, block_size=128)
    saved = costs.MIN_SUB_ROWS
    costs.MIN_SUB_ROWS = 8
    try:
        bs_mod.plans.clear()
        plan = bs_mod.plan_for(lay)
        q, k, v = tensors(1, 2, 2, 4096, 4096, 16, seed=3)
        out = attention(q, k, v, lay, scale=0.25)
    finally:
        costs.MIN_SUB_ROWS = saved
        bs_mod.plans.clear()
    interior = max(plan.ops, key=lambda op: op.G)
    assert interior.rows <= 16 and interior.span == interior.rows + 15 and interior.G * interior.rows > 3900
    assert len(plan.ops) <= 4
    computed = sum(op.G * op.rows * op.span for op in plan.ops)
    assert computed < 2.0 * lay.attended_pairs()
    ref, _ = reference(q, k, v, lay.to_dense(), 0.25)
    assert scaled_error(out, ref, output_unit(v)) < 1e-5


def test_blocks_straddling_documents_are_cut_at_the_boundary():
    import attnmask.engines.blocksparse as bs_mod
    mask = am.causal & am.document(100, 300, 212)
    lay = mask.compile(612, block_size=128)
    plan = bs_mod.plan_for(lay)
    # Rows 100.. of block 0 belong to the second document: some op starts exactly there and
    # reads no key of the first document.
    assert any(op.r0 == 100 and op.k0 >= 100 for op in plan.ops)
    q, k, v = tensors(1, 2, 1, 612, 612, 16, seed=4)
    ref, _ = reference(q, k, v, mask.to_dense(612), 0.25)
    assert scaled_error(attention(q, k, v, lay, scale=0.25, enable_gqa=True), ref, output_unit(v)) < 1e-5


def test_ops_merging_into_rows_no_op_wrote_yet():
    # A long shared-key op (the sink) meets rows whose own first op comes later in the plan:
    # the plan must then start from zeros / -inf instead of skipping the fill.
    import attnmask.engines.blocksparse as bs_mod
    # (A sink is a key set: its calls run after the rest's, so they meet unwritten rows where
    # the rest has none: rows outside rows(100, 300) here.)
    q, k, v = tensors(1, 2, 2, 600, 600, 8, seed=5)
    for mask, covered in ((am.chunked(7) | am.sink(2), True), ((am.causal & am.rows(100, 300)) | am.sink(2), False)):
        lay = mask.compile(600, block_size=(16, 16))
        assert bs_mod.plan_for(lay).covered == covered, mask
        ref, _ = reference(q, k, v, mask.to_dense(600), 0.3)
        assert scaled_error(attention(q, k, v, lay, scale=0.3), ref, output_unit(v)) < 1e-5


@pytest.mark.parametrize("expr", ["causal & sliding(1024)", "causal & (sliding(1024) | sink(4))"])
def test_window_plans_evaluate_one_tile_per_offset_class(expr, monkeypatch):
    # A mask of q - k alone (structure class D; a sink's rest after the key-set split) has one
    # tile per class of q0 - k0 and clipping: planning a 16K window evaluates a few tiles, not
    # its 255 partial ones (the planner's share of a first call).
    import attnmask.engines.blocksparse as bs_mod
    from attnmask.layout import BlockLayout
    evaluated, tile_masks = [], BlockLayout.tile_masks
    monkeypatch.setattr(BlockLayout, "tile_masks",
                        lambda self, qb, kb: evaluated.append(len(qb)) or tile_masks(self, qb, kb))
    lay = am.parse(expr).compile(16384, block_size=128)
    bs_mod.plans.clear()
    try:
        plan = bs_mod.plan_for(lay)
    finally:
        bs_mod.plans.clear()
    assert plan.ops and 0 < sum(evaluated) <= 4, evaluated


def test_plan_masks_stay_bounded_when_every_tile_is_partial():
    # Every tile of causal - cols(0, N, 2) is partial: masks one block tall and as wide as the
    # causal prefix summed to N^2 / 2 cells (135M at 16K). Stretches cut at fixed key positions
    # repeat down the rows and are stored once.
    import attnmask.engines.blocksparse as bs_mod
    sizes = []
    for n in (4096, 16384):
        plan = bs_mod.plan_for(am.parse(f"causal - cols(0, {n}, 2)").compile(n))
        sizes.append(sum(m.numel() for m in plan.masks))
        assert len(plan.ops) < 100
    assert sizes[1] < 1.2 * sizes[0] < 16e6


def test_stretches_of_partial_tiles_match_float64():
    mask = am.causal - am.cols(0, 900, 3) | am.sink(2)
    q, k, v = tensors(1, 2, 2, 900, 900, 8, seed=6)
    ref, _ = reference(q, k, v, mask.to_dense(900), 0.3)
    out = attention(q, k, v, mask, scale=0.3, block_size=16)        # 57 key blocks: two stretches of 32
    assert scaled_error(out, ref, output_unit(v)) < 1e-5


@pytest.mark.parametrize("rows,want", [(1500, 1), (2100, 1), (5000, 1), (32768, 8192), (40000, 3000)])
def test_row_cuts_keep_the_kernels_256_row_slices(rows, want):
    from attnmask.engines.blocksparse import _row_cuts
    cuts = _row_cuts(rows, want)
    assert [r for r, _ in cuts] == [sum(n for _, n in cuts[:i]) for i in range(len(cuts))]
    assert sum(n for _, n in cuts) == rows
    if len(cuts) > 1:
        assert all(n % 256 == 0 and n >= 1024 for _, n in cuts[:-1]) and cuts[-1][1] >= 1024
        assert all(r % 256 == 0 for r, _ in cuts)


@pytest.mark.parametrize("expr,lq,lk,q_offset,bs", [
    ("causal", 300, 300, None, 128),             # the is_causal fast path
    ("causal", 1, 1, None, 128),
    ("causal & sliding(100)", 777, 777, None, 64),
    ("causal & (sliding(50) | sink(4))", 400, 400, None, 32),
    ("causal & (sliding(50) | sink(4))", 1, 3000, None, 128),   # a decoding step
    ("document(100, 50, 77) & causal", 250, 250, None, (32, 64)),
    ("causal - (rows(36, 64, 8) - diagonal)", 64, 64, None, 16),
    ("dilated(8, 4)", 200, 300, 50, 32),           # runs as 4 strided window problems
    ("causal & dilated(5, 3)", 77, 130, None, 16),
    ("dilated(3, 7)", 5, 100, 3, 16),
    ("chunked(96) & causal", 130, 500, 370, 64),
    ("none", 10, 10, None, 4),
])
def test_known_masks_match_float64(expr, lq, lk, q_offset, bs):
    mask = am.parse(expr)
    q, k, v = tensors(2, 4, 2, lq, lk, 32, seed=lq + lk)
    ref, ref_lse = reference(q, k, v, mask.to_dense(lq, lk, q_offset=q_offset), 0.2)
    out, lse = attention(q, k, v, mask, scale=0.2, q_offset=q_offset, enable_gqa=True, return_lse=True,
                         block_size=bs)
    assert scaled_error(out, ref, output_unit(v)) < 1e-5
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))


def test_float64_inputs_stay_float64_exact():
    mask = am.causal & (am.sliding(40) | am.sink(3))
    q, k, v = tensors(1, 2, 2, 200, 200, 8, seed=3, dtype=torch.float64)
    ref, _ = reference(q, k, v, mask.to_dense(200), 0.5)
    out = attention(q, k, v, mask, scale=0.5, block_size=32)
    assert out.dtype == torch.float64
    assert scaled_error(out, ref, output_unit(v)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("expr,L,block", [
    ("causal & (sliding(100) | sink(4))", 300, 64), ("document(70, 200, 30) & causal", 300, 64),
    ("causal", 300, 64), ("dilated(20, 3) | diagonal", 300, 64), ("dilated(30, 4)", 300, 64),
    # rows gather many partial results (documents, a sink and a key run, small blocks): the merge
    # must happen in float32 (merging in the dtype measured 3.4x the stick)
    ("(causal & document(100, 200, 300)) | sink(8) | cols(400, 420)", 600, 16)])
def test_half_precision_within_the_measuring_stick(dtype, expr, L, block):
    # The stick: the float64 result rounded to the dtype, the best any kernel can return.
    # Measured: the engine is within 1.7x of it; the same attention with p @ v summed key by
    # key in the dtype (a wrong accumulation dtype) is 2.8-8.2x away (the next test checks one).
    mask = am.parse(expr)
    q, k, v = tensors(1, 4, 4, L, L, 64, seed=11, dtype=dtype)
    allowed = mask.to_dense(L)
    ref, _ = reference(q, k, v, allowed, 0.125)
    unit = output_unit(v)
    stick = scaled_error(ref.to(dtype), ref, unit)
    out = attention(q, k, v, mask, scale=0.125, block_size=block)
    assert out.dtype == dtype
    err = scaled_error(out, ref, unit)
    assert err <= 2 * stick, (err, stick)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bound_rejects_a_sum_in_the_dtype(dtype):
    """The bound above can tell: exact weights with p @ v summed in the dtype fail it."""
    mask = am.causal & (am.sliding(100) | am.sink(4))
    q, k, v = tensors(1, 4, 4, 300, 300, 64, seed=11, dtype=dtype)
    allowed = mask.to_dense(300)
    ref, _ = reference(q, k, v, allowed, 0.125)
    stick = scaled_error(ref.to(dtype), ref, output_unit(v))
    wrong = scaled_error(_summed_in(dtype, q, k, v, allowed, 0.125), ref, output_unit(v))
    assert wrong > 2 * stick, (wrong, stick)


def _summed_in(dtype, q, k, v, allowed, scale):
    """Attention with exact weights but p @ v accumulated in ``dtype``, one key at a time."""
    s = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).to(dtype)
    acc = torch.zeros(q.shape, dtype=dtype)
    for j in range(k.shape[2]):
        acc = acc + p[..., j:j + 1] * v[:, :, j:j + 1, :]
    return acc


def test_per_head_masks():
    heads = [am.causal, am.causal & am.sliding(7), am.document(30, 40, 30) & am.causal, am.sink(2) | am.diagonal]
    q, k, v = tensors(2, 4, 2, 100, 100, 16, seed=5)
    allowed = torch.stack([m.to_dense(100) for m in heads])[None]          # [1, H, Lq, Lk]
    ref, _ = reference(q, k, v, allowed, 0.25)
    for backend in ("blocksparse", "dense"):
        out = attention(q, k, v, heads, scale=0.25, enable_gqa=True, backend=backend, block_size=32)
        assert scaled_error(out, ref, output_unit(v)) < 1e-5, backend


def test_per_batch_masks_with_per_head_lists_and_layouts():
    docs0 = am.document(10, 60, 30) & am.causal
    docs1 = am.document(50, 50) & am.causal
    lay1 = docs1.compile(100, block_size=16)
    items = [docs0, [lay1, am.causal & am.sliding(9)]]
    q, k, v = tensors(2, 2, 1, 100, 100, 16, seed=9)
    allowed = torch.stack([torch.stack([docs0.to_dense(100)] * 2),
                           torch.stack([docs1.to_dense(100), (am.causal & am.sliding(9)).to_dense(100)])])
    ref, _ = reference(q, k, v, allowed, 0.25)
    pb = per_batch(items)
    assert isinstance(pb, am.engines.PerBatch) and hash(pb) == hash(per_batch(items))
    for backend in ("blocksparse", "dense"):
        out = attention(q, k, v, pb, scale=0.25, enable_gqa=True, backend=backend, block_size=16)
        assert scaled_error(out, ref, output_unit(v)) < 1e-5, backend


def test_block_layout_input_and_blocksparse_forward_interface():
    mask = am.causal & am.sliding(33) - am.rows(5, 60, 7)
    lay = mask.compile(150, 190, q_offset=20, block_size=(32, 16))
    q, k, v = tensors(1, 4, 2, 150, 190, 16, seed=1)
    ref, ref_lse = reference(q, k, v, mask.to_dense(150, 190, q_offset=20), 0.25)
    out = attention(q, k, v, lay, scale=0.25, enable_gqa=True)
    assert scaled_error(out, ref, output_unit(v)) < 1e-5
    out2, lse2 = blocksparse_forward(q, k, v, [lay], torch.zeros(1, 4, dtype=torch.int64), 0.25)
    assert torch.equal(out, out2)
    assert lse2.dtype == torch.float32 and torch.equal(torch.isfinite(lse2), torch.isfinite(ref_lse))


def test_default_scale_and_q_offset():
    mask = am.causal & am.sliding(10)
    q, k, v = tensors(1, 1, 1, 5, 40, 8, seed=2)
    ref, _ = reference(q, k, v, mask.to_dense(5, 40), 1 / math.sqrt(8))   # queries are the last 5 positions
    assert scaled_error(attention(q, k, v, mask), ref, output_unit(v)) < 1e-5


def test_fully_masked_rows_are_exact_zeros_with_minus_inf_lse():
    mask = am.causal - am.rows(10, 20) - am.rows(100, 101)
    q, k, v = tensors(1, 2, 2, 150, 150, 16, seed=4)
    for backend in ("blocksparse", "dense"):
        out, lse = attention(q, k, v, mask, return_lse=True, backend=backend, block_size=32)
        for r in list(range(10, 20)) + [100]:
            assert torch.equal(out[:, :, r], torch.zeros_like(out[:, :, r])), (backend, r)
            assert bool((lse[:, :, r] == float("-inf")).all()), (backend, r)
        assert torch.isfinite(lse[:, :, 21]).all()
    out = attention(q, k, v, am.none)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", ["auto", "blocksparse", "dense"])
@pytest.mark.parametrize("lq, lk", [(0, 40), (6, 0), (0, 0)])
def test_empty_sequences_give_empty_outputs_and_zero_gradients(backend, lq, lk):
    # As SDPA: no query row gives an empty output; no key gives every row zeros and lse -inf (PRODUCT:
    # rows with no allowed key). Gradients flow with the shapes of the inputs, all zeros. (Both were
    # refused: "q_len must be >= 1, got 0", from compiling the layout.)
    masks = [am.causal & am.sliding(8), am.sink(2) | am.cols(5), am.full, am.none]
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (t.to(dtype).requires_grad_() for t in tensors(2, 4, 2, lq, lk, 16, seed=1))
        out, lse = attention(q, k, v, masks, enable_gqa=True, return_lse=True, backend=backend)
        assert out.shape == (2, 4, lq, 16) and out.dtype == dtype and torch.equal(out, torch.zeros_like(out))
        assert lse.shape == (2, 4, lq) and lse.dtype == torch.float32 and bool((lse == float("-inf")).all())
        out.backward(torch.randn_like(out))
        for t in (q, k, v):
            assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t.grad))
        with torch.no_grad():
            assert attention(q, k, v, am.causal, enable_gqa=True, backend=backend).shape == (2, 4, lq, 16)
    # the mask argument is still checked, uncompiled
    q, k, v = tensors(1, 2, 2, lq, lk, 16, seed=1)
    with pytest.raises(am.MaskError, match="list of 3 masks but q has 2 heads"):
        attention(q, k, v, [am.causal] * 3, backend=backend)
    with pytest.raises(am.MaskError, match="compiled"):
        attention(q, k, v, am.causal.compile(8), backend=backend)


def test_empty_sequences_keep_each_backends_reasons():
    q, k, v = tensors(1, 2, 2, 0, 16, 16, seed=0)
    with pytest.raises(am.MaskError, match="cannot return the lse on CPU"):
        attention(q, k, v, am.causal, backend="flex", return_lse=True)
    assert attention(q, k, v, am.causal, backend="flex").shape == (1, 2, 0, 16)


def test_bit_identical_on_repeat():
    mask = am.causal & (am.sliding(70) | am.sink(4)) | am.document(100, 200) & am.causal
    q, k, v = tensors(2, 4, 4, 300, 300, 32, seed=8)
    a, la = attention(q, k, v, mask, return_lse=True, block_size=32)
    am.clear_cache()          # a fresh layout and plan must give the same bits
    b, lb = attention(q, k, v, mask, return_lse=True, block_size=32)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_dense_backend_gradients_match_float64():
    mask = am.causal & am.sliding(5) - am.rows(3)
    q, k, v = (t.requires_grad_() for t in tensors(1, 2, 2, 20, 20, 8, seed=6, dtype=torch.float64))
    out = attention(q, k, v, mask, backend="dense")
    out.sum().backward()
    assert not torch.isnan(q.grad).any() and not torch.isnan(k.grad).any()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = reference(q2, k2, v2, mask.to_dense(20), 1 / math.sqrt(8))
    ref.sum().backward()
    assert torch.allclose(q.grad, q2.grad, atol=1e-10) and torch.allclose(v.grad, v2.grad, atol=1e-10)


def test_flex_backend_matches_float64():
    # One tiny shape: FlexAttention compiles per shape (tens of seconds on CPU).
    mask = am.causal & am.sliding(40) - am.rows(3, 5)
    q, k, v = tensors(1, 2, 1, 128, 128, 16, seed=7)
    ref, _ = reference(q, k, v, mask.to_dense(128), 0.25)
    out = attention(q, k, v, mask, scale=0.25, enable_gqa=True, backend="flex")
    assert scaled_error(out, ref, output_unit(v)) < 1e-5
    assert torch.equal(out[:, :, 3:5], torch.zeros_like(out[:, :, 3:5]))


def test_flex_backend_per_head_and_per_batch_masks_match_float64():
    # Per-head mixes on FlexAttention (the GPU path): one BlockMask with per-(batch, head)
    # tables and a mask_mod that keeps the mask of the head asking.
    heads = [am.causal & am.sliding(20), am.causal & am.document(50, 78), am.dilated(8, 3), am.causal & am.sliding(20)]
    q, k, v = tensors(2, 4, 2, 128, 128, 16, seed=8)
    allowed = torch.stack([m.to_dense(128) for m in heads])[None]            # [1, H, L, L]
    ref, _ = reference(q, k, v, allowed, 0.25)
    out = attention(q, k, v, heads, scale=0.25, enable_gqa=True, backend="flex")
    assert scaled_error(out, ref, output_unit(v)) < 1e-5
    rows = [am.causal & am.document(30, 98), am.causal - am.rows(10, 20)]
    allowed = torch.stack([m.to_dense(128) for m in rows])[:, None]          # [B, 1, L, L]
    ref, _ = reference(q, k, v, allowed, 0.25)
    out = attention(q, k, v, per_batch(rows), scale=0.25, enable_gqa=True, backend="flex")
    assert scaled_error(out, ref, output_unit(v)) < 1e-5
    assert torch.equal(out[1, :, 10:20], torch.zeros_like(out[1, :, 10:20]))


# -- errors --------------------------------------------------------------------------------------


def test_error_messages_name_tensors_and_fixes():
    q, k, v = tensors(1, 4, 2, 16, 16, 8, seed=0)
    with pytest.raises(am.MaskError, match=r"q must be 4-D \[B, H, L, D\], got shape \[4, 16, 8\]"):
        attention(q[0], k, v, am.causal)
    with pytest.raises(am.MaskError, match="enable_gqa=True"):
        attention(q, k, v, am.causal)
    with pytest.raises(am.MaskError, match="multiple"):
        attention(q[:, :3], k, v, am.causal, enable_gqa=True)
    with pytest.raises(am.MaskError, match=r"share one dtype, got q torch.float32, k torch.bfloat16"):
        attention(q, k.bfloat16(), v, am.causal, enable_gqa=True)
    with pytest.raises(am.MaskError, match="float16, bfloat16, float32 or float64"):
        attention(q.int(), k.int(), v.int(), am.causal, enable_gqa=True)
    with pytest.raises(am.MaskError, match="one device"):
        attention(q, k.to("meta"), v, am.causal, enable_gqa=True)
    with pytest.raises(am.MaskError, match=r"same head dim D, got q \[1, 4, 16, 8\] and k \[1, 2, 16, 4\]"):
        attention(q, k[..., :4], v[..., :4], am.causal, enable_gqa=True)
    with pytest.raises(am.MaskError, match=r"k and v must have the same shape"):
        attention(q, k, v[:, :, :5], am.causal, enable_gqa=True)
    with pytest.raises(am.MaskError, match="unknown backend 'fast'"):
        attention(q, k, v, am.causal, enable_gqa=True, backend="fast")
    with pytest.raises(am.MaskError, match=r"recompile with mask.compile\(16, 16"):
        attention(q, k, v, am.causal.compile(32), enable_gqa=True)
    with pytest.raises(am.MaskError, match="list of 3 masks but q has 4 heads.*per_batch"):
        attention(q, k, v, [am.causal] * 3, enable_gqa=True)
    with pytest.raises(am.MaskError, match="per_batch holds 2 entries but q has batch size 1"):
        attention(q, k, v, per_batch([am.causal, am.causal]), enable_gqa=True)
    with pytest.raises(am.MaskError, match="must be a Mask"):
        attention(q, k, v, "causal", enable_gqa=True)
    with pytest.raises(am.MaskError, match="per_batch needs a list"):
        per_batch(am.causal)


def test_backend_that_cannot_run_says_why():
    q, k, v = tensors(1, 2, 2, 16, 16, 8, seed=0)
    with pytest.raises(am.MaskError) as info:
        attention(q, k, v, [am.causal, am.full], backend="flex")
    # exactly the reasons that hold, and no other (a mutant that added a false one survived)
    assert str(info.value) == ("backend 'flex' cannot run these inputs: needs a power-of-two head dim >= 16, "
                               "got D=8; backends that can: blocksparse, dense")
    # FlexAttention on CPU has no backward and returns no lse: refused up front, with the reason
    # (a mutation that let it try survived the suite: torch's own error came instead)
    qg = q.clone().requires_grad_()
    with pytest.raises(am.MaskError, match="no backward pass on CPU"):
        attention(qg, k, v, am.causal, backend="flex")
    with pytest.raises(am.MaskError, match="cannot return the lse on CPU"):
        attention(q, k, v, am.causal, backend="flex", return_lse=True)
    big = torch.zeros(1, 1, 1, 8).expand(1, 1, 70000, 8)
    # the bound it names is the documented one: 2^28 cells, 1 GiB of float32 scores
    with pytest.raises(am.MaskError, match="score matrix .* over 268,435,456"):
        attention(big, big, big, am.causal, backend="dense")


def test_gradients_without_backward_module_raise(monkeypatch):
    # No silent fallback: if the blocksparse backward cannot be imported, say so.
    monkeypatch.setitem(sys.modules, "attnmask.engines.autograd", None)
    q, k, v = tensors(1, 1, 1, 8, 8, 4, seed=0)
    q.requires_grad_()
    with pytest.raises(am.MaskError, match="backward is unavailable"):
        attention(q, k, v, am.causal)
    with torch.no_grad():
        assert attention(q, k, v, am.causal).shape == q.shape


def test_chunked_batched_calls_give_the_same_bits(monkeypatch):
    # Batched calls are split to bound temporaries; splitting must not change a single bit.
    import attnmask.engines.costs as costs
    mask = am.causal & (am.sliding(60) | am.sink(3))
    q, k, v = tensors(1, 2, 2, 600, 600, 16, seed=12)
    whole = attention(q, k, v, mask, block_size=32)
    monkeypatch.setattr(costs, "CHUNK_BYTES", 1)
    am.clear_cache()
    split = attention(q, k, v, mask, block_size=32)
    assert torch.equal(whole, split)


def test_key_ranges_moving_left_down_the_rows():
    # Equal-shaped key ranges whose start moves left as the query blocks go down
    # cannot share one strided view (negative stride); each runs on its own.
    m = ((am.rows(0, 64) & am.cols(300, 364)) | (am.rows(64, 128) & am.cols(100, 164))
         | (am.rows(128, 192) & am.cols(0, 64)))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 192, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 400, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 400, 8, generator=g, dtype=torch.float64)
    ref, _ = reference(q, k, v, m.to_dense(192, 400, q_offset=0), 8 ** -0.5)
    out = am.attention(q.float(), k.float(), v.float(), m, q_offset=0, block_size=64)
    assert scaled_error(out, ref, output_unit(v)) < 1e-5

"""The fused CPU kernel (csrc/attend.c, ``engines._attend``), held to the tests' own float64 attention.

The block-sparse engine runs every plan through the kernel when ``fused.usable(dtype, D)``;
these tests make sure it does, and that what it returns is exact: float32 out and lse within
1e-5 of float64 attention from ``Mask.to_dense`` (``numerics.reference``), bfloat16 within the
dtype's own rounding, the same bits on every run and thread count, and the backward (ATen's,
fed the kernel's out / lse) still exact. Everything but the build guard is skipped where the
kernel cannot run (no AVX-512, or ``ATTNMASK_KERNEL=0``); the build guard makes a broken build
turn the suite red instead of silently running the ATen path.

Which plausible kernel bugs each test catches: benchmarks/results/kernel_mutations.md
(tools/kernel_mutations.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask.engines import attention, fused
from attnmask.engines.blocksparse import blocksparse_forward
from numerics import gradient_units, one_thread, output_unit, reference, scaled_error
from strategies import build, engine_problems, masks, resolved, shapes

#: float32 against float64, scaled to the inputs.
FP32_TOL = 1e-5

kernel = pytest.mark.skipif(not fused.usable(torch.float32, 16),
                            reason=f"kernel not usable: {fused.status()['reason']}")
kernel_bf16 = pytest.mark.skipif(not fused.usable(torch.bfloat16, 16),
                                 reason=f"bf16 kernel not usable: {fused.status()['reason']}")


@contextlib.contextmanager
def kernel_calls():
    """The engine's calls of the kernel (fused.run_items) meanwhile, as (dtype, D); the kernel still runs."""
    seen, run = [], fused.run_items

    def counted(items, q, *args):
        seen.append((q.dtype, q.shape[-1]))
        return run(items, q, *args)
    fused.run_items = counted
    try:
        yield seen
    finally:
        fused.run_items = run


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _qkv(B, H, Hkv, Lq, Lk, D, seed, dtype=torch.float32):
    return (_randn((B, H, Lq, D), seed, dtype), _randn((B, Hkv, Lk, D), seed + 1, dtype),
            _randn((B, Hkv, Lk, D), seed + 2, dtype))


def _forward(q, k, v, mask, *, scale, q_offset=None, block_size=64, out_dtype=None):
    """The engine's forward (no dispatch: short calls would not reach the kernel); ``mask`` or a list per head."""
    B, H, Lq, _ = q.shape
    heads = mask if isinstance(mask, list) else [mask]
    layouts = [m.compile(Lq, k.shape[2], q_offset=q_offset, block_size=block_size) for m in heads]
    head_layout = (torch.arange(H) if isinstance(mask, list) else torch.zeros(H, dtype=torch.int64)).expand(B, H)
    return blocksparse_forward(q, k, v, layouts, head_layout, scale, out_dtype=out_dtype)


def _allowed(mask, Lq, Lk, q_offset):
    if isinstance(mask, list):
        return torch.stack([m.to_dense(Lq, Lk, q_offset=q_offset) for m in mask])[None]
    return mask.to_dense(Lq, Lk, q_offset=q_offset)


def _check(out, lse, ref, ref_lse, v, tol=FP32_TOL):
    """out and lse against float64; rows with no key exact zeros and -inf."""
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = scaled_error(out, ref, output_unit(v))
    assert err < tol, f"output error {err:.2e}"
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live), "rows with a key must have a finite lse, the others -inf"
    assert bool((lse[~live] == float("-inf")).all())
    if live.any():
        err = scaled_error(lse[live], ref_lse[live], 1.0)
        assert err < tol, f"lse error {err:.2e}"
    dead = out[~live]
    assert torch.equal(dead, torch.zeros_like(dead)), "rows with no key must be exact zeros"


def _check_kernel(q, k, v, mask, *, scale=None, q_offset=None, block_size=64):
    """The engine's forward against float64, having run the kernel."""
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=scale, q_offset=q_offset, block_size=block_size)
    assert calls, "the kernel was not called"
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    ref, ref_lse = reference(q, k, v, _allowed(mask, Lq, Lk, q_offset), scale)
    _check(out, lse, ref, ref_lse, v)
    return out, lse


# -- float32 against float64 ------------------------------------------------------------------------

SPREAD = [
    # (expression, Lq, Lk, q_offset, block)
    ("causal", 300, None, None, 64),                       # one top-left causal item: the 16-row lane shift
    ("causal", 97, 97, None, 16),
    ("causal & sliding(5)", 300, None, None, 32),          # narrow window
    ("causal & sliding(200)", 300, None, None, 64),        # wide window, not a multiple of 16
    ("sliding(37)", 173, None, None, 32),
    ("band(21, 9)", 150, None, None, (16, 32)),
    ("causal & (sliding(40) | sink(4))", 300, None, None, 64),   # gathered keys in front of a window
    ("causal & (sliding(24) | sink(70))", 200, None, None, 32),
    ("(causal & sliding(30)) | cols(100, 117)", 250, None, None, 32),
    ("(causal & sliding(30)) | cols(3, 200, 7)", 250, None, None, 64),  # a strided key set
    ("cols(0, 40, 3) | cols(150, 151)", 130, 190, None, 32),            # key sets only
    ("causal & document(70, 130, 100)", 300, None, None, 64),           # documents as a plan
    ("causal & document(17, 5, 60)", 113, None, None, 16),              # past the documents: no key
    ("causal & document(300, 211)", 600, None, None, 64),               # causal items per segment, rows left
    ("document(40, 90, 50)", 180, None, None, 32),                      # documents, not causal
    ("prefix_lm(50)", 211, None, None, 64),
    ("chunked(48)", 200, None, None, 32),
    ("causal & chunked(37)", 200, None, None, 64),
    ("dilated(20, 3)", 250, None, None, 32),                            # strided views of q, k, v
    ("causal & dilated(9, 4)", 161, None, None, 16),
    ("causal - (rows(36, 64, 8) - diagonal)", 120, None, None, 16),     # the signature
    ("full", 100, 257, 30, 64),
    ("full", 33, 17, None, 16),
    ("causal", 100, 257, None, 64),                                     # a bottom-right causal chunk
    ("causal & sliding(50)", 70, 200, 90, 32),
    ("none", 50, None, None, 16),
    ("causal - rows(40, 70)", 150, None, None, 32),                     # dead rows inside live groups
    ("(causal & (sliding(8) | sink(2))) - rows(20, 100, 3)", 130, None, None, 16),
    ("(causal & (sliding(100) | ~sliding(400))) - rows(480, 560, 7)", 600, None, None, (16, 32)),
]


@kernel
@pytest.mark.parametrize("expr,Lq,Lk,q_offset,block", SPREAD)
def test_float32_masks_match_float64(expr, Lq, Lk, q_offset, block):
    mask = am.parse(expr)
    Lk = Lq if Lk is None else Lk
    q, k, v = _qkv(2, 2, 2, Lq, Lk, 32, seed=Lq + Lk)
    if expr == "none":
        out, lse = _forward(q, k, v, mask, scale=0.2, block_size=block)
        assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
        return
    _check_kernel(q, k, v, mask, scale=0.2, q_offset=q_offset, block_size=block)


@kernel
@pytest.mark.parametrize("D", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("expr", ["causal", "causal & (sliding(45) | sink(3)) | cols(90, 99)"])
def test_float32_head_dims(D, expr):
    q, k, v = _qkv(1, 2, 1, 131, 131, D, seed=D)
    _check_kernel(q, k, v, am.parse(expr), block_size=32)


@kernel
@pytest.mark.parametrize("L", [1, 15, 16, 17, 63, 64, 65, 129])
def test_float32_lengths_off_the_kernel_grid(L):
    # Groups of 16 rows, pieces of 16 keys (narrow ones of <= 8), softmax steps of 4 pieces: each with
    # a short last one.
    for expr in ("causal", "causal & (sliding(20) | sink(1))", "full"):
        q, k, v = _qkv(1, 1, 1, L, L + 3, 16, seed=L)
        _check_kernel(q, k, v, am.parse(expr), block_size=16)


@kernel
def test_float32_batches_gqa_and_per_head_lists():
    heads = [am.causal, am.causal & am.sliding(7), am.document(30, 40, 30) & am.causal,
             am.sink(2) | am.diagonal, am.causal & am.dilated(5, 3), am.prefix_lm(19)]
    q, k, v = _qkv(2, 6, 3, 100, 100, 32, seed=5)
    _check_kernel(q, k, v, heads, block_size=32)
    _check_kernel(q, k, v, am.causal & (am.sliding(33) | am.sink(4)), block_size=32)


@kernel
def test_float32_non_contiguous_inputs_as_models_pass_them():
    # [B, L, H, D] projections viewed as [B, H, L, D]: rows strided by H * D, heads by D.
    B, L, H, Hkv, D = 2, 150, 4, 2, 32
    q = _randn((B, L, H, D), 1).transpose(1, 2)
    k = _randn((B, L, Hkv, D), 2).transpose(1, 2)
    v = _randn((B, L, Hkv, D), 3).transpose(1, 2)
    assert not q.is_contiguous() and k.stride(2) == Hkv * D
    for expr in ("causal", "causal & (sliding(30) | sink(5))", "causal & document(40, 60, 50)",
                 "cols(0, 150, 9) | diagonal", "dilated(10, 2)"):
        mask = am.parse(expr)
        with kernel_calls() as calls:
            out, lse = attention(q, k, v, mask, scale=0.2, enable_gqa=True, return_lse=True, block_size=32)
        assert calls, expr
        ref, ref_lse = reference(q, k, v, mask.to_dense(L), 0.2)
        _check(out, lse, ref, ref_lse, v)


# -- bfloat16: within the dtype's own rounding ------------------------------------------------------

@kernel_bf16
@pytest.mark.parametrize("expr,L,block", [
    ("causal", 300, 64),
    ("causal & (sliding(100) | sink(4))", 300, 64),
    ("causal & document(70, 200, 30)", 300, 64),
    ("dilated(20, 3) | diagonal", 300, 32),
    ("(causal & document(100, 200, 300)) | sink(8) | cols(400, 420)", 600, 16),
])
def test_bfloat16_within_the_dtypes_rounding(expr, L, block):
    # The stick: the float64 result rounded to bf16 (the best any kernel can return); and ATen's
    # bf16 SDPA on the dense mask, the kernel the engine runs without ours.
    mask = am.parse(expr)
    q, k, v = _qkv(1, 4, 4, L, L, 64, seed=11, dtype=torch.bfloat16)
    allowed = mask.to_dense(L)
    ref, ref_lse = reference(q, k, v, allowed, 0.125)
    unit = output_unit(v)
    stick = scaled_error(ref.to(torch.bfloat16), ref, unit)
    with one_thread():
        aten = scaled_error(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.125), ref, unit)
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=0.125, block_size=block)
    assert calls and calls[0][0] == torch.bfloat16
    assert out.dtype == torch.bfloat16
    err = scaled_error(out, ref, unit)
    assert err <= 2 * stick and err <= 1.5 * aten, (err, stick, aten)
    # The scores are exact bf16 products summed in float32: the lse is float32-exact.
    assert scaled_error(lse, ref_lse, 1.0) < FP32_TOL
    # The float32 output the autograd forward keeps: closer than the stick itself (measured 0.36-0.60x),
    # and unbiased: the probabilities are rounded to nearest for P @ V, not truncated. The gain of
    # out32 on the reference measured |gain - 1| <= 4.3e-5; truncating them gave 1.05e-3 to 1.86e-3
    # (and 0.70-1.10x the stick: max errors barely see a bias).
    out32, _ = _forward(q, k, v, mask, scale=0.125, block_size=block, out_dtype=torch.float32)
    assert scaled_error(out32, ref, unit) <= stick
    gain = float((out32.double() * ref).sum() / (ref * ref).sum())
    assert abs(gain - 1) < 2e-4, f"output biased by {gain - 1:+.2e}"


@kernel_bf16
@pytest.mark.parametrize("D", [16, 32, 128, 256])
@pytest.mark.parametrize("L", [17, 65, 129])
def test_bfloat16_head_dims_and_lengths(D, L):
    # Odd key counts (the last bf16 pair of keys has one), short pieces and tiles, gathered keys,
    # GQA and rows strided as models pass them. Measured: <= 1.7x the stick.
    mask = am.causal & (am.sliding(20) | am.sink(3)) | am.cols(50, 53)
    B, H, Hkv, Lk = 1, 2, 1, L + 5
    q = _randn((B, L, H, D), D + L, torch.bfloat16).transpose(1, 2)
    k = _randn((B, Lk, Hkv, D), D + L + 1, torch.bfloat16).transpose(1, 2)
    v = _randn((B, Lk, Hkv, D), D + L + 2, torch.bfloat16).transpose(1, 2)
    allowed = mask.to_dense(L, Lk)
    ref, ref_lse = reference(q, k, v, allowed, D ** -0.5)
    unit = output_unit(v)
    stick = scaled_error(ref.to(torch.bfloat16), ref, unit)
    with kernel_calls() as calls:
        out, lse = attention(q, k, v, mask, scale=D ** -0.5, enable_gqa=True, return_lse=True, block_size=32)
    assert calls
    err = scaled_error(out, ref, unit)
    assert err <= 2 * stick, (err, stick)
    assert scaled_error(lse, ref_lse, 1.0) < FP32_TOL


# -- random problems ------------------------------------------------------------------------------

@kernel
@given(engine_problems(long_share=0), st.sampled_from([16, 32]))
def test_random_engine_problems_match_float64(problem, D):
    # Several query blocks, windows with sinks and key columns, documents, row cuts, GQA, B = 2.
    p = problem
    mask = build(p["spec"])
    q, k, v = _qkv(p["B"], p["H"], p["Hkv"], p["Lq"], p["Lk"], D, p["seed"])
    allowed = mask.to_dense(p["Lq"], p["Lk"], q_offset=p["q_offset"])
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=0.3, q_offset=p["q_offset"], block_size=p["block"])
    assert calls or not allowed.any()
    ref, ref_lse = reference(q, k, v, allowed, 0.3)
    _check(out, lse, ref, ref_lse, v)


@kernel
@given(masks(max_leaves=5), shapes(max_len=70, max_offset=40), st.sampled_from([16, (16, 32), 32]),
       st.integers(0, 2**16))
def test_random_language_masks_match_float64(mask, shape, block, seed):
    # Any expression of the language, square or not, any offset (negative too).
    Lq, Lk, q_offset = resolved(shape)
    q, k, v = _qkv(1, 2, 1, Lq, Lk, 16, seed)
    allowed = mask.to_dense(Lq, Lk, q_offset=q_offset)
    with kernel_calls() as calls:
        out, lse = _forward(q, k, v, mask, scale=0.5, q_offset=shape[2], block_size=block)
    assert calls or not allowed.any()
    ref, ref_lse = reference(q, k, v, allowed, 0.5)
    _check(out, lse, ref, ref_lse, v)


# -- determinism ----------------------------------------------------------------------------------

class _Splits:
    """Stands in for the extension module, recording each call's batch-head range [z0, z1)."""

    def __init__(self, module):
        self.module, self.ranges = module, []
        self.COLUMNS, self.supports = module.COLUMNS, module.supports

    def run(self, *args):
        self.ranges.append(args[-2:])
        return self.module.run(*args)


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_on_every_run_and_thread_count(dtype, monkeypatch):
    if not fused.usable(dtype, 64):
        pytest.skip(fused.status()["reason"])
    mask = am.causal & (am.sliding(150) | am.sink(4)) | am.cols(300, 310)
    q, k, v = _qkv(2, 4, 2, 512, 512, 64, seed=3, dtype=dtype)
    splits = _Splits(fused._attend)
    monkeypatch.setattr(fused, "_attend", splits)
    before = torch.get_num_threads()
    results, ranges = [], []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            splits.ranges = []
            results.append(_forward(q, k, v, mask, scale=0.125))
            ranges.append(sorted(splits.ranges))
    finally:
        torch.set_num_threads(before)
    assert ranges[0] == [(0, 8)] and len(ranges[1]) == 2, f"1 thread runs the 8 batch-heads, 2 split them: {ranges}"
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@kernel
def test_per_head_list_gives_each_heads_bits_alone():
    # A batch-head's bits depend only on its own plan and inputs: not on the heads beside it, on a
    # run of heads sharing a kv head (k, v broadcast with stride 0), or on the batch-heads' split.
    # Mutation caught: the kernel refused for stride-0 k / v (the run of heads fell back to ATen).
    w7, docs = am.causal & am.sliding(7), am.document(30, 40, 30) & am.causal
    heads = [am.causal, am.causal, w7, w7, docs, am.sink(2) | am.diagonal, am.causal & am.dilated(5, 3),
             am.causal & (am.sliding(40) | am.sink(3))]
    q, k, v = _qkv(2, 8, 2, 100, 100, 32, seed=8)
    with kernel_calls() as calls:
        out, lse = attention(q, k, v, heads, scale=0.2, enable_gqa=True, return_lse=True, block_size=32)
    assert calls
    for h, m in enumerate(heads):
        j = h // 4
        o1, l1 = _forward(q[:, h:h + 1], k[:, j:j + 1], v[:, j:j + 1], m, scale=0.2, block_size=32)
        assert torch.equal(out[:, h:h + 1], o1) and torch.equal(lse[:, h:h + 1], l1), f"head {h}: {m}"


# -- the kernel is what runs ------------------------------------------------------------------------

@kernel
def test_the_engine_runs_the_kernel_unless_disabled(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 100, 100, 32, seed=1)
    for expr in ("causal", "causal & document(50, 50)", "causal & (sliding(20) | sink(2))", "dilated(8, 2)"):
        with kernel_calls() as calls:
            _forward(q, k, v, am.parse(expr), scale=0.2)
        assert calls, expr
    monkeypatch.setenv("ATTNMASK_KERNEL", "0")
    assert not fused.usable(torch.float32, 32)
    s = fused.status()
    assert not s["enabled"] and not s["float32"] and "ATTNMASK_KERNEL=0" in s["reason"]
    for expr in ("causal", "causal & document(50, 50)", "causal & (sliding(20) | sink(2))"):
        mask = am.parse(expr)
        with kernel_calls() as calls:
            out, lse = _forward(q, k, v, mask, scale=0.2)
        assert not calls, expr
        ref, ref_lse = reference(q, k, v, mask.to_dense(100), 0.2)
        _check(out, lse, ref, ref_lse, v)


@kernel
def test_head_dims_and_dtypes_the_kernel_does_not_take():
    for dtype, D in ((torch.float32, 8), (torch.float32, 24), (torch.float32, 272), (torch.float16, 32),
                     (torch.float64, 32)):
        assert not fused.usable(dtype, D)
        q, k, v = _qkv(1, 1, 1, 40, 40, D, seed=D, dtype=dtype)
        with kernel_calls() as calls:
            _forward(q, k, v, am.causal & am.sliding(9), scale=0.3, block_size=16)
        assert not calls, (dtype, D)


def test_status_says_why_not(monkeypatch):
    monkeypatch.delenv("ATTNMASK_KERNEL", raising=False)
    monkeypatch.setattr(fused, "_attend", None)
    monkeypatch.setattr(fused, "_IMPORT_ERROR", "No module named 'attnmask.engines._attend'")
    s = fused.status()
    assert not s["built"] and not s["float32"] and not s["bfloat16"]
    assert "not built" in s["reason"] and "pip install -e ." in s["reason"]
    assert not fused.usable(torch.float32, 64)

    class NoAvx512:
        COLUMNS = 9

        @staticmethod
        def supports(bf16):
            return False
    monkeypatch.setattr(fused, "_attend", NoAvx512)
    s = fused.status()
    assert s["built"] and not s["float32"] and "no AVX-512" in s["reason"]

    class NoBf16(NoAvx512):
        @staticmethod
        def supports(bf16):
            return not bf16
    monkeypatch.setattr(fused, "_attend", NoBf16)
    s = fused.status()
    assert s["float32"] and not s["bfloat16"] and "AVX512-BF16" in s["reason"]
    assert fused.usable(torch.float32, 64) and not fused.usable(torch.bfloat16, 64)


@kernel
def test_the_extension_refuses_bad_head_dims():
    q, k, v = _qkv(1, 1, 1, 32, 32, 24, seed=0)
    out, lse = torch.zeros(q.shape), torch.full(q.shape[:3], float("-inf"))
    items = fused.causal_items(((0, 32),))
    with pytest.raises(ValueError, match="head dim must be a multiple of 16 up to 256, got 24"):
        fused.run_items(items, q, k, v, 0.2, out, lse)
    assert torch.equal(out, torch.zeros(q.shape)), "nothing may be written before the refusal"
    args = [0] * 5 + [1, (0,) * 15]
    for D in (0, 8, 40, 272):
        with pytest.raises(ValueError, match=f"head dim must be a multiple of 16 up to 256, got {D}"):
            fused._attend.run(*args, D, False, 1.0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="Y must be >= 1"):
        fused._attend.run(*[0] * 5, 0, (0,) * 15, 16, False, 1.0, 0, 0, 0, 0, 0, 0)


# -- the backward, fed the kernel's forward ---------------------------------------------------------

@kernel
@pytest.mark.parametrize("expr,L,block", [
    ("causal", 150, 64),
    ("causal & (sliding(40) | sink(3)) | cols(100, 105)", 200, 32),
    ("(causal & document(60, 70, 50)) - rows(20, 40)", 180, 32),
])
def test_float32_gradients_match_float64(expr, L, block):
    mask = am.parse(expr)
    B, H, Hkv, D = 1, 4, 2, 32
    q, k, v = _qkv(B, H, Hkv, L, L, D, seed=L)
    w_out, w_lse = _randn((B, H, L, D), 7, torch.float64), _randn((B, H, L), 8, torch.float64)
    allowed = mask.to_dense(L)
    scale = D ** -0.5

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out, lse = fn(*leaves)
        loss = (out.double() * w_out).sum() + (lse.double().masked_fill(torch.isneginf(lse), 0.0) * w_lse).sum()
        return torch.autograd.grad(loss, leaves)
    with kernel_calls() as calls:
        got = grads(lambda *t: attention(*t, mask, scale=scale, enable_gqa=True, return_lse=True,
                                         block_size=block), q, k, v)
    assert calls, "the forward must run the kernel"
    with one_thread():
        want = grads(lambda *t: reference(*t, allowed, scale), q.double(), k.double(), v.double())
    for name, a, r, unit in zip(("dq", "dk", "dv"), got, want, gradient_units(q, k, v, w_out, scale, dlse=w_lse)):
        assert a.dtype == torch.float32 and not torch.isnan(a).any(), name
        err = scaled_error(a, r, unit)
        assert err < FP32_TOL, f"{name}: error {err:.2e}"


# -- the build ------------------------------------------------------------------------------------

def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_the_install_built_the_kernel():
    """The README's install (``pip install -e .``, CI's .ci/run) builds the kernel: a broken build is red here."""
    s = fused.status()
    assert s["built"], s["reason"]
    flags = _cpu_flags()
    if s["enabled"] and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        assert s["float32"] and fused.usable(torch.float32, 64), s["reason"]
        if "avx512_bf16" in flags:
            assert s["bfloat16"] and fused.usable(torch.bfloat16, 64), s["reason"]

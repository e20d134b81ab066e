"""Masks as values and their exact dense semantics, held to PRODUCT.md's table.

The oracle is ``strategies.naive``: the table written with Python ints, one
(q, k) pair at a time, never ``Mask.evaluate``. Covered here: every primitive
over many parameters and shapes (lengths 1, non-square, default and explicit
q_offset, negative default offsets, document padding, rows/cols defaults), the
dense algebra of the operators, ``mask_mod`` (broadcast, vmap,
create_block_mask), ``from_mask_mod``, the dense size guard and its memory,
parameter validation messages, and masks as immutable hashable values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from strategies import (MAX_PARAM, MOD_LEAVES, PRIMITIVES, build, mask_specs, masks, naive_dense,
                        primitive_specs, resolved, shapes)

# ---------------------------------------------------------------------------
# every primitive against the naive table evaluator
# ---------------------------------------------------------------------------

# (q_len, kv_len, q_offset): None means "use the default".
SHAPES = [
    (1, None, None), (1, 1, 0), (1, 6, None), (6, 1, None),   # lengths of 1
    (7, None, None), (6, 13, None), (13, 6, None),            # square; kv > q; q > kv (default offset -7)
    (9, 9, -3), (8, 12, 4), (5, 5, 20), (4, 11, 0), (11, 4, 9),
]

PARAMS = {
    "full": [()], "none": [()], "causal": [()], "diagonal": [()],
    "band": [(0, 0), (0, 1), (1, 0), (2, 3), (5, 0), (0, 5), (12, 12), (MAX_PARAM, 0), (0, MAX_PARAM)],
    "sliding": [(1,), (2,), (3,), (7,), (13,), (100,), (MAX_PARAM,)],
    "sink": [(0,), (1,), (2,), (5,), (13,), (MAX_PARAM,)],
    "prefix_lm": [(0,), (1,), (3,), (6,), (20,), (MAX_PARAM,)],
    "chunked": [(1,), (2,), (3,), (4,), (7,), (50,), (MAX_PARAM,)],
    "dilated": [(1, 1), (2, 1), (1, 3), (3, 2), (2, 4), (4, 3), (20, 1), (MAX_PARAM, MAX_PARAM)],
    "strided": [(1,), (2,), (3,), (5,), (13,), (MAX_PARAM,)],
    "document": [(1,), (3,), (2, 3), (1, 1, 1), (4, 2, 1), (5, 5, 5), (2, 3, 1, 2, 1, 3), (100,)],
    "rows": [(0,), (3,), (12,), (40,), (0, 0), (2, 5), (1, 9, 2), (0, 13, 3), (3, 4, 5), (5, 5, 2), (0, 100, 7)],
    "cols": [(0,), (3,), (12,), (40,), (0, 0), (2, 5), (1, 9, 2), (0, 13, 3), (3, 4, 5), (5, 5, 2), (0, 100, 7)],
    "window2d": [(1, 1, 1, 1), (4, 3, 3, 1), (3, 4, 1, 3), (5, 2, 3, 1), (2, 5, 1, 5), (4, 4, 3, 3), (7, 1, 7, 1),
                 (1, 13, 1, 13), (3, 3, 3, 3)],
}


def test_param_table_covers_every_primitive():
    assert set(PARAMS) == set(PRIMITIVES) == set(am.primitives.names())


@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitive_matches_table(name):
    bad = []
    for args in PARAMS[name]:
        spec = ("prim", name, args)
        mask = build(spec)
        for q_len, kv_len, q_offset in SHAPES:
            got = mask.to_dense(q_len, kv_len, q_offset=q_offset)
            want = naive_dense(spec, q_len, kv_len, q_offset)
            if got.dtype != torch.bool or not torch.equal(got, want):
                bad.append(f"{mask} at shape {(q_len, kv_len, q_offset)}")
    assert not bad, "to_dense differs from the PRODUCT.md table for: " + "; ".join(bad[:10])


@given(primitive_specs(), shapes())
def test_random_primitive_matches_table(spec, shape):
    got = build(spec).to_dense(shape[0], shape[1], q_offset=shape[2])
    assert torch.equal(got, naive_dense(spec, *shape))


@given(mask_specs(mask_mods=True), shapes(max_len=16))
def test_random_composite_matches_table(spec, shape):
    got = build(spec).to_dense(shape[0], shape[1], q_offset=shape[2])
    assert torch.equal(got, naive_dense(spec, *shape))


def _rows(*bits: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in b] for b in bits], dtype=torch.bool)


def test_document_padding_attends_nothing():
    # Segments [0, 2) and [2, 5); positions 5 and 6 are padding.
    expect = _rows("1100000", "1100000", "0011100", "0011100", "0011100", "0000000", "0000000")
    assert torch.equal(am.document(2, 3).to_dense(7), expect)
    assert torch.equal(am.document([2, 3]).to_dense(7), expect)


def test_rows_cols_defaults():
    assert torch.equal(am.rows(3).to_dense(5), _rows("00000", "00000", "00000", "11111", "00000"))
    assert torch.equal(am.rows(1, 5, 2).to_dense(6),
                       _rows("000000", "111111", "000000", "111111", "000000", "000000"))
    assert torch.equal(am.cols(2).to_dense(3, 4), _rows("0010", "0010", "0010"))
    assert torch.equal(am.cols(0, 4, 3).to_dense(2, 5), _rows("10010", "10010"))
    assert not am.rows(4, 4).to_dense(8).any()   # a == b: empty range


def test_default_q_offset_is_kv_len_minus_q_len():
    # Queries are the last positions; with q_len > kv_len they start before 0.
    assert torch.equal(am.sliding(2).to_dense(2, 4), _rows("0110", "0011"))
    assert torch.equal(am.causal.to_dense(4, 2), _rows("00", "00", "10", "11"))
    assert torch.equal(am.causal.to_dense(3, 5, q_offset=0), _rows("10000", "11000", "11100"))


@given(masks(), shapes())
def test_default_offset_equals_explicit(mask, shape):
    q_len, kv_len, q_offset = resolved(shape)
    assert torch.equal(mask.to_dense(q_len, shape[1]), mask.to_dense(q_len, kv_len, q_offset=kv_len - q_len))


def test_to_dense_dtype_and_shape():
    out = (am.causal & am.sliding(3)).to_dense(5, 9)
    assert out.dtype == torch.bool and out.shape == (5, 9)
    assert am.full.to_dense(1).shape == (1, 1)


def test_to_dense_rejects_bad_lengths():
    for args, kwargs in [((0,), {}), ((3, 0), {}), ((-1,), {}), ((2.0,), {}), ((True,), {}),
                         ((3,), {"q_offset": 1.5})]:
        with pytest.raises(am.MaskValueError):
            am.causal.to_dense(*args, **kwargs)


# ---------------------------------------------------------------------------
# dense algebra of the operators
# ---------------------------------------------------------------------------

def _dense(mask: am.Mask, shape) -> torch.Tensor:
    return mask.to_dense(shape[0], shape[1], q_offset=shape[2])


@given(masks(max_leaves=5, mask_mods=True), masks(max_leaves=5, mask_mods=True), shapes())
def test_composite_is_elementwise_combination(a, b, shape):
    da, db = _dense(a, shape), _dense(b, shape)
    assert torch.equal(_dense(a | b, shape), da | db)
    assert torch.equal(_dense(a & b, shape), da & db)
    assert torch.equal(_dense(a - b, shape), da & ~db)
    assert torch.equal(_dense(~a, shape), ~da)


@given(masks(max_leaves=5), masks(max_leaves=5), shapes())
def test_de_morgan_and_difference(a, b, shape):
    assert torch.equal(_dense(~(a | b), shape), _dense(~a & ~b, shape))
    assert torch.equal(_dense(~(a & b), shape), _dense(~a | ~b, shape))
    assert torch.equal(_dense(a - b, shape), _dense(a & ~b, shape))
    assert torch.equal(_dense(~~a, shape), _dense(a, shape))


@given(masks(max_leaves=4), masks(max_leaves=4), masks(max_leaves=4), shapes())
def test_commutative_idempotent_associative(a, b, c, shape):
    d = functools.partial(_dense, shape=shape)
    assert torch.equal(d(a | b), d(b | a))
    assert torch.equal(d(a & b), d(b & a))
    assert torch.equal(d(a | a), d(a)) and torch.equal(d(a & a), d(a))
    assert torch.equal(d((a | b) | c), d(a | (b | c)))
    assert torch.equal(d((a & b) & c), d(a & (b & c)))
    assert torch.equal(d(a & (b | c)), d((a & b) | (a & c)))   # distributive
    assert not d(a - a).any() and d(a | ~a).all() and not d(a & ~a).any()
    assert torch.equal(d(a | am.none), d(a)) and torch.equal(d(a & am.full), d(a))


# ---------------------------------------------------------------------------
# mask_mod: FlexAttention's predicate
# ---------------------------------------------------------------------------

@given(masks(mask_mods=True), shapes())
def test_mask_mod_agrees_with_to_dense(mask, shape):
    q_len, kv_len, q_offset = resolved(shape)
    if mask.has_mask_mod():
        # a mask_mod leaf reads row indices: positions and rows agree only at q_offset 0
        q_offset = 0
    q_idx = torch.arange(q_offset, q_offset + q_len)[:, None]   # mask_mod takes positions
    kv_idx = torch.arange(kv_len)[None, :]
    b = h = torch.zeros((), dtype=torch.int64)
    out = mask.mask_mod(b, h, q_idx, kv_idx)
    assert out.dtype == torch.bool
    assert torch.equal(torch.broadcast_to(out, (q_len, kv_len)), mask.to_dense(q_len, kv_len, q_offset=q_offset))


def _vmapped(mask_mod):
    # As create_block_mask does: map over kv, then q, then h, then b.
    fn = torch.vmap(mask_mod, in_dims=(None, None, None, 0))
    fn = torch.vmap(fn, in_dims=(None, None, 0, None))
    fn = torch.vmap(fn, in_dims=(None, 0, None, None))
    return torch.vmap(fn, in_dims=(0, None, None, None))


@pytest.mark.parametrize("name", PRIMITIVES)
def test_mask_mod_under_vmap(name):
    mask = build(("prim", name, PARAMS[name][min(3, len(PARAMS[name]) - 1)]))
    n = 11
    out = _vmapped(mask.mask_mod)(torch.arange(2), torch.arange(3), torch.arange(n), torch.arange(n))
    assert out.shape == (2, 3, n, n)
    assert torch.equal(out, mask.to_dense(n, q_offset=0).expand(2, 3, n, n))


@pytest.mark.parametrize("name", PRIMITIVES)
def test_mask_mod_with_int32_indices(name):
    # FlexAttention's compiled kernels index with int32 (Triton's tl.arange), so
    # the predicate must stay exact for int32 positions, even with the largest
    # accepted parameters (no int32 overflow inside).
    n = 24
    q_idx = torch.arange(n, dtype=torch.int32)[:, None]
    kv_idx = torch.arange(n, dtype=torch.int32)[None, :]
    zero = torch.zeros((), dtype=torch.int32)
    bad = []
    for args in PARAMS[name]:
        mask = build(("prim", name, args))
        out = torch.broadcast_to(mask.mask_mod(zero, zero, q_idx, kv_idx), (n, n))
        if not torch.equal(out, mask.to_dense(n, q_offset=0)):
            bad.append(str(mask))
    assert not bad, "mask_mod wrong with int32 indices for: " + ", ".join(bad)


@given(masks(max_leaves=5, mask_mods=True))
def test_composite_mask_mod_under_vmap(mask):
    n = 9
    out = _vmapped(mask.mask_mod)(torch.arange(1), torch.arange(1), torch.arange(n), torch.arange(n))
    assert torch.equal(out[0, 0], mask.to_dense(n, q_offset=0))


@pytest.mark.parametrize("mask", [am.causal & (am.sliding(5) | am.sink(2)), am.document(7, 9, 4),
                                  am.parse(am.SIGNATURE), am.dilated(3, 4) | am.cols(1, 30, 6)],
                         ids=str)
def test_mask_mod_in_create_block_mask(mask):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    n, bs = 40, 8
    block = flex.create_block_mask(mask.mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=bs)
    dense = mask.to_dense(n)
    # A tile is listed iff some cell in it is attended.
    expect = dense.reshape(n // bs, bs, n // bs, bs).any(dim=3).any(dim=1)
    assert torch.equal(block.to_dense()[0, 0].bool(), expect)


# ---------------------------------------------------------------------------
# from_mask_mod
# ---------------------------------------------------------------------------

def test_from_mask_mod_everywhere_a_mask_goes():
    even, even_py = MOD_LEAVES["even_keys"]
    assert str(even) == "<even_keys>"
    combo = am.causal & even | am.diagonal
    assert "<even_keys>" in str(combo)
    want = torch.tensor([[(k <= q and even_py(q, k)) or k == q for k in range(9)] for q in range(9)])
    assert torch.equal(combo.to_dense(9), want)
    assert torch.equal(even.to_dense(5, 8, q_offset=-2),
                       torch.tensor([[even_py(q - 2, k) for k in range(8)] for q in range(5)]))
    with pytest.raises(am.MaskError):
        am.parse(str(even))
    with pytest.raises(am.MaskError):
        am.parse(str(combo))
    assert hash(combo) == hash(am.causal & even | am.diagonal) and combo == (am.causal & even | am.diagonal)


def test_from_mask_mod_name_and_validation():
    def my_pattern(b, h, q, k):
        return k <= q
    assert str(am.from_mask_mod(my_pattern)) == "<my_pattern>"
    assert torch.equal(am.from_mask_mod(my_pattern).to_dense(6), am.causal.to_dense(6))
    with pytest.raises(am.MaskValueError):
        am.from_mask_mod(42, "x")
    with pytest.raises(am.MaskValueError):
        am.from_mask_mod(my_pattern, "")


# ---------------------------------------------------------------------------
# the dense size guard and its memory
# ---------------------------------------------------------------------------

def test_to_dense_guard():
    with pytest.raises(am.DenseTooLargeError) as info:
        am.causal.to_dense(2**15 + 1, 2**15)          # just over 2**30 cells
    err = info.value
    assert isinstance(err, am.MaskError) and isinstance(err, ValueError)
    text = str(err)
    assert "compile(" in text and "analyze(" in text and "limit" in text
    assert "32,769" in text or "32769" in text       # says what it received
    with pytest.raises(am.DenseTooLargeError):
        am.sliding(4).to_dense(10, limit=99)
    assert am.sliding(4).to_dense(10, limit=100).shape == (10, 10)   # limit is inclusive
    with pytest.raises(am.DenseTooLargeError):
        am.full.to_dense(2**20)                        # default limit applies to every mask


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch, attnmask as am
    mask = am.parse(%r)
    mask.to_dense(64)                                  # warm up lazy initialisation
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    out = mask.to_dense(8192)
    peak = status("VmHWM:")
    print(json.dumps({"grew": peak - before, "result": out.numel() * out.element_size(),
                      "sum": int(out.sum())}))
""")


@pytest.mark.parametrize("text", ["causal & (sliding(1000) | sink(4)) - rows(100, 8000, 7)",
                                  "dilated(64, 3) | strided(5) | ~document(3000, 2000)", "full"])
def test_to_dense_peak_memory(text):
    # torch allocations are invisible to tracemalloc: measure the peak RSS of a
    # fresh process (its growth over the RSS just before the call). glibc is
    # told to mmap every block >= 64 KiB so freed temporaries leave RSS at once;
    # otherwise heap retention makes the figure swing by ~70 MB run to run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT % text], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["result"] == 8192 * 8192
    assert res["grew"] < res["result"] + 64 * 2**20, res


# ---------------------------------------------------------------------------
# parameter validation
# ---------------------------------------------------------------------------

# (constructor, the main parts the message must contain: primitive, rule, value)
INVALID = [
    (lambda: am.sliding(0), ["sliding(w) needs w >= 1, got w=0"]),
    (lambda: am.sliding(-5), ["sliding(w) needs w >= 1, got w=-5"]),
    (lambda: am.band(-1, 2), ["band(l, r) needs l >= 0, got l=-1"]),
    (lambda: am.band(2, -1), ["band(l, r) needs r >= 0, got r=-1"]),
    (lambda: am.sink(-1), ["sink(n) needs n >= 0, got n=-1"]),
    (lambda: am.prefix_lm(-3), ["prefix_lm(p) needs p >= 0, got p=-3"]),
    (lambda: am.chunked(0), ["chunked(c) needs c >= 1, got c=0"]),
    (lambda: am.dilated(0, 1), ["dilated(w, d) needs w >= 1, got w=0"]),
    (lambda: am.dilated(2, 0), ["dilated(w, d) needs d >= 1, got d=0"]),
    (lambda: am.strided(0), ["strided(s) needs s >= 1, got s=0"]),
    (lambda: am.document(), ["document(", "at least 1", "got 0"]),
    (lambda: am.document(3, 0), ["document(", ">= 1", "n2=0"]),
    (lambda: am.document(3, 4, -2), ["document(", ">= 1", "n3=-2"]),
    (lambda: am.rows(5, 2), ["rows(", "b >= a", "b=2"]),
    (lambda: am.rows(-1), ["rows(", "a >= 0", "a=-1"]),
    (lambda: am.cols(1, 2, 0), ["cols(", "s >= 1", "s=0"]),
    (lambda: am.cols(4, 3), ["cols(", "b >= a", "b=3"]),
    (lambda: am.sliding(True), ["sliding(", "whole number", "True"]),
    (lambda: am.sliding(2.0), ["sliding(", "whole number", "2.0"]),
    (lambda: am.band(1.5, 2), ["band(", "whole number", "1.5"]),
    (lambda: am.document(3, 2.5), ["document(", "whole number", "2.5"]),
    (lambda: am.rows(1, None, False), ["rows(", "whole number", "False"]),
    (lambda: am.sink("4"), ["sink(", "whole number", "'4'"]),
    (lambda: am.sliding(2**31), ["sliding(", "too large", "2147483648"]),
    (lambda: am.chunked(-2**40), ["chunked(", "-1099511627776"]),
]


@pytest.mark.parametrize("make,parts", INVALID, ids=[p[0] for _, p in INVALID])
def test_invalid_parameters_message(make, parts):
    with pytest.raises(am.MaskValueError) as info:
        make()
    for part in parts:
        assert part in str(info.value), f"{part!r} missing from {str(info.value)!r}"


@pytest.mark.parametrize("make", [lambda: am.sliding(10**5000), lambda: am.band(0, -10**5000),
                                  lambda: am.document(1, 10**4400)], ids=["sliding", "band", "document"])
def test_huge_python_parameters_raise_mask_error(make):
    # Numbers too long for int->str (Python's 4300-digit limit) must still give a MaskValueError.
    with pytest.raises(am.MaskValueError):
        make()


def test_numpy_and_index_ints_are_accepted():
    np = pytest.importorskip("numpy")
    assert am.sliding(np.int64(3)) == am.sliding(3)
    assert am.document(np.int32(2), 3) == am.document(2, 3)


# ---------------------------------------------------------------------------
# masks as values
# ---------------------------------------------------------------------------

def test_masks_are_immutable():
    m = am.causal & am.sliding(4)
    for target, attr in [(am.sliding(4), "args"), (am.sliding(4), "name"), (m, "parts"),
                         (~am.causal, "inner"), (am.causal - am.diagonal, "left"), (m, "brand_new")]:
        with pytest.raises((dataclasses.FrozenInstanceError, AttributeError)):
            setattr(target, attr, None)
    assert str(am.sliding(4)) == "sliding(4)"  # nothing changed


def test_structural_equality_and_hashing():
    assert am.sliding(4) == am.sliding(4) and hash(am.sliding(4)) == hash(am.sliding(4))
    assert am.sliding(4) != am.sliding(5) and am.sliding(4) != am.chunked(4)
    assert am.rows(3) == am.rows(3, 4, 1) == am.rows(3, 4) and hash(am.rows(3)) == hash(am.rows(3, 4, 1))
    assert am.cols(2, 9) == am.cols(2, 9, 1)
    assert am.document(2, 3) != am.document(3, 2)
    m1 = am.causal & (am.sliding(256) | am.sink(4))
    m2 = am.causal & (am.sliding(256) | am.sink(4))
    assert m1 == m2 and hash(m1) == hash(m2)
    assert (am.causal | am.sink(1)) != (am.causal & am.sink(1))
    assert (am.causal - am.diagonal) != (am.diagonal - am.causal)
    assert am.causal != "causal" and am.causal != 1
    table = {m1: "a", am.rows(3): "b", am.MaskValueError: None}
    assert table[m2] == "a" and table[am.rows(3, 4, 1)] == "b"
    assert len({am.sliding(4), am.sliding(4), am.sliding(5)}) == 2


@given(mask_specs(mask_mods=True))
def test_building_twice_gives_equal_values(spec):
    a, b = build(spec), build(spec)
    assert a == b and hash(a) == hash(b) and str(a) == str(b)


@pytest.mark.parametrize("op", ["|", "&", "-"])
def test_combining_with_non_mask_raises(op):
    fn = {"|": lambda x, y: x | y, "&": lambda x, y: x & y, "-": lambda x, y: x - y}[op]
    others = [1, 0, True, None, "causal", 2.5, torch.ones(2, 2, dtype=torch.bool)]
    wrong = []
    for other in others:
        try:
            fn(am.causal, other)
            wrong.append(f"causal {op} {other!r}: no error")
        except am.MaskValueError:
            pass
        except Exception as e:  # noqa: BLE001 - reported below
            wrong.append(f"causal {op} {other!r}: {type(e).__name__}")
        if isinstance(other, torch.Tensor):
            continue  # a tensor on the left applies its own operator; not the library's to police
        # The reflected form must not slip out as a bare TypeError either.
        try:
            fn(other, am.causal)
            wrong.append(f"{other!r} {op} causal: no error")
        except am.MaskValueError:
            pass
        except Exception as e:  # noqa: BLE001
            wrong.append(f"{other!r} {op} causal: {type(e).__name__}")
    assert not wrong, "expected MaskValueError: " + "; ".join(wrong)


def test_deep_python_expression_is_refused_cleanly():
    m = am.causal
    with pytest.raises(am.MaskError):
        for _ in range(10_000):
            m = ~m
    m = am.causal
    with pytest.raises(am.MaskError):
        for _ in range(10_000):
            m = m - am.diagonal
    with pytest.raises(am.MaskError):
        m = am.causal
        for _ in range(10_000):
            m = am.sink(1) & (am.diagonal | m)

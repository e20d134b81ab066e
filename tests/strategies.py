"""Hypothesis strategies for masks, lengths, shapes and offsets, plus a naive oracle.

Masks are generated as small *specs* (plain tuples, independent of the
library's internals) and turned into :class:`attnmask.Mask` values through the
public Python API only. The same spec feeds :func:`naive`, a per-element
evaluator written straight from the table in PRODUCT.md ("The mask language")
with Python ints, so tests can hold ``Mask.to_dense`` / ``mask_mod`` /
``compile`` to the normative semantics without trusting ``Mask.evaluate``.

Spec grammar::

    ("prim", name, args)     # args exactly as passed to am.<name>(*args); () for constants
    ("mod", name)            # a from_mask_mod leaf from MOD_LEAVES
    ("or", a, b) | ("and", a, b) | ("sub", a, b) | ("not", a)

Example::

    >>> from hypothesis import given
    >>> from strategies import masks, shapes   # tests/ is on sys.path under pytest
    >>> @given(masks(), shapes())
    ... def test_something(mask, shape): ...
"""

from __future__ import annotations

from typing import Callable

import torch
from hypothesis import strategies as st

import attnmask as am

#: Largest parameter the library accepts (int32 range); used as an edge value.
MAX_PARAM = 2**31 - 1

#: Every primitive of the language, in the order of the PRODUCT.md table.
PRIMITIVES = ("full", "none", "causal", "diagonal", "band", "sliding", "sink", "prefix_lm",
              "chunked", "dilated", "strided", "document", "rows", "cols", "window2d")
CONSTANT_NAMES = ("full", "none", "causal", "diagonal")

Spec = tuple

# ---------------------------------------------------------------------------
# the naive oracle: PRODUCT.md's table, one (q, k) pair at a time
# ---------------------------------------------------------------------------


def _segment(lengths: tuple[int, ...], x: int) -> int | None:
    """Index of the document segment holding position x, or None (padding/negative)."""
    start = 0
    for i, n in enumerate(lengths):
        if start <= x < start + n:
            return i
        start += n
    return None


def naive_primitive(name: str, args: tuple[int, ...], q: int, k: int) -> bool:
    """Does query position q attend key position k under primitive ``name(*args)``?"""
    if name == "full":
        return True
    if name == "none":
        return False
    if name == "causal":
        return k <= q
    if name == "diagonal":
        return k == q
    if name == "band":
        l, r = args
        return q - l <= k <= q + r
    if name == "sliding":
        (w,) = args
        return q - w < k <= q
    if name == "sink":
        (n,) = args
        return k < n
    if name == "prefix_lm":
        (p,) = args
        return k <= q or k < p
    if name == "chunked":
        (c,) = args
        return q // c == k // c
    if name == "dilated":
        w, d = args
        return 0 <= q - k < w * d and (q - k) % d == 0
    if name == "strided":
        (s,) = args
        return (q - k) % s == 0
    if name == "document":
        sq, sk = _segment(args, q), _segment(args, k)
        return sq is not None and sq == sk
    if name in ("rows", "cols"):
        a = args[0]
        b = args[1] if len(args) > 1 else a + 1
        s = args[2] if len(args) > 2 else 1
        x = q if name == "rows" else k
        return a <= x < b and (x - a) % s == 0
    if name == "window2d":
        return naive_window2d(args, q, k)
    raise AssertionError(f"unknown primitive {name}")


def naive_window2d(args: tuple[int, ...], q: int, k: int) -> bool:
    """PRODUCT.md's window2d(w, h, kw, kh), written from its table row with Python ints."""
    w, h, kw, kh = args
    if not (0 <= q < w * h and 0 <= k < w * h):
        return False                       # positions past the canvas attend nothing
    row_q, col_q = q // w, q % w
    row_k, col_k = k // w, k % w
    rc = min(max(row_q, kh // 2), h - 1 - kh // 2)      # the kernel centre, clamped (NATTEN's rule)
    cc = min(max(col_q, kw // 2), w - 1 - kw // 2)
    return abs(cc - col_k) <= kw // 2 and abs(rc - row_k) <= kh // 2


# from_mask_mod leaves: fixed module-level functions so that the wrapped Masks
# are the same objects (MaskMod equality is identity of the function).
def _even_keys(b, h, q_idx, kv_idx):
    return kv_idx % 2 == 0


def _near(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 2


def _sum_mod3(b, h, q_idx, kv_idx):
    return (q_idx + kv_idx) % 3 == 0


#: name -> (Mask made by am.from_mask_mod, the same predicate on Python ints: (row index, key))
MOD_LEAVES: dict[str, tuple[am.Mask, Callable[[int, int], bool]]] = {
    "even_keys": (am.from_mask_mod(_even_keys, "even_keys"), lambda q, k: k % 2 == 0),
    "near": (am.from_mask_mod(_near, "near"), lambda q, k: abs(q - k) <= 2),
    "sum_mod3": (am.from_mask_mod(_sum_mod3, "sum_mod3"), lambda q, k: (q + k) % 3 == 0),
}


def naive(spec: Spec, q: int, k: int, q_offset: int = 0) -> bool:
    """The oracle for a whole spec tree at one (q, k) pair.

    Primitives read the query position q; a from_mask_mod leaf reads FlexAttention's
    row index q - q_offset (PRODUCT.md: "it is called with FlexAttention's indices").
    """
    kind = spec[0]
    if kind == "prim":
        return naive_primitive(spec[1], spec[2], q, k)
    if kind == "mod":
        return MOD_LEAVES[spec[1]][1](q - q_offset, k)
    if kind == "or":
        return naive(spec[1], q, k, q_offset) or naive(spec[2], q, k, q_offset)
    if kind == "and":
        return naive(spec[1], q, k, q_offset) and naive(spec[2], q, k, q_offset)
    if kind == "sub":
        return naive(spec[1], q, k, q_offset) and not naive(spec[2], q, k, q_offset)
    if kind == "not":
        return not naive(spec[1], q, k, q_offset)
    raise AssertionError(f"bad spec {spec!r}")


def naive_dense(spec: Spec, q_len: int, kv_len: int | None = None,
                q_offset: int | None = None) -> torch.Tensor:
    """bool [q_len, kv_len] built cell by cell: row i is position q_offset + i, column j is j."""
    kv_len = q_len if kv_len is None else kv_len
    q_offset = kv_len - q_len if q_offset is None else q_offset
    cells = [[naive(spec, q_offset + i, j, q_offset) for j in range(kv_len)] for i in range(q_len)]
    return torch.tensor(cells, dtype=torch.bool).reshape(q_len, kv_len)


# ---------------------------------------------------------------------------
# specs -> masks and text
# ---------------------------------------------------------------------------

def build(spec: Spec) -> am.Mask:
    """The Mask of a spec, built with the public Python API (constants, functions, operators)."""
    kind = spec[0]
    if kind == "prim":
        name, args = spec[1], spec[2]
        return getattr(am, name) if name in CONSTANT_NAMES else getattr(am, name)(*args)
    if kind == "mod":
        return MOD_LEAVES[spec[1]][0]
    if kind == "or":
        return build(spec[1]) | build(spec[2])
    if kind == "and":
        return build(spec[1]) & build(spec[2])
    if kind == "sub":
        return build(spec[1]) - build(spec[2])
    if kind == "not":
        return ~build(spec[1])
    raise AssertionError(f"bad spec {spec!r}")


def full_text(spec: Spec) -> str:
    """Language text with every operation parenthesised (mirrors how Python built it)."""
    kind = spec[0]
    if kind == "prim":
        name, args = spec[1], spec[2]
        return name if name in CONSTANT_NAMES else f"{name}({', '.join(map(str, args))})"
    if kind == "mod":
        raise ValueError("from_mask_mod leaves have no language text")
    if kind == "not":
        return f"(~{full_text(spec[1])})"
    op = {"or": "|", "and": "&", "sub": "-"}[kind]
    return f"({full_text(spec[1])} {op} {full_text(spec[2])})"


def has_mod(spec: Spec) -> bool:
    """Whether a spec contains a from_mask_mod leaf (such masks cannot be parsed back)."""
    if spec[0] == "mod":
        return True
    if spec[0] == "prim":
        return False
    return any(has_mod(s) for s in spec[1:])


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------

def small_ints(lo: int, hi: int = 40) -> st.SearchStrategy[int]:
    """Whole numbers in [lo, hi], shrinking towards lo, with the edge values weighted in."""
    return st.one_of(st.sampled_from(sorted({lo, lo + 1, hi})), st.integers(lo, hi))


def _param(lo: int, *, huge: bool = True) -> st.SearchStrategy[int]:
    # Mostly values comparable to test lengths (so masks are neither all-in nor
    # all-out), sometimes the largest accepted value.
    base = small_ints(lo, 40)
    return st.one_of(base, st.just(MAX_PARAM)) if huge else base


def _rows_cols_args() -> st.SearchStrategy[tuple[int, ...]]:
    """(a,), (a, b) or (a, b, s) with 0 <= a <= b, s >= 1: exercises the defaults b = a + 1, s = 1."""
    @st.composite
    def gen(draw):
        a = draw(small_ints(0, 40))
        n = draw(st.integers(1, 3))
        if n == 1:
            return (a,)
        b = a + draw(small_ints(0, 40))
        if n == 2:
            return (a, b)
        return (a, b, draw(small_ints(1, 12)))
    return gen()


def primitive_args(name: str) -> st.SearchStrategy[tuple[int, ...]]:
    """Valid parameters of one primitive, edge values included."""
    if name in CONSTANT_NAMES:
        return st.just(())
    if name == "band":
        return st.tuples(_param(0), _param(0))
    if name in ("sliding",):
        return st.tuples(_param(1))
    if name in ("sink", "prefix_lm"):
        return st.tuples(_param(0))
    if name in ("chunked", "strided"):
        return st.tuples(_param(1))
    if name == "dilated":
        return st.tuples(_param(1), st.one_of(small_ints(1, 12), st.just(MAX_PARAM)))
    if name == "document":
        # Sums both below and above typical lengths, so padding is exercised.
        return st.lists(small_ints(1, 12), min_size=1, max_size=6).map(tuple)
    if name in ("rows", "cols"):
        return _rows_cols_args()
    if name == "window2d":
        return window2d_args()
    raise AssertionError(name)


def window2d_args(max_side: int = 8) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """(w, h, kw, kh): canvases of 1..max_side a side (lengths past them are common), odd kernels that fit."""
    @st.composite
    def gen(draw):
        w = draw(small_ints(1, max_side))
        h = draw(small_ints(1, max_side))
        kw = 2 * draw(st.integers(0, (w - 1) // 2)) + 1
        kh = 2 * draw(st.integers(0, (h - 1) // 2)) + 1
        return (w, h, kw, kh)
    return gen()


def primitive_specs(names: tuple[str, ...] = PRIMITIVES) -> st.SearchStrategy[Spec]:
    """A ("prim", name, args) spec for any of ``names`` (all primitives by default)."""
    return st.sampled_from(names).flatmap(
        lambda n: primitive_args(n).map(lambda a, n=n: ("prim", n, a)))


def mask_specs(*, max_leaves: int = 8, mask_mods: bool = False) -> st.SearchStrategy[Spec]:
    """Random expression specs over every primitive and every operator."""
    leaves = primitive_specs()
    if mask_mods:
        leaves = st.one_of(leaves, st.sampled_from(sorted(MOD_LEAVES)).map(lambda n: ("mod", n)))

    def extend(children):
        return st.one_of(
            st.tuples(st.sampled_from(("or", "and", "sub")), children, children),
            st.tuples(st.just("not"), children),
        )
    return st.recursive(leaves, extend, max_leaves=max_leaves)


def masks(*, max_leaves: int = 8, mask_mods: bool = False) -> st.SearchStrategy[am.Mask]:
    """Random Masks built with the Python API (see :func:`mask_specs`)."""
    return mask_specs(max_leaves=max_leaves, mask_mods=mask_mods).map(build)


def lengths(max_len: int = 24) -> st.SearchStrategy[int]:
    """Sequence lengths in [1, max_len], 1 and small lengths favoured."""
    return small_ints(1, max_len)


def shapes(max_len: int = 24, max_offset: int = 30) -> st.SearchStrategy[tuple[int, int | None, int | None]]:
    """(q_len, kv_len or None, q_offset or None): square or not, default or explicit offset.

    Non-square shapes include q_len > kv_len, where the default offset
    kv_len - q_len is negative; explicit offsets may be negative too.
    """
    return st.tuples(lengths(max_len),
                     st.one_of(st.none(), lengths(max_len)),
                     st.one_of(st.none(), st.integers(-max_offset, max_offset)))


def resolved(shape: tuple[int, int | None, int | None]) -> tuple[int, int, int]:
    """Fill the documented defaults: kv_len = q_len, q_offset = kv_len - q_len."""
    q_len, kv_len, q_offset = shape
    kv_len = q_len if kv_len is None else kv_len
    return q_len, kv_len, (kv_len - q_len if q_offset is None else q_offset)


# ---------------------------------------------------------------------------
# problems shaped like real use, for the engines (forward and backward)
# ---------------------------------------------------------------------------
#
# Random expressions over tiny lengths (above) reach the language's corners but
# rarely the engine's: most are 1 x 1, a single query block, all-true or
# all-masked. These problems have several query blocks, masks from the families
# models use, scaled to the length (so rows gather keys from several runs of tiles
# and the engine merges partial results), fully masked rows cut out of them,
# explicit and default offsets, square and not. Their measured distribution is in
# tests/README.md ("What the strategies generate").

def _family_spec(draw, L: int) -> Spec:
    """A mask spec from the families models use, with parameters scaled to length L."""
    third = max(1, L // 3)
    # window+sink and chunks+sink listed twice: they most often give rows both full and partial tiles
    fam = draw(st.sampled_from(["causal", "window+sink", "window+sink", "documents", "band+cols", "chunks+sink",
                                "chunks+sink", "dilated", "prefix", "random"]))
    causal = ("prim", "causal", ())
    if fam == "causal":
        return causal
    if fam == "window+sink":
        w = draw(st.integers(1, third))
        s = draw(st.integers(1, 4))
        return ("and", causal, ("or", ("prim", "sliding", (w,)), ("prim", "sink", (s,))))
    if fam == "documents":
        docs = tuple(draw(st.lists(st.integers(1, max(1, L // 2)), min_size=1, max_size=6)))
        return ("and", ("prim", "document", docs), causal)
    if fam == "band+cols":
        lo, hi = draw(st.integers(0, third)), draw(st.integers(0, third))
        a = draw(st.integers(0, L))
        return ("or", ("prim", "band", (lo, hi)), ("prim", "cols", (a, a + draw(st.integers(1, 8)))))
    if fam == "chunks+sink":
        return ("or", ("prim", "chunked", (draw(st.integers(1, third)),)), ("prim", "sink", (draw(st.integers(1, 3)),)))
    if fam == "dilated":
        w, d = draw(st.integers(1, 12)), draw(st.integers(1, 5))
        return ("and", causal, ("prim", "dilated", (w, d))) if draw(st.booleans()) else ("prim", "dilated", (w, d))
    if fam == "prefix":
        return ("prim", "prefix_lm", (draw(st.integers(0, L)),))
    return draw(mask_specs(max_leaves=4))


#: Query rows from which a problem is *long*: the engine's calls can then span 2048 rows and more (the
#: length from which its long calls are cut into row pieces) and the backward's work at small blocks
#: exceeds one kernel call (it is split into several).
LONG_ROWS = 2048


def _long_family_spec(draw, L: int, bk: int) -> Spec:
    """A long problem's mask: whole key blocks that every row shares, more keys than a key set the
    engine gathers (256), so it runs one maskless call down the rows past the window (2048 and more:
    a long call), beside a window of 128-192 keys, whose many small-block items make the backward's
    work more than one kernel call."""
    w = draw(st.integers(128, 192))
    # whole key blocks, more than a key set the engine splits off and gathers (256 keys)
    shared = bk * draw(st.integers(256 // bk + 1, 384 // bk))
    if draw(st.booleans()):
        return ("and", ("prim", "causal", ()), ("or", ("prim", "sliding", (w,)), ("prim", "sink", (shared,))))
    a = bk * draw(st.integers(0, 2))
    return ("or", ("prim", "band", (w, draw(st.integers(0, 8)))), ("prim", "cols", (a, a + shared)))


@st.composite
def engine_problems(draw, *, max_blocks: int = 8, long_share: int = 20) -> dict:
    """One attention problem: spec, lengths, q_offset, block size, B, H, Hkv, D, seed.

    Lengths span 2..max_blocks query blocks (not always a multiple of the block);
    half the masks gain extra keys (a sink or a few key columns, so rows gather
    keys from separate runs of tiles and the engine merges partial results); half
    lose some rows entirely (``- rows(a, b, s)`` on positions the queries hold), so
    fully masked rows sit inside blocks whose other rows merge.

    About one draw in ``long_share`` (0: none) is *long*: LONG_ROWS + 640..LONG_ROWS + 768
    query rows (a window and its shared keys leave >= 2048 rows in one call), with B = H = 1
    and D <= 8 so that the float64 reference stays cheap (see ``_long_family_spec``).
    """
    # sampled_from, not integers: hypothesis draws an integer's lower bound far more often than 1 in n
    long = bool(long_share) and draw(st.sampled_from([False] * (long_share - 1) + [True]))   # shrinks to short
    if long:
        bq = draw(st.sampled_from([16, 16, 32]))
        bk = draw(st.sampled_from([bq, 2 * bq]))
        Lq = draw(st.integers(LONG_ROWS + 640, LONG_ROWS + 768))       # rows past a window and its keys
        Lk = Lq if draw(st.integers(0, 2)) else draw(st.integers(Lq, Lq + 256))
        q_offset = draw(st.one_of(st.none(), st.integers(0, Lk - Lq)))
    else:
        bq = draw(st.sampled_from([8, 16, 32]))
        bk = draw(st.sampled_from([bq, 2 * bq, bq // 2]))
        Lq = draw(st.integers(2 * bq - bq // 2, max_blocks * bq))
        Lk = Lq if draw(st.integers(0, 2)) else draw(st.integers(max(1, Lq // 2), 2 * Lq))
        q_offset = draw(st.one_of(st.none(), st.integers(-bq, Lk)))
    pos0 = Lk - Lq if q_offset is None else q_offset           # position of query row 0
    spec = _long_family_spec(draw, Lk, bk) if long else _family_spec(draw, max(Lq, Lk))
    extra = draw(st.sampled_from(["none", "none", "sink", "cols"]))
    # Extra keys a block wide or more give rows a run of full tiles beside their partial ones:
    # two kernel results to merge.
    if extra == "sink":             # attention sinks: a second run of keys far from the diagonal
        spec = ("or", spec, ("prim", "sink", (draw(st.integers(1, 2 * bk)),)))
    elif extra == "cols":           # heavy-hitter key columns
        a = draw(st.integers(0, Lk - 1))
        spec = ("or", spec, ("prim", "cols", (a, a + draw(st.integers(1, 2 * bk)))))
    if draw(st.integers(0, 3)) >= (3 if long else 2):   # a row cut: half the short draws, a quarter of long ones
        a = max(0, pos0 + draw(st.integers(0, Lq - 1)))
        cut = ("prim", "rows", (a, a + draw(st.integers(1, max(1, Lq // 4))), draw(st.integers(1, 4))))
        spec = ("sub", spec, cut)
    if long:
        return dict(spec=spec, Lq=Lq, Lk=Lk, q_offset=q_offset, block=(bq, bk), B=1, H=1, Hkv=1,
                    D=draw(st.sampled_from([4, 8])), seed=draw(st.integers(0, 2**16)))
    hkv = draw(st.sampled_from([1, 2]))
    return dict(spec=spec, Lq=Lq, Lk=Lk, q_offset=q_offset, block=(bq, bk), B=draw(st.integers(1, 2)),
                H=hkv * draw(st.sampled_from([1, 2])), Hkv=hkv, D=draw(st.sampled_from([4, 8, 16])),
                seed=draw(st.integers(0, 2**16)))

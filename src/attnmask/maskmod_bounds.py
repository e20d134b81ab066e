"""Sound bounds of a traced mask_mod over whole rectangles of indices (interval arithmetic).

The compiler must know, for every tile, whether a wrapped predicate is true on all
of its cells, on none, or on some. Evaluating every cell costs N^2. Instead the
predicate is traced once into a graph of aten operations (``make_fx``, fake
tensors; scalar-only predicates are traced through ``vmap``), and the graph is
run on *intervals*: for a rectangle of rows ``[r_lo, r_hi]`` x keys ``[k_lo, k_hi]``
every integer node gets a range ``[lo, hi]`` containing every value it takes on
the rectangle, and every boolean node the pair (may be true, may be false).
Each rule below over-approximates, so "never false" proves the tile full and
"never true" proves it empty; anything else stays undecided and is evaluated
cell by cell. Tables the predicate indexes (document ids, block maps, interval
lists) are bounded exactly over index ranges by sparse tables (1-D) or 2-D
prefix sums (boolean maps), else by the table's global range.

Anything the rules do not cover (floats, reductions, data-dependent control
flow) raises :class:`Unsupported` at trace or bound time; the caller then
evaluates every tile cell by cell, which is exact but slow.

    >>> import torch
    >>> t = trace(lambda b, h, q, k: (q - k >= 0) & (q - k < 4), vmapped=False)
    >>> import numpy as np
    >>> may_true, may_false = bounds(t, 0, 0, np.array([0, 100]), np.array([3, 103]),
    ...                              np.array([50, 0]), np.array([53, 0]))
    >>> may_true.tolist(), may_false.tolist()       # [0..3]x[50..53]: never; [100..103]x[0]: never
    ([False, False], [True, True])
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Unsupported", "Traced", "trace", "bounds"]

_I64 = np.int64
#: Longest 1-D table given a sparse table (int64, log2(n) levels).
_MAX_SPARSE = 1 << 21
#: Largest 2-D boolean map given prefix sums (int32: 4 bytes per entry, 8 while they are built), e.g.
#: the 8192 x 8192 block map of a 1M-token mask over 128-token blocks.
_MAX_PREFIX2D = 1 << 26
#: Values beyond this are not bounded (products could overflow int64).
_BIG = 1 << 40


class Unsupported(Exception):
    """The predicate uses something the interval rules do not cover."""


class Traced:
    """A predicate's aten graph plus per-table caches for range queries."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self._cache: dict = {}

    def table(self, target: str) -> np.ndarray:
        key = ("table", target)
        if key not in self._cache:
            t = getattr(self.gm, target)
            if t.dtype.is_floating_point or t.dtype.is_complex:
                raise Unsupported(f"float table {target}")
            self._cache[key] = t.detach().to(torch.int64).numpy()
        return self._cache[key]

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def trace(fn, vmapped: bool) -> Traced:
    """Trace ``fn(b, h, q, k)`` to aten ops (through vmap if ``vmapped``); Unsupported if it cannot be."""
    from torch.fx.experimental.proxy_tensor import make_fx
    z = torch.zeros((), dtype=torch.int64)
    try:
        if vmapped:
            args = tuple(torch.zeros(3, dtype=torch.int64) for _ in range(4))
            gm = make_fx(lambda b, h, q, k: torch.vmap(fn)(b, h, q, k), tracing_mode="fake",
                         _allow_non_fake_inputs=True)(*args)
        else:
            gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(
                z, z, torch.zeros((2, 1), dtype=torch.int64), torch.zeros((1, 3), dtype=torch.int64))
    except Exception as e:                       # noqa: BLE001 - data-dependent, python ints, anything
        raise Unsupported(f"cannot trace: {type(e).__name__}: {e}") from e
    return Traced(gm)


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------

class Iv:
    """Integer values within [lo, hi] (inclusive), one range per rectangle."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def point(self) -> int | None:
        """The single value every rectangle takes, if there is one."""
        lo, hi = np.asarray(self.lo), np.asarray(self.hi)
        if lo.size and np.all(lo == hi) and np.all(lo == lo.flat[0]):
            return int(lo.flat[0])
        return None


class Tri:
    """Boolean values: ``t`` may be true, ``f`` may be false (per rectangle)."""

    __slots__ = ("t", "f")

    def __init__(self, t, f):
        self.t, self.f = t, f


class Tab:
    """A constant tensor of the predicate (a table to index, or a scalar)."""

    __slots__ = ("target", "arr")

    def __init__(self, target, arr: np.ndarray):
        self.target, self.arr = target, arr


class Look:
    """``table[idx...]`` with fewer indices than dimensions, kept until a select picks a column."""

    __slots__ = ("tab", "key", "idx", "ndim")

    def __init__(self, tab: np.ndarray, key, idx: list, ndim: int):
        self.tab, self.key, self.idx, self.ndim = tab, key, idx, ndim


def _const(x) -> Iv | Tri:
    if isinstance(x, bool):
        return Tri(np.bool_(x), np.bool_(not x))
    if isinstance(x, (int, np.integer)):
        return Iv(_I64(x), _I64(x))
    raise Unsupported(f"constant {x!r}")


def _as_iv(v) -> Iv:
    if isinstance(v, Iv):
        return v
    if isinstance(v, Tri):                       # bool used as a number: 0 / 1
        return Iv(np.where(v.f, 0, 1).astype(_I64), np.where(v.t, 1, 0).astype(_I64))
    if isinstance(v, Tab):
        if v.arr.size == 1:
            x = _I64(v.arr.reshape(-1)[0])
            return Iv(x, x)
        raise Unsupported("a table used as a number")
    if isinstance(v, Look):
        return _resolve_look(v)
    return _as_iv(_const(v))


def _as_tri(v) -> Tri:
    if isinstance(v, Tri):
        return v
    iv = _as_iv(v)
    return Tri(~((iv.lo == 0) & (iv.hi == 0)), (iv.lo <= 0) & (iv.hi >= 0))


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------

def _sparse(arr: np.ndarray, op) -> np.ndarray:
    """[levels, n]: level j holds op over [i, i + 2^j) (clipped at the end), filled in place."""
    n = len(arr)
    levels = max(1, int(n).bit_length())
    out = np.empty((levels, n), arr.dtype)
    out[0] = arr
    span = 1
    for j in range(1, levels):
        out[j, n - span:] = out[j - 1, n - span:]
        op(out[j - 1, :n - span], out[j - 1, span:], out=out[j, :n - span])
        span *= 2
    return out


def _range_1d(traced: Traced, key, arr: np.ndarray, lo, hi) -> Iv:
    """min and max of ``arr[lo..hi]`` per query (indices already inside [0, n))."""
    n = len(arr)
    if n > _MAX_SPARSE:
        return Iv(np.full_like(lo, arr.min()), np.full_like(lo, arr.max()))
    # int32 levels where the values fit: a 1M-entry table's two sparse tables take 168 MB, not 336
    small = arr if arr.size == 0 or not (-2**31 <= arr.min() and arr.max() < 2**31) else arr.astype(np.int32)
    mn = traced.cached(key + ("min",), lambda: _sparse(small, np.minimum))
    mx = traced.cached(key + ("max",), lambda: _sparse(small, np.maximum))
    width = hi - lo + 1
    j = np.floor(np.log2(np.maximum(width, 1))).astype(_I64)
    j = np.minimum(j, len(mn) - 1)
    far = hi - (_I64(1) << j) + 1
    return Iv(np.minimum(mn[j, lo], mn[j, far]).astype(_I64), np.maximum(mx[j, lo], mx[j, far]).astype(_I64))


def _index_range(iv: Iv, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, exact) index ranges inside [0, n); ``exact`` False where the rule must widen to the table."""
    lo, hi = np.broadcast_arrays(np.asarray(iv.lo, _I64), np.asarray(iv.hi, _I64))
    neg = hi < 0                               # wholly negative: torch counts from the end
    lo = np.where(neg, lo + n, lo)
    hi = np.where(neg, hi + n, hi)
    # Indexing past the end raises, so a predicate that ran fine only read indices < n.
    exact = lo >= 0
    return np.clip(lo, 0, n - 1), np.clip(hi, 0, n - 1), exact


def _lookup(traced: Traced, tab: np.ndarray, key, idx: list[Iv]) -> Iv:
    """Bounds of ``tab[idx0, idx1, ...]`` (len(idx) == tab.ndim)."""
    # Indices that are one value for every rectangle (a head, a batch element) slice the table first.
    while idx:
        dims = [i for i, iv in enumerate(idx) if iv.point() is not None]
        if not dims:
            break
        d = dims[0]
        p = idx[d].point()
        if p < 0:
            p += tab.shape[d]
        if not 0 <= p < tab.shape[d]:
            raise Unsupported("constant index out of range")
        tab = np.take(tab, p, axis=d)
        key = key + (("take", d, p),)
        idx = idx[:d] + idx[d + 1:]
    if not idx:
        x = _I64(tab)
        return Iv(x, x)
    # the table's global range (cached: a 2-D block map is scanned once per trace, not once per bound)
    gmin, gmax = traced.cached(key + ("range",), lambda: (_I64(tab.min()), _I64(tab.max())))
    if len(idx) == 1:
        lo, hi, exact = _index_range(idx[0], tab.shape[0])
        out = _range_1d(traced, key, tab, lo, hi)
        return Iv(np.where(exact, out.lo, gmin), np.where(exact, out.hi, gmax))
    if len(idx) == 2 and gmin >= 0 and gmax <= 1 and tab.size <= _MAX_PREFIX2D:
        # a boolean map: ones in the box by 2-D prefix sums give min (all ones) and max (any one)
        pre = traced.cached(key + ("pre2d",), lambda: _prefix_2d(tab))
        (lo0, hi0, ex0), (lo1, hi1, ex1) = (_index_range(idx[0], tab.shape[0]), _index_range(idx[1], tab.shape[1]))
        ones = pre[hi0 + 1, hi1 + 1] - pre[lo0, hi1 + 1] - pre[hi0 + 1, lo1] + pre[lo0, lo1]
        area = (hi0 - lo0 + 1) * (hi1 - lo1 + 1)
        exact = ex0 & ex1
        return Iv(np.where(exact & (ones == area), 1, 0).astype(_I64),
                  np.where(~exact | (ones > 0), 1, 0).astype(_I64))
    shape = np.broadcast(*[np.asarray(i.lo) for i in idx]).shape
    return Iv(np.full(shape, gmin), np.full(shape, gmax))


def _prefix_2d(tab: np.ndarray) -> np.ndarray:
    """[n0 + 1, n1 + 1] int32: ones in tab[:i, :j] (counts stay under 2^26, the size bound)."""
    pre = np.zeros((tab.shape[0] + 1, tab.shape[1] + 1), np.int32)
    np.cumsum(tab, axis=0, dtype=np.int32, out=pre[1:, 1:])
    np.cumsum(pre[1:, 1:], axis=1, dtype=np.int32, out=pre[1:, 1:])
    return pre


def _resolve_look(v: Look) -> Iv:
    raise Unsupported("a partial table lookup used as a number")   # replaced per call in bounds()


# ---------------------------------------------------------------------------
# the interpreter
# ---------------------------------------------------------------------------

def _cmp(name: str, x: Iv, y: Iv) -> Tri:
    if name == "lt":
        return Tri(x.lo < y.hi, x.hi >= y.lo)
    if name == "le":
        return Tri(x.lo <= y.hi, x.hi > y.lo)
    if name == "gt":
        return Tri(x.hi > y.lo, x.lo <= y.hi)
    if name == "ge":
        return Tri(x.hi >= y.lo, x.lo < y.hi)
    overlap = (x.lo <= y.hi) & (y.lo <= x.hi)
    single = (x.lo == x.hi) & (y.lo == y.hi) & (x.lo == y.lo)
    if name == "eq":
        return Tri(overlap, ~single)
    return Tri(~single, overlap)                 # ne


def _mul(x: Iv, y: Iv) -> Iv:
    c = [x.lo * y.lo, x.lo * y.hi, x.hi * y.lo, x.hi * y.hi]
    return Iv(np.minimum.reduce(c), np.maximum.reduce(c))


def _floordiv(x: Iv, y: Iv) -> Iv:
    d = y.point()
    if d is None or d == 0:
        raise Unsupported("division by a varying or zero number")
    a, b = np.floor_divide(x.lo, d), np.floor_divide(x.hi, d)
    return Iv(np.minimum(a, b), np.maximum(a, b))


def _remainder(x: Iv, y: Iv) -> Iv:
    d = y.point()
    if d is None or d == 0:
        raise Unsupported("remainder by a varying or zero number")
    a, b = np.remainder(x.lo, d), np.remainder(x.hi, d)
    # One contiguous range of x maps onto [a, b] when it does not wrap past a multiple of d.
    whole = (x.hi - x.lo >= abs(d)) | (a > b)
    lo_all, hi_all = (0, d - 1) if d > 0 else (d + 1, 0)
    return Iv(np.where(whole, lo_all, np.minimum(a, b)), np.where(whole, hi_all, np.maximum(a, b)))


#: aten's constant fill op, named from the op itself (its name is also a primitive's, which only
#: the primitive's definition may spell as a string: tests/test_structure.py).
_ATEN_FULL = torch.ops.aten.full.__name__
_PASS = {"_to_copy", "to", "clone", "alias", "detach", "lift_fresh_copy", "lift_fresh", "expand", "view",
         "reshape", "unsqueeze", "squeeze", "contiguous", "_unsafe_view", "expand_copy", "view_copy",
         "unsqueeze_copy", "squeeze_copy", "broadcast_to", "permute", "t", "transpose", "movedim",
         "_assert_tensor_metadata"}


def _dtype_of(node) -> torch.dtype | None:
    val = node.meta.get("val")
    return getattr(val, "dtype", None)


def bounds(traced: Traced, b: int, h: int, r_lo, r_hi, k_lo, k_hi) -> tuple[np.ndarray, np.ndarray]:
    """(may be true, may be false) of the predicate on rectangles rows [r_lo, r_hi] x keys [k_lo, k_hi].

    All four are int64 arrays of one length (inclusive bounds); b and h are the fixed batch
    element and head. Raises Unsupported where a rule is missing.
    """
    r_lo, r_hi, k_lo, k_hi = (np.asarray(a, _I64) for a in (r_lo, r_hi, k_lo, k_hi))
    env: dict = {}
    inputs = [Iv(_I64(b), _I64(b)), Iv(_I64(h), _I64(h)), Iv(r_lo, r_hi), Iv(k_lo, k_hi)]
    n_ph = 0
    out = None

    def val(a):
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return [val(x) for x in a]
        if a is None:
            return None
        return _const(a)

    for node in traced.nodes:
        if node.op == "placeholder":
            if n_ph >= 4:
                raise Unsupported("unexpected input")
            env[node] = inputs[n_ph]
            n_ph += 1
            continue
        if node.op == "get_attr":
            env[node] = Tab(node.target, traced.table(node.target))
            continue
        if node.op == "output":
            out = val(node.args[0])
            break
        if node.op != "call_function":
            raise Unsupported(f"{node.op} {node.target}")
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", str(node.target))
        args = node.args
        if name in _PASS:
            v = val(args[0])
            dt = _dtype_of(node)
            if dt == torch.bool and not isinstance(v, Tri):
                v = _as_tri(v)
            elif dt is not None and dt != torch.bool and (dt.is_floating_point or dt.is_complex):
                raise Unsupported(f"float values ({name} to {dt})")
            elif dt is not None and dt != torch.bool and isinstance(v, Tri):
                v = _as_iv(v)
            env[node] = v
            continue
        if name in ("scalar_tensor", _ATEN_FULL, "ones", "zeros", "ones_like", "zeros_like", "full_like", "new_full",
                    "new_ones", "new_zeros"):
            if name in ("ones", "ones_like", "new_ones"):
                fill = 1
            elif name in ("zeros", "zeros_like", "new_zeros"):
                fill = 0
            elif name == "scalar_tensor":
                fill = args[0]
            elif name == _ATEN_FULL:
                fill = args[1]
            else:
                fill = args[-1] if name == "full_like" else args[2]
            if isinstance(fill, float):
                if fill != int(fill):
                    raise Unsupported("float constant")
                fill = int(fill)
            v = _const(fill)
            env[node] = _as_tri(v) if _dtype_of(node) == torch.bool else _as_iv(v)
            continue
        if name == "index":
            tab = val(args[0])
            if not isinstance(tab, Tab) or any(i is None for i in args[1]):
                raise Unsupported("indexing something other than a constant table")
            idx = [_as_iv(val(i)) for i in args[1]]
            key = (tab.target,)
            if len(idx) < tab.arr.ndim:
                env[node] = Look(tab.arr, key, idx, node.meta["val"].dim())
            else:
                env[node] = _lookup(traced, tab.arr, key, idx)
            continue
        if name == "select":
            src = val(args[0])
            dim, i = args[1], args[2]
            if isinstance(src, Tab):
                d = dim % src.arr.ndim
                arr = np.take(src.arr, i, axis=d)
                env[node] = Tab((src.target, "select", d, i), arr)
                continue
            if not isinstance(src, Look):
                raise Unsupported("select of a computed value")
            trailing = src.tab.ndim - len(src.idx)
            d = dim % src.ndim
            t = d - (src.ndim - trailing)            # which trailing table dim is picked
            if t < 0:
                raise Unsupported("select along an index dimension")
            axis = len(src.idx) + t
            tab = np.take(src.tab, i, axis=axis)
            key = src.key + (("select", axis, i),)
            if len(src.idx) == tab.ndim:
                env[node] = _lookup(traced, tab, key, src.idx)
            else:
                env[node] = Look(tab, key, src.idx, src.ndim - 1)
            continue
        vals = [val(a) for a in args]
        if any(isinstance(v, Look) for v in vals):
            raise Unsupported("a partial table lookup used as a number")
        if name in ("bitwise_and", "logical_and", "bitwise_or", "logical_or", "bitwise_xor", "logical_xor"):
            if _dtype_of(node) != torch.bool:
                raise Unsupported("bitwise operation on integers")
            x, y = _as_tri(vals[0]), _as_tri(vals[1])
            if name.endswith("and"):
                env[node] = Tri(x.t & y.t, x.f | y.f)
            elif name.endswith("or"):
                env[node] = Tri(x.t | y.t, x.f & y.f)
            else:
                env[node] = Tri((x.t & y.f) | (x.f & y.t), (x.t & y.t) | (x.f & y.f))
            continue
        if name in ("bitwise_not", "logical_not"):
            if name == "bitwise_not" and _dtype_of(node) != torch.bool:
                raise Unsupported("bitwise not of integers")
            x = _as_tri(vals[0])
            env[node] = Tri(x.f, x.t)
            continue
        if name in ("lt", "le", "gt", "ge", "eq", "ne"):
            env[node] = _cmp(name, _as_iv(vals[0]), _as_iv(vals[1]))
            continue
        if name == "where":
            c = _as_tri(vals[0])
            if _dtype_of(node) == torch.bool:
                x, y = _as_tri(vals[1]), _as_tri(vals[2])
                env[node] = Tri((c.t & x.t) | (c.f & y.t), (c.t & x.f) | (c.f & y.f))
            else:
                x, y = _as_iv(vals[1]), _as_iv(vals[2])
                lo = np.where(c.t & c.f, np.minimum(x.lo, y.lo), np.where(c.t, x.lo, y.lo))
                hi = np.where(c.t & c.f, np.maximum(x.hi, y.hi), np.where(c.t, x.hi, y.hi))
                env[node] = Iv(lo, hi)
            continue
        if _dtype_of(node) is not None and (_dtype_of(node).is_floating_point or _dtype_of(node) == torch.bool):
            raise Unsupported(f"{name} on {_dtype_of(node)}")
        iv = [_as_iv(v) if v is not None else None for v in vals]
        if name in ("add", "sub") and len(args) <= 2 and not node.kwargs:
            x, y = iv[0], iv[1]
            env[node] = Iv(x.lo + y.lo, x.hi + y.hi) if name == "add" else Iv(x.lo - y.hi, x.hi - y.lo)
        elif name == "rsub" and len(args) == 2:
            x, y = iv[0], iv[1]
            env[node] = Iv(y.lo - x.hi, y.hi - x.lo)
        elif name == "neg":
            env[node] = Iv(-iv[0].hi, -iv[0].lo)
        elif name == "mul":
            env[node] = _mul(iv[0], iv[1])
        elif name in ("floor_divide",) or (name == "div" and node.kwargs.get("rounding_mode") == "floor"):
            env[node] = _floordiv(iv[0], iv[1])
        elif name == "remainder":
            env[node] = _remainder(iv[0], iv[1])
        elif name == "abs":
            x = iv[0]
            env[node] = Iv(np.where(x.lo >= 0, x.lo, np.where(x.hi <= 0, -x.hi, 0)),
                           np.maximum(np.abs(x.lo), np.abs(x.hi)))
        elif name in ("minimum", "maximum"):
            f = np.minimum if name == "minimum" else np.maximum
            env[node] = Iv(f(iv[0].lo, iv[1].lo), f(iv[0].hi, iv[1].hi))
        elif name in ("clamp", "clamp_min", "clamp_max"):
            x = iv[0]
            lo_c = iv[1] if name in ("clamp", "clamp_min") and len(iv) > 1 else None
            hi_c = (iv[2] if len(iv) > 2 else None) if name == "clamp" else (iv[1] if name == "clamp_max" else None)
            lo, hi = x.lo, x.hi
            if lo_c is not None:
                lo, hi = np.maximum(lo, lo_c.lo), np.maximum(hi, lo_c.hi)
            if hi_c is not None:
                lo, hi = np.minimum(lo, hi_c.lo), np.minimum(hi, hi_c.hi)
            env[node] = Iv(lo, hi)
        else:
            raise Unsupported(f"no interval rule for aten.{name}")
        v = env[node]
        if np.max(np.abs(v.lo)) > _BIG or np.max(np.abs(v.hi)) > _BIG:
            raise Unsupported("values too large to bound safely")
    if out is None:
        raise Unsupported("no output")
    tri = _as_tri(out)
    shape = r_lo.shape
    return np.broadcast_to(tri.t, shape).copy(), np.broadcast_to(tri.f, shape).copy()

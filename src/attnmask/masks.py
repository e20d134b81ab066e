"""Masks as immutable values: primitives, operators and their exact meaning.

A :class:`Mask` is a small expression tree. Leaves are the primitives of the
language (``causal``, ``sliding(w)``, ...) or an opaque FlexAttention
``mask_mod``; inner nodes are ``|``, ``&``, ``-`` and ``~``. Trees are frozen
dataclasses, so equality and hashing are structural and masks can key caches.

The single source of truth for semantics is :meth:`Mask.evaluate`: given
broadcastable int64 tensors of query positions ``q`` and key positions ``k`` it
returns where q attends to k. ``to_dense``, ``mask_mod`` and the compiler's 1-D
evaluations all go through it. The compiler additionally needs to know the
*structure class* of each subtree (does it depend on q only, k only, q - k only,
...), which each primitive declares.

The leaf :class:`Primitive` is generic: what a primitive means, how it is written and
what every stage needs from it is its *kind*, defined in ``attnmask/primitives/``.
Operations whose work lives higher up (``compile``, ``mask_mod``, the Jupyter picture)
are reached through :mod:`attnmask.late`, so this module imports nothing above it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from . import late
from .errors import DenseTooLargeError, MaskValueError
from .kinds import StructureClass

#: Largest parameter or length the library accepts. Positions are int64, and
#: products such as ``w * d`` must not overflow.
MAX_PARAM = 2**31 - 1

#: Largest nesting depth of an expression. Deeper trees are refused so that no
#: recursive walk (printing, hashing, compiling) can hit Python's stack limit.
MAX_DEPTH = 100

#: Default cap on the number of cells a dense result may have.
DEFAULT_DENSE_LIMIT = 2**30

# Precedence levels for printing, loosest first, as Python binds them.
_PREC_OR, _PREC_AND, _PREC_SUB, _PREC_NOT, _PREC_ATOM = 1, 2, 3, 4, 5


class Mask:
    """An attention mask: an immutable, hashable expression of the language.

    Build masks from the primitives and operators; ``str()`` gives canonical
    text that :func:`attnmask.parse` reads back to an equal mask::

        >>> import attnmask as am
        >>> m = am.causal & (am.sliding(256) | am.sink(4))
        >>> str(m)
        'causal & (sliding(256) | sink(4))'
        >>> am.parse(str(m)) == m
        True
        >>> am.causal.to_dense(3).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """

    __slots__ = ()
    depth: int

    # ----- operators -------------------------------------------------------
    def __or__(self, other: "Mask") -> "Mask":
        return Union.of(self, _as_mask(other, "|"))

    def __and__(self, other: "Mask") -> "Mask":
        return Intersection.of(self, _as_mask(other, "&"))

    def __sub__(self, other: "Mask") -> "Mask":
        return Difference(self, _as_mask(other, "-"))

    def __invert__(self) -> "Mask":
        return Complement(self)

    # `1 | causal` must be a MaskError too, not Python's bare TypeError.
    def __ror__(self, other):
        return _as_mask(other, "|") | self

    def __rand__(self, other):
        return _as_mask(other, "&") & self

    def __rsub__(self, other):
        return _as_mask(other, "-") - self

    # ----- text ------------------------------------------------------------
    def _prec(self) -> int:
        # leaves (primitives, wrapped mask_mods) bind tightest; the operators override this
        return _PREC_ATOM

    def _text(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self._text()

    def __repr__(self) -> str:
        return f"Mask({self._text()!r})"

    # ----- semantics -------------------------------------------------------
    def evaluate(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Where query position ``q`` attends key position ``k``.

        ``q`` and ``k`` are broadcastable int64 tensors of *positions*; the
        result is a bool tensor of (at least) their broadcast shape.

            >>> import torch, attnmask as am
            >>> am.sliding(2).evaluate(torch.tensor([3]), torch.arange(5)).tolist()
            [False, False, True, True, False]
        """
        out = self._eval(q, k)
        return out.expand(broadcast_shape(q.shape, k.shape, out.shape))

    def _eval(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _eval_at(self, b, h, q: torch.Tensor, k: torch.Tensor, frame: "Frame") -> torch.Tensor:
        """``_eval`` inside a frame: only mask_mod leaves (and operators above them) read it."""
        return self._eval(q, k)

    def has_mask_mod(self) -> bool:
        """Whether a ``from_mask_mod`` leaf occurs in this expression."""
        found = self.__dict__.get("_has_mod")     # cached like Primitive's tables (frozen dataclass)
        if found is None:
            found = any(c.has_mask_mod() for c in self.children())
            object.__setattr__(self, "_has_mod", found)
        return found

    def depends_on(self) -> frozenset:
        """Which of ``"batch"``, ``"head"`` the mask varies with (only mask_mod leaves can).

            >>> import attnmask as am
            >>> sorted(am.causal.depends_on())
            []
        """
        out = frozenset()
        for c in self.children():
            out |= c.depends_on()
        return out

    def at(self, *, b: int | None = None, h: int | None = None) -> "Mask":
        """This mask for one batch element ``b`` and/or head ``h``: its mask_mod leaves are pinned there.

        The result no longer varies with what was pinned, so it renders, compiles and
        densifies without further arguments (a per-head mask_mod: pick the head to draw).

            >>> import attnmask as am
            >>> per_head = am.from_mask_mod(lambda b, h, q, k: (q - k >= 0) & (q - k <= h), "grow")
            >>> sorted(per_head.depends_on()), per_head.at(h=1).depends_on()
            (['head'], frozenset())
            >>> per_head.at(h=1).to_dense(3).int().tolist()
            [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
        """
        for name, v in (("b", b), ("h", h)):
            if v is not None and (isinstance(v, bool) or not hasattr(v, "__index__") or operator.index(v) < 0):
                raise MaskValueError(f"at() needs {name} >= 0 (a whole number), got {v!r}")
        if (b is None and h is None) or not self.has_mask_mod():
            return self
        return self._pinned(None if b is None else operator.index(b), None if h is None else operator.index(h))

    def _pinned(self, b, h) -> "Mask":
        return self

    def structure_class(self) -> StructureClass:
        """The compiler's structure class of this subtree (see module doc)."""
        raise NotImplementedError

    def children(self) -> tuple["Mask", ...]:
        return ()

    @property
    def mask_mod(self) -> Callable:
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``.

        Made only of tensor operations, so ``create_block_mask`` and
        ``torch.compile`` can trace it. ``q_idx`` is taken as the query
        *position* (q_offset 0); ``BlockLayout.to_flex_block_mask`` attaches a
        mask_mod with the layout's q_offset built in.

            >>> import torch, attnmask as am
            >>> am.causal.mask_mod(0, 0, torch.tensor(2), torch.tensor(3))
            tensor(False)
        """
        return late.call("mask_mod", self, 0)

    def to_dense(self, q_len: int, kv_len: int | None = None, *, q_offset: int | None = None,
                 limit: int | None = DEFAULT_DENSE_LIMIT, b: int | None = None,
                 h: int | None = None) -> torch.Tensor:
        """The exact mask as ``torch.bool [q_len, kv_len]``.

        Query row ``i`` is position ``q_offset + i`` (default
        ``kv_len - q_len``); key column ``j`` is position ``j``. Built in
        bounded row tiles, so peak memory is the result plus a few MB. Results
        with more than ``limit`` cells (default 2**30) are refused: use
        ``compile()`` for a block layout or ``attnmask.analyze()`` for figures;
        ``limit=None`` lifts the guard. ``b``/``h`` pick the batch element and head
        for masks whose mask_mod leaves vary with them (required then).

            >>> import attnmask as am
            >>> am.sliding(2).to_dense(2, 4).int().tolist()   # q_offset = 2
            [[0, 1, 1, 0], [0, 0, 1, 1]]
        """
        q_len, kv_len, q_offset = resolve_shape(q_len, kv_len, q_offset)
        b, h = resolve_batch_head(self, b, h, "to_dense")
        frame = Frame(q_offset, q_len, kv_len)
        cells = q_len * kv_len
        if limit is not None and cells > limit:
            raise DenseTooLargeError(
                f"a dense {q_len} x {kv_len} mask has {cells:,} cells, over the limit of {limit:,}; "
                f"use mask.compile(...) for a block layout or attnmask.analyze(...) for exact figures "
                f"(or pass limit= to allow it)")
        out = torch.empty((q_len, kv_len), dtype=torch.bool)
        k = torch.arange(kv_len, dtype=torch.int64)[None, :]
        rows_per_tile = max(1, (1 << 19) // max(kv_len, 1))  # int64 temporaries of ~4 MB
        for r0 in range(0, q_len, rows_per_tile):
            r1 = min(q_len, r0 + rows_per_tile)
            q = torch.arange(q_offset + r0, q_offset + r1, dtype=torch.int64)[:, None]
            out[r0:r1] = evaluate_at(self, q, k, frame, b, h)
        return out

    def compile(self, q_len: int, kv_len: int | None = None, *, block_size: int | tuple[int, int] = 128,
                q_offset: int | None = None, b: int | None = None, h: int | None = None):
        """Compile to an exact :class:`attnmask.BlockLayout` (cached).

        ``b``/``h``: the batch element and head, for masks whose mask_mod leaves vary
        with them (one layout per (b, h); required then, ignored otherwise).

            >>> import attnmask as am
            >>> layout = am.causal.compile(1000, block_size=128)
            >>> layout.counts()
            {'empty': 28, 'partial': 8, 'full': 28}
        """
        return late.call("compile", self, q_len, kv_len, block_size=block_size, q_offset=q_offset, b=b, h=h)

    def _repr_png_(self):  # Jupyter display hook: a mask shows itself as its heatmap
        return late.call("repr_png", self)


def broadcast_shape(*shapes) -> tuple[int, ...]:
    """The shape tensors of ``shapes`` broadcast to; a MaskValueError names them when they do not.

    (torch.broadcast_shapes imports sympy on first use, ~0.3 s; this is the same rule.)

        >>> broadcast_shape((4, 1), (1, 6), (6,))
        (4, 6)
    """
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for s in shapes:
        for i, n in enumerate(s, start=ndim - len(s)):
            if n != 1:
                if out[i] not in (1, n):
                    raise MaskValueError(f"position tensors of shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[i] = n
    return tuple(out)


@dataclass(frozen=True)
class Frame:
    """The shape an evaluation happens in, for ``from_mask_mod`` leaves (see attnmask.maskmod).

    Language primitives read query *positions*; a wrapped FlexAttention predicate reads
    FlexAttention's indices: the query's row index ``q - q_offset`` and the key index,
    never outside ``[0, q_len) x [0, kv_len)`` when the lengths are known. ``direct``:
    FlexAttention itself is calling (it passes valid indices, vmaps scalar predicates).
    The default frame (q_offset 0, lengths unknown) is what :meth:`Mask.evaluate` uses.
    """

    q_offset: int = 0
    q_len: int | None = None
    kv_len: int | None = None
    direct: bool = False


FREE_FRAME = Frame()


def evaluate_at(mask: "Mask", q: torch.Tensor, k: torch.Tensor, frame: Frame, b=0, h=0) -> torch.Tensor:
    """``mask`` at query positions ``q`` and key positions ``k`` inside ``frame``, for batch b, head h.

    Every shape-aware view (dense masks, compiled tiles, the engines' partial tiles) goes
    through here, so a mask_mod leaf sees FlexAttention's indices.

        >>> import torch, attnmask as am
        >>> row = am.from_mask_mod(lambda b, h, q, k: k == q, "row_diag")
        >>> evaluate_at(row & am.causal, torch.tensor([[5]]), torch.arange(6)[None], Frame(5, 1, 6)).int().tolist()
        [[1, 0, 0, 0, 0, 0]]
    """
    out = mask._eval_at(b, h, q, k, frame)
    return out.expand(broadcast_shape(q.shape, k.shape, out.shape))


def _as_mask(other, op: str) -> Mask:
    if isinstance(other, Mask):
        return other
    raise MaskValueError(f"cannot combine a Mask with {type(other).__name__} using '{op}'; "
                         f"both operands must be masks")


def _depth_checked(depth: int) -> int:
    if depth > MAX_DEPTH:
        raise MaskValueError(f"mask expression nests more than {MAX_DEPTH} levels deep; "
                             f"simplify it (document(...) and rows(a, b, s) cover many repeated parts)")
    return depth


# ---------------------------------------------------------------------------
# primitives: a generic leaf; what each primitive means lives in attnmask/primitives/
# ---------------------------------------------------------------------------

def short_int(value: int) -> str:
    """An int for a message (str() of a 5000-digit int raises in Python >= 3.11)."""
    if value.bit_length() < 100:
        return str(value)
    return f"{'-' if value < 0 else ''}<a {value.bit_length()}-bit number>"


@dataclass(frozen=True, repr=False)
class Primitive(Mask):
    """A primitive of the language: its kind (``attnmask.primitives``) and its parameters.

    Parameters are validated and normalised by the kind at construction, so
    ``rows(3) == rows(3, 4, 1)``. Everything else (text, meaning, structure, what the
    compiler and engines need) is asked of ``kind``.

        >>> import attnmask as am
        >>> am.sliding(4).kind.signature, am.sliding(4).args
        ('sliding(w)', (4,))
    """

    kind: "PrimitiveKind"      # attnmask.primitives.base (not imported here: it imports this module)
    args: tuple = ()
    depth: int = field(default=1, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "args", self.kind.normalize(tuple(self.args)))

    @property
    def name(self) -> str:
        return self.kind.name

    def _text(self) -> str:
        return self.kind.text(self.args)

    def structure_class(self) -> StructureClass:
        return self.kind.structure

    def lowered(self) -> "Mask | None":
        """An equal expression of other primitives that the compiler classifies instead, or None."""
        return self.cached("lowered", lambda: (self.kind.lower(self.args),))[0]   # a tuple: None is a value

    def _eval(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.kind.evaluate(self, q, k)

    def cached(self, key: str, build):
        """A value derived from this primitive, built once (tables its evaluate reads).

        Plain attribute lookups (not functools caches, which are C code) keep a
        mask_mod traceable by torch.compile without graph breaks.
        """
        value = self.__dict__.get("_c_" + key)
        if value is None:
            value = build()
            object.__setattr__(self, "_c_" + key, value)
        return value


# ---------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class _Chain(Mask):
    """An n-ary, associative operator: Python's left chains ``a op b op c`` are flat."""

    parts: tuple[Mask, ...]
    depth: int = field(default=1, compare=False, hash=False)
    _PREC: ClassVar[int]
    _SYMBOL: ClassVar[str]

    @classmethod
    def of(cls, a: Mask, b: Mask) -> "_Chain":
        return cls.chain([a, b])

    @classmethod
    def chain(cls, parts) -> "_Chain":
        """``parts[0] op parts[1] op ...`` as Python builds it (a left chain, flattened)."""
        parts = tuple(parts)
        if isinstance(parts[0], cls):
            # depth of the flattened chain without rescanning its (maybe long) parts
            depth = max(parts[0].depth, 1 + max((p.depth for p in parts[1:]), default=0))
            parts = parts[0].parts + parts[1:]
        else:
            depth = 1 + max(p.depth for p in parts)
        return cls(parts, _depth_checked(depth))

    def _prec(self) -> int:
        return self._PREC

    def _text(self) -> str:
        return f" {self._SYMBOL} ".join(_child_text(p, self._PREC, first=i == 0) for i, p in enumerate(self.parts))

    def children(self):
        return self.parts

    def structure_class(self) -> StructureClass:
        return _combine_classes(self.parts)

    def _eval(self, q, k):
        out = self.parts[0]._eval(q, k)
        for p in self.parts[1:]:
            out = self._apply(out, p._eval(q, k))
        return out

    def _pinned(self, b, h):
        return type(self).chain([p.at(b=b, h=h) for p in self.parts])

    def _eval_at(self, b, h, q, k, frame):
        if not self.has_mask_mod():
            return self._eval(q, k)
        out = self.parts[0]._eval_at(b, h, q, k, frame)
        for p in self.parts[1:]:
            out = self._apply(out, p._eval_at(b, h, q, k, frame))
        return out


@dataclass(frozen=True, repr=False)
class Union(_Chain):
    """``a | b | ...``: attended where any part attends."""

    _PREC: ClassVar[int] = _PREC_OR
    _SYMBOL: ClassVar[str] = "|"

    @staticmethod
    def _apply(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x | y


@dataclass(frozen=True, repr=False)
class Intersection(_Chain):
    """``a & b & ...``: attended where every part attends."""

    _PREC: ClassVar[int] = _PREC_AND
    _SYMBOL: ClassVar[str] = "&"

    @staticmethod
    def _apply(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x & y


@dataclass(frozen=True, repr=False)
class Difference(Mask):
    """``a - b``: attended where ``a`` attends and ``b`` does not."""

    left: Mask
    right: Mask
    depth: int = field(default=0, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "depth", _depth_checked(1 + max(self.left.depth, self.right.depth)))

    def _prec(self) -> int:
        return _PREC_SUB

    def _text(self) -> str:
        return f"{_child_text(self.left, _PREC_SUB, first=True)} - {_child_text(self.right, _PREC_SUB, first=False)}"

    def children(self):
        return (self.left, self.right)

    def structure_class(self) -> StructureClass:
        return _combine_classes((self.left, self.right))

    def _eval(self, q, k):
        return self.left._eval(q, k) & ~self.right._eval(q, k)

    def _pinned(self, b, h):
        return Difference(self.left.at(b=b, h=h), self.right.at(b=b, h=h))

    def _eval_at(self, b, h, q, k, frame):
        return self.left._eval_at(b, h, q, k, frame) & ~self.right._eval_at(b, h, q, k, frame)


@dataclass(frozen=True, repr=False)
class Complement(Mask):
    """``~a``: attended where ``a`` does not attend."""

    inner: Mask
    depth: int = field(default=0, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "depth", _depth_checked(1 + self.inner.depth))

    def _prec(self) -> int:
        return _PREC_NOT

    def _text(self) -> str:
        inner = self.inner._text()
        return f"~{inner}" if self.inner._prec() >= _PREC_NOT else f"~({inner})"

    def children(self):
        return (self.inner,)

    def structure_class(self) -> StructureClass:
        c = self.inner.structure_class()
        # A 1-D class stays one (its axis is negated); the hooks of a SEG or RECT primitive
        # describe the primitive, not its complement, which the compiler negates piecewise.
        return c if (c.one_axis or c in (StructureClass.CONST, StructureClass.OPAQUE)) else StructureClass.MIXED

    def _eval(self, q, k):
        return ~self.inner._eval(q, k)

    def _pinned(self, b, h):
        return Complement(self.inner.at(b=b, h=h))

    def _eval_at(self, b, h, q, k, frame):
        return ~self.inner._eval_at(b, h, q, k, frame)


def _child_text(child: Mask, prec: int, first: bool) -> str:
    # Left operands need parentheses only when they bind more loosely; right
    # operands also when they bind equally (all binary operators are
    # left-associative, as in Python).
    text = child._text()
    cp = child._prec()
    if cp < prec or (cp == prec and not first):
        return f"({text})"
    return text


def _combine_classes(parts) -> StructureClass:
    classes = {p.structure_class() for p in parts}
    classes.discard(StructureClass.CONST)
    if not classes:
        return StructureClass.CONST
    if len(classes) == 1:
        (c,) = classes
        if c.one_axis:
            return c
    return StructureClass.MIXED


# ---------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------

def check_length(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise MaskValueError(f"{name} must be a whole number, got {value!r}")
    value = operator.index(value)
    if value < minimum:
        raise MaskValueError(f"{name} must be >= {minimum}, got {short_int(value)}")
    if value > MAX_PARAM:
        raise MaskValueError(f"{name}={short_int(value)} is too large (limit {MAX_PARAM})")
    return value


def resolve_shape(q_len, kv_len=None, q_offset=None, minimum: int = 1) -> tuple[int, int, int]:
    """Validate lengths (``minimum`` 0: attention on empty sequences); fill kv_len = q_len and
    q_offset = kv_len - q_len."""
    q_len = check_length("q_len", q_len, minimum)
    kv_len = q_len if kv_len is None else check_length("kv_len", kv_len, minimum)
    if q_offset is None:
        q_offset = kv_len - q_len
    else:
        if isinstance(q_offset, bool) or not hasattr(q_offset, "__index__"):
            raise MaskValueError(f"q_offset must be a whole number, got {q_offset!r}")
        q_offset = operator.index(q_offset)
        if abs(q_offset) > MAX_PARAM:
            raise MaskValueError(f"q_offset={short_int(q_offset)} is too large (limit {MAX_PARAM})")
    return q_len, kv_len, q_offset


def resolve_batch_head(mask: Mask, b, h, where: str) -> tuple[int, int]:
    """(b, h) to evaluate ``mask`` at: 0 where it does not vary with them; required where it does."""
    varies = mask.depends_on()
    out = []
    for name, value, kw in (("batch", b, "b"), ("head", h, "h")):
        if name not in varies:
            out.append(0)
            continue
        if value is None:
            raise MaskValueError(
                f"{mask} varies per {name} (its mask_mod reads {kw}); pass {kw}= to {where} for one {name}, "
                f"or pick one with mask.at({kw}=...) (am.attention evaluates it per {name} by itself)")
        if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < 0:
            raise MaskValueError(f"{kw} must be a whole number >= 0, got {value!r}")
        out.append(operator.index(value))
    return out[0], out[1]


__all__ = ["Mask", "Primitive", "Union", "Intersection", "Difference", "Complement", "Frame", "FREE_FRAME",
           "evaluate_at", "broadcast_shape", "resolve_shape", "resolve_batch_head", "check_length", "short_int"]

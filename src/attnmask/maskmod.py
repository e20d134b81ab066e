"""FlexAttention predicates as masks: the opaque ``from_mask_mod`` leaf and how it is evaluated.

A wrapped ``mask_mod(b, h, q_idx, kv_idx)`` means exactly what it means in
FlexAttention, at every shape:

* it is called with FlexAttention's indices: the batch element ``b``, the head
  ``h``, the query's **row index** ``q_idx`` (0 for the first query row, whatever
  ``q_offset`` is) and the key index ``kv_idx``;
* never with a padded or out-of-range index: tiles that overhang the lengths are
  evaluated on clamped indices and the overhang is discarded;
* through ``torch.vmap`` when it only handles scalars (a predicate that indexes
  with a scalar, branches on a value, ...). The route is chosen once per leaf by
  trying the fast broadcasting call and checking it against vmap on a sample of
  cells; ``leaf.route`` says which was taken, and the vmap route warns once
  (:class:`MaskModWarning`) because it is several times slower.

Inside an expression the language's primitives keep reading query *positions*
(``q_offset + row``), so at a rectangular shape ``causal & from_mask_mod(fn)``
means: key k is attended from query row i when ``k <= q_offset + i`` and
``fn(b, h, i, k)``. At square shapes (q_offset 0) the two coincide.

Whether a leaf varies with ``b`` or ``h`` is found out, not guessed: the
predicate is called once with a two-element ``b`` (and ``h``) of zeros; an output
without that axis cannot depend on it. (On the vmap route the same question is
asked of vmap: is the output batched along ``b``?) Masks that vary are compiled
per (b, h) (``mask.compile(..., h=i)``); ``am.attention`` does that by itself.

The compiler asks this module for the tile states of an opaque leaf
(:func:`classify_pieces`); it first proves what it can from the predicate's
traced arithmetic over whole tile ranges (:mod:`attnmask.maskmod_bounds`), and only
the tiles left undecided are evaluated cell by cell, in bounded batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import MaskValueError
from .masks import CLASS_OPAQUE, FREE_FRAME, Frame, Mask, _PREC_ATOM, _broadcast_shape

__all__ = ["MaskMod", "MaskModWarning", "from_mask_mod"]

#: Cells compared between the broadcasting call and vmap when a leaf's route is chosen.
_PROBE_CELLS = 64


class MaskModWarning(UserWarning):
    """A mask_mod runs on a slow route (through vmap, cell by cell)."""


@dataclass(frozen=True, repr=False, eq=False)
class MaskMod(Mask):
    """A FlexAttention ``mask_mod`` wrapped as a Mask (see :func:`from_mask_mod`).

    Equal only to itself (functions have no structural equality). ``str()``
    shows ``<name>``, which the parser does not read back.

        >>> import attnmask as am
        >>> leaf = am.from_mask_mod(lambda b, h, q, k: k <= q, "lower")
        >>> leaf.to_dense(2, 3).int().tolist()     # q_idx is the row index: 0, 1
        [[1, 0, 0], [1, 1, 0]]
        >>> leaf.route
        'broadcast'
    """

    fn: Callable
    name: str
    depth: int = field(default=1, compare=False, hash=False)
    pin_b: int | None = None       # set by mask.at(b=...): the batch element it is evaluated for
    pin_h: int | None = None       # set by mask.at(h=...): the head

    def _key(self):
        return (self.fn, self.name, self.pin_b, self.pin_h)

    def __eq__(self, other):
        return isinstance(other, MaskMod) and other.fn is self.fn and other._key()[1:] == self._key()[1:]

    def __hash__(self):
        return hash((id(self.fn),) + self._key()[1:])

    def _prec(self) -> int:
        return _PREC_ATOM

    def _text(self) -> str:
        pins = [f"{n}={v}" for n, v in (("b", self.pin_b), ("h", self.pin_h)) if v is not None]
        return f"<{self.name}{'@' + ','.join(pins) if pins else ''}>"

    def _pinned(self, b, h):
        leaf = MaskMod(self.fn, self.name, pin_b=self.pin_b if b is None else b,
                       pin_h=self.pin_h if h is None else h)
        for key in ("_route", "_depends"):           # what was learnt about the predicate carries over
            if key in self.__dict__:
                object.__setattr__(leaf, key, self.__dict__[key])
        return leaf

    def structure_class(self) -> str:
        return CLASS_OPAQUE

    def has_mask_mod(self) -> bool:
        return True

    @property
    def route(self) -> str | None:
        """How the predicate is called: ``"broadcast"`` (whole tiles at once), ``"vmap"``
        (cell by cell through torch.vmap: it handles only scalars), or None before its first use."""
        return self.__dict__.get("_route")

    def depends_on(self) -> frozenset:
        found = self.__dict__.get("_depends")
        if found is None:
            found = _find_dependence(self)
            object.__setattr__(self, "_depends", found)
        return found - {n for n, v in (("batch", self.pin_b), ("head", self.pin_h)) if v is not None}

    def _eval(self, q, k):
        return self._eval_at(0, 0, q, k, FREE_FRAME)

    def _eval_at(self, b, h, q, k, frame: Frame):
        if self.pin_b is not None:
            b = self.pin_b
        if self.pin_h is not None:
            h = self.pin_h
        rows = q - frame.q_offset if frame.q_offset else q
        if frame.direct:                       # FlexAttention is calling: indices as it gives them
            return _as_bool(self, self.fn(b, h, rows, k))
        return evaluate_leaf(self, b, h, rows, k, frame)


def from_mask_mod(fn: Callable, name: str | None = None) -> Mask:
    """Turn any FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` into a Mask.

    The predicate sees FlexAttention's indices: batch ``b``, head ``h``, the query's
    row index and the key index, never a padded or out-of-range one. Write it
    with broadcasting tensor operations for speed; one that handles only scalars
    works too, through ``torch.vmap`` (``leaf.route`` says which). Inside an
    expression the language's primitives read positions (row + q_offset) while
    the predicate reads rows. Per-batch and per-head predicates are detected and
    evaluated per (b, h). ``str()`` shows ``<name>``, which cannot be parsed back.

        >>> import attnmask as am
        >>> even = am.from_mask_mod(lambda b, h, q, k: (k % 2 == 0) & (k <= q), "even_causal")
        >>> (even & am.sliding(3)).to_dense(4).int().tolist()
        [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]]
    """
    if not callable(fn):
        raise MaskValueError(f"from_mask_mod needs a callable mask_mod(b, h, q_idx, kv_idx), got {type(fn).__name__}")
    if name is None:
        name = getattr(fn, "__name__", "mask_mod")
    if not isinstance(name, str) or not name:
        raise MaskValueError(f"from_mask_mod needs a non-empty name, got {name!r}")
    return MaskMod(fn, name)


# ---------------------------------------------------------------------------
# calling the predicate
# ---------------------------------------------------------------------------

def _as_bool(leaf: MaskMod, out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        if isinstance(out, bool):
            return torch.tensor(out)
        raise MaskValueError(f"mask_mod {leaf.name!r} returned {type(out).__name__}, expected a bool tensor")
    if out.dtype != torch.bool:
        raise MaskValueError(f"mask_mod {leaf.name!r} returned {out.dtype}, expected a bool tensor")
    return out


def _index_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(int(x), dtype=torch.int64)


def evaluate_leaf(leaf: MaskMod, b, h, rows: torch.Tensor, keys: torch.Tensor, frame: Frame) -> torch.Tensor:
    """The predicate at row indices ``rows`` and key indices ``keys`` (broadcastable), bool.

    Indices outside ``[0, q_len) x [0, kv_len)`` (known from ``frame``) are never
    shown to the predicate: they are clamped in and their cells come out False.
    """
    b, h = _index_tensor(b), _index_tensor(h)
    inside = None
    if frame.q_len is not None:
        ok = (rows >= 0) & (rows < frame.q_len)
        ok = ok & ((keys >= 0) & (keys < frame.kv_len))
        if not bool(ok.all()):
            inside = ok
            rows = rows.clamp(0, frame.q_len - 1)
            keys = keys.clamp(0, frame.kv_len - 1)
    route = leaf.route
    if route is None:
        out = _choose_route(leaf, b, h, rows, keys)
    elif route == "broadcast":
        out = _as_bool(leaf, leaf.fn(b, h, rows, keys))
    else:
        out = _vmap_call(leaf, b, h, rows, keys)
    return out if inside is None else out & inside


def _target_shape(*tensors) -> tuple[int, ...]:
    return _broadcast_shape(*(t.shape for t in tensors))


def _broadcast_call(leaf: MaskMod, b, h, rows, keys) -> torch.Tensor:
    out = _as_bool(leaf, leaf.fn(b, h, rows, keys))
    target = _target_shape(b, h, rows, keys)
    if _broadcast_shape(target, out.shape) != target:
        raise MaskValueError(f"mask_mod {leaf.name!r} returned shape {tuple(out.shape)} for indices "
                             f"broadcasting to {target}")
    return out


def _vmap_call(leaf: MaskMod, b, h, rows, keys) -> torch.Tensor:
    """Cell by cell through torch.vmap (what FlexAttention's create_mask does)."""
    target = _target_shape(b, h, rows, keys)
    flat = [t.expand(target).reshape(-1) for t in (b, h, rows, keys)]
    if flat[0].numel() == 0:
        return torch.zeros(target, dtype=torch.bool)
    out = torch.vmap(leaf.fn)(*flat)
    return _as_bool(leaf, out).reshape(target)


def _choose_route(leaf: MaskMod, b, h, rows, keys) -> torch.Tensor:
    """Try the broadcasting call, check it against vmap on a sample of cells, remember the winner."""
    try:
        out = _broadcast_call(leaf, b, h, rows, keys)
    except MaskValueError as e:
        if "expected a bool tensor" in str(e):
            raise
        out = None
    except Exception:                       # noqa: BLE001 - any failure means "not written for tensors"
        out = None
    if out is not None:
        target = _target_shape(b, h, rows, keys)
        n = 1
        for s in target:
            n *= s
        pick = torch.linspace(0, max(n - 1, 0), min(n, _PROBE_CELLS)).round().to(torch.int64)
        sample = [t.expand(target).reshape(-1)[pick] for t in (b, h, rows, keys)]
        try:
            ref = _as_bool(leaf, torch.vmap(leaf.fn)(*sample))
        except Exception:                   # noqa: BLE001 - vmap cannot run it: broadcasting is the only way
            ref = None
        if ref is None or torch.equal(ref.reshape(-1), out.expand(target).reshape(-1)[pick]):
            object.__setattr__(leaf, "_route", "broadcast")
            return out
    try:
        result = _vmap_call(leaf, b, h, rows, keys)
    except Exception as e:
        raise MaskValueError(
            f"mask_mod {leaf.name!r} failed on index tensors and through torch.vmap ({type(e).__name__}: "
            f"{e}); it must return a bool tensor for tensor indices (b, h, q_idx, kv_idx)") from e
    object.__setattr__(leaf, "_route", "vmap")
    warnings.warn(f"mask_mod {leaf.name!r} handles only scalars (or differs on broadcast tensors): attnmask "
                  f"evaluates it cell by cell through torch.vmap, several times slower; write it with "
                  f"broadcasting tensor operations for speed", MaskModWarning, stacklevel=4)
    return result


def _find_dependence(leaf: MaskMod) -> frozenset:
    """Which of batch/head the predicate reads, found by calling it with two-element b and h of zeros."""
    zero = torch.zeros((1, 1, 1, 1), dtype=torch.int64)
    b2 = torch.zeros((2, 1, 1, 1), dtype=torch.int64)
    h2 = torch.zeros((1, 2, 1, 1), dtype=torch.int64)
    try:
        out = leaf.fn(b2, h2, zero, zero)
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool and out.dim() <= 4 and \
                _broadcast_shape(out.shape, (2, 2, 1, 1)) == (2, 2, 1, 1):
            shape = (1,) * (4 - out.dim()) + tuple(out.shape)
            return frozenset(n for n, s in (("batch", shape[0]), ("head", shape[1])) if s == 2)
    except Exception:                       # noqa: BLE001 - scalar-only: ask vmap instead
        pass
    found = set()
    z = torch.zeros((), dtype=torch.int64)
    for name, pos in (("batch", 0), ("head", 1)):
        seen = []

        def probe(x, pos=pos, seen=seen):
            args = [z, z, z, z]
            args[pos] = x
            out = leaf.fn(*args)
            seen.append(torch._C._functorch.is_batchedtensor(out) if isinstance(out, torch.Tensor) else False)
            return out if isinstance(out, torch.Tensor) else torch.tensor(bool(out))

        try:
            torch.vmap(probe)(torch.zeros(2, dtype=torch.int64))
            if seen and seen[0]:
                found.add(name)
        except Exception:                   # noqa: BLE001 - cannot tell: assume it varies (exact, slower)
            found.add(name)
    return frozenset(found)

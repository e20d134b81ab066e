"""What a primitive is: one :class:`PrimitiveKind` that tells every stage what it needs.

A primitive of the language (``causal``, ``sliding(w)``, ``window2d(w, h, kw, kh)``) is
one subclass of :class:`PrimitiveKind` in one module of this package, registered with
:func:`register`. It declares, in one place:

* its name, parameters and their validation (``normalize``), its canonical text (``text``);
* its meaning, ``evaluate(node, q, k)`` on broadcastable int64 position tensors (the
  one definition of semantics: dense views, FlexAttention's mask_mod and the engines'
  partial tiles all call it);
* its structure class (:class:`attnmask.kinds.StructureClass`) and what the compiler
  needs for that class: nothing more for Q/K/D (1-D evaluation of ``evaluate``),
  ``segments`` for SEG, ``key_ranges`` and ``count_rects`` for RECT, ``lower`` for a
  primitive that is an expression of others (MIXED);
* the queries the engines and the renderer ask (``residue_window``, ``covers_causal``,
  ``is_causal``, ``causal_segments``, ``display_extent``), the one a decoding cache asks
  (``retained``: which keys a later query may still attend) and ``prepare`` (tables a
  traced mask_mod needs on a device).

Nothing outside a primitive's own module branches on its name.

    >>> from attnmask.primitives import lookup
    >>> kind = lookup("sliding")
    >>> kind.signature, kind.structure.value, str(kind.make(4))
    ('sliding(w)', 'd', 'sliding(4)')
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import MaskValueError
from ..kinds import StructureClass
from ..masks import MAX_PARAM, Mask, Primitive, short_int


@dataclass(frozen=True)
class Segments:
    """A SEG primitive's segments, as numpy functions over positions and segment ids.

    ``of(pos)`` -> segment id of each position; ``start(ids)`` / ``end(ids)`` -> their
    positions [start, end); ``real`` = (lo, hi): positions outside attend nothing (None:
    every position is in a segment); ``square_sum(a, b)`` -> sum of squared lengths of
    segments a..b-1 (exact counts of whole segments).
    """

    of: Callable[[np.ndarray], np.ndarray]
    start: Callable[[np.ndarray], np.ndarray]
    end: Callable[[np.ndarray], np.ndarray]
    real: tuple[int, int] | None
    square_sum: Callable[[np.ndarray, np.ndarray], np.ndarray]


class PrimitiveKind:
    """One primitive of the language (see the module docstring). Subclass, then :func:`register`."""

    name: str = ""
    params: tuple[str, ...] = ()      # parameter names, for messages
    signature: str = ""               # how it is written, for messages
    structure: StructureClass = StructureClass.MIXED
    min_args: int = 0
    max_args: int | None = 0          # None: any number
    minimum: int | None = None        # smallest value of every parameter, when one rule fits all

    # ----- parameters and text -------------------------------------------
    def make(self, *args) -> Primitive:
        """The primitive with these parameters (validated); one shared value for a parameterless one."""
        if not args and self.max_args == 0:
            const = self.__dict__.get("_constant")
            if const is None:
                const = self.__dict__["_constant"] = Primitive(self, ())
            return const
        return Primitive(self, tuple(args))

    def normalize(self, args: tuple) -> tuple:
        """Validated parameters with defaults filled, so equal masks compare equal."""
        self.check_count(args)
        vals = tuple(map(self.whole, self.params, args))
        if self.minimum is not None and vals and min(vals) < self.minimum:
            for p, v in zip(self.params, vals):
                if v < self.minimum:
                    raise MaskValueError(f"{self.signature} needs {p} >= {self.minimum}, got {p}={v}")
        return vals

    def check_count(self, args: tuple) -> None:
        n = len(args)
        if n >= self.min_args and (self.max_args is None or n <= self.max_args):
            return
        if self.max_args == 0:
            raise MaskValueError(f"{self.name} takes no parameters, got {n}")
        if self.max_args is None:
            raise MaskValueError(f"{self.signature} needs at least {self.min_args} parameter, got {n}")
        want = str(self.min_args) if self.min_args == self.max_args else f"{self.min_args} to {self.max_args}"
        noun = "parameter" if want == "1" else "parameters"
        raise MaskValueError(f"{self.signature} takes {want} {noun}, got {n}")

    def whole(self, pname: str, value) -> int:
        """``value`` as a bounded whole number, or a MaskValueError naming the parameter."""
        if type(value) is int and -MAX_PARAM <= value <= MAX_PARAM:     # the common case, fast
            return value
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise MaskValueError(f"{self.signature} needs whole numbers, got {pname}={value!r}")
        value = operator.index(value)
        if abs(value) > MAX_PARAM:
            raise MaskValueError(f"{self.signature}: {pname}={short_int(value)} is too large (limit {MAX_PARAM})")
        return value

    def text(self, args: tuple) -> str:
        """Canonical text (what ``str()`` prints and the parser reads back)."""
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(str(a) for a in args)})"

    # ----- meaning ---------------------------------------------------------
    def evaluate(self, node: Primitive, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """bool tensor: where position q attends position k (broadcasting q and k)."""
        raise NotImplementedError

    # ----- what the compiler needs (by structure class) ----------------------
    def lower(self, args: tuple) -> Mask | None:
        """An equal expression of other primitives that the compiler classifies instead (or None)."""
        return None

    def segments(self, args: tuple) -> Segments:
        """SEG class: the segments (see :class:`Segments`)."""
        raise NotImplementedError(f"{self.name} is not a segment primitive")

    def key_ranges(self, args: tuple, qs: np.ndarray, qe: np.ndarray):
        """RECT class: the keys that queries [qs[i], qe[i]) attend, as ranges with a state.

        Returns (owner, lo, hi, state): key position ranges [lo, hi) of query range
        ``owner``, sorted by owner then ``lo``, disjoint. ``state`` (``TileState`` codes):
        FULL, every query of the range attends every key of [lo, hi); PARTIAL, every key
        of [lo, hi) is attended by some of the queries but not all; UNKNOWN, the compiler
        counts the tiles with ``count_rects``. Keys outside every range attend no query.
        """
        raise NotImplementedError(f"{self.name} is not a rectangle-counting primitive")

    def count_rects(self, args: tuple, qs, qe, ks, ke) -> np.ndarray:
        """RECT class: exact attended cells of rectangles [qs, qe) x [ks, ke) of positions (int64)."""
        raise NotImplementedError(f"{self.name} is not a rectangle-counting primitive")

    # ----- what engines, flex and pictures ask --------------------------------
    def prepare(self, node: Primitive, device) -> None:
        """Build whatever ``evaluate`` reads on ``device`` before a mask_mod is traced (default: nothing)."""

    def residue_window(self, args: tuple) -> tuple[int, int] | None:
        """(w, d) when the primitive pairs only positions equal mod d, as a causal window of w
        keys within each residue class (engines then run d window problems on strided views)."""
        return None

    def covers_causal(self, args: tuple) -> bool:
        """Whether every causal pair (k <= q) is attended (so intersecting with it changes
        nothing for a mask inside causal)."""
        return False

    def is_causal(self, args: tuple) -> bool:
        """Whether the primitive is exactly ``k <= q``."""
        return False

    def causal_segments(self, args: tuple, length: int) -> list[tuple[int, int]] | None:
        """For a packing: [(start, end)] of its segments clipped to ``length``, so that ``causal &``
        it is top-left causal within each (the backward runs each as one is_causal call)."""
        return None

    def retained(self, node: Primitive, k: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """bool tensor: whether some query at a position ``>= t`` may attend key position ``k``.

        Asked for keys already seen (``k < t``) by a decoding cache, which drops the keys
        where it is False; ``k`` and ``t`` are broadcastable int64 tensors. It may say True
        where no later query attends (a superset keeps the cache exact), never False where
        one does. Default: every key (the safe answer for a primitive that does not say).
        """
        return torch.ones_like(k - t, dtype=torch.bool)

    def display_extent(self, args: tuple) -> int:
        """About the length at which the primitive's pattern shows (pictures pick ~this)."""
        return 2 * max(args) if args else 0

    def __repr__(self) -> str:
        return f"<primitive {self.signature or self.name}>"


#: Every primitive of the language by name; filled by :func:`register` as each module loads.
REGISTRY: dict[str, PrimitiveKind] = {}


def register(kind_class: type[PrimitiveKind]) -> PrimitiveKind:
    """Add a primitive to the language (a class decorator; the name becomes the instance)."""
    kind = kind_class()
    if not kind.name or kind.name in REGISTRY:
        raise AssertionError(f"primitive name {kind.name!r} is empty or taken")  # a programming error
    REGISTRY[kind.name] = kind
    return kind


__all__ = ["PrimitiveKind", "Segments", "REGISTRY", "register"]

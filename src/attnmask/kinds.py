"""The enums every stage shares: a subtree's structure class and a tile's state.

One spelling each. ``TileState`` values are the int8 codes stored in layouts
(``layout.block_states()``: 0 empty, 1 partial, 2 full); ``label`` is the word
used in dicts and messages (``layout.counts()``).

    >>> from attnmask.kinds import StructureClass, TileState
    >>> TileState.FULL.label, int(TileState.FULL), StructureClass.D.value
    ('full', 2, 'd')
"""

from __future__ import annotations

import enum


class StructureClass(enum.Enum):
    """What a subtree depends on, which decides how the compiler classifies its tiles.

    CONST  depends on neither q nor k            Q  on q only (``rows``)
    K      on k only (``sink``, ``cols``)        D  on q - k only (``causal``, ``sliding``, ...)
    SEG    "q and k in the same segment": the primitive gives its segments (``chunked``, ``document``)
    RECT   the primitive counts any rectangle of positions in closed form and names the key
           ranges a query range may reach (``window2d``)
    OPAQUE a user mask_mod (evaluated cell by cell)
    MIXED  anything else: a combination across classes, or a primitive that lowers to one
    """

    CONST = "const"
    Q = "q"
    K = "k"
    D = "d"
    SEG = "seg"
    RECT = "rect"
    OPAQUE = "opaque"
    MIXED = "mixed"

    @property
    def one_axis(self) -> bool:
        """Evaluated once on a 1-D axis (q, k or q - k): any combination stays in the class."""
        return self in (StructureClass.Q, StructureClass.K, StructureClass.D)


class TileState(enum.IntEnum):
    """The state of a tile (or a run of tiles); the int value is the int8 code in layouts."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2
    UNKNOWN = 3   # compiler-internal: both operands undecided; never in a finished layout

    @property
    def label(self) -> str:
        return self.name.lower()


__all__ = ["StructureClass", "TileState"]

"""The primitives of the language, one definition each (see :mod:`attnmask.primitives.base`).

A new primitive is one new module here with a :class:`PrimitiveKind` subclass decorated by
:func:`register` (and its Python function), imported below; the parser, printer, compiler,
engines, renderer and analysis find it through :func:`lookup` and the kind's methods.

    >>> from attnmask.primitives import names, lookup
    >>> "window2d" in names(), lookup("window2d").structure.value
    (True, 'rect')
"""

from __future__ import annotations

from .base import REGISTRY, PrimitiveKind, Segments, register
from .constant import full, none
from .offsets import band, causal, diagonal, dilated, sliding, strided
from .prefix import prefix_lm
from .ranges import cols, rows, sink
from .segments import chunked, document
from .canvas import window2d


def lookup(name: str) -> PrimitiveKind | None:
    """The primitive called ``name``, or None."""
    return REGISTRY.get(name)


def names() -> tuple[str, ...]:
    """Every primitive name, in registration order."""
    return tuple(REGISTRY)


__all__ = ["PrimitiveKind", "Segments", "REGISTRY", "register", "lookup", "names", "full", "none", "causal",
           "diagonal", "band", "sliding", "sink", "prefix_lm", "chunked", "dilated", "strided", "document",
           "rows", "cols", "window2d"]

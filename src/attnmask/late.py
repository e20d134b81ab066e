"""Operations that values offer but whose work lives higher in the pipeline.

``Mask.compile`` needs the compiler and layout, ``Mask.mask_mod`` and
``BlockLayout.to_flex_block_mask`` need the flex engine, ``Mask._repr_png_`` needs the
renderer. Importing those from masks.py or layout.py would run imports upward (and in
circles), so the upper module registers its function here when it is imported, and
the value calls it by name. ``attnmask/__init__`` imports every provider, so any use of
the package finds them all.

    >>> from attnmask import late
    >>> sorted(late.provided())
    ['block_mask', 'compile', 'mask_mod', 'repr_png']
"""

from __future__ import annotations

from typing import Callable

_providers: dict[str, Callable] = {}


def provide(name: str, fn: Callable) -> Callable:
    """Register ``fn`` as the implementation of operation ``name`` (done once, by its home module)."""
    _providers[name] = fn
    return fn


def call(name: str, *args, **kwargs):
    """Run operation ``name``; its provider is imported by ``attnmask/__init__``."""
    fn = _providers.get(name)
    if fn is None:   # only possible while the package itself is still importing
        raise RuntimeError(f"attnmask operation {name!r} is not available yet: import attnmask first")
    return fn(*args, **kwargs)


def provided() -> tuple[str, ...]:
    """The operations registered so far."""
    return tuple(_providers)


__all__ = ["provide", "call", "provided"]

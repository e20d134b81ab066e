"""The mask heatmap as terminal text: viridis half-block cells, or plain characters.

The picture is downsampled to the terminal width from the compiled layout's
exact tile counts (``layout.tile_counts()``), so it costs the same at 64 tokens
and at a million, and never builds a dense matrix. Each character cell shows
the attended fraction of its tile:

* colour (a terminal that is a tty, without ``NO_COLOR``): 24-bit ANSI, the
  upper-half block ``▀`` carrying two tiles (foreground above, background
  below), so cells come out square; viridis as in the PNG pictures.
* plain: ``#`` every pair attended, ``+`` at least a third, ``.`` some,
  space none; one character covers a tile twice as tall as wide, again square.

A one-line summary (shape, density, attended pairs, tokens per cell) follows.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import TextIO

import numpy as np

from .errors import MaskValueError
from .masks import resolve_shape
from .render import MaskLike, as_mask, auto_tile, format_position, tile_fractions

DEFAULT_MAX_WIDTH = 96   # wider pictures are hard to read, even on wide terminals
UPPER_HALF = "\u2580"
RESET = "\x1b[0m"


def use_color(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stdout) is a colour terminal: a tty, ``NO_COLOR`` unset, TERM not dumb.

        >>> import io
        >>> use_color(io.StringIO())
        False
    """
    stream = sys.stdout if stream is None else stream
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream is no terminal
        return False


def plain_char(fraction: float) -> str:
    """'#' all attended, '+' at least a third, '.' some, ' ' none.

        >>> "".join(plain_char(f) for f in (1.0, 0.5, 0.1, 0.0))
        '#+. '
    """
    if fraction >= 1.0:
        return "#"
    if fraction >= 1.0 / 3.0:
        return "+"
    if fraction > 0.0:
        return "."
    return " "


def _rgb(fractions: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` viridis colours of fractions in [0, 1]."""
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    return np.round(np.asarray(cmap(fractions))[..., :3] * 255).astype(np.uint8)


def show(mask: MaskLike, length: int, *, kv_length: int | None = None, q_offset: int | None = None,
         width: int | None = None, color: bool | None = None, summary: bool = True) -> str:
    """The heatmap of ``mask`` as text for a terminal ``width`` characters wide.

    ``width`` defaults to the terminal's (at most 96); ``color`` defaults to
    whether stdout is a colour terminal (see :func:`use_color`). The text ends
    with a summary line unless ``summary=False``.

        >>> import attnmask as am
        >>> from attnmask.terminal import show
        >>> print(show("causal", 4, color=False, summary=False))
        +----+
        |#+  |
        |###+|
        +----+
    """
    mask = as_mask(mask)
    q_len, kv_len, q_offset = resolve_shape(length, kv_length, q_offset)
    if width is None:
        width = min(shutil.get_terminal_size((80, 24)).columns, DEFAULT_MAX_WIDTH)
    if isinstance(width, bool) or not isinstance(width, int) or width < 8:
        raise MaskValueError(f"width must be a whole number >= 8 characters, got {width!r}")
    if color is None:
        color = use_color()

    # Plain mode spends two border columns; each character is a tile twice as
    # tall as wide (terminal cells are about 1:2), colour mode packs two
    # square tiles into one character with the half block.
    cols = width if color else width - 2
    tile_k = auto_tile(kv_len, kv_len, cols)
    tile_q = tile_k if color else 2 * tile_k
    # Many more queries than keys would make a picture taller than it is wide;
    # stretch the query side of the tiles instead (cells are then not square).
    max_tile_rows = 2 * cols if color else cols
    if -(-q_len // tile_q) > max_tile_rows:
        tile_q = auto_tile(q_len, q_len, max_tile_rows)
    layout = mask.compile(q_len, kv_len, block_size=(tile_q, tile_k), q_offset=q_offset)
    frac = tile_fractions(layout)   # [n_q_blocks, n_kv_blocks]

    lines: list[str] = []
    if color:
        rgb = _rgb(frac)
        for r in range(0, frac.shape[0], 2):
            parts: list[str] = []
            cur_fg = cur_bg = None   # escape codes only where the colour changes: 10x less text
            for c in range(frac.shape[1]):
                fg = "\x1b[38;2;{};{};{}m".format(*rgb[r, c])
                if r + 1 < frac.shape[0]:
                    bg = "\x1b[48;2;{};{};{}m".format(*rgb[r + 1, c])
                else:
                    bg = "\x1b[49m"   # odd number of tile rows: the lower half stays blank
                if fg != cur_fg:
                    parts.append(fg)
                    cur_fg = fg
                if bg != cur_bg:
                    parts.append(bg)
                    cur_bg = bg
                parts.append(UPPER_HALF)
            lines.append("".join(parts) + RESET)
    else:
        border = "+" + "-" * frac.shape[1] + "+"
        lines.append(border)
        for r in range(frac.shape[0]):
            lines.append("|" + "".join(plain_char(f) for f in frac[r]) + "|")
        lines.append(border)
    if summary:
        lines.append(summary_line(layout, tile_q, tile_k))
    return "\n".join(lines)


def summary_line(layout, tile_q: int | None = None, tile_k: int | None = None) -> str:
    """``expr, q x kv, density, attended pairs, tokens per cell`` for a compiled layout.

        >>> import attnmask as am
        >>> summary_line(am.causal.compile(4))
        'causal, 4 x 4, density 62.50%, 10 attended pairs'
    """
    text = str(layout.mask)
    if len(text) > 48:
        text = text[:45] + "..."
    parts = [text, f"{layout.q_len:,} x {layout.kv_len:,}"]
    if layout.q_offset != layout.kv_len - layout.q_len:
        parts.append(f"q_offset {layout.q_offset:,}")
    parts += [f"density {layout.density:.2%}", f"{layout.attended_pairs():,} attended pairs"]
    if tile_q is not None and tile_k is not None and (tile_q, tile_k) != (1, 1):
        parts.append(f"cell = {format_position(tile_q)} x {format_position(tile_k)} tokens")
    return ", ".join(parts)


__all__ = ["show", "use_color", "plain_char", "summary_line"]

"""Heatmaps of masks: token-level for short sequences, exact block-level at any length.

Up to ``token_limit`` positions a side every (query, key) pair gets its own
cell, drawn from ``mask.to_dense``: viridis yellow where the query attends,
viridis dark purple where it is masked. Beyond that the picture is built from
the compiled :class:`attnmask.BlockLayout` only (``layout.tile_counts()``):
each cell is one tile and its colour the exact fraction of attended pairs in
it, so a million-token mask is drawn in seconds with no N^2 buffer.

Matrix orientation throughout: query 0 at the top, keys left to right, axes in
token positions, ticks ending at the length. matplotlib is imported inside the
functions so that ``import attnmask`` stays light.
"""

from __future__ import annotations

import io
import os
import sys
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from .errors import MaskValueError
from .language import as_mask
from . import late
from .masks import Mask, resolve_shape

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MaskLike = Union[Mask, str]

SAVE_FORMATS = (".png", ".svg", ".pdf")
MAX_CELLS_PER_SIDE = 1024   # block-level images stay at most this many cells a side
SIGNATURE_TITLE = "Context Length Attention Pattern"

SIGNATURE = "causal - (rows(36, 64, 8) - diagonal)"
"""The mask of the picture the project started from (length 64)."""


# ---------------------------------------------------------------------------
# small helpers shared with the terminal view
# ---------------------------------------------------------------------------

def auto_tile(q_len: int, kv_len: int, cells: int = MAX_CELLS_PER_SIDE) -> int:
    """The smallest tile (in tokens) that keeps the image within ``cells`` cells a side.

    Powers of two are preferred when they cost at most twice the cells of the
    exact minimum, because context lengths usually are powers of two and then
    every tile has the same area.

        >>> auto_tile(1 << 20, 1 << 20), auto_tile(3000, 3000), auto_tile(64, 64)
        (1024, 4, 1)
    """
    side = max(q_len, kv_len)
    tile = max(1, -(-side // cells))
    pow2 = 1 << (tile - 1).bit_length()
    return pow2 if -(-side // pow2) * 2 >= -(-side // tile) else tile


def tile_fractions(layout) -> np.ndarray:
    """float64 ``[n_q_blocks, n_kv_blocks]``: exact attended fraction of every tile.

    Computed from ``layout.tile_counts()`` (O(non-empty tiles)); a short last
    row or column of tiles is divided by its real area, not the nominal one.

        >>> import attnmask as am
        >>> tile_fractions(am.causal.compile(3, block_size=2)).tolist()
        [[0.75, 0.0], [1.0, 1.0]]
    """
    bq, bk = layout.block_size
    nqb, nkb = layout.n_q_blocks, layout.n_kv_blocks
    out = np.zeros((nqb, nkb), dtype=np.float64)
    qb, kb, counts = (t.numpy() for t in layout.tile_counts())
    rows = np.minimum((qb + 1) * bq, layout.q_len) - qb * bq
    cols = np.minimum((kb + 1) * bk, layout.kv_len) - kb * bk
    out[qb, kb] = counts / (rows * cols)
    return out


def format_position(value: int) -> str:
    """Tick text in the binary units of context lengths.

        >>> [format_position(n) for n in (1048576, 131072, 100)]
        ['1M', '128K', '100']
    """
    value = int(value)
    if value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value >> 20}M"
    if value >= 1 << 10 and value % (1 << 10) == 0:
        return f"{value >> 10}K"
    return str(value)


def _ticks(length: int, most: int = 8) -> list[int]:
    """4 to ``most + 1`` ticks from 0 that end exactly at ``length`` (more would crowd long labels)."""
    steps = sorted({m * 10 ** e for e in range(0, 8) for m in (1, 2, 5)}
                   | {1 << e for e in range(0, 24)})
    for step in steps:  # prefer a step that divides the length: the last tick lands on it
        if length % step == 0 and 3 <= length // step <= most:
            return list(range(0, length + 1, step))
    step = next((s for s in steps if length / s <= most), steps[-1])
    ticks = list(range(0, length, step))
    if ticks and length - ticks[-1] < step / 2:
        ticks.pop()  # too close to the end tick: their labels would overlap
    return ticks + [length]


def _viridis_ends() -> tuple[tuple[float, ...], tuple[float, ...]]:
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    return tuple(cmap(0.0)), tuple(cmap(1.0))


def check_path(path) -> str:
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in SAVE_FORMATS:
        raise MaskValueError(f"cannot save a picture as {str(path)!r}: the extension must be one of "
                             f"{', '.join(SAVE_FORMATS)}, got {(ext or '(no extension)')!r}")
    return ext


def new_figure(figsize, dpi, *, layout: str | None = None) -> "Figure":
    """A figure for the library's pictures (``layout`` as matplotlib takes it, e.g. "constrained")."""
    # A pyplot figure when the caller already works with pyplot (so plt.show()
    # sees it); otherwise a bare Agg-backed Figure that leaves no global state.
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt
        return plt.figure(figsize=figsize, dpi=dpi, layout=layout)
    from matplotlib.figure import Figure
    return Figure(figsize=figsize, dpi=dpi, layout=layout)


# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------

def draw_mask(ax: "Axes", mask: MaskLike, length: int, *, kv_length: int | None = None,
              q_offset: int | None = None, block_size: int | None = None, token_limit: int = 2048,
              colorbar: bool = True, scale: str = "linear", max_ticks: int = 8) -> dict:
    """Draw the heatmap of ``mask`` on ``ax``; returns what was drawn.

    Token-level (one cell per pair, two viridis end colours) when both sides
    are at most ``token_limit`` and no ``block_size`` is given; otherwise
    block-level from the compiled layout, tiles of ``block_size`` tokens
    (default: chosen so the image has at most ~1024 cells a side), each cell
    the exact attended fraction. ``scale="log"`` colours block-level cells on
    a log scale (empty tiles stay dark purple), so sparse tiles such as a
    4-key sink column in 1024-key tiles stay visible. ``max_ticks`` bounds the
    tick intervals per axis (small figures want fewer). The result dict has ``level`` ('token' or 'block'), ``tile``, ``q_len``,
    ``kv_len``, ``q_offset`` and the ``layout`` used for figures.

        >>> from matplotlib.figure import Figure
        >>> from attnmask.render import draw_mask
        >>> draw_mask(Figure().add_subplot(), "causal", 8)["level"]
        'token'
    """
    mask = as_mask(mask)
    q_len, kv_len, q_offset = resolve_shape(length, kv_length, q_offset)
    if isinstance(token_limit, bool) or not isinstance(token_limit, int) or token_limit < 1:
        raise MaskValueError(f"token_limit must be a whole number >= 1, got {token_limit!r}")
    if scale not in ("linear", "log"):
        raise MaskValueError(f"scale must be 'linear' or 'log', got {scale!r}")
    purple, yellow = _viridis_ends()
    if block_size is None and max(q_len, kv_len) <= token_limit:
        level = "token"
        tile = 1
        from matplotlib.colors import ListedColormap
        image = mask.to_dense(q_len, kv_len, q_offset=q_offset).numpy()
        cmap = ListedColormap([purple, yellow])
        ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto",
                  extent=(0, kv_len, q_len, 0))
        layout = None
    else:
        level = "block"
        if block_size is None:
            tile = auto_tile(q_len, kv_len)
        else:
            if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
                raise MaskValueError(f"block_size must be a whole number >= 1, got {block_size!r}")
            tile = block_size
        n_cells = -(-q_len // tile) * -(-kv_len // tile)
        if n_cells > 16 * MAX_CELLS_PER_SIDE ** 2:
            raise MaskValueError(
                f"block_size={tile} would give a {-(-q_len // tile)} x {-(-kv_len // tile)} image; "
                f"use block_size >= {auto_tile(q_len, kv_len, 4 * MAX_CELLS_PER_SIDE)} or leave it unset")
        layout = mask.compile(q_len, kv_len, block_size=tile, q_offset=q_offset)
        image = tile_fractions(layout)
        # "antialiased" averages cells when the image has more cells than the
        # axes have pixels, so a one-tile-wide band never drops out of the picture.
        # The image covers whole tiles; the view is clipped to the real lengths
        # so a short last tile is drawn at its true width.
        extent = (0, layout.n_kv_blocks * tile, layout.n_q_blocks * tile, 0)
        if scale == "log":
            import matplotlib
            from matplotlib.colors import LogNorm
            positive = image[image > 0]
            # a decade below the sparsest tile, so even that one stands out from empty purple
            floor = min(float(positive.min()) / 10 if positive.size else 0.1, 0.1)
            cmap = matplotlib.colormaps["viridis"].with_extremes(bad=purple, under=purple)
            im = ax.imshow(np.ma.masked_less_equal(image, 0.0), cmap=cmap, norm=LogNorm(vmin=floor, vmax=1.0),
                           interpolation="antialiased", aspect="auto", extent=extent)
        else:
            im = ax.imshow(image, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="antialiased",
                           aspect="auto", extent=extent)
        ax.set_xlim(0, kv_len)
        ax.set_ylim(q_len, 0)
        if colorbar:
            cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            cb.set_label("fraction of attended pairs in tile" + (" (log scale)" if scale == "log" else ""))
    ax.set_xlabel("Context Length")
    ax.set_ylabel("Query position")
    xt, yt = _ticks(kv_len, max_ticks), _ticks(q_len, max_ticks)
    ax.set_xticks(xt, [format_position(t) for t in xt])
    ax.set_yticks(yt, [format_position(q_offset + t) if q_offset else format_position(t) for t in yt])
    return {"level": level, "tile": tile, "q_len": q_len, "kv_len": kv_len, "q_offset": q_offset,
            "layout": layout, "mask": mask}


def _annotation(info: dict) -> str:
    layout = info["layout"]
    if layout is None:  # token level: a tiny compile gives the exact figures without recounting
        layout = info["mask"].compile(info["q_len"], info["kv_len"], q_offset=info["q_offset"])
    return f"density {layout.density:.2%} · {layout.attended_pairs():,} attended pairs"


def _title_of(mask: Mask, limit: int = 60) -> str:
    text = str(mask)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render(mask: MaskLike | Sequence[MaskLike], length: int, *, kv_length: int | None = None,
           q_offset: int | None = None, block_size: int | None = None, title: str | None = None,
           titles: Sequence[str] | None = None, figsize: tuple[float, float] | None = None, dpi: int = 100,
           annotate: bool = True, token_limit: int = 2048, path: str | os.PathLike | None = None,
           ax: "Axes | None" = None, scale: str = "linear") -> "Figure":
    """The heatmap of a mask (or of several, side by side) as a matplotlib Figure.

    ``mask`` is a Mask, mask text, or a list of them (per-head or per-layer
    comparisons; ``titles`` names each panel, ``title`` the whole figure).
    ``length`` is the number of queries; ``kv_length`` (default ``length``)
    and ``q_offset`` (default ``kv_length - length``) as in ``Mask.to_dense``.
    Token-level up to ``token_limit`` positions a side, block-level beyond
    or whenever ``block_size`` (the tile) is given; the default tile keeps at
    most ~1024 cells a side.
    ``annotate`` adds density and attended pairs under the title. ``path``
    saves the figure as PNG, SVG or PDF (chosen by extension). ``ax`` draws a
    single mask on an existing axes instead of a new figure. ``scale="log"``
    colours block-level cells on a log scale (see :func:`draw_mask`).

        >>> import attnmask as am
        >>> fig = am.render("causal & sliding(16)", 64, title="window 16")
        >>> fig.axes[0].get_xlabel()
        'Context Length'
    """
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if not masks:
        raise MaskValueError("render needs at least one mask, got an empty list")
    masks = [as_mask(m) for m in masks]
    if titles is not None:
        titles = list(titles)
        if len(titles) != len(masks):
            raise MaskValueError(f"titles has {len(titles)} entries for {len(masks)} masks; give one per mask")
    ext = check_path(path) if path is not None else None
    if ax is not None and len(masks) > 1:
        raise MaskValueError(f"ax= draws one mask, got {len(masks)}; leave ax unset for side-by-side panels")

    if figsize is not None:
        try:
            w, h = (float(v) for v in figsize)
        except (TypeError, ValueError):
            raise MaskValueError(f"figsize must be (width, height) in inches, got {figsize!r}") from None
        if not (w > 0 and h > 0):
            raise MaskValueError(f"figsize must be positive (width, height) in inches, got {figsize!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise MaskValueError(f"dpi must be a positive number, got {dpi!r}")
    n = len(masks)
    if ax is None:
        if figsize is None:
            figsize = (5.2 * n + 0.6, 5.0) if n > 1 else (6.4, 5.6)
        fig = new_figure(figsize, dpi)
        axes = fig.subplots(1, n, squeeze=False)[0]
    else:
        fig = ax.figure
        axes = [ax]

    for i, (m, a) in enumerate(zip(masks, axes)):
        info = draw_mask(a, m, length, kv_length=kv_length, q_offset=q_offset, block_size=block_size,
                         token_limit=token_limit, scale=scale)
        if titles is not None:
            head = titles[i]
        elif n == 1 and title is not None:
            head = title
        else:
            head = _title_of(m)
        lines = [head]
        if info["level"] == "block":
            lines.append(f"block-level: {info['tile']:,} x {info['tile']:,} tokens per cell")
        if annotate:
            lines.append(_annotation(info))
        a.set_title("\n".join(lines), fontsize=12 if len(lines) == 1 else 10)
    if n > 1 and title is not None:
        fig.suptitle(title)
    if ax is None:
        fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format=ext[1:], dpi=dpi)
    return fig


def display_length(mask: MaskLike) -> int:
    """A length that shows what the mask does: about twice its largest parameter, 128 to 4096.

    ``sliding(1024)`` at 128 tokens would look like plain causal; documents show at their
    packed length. Powers of two, so the axis ticks stay round.

        >>> import attnmask as am
        >>> display_length(am.causal), display_length(am.causal & am.sliding(1024)), display_length(am.document(300, 500))
        (128, 2048, 1024)
    """
    from .masks import Primitive
    largest = 0
    stack = [as_mask(mask)]
    while stack:
        m = stack.pop()
        if isinstance(m, Primitive):
            largest = max(largest, m.kind.display_extent(m.args))   # each primitive knows its scale
        stack.extend(m.children())
    length = 128
    while length < min(largest, 4096):
        length *= 2
    return length


def repr_png(mask: MaskLike, length: int | None = None) -> bytes:
    """A small PNG of the mask at ``length`` (default :func:`display_length`; Jupyter's ``Mask._repr_png_``).

        >>> import attnmask as am
        >>> am.causal._repr_png_()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    from matplotlib.figure import Figure
    mask = as_mask(mask)
    if length is None:
        length = display_length(mask)
    fig = Figure(figsize=(4.0, 3.8), dpi=80)
    ax = fig.add_subplot()
    draw_mask(ax, mask, length, max_ticks=4)       # a 320-pixel figure: four-digit labels need room
    ax.set_title(_title_of(mask, 50), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_signature(path: str | os.PathLike | None = "signature.png", *, dpi: int = 100) -> "Figure":
    """The picture the project started from: ``am.SIGNATURE`` at length 64.

    Titled "Context Length Attention Pattern", keys on the "Context Length"
    axis with ticks to 64: a purple upper-right triangle, a yellow lower-left
    one with a sharp diagonal, and four evenly spaced purple cuts in the lower
    half, each from the left edge to the diagonal.

        >>> import attnmask as am
        >>> from attnmask.render import render_signature
        >>> render_signature(None).axes[0].get_title()
        'Context Length Attention Pattern'
    """
    return render(SIGNATURE, 64, title=SIGNATURE_TITLE, annotate=False, figsize=(6.0, 5.4), dpi=dpi,
                  path=path)


late.provide("repr_png", repr_png)

__all__ = ["SIGNATURE", "render", "draw_mask", "repr_png", "render_signature", "tile_fractions", "auto_tile",
           "format_position", "as_mask"]

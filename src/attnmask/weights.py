"""Pictures of real attention weights, in the project's visual language (viridis, "Context Length").

- :func:`render_weights`: heads' weights ``[H, Lq, Lk]`` as heatmaps (linear,
  log or sqrt scale) in a grid of ``ncols`` columns, optionally cropped to a
  window of query and key positions, with a mask's outline drawn over them
  and the share of mass it keeps in each title.
- :func:`render_overview`: every layer x head of a model at once, each head
  pooled to a small tile (mean weight per tile).
- :func:`head_census` / :func:`render_census`: what each head mostly does
  (sink, self, previous token, local band, columns, diffuse), by mass.
- :func:`render_plan`: a :class:`MaskPlan`'s density per layer and head.

Weights are what :func:`attnmask.models.capture` returns; nothing here needs
transformers. matplotlib is imported inside the functions.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from .errors import MaskValueError
from .fitting import CAUSAL_FAMILY, FAMILIES
from .language import as_mask
from .masks import Mask
from .primitives.ranges import SINK
from .render import auto_tile, check_path, format_position, new_figure

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .plan import MaskPlan

SCALES = ("linear", "log", "sqrt")
OUTLINE = "#ff5a36"            # the mask's outline: visible on viridis purple and yellow alike
LOG_FLOOR = 1e-4               # weights below this are drawn as the darkest purple on the log scale
# What a head mostly does; the first, mass on the first keys, is named after the primitive that keeps them.
HEAD_TYPES = (SINK.name, "self", "previous", "local", "columns", "diffuse")


def _save(fig, path) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), format=check_path(path)[1:])


def _ticks(lo: int, hi: int, most: int = 6) -> list[int]:
    """Round tick positions in [lo, hi], ending at hi."""
    span = max(1, hi - lo)
    step = next(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536,
                            1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 30) if span / s <= most)
    first = -(-lo // step) * step
    ticks = list(range(first, hi + 1, step))
    if ticks and hi - ticks[-1] < step / 2 and ticks[-1] != hi:
        ticks.pop()
    if not ticks or ticks[-1] != hi:
        ticks.append(hi)
    return ticks


def _as_heads(weights) -> torch.Tensor:
    w = torch.as_tensor(weights)
    if w.dim() == 2:
        w = w[None]
    if w.dim() == 4 and w.shape[0] == 1:
        w = w[0]
    if w.dim() != 3:
        raise MaskValueError(f"weights must be [Lq, Lk] or [H, Lq, Lk] (or [1, H, Lq, Lk]), got {tuple(w.shape)}")
    return w


def _window(window, q_len: int, kv_len: int, q_offset: int) -> tuple[int, int, int, int]:
    """(q0, q1, k0, k1) in positions, from None, (a, b) for both sides, or ((q0, q1), (k0, k1))."""
    if window is None:
        return q_offset, q_offset + q_len, 0, kv_len
    try:
        if len(window) == 2 and all(isinstance(v, (int, np.integer)) for v in window):
            (q0, q1), (k0, k1) = window, window
        else:
            (q0, q1), (k0, k1) = window
        q0, q1, k0, k1 = (int(v) for v in (q0, q1, k0, k1))
    except (TypeError, ValueError):
        raise MaskValueError(f"window must be (start, stop) or ((q_start, q_stop), (k_start, k_stop)) in "
                             f"positions, got {window!r}") from None
    if not (q_offset <= q0 < q1 <= q_offset + q_len and 0 <= k0 < k1 <= kv_len):
        raise MaskValueError(f"window {window!r} is outside the weights: queries {q_offset}..{q_offset + q_len}, "
                             f"keys 0..{kv_len}")
    return q0, q1, k0, k1


def _pool(img: np.ndarray, tile: int, how: str) -> np.ndarray:
    if tile == 1:
        return img
    r, c = img.shape
    pr, pc = -(-r // tile) * tile, -(-c // tile) * tile
    pad = np.full((pr, pc), np.nan)
    pad[:r, :c] = img
    blocks = pad.reshape(pr // tile, tile, pc // tile, tile)
    return np.nanmax(blocks, axis=(1, 3)) if how == "max" else np.nanmean(blocks, axis=(1, 3))


def _norm(scale: str, vmax: float):
    from matplotlib.colors import LogNorm, Normalize, PowerNorm
    if scale == "log":
        return LogNorm(vmin=min(LOG_FLOOR, vmax / 10), vmax=vmax)
    if scale == "sqrt":
        return PowerNorm(0.5, vmin=0.0, vmax=vmax)
    return Normalize(vmin=0.0, vmax=vmax)


def _cmap():
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    return cmap.with_extremes(bad=cmap(0.0), under=cmap(0.0))


def render_weights(weights, *, mask: Mask | str | Sequence[Mask | str] | None = None, scale: str = "log",
                   ncols: int | None = None, window=None, q_offset: int | None = None,
                   titles: Sequence[str] | None = None, title: str | None = None, max_cells: int = 256,
                   pool: str = "max", figsize: tuple[float, float] | None = None, dpi: int = 100,
                   colorbar: bool = True, path: str | os.PathLike | None = None) -> "Figure":
    """Attention weights as heatmaps, one panel per head, like the signature picture.

    ``weights`` is ``[Lq, Lk]`` or ``[H, Lq, Lk]`` (one layer of
    :func:`attnmask.models.capture`, e.g. ``maps[12][0]``). ``scale``:
    ``"linear"``, ``"log"`` (weights under 1e-4 darkest) or ``"sqrt"``.
    ``ncols`` panels per row (default: up to 3). ``window`` crops to query and
    key positions: ``(start, stop)`` for both or ``((q0, q1), (k0, k1))``.
    ``mask`` (one for all heads or one per head) is outlined over the weights
    (at the picture's tile resolution) and each title gives the share of mass
    it keeps in the window's rows.
    A window wider than ``max_cells`` is pooled to tiles (``pool="max"``
    keeps one-key columns visible; ``"mean"`` averages).

        >>> import torch, attnmask as am
        >>> w = torch.softmax(torch.randn(4, 64, 64).masked_fill(~am.causal.to_dense(64), -torch.inf), -1)
        >>> fig = am.render_weights(w, mask="causal & sliding(16)", ncols=2, scale="sqrt")
        >>> len(fig.axes), fig.axes[0].get_xlabel()
        (5, 'Context Length')
    """
    w = _as_heads(weights)
    n, q_len, kv_len = w.shape
    if scale not in SCALES:
        raise MaskValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if pool not in ("max", "mean"):
        raise MaskValueError(f"pool must be 'max' or 'mean', got {pool!r}")
    if ncols is None:
        ncols = min(n, 3)
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise MaskValueError(f"ncols must be a whole number >= 1, got {ncols!r}")
    if titles is not None and len(titles) != n:
        raise MaskValueError(f"titles has {len(titles)} entries for {n} heads; give one per head")
    if path is not None:
        check_path(path)
    q_offset = kv_len - q_len if q_offset is None else int(q_offset)
    q0, q1, k0, k1 = _window(window, q_len, kv_len, q_offset)
    masks: list[Mask | None]
    if mask is None:
        masks = [None] * n
    elif isinstance(mask, (list, tuple)):
        if len(mask) != n:
            raise MaskValueError(f"{len(mask)} masks for {n} heads; give one mask or one per head")
        masks = [as_mask(m) for m in mask]
    else:
        masks = [as_mask(mask)] * n

    from .fitting import coverage
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    if figsize is None:
        figsize = (4.3 * ncols + (0.9 if colorbar else 0.2), 3.9 * nrows + 0.4)
    fig = new_figure(figsize, dpi, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    crop = w[:, q0 - q_offset:q1 - q_offset, k0:k1].to(torch.float64).numpy()
    vmax = float(crop.max()) if crop.size and crop.max() > 0 else 1.0
    norm = _norm(scale, vmax)
    tile = auto_tile(q1 - q0, k1 - k0, max_cells)
    dense_cache: dict[Mask, np.ndarray] = {}
    image = None
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_axis_off()
            continue
        img = _pool(crop[i], tile, pool)
        extent = (k0, k0 + img.shape[1] * tile, q0 + img.shape[0] * tile, q0)
        shown = np.ma.masked_less_equal(img, 0.0) if scale == "log" else img
        image = ax.imshow(shown, cmap=_cmap(), norm=norm, interpolation="nearest", aspect="auto", extent=extent)
        ax.set_xlim(k0, k1)
        ax.set_ylim(q1, q0)
        head = titles[i] if titles is not None else (f"head {i}" if n > 1 else "attention weights")
        m = masks[i]
        if m is not None:
            if m not in dense_cache:
                dense_cache[m] = m.to_dense(q_len, kv_len, q_offset=q_offset).numpy()[q0 - q_offset:q1 - q_offset, k0:k1]
            # the outline at the picture's resolution: edges between attended and masked cells (a tile is
            # attended when any pair in it is), so a mask of many close columns reads as bands, not a fill
            cells = _pool(dense_cache[m].astype(np.float64), tile, "max")
            ax.contour(k0 + (np.arange(cells.shape[1]) + 0.5) * tile, q0 + (np.arange(cells.shape[0]) + 0.5) * tile,
                       cells, levels=[0.5], colors=[OUTLINE], linewidths=0.8)
            kept = coverage(m, w[i:i + 1], rows=(q0 - q_offset, q1 - q_offset), q_offset=q_offset)
            head += f" · kept {kept.mean:.1%}"
        ax.set_title(head, fontsize=10)
        ax.set_xlabel("Context Length")
        if i % ncols == 0:
            ax.set_ylabel("Query position")
        xt, yt = _ticks(k0, k1), _ticks(q0, q1)
        ax.set_xticks(xt, [format_position(t) for t in xt])
        ax.set_yticks(yt, [format_position(t) for t in yt])
    if title is not None:
        fig.suptitle(title)
    if colorbar and image is not None:
        cb = fig.colorbar(image, ax=list(axes[:n]), fraction=0.03 if ncols > 1 else 0.046, pad=0.02)
        cb.set_label("attention weight" + ("" if scale == "linear" else f" ({scale} scale)")
                     + ("" if tile == 1 else f", {pool} of {tile} x {tile} tokens"))
    _save(fig, path)
    return fig


def _layer_maps(maps) -> dict[int, torch.Tensor]:
    items = maps.items() if isinstance(maps, Mapping) else enumerate(maps)
    out = {int(k): _as_heads(v) for k, v in items}
    if not out:
        raise MaskValueError("maps are empty: give {layer: weights [H, L, L]}")
    return out


def render_overview(maps, *, cells: int = 64, scale: str = "log", title: str | None = None,
                    layers_across: bool | None = None, dpi: int = 100,
                    path: str | os.PathLike | None = None) -> "Figure":
    """Every layer x head of a model at once, each head pooled to ``cells x cells`` tiles.

    ``maps`` is ``{layer: [H, L, L]}`` (or ``[1, H, L, L]``), as capture returns.
    Each tile's colour is the mean weight of its tokens, on ``scale``. Layers
    run left to right when there are more layers than heads (a wide picture),
    else top to bottom; ``layers_across`` chooses.

        >>> import torch
        >>> from attnmask.weights import render_overview
        >>> fig = render_overview({layer: torch.rand(2, 32, 32) for layer in range(4)}, cells=16)
        >>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
        ('layer', 'head')
    """
    if scale not in SCALES:
        raise MaskValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if path is not None:
        check_path(path)
    layers = _layer_maps(maps)
    order = sorted(layers)
    heads = layers[order[0]].shape[0]
    length = layers[order[0]].shape[-1]
    across = len(order) >= heads if layers_across is None else bool(layers_across)
    tile = max(1, -(-length // cells))
    side = -(-length // tile)
    gap = max(1, side // 12)
    n_rows, n_cols = (heads, len(order)) if across else (len(order), heads)
    canvas = np.full((n_rows * (side + gap) - gap, n_cols * (side + gap) - gap), np.nan)
    for li, layer in enumerate(order):
        w = layers[layer].to(torch.float64).numpy()
        for h in range(w.shape[0]):
            img = _pool(w[h], tile, "mean")
            r, c = (h, li) if across else (li, h)
            canvas[r * (side + gap):r * (side + gap) + img.shape[0],
                   c * (side + gap):c * (side + gap) + img.shape[1]] = img
    finite = canvas[np.isfinite(canvas)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    cmap = _cmap().with_extremes(bad="white")
    width = min(24.0, 0.5 * n_cols + 2.0)
    fig = new_figure((width, (width - 2.0) * n_rows / n_cols + 1.6), dpi, layout="constrained")
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(np.where(canvas <= 0, LOG_FLOOR / 10, canvas) if scale == "log" else canvas)
    im = ax.imshow(shown, cmap=cmap, norm=_norm(scale, vmax), interpolation="antialiased", aspect="equal")
    col_names, row_names = ([str(l) for l in order], [str(h) for h in range(heads)]) if across else \
        ([str(h) for h in range(heads)], [str(l) for l in order])
    ax.set_xticks([c * (side + gap) + side / 2 for c in range(n_cols)], col_names)
    ax.set_yticks([r * (side + gap) + side / 2 for r in range(n_rows)], row_names)
    ax.tick_params(length=0, labelsize=8)
    ax.set_xlabel("layer" if across else "head")
    ax.set_ylabel("head" if across else "layer")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title or f"Attention of every head, {length:,} tokens (each tile: keys left to right, "
                 f"queries top to bottom, mean of {tile} x {tile} tokens)", fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, shrink=0.9)
    cb.set_label("mean attention weight" + ("" if scale == "linear" else f" ({scale} scale)"))
    _save(fig, path)
    return fig


def head_census(maps, *, start: int = 32, sink_keys: int = 4, local: int = 32, columns: int = 16) -> dict:
    """What each head mostly does, by where its mass goes on rows ``q >= start``.

    Each row's mass is split into disjoint parts: ``sink`` (keys < ``sink_keys``),
    ``self`` (k = q), ``previous`` (k = q - 1), ``local`` (2 <= q - k <=
    ``local``), ``columns`` (farther keys among the head's ``columns`` heaviest
    key positions) and ``diffuse`` (the rest); a head's type is its largest part
    (mean over rows). Returns ``{"types": {layer: [type per head]}, "shares":
    {layer: [H, 6] tensor}, "counts": {type: heads}}``.

        >>> import torch
        >>> from attnmask.weights import head_census
        >>> w = torch.zeros(2, 64, 64); w[0, :, 0] = 1.0; w[1] = torch.eye(64)
        >>> head_census({0: w})["types"][0]
        ['sink', 'self']
    """
    layers = _layer_maps(maps)
    types, shares, counts = {}, {}, {t: 0 for t in HEAD_TYPES}
    for layer in sorted(layers):
        w = layers[layer].to(torch.float64)
        h, q_len, kv_len = w.shape
        off = kv_len - q_len
        rows = slice(min(max(0, start - off), q_len - 1), q_len)
        wr = w[:, rows]
        wr = wr / wr.sum(-1, keepdim=True).clamp_min(1e-300)
        q = torch.arange(q_len)[rows].view(-1, 1) + off
        k = torch.arange(kv_len).view(1, -1)
        d = q - k
        sink_part = k < sink_keys
        parts = [sink_part, (d == 0) & ~sink_part, (d == 1) & ~sink_part, (d >= 2) & (d <= local) & ~sink_part]
        far = (d > local) & ~sink_part
        colmass = (wr * far).sum(1)                                       # [H, Lk]
        top = torch.topk(colmass, min(columns, kv_len), -1).indices
        col_sel = torch.zeros(h, 1, kv_len, dtype=torch.bool)
        col_sel.scatter_(-1, top.view(h, 1, -1), True)
        share = torch.stack([(wr * p).sum(-1).mean(-1) for p in parts] + [(wr * (far & col_sel)).sum(-1).mean(-1)], 1)
        share = torch.cat([share, (1 - share.sum(1, keepdim=True)).clamp_min(0)], 1)
        shares[layer] = share
        types[layer] = [HEAD_TYPES[int(i)] for i in share.argmax(1)]
        for t in types[layer]:
            counts[t] += 1
    return {"types": types, "shares": shares, "counts": counts}


def _category_colors() -> dict[str, tuple]:
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    return {t: cmap(v) for t, v in zip(HEAD_TYPES, (0.95, 0.75, 0.6, 0.45, 0.28, 0.08))}


def render_census(census: dict, *, title: str | None = None, dpi: int = 100,
                  path: str | os.PathLike | None = None) -> "Figure":
    """The census of :func:`head_census` as a layer x head grid coloured by head type, with the counts.

        >>> import torch
        >>> from attnmask.weights import head_census, render_census
        >>> fig = render_census(head_census({0: torch.eye(8)[None].repeat(2, 1, 1)}))
        >>> fig.axes[0].get_ylabel()
        'layer'
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    if path is not None:
        check_path(path)
    types = census["types"]
    order = sorted(types)
    heads = len(types[order[0]])
    grid = np.array([[HEAD_TYPES.index(t) for t in types[l]] for l in order])
    colors = _category_colors()
    fig = new_figure((0.42 * heads + 3.6, 0.26 * len(order) + 1.6), dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(grid, cmap=ListedColormap([colors[t] for t in HEAD_TYPES]), vmin=-0.5, vmax=len(HEAD_TYPES) - 0.5,
              interpolation="nearest", aspect="auto")
    ax.set_xticks(range(heads), [str(h) for h in range(heads)])
    ax.set_yticks(range(len(order)), [str(l) for l in order])
    ax.tick_params(length=0, labelsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    counts = census["counts"]
    ax.legend(handles=[Patch(color=colors[t], label=f"{t} ({counts.get(t, 0)})") for t in HEAD_TYPES],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or "Head types (largest share of mass)", fontsize=10)
    _save(fig, path)
    return fig


def render_plan(plan: "MaskPlan", *, title: str | None = None, dpi: int = 100,
                path: str | os.PathLike | None = None) -> "Figure":
    """A plan at a glance: density (attended / causal pairs) per layer and head, with each head's family.

    Letters: c causal, w window, d dilated, k chunked, s static columns,
    t top_columns (data-dependent). Densities come from the plan's figures.

        >>> import attnmask as am
        >>> from attnmask.weights import render_plan
        >>> fig = render_plan(am.MaskPlan.uniform("causal", layers=2, heads=3))
        >>> fig.axes[0].get_ylabel()
        'layer'
    """
    if path is not None:
        check_path(path)
    letters = dict(zip((CAUSAL_FAMILY,) + FAMILIES, "cwdkst"))   # causal, window, dilated, chunked, columns, dynamic
    figs = plan.figures
    dens = np.array([[f.get("density", np.nan) for f in layer] for layer in figs]) if figs else \
        np.ones((plan.n_layers, plan.n_heads))
    fig = new_figure((0.42 * plan.n_heads + 2.6, 0.26 * plan.n_layers + 1.7), dpi, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(dens, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    if figs:
        for l, layer in enumerate(figs):
            for h, f in enumerate(layer):
                ax.text(h, l, letters.get(f.get("family", ""), "?"), ha="center", va="center", fontsize=7,
                        color="black" if dens[l, h] > 0.6 else "white")
    ax.set_xticks(range(plan.n_heads), [str(h) for h in range(plan.n_heads)])
    ax.set_yticks(range(plan.n_layers), [str(l) for l in range(plan.n_layers)])
    ax.tick_params(length=0, labelsize=8)
    ax.set_ylabel("layer")
    meta = plan.meta
    if title is None:
        title = "Mask plan: density per head"
        if "keep" in meta:
            title += f"\nkeep {meta['keep']:.0%}, mean density {meta.get('density_mean', float(np.nanmean(dens))):.3f}"
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.06, pad=0.03)
    cb.set_label("attended pairs / causal pairs")
    ax.set_xlabel("head\nc causal · w window · d dilated · k chunked · s columns · t top_columns", fontsize=8)
    _save(fig, path)
    return fig


__all__ = ["render_weights", "render_overview", "head_census", "render_census", "render_plan", "HEAD_TYPES"]

"""What the heatmaps draw: pixel colours, exact tile fractions, the signature's axes, the terminal view."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import attnmask as am
from attnmask.render import auto_tile, draw_mask, render, render_signature, repr_png, tile_fractions
from attnmask.terminal import plain_char, show, use_color

VIRIDIS = matplotlib.colormaps["viridis"]
YELLOW = np.array(VIRIDIS(1.0)[:3])
PURPLE = np.array(VIRIDIS(0.0)[:3])


def _cell_colours(fig, ax, png_path, q_len: int, kv_len: int) -> np.ndarray:
    """RGB [q_len, kv_len, 3] read from the saved PNG at the centre of every (query, key) cell."""
    pixels = mpimg.imread(png_path)[..., :3]
    height = pixels.shape[0]
    jj, ii = np.meshgrid(np.arange(kv_len) + 0.5, np.arange(q_len) + 0.5)
    xy = ax.transData.transform(np.stack([jj.ravel(), ii.ravel()], axis=1))
    cols = np.floor(xy[:, 0]).astype(int)
    rows = height - 1 - np.floor(xy[:, 1]).astype(int)   # display y grows upwards, PNG rows downwards
    return pixels[rows, cols].reshape(q_len, kv_len, 3)


def _assert_two_colours(colours: np.ndarray, dense: np.ndarray) -> None:
    expected = np.where(dense[..., None], YELLOW, PURPLE)
    np.testing.assert_allclose(colours, expected, atol=2.5 / 255)


def _brute_fractions(dense: np.ndarray, tq: int, tk: int) -> np.ndarray:
    """Tile means by brute force over a dense matrix, short last tiles divided by their own area."""
    q, k = dense.shape
    nq, nk = -(-q // tq), -(-k // tk)
    padded = np.zeros((nq * tq, nk * tk))
    padded[:q, :k] = dense
    sums = padded.reshape(nq, tq, nk, tk).sum(axis=(1, 3))
    rows = np.minimum(np.arange(1, nq + 1) * tq, q) - np.arange(nq) * tq
    cols = np.minimum(np.arange(1, nk + 1) * tk, k) - np.arange(nk) * tk
    return sums / (rows[:, None] * cols[None, :])


@pytest.mark.parametrize("expr, q_len, kv_len, q_offset", [
    ("causal & sliding(3) | sink(1)", 12, None, None),
    ("sliding(3) | cols(7)", 6, 10, None),            # decoding shape: queries are the last positions
    ("band(1, 2) - diagonal", 9, 9, 2),
])
def test_token_level_pixels_match_the_mask(tmp_path, expr, q_len, kv_len, q_offset):
    path = tmp_path / "m.png"
    fig = render(expr, q_len, kv_length=kv_len, q_offset=q_offset, figsize=(5, 5), dpi=100,
                 annotate=False, path=path)
    ax = fig.axes[0]
    kv = kv_len or q_len
    dense = am.parse(expr).to_dense(q_len, kv, q_offset=q_offset).numpy()
    assert dense.any() and not dense.all()
    _assert_two_colours(_cell_colours(fig, ax, path, q_len, kv), dense)
    # matrix orientation: query 0 at the top, keys left to right, ticks ending at the lengths
    assert ax.get_ylim() == (q_len, 0) and ax.get_xlim() == (0, kv)
    assert ax.get_xticks()[-1] == kv and ax.get_yticks()[-1] == q_len
    assert ax.get_xlabel() == "Context Length" and ax.get_ylabel() == "Query position"


def test_signature_picture(tmp_path):
    path = tmp_path / "signature.png"
    fig = render_signature(path, dpi=100)
    ax = fig.axes[0]
    assert ax.get_title() == "Context Length Attention Pattern"
    assert ax.get_xlabel() == "Context Length"
    ticks = ax.get_xticks()
    assert ticks[0] == 0 and ticks[-1] == 64 and ax.get_xlim() == (0, 64)
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "64"
    colours = _cell_colours(fig, ax, path, 64, 64)
    is_yellow = np.abs(colours - YELLOW).max(-1) < 3 / 255
    is_purple = np.abs(colours - PURPLE).max(-1) < 3 / 255
    assert (is_yellow | is_purple).all()
    q, k = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    assert is_purple[k > q].all()                        # the future: solid purple upper-right triangle
    assert is_yellow[np.arange(64), np.arange(64)].all()  # a sharp diagonal
    cut_rows = [r for r in range(64) if not is_yellow[r, :r].any() and r > 0]
    assert cut_rows == [36, 44, 52, 60]                   # four evenly spaced cuts in the lower half
    other = [r for r in range(64) if r not in cut_rows]
    for r in other:
        assert is_yellow[r, :r + 1].all()


def test_block_level_cells_are_exact_tile_fractions():
    mask = am.parse("causal & (sliding(300) | sink(5)) | rows(1000, 1100, 7)")
    q_len = 3000
    dense = mask.to_dense(q_len).numpy()
    for block in (7, None):   # 7: short last tiles (3000 = 428 * 7 + 4); None: the automatic tile
        fig = render(mask, q_len, token_limit=1000, block_size=block, annotate=True)
        ax = fig.axes[0]
        tile = block or auto_tile(q_len, q_len)
        got = np.asarray(ax.images[0].get_array())
        np.testing.assert_allclose(got, _brute_fractions(dense, tile, tile), rtol=0, atol=1e-12)
        assert f"{tile:,} x {tile:,} tokens per cell" in ax.get_title()
        assert f"{int(dense.sum()):,} attended pairs" in ax.get_title()
        cbar = fig.axes[1]
        assert "fraction of attended pairs" in cbar.get_ylabel()
        assert ax.get_xlim() == (0, q_len) and ax.get_ylim() == (q_len, 0)


def test_explicit_block_size_gives_a_block_level_picture_even_when_short():
    fig = render("causal", 10, block_size=4)   # 10 = 4 + 4 + 2: a short last row and column of tiles
    got = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(got, [[10 / 16, 0, 0], [1, 10 / 16, 0], [1, 1, 3 / 4]])
    assert "4 x 4 tokens per cell" in fig.axes[0].get_title()


def test_block_level_with_kv_length_and_offset():
    mask = am.parse("sliding(200) | sink(3)")
    dense = mask.to_dense(500, 1500, q_offset=700).numpy()
    fig = render(mask, 500, kv_length=1500, q_offset=700, token_limit=400, block_size=64)
    got = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(got, _brute_fractions(dense, 64, 64), atol=1e-12)


def test_large_lengths_never_build_a_dense_matrix(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dense matrix built")
    monkeypatch.setattr(am.Mask, "to_dense", refuse)
    monkeypatch.setattr(am.BlockLayout, "to_dense", refuse)
    fig = render("causal & (sliding(4096) | sink(4))", 262_144)
    img = np.asarray(fig.axes[0].images[0].get_array())
    assert max(img.shape) <= 1024
    layout = am.parse("causal & (sliding(4096) | sink(4))").compile(262_144, block_size=256)
    np.testing.assert_allclose(img, tile_fractions(layout))
    assert img[0, 0] == pytest.approx(257 / 512)   # the first diagonal tile: half of it plus its diagonal
    text = show("causal & (sliding(4096) | sink(4))", 1 << 20, color=False, width=60)
    n, w = 1 << 20, 4096
    pairs = w * (w + 1) // 2 + (n - w) * w + sum(n - w - k for k in range(4))   # window + sink keys outside it
    assert f"{pairs:,} attended pairs" in text


def test_side_by_side_and_options(tmp_path):
    fig = render(["causal", "causal & sliding(8)", "document(10, 22)"], 32, titles=["a", "b", "c"],
                 title="heads", annotate=False)
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c"]
    assert fig._suptitle.get_text() == "heads"
    for ax, expr in zip(fig.axes, ["causal", "causal & sliding(8)", "document(10, 22)"]):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()),
                                      am.parse(expr).to_dense(32).numpy().astype(float))
    with pytest.raises(am.MaskError, match="titles has 1 entries for 2 masks"):
        render(["causal", "full"], 8, titles=["x"])
    with pytest.raises(am.MaskError, match=r"\.png, \.svg, \.pdf.*'\.jpg'"):
        render("causal", 8, path=tmp_path / "x.jpg")
    with pytest.raises(am.MaskError, match="did you mean 'causal'"):
        render("casual", 8)
    with pytest.raises(am.MaskError, match="figsize must be positive"):
        render("causal", 8, figsize=(0, 0))
    with pytest.raises(am.MaskError, match="dpi must be"):
        render("causal", 8, dpi=0)
    for ext, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF"), (".png", b"\x89PNG")):
        render("causal", 16, path=tmp_path / f"m{ext}")
        assert (tmp_path / f"m{ext}").read_bytes()[:len(magic)] == magic
    fig = render("causal & sliding(4)", 16, title="t", dpi=50, figsize=(3, 2))
    assert tuple(fig.get_size_inches()) == (3, 2) and fig.dpi == 50
    assert fig.axes[0].get_title().startswith("t\ndensity ")


def test_draw_mask_on_given_axes_and_repr_png():
    from matplotlib.figure import Figure
    ax = Figure().add_subplot()
    info = draw_mask(ax, am.causal, 5000, colorbar=False)
    assert info["level"] == "block" and info["layout"].attended_pairs() == 5000 * 5001 // 2
    assert len(ax.figure.axes) == 1     # no colour bar when asked not to
    png = repr_png(am.causal & am.sliding(8))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert am.causal._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(io.BytesIO(png))
    assert img.shape[0] < 400 and img.shape[1] < 400
    # am.render stays callable although importing attnmask.render shadows the lazy export
    assert am.render("causal", 8).axes[0].get_xlabel() == "Context Length"


def test_terminal_plain_matches_brute_force_fractions():
    expr = "causal & (sliding(50) | sink(3)) - rows(100, 300, 20)"
    text = show(expr, 300, width=42, color=False)
    lines = text.splitlines()
    grid = [ln[1:-1] for ln in lines[1:-2]]
    tk = auto_tile(300, 300, 40)
    frac = _brute_fractions(am.parse(expr).to_dense(300).numpy(), 2 * tk, tk)
    assert grid == ["".join(plain_char(f) for f in row) for row in frac]
    assert lines[0] == lines[-2] == "+" + "-" * frac.shape[1] + "+"
    pairs = int(am.parse(expr).to_dense(300).sum())
    assert f"{pairs:,} attended pairs" in lines[-1] and "density" in lines[-1]
    assert show("causal", 4, color=False, summary=False) == "+----+\n|#+  |\n|###+|\n+----+"


def test_terminal_colour_and_detection(monkeypatch):
    text = show(am.SIGNATURE, 64, width=80, color=True)
    y = "{};{};{}".format(*np.round(YELLOW * 255).astype(int))
    p = "{};{};{}".format(*np.round(PURPLE * 255).astype(int))
    body = text.splitlines()[:-1]
    assert len(body) == 32 and all(line.endswith("\x1b[0m") for line in body)
    assert all(line.count("\u2580") == 64 for line in body)
    assert f"38;2;{y}m" in body[0] and f"48;2;{p}m" in body[0]
    assert "\x1b" not in show(am.SIGNATURE, 64, color=False)

    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert use_color(Tty()) is True
    assert use_color(io.StringIO()) is False          # not a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(Tty()) is False
    tall = show("causal", 100_000, kv_length=64, q_offset=0, color=False, width=30).splitlines()
    assert len(tall) <= 32 and all(len(line) <= 30 for line in tall[:-1])   # height bounded too
    with pytest.raises(am.MaskError, match="width must be"):
        show("causal", 8, width=3)


def test_log_scale_keeps_exact_fractions_and_masks_empty_tiles():
    from matplotlib.colors import LogNorm
    import attnmask as am
    mask = am.causal & (am.sliding(40) | am.sink(3))
    fig = am.render(mask, 3000, block_size=100, scale="log", annotate=False)
    im = fig.axes[0].images[0]
    assert isinstance(im.norm, LogNorm)
    arr = im.get_array()
    dense = mask.to_dense(3000).float().reshape(30, 100, 30, 100).mean((1, 3)).numpy()
    assert np.array_equal(np.ma.getmaskarray(arr), dense == 0)
    assert np.allclose(arr.filled(0.0), dense)
    assert im.norm.vmin < dense[dense > 0].min()   # the sparsest tile is above the darkest colour
    with pytest.raises(am.MaskValueError, match="scale must be"):
        am.render(mask, 3000, scale="sqrt")


def test_small_figures_get_fewer_ticks():
    # Jupyter's 320-pixel picture draws sliding(1024) at 2048 tokens: nine labels of up to four
    # digits ran into each other; max_ticks=4 keeps five, still ending at the length.
    from matplotlib.figure import Figure
    from attnmask.render import draw_mask
    ax = Figure().add_subplot()
    draw_mask(ax, am.causal & am.sliding(1024), 2048, max_ticks=4)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "512", "1K", "1536", "2K"]
    ax = Figure().add_subplot()
    draw_mask(ax, am.causal & am.sliding(1024), 2048)
    assert len(ax.get_xticks()) == 9

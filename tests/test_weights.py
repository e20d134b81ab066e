"""Pictures of attention weights: panels, windows, outlines, the census of head types, and bad input."""

import matplotlib.image as mpimg
import pytest
import torch

import attnmask as am
from attnmask.weights import HEAD_TYPES, head_census, render_census, render_overview, render_plan, render_weights

L = 256


def heads_of_each_type():
    q = torch.arange(L).view(-1, 1)
    k = torch.arange(L).view(1, -1)
    causal = k <= q
    scores = torch.zeros(6, L, L)
    scores[0] += 20 * (k == 0)                          # sink
    scores[1] += 20 * (k == q)                          # self
    scores[2] += 20 * (k == q - 1)                      # previous token
    scores[3] += 12 * ((q - k >= 2) & (q - k <= 20))    # local band
    scores[4] += 20 * ((k == 10) | (k == 11))           # columns far from most queries
    g = torch.Generator().manual_seed(0)
    scores[5] += 0.1 * torch.randn(L, L, generator=g)   # diffuse
    return torch.softmax(scores.masked_fill(~causal, -torch.inf), -1)


def test_census_recovers_head_types():
    w = heads_of_each_type()
    census = head_census({0: w, 1: w.flip(0)})
    assert census["types"][0] == list(HEAD_TYPES)
    assert census["types"][1] == list(HEAD_TYPES)[::-1]
    assert census["counts"] == {t: 2 for t in HEAD_TYPES}
    shares = census["shares"][0]
    assert shares.shape == (6, 6) and torch.allclose(shares.sum(1), torch.ones(6, dtype=torch.float64))


def test_render_weights_grid_window_and_outline(tmp_path):
    w = heads_of_each_type()[:5]
    path = tmp_path / "heads.png"
    fig = render_weights(w, mask="causal & sliding(8)", ncols=2, window=((32, 256), (0, 64)), scale="sqrt",
                         path=path)
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 5 + 0 and len(fig.axes) == 3 * 2 + 1        # one empty slot, one colorbar
    assert panels[0].get_xlim() == (0, 64) and panels[0].get_ylim() == (256, 32)
    assert "kept" in panels[1].get_title()
    kept = am.coverage("causal & sliding(8)", w[1:2], rows=(32, 256)).mean
    assert f"{kept:.1%}" in panels[1].get_title()
    assert len(panels[0].collections) >= 1                              # the outline
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 300
    # pooled when the window is larger than max_cells; one panel for a single [Lq, Lk] map
    fig = render_weights(w[0], max_cells=32, pool="mean", scale="linear")
    assert fig.axes[0].images[0].get_array().shape == (32, 32)


def test_overview_census_and_plan_pictures(tmp_path):
    w = heads_of_each_type()
    render_overview({0: w, 1: w}, cells=24, path=tmp_path / "o.png")
    render_census(head_census({0: w}), path=tmp_path / "c.svg")
    plan = am.fit([{0: w}], keep=0.9)
    fig = render_plan(plan, path=tmp_path / "p.png")
    assert fig.axes[0].texts                 # a family letter per head
    for name in ("o.png", "p.png"):
        assert mpimg.imread(tmp_path / name).shape[0] > 100
    assert (tmp_path / "c.svg").read_text().startswith("<?xml")


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": "cubic"}, "scale must be one of"),
    ({"ncols": 0}, "ncols must be"),
    ({"window": (0, 500)}, "outside the weights"),
    ({"window": "all"}, "window must be"),
    ({"mask": ["causal"] * 2}, "2 masks for 3 heads"),
    ({"titles": ["a"]}, "one per head"),
    ({"path": "x.gif"}, "extension"),
    ({"pool": "median"}, "pool must be"),
])
def test_render_weights_bad_input(kwargs, message):
    with pytest.raises(am.MaskError, match=message):
        render_weights(heads_of_each_type()[:3], **kwargs)
    with pytest.raises(am.MaskError, match="weights must be"):
        render_weights(torch.zeros(2, 2, 2, 2, 2))

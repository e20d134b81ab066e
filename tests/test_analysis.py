"""attnmask.analysis against brute force on dense matrices, closed forms at 1M tokens, the report.

The brute force below is written straight from the definitions in issue 7,
on ``mask.to_dense`` matrices, with no code shared with the library's
structural algorithms.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

import attnmask as am
from attnmask import analysis
from attnmask.analysis import kv_cache_curve, receptive_field, row_counts

M = 1 << 20

# ---------------------------------------------------------------------------
# brute force from the definitions
# ---------------------------------------------------------------------------


def brute_blocks(dense: torch.Tensor, block: int) -> dict[str, int]:
    n = dense.shape[0]
    out = {"full": 0, "partial": 0, "empty": 0}
    for r in range(0, n, block):
        for c in range(0, n, block):
            tile = dense[r:r + block, c:c + block]
            s = int(tile.sum())
            out["empty" if s == 0 else "full" if s == tile.numel() else "partial"] += 1
    return out


def brute_kv_curve(dense: torch.Tensor) -> list[int]:
    """needed(t) = #{k <= t : some q >= t attends k}."""
    n = dense.shape[0]
    return [int(dense[t:, :t + 1].any(dim=0).sum()) for t in range(n)]


def brute_receptive(dense: torch.Tensor, layers: int, query: int) -> tuple[list[int], int]:
    """R_0 = {query}; R_l = R_(l-1) plus every key some position of R_(l-1) attends."""
    reach = {query}
    sizes = []
    for _ in range(layers):
        rows = torch.tensor(sorted(reach))
        keys = torch.nonzero(dense[rows].any(dim=0)).flatten().tolist()
        reach = reach | set(keys)
        sizes.append(len(reach))
    return sizes, min(reach)


# ---------------------------------------------------------------------------
# random masks of the language, every primitive and operator
# ---------------------------------------------------------------------------

def random_primitive(rng: random.Random, n: int) -> am.Mask:
    name = rng.choice(["full", "none", "causal", "diagonal", "band", "sliding", "sink", "prefix_lm",
                       "chunked", "dilated", "strided", "document", "rows", "cols"])
    p = lambda lo=0: rng.randint(lo, max(lo, n + 2))  # noqa: E731
    if name in ("full", "none", "causal", "diagonal"):
        return getattr(am, name)
    if name == "band":
        return am.band(rng.randint(0, n // 2), rng.randint(0, n // 4))
    if name in ("sliding", "chunked", "strided"):
        return getattr(am, name)(rng.randint(1, max(1, n // 2)))
    if name in ("sink", "prefix_lm"):
        return getattr(am, name)(p())
    if name == "dilated":
        return am.dilated(rng.randint(1, 12), rng.randint(1, 9))
    if name == "document":
        return am.document(*[rng.randint(1, max(1, n // 3)) for _ in range(rng.randint(1, 6))])
    a = rng.randint(0, n)
    b = a + rng.randint(0, n)
    return getattr(am, name)(a, b, rng.randint(1, 7))


def random_mask(rng: random.Random, n: int, depth: int = 3) -> am.Mask:
    if depth == 0 or rng.random() < 0.3:
        return random_primitive(rng, n)
    op = rng.choice(["|", "&", "-", "~", "&", "&"])
    if op == "~":
        return ~random_mask(rng, n, depth - 1)
    a, b = random_mask(rng, n, depth - 1), random_mask(rng, n, depth - 1)
    return a | b if op == "|" else a & b if op == "&" else a - b


def check_against_brute(mask: am.Mask, n: int, layers_list=(0, 1, 2, 3, 6), block: int = 7) -> None:
    dense = mask.to_dense(n)
    rows = dense.sum(dim=1)
    # every figure of the report, several layer counts
    for layers in layers_list:
        r = am.analyze(mask, n, layers=layers, block_size=block, head_dim=3, heads=2)
        pairs = int(dense.sum())
        assert r.attended_pairs == pairs
        assert r.density == pairs / n ** 2
        blocks = brute_blocks(dense, block)
        assert (r.blocks_full, r.blocks_partial, r.blocks_empty) == (blocks["full"], blocks["partial"],
                                                                     blocks["empty"])
        assert r.flops_forward == 4 * pairs * 3 * 2 and r.flops_backward == 10 * pairs * 3 * 2
        assert r.causal_pairs == int(am.causal.to_dense(n).sum())
        curve = brute_kv_curve(dense)
        assert r.kv_cache_peak == max(curve)
        assert r.kv_cache_peak_step == curve.index(max(curve))
        sizes, earliest = brute_receptive(dense, layers, n - 1)
        assert list(r.receptive_field_per_layer) == sizes
        assert r.receptive_field == (sizes[-1] if layers else 1)
        assert r.earliest_key == earliest
        assert r.row_keys_min == int(rows.min()) and r.row_keys_max == int(rows.max())
        assert r.row_keys_median == float(np.median(rows.numpy()))
        assert r.rows_fully_masked == int((rows == 0).sum())
    # the per-step / per-row / any-query APIs
    assert kv_cache_curve(mask, n).tolist() == brute_kv_curve(dense)
    assert row_counts(mask, n).tolist() == rows.tolist()
    for query in {0, n // 2, n - 1}:
        assert receptive_field(mask, n, 4, query=query) == brute_receptive(dense, 4, query)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny internal tiles, so that short sequences span many query and key blocks."""
    monkeypatch.setattr(analysis, "_ROW_TILE", (4, 3))
    monkeypatch.setattr(analysis, "_KEY_TILE", (3, 1))
    monkeypatch.setattr(analysis, "_BATCH_CELLS", 64)   # several batches on every path


@pytest.mark.parametrize("seed", range(8))
def test_random_masks_match_brute_force_small_tiles(small_tiles, seed):
    rng = random.Random(seed)
    for _ in range(12):
        n = rng.randint(1, 41)
        check_against_brute(random_mask(rng, n), n, block=rng.randint(1, 9))


@pytest.mark.parametrize("seed", range(3))
def test_random_masks_match_brute_force_default_tiles(seed):
    rng = random.Random(100 + seed)
    for _ in range(3):
        n = rng.randint(129, 300)
        check_against_brute(random_mask(rng, n), n, layers_list=(1, 4), block=rng.choice([16, 128]))


@pytest.mark.parametrize("text", [
    "causal & (sliding(9) | sink(2))", "prefix_lm(7)", "causal & chunked(6)", "causal & document(5, 9, 3, 11)",
    "causal - (rows(3, 40, 5) - diagonal)", "causal & dilated(4, 3)", "causal", "full", "none",
    "strided(5) - causal", "band(2, 3) | cols(20, 25)", "~causal | diagonal",
])
def test_named_masks_match_brute_force(small_tiles, text):
    check_against_brute(am.parse(text), 37)


def test_mask_mod_leaves_are_exact(small_tiles):
    even = am.from_mask_mod(lambda b, h, q, k: (k % 2 == 0) | (q == k), "even_or_self")
    check_against_brute(am.causal & even & am.sliding(10), 30)


def test_masked_rows():
    # rows 3, 8, 13 see nothing; every other row is causal
    mask = am.causal - am.rows(3, 15, 5)
    r = am.analyze(mask, 20)
    assert r.rows_fully_masked == 3
    assert r.row_keys_min == 0 and r.row_keys_max == 20
    counts = row_counts(mask, 20).tolist()
    assert [i for i, c in enumerate(counts) if c == 0] == [3, 8, 13]
    # none: everything masked, nothing held, nothing reached
    r = am.analyze("none", 50, layers=3)
    assert (r.rows_fully_masked, r.kv_cache_peak, r.receptive_field, r.earliest_key) == (50, 0, 1, 49)


# ---------------------------------------------------------------------------
# closed forms at 1,048,576 tokens
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, kv_peak, rf", [
    ("causal & sliding(4096)", 4096, 131041),             # L (w - 1) + 1
    ("causal & (sliding(4096) | sink(4))", 4100, 131045),
    ("causal & chunked(8192)", 8192, 8192),
    ("causal", M, M),
])
def test_closed_forms_at_1m(text, kv_peak, rf):
    r = am.analyze(text, M, layers=32)
    assert r.kv_cache_peak == kv_peak
    assert r.receptive_field == rf
    assert r.receptive_field_per_layer[-1] == rf
    if text == "causal & sliding(4096)":
        assert r.earliest_key == M - 1 - 32 * 4095
        assert r.receptive_field_per_layer[:2] == (4096, 8191)
        assert r.kv_cache_peak_step == 4095                  # first step holding a full window
        assert (r.row_keys_min, r.row_keys_max, r.rows_fully_masked) == (1, 4096, 0)
        assert r.attended_pairs == 4096 * M - 4096 * 4095 // 2
    if text == "causal & (sliding(4096) | sink(4))":
        assert r.earliest_key == 0
    if text == "causal & chunked(8192)":
        assert r.earliest_key == M - 8192
        assert r.kv_cache_peak_step == 8191
    if text == "causal":
        assert r.earliest_key == 0 and r.kv_cache_peak_step == M - 1
        assert r.attended_pairs == r.causal_pairs == M * (M + 1) // 2
        assert r.flops_ratio == 1.0
        assert r.row_keys_median == (M + 1) / 2


def test_curve_and_rows_at_1m():
    curve = kv_cache_curve("causal & (sliding(4096) | sink(4))", M)
    assert curve.dtype == torch.int64 and curve.shape == (M,)
    # steps 0..4099 hold t + 1 keys, afterwards the window plus the 4 sinks
    assert curve[:4100].tolist() == list(range(1, 4101))
    assert bool((curve[4100:] == 4100).all())
    rows = row_counts("causal & (sliding(4096) | sink(4))", M)
    assert rows[:4100].tolist() == list(range(1, 4101))
    assert bool((rows[4100:] == 4100).all())


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------

REPORT_KEYS = {
    "mask", "length", "layers", "block_size", "head_dim", "heads", "attended_pairs", "density", "blocks_full",
    "blocks_partial", "blocks_empty", "flops_forward", "flops_backward", "causal_pairs", "causal_density",
    "causal_flops_forward", "causal_flops_backward", "flops_ratio", "kv_cache_peak", "kv_cache_peak_step",
    "receptive_field", "earliest_key", "receptive_field_per_layer", "row_keys_min", "row_keys_median",
    "row_keys_max", "rows_fully_masked",
}


def test_report_dict_and_table():
    r = am.analyze(am.causal & am.sliding(64), 1000, layers=3, head_dim=64, heads=8)
    d = r.to_dict()
    assert set(d) == REPORT_KEYS
    assert json.loads(json.dumps(d)) == d
    assert d["mask"] == "causal & sliding(64)" and d["receptive_field_per_layer"] == [64, 127, 190]
    assert d["flops_forward"] == 4 * r.attended_pairs * 64 * 8
    assert math.isclose(d["flops_ratio"], r.attended_pairs / (1000 * 1001 / 2))
    text = str(r)
    for needle in ("causal & sliding(64)", "KV-cache peak", "receptive field", "190", "fully masked rows",
                   "forward FLOPs", f"{r.attended_pairs:,}"):
        assert needle in text
    with pytest.raises(Exception):
        r.length = 5   # frozen
    assert am.AnalysisReport is analysis.AnalysisReport
    assert am.analyze("causal & sliding(64)", 1000, layers=3, head_dim=64, heads=8) == r


def test_block_size_pair_in_dict():
    d = am.analyze("causal", 100, block_size=(16, 32)).to_dict()
    assert d["block_size"] == [16, 32]
    assert json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("kwargs, message", [
    ({"length": 0}, "length must be >= 1, got 0"),
    ({"length": 10, "layers": -1}, "layers must be >= 0, got -1"),
    ({"length": 10, "head_dim": 0}, "head_dim must be >= 1, got 0"),
    ({"length": 10, "heads": 1.5}, "heads must be a whole number, got 1.5"),
    ({"length": 1 << 30}, "too long to analyse"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(am.MaskError, match=message):
        am.analyze("causal", **kwargs)


def test_bad_mask_and_query():
    with pytest.raises(am.MaskError, match="needs a Mask or mask text, got int"):
        am.analyze(3, 10)
    with pytest.raises(am.MaskSyntaxError):
        am.analyze("causal &", 10)
    with pytest.raises(am.MaskError, match=r"query must be a position in 0..9 \(length=10\), got 10"):
        receptive_field("causal", 10, 2, query=10)


def test_plot_analysis(tmp_path):
    path = tmp_path / "a.png"
    fig = am.plot_analysis("causal & (sliding(64) | sink(4))", 4096, layers=6, path=path)
    assert path.stat().st_size > 10_000
    assert len(fig.axes) >= 3
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "KV cache" in titles and "receptive field" in titles


def test_receptive_field_over_budget(monkeypatch):
    # causal & strided(2): every partial tile of the new rows would need evaluating
    monkeypatch.setattr(analysis, "RECEPTIVE_BUDGET_CELLS", 10_000)
    with pytest.raises(analysis.AnalysisTooCostlyError, match="needs more than 10,000 cells"):
        receptive_field("causal & strided(2)", 4096, 3)
    r = am.analyze("causal & strided(2)", 4096, layers=3)
    assert r.receptive_field is None and r.earliest_key is None and r.receptive_field_per_layer == ()
    dense = am.parse("causal & strided(2)").to_dense(4096)
    assert r.attended_pairs == int(dense.sum()) and r.kv_cache_peak == 4095   # steps t < N-1 hold all t+1 keys
    assert "not computed" in str(r)
    assert json.loads(json.dumps(r.to_dict()))["receptive_field"] is None
    fig = am.plot_analysis("causal & strided(2)", 4096, layers=3)
    assert any("not computed" in t.get_text() for ax in fig.axes for t in ax.texts)

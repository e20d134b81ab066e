"""coverage and fit: kept mass against a dense oracle, planted patterns recovered at their cost, JSON."""

import math

import pytest
import torch

import attnmask as am
from attnmask.fitting import FAMILIES, _kept_static, _normalized, fit, plan_coverage, row_range, static_candidates
from attnmask.plan import MaskPlan, with_columns


def planted(mask, length, eps=0.01, gen=None):
    """Rows uniform over the mask's keys (1 - eps of the mass) plus eps spread over all causal keys."""
    dense = am.parse(mask).to_dense(length).double() if isinstance(mask, str) else mask.double()
    base = am.causal.to_dense(length).double()
    noise = base if gen is None else base * torch.rand(length, length, generator=gen, dtype=torch.float64)
    w = (1 - eps) * dense / dense.sum(-1, keepdim=True).clamp_min(1) + eps * noise / noise.sum(-1, keepdim=True)
    return (w / w.sum(-1, keepdim=True)).float()


def random_causal(h, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(h, length, length, generator=g) * 3
    return torch.softmax(scores.masked_fill(~am.causal.to_dense(length), -torch.inf), -1)


@pytest.mark.parametrize("rows", ["half", "all", "last:7", (3, 20)])
def test_kept_from_prefix_sums_equals_dense_coverage(rows):
    length = 45
    w = random_causal(3, length)
    w[1, 30] = 0.0                      # a row with no mass counts as kept
    cands = static_candidates(length, FAMILIES)
    assert len(cands) > 40 and {c.kind for c in cands} == {"window", "chunk", "dilated"}
    start, stop = row_range(rows, length)
    kept = _kept_static(_normalized(w[:, start:stop], start), cands, start, 0)
    for i, c in enumerate(cands):
        ref = am.coverage(c.mask, w, rows=rows).per_head
        assert torch.allclose(kept[:, i], ref, atol=1e-12, rtol=0), str(c.mask)


def test_coverage_rows_min_and_per_head_masks():
    w = torch.zeros(2, 4, 4)
    w[:, torch.arange(4), torch.arange(4)] = 0.5
    w[:, :, 0] += 0.5
    w[:, 0, 0] = 1.0
    cov = am.coverage([am.diagonal, am.causal], w)
    assert cov.per_head.tolist() == [pytest.approx(0.625), 1.0]
    assert cov.min == 0.5 and cov.per_row.shape == (2, 4)
    assert am.coverage(am.diagonal, w, rows="last:2").per_row.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    with pytest.raises(am.MaskError, match="one mask per head"):
        am.coverage([am.causal], w)
    with pytest.raises(am.MaskError, match="rows must be"):
        am.coverage(am.causal, w, rows="first:3")


PLANTED = {
    "causal & sliding(8)": "window",
    "causal & (sliding(2) | sink(4))": "window",
    "causal & dilated(8, 2)": "dilated",
    "causal & chunked(32)": "chunked",
    "causal & (sliding(1) | sink(1))": "window",
}


def test_planted_patterns_recovered_at_their_cost():
    length = 128
    g = torch.Generator().manual_seed(1)
    texts = []
    for _ in range(2):
        heads = [planted(m, length, gen=g) for m in PLANTED]
        texts.append({0: torch.stack(heads), 1: torch.stack(heads[::-1])})
    plan = fit(texts, keep=0.95, families=("window", "dilated", "chunked"))
    assert (plan.n_layers, plan.n_heads) == (2, len(PLANTED))
    for h, (text, family) in enumerate(PLANTED.items()):
        expect = am.parse(text)
        for layer, head in ((0, h), (1, len(PLANTED) - 1 - h)):
            assert plan.layer(layer)[head] == expect
            fig = plan.figures[layer][head]
            assert fig["family"] == family
            assert fig["pairs"] == expect.compile(length).attended_pairs()
            assert fig["density"] == pytest.approx(fig["pairs"] / (length * (length + 1) / 2))
            assert 0.95 <= fig["kept_worst_text"] <= fig["kept_mean"] <= 1.0
    assert plan.meta["uniform"]["density"] <= plan.meta["density_mean"]
    match = plan.meta["uniform_matching"]
    assert match["kept_mean"] >= plan.meta["kept_mean"] and match["density"] > plan.meta["density_mean"]


def test_keep_holds_on_every_text_not_on_average():
    length = 96
    narrow, wide = planted("causal & sliding(8)", length), planted("causal & sliding(24)", length)
    plan = fit([{0: narrow[None]}, {0: wide[None]}], keep=0.9, families=["window"])
    m = plan.layer(0)[0]
    assert am.coverage(m, wide[None], rows="half").mean >= 0.9
    assert m == am.parse("causal & sliding(24)")
    # keep=1 is only met by masks holding every causal key: causal itself
    exact = fit([{0: random_causal(1, 40)}], keep=1.0)
    assert exact.layer(0)[0] == am.causal and exact.meta["heads_causal"] == 1


def test_static_and_dynamic_columns():
    length = 128
    g = torch.Generator().manual_seed(2)

    def text(positions):
        dense = am.parse("causal & (sliding(4) | sink(1))").to_dense(length)
        dense[:, positions] = True
        dense &= am.causal.to_dense(length)
        return {0: torch.stack([planted(dense, length, gen=g)] * 2)}

    same = [text([30, 31, 70]) for _ in range(3)]
    plan = fit(same, keep=0.95, families=["window", "columns"], column_counts=(3,))
    assert plan.layer(0)[0] == with_columns(4, 1, [30, 31, 70])
    assert str(plan.layer(0)[0]) == "causal & (sliding(4) | sink(1) | cols(30, 32) | cols(70))"
    assert plan.figures[0][0]["family"] == "columns"
    assert plan.figures[0][0]["pairs"] == plan.layer(0)[0].compile(length).attended_pairs()

    # the columns move with the input: static columns cannot follow, top_columns can
    moving = [text([20, 50, 90]), text([40, 41, 60]), text([10, 77, 100])]
    static = fit(moving, keep=0.95, families=["window", "columns"], column_counts=(3,))
    dyn = fit(moving, keep=0.95, families=["window", "columns", "dynamic"], column_counts=(3,), last_queries=16)
    assert static.figures[0][0]["density"] > 0.5
    assert dyn.figures[0][0]["family"] == "dynamic" and dyn.figures[0][0]["density"] < 0.3
    assert dyn.layer(0)[0] == am.parse("causal & (sliding(4) | sink(1))")
    spec = dyn.dynamic[0][0]
    assert spec == {"family": "top_columns", "window": 4, "sink": 1, "columns": 3, "last_queries": 16}
    held_out = text([15, 64, 65])
    resolved = dyn.resolve(0, held_out[0][:, -16:])
    assert resolved[0] == with_columns(4, 1, [15, 64, 65])
    kept = plan_coverage(dyn, held_out)
    assert kept.shape == (1, 2) and float(kept.min()) >= 0.95
    # the fast path (base + column mass) equals the dense coverage of the resolved masks
    ref = am.coverage(list(resolved), held_out[0], rows="half").per_head
    assert torch.allclose(kept[0], ref, atol=1e-12, rtol=0)
    # pairs of the resolved mask agree with the fit's cost model (columns outside the window)
    base_pairs = am.parse("causal & (sliding(4) | sink(1))").compile(length).attended_pairs()
    assert resolved[0].compile(length).attended_pairs() == base_pairs + sum(length - p - 4 for p in (15, 64, 65))
    report = dyn.analyze(length, kv_heads=1)
    assert report["kv_cache"] <= 4 + 1 + 6 and report["dense_kv_cache"] == length


def test_plan_json_round_trip(tmp_path):
    length = 64
    g = torch.Generator().manual_seed(3)
    texts = [{0: torch.stack([planted("causal & sliding(8)", length, gen=g), random_causal(1, length)[0]]),
              1: random_causal(2, length, seed=4)} for _ in range(2)]
    plan = fit(texts, keep=0.9, families=FAMILIES, names=["a.py", "b.py"])
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = MaskPlan.from_json(path)
    assert again == plan and again.meta["texts"] == ["a.py", "b.py"]
    assert [str(m) for m in again.layer(0)] == [str(m) for m in plan.layer(0)]
    data = plan.to_dict()
    data["dynamic"] = [[{"family": "top_columns", "window": 0}, None], [None, None]]
    with pytest.raises(am.MaskError, match="window"):
        MaskPlan.from_dict(data)


def test_fit_errors():
    w = {0: random_causal(1, 16)}
    with pytest.raises(am.MaskError, match="keep must be"):
        fit([w], keep=1.5)
    with pytest.raises(am.MaskError, match="unknown families"):
        fit([w], families=["windows"])
    with pytest.raises(am.MaskError, match="same length"):
        fit([w, {0: random_causal(1, 20)}])
    with pytest.raises(am.MaskError, match="at least one"):
        fit([])
    with pytest.raises(am.MaskError, match="square"):
        fit([{0: torch.rand(1, 4, 8)}])
    assert math.isclose(am.coverage("causal", w[0]).mean, 1.0)

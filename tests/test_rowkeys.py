"""``row_keys``: one query position's keys as intervals, held to the cell-by-cell oracle.

The oracle is tests/strategies.py's ``naive`` (a plain-Python reading of every primitive,
independent of the library's evaluate); ``row_keys`` either answers exactly or says None.
"""

from __future__ import annotations

import torch
from hypothesis import given, strategies as st

import attnmask as am
from attnmask.engines.rowkeys import row_keys
from unittest import mock

import attnmask.engines.rowkeys as rowkeys
from strategies import build, has_mod, mask_specs, naive

NINE = ["causal & (sliding(32) | sink(4))", "causal & (sliding(64) | sink(4))", "causal & (sliding(128) | sink(4))",
        "causal & (sliding(256) | sink(4))", "causal & sliding(64)", "causal & (sliding(16) | sink(1))",
        "causal & (sliding(512) | sink(4))", "causal", "causal & (sliding(128) | cols(0, 8))"]


def runs(row: list[bool]) -> list[tuple[int, int]]:
    """The True runs of a list of booleans, as [a, b) intervals."""
    out, start = [], None
    for i, x in enumerate(row + [False]):
        if x and start is None:
            start = i
        elif not x and start is not None:
            out.append((start, i))
            start = None
    return out


@given(spec=mask_specs(max_leaves=6, mask_mods=True), p=st.integers(-20, 60), n=st.integers(0, 50))
def test_row_keys_are_the_rows_true_runs_or_none(spec, p, n):
    # An answer is exact even with a mask_mod leaf (given only where the leaf cannot matter, e.g.
    # ``none & leaf``); a leaf that matters gives None (the caller evaluates it in its frame).
    got = row_keys(build(spec), p, n)
    if got is not None:
        assert got == runs([naive(spec, p, k) for k in range(n)])
    elif not has_mod(spec):
        assert any(leaf in str(spec) for leaf in ("strided", "window2d", "dilated", "cols", "rows")), spec


@given(spec=mask_specs(max_leaves=6), p=st.integers(-20, 60), n=st.integers(0, 50))
def test_row_keys_stay_exact_when_patterns_have_too_many_intervals(spec, p, n):
    # With a bound of 2 intervals, periodic leaves (cols with a step, strided, dilated) give up
    # inside any expression: the answer is None or exact, never a guess (e.g. "no key").
    with mock.patch.object(rowkeys, "MAX_INTERVALS", 2):
        got = row_keys(build(spec), p, n)
    if got is not None:
        assert got == runs([naive(spec, p, k) for k in range(n)])


def test_row_keys_answer_for_model_masks_and_follow_a_growing_cache():
    masks = [am.parse(t) for t in NINE] + [am.parse("causal & (sliding(100) | sink(3)) | cols(1500)"),
                                          am.parse("prefix_lm(40) & ~diagonal"), am.parse("causal & document(700, 900)"),
                                          am.parse("causal & dilated(8, 3)"), am.parse("window2d(40, 40, 5, 5) & causal")]
    k = torch.arange(6000)
    for m in masks:
        # positions past the first cached axis range (1024), so the range grows on the way
        for p in [0, 1, 5, 1000, 1500, 1501, 1502, 2047, 2048, 4999]:
            n = p + 1
            got = row_keys(m, p, n)
            assert got is not None, (str(m), p)
            dense = m.evaluate(torch.tensor(p), k[:n]).tolist()
            assert got == runs(dense), (str(m), p)
    # a query past the keys (q_offset beyond the cache) and one before it
    m = am.parse("causal & (sliding(8) | sink(2))")
    assert row_keys(m, 100, 50) == [(0, 2)] and row_keys(m, -3, 50) == []


def test_row_keys_leave_mask_mods_to_the_caller():
    leaf = am.from_mask_mod(lambda b, h, q, k: k <= q, "lower")
    assert row_keys(leaf, 5, 10) is None and row_keys(am.causal & leaf, 5, 10) is None
    assert row_keys(am.none & leaf, 5, 10) == []


def test_row_keys_give_up_on_patterns_of_too_many_intervals():
    assert row_keys(am.strided(2), 5000, 5001) is None
    # key and query patterns too: an answer of "no key" here would be wrong, not merely slow
    assert row_keys(am.cols(0, 5000, 2), 100, 5000) is None
    assert row_keys(am.causal & am.cols(0, 5000, 2), 4999, 5000) is None
    # (a query pattern is read at one position: exact while its cached runs are few enough)
    assert row_keys(am.rows(0, 5000, 2) | am.sink(3), 101, 5000) == [(0, 3)]
    assert row_keys(am.rows(0, 5000, 2) | am.sink(3), 4000, 5000) is None
    assert row_keys(am.causal - am.strided(2), 5000, 5001) is None
    assert row_keys(am.strided(2000), 5000, 5001) == [(1000, 1001), (3000, 3001), (5000, 5001)]


def _nodes(mask):
    out, todo = [], [mask]
    while todo:
        node = todo.pop()
        out.append(node)
        todo += list(node.children())
    return out


def test_row_programs_live_in_a_bounded_cache_not_on_the_masks(monkeypatch):
    # Mask nodes are frozen values shared by any number of masks and plans: row_keys hangs nothing
    # on them (it kept its programs and axis runs in their __dict__), and what it keeps instead is
    # bounded in bytes and answers exactly whatever it evicted.
    from attnmask.engines.cache import ByteLRU
    monkeypatch.setattr(rowkeys, "programs", ByteLRU(16 << 10), raising=False)
    masks = [am.causal & (am.sliding(w) | am.sink(3)) & am.document(700, 900) for w in range(1, 61)]
    k, rows = torch.arange(1600), (0, 699, 700, 1599)
    dense = {(i, p): runs(m.evaluate(torch.tensor(p), k[:p + 1]).tolist()) for i, m in enumerate(masks) for p in rows}
    before = {id(node): dict(vars(node)) for m in masks for node in _nodes(m)}     # (the oracle's tables made)
    for _ in range(2):
        for i, m in enumerate(masks):
            for p in rows:
                assert row_keys(m, p, p + 1) == dense[(i, p)], (str(m), p)
    assert {id(node): dict(vars(node)) for m in masks for node in _nodes(m)} == before
    assert 0 < len(rowkeys.programs) < len(masks) and rowkeys.programs.nbytes <= rowkeys.programs.budget


def test_a_row_programs_bytes_follow_its_axis_runs(monkeypatch):
    # A periodic pattern's cached runs double their range as the cache grows; the program's entry
    # is counted again each time (it was counted nowhere).
    from attnmask.engines.cache import ByteLRU
    monkeypatch.setattr(rowkeys, "programs", ByteLRU(1 << 20))
    m = am.causal & am.strided(64)
    assert row_keys(m, 1000, 1001) == [(p, p + 1) for p in range(1000 % 64, 1001, 64)]
    small = rowkeys.programs.nbytes
    assert row_keys(m, 8000, 8001) == [(p, p + 1) for p in range(8000 % 64, 8001, 64)]
    # its runs: offsets 0, 64, ... below 1024, then below 8192 (the range doubled past 8001)
    assert len(rowkeys.programs) == 1 and rowkeys.programs.nbytes >= small + 100 * (8192 - 1024) // 64

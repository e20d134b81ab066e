"""The primitive queries that the decoding cache and context parallelism ask, against the naive oracle.

* ``PrimitiveKind.retained(node, k, t)``: whether some query at a position >= t may attend a
  key k < t (what ``MaskCache`` keeps). Never False where a later query attends (the cache
  would change results); exact for the primitives whose rule claims it.
* Shift invariance: a mask whose structure class is D (offset q - k only) or constant means
  the same after shifting q and k by one amount (context parallelism then runs a piece on
  its keys alone).

The oracle is tests/strategies.py's ``naive`` (PRODUCT.md's table, Python ints).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import attnmask as am
from attnmask.kinds import StructureClass
from attnmask.models.cache import retained as cache_retained
from strategies import PRIMITIVES, build, mask_specs, naive, primitive_specs

#: Primitives whose ``retained`` is exact (a key is kept only if a later query attends it).
EXACT = ("full", "none", "causal", "diagonal", "band", "sliding", "sink", "chunked", "document", "rows", "cols")
#: How far past t the oracle looks for a query: past every row a small ``rows(a, b, s)`` selects (b <= 80).
HORIZON = 128


def _later_attends(spec, t: int) -> list[bool]:
    """For each key k < t: whether a query q in [t, t + HORIZON) attends it (oracle)."""
    return [any(naive(spec, q, k) for q in range(t, t + HORIZON)) for k in range(t)]


@given(primitive_specs(), st.integers(1, 60))
def test_retained_is_a_superset_of_what_later_queries_attend_and_exact_where_claimed(spec, t):
    m = build(spec)
    got = m.kind.retained(m, torch.arange(t), torch.tensor(t)).tolist()
    need = _later_attends(spec, t)
    assert len(got) == t
    missing = [k for k in range(t) if need[k] and not got[k]]
    assert not missing, f"{m}: drops keys {missing[:8]} that a query >= {t} attends"
    if spec[1] in EXACT:
        assert got == need, f"{m}: keeps keys no later query attends"


@given(primitive_specs(("sliding", "chunked", "document", "rows", "sink")), st.integers(0, 3))
def test_retained_broadcasts_over_sequences(spec, shift):
    # the cache asks with k [B, K] (each sequence's own positions) and t [B, 1] (each one's next position)
    m = build(spec)
    t = torch.tensor([[5], [17 + shift], [40]])
    k = torch.arange(40).expand(3, 40)
    got = m.kind.retained(m, k, t)
    assert got.shape == (3, 40)
    for b in range(3):
        row = m.kind.retained(m, torch.arange(40), t[b, 0])
        assert torch.equal(got[b], row)


@given(mask_specs(max_leaves=4), st.integers(1, 30))
def test_the_cache_rule_over_expressions_never_drops_a_needed_key(spec, t):
    # unions, intersections and differences combine their parts' answers (models/cache.py)
    m = build(spec)
    got = cache_retained(m, torch.arange(t), torch.tensor(t)).tolist()
    horizon = 48 if "rows" not in str(m) else HORIZON
    need = [any(naive(spec, q, k) for q in range(t, t + horizon)) for k in range(t)]
    assert not [k for k in range(t) if need[k] and not got[k]], str(m)


@given(mask_specs(max_leaves=5), st.integers(0, 40), st.integers(0, 40), st.integers(0, 300))
def test_offset_class_masks_are_shift_invariant(spec, q, k, shift):
    m = build(spec)
    if m.structure_class() in (StructureClass.D, StructureClass.CONST):
        assert naive(spec, q + shift, k + shift) == naive(spec, q, k), str(m)


def test_the_offset_classes_are_exactly_the_offset_primitives():
    # which primitives context parallelism may shift (distributed/runtime.py asks the structure class)
    offset = {name for name in PRIMITIVES
              if am.primitives.lookup(name).structure in (StructureClass.D, StructureClass.CONST)}
    assert offset == {"full", "none", "causal", "diagonal", "band", "sliding", "dilated", "strided"}
    # and each other primitive has a pair that a shift changes (so calling it shift-invariant would be wrong)
    witnesses = {"sink": (am.sink(2), 3, 1), "prefix_lm": (am.prefix_lm(4), 1, 3), "chunked": (am.chunked(4), 3, 2),
                 "document": (am.document(2, 3), 1, 0), "rows": (am.rows(1), 1, 0), "cols": (am.cols(0), 1, 0),
                 "window2d": (am.window2d(4, 4, 3, 3), 3, 4)}
    assert set(witnesses) == set(PRIMITIVES) - offset
    for name, (m, q, k) in witnesses.items():
        here = m.to_dense(max(q, k) + 2)
        assert bool(here[q, k]) != bool(here[q + 1, k + 1]), name

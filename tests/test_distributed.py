"""Context parallelism: the planner against a dense oracle, and real gloo groups against one process.

The group tests start 2 and 4 processes (tests/cp_worker.py) on 127.0.0.1 with a FileStore (no port
to pick), bounded by timeouts; every process is ended in a finally block.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import attnmask as am
from attnmask import distributed as cp

WORKER = Path(__file__).with_name("cp_worker.py")
SRC = Path(cp.__file__).resolve().parents[2]


# -- planner ---------------------------------------------------------------------------------------

def _dense_pairs(dense: np.ndarray, plan):
    pos = [plan.positions(r).numpy() for r in range(plan.world_size)]
    return np.array([[int(dense[np.ix_(pos[r], pos[s])].sum()) for s in range(plan.world_size)]
                     for r in range(plan.world_size)])


MASKS = ["causal", "causal & (sliding(300) | sink(4))", "causal & document(100, 333, 50, 400, 117)",
         "causal - cols(0, 1000, 3)", "band(40, 70) | rows(500, 520)", "chunked(256) & causal"]


@pytest.mark.parametrize("text", MASKS)
def test_plan_pairs_and_needs_match_the_dense_mask(text):
    mask = am.parse(text)
    dense = mask.to_dense(1000).numpy()
    for W in (2, 3, 4):
        for name, plan in cp.compare(mask, 1000, W, block_size=64).items():
            assert (plan.pairs == _dense_pairs(dense, plan)).all(), (text, W, name)
            for r in range(W):
                read = dense[plan.positions(r).numpy()].any(0)
                chunks = [bool(read[c * 64:(c + 1) * 64].any()) for c in range(plan.n_chunks)]
                assert plan.need[r].tolist() == chunks, (text, W, name, r)
            owned = sorted(torch.cat([plan.positions(r) for r in range(W)]).tolist())
            assert owned == list(range(1000))                          # a partition of the positions
            assert plan.total_pairs == mask.compile(1000).attended_pairs()


def test_per_head_plan_counts_every_head():
    heads = [am.causal, am.parse("causal & sliding(100)"), am.causal]
    plan = cp.plan(heads, 777, 3, block_size=32)
    assert plan.total_pairs == sum(m.compile(777).attended_pairs() for m in heads)
    assert plan.per_head and len(plan.masks) == 3


def test_strategies_and_baselines_on_causal():
    plans = cp.compare(am.causal, 8192, 8, block_size=128)
    assert plans["contiguous"].imbalance() == pytest.approx((2 * 8 - 1) / 8, rel=0.01)   # the last rank
    assert plans["zigzag"].imbalance() < 1.01 and plans["greedy"].imbalance() < 1.01
    assert plans["plan"].simulation.ratio <= min(p.simulation.ratio for p in plans.values()) * 1.001


def test_plan_is_deterministic_and_fingerprint_names_differences():
    a = cp.plan(am.causal & am.sliding(500), 5000, 4)
    b = cp.plan(am.causal & am.sliding(500), 5000, 4)
    c = cp.plan(am.causal & am.sliding(501), 5000, 4)
    assert a.fingerprint() == b.fingerprint() and (a.owner == b.owner).all()
    assert a.fingerprint() != c.fingerprint()
    assert "sliding(501)" in c.describe()


def test_balanced_plan_keeps_window_traffic_local():
    plan = cp.plan(am.parse("causal & (sliding(1024) | sink(4))"), 65536, 8)
    assert plan.strategy in ("balanced", "contiguous")
    assert plan.received_tokens().max() <= 1024 + 128 + 128      # the window before it, the sink chunk
    assert plan.received_tokens().max() < plan.allgather_tokens().min() / 40


def test_plan_at_a_million_tokens_and_64_ranks_runs_in_seconds():
    t = time.perf_counter()
    plan = cp.plan(am.causal, 1 << 20, 64)
    assert time.perf_counter() - t < 20
    assert plan.imbalance() <= 1.05 and plan.simulation.ratio <= 1.1


def test_call_rules_separate_call_overhead_from_balance():
    # contiguous causal: one query run and one key run per source, so the runtime makes one call per step
    plans = cp.compare(am.causal, 16384, 4, block_size=128)
    c = plans["contiguous"]
    assert c.simulation_under("per_step").ratio == pytest.approx(c.simulation.ratio, rel=1e-12)
    for name in ("greedy", "ptrr"):      # scattered chunks: one runtime call per chunk pair
        p = plans[name]
        free, per_step, runtime = (p.simulation_under(r).ratio for r in cp.CALL_RULES[::-1])
        assert free <= per_step < runtime / 5
    assert plans["contiguous"].simulation_under("free").ratio == pytest.approx(plans["contiguous"].imbalance(),
                                                                               rel=0.02)
    with pytest.raises(cp.PlanError, match="unknown call rule 'some'"):
        c.simulation_under("some")


@pytest.mark.parametrize("text, strategy, schedule", [
    ("causal", "zigzag", "grouped"), ("causal", "greedy", "ring"),
    ("causal & document(100, 333, 50, 400, 117)", "ptrr", "grouped"),
    ("causal & (sliding(300) | sink(4))", "greedy", "allgather"), ("causal & sliding(200)", "balanced", "grouped")])
def test_the_runtime_call_rule_counts_the_calls_the_runtime_makes(text, strategy, schedule):
    # the simulation's "runtime" rule against the calls runtime._calls lists, step by step, rank by rank
    from attnmask.distributed import runtime
    from attnmask.distributed.planner import _rule_calls, shift_invariant
    mask = am.parse(text)
    plan = cp.plan(mask, 1000, 3, block_size=64, strategy=strategy, schedule=schedule)
    model = _rule_calls("runtime", plan.schedule, plan.need, plan.owner, plan.pairs,
                        shift_invariant(plan.masks)).sum(1)
    for r in range(3):
        geo = runtime._RankGeometry(plan, r)
        steps = [(0, geo.own_needed, runtime._segments(geo.own_needed, geo.local_start.__getitem__, r, plan))]
        if plan.schedule == "allgather":
            chunks = np.sort(np.concatenate(list(geo.recv.values())))
            steps.append((1, chunks, sum((runtime._segments(geo.recv[s], runtime._offsets(geo.recv[s], plan), s,
                                                             plan) for s in geo.recv), [])))
        else:
            steps += [(t, geo.recv[s], runtime._segments(geo.recv[s], runtime._offsets(geo.recv[s], plan), s, plan))
                      for t, (s,) in enumerate(geo.steps[1:], start=1)]
        made = sum(len(runtime._calls(plan, geo, *step)[1]) for step in steps)
        # the model counts every (query run, key run) with pairs between the two ranks; the runtime skips
        # the empty ones
        assert made <= model[r] and made >= 0.5 * model[r], (r, made, model[r])


def _best_contiguous_max(pairs, W):
    """The smallest largest part of a cut of ``pairs`` into W non-empty contiguous parts (dynamic programme)."""
    n = len(pairs)
    cum = np.r_[0, np.cumsum(pairs)]
    best = np.full((W + 1, n + 1), np.inf)
    best[0, 0] = 0
    for r in range(1, W + 1):
        for b in range(r, n + 1):
            best[r, b] = min(max(best[r - 1, a], cum[b] - cum[a]) for a in range(r - 1, b))
    return best[W, n]


@pytest.mark.parametrize("seed", range(6))
def test_call_aware_cuts_are_optimal_when_calls_are_free(seed):
    from attnmask.distributed.planner import _call_aware_cuts
    rng = np.random.default_rng(seed)
    n, W = int(rng.integers(8, 30)), int(rng.integers(2, 6))
    pairs = rng.integers(0, 1000, n) ** 2
    cum = np.r_[0, np.cumsum(pairs)]
    bounds = _call_aware_cuts(cum, np.full(n, -1), np.zeros(n + 1, bool), W, 0.0)
    assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == W + 1 and all(np.diff(bounds) > 0)
    got = max(cum[b] - cum[a] for a, b in zip(bounds, bounds[1:]))
    assert got <= _best_contiguous_max(pairs, W) * (1 + 1e-6)


def test_documents_at_a_million_tokens_on_64_ranks_meet_the_targets():
    # the figure: 1000 random documents; a long document spans ranks, a call costs ~3% of a rank
    rnd = random.Random(0)
    L = 1 << 20
    cuts = sorted(rnd.sample(range(1, L), 999))
    mask = am.causal & am.document(*[b - a for a, b in zip([0] + cuts, cuts + [L])])
    plan = cp.plan(mask, L, 64)
    assert plan.imbalance() <= 1.05 and plan.simulation.ratio <= 1.1


@pytest.mark.parametrize("bad, message", [
    (dict(world_size=0), "world_size must be >= 1"),
    (dict(length=100, world_size=4, block_size=64), "fewer than world_size 4"),
    (dict(strategy="zig"), "unknown strategy 'zig'"),
    (dict(schedule="tree"), "unknown schedule 'tree'"),
])
def test_plan_errors_say_what_and_how(bad, message):
    args = dict(mask=am.causal, length=1000, world_size=2, block_size=64)
    args.update(bad)
    with pytest.raises(cp.PlanError, match=message):
        cp.plan(args.pop("mask"), args.pop("length"), args.pop("world_size"), **args)


def test_plan_refuses_mask_mod_leaves():
    with pytest.raises(cp.PlanError, match="mask language"):
        cp.plan(am.from_mask_mod(lambda b, h, q, k: q >= k, "mine"), 1000, 2)


def test_shard_unshard_round_trip():
    plan = cp.plan(am.causal & am.document(300, 200, 500), 1000, 3, block_size=64, strategy="greedy")
    x = torch.randn(2, 3, 1000, 5)
    parts = [cp.shard(x, plan, r) for r in range(3)]
    assert [p.shape[-2] for p in parts] == [plan.local_length(r) for r in range(3)]
    assert torch.equal(cp.unshard(parts, plan), x)
    with pytest.raises(cp.PlanError, match="length 1000"):
        cp.shard(torch.randn(1, 1, 999, 4), plan, 0)


# -- process groups --------------------------------------------------------------------------------

def _docs(n, L, seed):
    rnd = random.Random(seed)
    cuts = sorted(rnd.sample(range(1, L), n - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [L])]


def _run_group(world, cases, tmp_path, timeout=120, pg_timeout=20):
    """Start `world` ranks, return (returncodes, per-rank parsed JSON lines, stderrs); nothing left running."""
    store = tmp_path / f"store{world}"
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(store), json.dumps(cases),
                               str(pg_timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    outs = []
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, [json.loads(x) for x in out.splitlines() if x.startswith("{")], err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert all(p.poll() is not None for p in procs)
    return outs


_FOUR_RANK_CASES = ("causal-ring", "causal-allgather-greedy", "window-sink-gqa", "documents", "per-head")


def _cases(world):
    L = 1000 if world == 2 else 1100          # neither a multiple of world x block
    docs = "causal & document(" + ", ".join(map(str, _docs(50, L, world))) + ")"
    cases = [
        dict(name="causal", mask="causal", length=L, heads=2, block=64),
        dict(name="causal-ring", mask="causal", length=L, heads=2, block=64, schedule="ring", strategy="zigzag"),
        dict(name="causal-allgather-greedy", mask="causal", length=L, heads=2, block=64, schedule="allgather",
             strategy="greedy"),
        dict(name="window-sink-gqa", mask="causal & (sliding(200) | sink(4))", length=L, heads=4, kv_heads=2,
             block=64),
        dict(name="documents", mask=docs, length=L, heads=2, block=64, seed=3),
        dict(name="documents-ptrr-ring", mask=docs, length=L, heads=2, block=64, strategy="ptrr", schedule="ring"),
        dict(name="per-head", per_head=True, mask=["causal", "causal & sliding(64)", "causal & (sliding(128) | sink(8))",
                                                   "causal - (rows(300, 400, 8) - diagonal)"],
             length=L, heads=4, kv_heads=2, block=64, seed=5),
        dict(name="batch2-non-causal", mask="band(100, 50) | cols(0, 3)", length=L - 1, heads=2, batch=2, block=64),
        dict(name="window-sink-gqa-autograd-backward", mask="causal & (sliding(200) | sink(4))", length=L, heads=4,
             kv_heads=2, block=64, autograd_backward=True),
        dict(name="causal-autograd-backward", mask="causal", length=L, heads=2, block=64, strategy="zigzag",
             autograd_backward=True),
        dict(name="documents-gather-gradient", mask=docs, length=L, heads=2, block=64, seed=4, gather_grad=True),
        dict(name="training-step", mask="causal & (sliding(300) | sink(4))", length=L, block=64, heads=2,
             training_step=True),
    ]
    if world == 2:
        return cases
    # fewer cases at 4 ranks: 4 processes share this machine's 2 cores
    return [c for c in cases if c["name"] in _FOUR_RANK_CASES]


def _assert_matches_single_process(results, expected: dict):
    """expected: rank -> list of (case name, world) it must report, in order."""
    for rank, (code, lines, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-4000:]}"
        lines = [x for x in lines if "case" in x]
        assert [(x["case"], x["world"]) for x in lines] == expected[rank]
        for line in lines:
            if line["ok"]:
                for key in ("out", "dq", "dk", "dv", "gather", "gather_dq", "gather_dk"):
                    assert line.get(key, 0.0) <= 1e-5, (rank, line)
    assert any("gather_dq" in x for _, lines, _ in results for x in lines)


def test_four_and_two_ranks_match_one_process_and_name_mismatched_plans(tmp_path):
    # One group of 4 processes (process start dominates on this machine): the 4-rank cases on the whole
    # group, then the 2-rank cases on the subgroup of ranks 0 and 1 (which also tests group=).
    four = _cases(4)
    two = [dict(c, group=[0, 1]) for c in _cases(2)]
    two.append(dict(name="mismatch", mask="causal & sliding(300)", mismatch="causal & sliding(301)", length=1000,
                    heads=2, block=64, group=[0, 1]))
    results = _run_group(4, four + two, tmp_path)
    expected = {r: [(c["name"], 4) for c in four] + ([(c["name"], 2) for c in two] if r < 2 else [])
                for r in range(4)}
    _assert_matches_single_process(results, expected)
    schedules = {(x["world"], x["schedule"]) for _, lines, _ in results for x in lines if x.get("ok")}
    assert {s for w, s in schedules if w == 4} == {"grouped", "ring", "allgather"}
    assert {s for w, s in schedules if w == 2} == {"grouped", "ring", "allgather"}
    for rank in (0, 1):
        bad = [x for x in results[rank][1] if x.get("case") == "mismatch"][0]
        assert not bad["ok"] and bad["error"] == "PlanMismatchError"
        assert "sliding(300)" in bad["message"] and "sliding(301)" in bad["message"]
        assert "rank(s) 0" in bad["message"] and "rank(s) 1" in bad["message"]


def test_a_rank_that_raises_brings_the_group_down(tmp_path):
    cases = [dict(name="causal", mask="causal", length=1000, heads=2, block=64, raise_on=1)]
    t = time.monotonic()
    results = _run_group(2, cases, tmp_path, timeout=60, pg_timeout=4)
    elapsed = time.monotonic() - t
    (code0, _, err0), (code1, _, err1) = results
    assert code1 != 0 and "boom on rank 1" in err1
    assert code0 != 0 and "CommunicationError" in err0 and "rank 0" in err0
    assert elapsed < 4 + 30           # the process group's timeout plus process start-up, not a hang


# -- the command -----------------------------------------------------------------------------------

def test_cp_plan_command_prints_the_comparison_and_draws(tmp_path, capsys):
    from attnmask.cli import main
    out_png = tmp_path / "plan.png"
    assert main(["cp-plan", "causal & (sliding(512) | sink(4))", "--length", "16384", "--world", "8",
                 "-o", str(out_png)]) == 0
    text = capsys.readouterr().out
    for word in ("busiest/mean", "step/ideal", "contiguous", "zigzag", "ptrr", "recv MiB", "per rank"):
        assert word in text
    assert len([line for line in text.splitlines() if line.strip()[:2].strip().isdigit()]) >= 8   # one per rank
    assert out_png.stat().st_size > 10_000


def test_cp_plan_command_json_and_bad_input(capsys):
    from attnmask.cli import main
    assert main(["cp-plan", "causal", "--length", "4096", "--world", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"plan", "contiguous", "zigzag", "ptrr", "greedy", "balanced"}
    assert main(["cp-plan", "causal", "--length", "100", "--world", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fewer than world_size 4" in err
    assert main(["cp-plan", "causal", "--length", "4096", "--world", "4", "--strategy", "zag"]) == 2
    assert "unknown strategy 'zag'" in capsys.readouterr().err

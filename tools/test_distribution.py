"""Measure what the property tests generate: run them under the ``ci`` profile and count.

The tests record each problem they run (tests/distribution.py); this script runs
them with ``ATTNMASK_TEST_DISTRIBUTION`` set, then reports, per test, the share
of problems that are 1 x 1, mask every row, are all-true, have several query
blocks, hold a fully masked row among live ones, are long (>= 2048 query rows),
have an explicit non-zero q_offset on a square shape, and, from the engine's
plan when the engine exposes one (``engines.blocksparse.plan_for``), how many
merge two kernel results into some row and how many merge into a row with no
key (the path a deleted isfinite guard breaks).

    PYTHONPATH=src python tools/test_distribution.py --out benchmarks/results/test_distribution.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_attention.py::test_random_masks_match_float64",
    "tests/test_backward.py::test_random_masks_and_shapes",
    "tests/test_engine_paths.py::test_random_engine_problems_forward",
    "tests/test_engine_paths.py::test_random_engine_problems_backward",
]


def _merges(layout) -> tuple[int, int] | None:
    """(ops merging into earlier results, of those touching a row with no key), or None if no plan API."""
    try:
        from attnmask.engines.blocksparse import plan_for
        plan = plan_for(layout)
        ops = plan.ops
    except Exception:                                   # the engine was rewritten: no such internal
        return None
    dead = ~layout.to_dense().any(1)
    merging = into_dead = 0
    for op in ops:
        if getattr(op, "first", True):
            continue
        merging += 1
        for g in range(op.G):
            r = op.r0 + g * op.dr
            if dead[r:r + op.rows].any():
                into_dead += 1
                break
    return merging, into_dead


def _long_paths(layout, p: dict) -> tuple[bool, bool, bool] | None:
    """From the engine's plans (None if it has no such internals): (a forward call of >= 2048 rows,
    a forward call that tests/test_engine_paths.py's lowered bound CUT_BOUND cuts into row pieces,
    a backward op split into several kernel calls by ``costs.KEYS_PER_CALL``)."""
    try:
        from attnmask.engines import costs
        from attnmask.engines.blocksparse import _row_cuts, plan_for
        fwd, bwd = plan_for(layout, costs.FORWARD), plan_for(layout, costs.BACKWARD)
    except Exception:                                   # the engine was rewritten: no such internals
        return None
    cut_bound = 16 << 10                                # test_engine_paths.CUT_BOUND
    per_row = p["B"] * p["H"] * p["D"] * 4
    long_call = (fwd.causal and layout.q_len >= 2048) or any(op.rows >= 2048 for op in fwd.ops)
    cut = any(op.G == 1 and not op.causal and op.mask is None and op.rows * per_row > cut_bound
              and len(_row_cuts(op.rows, cut_bound // per_row)) > 1 for op in fwd.ops)
    split = any(max(1, costs.KEYS_PER_CALL // max(op.span + sum(b - a for a, b in op.extra), 1)) < op.G
                for op in bwd.ops)
    return long_call, cut, split


def features(p: dict) -> dict:
    import attnmask as am
    mask = am.parse(p["mask"])
    Lq, Lk, off = p["Lq"], p["Lk"], p["q_offset"]
    block = tuple(p["block"]) if isinstance(p["block"], list) else p["block"]
    bq = block[0] if isinstance(block, tuple) else block
    allowed = mask.to_dense(Lq, Lk, q_offset=off)
    live = allowed.any(1)
    lay = mask.compile(Lq, Lk, q_offset=off, block_size=block)
    m = _merges(lay)
    paths = _long_paths(lay, p) if Lq >= 2048 else (False, False, False)
    return {
        "1 x 1": Lq == 1 and Lk == 1,
        "every row masked": not bool(live.any()),
        "all-true": bool(allowed.all()),
        ">= 2 query blocks": -(-Lq // bq) >= 2,
        "a fully masked row among live rows": bool(live.any()) and not bool(live.all()),
        ">= 2048 query rows": Lq >= 2048,
        "a forward call of >= 2048 rows": None if paths is None else paths[0],
        "a long call cut into row pieces (at the test's lowered bound)": None if paths is None else paths[1],
        "backward op split into several calls": None if paths is None else paths[2],
        "square, explicit q_offset != 0": Lq == Lk and off not in (None, 0),
        "gradient through lse": bool(p.get("use_lse", False)),
        "plan merges results": None if m is None else m[0] > 0,
        "plan merges into a row with no key": None if m is None else m[1] > 0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "problems.jsonl"
        env = dict(os.environ, CI="true", ATTNMASK_TEST_DISTRIBUTION=str(rec), PYTHONPATH=str(ROOT / "src"))
        env.pop("ATTNMASK_HYPOTHESIS", None)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W",
                               "ignore::DeprecationWarning", *TESTS], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        summary = [ln for ln in proc.stdout.splitlines() if "passed" in ln or "failed" in ln or "profile" in ln]
        rows = [json.loads(ln) for ln in rec.read_text().splitlines()] if rec.exists() else []
    torch.set_num_threads(1)
    by_test: dict[str, list[dict]] = {}
    for r in rows:
        by_test.setdefault(r["test"], []).append(features(r))
    names = list(next(iter(by_test.values()))[0]) if by_test else []
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    out = ["# What the property tests generate", "",
           f"- date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, revision `{rev}`, "
           f"{cpu.split(':', 1)[-1].strip()} (under the machine's CPU lock)",
           "- command: `PYTHONPATH=src python tools/test_distribution.py --out benchmarks/results/test_distribution.md`",
           "- profile `ci` (derandomized): every problem the tests ran, counted; pytest said: "
           + " / ".join(s.strip() for s in summary),
           "- the plan columns read the engine's internal plan (`engines.blocksparse.plan_for`); n/a where the "
           "engine has none", "",
           "| feature | " + " | ".join(f"`{t}` (n={len(v)})" for t, v in by_test.items()) + " |",
           "|---|" + "---|" * len(by_test)]
    for name in names:
        cells = []
        for feats in by_test.values():
            vals = [f[name] for f in feats]
            cells.append("n/a" if any(v is None for v in vals) else f"{sum(vals)} ({100 * sum(vals) / len(vals):.0f}%)")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "The first two columns are the older generic strategies (tiny lengths, any expression); the last "
            "two are `strategies.engine_problems`, about one draw in 20 (forward) or 12 (backward) of which is long "
            "(2688-2816 query rows, B = H = 1, D <= 8: a window of 128-192 keys beside 272-384 keys in whole blocks that "
            "every row shares, more than the 256-key sets the engine gathers apart, "
            "so one maskless call spans >= 2048 rows, and small blocks, so the backward's work is several "
            "calls; the backward test draws no lse gradient for them, whose matmul path costs seconds there). The cut of long calls depends on bytes (a call's queries over "
            "`costs.CHUNK_BYTES`, 16 MB), which small H and D never reach: for its long draws the forward test "
            "runs again with the bound lowered to 16 KB and asserts the same bits, so the 'cut' row counts "
            "calls cut at that bound (forward test only). The backward's split (`costs.KEYS_PER_CALL` keys a "
            "call) needs no change of bound. Fixed long cases remain: "
            "`test_long_calls_on_shared_keys_match_float64` (4096 and 5000 query rows in one maskless call, `cols(0, 384)` among them, cut "
            "at the real bound) and `test_long_backward_of_a_window_matches_float64` (16384 tokens), both in "
            "tests/test_engine_paths.py, with the fully masked rows inside merged blocks of "
            "`test_fully_masked_rows_inside_merged_blocks` and the square q_offset backward cases of "
            "`test_backward_with_q_offset_on_square_shapes`. Counts are per problem run (n can exceed "
            "max_examples by hypothesis' retries of invalid draws)."]
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: exact long-context analysis (``am.analyze``) of the README's example masks at 1M tokens.

For each mask: ``am.analyze(mask, N, layers=L)`` with the layout cache
cleared before every call (so each timing includes compiling the layouts it
needs), ``--repeats`` times; the table shows the first and the median time and
every figure of the report. Target: each analysis under 5 s on the 2-core
development machine.

    python benchmarks/bench_analysis.py                       # writes benchmarks/results/analysis.md
    python benchmarks/bench_analysis.py --length 65536 --out -  # quick smoke run to stdout
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone

from harness import machine_description

DOC_COUNT, DOC_SEED = 1000, 0
TARGET_S = 5.0


def cases(n: int) -> list[tuple[str, object]]:
    """(label, mask) for the README's example masks at length ``n``."""
    import numpy as np

    import attnmask as am
    # 1000 documents cut at random positions (the same recipe as bench_compile.py).
    rng = np.random.default_rng(DOC_SEED)
    cuts = np.sort(rng.choice(np.arange(1, n), DOC_COUNT - 1, replace=False))
    lengths = np.diff(np.concatenate(([0], cuts, [n])))
    return [
        ("causal & (sliding(4096) | sink(4))", am.causal & (am.sliding(4096) | am.sink(4))),
        ("prefix_lm(65536)", am.prefix_lm(65536)),
        ("causal & chunked(8192)", am.causal & am.chunked(8192)),
        (f"causal & document(<{DOC_COUNT} random>)", am.causal & am.document(*lengths.tolist())),
        ("causal - (rows(1000, N, 4096) - diagonal)", am.causal - (am.rows(1000, n, 4096) - am.diagonal)),
        ("causal & dilated(512, 8)", am.causal & am.dilated(512, 8)),
        ("causal", am.causal),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=1 << 20)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "analysis.md"),
                    help="markdown results file, or - for stdout only")
    args = ap.parse_args(argv)

    import attnmask as am
    n, layers = args.length, args.layers
    am.analyze("causal & sliding(16)", 1024, layers=2)      # imports and first-call setup, not timed
    rows = []
    for label, mask in cases(n):
        times = []
        report = None
        for _ in range(args.repeats):
            am.clear_cache()
            t0 = time.perf_counter()
            report = am.analyze(mask, n, layers=layers)
            times.append(time.perf_counter() - t0)
        rows.append((label, report, times))
        print(f"{label:45s} first {times[0]:.2f} s  median {statistics.median(times):.2f} s", flush=True)

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"# Long-context analysis at {n:,} tokens",
        "",
        f"- date: {date}",
        f"- machine: {machine_description()}",
        f"- command: `{cmd}`",
        f"- what is timed: `am.analyze(mask, {n}, layers={layers})` (block_size 128, head_dim 128, heads 1), "
        f"layout cache cleared before each call, {args.repeats} calls per mask; target < {TARGET_S:g} s each",
        "",
        "| mask | pairs | density | FLOPs vs causal | tiles full / partial / empty | KV-cache peak (step) "
        f"| receptive field, {layers} layers (earliest key) | keys per row min / median / max | masked rows "
        "| first (s) | median (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r, times in rows:
        lines.append(
            f"| `{label.replace('|', chr(92) + '|')}` | {r.attended_pairs:,} | {r.density:.4g} | {r.flops_ratio:.4g} "
            f"| {r.blocks_full:,} / {r.blocks_partial:,} / {r.blocks_empty:,} "
            f"| {r.kv_cache_peak:,} ({r.kv_cache_peak_step:,}) | {r.receptive_field:,} ({r.earliest_key:,}) "
            f"| {r.row_keys_min:,} / {r.row_keys_median:,g} / {r.row_keys_max:,} | {r.rows_fully_masked:,} "
            f"| {times[0]:.2f} | {statistics.median(times):.2f} |")
    worst = max(max(t) for _, _, t in rows)
    lines += ["", f"Slowest single call: {worst:.2f} s ({'within' if worst < TARGET_S else 'OVER'} the "
              f"{TARGET_S:g} s target). FLOPs: forward = 4 x pairs x head_dim x heads, backward = 2.5x forward, "
              "so the FLOPs ratio equals the pairs ratio.", ""]
    text = "\n".join(lines)
    if args.out == "-":
        print(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

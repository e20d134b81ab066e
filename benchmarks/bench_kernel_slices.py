"""What one score costs in PyTorch's CPU flash kernel, by the number of query rows per call.

The block-sparse engine's planner (``_kernel_cost`` in attnmask/engines/blocksparse.py)
chooses between one call on a whole block and several row pieces trimmed to their
keys. The kernel slices a call's queries into 32-row pieces below 192 rows, 64-row
pieces below 768 and 256-row pieces above, and every slice streams all the call's
keys, so small calls cost more per score. This script measures that on a sliding
window: ``G`` query blocks of R rows, each against its own R + W - 1 keys (strided
views, one call, an additive band mask), for several R, and prints ns per computed
score and per attended pair, relative to the best R. The engines take turns round
by round (best of ``--repeats``), so a noisy spell hits them alike.

    $ python benchmarks/bench_kernel_slices.py                      # writes benchmarks/results/kernel_slices.md
    $ python benchmarks/bench_kernel_slices.py --window 512 --results ''
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

import torch

from harness import machine_description, save_results

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--rows", default="32,64,96,128,192,256,384,768")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", default="benchmarks/results/kernel_slices.md", help="markdown file ('' = none)")
    args = ap.parse_args(argv)
    n, h, d, w = args.length, args.heads, args.dim, args.window
    started = datetime.datetime.now(datetime.timezone.utc)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, h, n, d, generator=g)
    k = torch.randn(1, h, n + w, d, generator=g)      # w keys of padding in front: every block sees a full window
    v = torch.randn(1, h, n + w, d, generator=g)

    def view(t, step, blocks, length):
        _, sh, sl, sd = t.stride()
        return t.as_strided((h, blocks, length, d), (sh, step * sl, sl, sd), t.storage_offset())

    calls = {}
    for r in (int(x) for x in args.rows.split(",")):
        blocks, span = n // r, r + w - 1
        i = torch.arange(r)[:, None]
        j = torch.arange(span)[None, :]
        band = torch.zeros(r, span).masked_fill_(~((j >= i) & (j <= i + w - 1)), float("-inf"))
        qs, ks, vs = view(q, r, blocks, r), view(k, r, blocks, span), view(v, r, blocks, span)
        calls[r] = (lambda qs=qs, ks=ks, vs=vs, band=band: _flash(qs, ks, vs, 0.0, False, attn_mask=band,
                                                                    scale=d ** -0.5), blocks * r, span)
    best = {r: math.inf for r in calls}
    for fn, _, _ in calls.values():
        fn()                                            # warm-up
    for _ in range(args.repeats):
        for r, (fn, _, _) in calls.items():
            t0 = time.perf_counter()
            fn()
            best[r] = min(best[r], time.perf_counter() - t0)
    rows_out = []
    for r, (_, rows, span) in calls.items():
        ms = best[r] * 1e3
        rows_out.append((r, span, ms, ms * 1e6 / (h * rows * span), ms * 1e6 / (h * rows * w)))
    floor = min(x[3] for x in rows_out)
    lines = [f"# CPU flash kernel: cost per score by query rows per call", "",
             f"- Date: {started:%Y-%m-%d %H:%M} UTC",
             f"- Machine: {machine_description()}",
             f"- Command: `python benchmarks/bench_kernel_slices.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- Case: sliding window of {w} keys over {n} queries, {h} heads, D={d}, fp32; each block of R rows against its "
             f"own R + {w} - 1 keys with an additive band mask, all blocks in one call; best of {args.repeats}, "
             "engines taking turns.", "",
             "| rows per call (R) | kernel slice | keys per block | ms | ns / computed score | relative | ns / attended pair |",
             "|---|---|---|---|---|---|---|"]
    for r, span, ms, per_score, per_pair in rows_out:
        slice_rows = 256 if r >= 768 else 64 if r >= 192 else 32
        lines.append(f"| {r} | {slice_rows} | {span} | {ms:.1f} | {per_score:.3f} | {per_score / floor:.2f} | "
                     f"{per_pair:.3f} |")
    lines += ["", "The planner's `_kernel_cost` uses relative factors 1.0 / 1.08 / 1.18 for 256- / 64- / 32-row "
              "slices, rounded from runs of this script."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        save_results(args.results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

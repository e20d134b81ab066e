"""Parse time of giant and adversarial texts (10^5 - 10^6 characters), and its growth with the length.

The unit tests check the parser's linear-time guarantee by counting work
(tests/test_language.py: ``test_parsing_work_grows_linearly_with_the_input``);
this script measures the time itself: each family at n and 4n (CPU seconds of
this process, best of ``--repeats``), with the ratio (about 4 when linear).

    python benchmarks/bench_parse.py                        # writes benchmarks/results/parse.md
    python benchmarks/bench_parse.py --out -                # print only
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import attnmask as am
from harness import machine_description

FAMILIES = {
    "spaces": (lambda n: "causal" + " " * n, 250_000),
    "long name": (lambda n: "c" * n, 250_000),
    "long number": (lambda n: "sliding(" + "1" * n + ")", 250_000),
    "many args": (lambda n: "document(" + ", ".join(["1"] * n) + ")", 25_000),
    "nest (refused at depth 100)": (lambda n: "(" * n + "causal" + ")" * n, 25_000),
    "tildes (refused)": (lambda n: "~" * n + "causal", 25_000),
    "or chain": (lambda n: " | ".join(["causal"] * n), 25_000),
    "and chain": (lambda n: " & ".join(["causal"] * n), 25_000),
    "sub chain (refused)": (lambda n: " - ".join(["causal"] * n), 25_000),
    "mixed chain": (lambda n: " | ".join(["causal & sliding(3)"] * n), 12_500),
    "right nest (refused)": (lambda n: "causal | (" * n + "full" + ")" * n, 25_000),
}


def cpu_seconds(text: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        try:
            am.parse(text)
        except am.MaskError:
            pass
        best = min(best, time.process_time() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "parse.md"))
    args = ap.parse_args(argv)
    rows = []
    for name, (make, n) in FAMILIES.items():
        small, big = make(n), make(4 * n)
        ts, tb = cpu_seconds(small, args.repeats), cpu_seconds(big, args.repeats)
        rows.append(f"| {name} | {len(small):,} | {ts * 1e3:.1f} | {len(big):,} | {tb * 1e3:.1f} | {tb / ts:.2f} |")
        print(rows[-1], flush=True)
    lines = ["# Parse time of giant texts", "",
             f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine_description()}",
             f"- command: `PYTHONPATH=src python benchmarks/bench_parse.py --repeats {args.repeats}`",
             "- CPU seconds of the process, best of the repeats; 'refused' families end in a MaskError "
             "(nesting past 100 levels) after tokenizing the whole text", "",
             "| input | characters | ms | characters (4x) | ms | ratio |", "|---|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

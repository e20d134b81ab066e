"""Compile at 1,048,576 tokens and at N - 1, N - 2; memory the cache retains; window2d on a megapixel canvas.

Three measurements, each in a fresh subprocess, written as one section of
benchmarks/results/compile.md (between the markers ``<!-- lengths -->``):

1. the six masks of bench_compile.py at N, N-1 and N-2 (lengths that are not a multiple
   of the block): first compiles (``attnmask.clear_cache()`` before each), median and
   min of ``--repeats``, engines taking turns mask by mask;
2. memory retained after those 18 distinct compiles, each followed by
   ``attended_pairs()`` and ``row_counts()`` (the counts that used to keep the compiler
   alive): RSS after ``gc`` + ``malloc_trim`` against RSS before, beside the cache's own
   byte count and bound;
3. ``window2d(1024, 1024, 7, 7)`` at 1,048,576 positions: compile time (median, min) and
   the growth of peak RSS over the RSS before the call.

    python benchmarks/bench_compile_lengths.py                 # writes the section of compile.md
    python benchmarks/bench_compile_lengths.py --out -         # print only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

from bench_compile import CASES, _measure_peak, _release_freed, build_mask, label
from harness import machine_description, status_kb

N = 1 << 20
MARK = "<!-- lengths -->"


def worker_times(repeats: int) -> dict:
    import attnmask as am
    out = {}
    masks = {(c, n): build_mask(c, n) for c in CASES for n in (N, N - 1, N - 2)}
    for (c, n), m in masks.items():           # warm the code paths once
        am.clear_cache()
        m.compile(n)
    times = {key: [] for key in masks}
    cpu = {key: [] for key in masks}
    for _ in range(repeats):
        for key, m in masks.items():          # masks take turns, repeat after repeat
            am.clear_cache()
            t0, c0 = time.perf_counter(), time.process_time()
            m.compile(key[1])
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
    for (c, n), ts in times.items():
        out[f"{c}|{n}"] = {"median_s": statistics.median(ts), "min_s": min(ts),
                           "cpu_median_s": statistics.median(cpu[(c, n)])}
    return out


def worker_retained() -> dict:
    import attnmask as am
    am.clear_cache()
    masks = [(build_mask(c, n), n) for c in CASES for n in (N, N - 1, N - 2)]
    _release_freed()
    before = status_kb("VmRSS")
    for m, n in masks:
        lay = m.compile(n)
        lay.attended_pairs()
        lay.row_counts()
        del lay
    _release_freed()
    after = status_kb("VmRSS")
    info = am.cache_info()
    am.clear_cache()
    _release_freed()
    cleared = status_kb("VmRSS")
    return {"compiles": len(masks), "retained_mb": (after - before) / 1024, "cache": info,
            "after_clear_mb": (cleared - before) / 1024}


def worker_window2d(repeats: int) -> dict:
    import attnmask as am
    m = am.window2d(1024, 1024, 7, 7)
    am.clear_cache()
    holder = {}
    cold_s, peak_mb, exact = _measure_peak(lambda: holder.setdefault("lay", m.compile(N)))
    lay = holder.pop("lay")
    facts = {"runs": lay.n_runs, "dense_tiles": lay.dense_tiles_evaluated, "pairs": lay.attended_pairs()}
    del lay
    times = []
    for _ in range(repeats):
        am.clear_cache()
        t0 = time.perf_counter()
        m.compile(N)
        times.append(time.perf_counter() - t0)
    return {"cold_s": cold_s, "peak_mb": peak_mb, "peak_exact": exact, "median_s": statistics.median(times),
            "min_s": min(times), **facts}


def run(kind: str, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section(times: dict, retained: dict, w2d: dict, command: str, started: datetime, load) -> str:
    lines = [MARK, "", "## At N, N-1 and N-2; memory retained; window2d (issue 11)", "",
             f"- date: {started:%Y-%m-%d %H:%M} UTC; load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
             "(run under the machine's CPU lock, which the other engineers' benchmarks and suites also take)",
             f"- machine: {machine_description()}",
             f"- command: `{command}`", "",
             "First compiles (`attnmask.clear_cache()` before each), the 18 masks taking turns; block 128. "
             "Wall time median (min); in brackets the process's CPU time (median), which other jobs on the "
             "machine disturb less (the compiler runs on one thread).", "",
             "| mask | N | N - 1 | N - 2 |", "|---|---:|---:|---:|"]
    for c in CASES:
        cells = [f"{times[f'{c}|{n}']['median_s'] * 1e3:.1f} ms ({times[f'{c}|{n}']['min_s'] * 1e3:.1f}) "
                 f"[cpu {times[f'{c}|{n}']['cpu_median_s'] * 1e3:.1f}]" for n in (N, N - 1, N - 2)]
        lines.append(f"| `{label(c).replace('|', chr(92) + '|')}` | " + " | ".join(cells) + " |")
    worst = max(v["median_s"] for v in times.values())
    worst_min = max(v["min_s"] for v in times.values())
    lines += ["", f"Slowest wall median {worst * 1e3:.1f} ms, slowest min {worst_min * 1e3:.1f} ms "
              f"(target < 100 ms: {'met' if worst < 0.1 else 'NOT met'} by the medians of this run).", ""]
    cache = retained["cache"]
    lines += [f"Memory retained after {retained['compiles']} distinct compiles at 1M (each followed by "
              f"`attended_pairs()` and `row_counts()`): RSS +{retained['retained_mb']:.1f} MB after gc and "
              f"malloc_trim; the cache then held {cache['layouts']} layouts, {cache['bytes'] / 2**20:.1f} MB of "
              f"arrays (bound {cache['limit_bytes'] / 2**20:.0f} MB); after `clear_cache()` RSS was "
              f"+{retained['after_clear_mb']:.1f} MB over the start.", ""]
    lines += [f"`window2d(1024, 1024, 7, 7)` at 1,048,576 positions: compile {w2d['median_s'] * 1e3:.0f} ms median "
              f"({w2d['min_s'] * 1e3:.0f} ms min, first compile of the process {w2d['cold_s'] * 1e3:.0f} ms), "
              f"peak RSS growth {w2d['peak_mb']:.0f} MB{'' if w2d['peak_exact'] else ' (peak not resettable: upper bound)'}; "
              f"{w2d['runs']:,} runs, {w2d['dense_tiles']} tiles evaluated cell by cell, "
              f"{w2d['pairs']:,} attended pairs (= 49 x N). Target < 1 s and < 512 MB: "
              f"{'met' if w2d['median_s'] < 1 and w2d['peak_mb'] < 512 else 'NOT met'}.", "", MARK]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        res = {"times": lambda: worker_times(a.repeats), "retained": worker_retained,
               "window2d": lambda: worker_window2d(a.repeats)}[a.worker]()
        print(json.dumps(res))
        return 0
    started, load = datetime.now(timezone.utc), os.getloadavg()
    command = "python benchmarks/bench_compile_lengths.py" + ("" if a.repeats == 7 else f" --repeats {a.repeats}")
    text = section(run("times", a.repeats), run("retained", a.repeats), run("window2d", a.repeats), command,
                   started, load)
    print(text)
    if a.out != "-":
        old = open(a.out).read() if os.path.exists(a.out) else ""
        pattern = re.compile(re.escape(MARK) + ".*" + re.escape(MARK) + "\n?", re.S)
        new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
        with open(a.out, "w") as f:
            f.write(new)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: mask -> exact block layout, attnmask vs FlexAttention's create_block_mask.

For each mask and length, side by side in one run:

* attnmask: ``mask.compile(N, block_size=B)``, first compiles only
  (``attnmask.clear_cache()`` before each timing); the median of ``--repeats``
  runs, plus the very first compile of a fresh process ("cold").
* FlexAttention: ``create_block_mask(mask.mask_mod, None, None, N, N,
  device="cpu", BLOCK_SIZE=B, _compile=True)``, warm: a first call at the same
  shape compiles it, the second call is timed.

Every case runs in its own fresh subprocess, so memory figures do not leak
between cases. Peak memory is the growth of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs just before the measured call)
over its resident set before the call: it sees numpy and torch allocations
alike. For attnmask the numpy peak from ``tracemalloc`` (a separate, untimed
compile) is shown too. create_block_mask cases over ``--cbm-max-length`` or
that run past ``--cbm-timeout`` seconds are reported as "skipped (budget)".

    python benchmarks/bench_compile.py                      # full run, writes benchmarks/results/compile.md
    python benchmarks/bench_compile.py --lengths 4096 --no-cbm --out -   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

from harness import machine_description, reset_peak, status_kb

CASES = ["window_sink", "prefix_lm", "chunked", "document", "row_cut", "dilated"]
DEFAULT_LENGTHS = [65536, 262144, 1048576]
DOC_COUNT, DOC_SEED = 1000, 0


def document_lengths(n: int) -> list[int]:
    """DOC_COUNT random document lengths summing to ``n`` (seeded)."""
    import numpy as np
    rng = np.random.default_rng(DOC_SEED)
    cuts = np.sort(rng.choice(np.arange(1, n), DOC_COUNT - 1, replace=False))
    return np.diff(np.concatenate(([0], cuts, [n]))).tolist()


def build_mask(case: str, n: int):
    """The benchmark's mask for ``case`` at length ``n``."""
    import attnmask as am
    if case == "window_sink":
        return am.causal & (am.sliding(4096) | am.sink(4))
    if case == "prefix_lm":
        return am.prefix_lm(65536)
    if case == "chunked":
        return am.causal & am.chunked(8192)
    if case == "document":
        return am.causal & am.document(*document_lengths(n))
    if case == "row_cut":
        return am.causal - (am.rows(1000, n, 4096) - am.diagonal)
    if case == "dilated":
        return am.causal & am.dilated(512, 8)
    raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")


def label(case: str) -> str:
    return {"window_sink": "causal & (sliding(4096) | sink(4))", "prefix_lm": "prefix_lm(65536)",
            "chunked": "causal & chunked(8192)", "document": f"causal & document(<{DOC_COUNT} random>)",
            "row_cut": "causal - (rows(1000, N, 4096) - diagonal)", "dilated": "causal & dilated(512, 8)"}[case]


# ---------------------------------------------------------------------------
# memory probes (Linux /proc)
# ---------------------------------------------------------------------------

def _release_freed() -> None:
    # Hand memory freed by earlier calls back to the OS, so that a measured call
    # that reuses it still shows up as RSS growth (a warm create_block_mask call
    # would otherwise recycle the pages of its first call and look free).
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_peak(fn) -> tuple[float, float, bool]:
    """(seconds, peak RSS growth in MiB, whether the peak could be reset) of one call."""
    _release_freed()
    exact = reset_peak()
    before = status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    peak = status_kb("VmHWM")
    return dt, max(0, peak - before) / 1024, exact


# ---------------------------------------------------------------------------
# workers (one fresh process per case)
# ---------------------------------------------------------------------------

def worker_attnmask(case: str, n: int, block: int, repeats: int) -> dict:
    import tracemalloc

    import attnmask as am
    mask = build_mask(case, n)
    am.clear_cache()
    # The first compile of the process: time and peak memory together.
    holder = {}
    cold_s, peak_mb, exact = _measure_peak(lambda: holder.setdefault("lay", mask.compile(n, block_size=block)))
    lay = holder.pop("lay")
    n_runs, nqb = lay.n_runs, lay.n_q_blocks
    dense_tiles = getattr(lay, "dense_tiles_evaluated", None)
    del lay
    times = []
    for _ in range(repeats):
        am.clear_cache()
        t0 = time.perf_counter()
        lay = mask.compile(n, block_size=block)
        _ = lay.n_runs
        times.append(time.perf_counter() - t0)
        del lay
    am.clear_cache()
    tracemalloc.start()
    mask.compile(n, block_size=block)
    _, np_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    am.clear_cache()
    digest = _states_digest(mask.compile(n, block_size=block).block_states().numpy()) if n <= 262144 else None
    am.clear_cache()
    return {"digest": digest, "median_s": statistics.median(times), "min_s": min(times), "cold_s": cold_s, "peak_mb": peak_mb,
            "peak_exact": exact, "tracemalloc_mb": np_peak / 2**20, "n_runs": n_runs, "n_q_blocks": nqb,
            "dense_tiles": dense_tiles}


def _states_digest(states) -> str:
    """A fingerprint of an int8 [q_blocks, kv_blocks] tile-state matrix, to compare the two tools."""
    import hashlib
    return hashlib.sha1(states.astype("int8").tobytes() + str(states.shape).encode()).hexdigest()[:16]


def worker_cbm(case: str, n: int, block: int, document_mod: str = "docid") -> dict:
    import numpy as np
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    mask = build_mask(case, n)
    mod = mask.mask_mod
    if case == "document" and document_mod == "docid":
        # How FlexAttention users write document masks: a per-position document id
        # lookup. (attnmask's own mask_mod for document() graph-breaks under
        # torch.compile, so create_block_mask falls back to an eager N^2 build.)
        doc = torch.repeat_interleave(torch.arange(DOC_COUNT), torch.tensor(document_lengths(n)))

        def mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (doc[q_idx] == doc[kv_idx])

    def call():
        return create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=block, _compile=True)

    t0 = time.perf_counter()
    call()                                   # compiles create_block_mask for this shape
    first_s = time.perf_counter() - t0
    holder = {}
    warm_s, peak_mb, exact = _measure_peak(lambda: holder.setdefault("bm", call()))
    bm = holder.pop("bm")
    nqb, nkb = -(-n // block), -(-n // block)
    states = np.zeros((nqb, nkb), np.int8)
    for num, idx, state in ((bm.kv_num_blocks, bm.kv_indices, 1), (bm.full_kv_num_blocks, bm.full_kv_indices, 2)):
        num, idx = num[0, 0].numpy(), idx[0, 0].numpy()
        for row in range(nqb):
            states[row, idx[row, :num[row]]] = state
    return {"digest": _states_digest(states), "warm_s": warm_s, "first_s": first_s, "peak_mb": peak_mb, "peak_exact": exact,
            "torch": torch.__version__}


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def run_worker(args: list[str], timeout: float) -> dict | str:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "skipped (budget)"
    if proc.returncode != 0:
        # the last line naming an error (torch prints warnings after some of them)
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["?"]
        named = [ln for ln in lines if "Error" in ln and not ln.startswith(" ")]
        return f"failed: {(named or lines)[-1].strip()[:90]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def fmt_s(s: float) -> str:
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="comma-separated context lengths (default %(default)s)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="attnmask timings per case (median reported)")
    p.add_argument("--cbm-max-length", type=int, default=262144,
                   help="longest length at which create_block_mask is run (its cost grows as N^2)")
    p.add_argument("--cbm-timeout", type=float, default=300.0,
                   help="seconds allowed per create_block_mask case (compile + warm call)")
    p.add_argument("--cbm-budget", type=float, default=1500.0,
                   help="seconds allowed for all create_block_mask cases together; later ones are skipped")
    p.add_argument("--cbm-document-mod", choices=["docid", "attnmask"], default="docid",
                   help="mask_mod given to create_block_mask for the document case: a document-id lookup "
                        "(default) or attnmask's mask.mask_mod")
    p.add_argument("--no-cbm", action="store_true", help="skip create_block_mask entirely")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile.md"),
                   help="markdown results file, or '-' for none")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        kind, case, n = a.worker[0], a.worker[1], int(a.worker[2])
        res = (worker_attnmask(case, n, a.block, a.repeats) if kind == "attnmask"
               else worker_cbm(case, n, a.block, a.cbm_document_mod))
        print(json.dumps(res))
        return 0

    lengths = [int(x) for x in a.lengths.split(",")]
    cases = a.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    started = datetime.now(timezone.utc)
    load = os.getloadavg()
    print(f"attnmask compile benchmark, block {a.block}, {started:%Y-%m-%d %H:%M} UTC, load {load[0]:.1f}")
    print(f"machine: {machine_description()}")
    # create_block_mask first (minutes), attnmask last (seconds), so that the
    # attnmask figures are of the code as it is when the run ends. The results
    # file is rewritten after every case, so an interrupted run keeps its figures.
    ours: dict = {}
    theirs: dict = {}
    rows = lambda: [(c, n, ours.get((c, n), "pending"), theirs.get((c, n), "pending"))  # noqa: E731
                    for n in lengths for c in cases if (c, n) in ours or (c, n) in theirs]
    cbm_spent = 0.0
    for n in lengths:
        for case in cases:
            if a.no_cbm:
                theirs[case, n] = "not run (--no-cbm)"
                continue
            if n > a.cbm_max_length or cbm_spent >= a.cbm_budget:
                theirs[case, n] = "skipped (budget)"
                continue
            t0 = time.perf_counter()
            theirs[case, n] = run_worker(["cbm", case, str(n), "--block", str(a.block),
                                          "--cbm-document-mod", a.cbm_document_mod],
                                         min(a.cbm_timeout, a.cbm_budget - cbm_spent))
            cbm_spent += time.perf_counter() - t0
            print(_row_text(case, n, "pending", theirs[case, n]), flush=True)
            _write(a, argv, started, load, rows(), lengths, final=False)
    for n in lengths:
        for case in cases:
            ours[case, n] = run_worker(["attnmask", case, str(n), "--block", str(a.block),
                                        "--repeats", str(a.repeats)], 600)
            print(_row_text(case, n, ours[case, n], theirs[case, n]), flush=True)
            _write(a, argv, started, load, rows(), lengths, final=False)
    rows = rows()

    table = _table(rows)
    verdicts = _verdicts(rows, lengths)
    print()
    print(table)
    print()
    print("\n".join(verdicts))
    _write(a, argv, started, load, rows, lengths, final=True)
    return 0


def _write(a, argv, started, load, rows, lengths, final: bool) -> None:
    table = _table(rows)
    verdicts = _verdicts(rows, lengths)
    if a.out != "-":
        import torch
        cmd = "python " + " ".join([os.path.relpath(os.path.abspath(__file__))] + (argv if argv is not None else sys.argv[1:]))
        text = "\n".join([
            "# Compile time: mask -> exact block layout",
            "",
            f"- date: {started:%Y-%m-%d %H:%M} UTC (load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f})",
            f"- machine: {machine_description()}",
            f"- torch {torch.__version__}, block size {a.block}, attnmask median of {a.repeats} first compiles",
            f"- command: `{cmd}`",
            "",
            "attnmask: `mask.compile(N, block_size=B)` after `attnmask.clear_cache()`; \"cold\" is the first "
            "compile in a fresh process. FlexAttention: `create_block_mask(mask.mask_mod, None, None, N, N, "
            "device=\"cpu\", BLOCK_SIZE=B, _compile=True)`, second call at the same shape (warm); for the document "
            f"case its mask_mod is {'a document-id lookup, `(k <= q) & (doc[q] == doc[k])`' if a.cbm_document_mod == 'docid' else 'mask.mask_mod, as for the others'}. "
            "Peak memory: growth of the process's peak RSS (VmHWM reset via /proc/self/clear_refs) over the "
            "RSS before the call, each case in a fresh subprocess; \"numpy peak\" is tracemalloc's peak during "
            "a separate compile. ratio = create_block_mask time / attnmask median time. same tiles: attnmask's "
            "`block_states()` equals the partial/full tiles of create_block_mask's BlockMask (compared by hash).",
            "",
            table,
            "",
            *[f"- {v}" for v in verdicts],
            "",
        ])
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + ("" if final else "\n(run in progress or interrupted: table incomplete)\n"))
        if final:
            print(f"\nwrote {a.out}")


def _row_text(case, n, ours, theirs) -> str:
    o = ours if isinstance(ours, str) else f"{fmt_ms(ours['median_s'])} (cold {fmt_ms(ours['cold_s'])}), {ours['peak_mb']:.0f} MB"
    t = theirs if isinstance(theirs, str) else f"{fmt_s(theirs['warm_s'])}, {theirs['peak_mb']:.0f} MB"
    return f"  {label(case):45s} N={n:>9,}  attnmask {o}  |  create_block_mask {t}"


def _table(rows) -> str:
    head = ("| mask | N | attnmask median (min) | cold | attnmask peak RSS | numpy peak | runs | "
            "create_block_mask (warm) | its peak RSS | ratio | same tiles |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case, n, ours, theirs in rows:
        if isinstance(ours, str):
            o = [ours, "", "", "", ""]
        else:
            o = [f"{fmt_ms(ours['median_s'])} ({fmt_ms(ours['min_s'])})", fmt_ms(ours["cold_s"]),
                 f"{ours['peak_mb']:.1f} MB", f"{ours['tracemalloc_mb']:.1f} MB", f"{ours['n_runs']:,}"]
        if isinstance(theirs, str):
            t = [theirs, "", "", ""]
        elif isinstance(ours, str):
            t = [fmt_s(theirs["warm_s"]), f"{theirs['peak_mb']:.0f} MB", "", ""]
        else:
            ratio = theirs["warm_s"] / ours["median_s"]
            same = "?" if not ours.get("digest") else ("yes" if ours["digest"] == theirs["digest"] else "NO")
            t = [fmt_s(theirs["warm_s"]), f"{theirs['peak_mb']:.0f} MB", f"{ratio:,.0f}x", same]
        name = label(case).replace("|", "\\|")      # a bare | would split the markdown cell
        lines.append(f"| `{name}` | {n:,} | " + " | ".join(o + t) + " |")
    return "\n".join(lines)


def _verdicts(rows, lengths) -> list[str]:
    out = []
    big = max(lengths)
    for case, n, ours, theirs in rows:
        if isinstance(ours, str):
            out.append(f"{label(case)} at {n:,}: attnmask {ours}")
            continue
        if n == 1048576:
            limit = 0.5 if case == "dilated" else 0.1
            ok = ours["median_s"] < limit and ours["peak_mb"] < 512
            out.append(f"target at 1M, {label(case)}: < {limit * 1e3:.0f} ms and < 512 MB: "
                       f"{'met' if ok else 'MISSED'} ({fmt_ms(ours['median_s'])}, {ours['peak_mb']:.0f} MB)")
        if n == 65536 and not isinstance(theirs, str):
            ratio = theirs["warm_s"] / ours["median_s"]
            out.append(f"target at 64K, {label(case)}: >= 100x faster than create_block_mask: "
                       f"{'met' if ratio >= 100 else 'MISSED'} ({ratio:,.0f}x)")
    mismatched = [f"{label(c)} at {n:,}" for c, n, o, t in rows
                  if isinstance(o, dict) and isinstance(t, dict) and o.get("digest") and o["digest"] != t["digest"]]
    if mismatched:
        out.append("TILE MISMATCH with create_block_mask: " + "; ".join(mismatched))
    if big < 1048576:
        out.append(f"(lengths stopped at {big:,}: the 1M targets were not measured in this run)")
    return out


if __name__ == "__main__":
    sys.exit(main())

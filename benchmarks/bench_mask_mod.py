"""Benchmark: compiling FlexAttention mask_mods, attnmask (``from_mask_mod``) vs ``create_block_mask``.

Six kinds of predicate, written here as a FlexAttention user would write them:
a 2-D neighbourhood (NATTEN's clamped kernel on a 256-column canvas), a
document-id lookup, a prefix LM, a dilated window, a block table (one random
boolean map over 128-token blocks, VSA-style, with causal) and a scalar-only
predicate (an interval table indexed with a scalar, which needs vmap).

For each kind and length, side by side in one fresh subprocess (memory does not
leak between cases), best of ``--repeats``, competitors taking turns:

* attnmask warm: ``am.from_mask_mod(fn).compile(N)`` with the layout cache
  cleared before each timing; the leaf has been compiled once before (its trace
  is kept on the leaf, as torch keeps a compiled graph).
* attnmask cold: a new leaf (trace included), first compile of that leaf, after the
  process's one-time import of torch's tracing machinery (reported apart, once).
* ``create_block_mask(fn, None, None, N, N, device="cpu", _compile=True)``,
  warm: a first call at the shape compiles it (its time is reported apart),
  later calls are timed.
* ``create_block_mask(..., _compile=False)`` (eager) materializes the N x N
  mask and the predicate's N x N temporaries. Its peak memory is measured in a
  fresh process at ``--eager-probe-n`` tokens and scaled by (N / n)^2; eager runs
  at N (in its own process) only when that estimate is under ``--eager-mem-gb``,
  otherwise the row says the estimate instead of a time.

Both sides must give the same tiles: attnmask's layout, classified as
FlexAttention does (``to_flex_block_mask(edge_tiles="flex")``), is compared
with create_block_mask's full and partial block counts.

    python benchmarks/bench_mask_mod.py                       # 64K and 256K, writes benchmarks/results/mask_mod.md
    python benchmarks/bench_mask_mod.py --lengths 8192 --out -   # quick smoke run
    python benchmarks/bench_mask_mod.py --first-trace            # the once-per-process import, in 3 fresh processes
    python benchmarks/bench_mask_mod.py --twins                  # each mask_mod vs the same mask in the language
    python benchmarks/bench_mask_mod.py --compiled-eval          # probe cells: eager vs torch.compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

KINDS = ["neighbourhood_2d", "document", "prefix", "dilated", "block_table", "scalar_only"]
DEFAULT_LENGTHS = [65536, 262144]
BLOCK = 128


def make_mask_mod(kind: str, n: int):
    """The benchmark's FlexAttention mask_mod of ``kind`` at length ``n`` (tables built here, seeded)."""
    import torch
    g = torch.Generator().manual_seed(0)
    if kind == "neighbourhood_2d":
        W, H, kw, kh = 256, n // 256, 15, 15

        def neighbourhood_2d(b, h, q_idx, kv_idx):
            qr, qc = q_idx // W, q_idx % W
            kr, kc = kv_idx // W, kv_idx % W
            cr = qr.clamp(kh // 2, H - 1 - kh // 2)
            cc = qc.clamp(kw // 2, W - 1 - kw // 2)
            return ((cr - kr).abs() <= kh // 2) & ((cc - kc).abs() <= kw // 2)
        return neighbourhood_2d
    if kind == "document":
        cuts = torch.randperm(n - 1, generator=g)[:999].add(1).sort().values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))
        doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)

        def document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        return document
    if kind == "prefix":
        prefix = n // 8

        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) | (kv_idx < prefix)
        return prefix_lm
    if kind == "dilated":
        def dilated(b, h, q_idx, kv_idx):
            d = q_idx - kv_idx
            return (d >= 0) & (d < 512 * 8) & (d % 8 == 0)
        return dilated
    if kind == "block_table":
        nb = -(-n // BLOCK)
        blocks = torch.rand(nb, nb, generator=g) < 16 / nb       # ~16 random key blocks per query block
        blocks |= torch.eye(nb, dtype=torch.bool)

        def block_table(b, h, q_idx, kv_idx):
            return blocks[q_idx // BLOCK, kv_idx // BLOCK] & (kv_idx <= q_idx)
        return block_table
    if kind == "scalar_only":
        # 200 media spans; each query sees keys from the start of its span's interval to itself
        cuts = torch.randperm(n - 1, generator=g)[:199].add(1).sort().values
        starts = torch.cat([torch.tensor([0]), cuts])
        lengths = torch.diff(torch.cat([starts, torch.tensor([n])]))
        span = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        back = torch.randint(0, 4096, (len(lengths),), generator=g)
        intervals = torch.stack([(starts - back).clamp(min=0), starts + lengths], dim=1)   # [S, 2]

        def scalar_only(b, h, q_idx, kv_idx):
            interval = intervals[span[q_idx]]          # one row: written for vmap's scalars
            return (kv_idx >= interval[0]) & (kv_idx < interval[1]) & (kv_idx <= q_idx)
        return scalar_only
    raise ValueError(kind)


def language_twin(kind: str, n: int):
    """The same mask as ``make_mask_mod(kind, n)`` written in attnmask's language, or None (no twin)."""
    import torch

    import attnmask as am
    if kind == "neighbourhood_2d":
        return am.window2d(256, n // 256, 15, 15)
    if kind == "document":
        g = torch.Generator().manual_seed(0)          # the same cuts as make_mask_mod's
        cuts = torch.randperm(n - 1, generator=g)[:999].add(1).sort().values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]))
        return am.causal & am.document(*lengths.tolist())
    if kind == "prefix":
        return am.prefix_lm(n // 8)
    if kind == "dilated":
        return am.dilated(512, 8)
    return None


def run_twin(kind: str, n: int, repeats: int) -> dict:
    """The mask_mod leaf against the same mask written in the language: warm compiles, taking turns."""
    import warnings

    import attnmask as am
    warnings.simplefilter("ignore", am.MaskModWarning)
    leaf, twin = am.from_mask_mod(make_mask_mod(kind, n), kind), language_twin(kind, n)
    out: dict = {"mode": "twin", "kind": kind, "n": n, "load_start": round(os.getloadavg()[0], 2),
                 "language": str(twin)[:60]}
    a, b = leaf.compile(n, block_size=BLOCK), twin.compile(n, block_size=BLOCK)
    out["same_tiles"] = bool((a.block_states() == b.block_states()).all())
    t_leaf, t_twin = [], []
    for _ in range(repeats):
        am.clear_cache()
        t_leaf.append(_best(lambda: leaf.compile(n, block_size=BLOCK), 1))
        am.clear_cache()
        t_twin.append(_best(lambda: twin.compile(n, block_size=BLOCK), 1))
    out["attnmask_warm_s"], out["language_s"] = min(t_leaf), min(t_twin)
    out["load_end"] = round(os.getloadavg()[0], 2)
    return out


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_eager(kind: str, n: int) -> dict:
    """Eager create_block_mask at ``n`` in this (fresh) process: its time and peak memory above the baseline."""
    import resource
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask
    warnings.simplefilter("ignore", DeprecationWarning)
    fn = make_mask_mod(kind, n)
    create_block_mask(fn, None, None, 256, 256, device="cpu", BLOCK_SIZE=BLOCK, _compile=False)  # warm the code path
    base = _rss_gb()
    t = time.perf_counter()
    create_block_mask(fn, None, None, n, n, device="cpu", BLOCK_SIZE=BLOCK, _compile=False)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB -> GiB
    return {"n": n, "s": dt, "peak_gb": max(peak - base, 0.0)}


def run_case(kind: str, n: int, repeats: int, cbm: bool) -> dict:
    """One (kind, length) in this process; returns the figures."""
    import warnings

    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    import attnmask as am
    warnings.simplefilter("ignore", am.MaskModWarning)
    fn = make_mask_mod(kind, n)
    out: dict = {"kind": kind, "n": n, "load_start": round(os.getloadavg()[0], 2)}
    warnings.simplefilter("ignore", DeprecationWarning)      # create_block_mask's _compile flag
    # The first trace in a process imports torch's tracing machinery (dynamo, fake tensors): once per
    # process, and create_block_mask(_compile=True) imports the same. Paid here on a throwaway leaf.
    t = time.perf_counter()
    am.from_mask_mod(lambda b, h, q, k: k <= q, "warmup").compile(256)
    out["first_trace_in_process_s"] = time.perf_counter() - t
    leaf = am.from_mask_mod(fn, kind)
    t = time.perf_counter()
    lay = leaf.compile(n, block_size=BLOCK)
    out["attnmask_cold_s"] = time.perf_counter() - t
    out["route"] = leaf.route
    from attnmask.maskmod import bounds_note
    out["bounds_note"] = bounds_note(leaf)
    out["partial_tiles"] = lay.counts()["partial"]

    def ours():
        am.clear_cache()
        leaf.compile(n, block_size=BLOCK)

    timings = {"attnmask": []}
    if cbm:
        t = time.perf_counter()
        bm = create_block_mask(fn, None, None, n, n, device="cpu", BLOCK_SIZE=BLOCK, _compile=True)
        out["cbm_first_call_s"] = time.perf_counter() - t
        ref = leaf.compile(n, block_size=BLOCK).to_flex_block_mask(edge_tiles="flex")
        out["same_tiles"] = bool(torch.equal(ref.kv_num_blocks, bm.kv_num_blocks) and
                                 torch.equal(ref.full_kv_num_blocks, bm.full_kv_num_blocks))
        timings["cbm_compiled"] = []
    for _ in range(repeats):                     # competitors take turns
        timings["attnmask"].append(_best(ours, 1))
        if cbm:
            timings["cbm_compiled"].append(_best(
                lambda: create_block_mask(fn, None, None, n, n, device="cpu", BLOCK_SIZE=BLOCK, _compile=True), 1))
    out["attnmask_warm_s"] = min(timings["attnmask"])
    if cbm:
        out["cbm_compiled_s"] = min(timings["cbm_compiled"])
    out["load_end"] = round(os.getloadavg()[0], 2)
    import resource
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # the whole process
    return out


def _machine() -> str:
    try:
        from harness import machine_description        # benchmarks/harness.py (next to this script)
        return machine_description()
    except ImportError:                          # the harness may live elsewhere
        import platform
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _fmt(s) -> str:
    if s is None:
        return "-"
    if s < 0.01:
        return f"{s * 1000:.1f} ms"
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def first_trace() -> str:
    """This (fresh) process's first mask_mod compile: what it imports and what it costs."""
    t = time.perf_counter()
    import torch  # noqa: F401
    import attnmask as am
    t_import = time.perf_counter() - t
    before = set(sys.modules)
    t = time.perf_counter()
    am.from_mask_mod(lambda b, h, q, k: k <= q, "first").compile(256)
    t_first = time.perf_counter() - t
    new = set(sys.modules) - before
    t = time.perf_counter()
    am.from_mask_mod(lambda b, h, q, k: (k <= q) & (q - k < 64), "second").compile(256)
    t_second = time.perf_counter() - t
    return (f"import torch + attnmask {t_import:.2f} s; first mask_mod compile {t_first:.2f} s ({len(new)} modules "
            f"imported, torch._dynamo among them: {'torch._dynamo' in new}); a second leaf {t_second * 1000:.0f} ms; "
            f"load {os.getloadavg()[0]:.1f}")


def compiled_eval(n: int = 262144) -> None:
    """Probe cells evaluated eagerly vs through torch.compile(fn, dynamic=True), as the probe stages call them."""
    import warnings

    import torch
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    for kind in ["neighbourhood_2d", "dilated", "document", "block_table"]:
        fn = make_mask_mod(kind, n)
        for tiles, per in ((61440, 8), (61440, 24)):           # 61,440 open tiles x the two probe stages
            rows = torch.randint(0, n, (tiles, per), generator=g)
            keys = torch.randint(0, n, (tiles, per), generator=g)
            b = h = torch.tensor(0)

            def best(f, reps=5):
                out = float("inf")
                for _ in range(reps):
                    t = time.perf_counter()
                    f(b, h, rows, keys)
                    out = min(out, time.perf_counter() - t)
                return out
            eager = best(fn)
            cf = torch.compile(fn, dynamic=True)
            t = time.perf_counter()
            r1 = cf(b, h, rows, keys)
            first = time.perf_counter() - t
            warm = best(cf)
            assert torch.equal(r1, fn(b, h, rows, keys))
            print(f"{kind} {tiles}x{per} cells: eager {eager * 1000:.1f} ms, compiled warm {warm * 1000:.1f} ms "
                  f"({eager / warm:.1f}x), its first call {first:.1f} s; load {os.getloadavg()[0]:.1f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    p.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager-probe-n", type=int, default=8192,
                   help="length at which eager create_block_mask's peak memory is measured")
    p.add_argument("--eager-mem-gb", type=float, default=6.0,
                   help="run eager create_block_mask at N only if its scaled peak memory is under this")
    p.add_argument("--no-cbm", action="store_true", help="attnmask only")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--out", default="benchmarks/results/mask_mod.md", help="results file, or - for stdout only")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in the results file and measure only the missing cases")
    p.add_argument("--twins", action="store_true",
                   help="instead: each mask_mod against the same mask written in the language (kinds that have one)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--twin-case", help=argparse.SUPPRESS)
    p.add_argument("--eager-case", help=argparse.SUPPRESS)
    p.add_argument("--first-trace", action="store_true",
                   help="time the first mask_mod trace of a fresh process (3 processes), then exit")
    p.add_argument("--first-trace-case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compiled-eval", action="store_true",
                   help="time probe-cell evaluation eager vs torch.compile (256K), then exit")
    args = p.parse_args(argv)
    if args.case:
        kind, n = args.case.split(":")
        print(json.dumps(run_case(kind, int(n), args.repeats, not args.no_cbm)))
        return 0
    if args.twin_case:
        kind, n = args.twin_case.split(":")
        print(json.dumps(run_twin(kind, int(n), args.repeats)))
        return 0
    if args.compiled_eval:
        compiled_eval()
        return 0
    if args.first_trace_case:
        print(first_trace())
        return 0
    if args.first_trace:
        for _ in range(3):
            print(subprocess.run([sys.executable, __file__, "--first-trace-case"], capture_output=True, text=True,
                                 check=True).stdout.strip())
        return 0
    if args.eager_case:
        kind, n = args.eager_case.split(":")
        print(json.dumps(run_eager(kind, int(n))))
        return 0
    header = _machine()
    rows, commands = [], []
    if args.resume and args.out != "-" and os.path.exists(args.out):
        rows, commands, header = _read_raw(args.out)
    commands.append(f"python benchmarks/bench_mask_mod.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    mode = "twin" if args.twins else "cbm"
    done = {(r.get("mode", "cbm"), r["kind"], r["n"]) for r in rows if "error" not in r}
    rows = [r for r in rows if (r.get("mode", "cbm"), r["kind"], r["n"]) in done]
    for n in args.lengths:
        for kind in args.kinds:
            if (mode, kind, n) in done or (args.twins and language_twin(kind, 1 << 16) is None):
                continue
            if args.twins:
                cmd = [sys.executable, __file__, "--twin-case", f"{kind}:{n}", "--repeats", str(args.repeats)]
                r = {"mode": "twin", "kind": kind, "n": n, **_subprocess_json(cmd, args.timeout)}
                rows.append(r)
                print(json.dumps(r), flush=True)
                if args.out != "-":
                    _write(args.out, _render(rows, header, commands))
                continue
            cmd = [sys.executable, __file__, "--case", f"{kind}:{n}", "--repeats", str(args.repeats)] + \
                (["--no-cbm"] if args.no_cbm else [])
            r = {"kind": kind, "n": n, **_subprocess_json(cmd, args.timeout)}
            if "error" not in r and not args.no_cbm:
                _add_eager(r, kind, n, args)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.out != "-":
                _write(args.out, _render(rows, header, commands))     # every case kept, even if a later one dies
    text = _render(rows, header, commands)
    print(text)
    if args.out != "-":
        _write(args.out, text)
    return 0


def _subprocess_json(cmd: list, timeout: int) -> dict:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _add_eager(r: dict, kind: str, n: int, args) -> None:
    """Eager create_block_mask: probed at a small length, run at ``n`` only when its memory is bounded."""
    me = [sys.executable, __file__]
    probe = _subprocess_json(me + ["--eager-case", f"{kind}:{min(args.eager_probe_n, n)}"], args.timeout)
    if "error" in probe:
        r["eager_error"] = probe["error"]
        return
    r["eager_probe"] = probe
    r["eager_est_gb"] = probe["peak_gb"] * (n / probe["n"]) ** 2
    if probe["n"] == n:
        r["cbm_eager_s"] = probe["s"]
    elif r["eager_est_gb"] <= args.eager_mem_gb:
        run = _subprocess_json(me + ["--eager-case", f"{kind}:{n}"], args.timeout)
        if "error" in run:
            r["eager_error"] = run["error"]
        else:
            r["cbm_eager_s"], r["eager_peak_gb"] = run["s"], run["peak_gb"]


def _gb(x) -> str:
    return "-" if x is None else f"{x:.2f} GB"


def _eager_cell(r: dict) -> str:
    if "cbm_eager_s" in r:
        peak = r.get("eager_peak_gb", r.get("eager_probe", {}).get("peak_gb"))
        return f"{_fmt(r['cbm_eager_s'])} ({peak:.2f} GB peak)" if peak is not None else _fmt(r["cbm_eager_s"])
    if "eager_probe" in r:
        p = r["eager_probe"]
        return (f"not run: ~{r['eager_est_gb']:.0f} GB of N x N temporaries ({p['peak_gb']:.2f} GB peak "
                f"and {_fmt(p['s'])} at {p['n']:,}, x (N/{p['n']:,})^2)")
    if "eager_error" in r:
        return f"error: {r['eager_error']}"
    return "-"


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _read_raw(path: str):
    """(rows, commands, machine) stored in a results file's raw section."""
    rows, commands, header = [], [], _machine()
    with open(path) as f:
        for line in f:
            if line.startswith("    {"):
                rows.append(json.loads(line))
            elif line.startswith("Command: `"):
                commands.append(line.strip()[len("Command: `"):-1])
            elif line.startswith("Machine (first run): "):
                header = line.strip()[len("Machine (first run): "):]
    return rows, commands, header


def _render(rows: list, header: str, commands: list) -> str:
    lines = [
        "# Compiling FlexAttention mask_mods: attnmask vs create_block_mask",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} (last case).",
        "",
        f"Machine (first run): {header}",
        "",
        "Load average (1 min) at the start and end of each case: "
        + (", ".join(f"{r['kind']}@{r['n']:,}: {r['load_start']}-{r['load_end']}" for r in rows
                     if "load_start" in r and r.get("mode") != "twin")
           or "not recorded"),
        "",
        *[f"Command: `{c}`" for c in commands],
        "",
        "Block 128, best of the repeats, competitors taking turns, each (kind, length) in a fresh process. "
        "attnmask warm: the layout cache cleared before each compile, the leaf traced before; cold: a new "
        "leaf (trace included). create_block_mask compiled, warm: its first call at the shape (compile "
        "included) is shown apart. Ratio = create_block_mask compiled warm / attnmask warm. "
        "Same tiles: attnmask's layout with FlexAttention's edge rule equals create_block_mask's full and "
        "partial blocks.",
        "",
        "| kind | N | attnmask warm | attnmask cold | create_block_mask compiled (warm) | its first call "
        "| ratio | eager | route | partial tiles | same tiles | process peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    order = {k: i for i, k in enumerate(KINDS)}
    rows = sorted(rows, key=lambda r: (r.get("mode", "cbm"), r["n"], order.get(r["kind"], len(order))))
    twins = [r for r in rows if r.get("mode") == "twin"]
    for r in rows:
        if r.get("mode") == "twin":
            continue
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['n']:,} | error: {r['error']} | | | | | | | | | |")
            continue
        ratio = (f"{r['cbm_compiled_s'] / r['attnmask_warm_s']:.1f}x" if "cbm_compiled_s" in r else "-")
        eager = _eager_cell(r)
        lines.append(f"| {r['kind']} | {r['n']:,} | {_fmt(r['attnmask_warm_s'])} | {_fmt(r['attnmask_cold_s'])} | "
                     f"{_fmt(r.get('cbm_compiled_s'))} | {_fmt(r.get('cbm_first_call_s'))} | {ratio} | {eager} | "
                     f"{r['route']} | {r['partial_tiles']:,} | {r.get('same_tiles', '-')} | "
                     f"{_gb(r.get('peak_rss_gb'))} |")
    if twins:
        lines += ["", "The same masks written in the language (`--twins`): warm compiles, layout cache cleared "
                  "before each, taking turns; same tiles = equal block states.", "",
                  "| kind | N | language | attnmask mask_mod | language | mask_mod / language | same tiles | load |",
                  "|---|---:|---|---:|---:|---:|---|---|"]
        for r in twins:
            if "error" in r:
                lines.append(f"| {r['kind']} | {r['n']:,} | error: {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['kind']} | {r['n']:,} | `{r['language']}` | {_fmt(r['attnmask_warm_s'])} | "
                         f"{_fmt(r['language_s'])} | {r['attnmask_warm_s'] / r['language_s']:.1f}x | "
                         f"{r['same_tiles']} | {r['load_start']}-{r['load_end']} |")
    imports = [r["first_trace_in_process_s"] for r in rows if "first_trace_in_process_s" in r]
    if imports:
        lines += ["", f"The first trace in a fresh process imports torch's tracing machinery (dynamo, fake "
                  f"tensors): {min(imports):.1f}-{max(imports):.1f} s here, once per process (not in the columns)."]
    notes = sorted({f"{r['kind']}: {r['bounds_note']}" for r in rows if r.get("bounds_note")})
    if notes:
        lines += ["", "Predicates evaluated cell by cell (no interval bounds): " + "; ".join(notes)]
    lines += ["", "Raw rows (read back by `--resume`):", ""] + [f"    {json.dumps(r)}" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

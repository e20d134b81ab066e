"""SmolLM2-135M run with attnmask plans: held-out quality, prefill, decode and KV cache against SDPA.

Writes (or replaces) the section "## Running the model (issue 15)" of
benchmarks/results/models.md, leaving the file's other sections alone, and the raw
figures to benchmarks/results/models_run.json.

    PYTHONPATH=src python benchmarks/bench_models.py quality [--plans plans/*.json]
    PYTHONPATH=src python benchmarks/bench_models.py cost --lengths 4096 8192
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_MD = os.path.join(HERE, "results", "models.md")
RESULTS_JSON = os.path.join(HERE, "results", "models_run.json")
SECTION = "## Running the model (issue 15)"

WINDOWS = ["causal & (sliding(512) | sink(4))", "causal & (sliding(256) | sink(4))", "causal & (sliding(64) | sink(4))"]
COST_MASK = "causal & (sliding(512) | sink(4))"


def held_out_texts() -> list[tuple[str, str]]:
    """Python standard-library sources the fitting (issue 14) does not use: shlex.py and textwrap.py."""
    import shlex
    import textwrap
    return [(f"{m.__name__}.py", open(inspect.getsourcefile(m)).read()) for m in (shlex, textwrap)]


def load_raw() -> dict:
    if os.path.exists(RESULTS_JSON):
        with open(RESULTS_JSON) as f:
            return json.load(f)
    return {}


def save_raw(raw: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS_JSON), exist_ok=True)
    with open(RESULTS_JSON, "w") as f:
        json.dump(raw, f, indent=1)
        f.write("\n")


def write_section(body: str) -> None:
    """Replace our section of models.md (up to the next '## ' heading), keeping every other section."""
    text = open(RESULTS_MD).read() if os.path.exists(RESULTS_MD) else "# Real models\n"
    block = f"{SECTION}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + block
    with open(RESULTS_MD, "w") as f:
        f.write(text.rstrip() + "\n")


def machine() -> str:
    from harness import machine_description
    return machine_description()


def revision() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_quality(model, tok, specs: list[str], length: int) -> list[dict]:
    from attnmask import MaskPlan, models
    rows = []
    texts = held_out_texts()
    for spec in specs:
        plan = MaskPlan.from_json(spec) if spec.endswith(".json") else spec
        t0 = time.perf_counter()
        rep = models.evaluate(model, plan, texts, tokenizer=tok, length=length, timing=False,
                              progress=lambda s: print("  ", s, file=sys.stderr))
        print(rep.table(), f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
        d = rep.to_dict()
        d["source"] = os.path.basename(spec)
        if spec.endswith(".json"):
            keep = plan.meta.get("keep")
            kind = "with data-dependent columns" if getattr(plan, "dynamic", None) else "static families"
            d["plan"] = (f"fitted `{os.path.basename(spec)}` (keep {keep}, {kind}, "
                         f"{len(plan.distinct())} distinct masks)")
        rows.append(d)
    return rows


def run_cost(model, tok, lengths: list[int], decode_tokens: int, repeats: int) -> list[dict]:
    from attnmask import models
    rows = []
    texts = held_out_texts()
    for L in lengths:
        t0 = time.perf_counter()
        rep = models.evaluate(model, COST_MASK, texts[:1], tokenizer=tok, length=64, timing_length=L,
                              decode_tokens=decode_tokens, repeats=repeats,
                              progress=lambda s: print("  ", s, file=sys.stderr, flush=True))
        print(rep.table(), f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
        rows.append({"length": L, "timing": rep.timing, "kv_bytes": rep.kv_bytes, "meta": rep.meta})
    return rows


def render(raw: dict) -> str:
    out = []
    q = raw.get("quality")
    if q:
        commands = sorted({(r.get("when", q["when"]), r.get("command", q["command"])) for r in q["rows"]})
        out += [f"Held-out quality: {q['machine']}; revision {q['revision']} for the last run.",
                "Commands: " + "; ".join(f"`{c}` ({w})" for w, c in commands) + f". Texts: the first {q['length']} tokens of shlex.py and textwrap.py "
                f"(Python's standard library; not used by the fits). Loss is next-token cross entropy "
                f"(nats/token); dense is SDPA; agreement is the share of positions whose most likely next "
                f"token equals dense's. Density: attended pairs / causal pairs over all layers and heads. "
                f"Plans with data-dependent columns are resolved per text from the dense model's attention "
                f"of that text's last queries (MInference's rule: the prompt chooses its own columns), so "
                f"their density differs per text.", "",
                "| plan | density | text | loss dense | loss plan | delta | top-1 agreement |",
                "|---|---:|---|---:|---:|---:|---:|"]
        for row in q["rows"]:
            for t in row["texts"]:
                out.append(f"| {row['plan'].replace('|', chr(92) + '|')} | {t['density']:.3f} | {t['name']} | {t['loss_dense']:.4f} | "
                           f"{t['loss_plan']:.4f} | {t['loss_plan'] - t['loss_dense']:+.4f} | "
                           f"{t['top1_agreement']:.3f} |")
        out.append("")
    c = raw.get("cost")
    if c:
        out += [f"Cost: {c['when']}, revision {c['revision']}, {c['machine']}.",
                f"Command: `{c['command']}`. Prompt: held-out tokens repeated to the length; prefill into a "
                f"cache (SDPA + DynamicCache against `{COST_MASK}` + MaskCache), then "
                f"{c['rows'][0]['timing']['decode_tokens']} greedy decode steps; the two take turns, prefill "
                f"best of {c['rows'][0]['timing']['repeats']}, decode the median step (the first step left "
                f"out). Attention time is wall time inside the attention functions during prefill. "
                f"fp32, {c['rows'][0]['meta']['threads']} threads.", "",
                "| prompt | prefill SDPA (s) | prefill plan (s) | plan / SDPA | attention SDPA (s) | "
                "attention plan (s) | plan / SDPA | decode SDPA (ms/token) | decode plan (ms/token) | "
                "KV cache SDPA (MB) | KV cache plan (MB) | plan / SDPA |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in c["rows"]:
            tm, kv = row["timing"], row["kv_bytes"]
            p, a, d = tm["prefill_s"], tm["attention_s"], tm["decode_ms"]
            out.append(f"| {row['length']} | {p['dense']:.2f} | {p['plan']:.2f} | {p['plan'] / p['dense']:.2f} | "
                       f"{a['dense']:.2f} | {a['plan']:.2f} | {a['plan'] / a['dense']:.2f} | {d['dense']:.1f} | "
                       f"{d['plan']:.1f} | {kv['dense'] / 2**20:.1f} | {kv['plan'] / 2**20:.2f} | "
                       f"{kv['plan'] / kv['dense']:.4f} |")
        out.append("")
        if c.get("note"):
            out += [c["note"], ""]
        out.append("All prefill runs (s), in the order they ran: " + "; ".join(
            f"{row['length']}: SDPA {', '.join(f'{x:.1f}' for x in row['timing']['all_prefill_s']['dense'])} / "
            f"plan {', '.join(f'{x:.1f}' for x in row['timing']['all_prefill_s']['plan'])}" for row in c["rows"]))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["quality", "cost", "render"])
    ap.add_argument("--plans", nargs="*", default=[], help="fitted MaskPlan JSON files")
    ap.add_argument("--skip-windows", action="store_true", help="only the --plans (keep earlier window rows)")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a machine shared with other jobs, two threads ran 4-7x "
                         "slower than one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    raw = load_raw()
    if args.part != "render":
        from attnmask import models
        model, tok = models.load("smollm2")
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        command = "PYTHONPATH=src python benchmarks/bench_models.py " + " ".join(sys.argv[1:])
        head = {"when": when, "revision": revision(), "machine": machine() + " (shared with other jobs)",
                "command": command}
        if args.part == "quality":
            specs = ([] if args.skip_windows else WINDOWS) + args.plans
            rows = run_quality(model, tok, specs, args.length)
            for r in rows:
                r["command"], r["when"] = command, when
            names = {os.path.basename(x) for x in specs}
            old = [r for r in raw.get("quality", {}).get("rows", []) if r["source"] not in names]
            raw["quality"] = dict(head, length=args.length, rows=old + rows)
        else:
            raw["cost"] = dict(head, rows=run_cost(model, tok, args.lengths, args.decode_tokens, args.repeats))
        save_raw(raw)
    write_section(render(raw))
    print(render(raw))


if __name__ == "__main__":
    main()

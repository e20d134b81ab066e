"""A mutation run over the compiler, the layout and the engines: does the suite notice wrong code?

Each mutant is one small change to one site of the library (a comparison
flipped, + for -, a constant off by one, ``and`` for ``or``, a ``not`` dropped,
an ``if`` forced, a re-assignment deleted), applied to a copy of ``src/`` in a
temporary folder; the tests for that module run against the copy (``-x``, the
``ci`` hypothesis profile), and the mutant is *caught* when they fail. Sites are
listed from the AST of the current code (so the run follows the code as it is
rewritten), then sampled with a fixed seed; docstrings, f-strings and ``raise``
statements (error messages) are skipped. Named mutants (below) are the ones
issue 11 found surviving; each is applied if its text still exists.

A survivor is then *probed*: a battery of problems (layouts at several shapes,
forward and backward on the blocksparse engine) runs on the original and the
mutant, and the result says whether any output bit changed. "no output change"
marks a likely equivalent mutant (a cost model or threshold that only moves work
around); "outputs differ" is a gap in the tests. Neither is a verdict: the result
file's survivors section, written by hand after a run, says for each survivor which
test catches it now, why it is equivalent, or that it is open.

    PYTHONPATH=src python tools/mutation_run.py --sample 40 --note "under the CPU lock" \
        --out benchmarks/results/mutation.md

(not a test: minutes per mutant on two cores.) The tests of every module sampled first run on
the unmutated copy; if any fail, the run stops with exit status 2 and names them (a failing
test would otherwise count every mutant as caught).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_COMPILE_TESTS = ["tests/test_compiler.py", "tests/test_layout.py", "tests/test_analysis.py"]
_ENGINE_TESTS = ["tests/test_engine_paths.py", "tests/test_engine_models.py", "tests/test_attention.py",
                 "tests/test_backward.py"]
#: tests that hold a module to a contract its own list misses: FlexAttention's BlockMask conversion
#: and edge-tile rule (layout.py), mask_mod leaves read per (batch, head) in dispatch and in the short
#: path, checked against FlexAttention's own create_mask / create_block_mask (test_maskmod.py, ~20 s),
#: one query's keys as intervals against the dense oracle (test_rowkeys.py)
_EXTRA_TESTS = {
    "layout.py": ["tests/test_flex.py", "tests/test_maskmod.py"],
    "engines/dispatch.py": ["tests/test_maskmod.py"],
    "engines/short.py": ["tests/test_rowkeys.py", "tests/test_maskmod.py"],
    "engines/rowkeys.py": ["tests/test_rowkeys.py", "tests/test_maskmod.py"],
}


def _doctests_of(module: str) -> str:
    """The test node that runs ``module``'s own docstring examples (seconds; they pin the cost
    model's figures, e.g. ``kernel_cost``, which no result depends on)."""
    return f"tests/test_doctests.py::test_docstring_examples[attnmask.{module[:-3].replace('/', '.')}]"


def targets() -> dict[str, list[str]]:
    """module (relative to src/attnmask) -> the test files that hold it to its contract, fastest first.

    The compiler and the layout, and every engine module but FlexAttention's (its tests compile
    kernels for minutes) and the package's __init__; listed from the tree, so new modules join.
    Each list starts with the module's own doctests.
    """
    pkg = ROOT / "src" / "attnmask"
    out = {m: list(_COMPILE_TESTS) for m in ("compiler.py", "layout.py") if (pkg / m).exists()}
    for f in sorted((pkg / "engines").glob("*.py")):
        if f.name not in ("__init__.py", "flex.py"):
            out[f"engines/{f.name}"] = list(_ENGINE_TESTS)
    for m, tests in out.items():
        tests[:0] = [_doctests_of(m)]
        tests += [t for t in _EXTRA_TESTS.get(m, []) if t not in tests]
    return out


#: slow tests that exercise nothing of these modules' own logic (torch.compile of FlexAttention, dynamo
#: tracing, a subprocess training run); test_flex's BlockMask-structure tests still run
DESELECT = ("not training_example and not flex_attention_equals and not flex_backend and not graph_breaks "
            "and not recompile_limit")

#: issue 11's surviving mutants (text at the revision the issue reviewed), plus two wrong accumulation dtypes
NAMED = [
    ("a: merge without the isfinite guard", "engines/blocksparse.py",
     "    top.masked_fill_(~torch.isfinite(top), 0.0)\n", ""),   # (the one merge, _merge_lse, since session 4)
    ("b: long-call row cut not advancing", "engines/blocksparse.py",
     "part = dataclasses.replace(op, r0=op.r0 + r, rows=n)", "part = dataclasses.replace(op, r0=op.r0, rows=n)"),
    ("c: backward causal path without the q_offset guard", "engines/autograd.py",
     "if layout.q_len != layout.kv_len or layout.q_offset != 0:", "if layout.q_len != layout.kv_len:"),
    ("d: backward chunk start not advancing", "engines/autograd.py",
     "            r0, k0 = op.r0 + g0 * op.dr, op.k0 + g0 * op.dk", "            r0, k0 = op.r0, op.k0"),
    ("forward accumulator in the input dtype", "engines/blocksparse.py",
     "    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32", "    acc_dtype = q.dtype"),
    ("backward dK/dV accumulated in the input dtype", "engines/autograd.py",
     "    dk = torch.zeros(B, Hkv, Lk, D, dtype=cd)\n    dv = torch.zeros(B, Hkv, Lk, v.shape[-1], dtype=cd)",
     "    dk = torch.zeros(B, Hkv, Lk, D, dtype=k.dtype)\n    dv = torch.zeros(B, Hkv, Lk, v.shape[-1], dtype=v.dtype)"),
    # the engine's paths written after the first run (issue 13): each gives a wrong answer somewhere
    ("short: rows with no key keep the kernel's lse 0", "engines/short.py",
     "lse = lse.masked_fill(call.mask.empty, float(\"-inf\"))", "lse = lse"),
    ("short: scattered keys read as one range from the first", "engines/short.py",
     "ks, vs = k.index_select(2, call.index), v.index_select(2, call.index)",
     "ks, vs = k[:, :, call.lo:call.lo + len(call.index)], v[:, :, call.lo:call.lo + len(call.index)]"),
    ("short: every batch element takes batch 0's masks", "engines/short.py",
     "    rep = H // Hkv\n    same_rows = B == 1 or bool((head_index == head_index[:1]).all())",
     "    rep = H // Hkv\n    same_rows = True"),
    ("key sets: a small item folded into two calls", "engines/blocksparse.py",
     "if rs <= r and r + n <= rs + ns and not covered[j][r - rs:r - rs + n].any():",
     "if rs <= r and r + n <= rs + ns:"),
    ("key sets: gathered values behind the call's own", "engines/blocksparse.py",
     "vs = torch.cat([v[:, a:b].unsqueeze(1).expand(Z, G, b - a, v.shape[2]) for a, b in op.extra] + [vs], 2)",
     "vs = torch.cat([vs] + [v[:, a:b].unsqueeze(1).expand(Z, G, b - a, v.shape[2]) for a, b in op.extra], 2)"),
    ("per-head runs: every run reads kv head 0", "engines/blocksparse.py",
     "out.append((bs, h, h1, j, row[h]))", "out.append((bs, h, h1, 0, row[h]))"),
    ("per-head runs: batch elements share batch 0's layouts", "engines/blocksparse.py",
     "batches = [slice(0, B)] if all(r == rows[0] for r in rows) else [slice(b, b + 1) for b in range(B)]",
     "batches = [slice(0, B)]"),
    ("planner: one plan cache entry for both directions", "engines/blocksparse.py",
     "key = _layout_key(layout) + (direction,)", "key = _layout_key(layout)"),
    ("planner: merges into unwritten rows not flagged", "engines/blocksparse.py",
     "return Plan(ops, bld.masks, bld.row_empty, False, {}, bool(written.all()) and not mixed)",
     "return Plan(ops, bld.masks, bld.row_empty, False, {}, bool(written.all()))"),
    ("planner: batched rows may overlap", "engines/blocksparse.py",
     "if j < len(members) and members[j][0] - members[i][0] >= rows and members[j][1] >= members[i][1]:",
     "if j < len(members) and members[j][0] - members[i][0] >= 1 and members[j][1] >= members[i][1]:"),
    ("planner: causal region joins blocks with different left keys", "engines/blocksparse.py",
     "and f0[j] <= ca and left_sig(j, ca) == sig:", "and f0[j] <= ca:"),
    ("key-set split: a difference loses its right side", "engines/blocksparse.py",
     "return (rest - mask.right, terms) if terms else (mask, [])", "return (rest, terms) if terms else (mask, [])"),
    ("key-set split: the gathered cells include the rest's", "engines/blocksparse.py",
     "cells = torch.broadcast_to(mask.evaluate(qq, kk), shape) & ~torch.broadcast_to(rest.evaluate(qq, kk), shape)",
     "cells = torch.broadcast_to(mask.evaluate(qq, kk), shape)"),
   # the sampled survivors of the run at d06db22 (benchmarks/results/mutation.md says what became of each)
    ("d06db22 compiler.py:1020: segments counted up to the one after a block's last row", "compiler.py",
     "s_hi = np.minimum(seg_of(qe - 1), seg_of(ke - 1))", "s_hi = np.minimum(seg_of((qe + 1)), seg_of(ke - 1))"),
    ("d06db22 compiler.py:983: a piece that is not full starts at 1 cell", "compiler.py",
     "out = np.where(p.state == FULL, (qe - qs) * (ke - ks), 0).astype(_I64)",
     "out = np.where(p.state == FULL, (qe - qs) * (ke - ks), 1).astype(_I64)"),
    ("d06db22 compiler.py:201: the run-length encoding of an empty axis", "compiler.py",
     "return np.zeros(0, _I64), np.zeros(0, _I64), values[:0]", "return np.zeros(1, _I64), np.zeros(0, _I64), values[:0]"),
    ("d06db22 compiler.py:1018: the placeholder key range of an empty rectangle", "compiler.py",
     "ks, ke = np.where(ok, ks, 0), np.where(ok, ke, 1)", "ks, ke = np.where(ok, ks, 0), np.where(ok, ke, 2)"),
    ("d06db22 layout.py:454: FlexAttention's edge rule on every query block but the last", "layout.py",
     "short |= rows == self.n_q_blocks - 1", "short |= (rows != self.n_q_blocks - 1)"),
    ("d06db22 autograd.py:204: adjacent key ranges added the strided way", "engines/autograd.py",
     "if op.dk >= op.span or G == 1:", "if (op.dk > op.span) or G == 1:"),
    ("d06db22 autograd.py:160: the backward's exactly-causal plan forced off", "engines/autograd.py",
     "    if plan.causal:\n        # The layout is exactly causal", "    if False:\n        # The layout is exactly causal"),
    ("d06db22 blocksparse.py:705: a causal region's cost tie", "engines/blocksparse.py",
     "costs.causal_call_cost(n) <= costs.REGION_GAIN * costs.pieces_cost(n)",
     "(costs.causal_call_cost(n) < costs.REGION_GAIN * costs.pieces_cost(n))"),
    ("d06db22 cache.py:80: a total equal to the budget evicts", "engines/cache.py",
     "while self.nbytes > self.budget and len(self._items) > 1:",
     "while (self.nbytes >= self.budget) and len(self._items) > 1:"),
    ("d06db22 costs.py:95: kernel cost divided by the slice factor", "engines/costs.py",
     "return rows * keys * per_score", "return (rows * keys // per_score)"),
    ("d06db22 costs.py:113: causal call cost divided by the kernel cost", "engines/costs.py",
     "return cells * kernel_cost(n, 1) / n", "return (cells // kernel_cost(n, 1)) / n"),
    ("d06db22 dense.py:14: the dense bound doubled", "engines/dense.py",
     "DENSE_MAX_CELLS = 1 << 28", "DENSE_MAX_CELLS = 1 << 29"),
    ("d06db22 dispatch.py:146: a mask_mod read per (b, h) compiled once", "engines/dispatch.py",
     "if isinstance(item, Mask) and item.has_mask_mod() and item.depends_on():", "if False:"),
    ("d06db22 dispatch.py:235: flex refused for non-empty sequences", "engines/dispatch.py",
     "if c.q.shape[2] == 0 or c.k.shape[2] == 0:", "if (c.q.shape[2] != 0) or c.k.shape[2] == 0:"),
    ("d06db22 blocksparse.py:778: a one-member run keeps its steps", "engines/blocksparse.py",
     "        if j - i == 1:\n            dr = dk = 0\n", ""),
    # (short.py was rewritten since: its row masks' size, the same concept, counted negative)
    ("d06db22 short.py:75: a short plan's size counted negative", "engines/short.py",
     "tensor_bytes(self.allowed, self.empty) + 8 * tensor_bytes(self.allowed) + 128",
     "tensor_bytes(self.allowed, self.empty) - 8 * tensor_bytes(self.allowed) + 128"),
]


@dataclasses.dataclass
class Mutant:
    module: str
    line: int
    kind: str
    before: str
    after: str
    build: object                    # () -> the whole mutated module (a str for named mutants)

    @property
    def source(self) -> str:
        return self.build if isinstance(self.build, str) else self.build()

    def label(self) -> str:
        def short(text: str) -> str:
            return " ".join(text.split())[:90]
        return f"{self.module}:{self.line} {self.kind}: `{short(self.before)}` -> `{short(self.after)}`"


# -- listing sites --------------------------------------------------------------------------------

_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult}


def _skip_ranges(tree: ast.AST) -> list[tuple[int, int]]:
    """Line ranges not worth mutating: docstrings, raise statements (messages), f-strings."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].lineno, body[0].end_lineno))
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert)):
            out.append((node.lineno, node.end_lineno))
    return out


def _splice(src_lines: list[str], node: ast.AST, text: str) -> str:
    """The module with ``node``'s exact span replaced by ``text``."""
    lines = list(src_lines)
    a, b = node.lineno - 1, node.end_lineno - 1
    head = lines[a][:node.col_offset]
    tail = lines[b][node.end_col_offset:]
    lines[a:b + 1] = [head + text + tail]
    return "".join(lines)


def _segment(src: str, node: ast.AST) -> str:
    return ast.get_source_segment(src, node) or ""


def list_mutants(module: str) -> list[Mutant]:
    path = ROOT / "src" / "attnmask" / module
    src = path.read_text()
    lines = src.splitlines(keepends=True)
    tree = ast.parse(src)
    skip = _skip_ranges(tree)

    def skipped(node) -> bool:
        return any(a <= node.lineno <= b for a, b in skip)

    out: list[Mutant] = []

    def add(node, kind, new_text, whole_lines=False):
        def build() -> str:             # the mutated module, made (and parsed) only when sampled
            if whole_lines:
                indent = lines[node.lineno - 1][:node.col_offset]
                new_lines = list(lines)
                new_lines[node.lineno - 1:node.end_lineno] = [indent + new_text + "\n"]
                return "".join(new_lines)
            return _splice(lines, node, new_text)
        out.append(Mutant(module, node.lineno, kind, _segment(src, node), new_text, build))

    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        seen: set[str] = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        for stmt in ast.walk(fn):
            if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
                names = {t.id for t in stmt.targets}
                if names <= seen and not skipped(stmt):
                    add(stmt, "delete re-assignment", "pass", whole_lines=True)
                seen |= names
            elif isinstance(stmt, ast.AugAssign) and not skipped(stmt):
                add(stmt, "delete augmented assignment", "pass", whole_lines=True)

    for node in ast.walk(tree):
        if not hasattr(node, "lineno") or skipped(node):
            continue
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP_SWAP:
            new = ast.Compare(node.left, [_CMP_SWAP[type(node.ops[0])]()], node.comparators)
            add(node, "comparison", "(" + ast.unparse(new) + ")")
        elif isinstance(node, ast.BinOp) and type(node.op) in _BIN_SWAP:
            new = ast.BinOp(node.left, _BIN_SWAP[type(node.op)](), node.right)
            add(node, "arithmetic", "(" + ast.unparse(new) + ")")
        elif isinstance(node, ast.BoolOp):
            new = ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
            add(node, "boolean", "(" + ast.unparse(new) + ")")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, "drop not", "(" + ast.unparse(node.operand) + ")")
        elif isinstance(node, ast.Constant) and type(node.value) is int and not isinstance(node.value, bool):
            add(node, "constant", repr(node.value + 1))
        elif isinstance(node, ast.If):
            for forced in ("True", "False"):
                add(node.test, f"if forced {forced}", forced)
    return out


# -- running ------------------------------------------------------------------------------------------

def run_tests(src_dir: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(src_dir), CI="true", PYTHONDONTWRITEBYTECODE="1")
    env.pop("ATTNMASK_HYPOTHESIS", None)
    # (pyproject's addopts already has -q; a second one would drop the "N passed" line read below)
    cmd = [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           "-k", DESELECT, *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "caught (timeout)", time.time() - t0, ""
    tail = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    status = "survived" if proc.returncode == 0 else "caught"
    if proc.returncode not in (0, 1):
        status = f"caught (pytest exit {proc.returncode})"
    if status == "survived":      # say how many tests the survivor passed (a survivor that ran none says 0)
        passed = re.findall(r"(\d+) passed", proc.stdout)
        return status, time.time() - t0, f"{passed[-1] if passed else 0} tests passed"
    return status, time.time() - t0, tail[0][:160] if tail else ""


def baseline_failures(src_dir: Path, test_lists: list[list[str]], timeout: float) -> list[tuple[list[str], str, str]]:
    """``(tests, status, first failure)`` of each test list that does not pass on ``src_dir`` (the
    unmutated copy), run exactly as a mutant's are; [] when all pass."""
    out = []
    for tests in test_lists:
        status, _, failure = run_tests(src_dir, tests, timeout)
        if status != "survived":
            out.append((tests, status.replace("caught", "fails", 1), failure or "(no FAILED line)"))
    return out


PROBE = r'''
import hashlib, json, sys, torch
import attnmask as am
torch.set_num_threads(1)
h = hashlib.sha256()
def feed(t):
    h.update(t.detach().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
cases = [("causal", 200, 200, None, 16), ("causal & (sliding(8) | sink(2)) - rows(100)", 200, 200, None, 16),
         ("document(50, 70, 60) & causal | sink(1)", 180, 180, None, 32), ("causal", 64, 64, 10, 16),
         ("band(3, 5) | cols(0, 2) - rows(3, 40, 3)", 90, 130, 20, (8, 16)), ("dilated(5, 3)", 77, 77, None, 16),
         ("causal & sliding(64)", 3000, 3000, None, 128), ("cols(0, 32)", 2600, 2600, None, 128),
         ("chunked(7) | sink(2)", 53, 53, None, (4, 8)), ("prefix_lm(30) - cols(5)", 100, 60, None, 32)]
for expr, lq, lk, off, bs in cases:
    m = am.parse(expr)
    lay = m.compile(lq, lk, q_offset=off, block_size=bs)
    feed(lay.block_states()); feed(lay.row_counts()); h.update(str(lay.attended_pairs()).encode())
    for D, H in ((8, 2), (64, 8)) if lq > 2000 else ((8, 2),):
        g = torch.Generator().manual_seed(lq)
        q = torch.randn(1, H, lq, D, generator=g, requires_grad=True)
        k = torch.randn(1, H // 2, lk, D, generator=g, requires_grad=True)
        v = torch.randn(1, H // 2, lk, D, generator=g, requires_grad=True)
        out, lse = am.attention(q, k, v, m, q_offset=off, block_size=bs, enable_gqa=True, return_lse=True)
        feed(out); feed(lse)
        (out * torch.cos(torch.arange(out.numel()).reshape(out.shape).float())).sum().backward()
        feed(q.grad); feed(k.grad); feed(v.grad)
print(h.hexdigest())
'''


def probe(src_dir: Path, timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONPATH=str(src_dir))
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return proc.stdout.strip() if proc.returncode == 0 else "error: " + proc.stderr.strip().splitlines()[-1][:120]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=40, help="random mutants in all (spread over the modules)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    ap.add_argument("--out", type=Path, help="write the markdown result here")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--list", action="store_true", help="only count the sites")
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at once")
    ap.add_argument("--dry-run", action="store_true", help="list the chosen mutants, run nothing")
    ap.add_argument("--only", nargs="*", help="sample only these modules (default: all targets)")
    ap.add_argument("--named", choices=("with", "without", "only"), default="with",
                    help="the named mutants: with the sampled ones, left out, or alone (to split a run)")
    ap.add_argument("--note", default="shared with other jobs",
                    help="how the machine was shared, for the header (e.g. 'under the CPU lock')")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                    help="write --out from the --json files of earlier (split) runs; runs nothing")
    args = ap.parse_args(argv)
    if args.combine:
        parts = [json.loads(f.read_text()) for f in args.combine]
        results = [r for part in parts for r in part["results"]]
        write_markdown(args.out, parts[0]["revision"], any(part["dirty"] for part in parts), parts[0]["sites"],
                       results, sum(part["wall"] for part in parts), [part["command"] for part in parts],
                       parts[0]["targets"], "; ".join(part.get("note", "") for part in parts))
        return 0

    TARGETS = targets()
    modules = [m for m in TARGETS if not args.only or m in args.only]
    sites = {m: list_mutants(m) for m in modules}
    total = sum(len(v) for v in sites.values())
    print(f"{total} sites: " + ", ".join(f"{m} {len(v)}" for m, v in sites.items()), flush=True)
    if args.list:
        return 0
    rng = random.Random(args.seed)
    chosen: list[tuple[str, Mutant]] = []
    for m in (modules if args.named != "only" else []):   # proportional to the sites, at least 2 per module
        n = max(2, round(args.sample * len(sites[m]) / total))
        order = rng.sample(sites[m], len(sites[m]))
        taken = 0
        for x in order:                                 # skip the rare splice that does not parse
            if taken == n:
                break
            try:
                text = x.source
                ast.parse(text)
            except SyntaxError:
                continue
            x.build = text
            chosen.append(("sampled", x))
            taken += 1
    for name, module, old, new in (NAMED if args.named != "without" else []):
        # the text may have moved to another module in a rewrite: take the one that holds it once
        for cand in [module] + [m for m in TARGETS if m != module]:
            path = ROOT / "src" / "attnmask" / cand
            text = path.read_text() if path.exists() else ""
            if text.count(old) == 1:
                module = cand
                break
        if text.count(old) == 1:
            line = text[:text.index(old)].count("\n") + 1
            chosen.append((f"named: {name}", Mutant(module, line, "named", old, new, text.replace(old, new))))
        else:
            chosen.append((f"named: {name}", Mutant(module, 0, "named (site gone at this revision)", old, new, "")))

    if args.dry_run:
        for origin, mut in chosen:
            print(f"{origin}: {mut.label()}{'' if mut.source else ' (site gone)'}")
        return 0
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="attnmask-mut-"))
    pristine = work / "orig"
    shutil.copytree(ROOT / "src", pristine, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # A test that fails on the unmutated code would count every mutant of its module as caught.
    lists = {tuple(TARGETS.get(mut.module, _ENGINE_TESTS)) for _, mut in chosen if mut.source}
    failing = baseline_failures(pristine, [list(t) for t in sorted(lists)], args.timeout)
    if failing:
        shutil.rmtree(work, ignore_errors=True)
        print("the selected tests fail on the unmutated code, so every mutant would count as caught; "
              "no mutant was run. Fix the code or the tests first:", file=sys.stderr)
        for tests, status, failure in failing:
            print(f"  {status}: {' '.join(tests)}\n    {failure}", file=sys.stderr)
        return 2
    base_probe = probe(pristine)
    load = os.getloadavg()[0]
    t_start = time.time()

    def one(i: int) -> dict:
        origin, mut = chosen[i]
        if not mut.source:
            return dict(origin=origin, label=mut.label(), status="not applied (site gone)", seconds=0, failure="",
                        probe="")
        mdir = work / f"mut{i}"
        shutil.copytree(pristine, mdir)
        (mdir / "attnmask" / mut.module).write_text(mut.source)
        try:
            status, secs, failure = run_tests(mdir, TARGETS.get(mut.module, _ENGINE_TESTS), args.timeout)
            pr = ""
            if status == "survived":
                got = probe(mdir)
                pr = "no output change" if got == base_probe else (
                    "probe " + got if got.startswith(("error", "timeout")) else "outputs differ")
        finally:
            shutil.rmtree(mdir, ignore_errors=True)
        print(f"[{i + 1}/{len(chosen)}] {status:10s} {secs:6.1f}s {pr:16s} {origin}: {mut.label()}", flush=True)
        return dict(origin=origin, label=mut.label(), status=status, seconds=round(secs, 1), failure=failure,
                    probe=pr)

    try:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:     # each mutant runs in its own process
            results = list(pool.map(one, range(len(chosen))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.time() - t_start
    command = (f"PYTHONPATH=src python tools/mutation_run.py --sample {args.sample} --seed {args.seed} "
               f"--jobs {args.jobs} --named {args.named}" + (f" --only {' '.join(args.only)}" if args.only else "")
               + (f' --note "{args.note}"' if args.note != ap.get_default("note") else ""))
    if args.json:
        args.json.write_text(json.dumps(dict(revision=rev, dirty=bool(dirty), results=results, wall=wall,
                                             command=command, sites={m: len(v) for m, v in sites.items()},
                                             targets=TARGETS, note=f"{args.note}, load {load:.2f} at start"),
                                        indent=1))
    caught = sum(r["status"].startswith("caught") for r in results)
    applied = sum(not r["status"].startswith("not applied") for r in results)
    print(f"{applied} mutants, {caught} caught, {applied - caught} survived, {wall:.0f} s")
    if args.out:
        write_markdown(args.out, rev, bool(dirty), {m: len(v) for m, v in sites.items()}, results, wall,
                       [command + f" --out {args.out}"], TARGETS, f"{args.note}, load {load:.2f} at start")
    return 0


def _test_name(test: str) -> str:
    return "own doctests" if "test_doctests.py::" in test else Path(test).name


def write_markdown(path: Path, rev, dirty, sites: dict, results, wall, commands: list[str], TARGETS,
                   note: str) -> None:
    import platform
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    applied = [r for r in results if not r["status"].startswith("not applied")]
    caught = [r for r in applied if r["status"].startswith("caught")]
    surv = [r for r in applied if r["status"] == "survived"]
    lines = [
        "# Mutation run: compiler, layout, engines",
        "",
        f"- revision: `{rev}`{' (with uncommitted changes in src/)' if dirty else ''}; date "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu.split(':', 1)[-1].strip()} "
        f"(Python {platform.python_version()}), {note}",
        "- command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands),
        f"- sites listed: {sum(sites.values())} (" + ", ".join(f"{m} {n}" for m, n in sites.items())
        + f"); {sum(r['origin'] == 'sampled' for r in results)} sampled, "
        f"{sum(r['origin'].startswith('named') for r in results)} named; tests per module: "
        + "; ".join(f"{m}: {', '.join(_test_name(t) for t in ts)}" for m, ts in TARGETS.items()),
        f"- **{len(applied)} mutants, {len(caught)} caught, {len(surv)} survived** ({wall / 60:.1f} min)",
        "",
        "| origin | mutant | result | first failing test / probe |",
        "|---|---|---|---|",
    ]
    for r in results:
        detail = (f"{r['probe']} ({r['failure']})" if r["status"] == "survived" else r["failure"]).replace("|", "\\|")
        lines.append(f"| {r['origin']} | {r['label'].replace('|', chr(92) + '|')} | {r['status']} | {detail} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

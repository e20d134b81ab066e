"""Named mutants of the fused kernel (csrc/attend.c, attend_item.h, attend_bwd_item.h) and its wiring: does tests/test_fused.py notice each?

Each mutant is one plausible bug (a mask bit, the causal lane shift, the merge of a non-first
item, the tail of a 16-key piece, a buffer shared by threads, ...), written as exact text
replacements. It is applied to a copy of ``src/``, ``csrc/``, ``setup.py`` and ``tests/`` in a
temporary folder, the extension is built there (``setup.py build_ext --inplace``: the worktree's
build is untouched), and tests/test_fused.py runs on the copy under the ``ci`` hypothesis profile.
The mutant is *caught* when a test fails (or the run crashes). A mutant whose text no longer
exists (the kernel was rewritten) is reported as ``stale``, to be rewritten for the new code.
``unbuilt`` runs the tests with no extension at all: only the build guard may fail.

    /work/notes/cpu python tools/kernel_mutations.py --out benchmarks/results/kernel_mutations.md

(not a test: ~30 s per mutant on two cores.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C, ITEM, BWD = "csrc/attend.c", "csrc/attend_item.h", "csrc/attend_bwd_item.h"
FUSED, BS = "src/attnmask/engines/fused.py", "src/attnmask/engines/blocksparse.py"
AG = "src/attnmask/engines/autograd.py"

#: name -> (why it is plausible, [(file, old, new)]): every occurrence of old is replaced,
#: or only the last one where the entry has a fourth element "last" (the bf16 copy of a step).
MUTANTS: dict[str, tuple[str, list[tuple]]] = {
    "mask_bit": ("row 0 of every 16-row group sees every key",
                 [(C, "return mb[g * N + j] & valid;", "return (mb[g * N + j] | 1) & valid;")]),
    "causal_lane_shift": ("the top-left causal item lets a row see the next key",
                          [(C, "(uint16_t)(0xFFFFu << lo)", "(uint16_t)(0xFFFFu << (lo - 1))")]),
    "causal_pieces_short": ("a causal group skips its diagonal piece",
                            [(C, "int64_t last = (it[I_FLAGS] & F_CAUSAL) && g < np - 1 ? g : np - 1;",
                              "int64_t last = (it[I_FLAGS] & F_CAUSAL) && g < np - 1 ? g - 1 : np - 1;")]),
    "live_misses_last_key": ("a piece's last key never makes it live",
                             [(C, "for (int64_t j = 0; j < nj; j++) any |= mb[j0 + j];",
                               "for (int64_t j = 0; j < nj - 1; j++) any |= mb[j0 + j];")]),
    "merge_ignores_stored": ("a non-first item starts afresh instead of continuing the stored (out, lse)",
                             [(C, "float l0 = (it[I_FLAGS] & F_FIRST) || r >= nr ? -INFINITY : lse[(it[I_R0] + r0 + r) * P->lr];",
                               "float l0 = -INFINITY;")]),
    "merge_base_e": ("the stored lse (natural log) taken as the running max in base 2",
                     [(C, "mv[r] = l0 == -INFINITY ? -INFINITY : l0 * 1.4426950408889634f;",
                       "mv[r] = l0 == -INFINITY ? -INFINITY : l0;")]),
    "piece_tail_drops_key": ("a copied piece (tail, gathered or strided keys) loses its last key",
                             [(ITEM, "if (j < nj[b]) memcpy(dst + j * D, k +", "if (j < nj[b] - 1) memcpy(dst + j * D, k +")]),
    "narrow_piece_short": ("a piece of 9 keys scored as a narrow (8-key) one",
                           [(ITEM, "if (nj[b] > 8) qk_", "if (nj[b] > 9) qk_")]),
    "pv_drops_last_key": ("fp32 P @ V skips each piece's last key (its probability still summed)",
                          [(C, "for (int64_t t = 0; t < nj[b]; t++) {", "for (int64_t t = 0; t < nj[b] - 1; t++) {")]),
    "bf16_odd_pair": ("bf16 V pairs: the last key of an even piece dropped",
                      [(ITEM, "const uint16_t *v1 = b1 < nj[b] ?", "const uint16_t *v1 = b1 < nj[b] - 1 ?")]),
    "bf16_pairs_swapped": ("bf16 probability pairs packed in the wrong order",
                           [(C, "_mm512_cvtne2ps_pbh(_mm512_load_ps(p + (2 * t2 + 1) * GROUP), _mm512_load_ps(p + 2 * t2 * GROUP))",
                             "_mm512_cvtne2ps_pbh(_mm512_load_ps(p + 2 * t2 * GROUP), _mm512_load_ps(p + (2 * t2 + 1) * GROUP))")]),
    "bf16_probs_truncated": ("bf16 probabilities truncated instead of rounded to nearest (a biased P @ V)",
                             [(C, "_mm512_cvtne2ps_pbh(_mm512_load_ps(p + (2 * t2 + 1) * GROUP), _mm512_load_ps(p + 2 * t2 * GROUP))",
                               "_mm512_cvtne2ps_pbh(_mm512_and_ps(_mm512_load_ps(p + (2 * t2 + 1) * GROUP), "
                               "_mm512_castsi512_ps(_mm512_set1_epi32((int)0xFFFF0000u))), "
                               "_mm512_and_ps(_mm512_load_ps(p + 2 * t2 * GROUP), "
                               "_mm512_castsi512_ps(_mm512_set1_epi32((int)0xFFFF0000u))))")]),
    "no_rescale": ("the accumulator is not rescaled when a step raises the running max",
                   [(C, "if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ))", "if (0)")]),
    "lse_log_base": ("lse from log(l) instead of log2(l) (out unchanged)",
                     [(C, "(mv[i] + log2f(lv[i])) * 0.6931471805599453f", "(mv[i] + logf(lv[i])) * 0.6931471805599453f")]),
    "dead_rows_unwritten": ("a row with no key keeps whatever the output held",
                            [(C, "_mm512_storeu_ps(o, _mm512_mul_ps(r[i], inv));",
                              "if (lv[i] > 0.0f) _mm512_storeu_ps(o, _mm512_mul_ps(r[i], inv));")]),
    "gathered_key_off_by_one": ("the position of a gathered key (sink, key columns) off by one range",
                                [(C, "if (j < n) return x[2 * i] + j;", "if (j <= n) return x[2 * i] + j;")]),
    "strided_keys_in_place": ("k rows strided by H * D read in place as if contiguous",
                              [(ITEM, "                    ks = P->kr;\n", "                    ks = D;\n")]),
    "packed_not_reset": ("copied keys / values kept from the previous item or batch-head",
                         [(ITEM, "    memset(w->packed, 0, (size_t)np);\n", "")]),
    "z_off_swapped": ("batch and head strides swapped",
                      [(C, "return (z / P->Y) * sx + (z % P->Y) * sy;", "return (z % P->Y) * sx + (z / P->Y) * sy;")]),
    "shared_work_buffer": ("one work buffer kept for every call (threads overwrite each other's)",
                           [(C, "char *mem = aligned_alloc(64, sq + sacc + spp + sk + sv + spk + sl + so);",
                             "static char *mem; static size_t have; size_t need = sq + sacc + spp + sk + sv + spk + sl + so; "
                             "if (need > have) { free(mem); mem = aligned_alloc(64, need); have = need; }"),
                            (C, "    free(mem);\n", "")]),
    "head_dim_unchecked": ("a head dim not a multiple of 16 accepted",
                           [(C, "if (D <= 0 || D > MAX_D || D % 16) {", "if (D <= 0 || D > MAX_D) {")]),
    "env_ignored": ("ATTNMASK_KERNEL=0 does not turn the kernel off",
                    [(FUSED, '    if os.environ.get("ATTNMASK_KERNEL", "1") == "0":\n        return False\n', "")]),
    "segments_on_aten": ("causal segments (causal & documents) never become one causal item each",
                         [(BS, "    if segments is not None:\n        return fused.causal_items(tuple(segments)), ",
                           "    if False:\n        return fused.causal_items(tuple(segments)), ")]),
    "stride0_on_aten": ("k / v broadcast with stride 0 (GQA, runs of per-head masks) refused by the kernel",
                        [(BS, "    if dil is None or dil[1] == 1:\n        if fused.usable(q.dtype, q.shape[-1]):",
                          "    if dil is None or dil[1] == 1:\n        if fused.usable(q.dtype, q.shape[-1]) and 0 not in k.stride()[:2]:")]),
    "narrow_piece_4_keys": ("a piece of 5 keys scored as a 4-key one",
                            [(ITEM, "else if (nj[b] > 4) qk_", "else if (nj[b] > 5) qk_")]),
    "softmax_odd_slot_skipped": ("bf16: the masked slot after an odd key count not exponentiated (its -inf pairs into P @ V)",
                                 [(C, "for (int64_t j = 0; j < ((nj[b] + 1) & ~1); j++) { /* the masked slot",
                                   "for (int64_t j = 0; j < nj[b]; j++) { /* the masked slot")]),
    # -- the backward (attend_bwd_item.h, both dtypes; flush_piece_grads; run_backward) --
    "bwd_ds_no_delta": ("backward: dS = P dP, delta (rowsum(dO * O)) left out",
                        [(BWD, "_mm512_maskz_mul_ps(bits, pr, _mm512_sub_ps(dp[j], dlt[gi]))",
                          "_mm512_maskz_mul_ps(bits, pr, dp[j])")]),
    "bwd_dk_no_scale": ("backward: dK added without the softmax scale",
                        [(C, "_mm512_fmadd_ps(_mm512_load_ps(x + d0), sc, _mm512_loadu_ps(a + d0))",
                          "_mm512_add_ps(_mm512_load_ps(x + d0), _mm512_loadu_ps(a + d0))")]),
    "bwd_dv_uses_ds": ("backward: dV += dS^T dO instead of P^T dO",
                       [(BWD, "OUTER_ADD(wp, rdo", "OUTER_ADD(wds, rdo")]),
    "bwd_lse_base_e": ("backward: the lse (natural log) not converted to base 2 for P = exp2(S c - lse2)",
                       [(BWD, "lse[(row0 + r) * B->s[B_LSE][2]] * 1.4426950408889634f",
                         "lse[(row0 + r) * B->s[B_LSE][2]]")]),
    "bwd_lse_row_stride": ("backward: the lse read as contiguous rows (dilated passes strided views)",
                           [(BWD, "lse[(row0 + r) * B->s[B_LSE][2]]", "lse[row0 + r]")]),
    "bwd_dk_wrong_key": ("backward: a piece's dK flushed to its neighbouring key (dV right)",
                         [(C, "float *a = dk + pos * B->s[B_DK][2]",
                           "float *a = dk + key_pos(P, it, j0 + (j + 1) % nj) * B->s[B_DK][2]")]),
    "bwd_gathered_dropped": ("backward: the gradients of gathered keys (sinks, key columns) never flushed",
                             [(C, "for (int64_t j = 0; j < nj; j++) {\n            int64_t pos = key_pos(P, it, j0 + j);\n            float *a",
                               "for (int64_t j = 0; j0 >= it[I_E] && j < nj; j++) {\n            int64_t pos = key_pos(P, it, j0 + j);\n            float *a")]),
    "bwd_dq_row_off": ("backward: the dQ transpose stored one row off",
                       [(BWD, "_mm512_storeu_ps(o, _mm512_fmadd_ps(r[i], sc,", "_mm512_storeu_ps(o, _mm512_fmadd_ps(r[(i + 1) % 16], sc,")]),
    "bwd_dq_not_zeroed": ("backward: a group's dQ accumulator starts from the previous block's",
                          [(BWD, "            for (int64_t d = 0; d < D; d++) _mm512_store_ps(w->dqt + gi * lane_sz + d * GROUP, _mm512_setzero_ps());\n", "")]),
    "bwd_narrow_piece_short": ("backward: a piece of 9 keys computed as a narrow (8-key) one",
                               [(BWD, "const int J = nj > 8 ? 16 : 8;", "const int J = nj > 9 ? 16 : 8;")]),
    "bwd_packed_not_reset": ("backward: dK / dV buffers and copied keys kept from the previous item",
                             [(BWD, "    memset(w->packed, 0, (size_t)np);\n    for (int64_t g0 = 0;", "    for (int64_t g0 = 0;")]),
    "bwd_dk_row_stride": ("backward: dK / dV rows written as contiguous (dilated passes strided views)",
                          [(C, "float *a = dk + pos * B->s[B_DK][2], *b = dv + pos * B->s[B_DV][2];",
                            "float *a = dk + pos * D, *b = dv + pos * D;")]),
    "bwd_dq_row_stride": ("backward: dQ rows written as contiguous (dilated passes strided views)",
                          [(BWD, "float *o = dq + (row0 + i) * B->s[B_DQ][2] + d0;", "float *o = dq + (row0 + i) * D + d0;")]),
    "bwd_block_wrong_group": ("backward: a group's live pieces marked for the next group of its row block",
                              [(BWD, "w->mark[w->live[b]] |= (uint8_t)(1u << gi);",
                                "w->mark[w->live[b]] |= (uint8_t)(1u << ((gi + 1) % ng));")]),
    "bwd_dq_batch_first_mark": ("backward: dQ of a batch asks only whether its first piece is live for the group",
                                [(BWD, "njg[b] = (w->mark[w->live[b0 + b]] >> gi) & 1 ? njs[b] : 0;",
                                  "njg[b] = (w->mark[w->live[b0]] >> gi) & 1 ? njs[b] : 0;")]),
    "bwd_empty_group_flushed": ("backward: a group with no live piece flushes a dQ accumulator it never zeroed",
                                [(BWD, "            if (!has[gi]) continue;\n", "")]),
    "bwd_bf16_key_pairs_stride": ("bf16 backward: key pairs of an in-place piece read at stride D, not the keys' row stride",
                                  [(BWD, "pair_rows(kp, ks, 16, D, w->kpairs + p * 8 * D);",
                                    "pair_rows(kp, D, 16, D, w->kpairs + p * 8 * D);")]),
    "bwd_bf16_odd_key_pair": ("bf16 backward: dQ drops the odd last key of a piece (its dS pair not packed)",
                              [(BWD, "pack_probs(ds, (nj + 1) / 2,", "pack_probs(ds, nj / 2,")]),
    "bwd_bf16_dv_weights_ds": ("bf16 backward: P's bf16 row pairs taken from dS",
                               [(BWD, "_mm256_store_si256((__m256i *)(prow + j * 8), (__m256i)_mm512_cvtneps_pbh(pr));",
                                 "_mm256_store_si256((__m256i *)(prow + j * 8), (__m256i)_mm512_cvtneps_pbh(d));")]),
    "bwd_dlse_ignored": ("backward: the gradient into lse left out of delta",
                         [(C, "        if (B->dlse) {", "        if (0) {")]),
    "bwd_delta_out_stride": ("backward: delta reads the output as contiguous rows (dilated passes strided views)",
                             [(C, "const float *orw = o + (row0 + r) * orow;", "const float *orw = o + (row0 + r) * D;")]),
    "bwd_gqa_split": ("backward: jobs split the query heads of one key head (their dK / dV race)",
                      [(FUSED, "return Call(1, params, items, X, Y, (tensors, dlse), q.dtype, D)",
                        "return Call(1, params, items, X * Y, 1, (tensors, dlse), q.dtype, D)")]),
    "bwd_key_head_runs_split": ("backward: per-head runs of one key head in different chains (their dK / dV race)",
                                [(AG, "tagged.setdefault((run[0].start, run[0].stop, run[3]), [])",
                                  "tagged.setdefault((run[0].start, run[0].stop, run[3], run[1]), [])")]),
    # -- a bf16 output rounded by the kernel (round_rows) --
    "bf16_out_truncated": ("the bf16 output truncated, not rounded to nearest even",
                           [(C, "__m512i t = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));",
                             "__m512i t = u;")]),
    "bf16_out_flushes_denormals": ("the bf16 output rounded by VCVTNEPS2BF16 (denormals flushed to zero)",
                                   [(C, "static T512 void round_rows(", "static TBF16 void round_rows("),
                                    (C, "            _mm256_storeu_si256((__m256i *)(dst + r * ds + d), _mm512_cvtepi32_epi16(t));",
                                     "            (void)t; _mm256_storeu_si256((__m256i *)(dst + r * ds + d), (__m256i)_mm512_cvtneps_pbh(x));")]),
    # -- the job table (csrc/attend.c "jobs", fused.run) --
    "jobs_chain_first_only": ("a thread runs only the first job of each chain it takes",
                              [(C, "for (int64_t j = d->starts[c]; j < d->starts[c + 1]; j++) {",
                                "for (int64_t j = d->starts[c]; j < d->starts[c] + 1; j++) {")]),
    "jobs_one_chain_a_thread": ("each team thread takes one chain and stops",
                                [(C, "    for (;;) {\n        int64_t c = __atomic_fetch_add",
                                  "    for (int once = 0; once < 1; once++) {\n        int64_t c = __atomic_fetch_add")]),
    "jobs_cut_drops_last": ("a call cut into jobs loses its last unit range",
                            [(FUSED, "bounds = [call.units * i // cut for i in range(cut + 1)]",
                              "bounds = [call.units * i // cut for i in range(cut)]")]),
    "jobs_team_inline": ("the job table drained on the calling thread alone, never on torch's team",
                         [(C, "    if (team) parallel(drain, &d, 0, 0);", "    if (team) drain(&d);")]),
    "jobs_fork_hangs": ("a forked child keeps the parent's OpenMP team (libgomp waits on threads it lacks)",
                        [(FUSED, "    os.register_at_fork(after_in_child=_forked_child)", "    pass")]),
    "per_head_forward_skipped": ("a per-head list's kernel problems never run",
                                 [(BS, "    _run_kernel_jobs(kernel_jobs, scale)\n    return out, lse",
                                   "    return out, lse")]),
    "bwd_on_aten": ("the autograd never reaches the kernel backward (ATen's runs)",
                    [(FUSED, "    return usable(dtype, head_dim)\n", "    return False\n")]),
    "bwd_bf16_upcast": ("the autograd upcasts bf16 to float32 for the kernel backward (its bf16 body never runs)",
                        [(AG, "    kd = q.dtype if q.dtype == torch.bfloat16 and _fused.usable_backward(q.dtype, D) else cd",
                          "    kd = cd")]),
    "bwd_env_ignored": ("ATTNMASK_KERNEL=0 does not turn the kernel backward off",
                        [(FUSED, "    return usable(dtype, head_dim)\n",
                          "    return dtype in _DTYPES and _supports(_DTYPES[dtype]) and head_dim % 16 == 0 and 0 < head_dim <= 256\n")]),
    "unbuilt": ("no extension at all (a failed build)", []),
}


def _copy(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", ".hypothesis")
    for name in ("src", "csrc", "tests"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, dst / name)


def _apply(dst: Path, edits: list[tuple]) -> bool:
    for edit in edits:
        path, old, new = edit[:3]
        text = (dst / path).read_text()
        if old not in text:
            return False
        if len(edit) > 3:
            i = text.rindex(old)
            text = text[:i] + new + text[i + len(old):]
        else:
            text = text.replace(old, new)
        (dst / path).write_text(text)
    return True


def run_one(name: str) -> tuple[str, str]:
    """(verdict, the failing tests) for one mutant."""
    _, edits = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix="kmut-") as tmp:
        dst = Path(tmp)
        _copy(dst)
        if not _apply(dst, edits):
            return "stale", ""
        if name != "unbuilt":
            b = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=dst,
                               capture_output=True, text=True)
            if b.returncode or not list((dst / "src/attnmask/engines").glob("_attend*.so")):
                return "build failed", b.stderr.strip().splitlines()[-1] if b.stderr.strip() else ""
        env = dict(os.environ, PYTHONPATH=str(dst / "src"), CI="true")
        env.pop("ATTNMASK_HYPOTHESIS", None)
        r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fused.py", "-q", "-p", "no:cacheprovider",
                            "-rf", "--tb=no"], cwd=dst, capture_output=True, text=True, env=env, timeout=600)
        failed = [line.split()[1].split("::")[1] for line in r.stdout.splitlines() if line.startswith("FAILED")]
        tests = sorted({re.sub(r"\[.*", "", t) for t in failed})
        if r.returncode == 0:
            return "SURVIVED", ""
        if not failed:
            return f"caught (crash, rc {r.returncode})", ""
        return f"caught ({len(failed)} failed)", ", ".join(t.removeprefix("test_") for t in tests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--out", help="write a markdown table here")
    ap.add_argument("--note", default="", help="a line on the conditions (load, lock)")
    args = ap.parse_args()
    rows, t0 = [], time.time()
    for name in args.names or list(MUTANTS):
        verdict, tests = run_one(name)
        print(f"{name}: {verdict} {tests}", flush=True)
        rows.append(f"| `{name}` | {MUTANTS[name][0]} | {verdict} | {tests} |")
    if args.out:
        cpu = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True, capture_output=True,
                             text=True).stdout.strip()
        load = os.getloadavg()[0]
        Path(args.out).write_text("\n".join([
            "# Kernel mutants against tests/test_fused.py", "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU {cpu}; load {load:.1f} at the end; "
            f"{time.time() - t0:.0f} s. {args.note}".strip(), "",
            "Command: `python tools/kernel_mutations.py --out benchmarks/results/kernel_mutations.md`", "",
            "| mutant | the bug | verdict | failing tests |", "|---|---|---|---|", *rows, ""]))


if __name__ == "__main__":
    main()

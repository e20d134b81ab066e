/* attnmask's fused CPU attention kernel: exact masked attention over a list of "items".
 *
 * An item is one query range against one key range (plus gathered keys in front), with an
 * optional bit mask, the top-left causal mask, or no mask. It is exactly one call of the
 * block-sparse plan (engines/blocksparse.py, Plan.items); engines/fused.py builds the tables.
 * Items that cover the same rows are folded into one another by continuing the online softmax
 * from the stored (out, lse) of the rows, so a plan needs no separate log-sum-exp merges.
 *
 * Why a kernel of our own (issue 13): ATen's CPU flash kernel turns bf16 into fp32 on
 * machines without AMX, and pays a fixed cost per call and per query row that dominates
 * narrow spans (sinks, key columns, narrow windows, per-head masks). This kernel
 *   - keeps 16 query rows in the lanes of one AVX-512 register, so the softmax's row-wise
 *     max and sum are plain vertical operations and every key is one broadcast operand;
 *   - skips every 16-row x 16-key piece whose mask bits are all zero;
 *   - for bf16 inputs uses AVX512-BF16 dot products (pairs of bf16 products summed into
 *     fp32), the probabilities rounded to bf16 for P @ V as ATen's bf16 kernel does;
 *   - runs the backward over the same items (attend_bwd_item.h), bf16 inputs as they are.
 * Scores, the softmax and all accumulators are fp32. The order of every reduction is fixed
 * by the item table, never by the thread count (the caller splits work by batch-head).
 *
 * No dependency on torch's C++ API: the module takes raw pointers and strides, so it builds
 * with a C compiler and Python's headers alone, and is independent of the torch ABI.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 16 /* query rows per group: the lanes of one register */
#define MAX_D 256

/* Columns of the int64 item table. */
enum { I_R0, I_ROWS, I_K0, I_SPAN, I_MASK, I_FLAGS, I_X0, I_XN, I_E, I_COLS };
enum { F_CAUSAL = 1, F_FIRST = 2 };

typedef struct {
    const char *q, *k, *v;
    float *out, *lse;
    /* Batch-heads are z = x * Y + y; per tensor the strides of x, y and rows, in elements. */
    int64_t Y;
    int64_t qx, qy, qr, kx, ky, kr, vx, vy, vr, ox, oy, orow, lx, ly, lr;
    int64_t D;
    float c; /* scale * log2(e): scores are kept in base 2 */
    const int64_t *items;
    int64_t n_items;
    const int64_t *extras; /* (a, b) pairs */
    const int64_t *masks;  /* addresses of uint16 bit masks: [ceil(rows / 16)][E + span] */
} Problem;

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_AVX512 1
#define T512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define TBF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

/* 2^x for x <= 128: Cody-Waite split x = n + f (|f| <= 1/2), a degree-7 polynomial for 2^f,
 * then vscalefps. Inputs below -160 give exactly 0; NaN stays NaN. */
static inline T512 __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-160.0f), x); /* (NaN in the second operand is returned) */
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5252734e-05f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline int64_t z_off(const Problem *P, int64_t z, int64_t sx, int64_t sy) {
    return (z / P->Y) * sx + (z % P->Y) * sy;
}

/* The position of key j of an item: gathered ranges first, then k0 + [0, span). */
static inline int64_t key_pos(const Problem *P, const int64_t *it, int64_t j) {
    int64_t E = it[I_E];
    if (j >= E) return it[I_K0] + (j - E);
    const int64_t *x = P->extras + 2 * it[I_X0];
    for (int64_t i = 0; i < it[I_XN]; i++) {
        int64_t n = x[2 * i + 1] - x[2 * i];
        if (j < n) return x[2 * i] + j;
        j -= n;
    }
    return -1; /* unreachable for a well-formed table */
}

#define BATCH 4 /* live 16-key pieces per softmax step: the accumulator is rescaled once per step */

/* Work buffers of one call (64-byte aligned). Pieces are item-relative: piece p holds keys
 * [16 p, 16 p + 16) of the item's E + span keys. */
typedef struct {
    float *qt;       /* [D][GROUP] fp32, or [D/2][GROUP] bf16 pairs (uint32) */
    float *acc;      /* [D][GROUP]: the group's output, transposed */
    uint32_t *pp;    /* [BATCH * 8][GROUP] bf16 pairs of probabilities */
    char *kbuf;      /* [pieces][16][D] keys in the input dtype, copied on first use in an item */
    char *vbuf;      /* [pieces][16][D] fp32 values, or [pieces][8][D] bf16 pairs of values */
    uint8_t *packed; /* [pieces]: bit 0 keys copied, bit 1 values copied (reset per item) */
    int32_t *live;   /* [pieces]: the live pieces of the current group */
    float s[BATCH * 16 * GROUP] __attribute__((aligned(64)));
} Work;

/* The 16-row mask bits of key j for group g of an item (bit r: row 16 g + r may attend). */
static inline uint16_t item_bits(const Problem *P, const int64_t *it, int64_t g, int64_t j, uint16_t valid) {
    int64_t mi = it[I_MASK];
    if (mi >= 0) {
        const uint16_t *mb = (const uint16_t *)(intptr_t)P->masks[mi];
        int64_t N = it[I_E] + it[I_SPAN];
        return mb[g * N + j] & valid;
    }
    if (it[I_FLAGS] & F_CAUSAL) { /* row r sees key j when j <= r (top-left; no gathered keys) */
        int64_t lo = j - g * GROUP; /* the first lane that sees j */
        if (lo <= 0) return valid;
        if (lo >= GROUP) return 0;
        return (uint16_t)(valid & (uint16_t)(0xFFFFu << lo));
    }
    return valid;
}

/* Pieces: the item's gathered keys [0, E) in pieces of 16 (the last one narrow), then the span's
 * keys [E, N) in pieces of 16 from E, so that a 4-key sink costs a 4-key piece. */
static inline int64_t piece_count(const int64_t *it) {
    return (it[I_E] + 15) / 16 + (it[I_SPAN] + 15) / 16;
}

static inline void piece_keys(const int64_t *it, int64_t p, int64_t *j0, int64_t *nj) {
    const int64_t E = it[I_E], pe = (E + 15) / 16, N = E + it[I_SPAN];
    *j0 = p < pe ? 16 * p : E + 16 * (p - pe);
    int64_t end = p < pe ? E : N;
    *nj = end - *j0 < 16 ? end - *j0 : 16;
}

/* The pieces group g must visit, in key order: those with a mask bit for its rows, the causal
 * triangle's pieces 0..g, or all. Returns their count. */
static inline int64_t live_pieces(const Problem *P, const int64_t *it, int64_t g, uint16_t valid, int32_t *live) {
    const int64_t np = piece_count(it), mi = it[I_MASK];
    int64_t n = 0;
    if (mi >= 0) {
        const int64_t N = it[I_E] + it[I_SPAN];
        const uint16_t *mb = (const uint16_t *)(intptr_t)P->masks[mi] + g * N;
        for (int64_t p = 0; p < np; p++) {
            int64_t j0, nj;
            piece_keys(it, p, &j0, &nj);
            uint16_t any = 0;
            for (int64_t j = 0; j < nj; j++) any |= mb[j0 + j];
            if (any & valid) live[n++] = (int32_t)p;
        }
        return n;
    }
    int64_t last = (it[I_FLAGS] & F_CAUSAL) && g < np - 1 ? g : np - 1;
    for (int64_t p = 0; p <= last; p++) live[n++] = (int32_t)p;
    return n;
}

/* r[16] <- its transpose: r[j] lane i = old r[i] lane j (32-bit elements; 64 shuffles). */
static inline T512 void transpose16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 4; i++) { /* 4x4 transposes inside each 128-bit lane, rows 4i..4i+3 */
        __m512 a = _mm512_unpacklo_ps(r[4 * i], r[4 * i + 1]), b = _mm512_unpackhi_ps(r[4 * i], r[4 * i + 1]);
        __m512 c = _mm512_unpacklo_ps(r[4 * i + 2], r[4 * i + 3]), d = _mm512_unpackhi_ps(r[4 * i + 2], r[4 * i + 3]);
        t[4 * i] = _mm512_shuffle_ps(a, c, _MM_SHUFFLE(1, 0, 1, 0));
        t[4 * i + 1] = _mm512_shuffle_ps(a, c, _MM_SHUFFLE(3, 2, 3, 2));
        t[4 * i + 2] = _mm512_shuffle_ps(b, d, _MM_SHUFFLE(1, 0, 1, 0));
        t[4 * i + 3] = _mm512_shuffle_ps(b, d, _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; c++) { /* then the 4x4 transpose of 128-bit lanes */
        __m512 x = _mm512_shuffle_f32x4(t[c], t[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 y = _mm512_shuffle_f32x4(t[c], t[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
        __m512 x2 = _mm512_shuffle_f32x4(t[8 + c], t[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
        __m512 y2 = _mm512_shuffle_f32x4(t[8 + c], t[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
        r[c] = _mm512_shuffle_f32x4(x, x2, _MM_SHUFFLE(2, 0, 2, 0));
        r[4 + c] = _mm512_shuffle_f32x4(x, x2, _MM_SHUFFLE(3, 1, 3, 1));
        r[8 + c] = _mm512_shuffle_f32x4(y, y2, _MM_SHUFFLE(2, 0, 2, 0));
        r[12 + c] = _mm512_shuffle_f32x4(y, y2, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

/* dst[c][r] = rows[r][c] for c < cols (a multiple of 16), r < 16: the group's queries with lanes
 * as rows, as 32-bit elements (floats, or pairs of bf16); rows past nr are zeros. */
static inline T512 void rows_to_lanes(const char *base, int64_t row_bytes, int64_t nr, int64_t cols, float *dst) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        __m512 r[16];
        for (int64_t i = 0; i < 16; i++)
            r[i] = i < nr ? _mm512_loadu_ps((const float *)(base + i * row_bytes) + c0) : _mm512_setzero_ps();
        transpose16(r);
        for (int j = 0; j < 16; j++) _mm512_store_ps(dst + (c0 + j) * GROUP, r[j]);
    }
}

/* Row state in: a first item starts empty; a later one continues from the stored (out, lse):
 * running max lse (base 2), sum 1, accumulator the stored output (exactly the online softmax
 * after the earlier keys). Rows with lse -inf hold nothing yet. */
static inline T512 void load_state(const Problem *P, const int64_t *it, const float *out, const float *lse,
                                   int64_t r0, int64_t nr, __m512 *m, __m512 *l, float *acc) {
    const int64_t D = P->D;
    float mv[GROUP], lv[GROUP];
    int any = 0;
    for (int64_t r = 0; r < GROUP; r++) {
        float l0 = (it[I_FLAGS] & F_FIRST) || r >= nr ? -INFINITY : lse[(it[I_R0] + r0 + r) * P->lr];
        mv[r] = l0 == -INFINITY ? -INFINITY : l0 * 1.4426950408889634f;
        lv[r] = l0 == -INFINITY ? 0.0f : 1.0f;
        any |= l0 != -INFINITY;
    }
    *m = _mm512_loadu_ps(mv);
    *l = _mm512_loadu_ps(lv);
    if (!any) {
        for (int64_t d = 0; d < D; d++) _mm512_store_ps(acc + d * GROUP, _mm512_setzero_ps());
        return;
    }
    /* the stored rows, transposed into the lanes (a row that holds nothing yet stores zeros) */
    rows_to_lanes((const char *)(out + (it[I_R0] + r0) * P->orow), P->orow * 4, nr, D, acc);
}

/* Row state out: out = acc / l, lse = (m + log2 l) ln 2; rows with no key: zeros and -inf. */
static inline T512 void store_state(const Problem *P, const int64_t *it, float *out, float *lse, int64_t r0,
                                    int64_t nr, __m512 m, __m512 l, const float *acc) {
    const int64_t D = P->D;
    float mv[GROUP], lv[GROUP];
    _mm512_storeu_ps(mv, m);
    _mm512_storeu_ps(lv, l);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(acc + (d0 + i) * GROUP);
        transpose16(r); /* r[row] = that row's output, columns d0 .. d0 + 15 */
        for (int64_t i = 0; i < nr; i++) {
            float *o = out + (it[I_R0] + r0 + i) * P->orow + d0;
            __m512 inv = _mm512_set1_ps(lv[i] > 0.0f ? 1.0f / lv[i] : 0.0f);
            _mm512_storeu_ps(o, _mm512_mul_ps(r[i], inv));
        }
    }
    for (int64_t i = 0; i < nr; i++)
        lse[(it[I_R0] + r0 + i) * P->lr] = lv[i] > 0.0f ? (mv[i] + log2f(lv[i])) * 0.6931471805599453f : -INFINITY;
}

/* One softmax step over the masked base-2 scores of nb pieces (s: [nb][16][GROUP]; piece b's keys
 * in its first nj[b] slots, an odd count followed by one masked slot): updates m and l, turns those
 * scores into probabilities in place and rescales the accumulator. 0 when no lane has a key yet.
 * Only the keys a piece has are visited, so a 4-key sink costs 4 keys, not 16. */
static inline T512 int softmax_step(__m512 *m, __m512 *l, float *acc, float *s, const int64_t *nj, int64_t nb,
                                    int64_t D) {
    const __m512 neg = _mm512_set1_ps(-INFINITY);
    __m512 mt = neg;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t j = 0; j < nj[b]; j++) mt = _mm512_max_ps(mt, _mm512_load_ps(s + (16 * b + j) * GROUP));
    __m512 mnew = _mm512_max_ps(*m, mt);
    __mmask16 has = _mm512_cmp_ps_mask(mnew, neg, _CMP_NEQ_OQ);
    if (!has) return 0;
    __m512 muse = _mm512_mask_blend_ps(has, _mm512_setzero_ps(), mnew); /* no (-inf) - (-inf) */
    __m512 alpha = exp2_ps(_mm512_sub_ps(*m, muse));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        for (int64_t j = 0; j < ((nj[b] + 1) & ~1); j++) { /* the masked slot after an odd count: exactly 0 */
            float *sj = s + (16 * b + j) * GROUP;
            __m512 p = exp2_ps(_mm512_sub_ps(_mm512_load_ps(sj), muse));
            sum = _mm512_add_ps(sum, p);
            _mm512_store_ps(sj, p);
        }
    *l = _mm512_fmadd_ps(*l, alpha, sum);
    *m = mnew;
    if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ))
        for (int64_t d = 0; d < D; d++)
            _mm512_store_ps(acc + d * GROUP, _mm512_mul_ps(_mm512_load_ps(acc + d * GROUP), alpha));
    return 1;
}

/* ---- fp32 --------------------------------------------------------------------------------- */

/* s[j] = sum_d qt[d][.] * kp[j][d] for the J keys of a piece (key j's row at kp + j * ks, ks >= D;
 * J = 16, or 8 or 4 for a narrow one). */
static inline __attribute__((always_inline)) T512 void qk_f32(const float *qt, const float *kp, int64_t D, int64_t ks,
                                                               __m512 *s, const int J) {
    __m512 a[16];
    for (int j = 0; j < J; j++) a[j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m512 qv = _mm512_load_ps(qt + d * GROUP);
        const float *kd = kp + d;
        for (int j = 0; j < J; j++) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(kd[j * ks]), qv, a[j]);
    }
    for (int j = 0; j < J; j++) s[j] = a[j];
}

/* acc[d][.] += sum over the step's pieces' keys t of p[t][.] * v[t][d] (value t's row at vp[b] + t * vs[b]). */
static inline T512 void pv_f32(const float *p, const float *const *vp, const int64_t *vs, const int64_t *nj, int64_t nb,
                               int64_t D, float *acc) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 a[16];
        for (int i = 0; i < 16; i++) a[i] = _mm512_load_ps(acc + (d0 + i) * GROUP);
        for (int64_t b = 0; b < nb; b++)
            for (int64_t t = 0; t < nj[b]; t++) {
                __m512 pt = _mm512_load_ps(p + (16 * b + t) * GROUP);
                const float *vt = vp[b] + t * vs[b] + d0;
                for (int i = 0; i < 16; i++) a[i] = _mm512_fmadd_ps(pt, _mm512_set1_ps(vt[i]), a[i]);
            }
        for (int i = 0; i < 16; i++) _mm512_store_ps(acc + (d0 + i) * GROUP, a[i]);
    }
}

/* ---- bf16 --------------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) TBF16 void qk_bf16(const uint32_t *qt, const uint16_t *kp, int64_t D,
                                                                  int64_t ks, __m512 *s, const int J) {
    __m512 a[16];
    for (int j = 0; j < J; j++) a[j] = _mm512_setzero_ps();
    for (int64_t d2 = 0; d2 < D / 2; d2++) {
        __m512bh qv = (__m512bh)_mm512_load_si512((const void *)(qt + d2 * GROUP));
        const uint16_t *kd = kp + 2 * d2;
        for (int j = 0; j < J; j++) {
            uint32_t pair;
            memcpy(&pair, kd + j * ks, 4);
            a[j] = _mm512_dpbf16_ps(a[j], qv, (__m512bh)_mm512_set1_epi32((int)pair));
        }
    }
    for (int j = 0; j < J; j++) s[j] = a[j];
}

/* dst[d] = (a[d], b[d]): two bf16 rows as pairs (a NULL row is zeros), the operand of a dot product
 * over the two (pairs of keys for P @ V and dQ, pairs of rows for dK and dV). */
static inline T512 void pair_two(const uint16_t *a, const uint16_t *b, int64_t D, uint32_t *dst) {
    for (int64_t d = 0; d < D; d += 16) {
        __m512i x = a ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + d))) : _mm512_setzero_si512();
        __m512i y = b ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + d))) : _mm512_setzero_si512();
        _mm512_storeu_si512((void *)(dst + d), _mm512_or_si512(x, _mm512_slli_epi32(y, 16)));
    }
}

/* bf16 pairs of probabilities: lane r of pair t2 holds (p[2 t2][r], p[2 t2 + 1][r]). */
static inline TBF16 void pack_probs(const float *p, int64_t nt2, uint32_t *pp) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t t2 = 0; t2 < nt2; t2++) {
        __m512bh both = _mm512_cvtne2ps_pbh(_mm512_load_ps(p + (2 * t2 + 1) * GROUP), _mm512_load_ps(p + 2 * t2 * GROUP));
        _mm512_store_si512((void *)(pp + t2 * GROUP), _mm512_permutexvar_epi16(idx, (__m512i)both));
    }
}

/* acc[d][.] += sum over pairs of keys of (p, p') . (v[d], v'[d]) (vp: per piece [8][D] pairs). */
static inline TBF16 void pv_bf16(const uint32_t *pp, const uint32_t *const *vp, const int64_t *nj, int64_t nb,
                                 int64_t D, float *acc) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 a[16];
        for (int i = 0; i < 16; i++) a[i] = _mm512_load_ps(acc + (d0 + i) * GROUP);
        for (int64_t b = 0; b < nb; b++)
            for (int64_t t2 = 0; t2 < (nj[b] + 1) / 2; t2++) {
                __m512bh pt = (__m512bh)_mm512_load_si512((const void *)(pp + (8 * b + t2) * GROUP));
                const uint32_t *vt = vp[b] + t2 * D + d0;
                for (int i = 0; i < 16; i++)
                    a[i] = _mm512_dpbf16_ps(a[i], pt, (__m512bh)_mm512_set1_epi32((int)vt[i]));
            }
        for (int i = 0; i < 16; i++) _mm512_store_ps(acc + (d0 + i) * GROUP, a[i]);
    }
}

/* ---- one item, for each dtype ------------------------------------------------------------- */

#define ITEM_BF16 0
#include "attend_item.h"
#undef ITEM_BF16
#define ITEM_BF16 1
#include "attend_item.h"
#undef ITEM_BF16

/* ---- backward (float32 and bfloat16) ---------------------------------------------------------- */

/* The FlashAttention backward over the same item table, float32 or bfloat16 inputs: per group of
 * 16 rows and live piece of keys,
 *   P = exp2(S c - lse2), dP = dO V^T, dS = P (dP - delta),
 *   dQ += dS K (lanes are rows), dK += dS^T Q, dV += P^T dO (per key, over the lanes).
 * dK / dV of an item collect in per-item buffers and are added to the gradients at the end of
 * the item, so every sum has a fixed order. Rows of one z are one thread's; the caller keeps the
 * z that share a key head (GQA) on one thread. Gradients are float32 whatever the inputs.
 * bf16 inputs: all five products are AVX512-BF16 dot products of pairs, fp32-accumulated; S and dP
 * are exact sums of bf16 products, and P and dS are rounded to bf16 for the three gradient
 * products (as FlashAttention's bf16 backward does on GPUs). */
typedef struct {
    const char *q, *k, *v, *dout; /* float32, or bfloat16 when bf16 */
    const float *lse, *out, *dlse; /* dlse NULL: no gradient into lse */
    float *dq, *dk, *dv;
    int bf16;
    int64_t s[9][3]; /* x, y, row strides of q, k, v, dout, lse, out, dq, dk, dv */
    int64_t sdl[3];  /* of dlse */
    int64_t Y, D;
    float c, scale;
    const int64_t *items, *extras, *masks;
    int64_t n_items;
} Bwd;

enum { B_Q, B_K, B_V, B_DO, B_LSE, B_O, B_DQ, B_DK, B_DV };

static inline int64_t bz(const Bwd *B, int which, int64_t z) {
    return (z / B->Y) * B->s[which][0] + (z % B->Y) * B->s[which][1];
}

/* dst[t][d] += sum over the n groups i, rows r of w_i[t][r] * rows_i[r][d], for the J keys of a
 * piece (w_i: [16][GROUP] P or dS of group i; rows_i: [16][D] its Q or dO rows). The piece's
 * accumulators are loaded and stored once for all the groups. */
static inline __attribute__((always_inline)) T512 void outer_add_f32(const float *const *wt, const float *const *rowsv,
                                                                      int n, int64_t D, float *dst, const int J) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 a[16];
        for (int t = 0; t < J; t++) a[t] = _mm512_load_ps(dst + t * D + d0);
        for (int i = 0; i < n; i++)
            for (int r = 0; r < GROUP; r++) {
                __m512 x = _mm512_load_ps(rowsv[i] + r * D + d0);
                for (int t = 0; t < J; t++) a[t] = _mm512_fmadd_ps(_mm512_set1_ps(wt[i][t * GROUP + r]), x, a[t]);
            }
        for (int t = 0; t < J; t++) _mm512_store_ps(dst + t * D + d0, a[t]);
    }
}

/* dst[i][d] = (a[d], b[d]) for the row pairs (2i, 2i + 1) of n bf16 rows at base + r * rs
 * (rows past n are zeros): the operand layout of dot products that run over pairs of rows. */
static inline T512 void pair_rows(const uint16_t *base, int64_t rs, int64_t n, int64_t D, uint32_t *dst) {
    for (int64_t i = 0; i < 8; i++)
        pair_two(2 * i < n ? base + 2 * i * rs : NULL, 2 * i + 1 < n ? base + (2 * i + 1) * rs : NULL, D, dst + i * D);
}

/* The bf16 outer_add: dst[t][d] += sum over groups i, row pairs r2 of w_i[t][r2] . pairs_i[r2][d]
 * (w_i: [16][8] P or dS of group i as bf16 pairs of rows; pairs_i: [8][D] its Q or dO row pairs). */
static inline __attribute__((always_inline)) TBF16 void outer_add_bf16(const uint32_t *const *wt,
                                                                        const uint32_t *const *pairs, int n, int64_t D,
                                                                        float *dst, const int J) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 a[16];
        for (int t = 0; t < J; t++) a[t] = _mm512_load_ps(dst + t * D + d0);
        for (int i = 0; i < n; i++)
            for (int r2 = 0; r2 < 8; r2++) {
                __m512bh x = (__m512bh)_mm512_loadu_si512((const void *)(pairs[i] + r2 * D + d0));
                for (int t = 0; t < J; t++)
                    a[t] = _mm512_dpbf16_ps(a[t], x, (__m512bh)_mm512_set1_epi32((int)wt[i][t * 8 + r2]));
            }
        for (int t = 0; t < J; t++) _mm512_store_ps(dst + t * D + d0, a[t]);
    }
}

#define ROWBLOCK 4 /* groups of rows whose dK / dV of a piece are summed in one visit */

typedef struct {
    /* per group of a row block: [ROWBLOCK][D][GROUP] lanes (fp32, or bf16 pairs along d) of Q, dO,
     * dQ^T; [ROWBLOCK][16][D] Q and dO rows as the gradient products' operand (fp32 rows, or
     * [8][D] bf16 pairs of rows) */
    float *qt, *dot, *dqt, *qrows, *dorows;
    float *kbuf, *vbuf, *dkbuf, *dvbuf; /* [pieces][16][D]: copied keys / values, dK / dV of the item */
    uint32_t *kpairs; /* bf16: [pieces][8][D] pairs of keys (dQ's dot products run over pairs of keys) */
    uint8_t *packed;  /* [pieces]: first visit done in this item */
    uint8_t *mark;    /* [pieces]: bit i, live for group i of the row block */
    int32_t *live;    /* [pieces] */
    float p[ROWBLOCK * 16 * GROUP] __attribute__((aligned(64)));          /* fp32: P of the piece, per group */
    float ds[ROWBLOCK * BATCH * 16 * GROUP] __attribute__((aligned(64))); /* dS per group and batch piece */
    uint32_t prow[ROWBLOCK * 16 * 8] __attribute__((aligned(64)));  /* bf16: P[t] as pairs of rows, per group */
    uint32_t dsrow[ROWBLOCK * 16 * 8] __attribute__((aligned(64))); /* bf16: dS[t] as pairs of rows */
    uint32_t dspp[ROWBLOCK * BATCH * 8 * GROUP] __attribute__((aligned(64))); /* bf16: dS as pairs of keys */
} BWork;

/* An item's dK (times scale) and dV into the gradients, piece by piece in key order. */
static inline T512 void flush_piece_grads(const Bwd *B, const Problem *P, const int64_t *it, int64_t np,
                                          const BWork *w, float *dk, float *dv) {
    const int64_t D = B->D;
    const __m512 sc = _mm512_set1_ps(B->scale);
    for (int64_t p = 0; p < np; p++) {
        if (!w->packed[p]) continue;
        int64_t j0, nj;
        piece_keys(it, p, &j0, &nj);
        for (int64_t j = 0; j < nj; j++) {
            int64_t pos = key_pos(P, it, j0 + j);
            float *a = dk + pos * B->s[B_DK][2], *b = dv + pos * B->s[B_DV][2];
            const float *x = w->dkbuf + (p * 16 + j) * D, *y = w->dvbuf + (p * 16 + j) * D;
            for (int64_t d0 = 0; d0 < D; d0 += 16) {
                _mm512_storeu_ps(a + d0, _mm512_fmadd_ps(_mm512_load_ps(x + d0), sc, _mm512_loadu_ps(a + d0)));
                _mm512_storeu_ps(b + d0, _mm512_add_ps(_mm512_load_ps(y + d0), _mm512_loadu_ps(b + d0)));
            }
        }
    }
}

/* delta[r] = rowsum(dO[r] * O[r]) - dlse[r] for the nr rows of a group from row row0 (0 past nr):
 * the FlashAttention backward's row term, with the gradient into lse folded in. */
static inline T512 void group_delta(const Bwd *B, int64_t z, int64_t row0, int64_t nr, float *dl) {
    const int64_t D = B->D, dr = B->s[B_DO][2], orow = B->s[B_O][2];
    const float *o = B->out + bz(B, B_O, z);
    for (int64_t r = 0; r < GROUP; r++) {
        if (r >= nr) {
            dl[r] = 0.0f;
            continue;
        }
        __m512 acc = _mm512_setzero_ps();
        const float *orw = o + (row0 + r) * orow;
        for (int64_t d = 0; d < D; d += 16) {
            __m512 x;
            if (B->bf16) {
                const uint16_t *g = (const uint16_t *)B->dout + bz(B, B_DO, z) + (row0 + r) * dr + d;
                x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)g)), 16));
            } else {
                x = _mm512_loadu_ps((const float *)B->dout + bz(B, B_DO, z) + (row0 + r) * dr + d);
            }
            acc = _mm512_fmadd_ps(x, _mm512_loadu_ps(orw + d), acc);
        }
        float t = _mm512_reduce_add_ps(acc);
        if (B->dlse) {
            const float *g = B->dlse + (z / B->Y) * B->sdl[0] + (z % B->Y) * B->sdl[1];
            t -= g[(row0 + r) * B->sdl[2]];
        }
        dl[r] = t;
    }
}

#define BWD_BF16 0
#define OUTER_ADD outer_add_f32
#include "attend_bwd_item.h"
#undef OUTER_ADD
#undef BWD_BF16
#define BWD_BF16 1
#define OUTER_ADD outer_add_bf16
#include "attend_bwd_item.h"
#undef OUTER_ADD
#undef BWD_BF16

static int cpu_probe(int bf16) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    /* the OS must save the zmm and opmask state (XCR0 bits 1, 2, 5, 6, 7) */
    unsigned lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xE6) != 0xE6) return 0;
    if (!(f && dq && bw && vl)) return 0;
    if (!bf16) return 1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    return (a >> 5) & 1; /* AVX512_BF16 */
}

/* The probe once per process: CPUID traps to the hypervisor on virtual machines (measured 22 us a
 * call on the project's machine), and every engine call asks. Threads racing here store the same
 * value. */
static int cpu_has(int bf16) {
    static int known[2] = {-1, -1};
    if (known[bf16 != 0] < 0) known[bf16 != 0] = cpu_probe(bf16);
    return known[bf16 != 0];
}
#else
#define HAVE_AVX512 0
static int cpu_has(int bf16) { (void)bf16; return 0; }
#endif

/* ---- Python interface --------------------------------------------------------------------- */

static PyObject *py_supports(PyObject *self, PyObject *args) {
    int bf16;
    if (!PyArg_ParseTuple(args, "p", &bf16)) return NULL;
    return PyBool_FromLong(cpu_has(bf16));
}

/* ---- jobs: the kernel's calls, run on the caller's OpenMP team ----------------------------------
 *
 * A job is one item table over a range of batch-heads: an int64 row [kind, params, n_items, z0, z1]
 * (kind 0 the forward, 1 the backward; params an int64 array, below). jobs() runs a list of them,
 * the GIL released, on n threads: each thread takes the next job from a shared counter until none
 * is left (the caller sorts them costliest first). A job's bits do not depend on which thread ran
 * it or on n: jobs write disjoint outputs (the backward's jobs hold whole x ranges, so the dK / dV
 * sums of a shared key head have one order).
 *
 * The threads are torch's own OpenMP team: GOMP_parallel taken from the OpenMP runtime torch's
 * libtorch_cpu is linked to (use_openmp(path of libtorch_cpu) looks it up among that library's
 * dependencies; engines/fused.py passes the path), always with the calling thread's default team
 * size, the team torch's own parallel ops use (a smaller team would make libgomp end the surplus
 * threads and torch's next op create them again). Why not threads of our own: after every parallel
 * torch op the team's threads spin for a while waiting for the next region, and a kernel running on
 * other threads competed with them for the cores (measured: nine per-head masks at L = 1024,
 * 6.6 ms after SDPA calls on Python worker threads, 4.7 ms with OMP_WAIT_POLICY=PASSIVE, 3.2 ms on
 * the team). Without the runtime, the caller runs jobs(..., 0) on threads of its own sharing one
 * counter. */

/* Forward params (32 int64): q, k, v, out, lse pointers; 15 strides (x, y, row of q, k, v, out,
 * lse); Y, D, items, extras, masks; c (= scale * log2 e) as a float64 bit pattern; bf16; then
 * out16, a bfloat16 output (0: none; out is then a float32 scratch of one z's rows made here), its
 * 3 strides, the rows per z, and whether rows no item writes are zeros (the scratch is zeroed). */
enum { FA_Y = 20, FA_D, FA_ITEMS, FA_EXTRAS, FA_MASKS, FA_C, FA_BF16, FA_OUT16, FA_O16S = 28, FA_ROWS = 31,
       FA_ZERO, FA_COUNT };
/* Backward params (48 int64): 9 pointers (q, k, v, dout, lse, out, dq, dk, dv), 27 strides, Y, D,
 * items, extras, masks, c and scale as float64 bit patterns, whether q, k, v and dout are bfloat16,
 * then dlse's pointer (0: none) and 3 strides. */
enum { BA_Y = 36, BA_D, BA_ITEMS, BA_EXTRAS, BA_MASKS, BA_C, BA_SCALE, BA_BF16, BA_DLSE, BA_COUNT = 48 };
enum { J_KIND, J_PARAMS, J_ITEMS, J_Z0, J_Z1, J_COLS };

static double f64_at(const int64_t *a, int i) {
    double x;
    memcpy(&x, a + i, 8);
    return x;
}

static int64_t max_pieces(const int64_t *items, int64_t n_items) {
    int64_t np = 1;
    for (int64_t i = 0; i < n_items; i++) {
        int64_t n = piece_count(items + i * I_COLS);
        if (n > np) np = n;
    }
    return np;
}

/* Whether job j can run here; else a Python exception is set (the GIL is held). */
static int check_job(const int64_t *job) {
    const int64_t *a = (const int64_t *)(intptr_t)job[J_PARAMS];
    if (job[J_KIND] != 0 && job[J_KIND] != 1) {
        PyErr_Format(PyExc_ValueError, "job kind must be 0 (forward) or 1 (backward), got %lld", (long long)job[J_KIND]);
        return 0;
    }
    if (!a) {
        PyErr_SetString(PyExc_ValueError, "a job needs its params");
        return 0;
    }
    int bwd = job[J_KIND] == 1;
    int64_t Y = a[bwd ? BA_Y : FA_Y], D = a[bwd ? BA_D : FA_D];
    int bf16 = a[bwd ? BA_BF16 : FA_BF16] != 0;
    if (Y < 1) {
        PyErr_SetString(PyExc_ValueError, "Y must be >= 1");
        return 0;
    }
    if (D <= 0 || D > MAX_D || D % 16) {
        PyErr_Format(PyExc_ValueError, "head dim must be a multiple of 16 up to %d, got %lld", MAX_D, (long long)D);
        return 0;
    }
    if (job[J_Z0] < 0 || job[J_Z1] < job[J_Z0] || (bwd && (job[J_Z0] % Y || job[J_Z1] % Y))) {
        PyErr_SetString(PyExc_ValueError, "a job's batch-heads must be a range (whole x ranges for the backward)");
        return 0;
    }
    if (!cpu_has(bf16)) {
        PyErr_SetString(PyExc_RuntimeError, bf16 ? "this CPU has no AVX512-BF16" : "this CPU has no AVX-512");
        return 0;
    }
    if (!bwd && a[FA_OUT16] && (!bf16 || a[FA_ROWS] < 0)) {
        PyErr_SetString(PyExc_ValueError, "a bfloat16 output needs bfloat16 inputs and rows >= 0");
        return 0;
    }
    return 1;
}

#if HAVE_AVX512
/* dst rows (stride ds) = src [rows][D] float32 rounded to bfloat16 to nearest even, by the integer
 * rule of torch's own conversion (denormals kept, where VCVTNEPS2BF16 would flush them; NaN
 * becomes 0x7FC0). */
static T512 void round_rows(const float *src, int64_t rows, int64_t D, uint16_t *dst, int64_t ds) {
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF), nan = _mm512_set1_epi32(0x7FC0);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < D; d += 16) {
            __m512 x = _mm512_loadu_ps(src + r * D + d);
            __m512i u = _mm512_castps_si512(x);
            __m512i t = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
            t = _mm512_mask_mov_epi32(_mm512_srli_epi32(t, 16), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), nan);
            _mm256_storeu_si256((__m256i *)(dst + r * ds + d), _mm512_cvtepi32_epi16(t));
        }
}

/* One forward job; 0 if its work buffers could not be allocated. */
static int forward_job(const int64_t *a, int64_t n_items, int64_t z0, int64_t z1) {
    Problem P;
    P.q = (const char *)(intptr_t)a[0];
    P.k = (const char *)(intptr_t)a[1];
    P.v = (const char *)(intptr_t)a[2];
    P.out = (float *)(intptr_t)a[3];
    P.lse = (float *)(intptr_t)a[4];
    const int64_t *s = a + 5;
    P.qx = s[0], P.qy = s[1], P.qr = s[2], P.kx = s[3], P.ky = s[4], P.kr = s[5], P.vx = s[6], P.vy = s[7];
    P.vr = s[8], P.ox = s[9], P.oy = s[10], P.orow = s[11], P.lx = s[12], P.ly = s[13], P.lr = s[14];
    P.Y = a[FA_Y];
    P.D = a[FA_D];
    P.items = (const int64_t *)(intptr_t)a[FA_ITEMS];
    P.extras = (const int64_t *)(intptr_t)a[FA_EXTRAS];
    P.masks = (const int64_t *)(intptr_t)a[FA_MASKS];
    P.c = (float)f64_at(a, FA_C);
    P.n_items = n_items;
    const int bf16 = a[FA_BF16] != 0;
    const int64_t D = P.D, np = max_pieces(P.items, n_items);
    /* A bf16 output: the items run on a float32 scratch of one z's rows (the online softmax keeps
     * its state there between items), rounded into out16 once the z is done. */
    uint16_t *out16 = (uint16_t *)(intptr_t)a[FA_OUT16];
    const int64_t rows = out16 ? a[FA_ROWS] : 0;
    Work w;
    size_t sq = MAX_D * GROUP * 4, sacc = MAX_D * GROUP * 4, spp = BATCH * 8 * GROUP * 4;
    size_t sk = (size_t)np * 16 * D * 4, sv = (size_t)np * 16 * D * 4, spk = ((size_t)np + 63) & ~(size_t)63;
    size_t sl = ((size_t)np * 4 + 63) & ~(size_t)63, so = ((size_t)rows * D * 4 + 63) & ~(size_t)63;
    char *mem = aligned_alloc(64, sq + sacc + spp + sk + sv + spk + sl + so);
    if (!mem) return 0;
    if (out16) {
        P.out = (float *)(mem + sq + sacc + spp + sk + sv + spk + sl);
        P.ox = P.oy = 0;
        P.orow = D;
        /* Rows no item writes are the same rows in every z (one item table): zeroed once, they stay
         * zeros. (Not caught by a mutant: fresh allocations of this size are mostly zero pages.) */
        if (a[FA_ZERO]) memset(P.out, 0, (size_t)rows * D * 4);
    }
    w.qt = (float *)mem;
    w.acc = (float *)(mem + sq);
    w.pp = (uint32_t *)(mem + sq + sacc);
    w.kbuf = mem + sq + sacc + spp;
    w.vbuf = mem + sq + sacc + spp + sk;
    w.packed = (uint8_t *)(mem + sq + sacc + spp + sk + sv);
    w.live = (int32_t *)(mem + sq + sacc + spp + sk + sv + spk);
    for (int64_t z = z0; z < z1; z++) {
        for (int64_t i = 0; i < n_items; i++) {
            const int64_t *it = P.items + i * I_COLS;
            if (bf16) run_item_bf16(&P, z, it, &w);
            else run_item_f32(&P, z, it, &w);
        }
        if (out16) round_rows(P.out, rows, D, out16 + z_off(&P, z, a[FA_O16S], a[FA_O16S + 1]), a[FA_O16S + 2]);
    }
    free(mem);
    return 1;
}

/* One backward job; 0 if its work buffers could not be allocated. */
static int backward_job(const int64_t *a, int64_t n_items, int64_t z0, int64_t z1) {
    Bwd B;
    B.Y = a[BA_Y];
    B.D = a[BA_D];
    B.bf16 = a[BA_BF16] != 0;
    B.q = (const char *)(intptr_t)a[0]; B.k = (const char *)(intptr_t)a[1]; B.v = (const char *)(intptr_t)a[2];
    B.dout = (const char *)(intptr_t)a[3]; B.lse = (const float *)(intptr_t)a[4];
    B.out = (const float *)(intptr_t)a[5];
    B.dlse = (const float *)(intptr_t)a[BA_DLSE];
    for (int j = 0; j < 3; j++) B.sdl[j] = a[BA_DLSE + 1 + j];
    B.dq = (float *)(intptr_t)a[6]; B.dk = (float *)(intptr_t)a[7]; B.dv = (float *)(intptr_t)a[8];
    for (int i = 0; i < 9; i++)
        for (int j = 0; j < 3; j++) B.s[i][j] = a[9 + 3 * i + j];
    B.items = (const int64_t *)(intptr_t)a[BA_ITEMS];
    B.extras = (const int64_t *)(intptr_t)a[BA_EXTRAS];
    B.masks = (const int64_t *)(intptr_t)a[BA_MASKS];
    B.c = (float)f64_at(a, BA_C);
    B.scale = (float)f64_at(a, BA_SCALE);
    B.n_items = n_items;
    const int64_t D = B.D, np = max_pieces(B.items, n_items);
    BWork w;
    size_t lane = (size_t)ROWBLOCK * D * GROUP * 4, piece = (size_t)np * 16 * D * 4;
    size_t spk = ((size_t)np + 63) & ~(size_t)63, sl = ((size_t)np * 4 + 63) & ~(size_t)63;
    char *mem = aligned_alloc(64, 5 * lane + 5 * piece + 2 * spk + sl);
    if (!mem) return 0;
    w.qt = (float *)mem; w.dot = (float *)(mem + lane); w.dqt = (float *)(mem + 2 * lane);
    w.qrows = (float *)(mem + 3 * lane); w.dorows = (float *)(mem + 4 * lane);
    w.kbuf = (float *)(mem + 5 * lane); w.vbuf = (float *)(mem + 5 * lane + piece);
    w.dkbuf = (float *)(mem + 5 * lane + 2 * piece); w.dvbuf = (float *)(mem + 5 * lane + 3 * piece);
    w.kpairs = (uint32_t *)(mem + 5 * lane + 4 * piece);
    w.packed = (uint8_t *)(mem + 5 * lane + 5 * piece);
    w.mark = (uint8_t *)(mem + 5 * lane + 5 * piece + spk);
    w.live = (int32_t *)(mem + 5 * lane + 5 * piece + 2 * spk);
    for (int64_t z = z0; z < z1; z++)
        for (int64_t i = 0; i < n_items; i++) {
            if (B.bf16) bwd_item_bf16(&B, z, B.items + i * I_COLS, &w);
            else bwd_item_f32(&B, z, B.items + i * I_COLS, &w);
        }
    free(mem);
    return 1;
}
#endif

typedef struct {
    const int64_t *jobs;
    const int64_t *starts; /* chain c is jobs [starts[c], starts[c + 1]) */
    int64_t n_chains;
    int64_t *next;         /* the shared counter: the next chain to take */
    int *failed;           /* set when a job's buffers could not be allocated */
    int (*team_size)(void); /* omp_get_num_threads of the runtime, or NULL (one thread) */
    int team;               /* the size of the team that ran the table */
} Drain;

static void drain(void *arg) {
    Drain *d = (Drain *)arg;
    if (d->team_size) __atomic_store_n(&d->team, d->team_size(), __ATOMIC_RELAXED);
#if HAVE_AVX512
    for (;;) {
        int64_t c = __atomic_fetch_add(d->next, 1, __ATOMIC_RELAXED);
        if (c >= d->n_chains) return;
        for (int64_t j = d->starts[c]; j < d->starts[c + 1]; j++) {
            const int64_t *job = d->jobs + j * J_COLS;
            const int64_t *a = (const int64_t *)(intptr_t)job[J_PARAMS];
            int ok = job[J_KIND] == 0 ? forward_job(a, job[J_ITEMS], job[J_Z0], job[J_Z1])
                                      : backward_job(a, job[J_ITEMS], job[J_Z0], job[J_Z1]);
            if (!ok) __atomic_store_n(d->failed, 1, __ATOMIC_RELAXED);
        }
    }
#else
    (void)d;
#endif
}

typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_t gomp_parallel = NULL;
static int (*omp_team_size)(void) = NULL;

/* use_openmp(path): take GOMP_parallel and omp_get_num_threads from the library at path or its
 * dependencies, if this process has already loaded it (RTLD_NOLOAD: never a second runtime).
 * Returns whether it did; else jobs() runs only on the calling thread. */
static PyObject *py_use_openmp(PyObject *self, PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    gomp_parallel_t p = h ? (gomp_parallel_t)dlsym(h, "GOMP_parallel") : NULL;
    int (*n)(void) = h ? (int (*)(void))dlsym(h, "omp_get_num_threads") : NULL;
    gomp_parallel = p && n ? p : NULL;
    omp_team_size = p && n ? n : NULL;
    return PyBool_FromLong(gomp_parallel != NULL);
}

/* jobs(jobs, starts, n_chains, counter, team) -> the number of threads that ran it: the job table
 * (see above) on the calling thread's OpenMP team (team true; its default size, as torch's own
 * parallel ops), or on this thread. Chain c is jobs [starts[c], starts[c + 1]), run in order by
 * one thread; threads take chains from the int64 at counter, which must start at 0 (threads of the
 * caller's own may share one counter, each calling with team false). */
static PyObject *py_jobs(PyObject *self, PyObject *args) {
    unsigned long long jp, sp, cp;
    long long n_chains;
    int team;
    if (!PyArg_ParseTuple(args, "KKLKp", &jp, &sp, &n_chains, &cp, &team)) return NULL;
    const int64_t *jobs = (const int64_t *)(uintptr_t)jp, *starts = (const int64_t *)(uintptr_t)sp;
    /* One read of the runtime (use_openmp may change it on another thread once the GIL is released). */
    gomp_parallel_t parallel = gomp_parallel;
    int (*team_size)(void) = omp_team_size;
    if (team && !parallel) {
        PyErr_SetString(PyExc_ValueError, "a team needs the OpenMP runtime (use_openmp found none)");
        return NULL;
    }
    if (n_chains < 0 || (n_chains && (!starts || starts[0] != 0))) {
        PyErr_SetString(PyExc_ValueError, "chains must start at job 0");
        return NULL;
    }
    if (!n_chains) return PyLong_FromLong(0);
    if (!cp) {
        PyErr_SetString(PyExc_ValueError, "jobs need a counter");
        return NULL;
    }
    for (int64_t c = 0; c < n_chains; c++)
        if (starts[c + 1] < starts[c]) {
            PyErr_SetString(PyExc_ValueError, "chain starts must not decrease");
            return NULL;
        }
    if (starts[n_chains] && !jobs) {
        PyErr_SetString(PyExc_ValueError, "chains of jobs need a job table");
        return NULL;
    }
    for (int64_t j = 0; j < starts[n_chains]; j++)
        if (!check_job(jobs + j * J_COLS)) return NULL;
    int failed = 0;
    Drain d = {jobs, starts, n_chains, (int64_t *)(uintptr_t)cp, &failed, team ? team_size : NULL, 1};
    Py_BEGIN_ALLOW_THREADS
    if (team) parallel(drain, &d, 0, 0);
    else drain(&d);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    return PyLong_FromLong(d.team);
}

static PyMethodDef methods[] = {
    {"jobs", py_jobs, METH_VARARGS, "Run a table of forward / backward jobs (see engines/fused.py)."},
    {"use_openmp", py_use_openmp, METH_VARARGS, "use_openmp(path): run jobs on that OpenMP runtime's team."},
    {"supports", py_supports, METH_VARARGS, "supports(bf16): whether this CPU can run the kernel."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_attend", "attnmask's fused CPU attention kernel.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__attend(void) {
    PyObject *m = PyModule_Create(&module);
    if (m) {
        PyModule_AddIntConstant(m, "COLUMNS", I_COLS);
        PyModule_AddIntConstant(m, "GROUP", GROUP);
        PyModule_AddIntConstant(m, "MAX_D", MAX_D);
        PyModule_AddIntConstant(m, "JOB_COLUMNS", J_COLS);
        PyModule_AddIntConstant(m, "FORWARD_PARAMS", FA_COUNT);
        PyModule_AddIntConstant(m, "BACKWARD_PARAMS", BA_COUNT);
    }
    return m;
}

/* One item of the item table, for one batch-head z: included twice by attend.c, with
 * ITEM_BF16 0 (float32 inputs) and 1 (bfloat16 inputs). Groups of 16 query rows run one after
 * another; each visits its live 16-key pieces, BATCH at a time: scores, one softmax step,
 * then P @ V. Keys and values of a piece are read in place (at any row stride) when they are
 * consecutive rows, else copied once per item into the work buffers (gathered keys, tails,
 * and bf16 values, which P @ V reads as pairs of keys). */
#if ITEM_BF16
#define ELEM uint16_t
#define ITEM_FN run_item_bf16
#define ITEM_TARGET TBF16
#else
#define ELEM float
#define ITEM_FN run_item_f32
#define ITEM_TARGET T512
#endif

static ITEM_TARGET void ITEM_FN(const Problem *P, int64_t z, const int64_t *it, Work *w) {
    const int64_t D = P->D, rows = it[I_ROWS], E = it[I_E];
    const int64_t np = piece_count(it);
    const ELEM *q = (const ELEM *)P->q + z_off(P, z, P->qx, P->qy);
    const ELEM *k = (const ELEM *)P->k + z_off(P, z, P->kx, P->ky);
    const ELEM *v = (const ELEM *)P->v + z_off(P, z, P->vx, P->vy);
    float *out = P->out + z_off(P, z, P->ox, P->oy);
    float *lse = P->lse + z_off(P, z, P->lx, P->ly);
    const __m512 c = _mm512_set1_ps(P->c), neg = _mm512_set1_ps(-INFINITY);
    ELEM *kbuf = (ELEM *)w->kbuf;
#if ITEM_BF16
    uint32_t *vbuf = (uint32_t *)w->vbuf;
#else
    float *vbuf = (float *)w->vbuf;
#endif
    memset(w->packed, 0, (size_t)np);
    for (int64_t g = 0; g * GROUP < rows; g++) {
        const int64_t r0 = g * GROUP, nr = rows - r0 < GROUP ? rows - r0 : GROUP;
        const uint16_t valid = (uint16_t)(nr >= 16 ? 0xFFFFu : (1u << nr) - 1);
        const int64_t nlive = live_pieces(P, it, g, valid, w->live);
        __m512 m, l;
        load_state(P, it, out, lse, r0, nr, &m, &l, w->acc);
        /* the group's queries, transposed: lanes are rows (as pairs of bf16 for bf16) */
        rows_to_lanes((const char *)(q + (it[I_R0] + r0) * P->qr), P->qr * (int64_t)sizeof(ELEM), nr,
                      D * (int64_t)sizeof(ELEM) / 4, w->qt);
        for (int64_t b0 = 0; b0 < nlive; b0 += BATCH) {
            const int64_t nb = nlive - b0 < BATCH ? nlive - b0 : BATCH;
            int64_t nj[BATCH];
#if ITEM_BF16
            const uint32_t *vp[BATCH];
#else
            const float *vp[BATCH];
            int64_t vs[BATCH]; /* the values' row stride per piece */
#endif
            for (int64_t b = 0; b < nb; b++) {
                const int64_t p = w->live[b0 + b];
                int64_t j0;
                piece_keys(it, p, &j0, &nj[b]);
                const int plain = j0 >= E; /* keys k0 + j0 - E + [0, nj): consecutive rows */
                const int64_t pos0 = plain ? it[I_K0] + j0 - E : -1;
                const ELEM *kp;
                int64_t ks = D; /* in place (any row stride) when the piece is 16 consecutive rows */
                if (plain && nj[b] == 16) {
                    kp = k + pos0 * P->kr;
                    ks = P->kr;
                } else {
                    ELEM *dst = kbuf + p * 16 * D;
                    if (!(w->packed[p] & 1)) {
                        for (int64_t j = 0; j < 16; j++) {
                            if (j < nj[b]) memcpy(dst + j * D, k + key_pos(P, it, j0 + j) * P->kr, D * sizeof(ELEM));
                            else memset(dst + j * D, 0, D * sizeof(ELEM));
                        }
                        w->packed[p] |= 1;
                    }
                    kp = dst;
                }
#if ITEM_BF16
                uint32_t *dst = vbuf + p * 8 * D;
                if (!(w->packed[p] & 2)) {
                    for (int64_t t2 = 0; t2 < 8; t2++) {
                        const int64_t a = 2 * t2, b1 = 2 * t2 + 1;
                        const uint16_t *v0 = a < nj[b] ? v + key_pos(P, it, j0 + a) * P->vr : NULL;
                        const uint16_t *v1 = b1 < nj[b] ? v + key_pos(P, it, j0 + b1) * P->vr : NULL;
                        pair_two(v0, v1, D, dst + t2 * D);
                    }
                    w->packed[p] |= 2;
                }
                vp[b] = dst;
                __m512 sv[16];
                if (nj[b] > 8) qk_bf16((const uint32_t *)w->qt, kp, D, ks, sv, 16);
                else if (nj[b] > 4) qk_bf16((const uint32_t *)w->qt, kp, D, ks, sv, 8);
                else qk_bf16((const uint32_t *)w->qt, kp, D, ks, sv, 4);
#else
                vs[b] = D;
                if (plain) {
                    vp[b] = v + pos0 * P->vr;
                    vs[b] = P->vr;
                } else {
                    float *dst = vbuf + p * 16 * D;
                    if (!(w->packed[p] & 2)) {
                        for (int64_t j = 0; j < nj[b]; j++)
                            memcpy(dst + j * D, v + key_pos(P, it, j0 + j) * P->vr, D * sizeof(float));
                        w->packed[p] |= 2;
                    }
                    vp[b] = dst;
                }
                __m512 sv[16];
                if (nj[b] > 8) qk_f32(w->qt, kp, D, ks, sv, 16);
                else if (nj[b] > 4) qk_f32(w->qt, kp, D, ks, sv, 8);
                else qk_f32(w->qt, kp, D, ks, sv, 4);
#endif
                /* the piece's keys, and one masked slot after an odd count (a bf16 pair's zero half) */
                for (int64_t j = 0; j < ((nj[b] + 1) & ~1); j++) {
                    __mmask16 bits = j < nj[b] ? item_bits(P, it, g, j0 + j, valid) : 0;
                    _mm512_store_ps(w->s + (16 * b + j) * GROUP, _mm512_mask_mul_ps(neg, bits, sv[j], c));
                }
            }
            if (!softmax_step(&m, &l, w->acc, w->s, nj, nb, D)) continue;
#if ITEM_BF16
            for (int64_t b = 0; b < nb; b++)
                pack_probs(w->s + 16 * b * GROUP, (nj[b] + 1) / 2, w->pp + 8 * b * GROUP);
            pv_bf16(w->pp, vp, nj, nb, D, w->acc);
#else
            pv_f32(w->s, vp, vs, nj, nb, D, w->acc);
#endif
        }
        store_state(P, it, out, lse, r0, nr, m, l, w->acc);
    }
}

#undef ELEM
#undef ITEM_FN
#undef ITEM_TARGET

/* The backward of one item for one batch-head z: included twice by attend.c, with BWD_BF16 0
 * (float32 inputs) and 1 (bfloat16 inputs). The item's rows run in blocks of ROWBLOCK groups of
 * 16; a block visits the union of its groups' live pieces, BATCH at a time. Per piece and live
 * group: S and dP (lanes are rows), P and dS; then dK and dV of the piece over all the block's
 * live groups at once (its accumulators are loaded and stored once per block, not per group);
 * per batch, dQ of each group over the batch's pieces. Keys and values of a piece are read in
 * place when they are 16 consecutive rows, else copied once per item. */
#if BWD_BF16
#define ELEM uint16_t
#define BWD_FN bwd_item_bf16
#define BWD_TARGET TBF16
#else
#define ELEM float
#define BWD_FN bwd_item_f32
#define BWD_TARGET T512
#endif

static BWD_TARGET void BWD_FN(const Bwd *B, int64_t z, const int64_t *it, BWork *w) {
    const int64_t D = B->D, rows = it[I_ROWS], np = piece_count(it), E = it[I_E];
    Problem P; /* the forward's view of the item, for key_pos / item_bits / live_pieces */
    P.extras = B->extras;
    P.masks = B->masks;
    const ELEM *q = (const ELEM *)B->q + bz(B, B_Q, z), *k = (const ELEM *)B->k + bz(B, B_K, z);
    const ELEM *v = (const ELEM *)B->v + bz(B, B_V, z), *dout = (const ELEM *)B->dout + bz(B, B_DO, z);
    const float *lse = B->lse + bz(B, B_LSE, z);
    float *dq = B->dq + bz(B, B_DQ, z), *dk = B->dk + bz(B, B_DK, z), *dv = B->dv + bz(B, B_DV, z);
    const int64_t kr = B->s[B_K][2], vr = B->s[B_V][2], qr = B->s[B_Q][2], dr = B->s[B_DO][2];
    const __m512 c = _mm512_set1_ps(B->c), neg = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(B->scale);
    ELEM *kbuf = (ELEM *)w->kbuf, *vbuf = (ELEM *)w->vbuf;
    /* per group of a block: its rows with lanes as rows (S, dP), and as the gradient products'
     * operand (float32 rows, or bf16 pairs of rows); lane_sz / op_sz floats each */
    const int64_t lane_sz = D * GROUP, op_sz = GROUP * D;
    const int64_t ngroups = (rows + GROUP - 1) / GROUP;
    memset(w->packed, 0, (size_t)np);
    for (int64_t g0 = 0; g0 < ngroups; g0 += ROWBLOCK) {
        const int64_t ng = ngroups - g0 < ROWBLOCK ? ngroups - g0 : ROWBLOCK;
        int64_t nr[ROWBLOCK], has[ROWBLOCK];
        uint16_t valid[ROWBLOCK];
        __m512 lse2[ROWBLOCK], dlt[ROWBLOCK];
        memset(w->mark, 0, (size_t)np);
        int any = 0;
        for (int64_t gi = 0; gi < ng; gi++) {
            const int64_t g = g0 + gi, r0 = g * GROUP, row0 = it[I_R0] + r0;
            nr[gi] = rows - r0 < GROUP ? rows - r0 : GROUP;
            valid[gi] = (uint16_t)(nr[gi] >= 16 ? 0xFFFFu : (1u << nr[gi]) - 1);
            const int64_t nlive = live_pieces(&P, it, g, valid[gi], w->live);
            for (int64_t b = 0; b < nlive; b++) w->mark[w->live[b]] |= (uint8_t)(1u << gi);
            has[gi] = nlive > 0;
            any |= nlive > 0;
            if (!nlive) continue;
            float lv[GROUP], dl[GROUP];
            for (int64_t r = 0; r < GROUP; r++)
                lv[r] = r < nr[gi] ? lse[(row0 + r) * B->s[B_LSE][2]] * 1.4426950408889634f : 0.0f;
            group_delta(B, z, row0, nr[gi], dl);
            lse2[gi] = _mm512_loadu_ps(lv);
            dlt[gi] = _mm512_loadu_ps(dl);
            rows_to_lanes((const char *)(q + row0 * qr), qr * (int64_t)sizeof(ELEM), nr[gi],
                          D * (int64_t)sizeof(ELEM) / 4, w->qt + gi * lane_sz);
            rows_to_lanes((const char *)(dout + row0 * dr), dr * (int64_t)sizeof(ELEM), nr[gi],
                          D * (int64_t)sizeof(ELEM) / 4, w->dot + gi * lane_sz);
#if BWD_BF16
            pair_rows(q + row0 * qr, qr, nr[gi], D, (uint32_t *)(w->qrows + gi * op_sz));
            pair_rows(dout + row0 * dr, dr, nr[gi], D, (uint32_t *)(w->dorows + gi * op_sz));
#else
            for (int64_t r = 0; r < GROUP; r++) {
                float *a = w->qrows + gi * op_sz + r * D, *b = w->dorows + gi * op_sz + r * D;
                if (r < nr[gi]) {
                    memcpy(a, q + (row0 + r) * qr, D * 4);
                    memcpy(b, dout + (row0 + r) * dr, D * 4);
                } else {
                    memset(a, 0, D * 4);
                    memset(b, 0, D * 4);
                }
            }
#endif
            for (int64_t d = 0; d < D; d++) _mm512_store_ps(w->dqt + gi * lane_sz + d * GROUP, _mm512_setzero_ps());
        }
        if (!any) continue;
        int64_t nu = 0; /* the union of the block's live pieces, in key order */
        for (int64_t p = 0; p < np; p++)
            if (w->mark[p]) w->live[nu++] = (int32_t)p;
        for (int64_t b0 = 0; b0 < nu; b0 += BATCH) {
            const int64_t nb = nu - b0 < BATCH ? nu - b0 : BATCH;
#if BWD_BF16
            const uint32_t *kps[BATCH]; /* dQ's operand: pairs of keys */
#else
            const float *kps[BATCH];
            int64_t kss[BATCH];
#endif
            int64_t njs[BATCH];
            for (int64_t b = 0; b < nb; b++) {
                const int64_t p = w->live[b0 + b];
                int64_t j0, nj;
                piece_keys(it, p, &j0, &nj);
                const ELEM *kp = kbuf + p * 16 * D, *vp = vbuf + p * 16 * D;
                int64_t ks = D, vs = D;
                const int plain = j0 >= E && nj == 16;
                if (plain) {
                    const int64_t pos0 = it[I_K0] + j0 - E;
                    kp = k + pos0 * kr, vp = v + pos0 * vr, ks = kr, vs = vr;
                }
                if (!(w->packed[p] & 1)) { /* first visit in this item: copies, key pairs; dK / dV zeroed */
                    if (!plain)
                        for (int64_t j = 0; j < 16; j++) {
                            ELEM *kd = kbuf + (p * 16 + j) * D, *vd = vbuf + (p * 16 + j) * D;
                            if (j < nj) {
                                int64_t pos = key_pos(&P, it, j0 + j);
                                memcpy(kd, k + pos * kr, D * sizeof(ELEM));
                                memcpy(vd, v + pos * vr, D * sizeof(ELEM));
                            } else {
                                memset(kd, 0, D * sizeof(ELEM));
                                memset(vd, 0, D * sizeof(ELEM));
                            }
                        }
#if BWD_BF16
                    pair_rows(kp, ks, 16, D, w->kpairs + p * 8 * D);
#endif
                    memset(w->dkbuf + p * 16 * D, 0, 16 * D * 4);
                    memset(w->dvbuf + p * 16 * D, 0, 16 * D * 4);
                    w->packed[p] = 1;
                }
#if BWD_BF16
                kps[b] = w->kpairs + p * 8 * D;
                const uint32_t *wds[ROWBLOCK], *wp[ROWBLOCK], *rq[ROWBLOCK], *rdo[ROWBLOCK];
#else
                kps[b] = kp, kss[b] = ks;
                const float *wds[ROWBLOCK], *wp[ROWBLOCK], *rq[ROWBLOCK], *rdo[ROWBLOCK];
#endif
                njs[b] = nj;
                const int J = nj > 8 ? 16 : 8;
                int nw = 0;
                for (int64_t gi = 0; gi < ng; gi++) {
                    if (!((w->mark[p] >> gi) & 1)) continue;
                    float *ds = w->ds + (gi * BATCH + b) * 16 * GROUP;
                    __m512 sv[16], dp[16];
#if BWD_BF16
                    const uint32_t *qt = (const uint32_t *)(w->qt + gi * lane_sz), *dot = (const uint32_t *)(w->dot + gi * lane_sz);
                    if (J == 16) { qk_bf16(qt, kp, D, ks, sv, 16); qk_bf16(dot, vp, D, vs, dp, 16); }
                    else { qk_bf16(qt, kp, D, ks, sv, 8); qk_bf16(dot, vp, D, vs, dp, 8); }
                    uint32_t *prow = w->prow + gi * 16 * 8, *dsrow = w->dsrow + gi * 16 * 8;
#else
                    const float *qt = w->qt + gi * lane_sz, *dot = w->dot + gi * lane_sz;
                    if (J == 16) { qk_f32(qt, kp, D, ks, sv, 16); qk_f32(dot, vp, D, vs, dp, 16); }
                    else { qk_f32(qt, kp, D, ks, sv, 8); qk_f32(dot, vp, D, vs, dp, 8); }
                    float *pt = w->p + gi * 16 * GROUP;
#endif
                    for (int j = 0; j < J; j++) {
                        __mmask16 bits = j < nj ? item_bits(&P, it, g0 + gi, j0 + j, valid[gi]) : 0;
                        __m512 pr = exp2_ps(_mm512_sub_ps(_mm512_mask_mul_ps(neg, bits, sv[j], c), lse2[gi]));
                        pr = _mm512_maskz_mov_ps(bits, pr); /* exactly 0 off the mask, whatever lse is */
                        __m512 d = _mm512_maskz_mul_ps(bits, pr, _mm512_sub_ps(dp[j], dlt[gi]));
                        _mm512_store_ps(ds + j * GROUP, d);
#if BWD_BF16
                        /* 16 bf16 in lane order are 8 pairs of rows */
                        _mm256_store_si256((__m256i *)(prow + j * 8), (__m256i)_mm512_cvtneps_pbh(pr));
                        _mm256_store_si256((__m256i *)(dsrow + j * 8), (__m256i)_mm512_cvtneps_pbh(d));
#else
                        _mm512_store_ps(pt + j * GROUP, pr);
#endif
                    }
#if BWD_BF16
                    /* dS as pairs of keys for dQ; a narrow piece's odd last key pairs with a zero */
                    pack_probs(ds, (nj + 1) / 2, w->dspp + (gi * BATCH + b) * 8 * GROUP);
                    wds[nw] = dsrow, wp[nw] = prow;
                    rq[nw] = (const uint32_t *)(w->qrows + gi * op_sz), rdo[nw] = (const uint32_t *)(w->dorows + gi * op_sz);
#else
                    wds[nw] = ds, wp[nw] = pt, rq[nw] = w->qrows + gi * op_sz, rdo[nw] = w->dorows + gi * op_sz;
#endif
                    nw++;
                }
                /* dK += dS^T Q and dV += P^T dO over the block's live groups */
                if (J == 16) {
                    OUTER_ADD(wds, rq, nw, D, w->dkbuf + p * 16 * D, 16);
                    OUTER_ADD(wp, rdo, nw, D, w->dvbuf + p * 16 * D, 16);
                } else {
                    OUTER_ADD(wds, rq, nw, D, w->dkbuf + p * 16 * D, 8);
                    OUTER_ADD(wp, rdo, nw, D, w->dvbuf + p * 16 * D, 8);
                }
            }
            /* dQ^T += dS K of each group over the batch's pieces it sees */
            for (int64_t gi = 0; gi < ng; gi++) {
                int64_t njg[BATCH], seen = 0;
                for (int64_t b = 0; b < nb; b++) {
                    njg[b] = (w->mark[w->live[b0 + b]] >> gi) & 1 ? njs[b] : 0;
                    seen |= njg[b];
                }
                if (!seen) continue;
#if BWD_BF16
                pv_bf16(w->dspp + gi * BATCH * 8 * GROUP, kps, njg, nb, D, w->dqt + gi * lane_sz);
#else
                pv_f32(w->ds + gi * BATCH * 16 * GROUP, kps, kss, njg, nb, D, w->dqt + gi * lane_sz);
#endif
            }
        }
        /* dQ rows += (dQ^T)^T * scale */
        for (int64_t gi = 0; gi < ng; gi++) {
            if (!has[gi]) continue;
            const int64_t row0 = it[I_R0] + (g0 + gi) * GROUP;
            for (int64_t d0 = 0; d0 < D; d0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(w->dqt + gi * lane_sz + (d0 + i) * GROUP);
                transpose16(r);
                for (int64_t i = 0; i < nr[gi]; i++) {
                    float *o = dq + (row0 + i) * B->s[B_DQ][2] + d0;
                    _mm512_storeu_ps(o, _mm512_fmadd_ps(r[i], sc, _mm512_loadu_ps(o)));
                }
            }
        }
    }
    flush_piece_grads(B, &P, it, np, w, dk, dv);
}

#undef ELEM
#undef BWD_FN
#undef BWD_TARGET

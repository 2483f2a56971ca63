/* prefill_attention.c's bfloat16 products, included by it (this is a part of that file, not a
 * header of its own: it uses the file's types and helpers). Built only for bfloat16 pools on a
 * target with AVX512-BF16 (PREFILL_BF16); prefill_attention.c takes these paths when its caller
 * asks (Problem.bf16).
 *
 * VDPBF16PS adds a pair of bfloat16 products to each of 16 float32 lanes. The rows of a tile lie
 * along the lanes, as in the float32 path, so the pairs run along the other operand:
 *   - Q K^T over pairs of head dims: qt holds [D / 2][rows] 32-bit pairs (q[2i], q[2i + 1]) of
 *     the scaled queries, and a key's pair is two adjacent elements of its row in the pool, read
 *     in place;
 *   - P V over pairs of keys: the softmax writes P as [keys / 2][rows] pairs (p[2j], p[2j + 1])
 *     over the scores it has read, and each key tile's values are interleaved once into
 *     vt [keys / 2][D] pairs (v[2j][d], v[2j + 1][d]).
 * Q and P are rounded to nearest even; scores, the softmax and the sums stay float32.
 */

ALWAYS_INLINE uint32_t load_pair(const kv_t *p)
{
    uint32_t x;
    memcpy(&x, p, sizeof x);
    return x;
}

ALWAYS_INLINE __m512bh broadcast_pair(uint32_t pair) { return (__m512bh)_mm512_set1_epi32((int)pair); }

ALWAYS_INLINE __m512bh load_pairs(const uint32_t *p)
{
    return (__m512bh)_mm512_loadu_si512((const void *)p);
}

ALWAYS_INLINE vf dot_pairs(vf acc, __m512bh a, __m512bh b)
{
    return (vf)_mm512_dpbf16_ps((__m512)acc, a, b);
}

/* qk_block with bfloat16 products: qt [D / 2][rows] pairs, k rows of bfloat16. */
ALWAYS_INLINE void qk_block_bf16(float *s, const uint32_t *qt, int64_t rows, const kv_t *k,
                                 int64_t D, int64_t k_stride, int nv, float *m_new,
                                 const int32_t *qpos, int64_t kpos, int masked)
{
    vf acc[QK_KEYS][ROW_VECS];
    #pragma GCC unroll 16
    for (int j = 0; j < QK_KEYS; j++)
        #pragma GCC unroll 16
        for (int c = 0; c < nv; c++) acc[j][c] = splat(0.f);
    #pragma GCC unroll 1
    for (int64_t i = 0; i < D / 2; i++) {
        __m512bh qv[ROW_VECS];
        #pragma GCC unroll 16
        for (int c = 0; c < nv; c++) qv[c] = load_pairs(qt + i * rows + c * VL);
        #pragma GCC unroll 16
        for (int j = 0; j < QK_KEYS; j++) {
            const __m512bh kd = broadcast_pair(load_pair(k + j * k_stride + 2 * i));
            #pragma GCC unroll 16
            for (int c = 0; c < nv; c++) acc[j][c] = dot_pairs(acc[j][c], qv[c], kd);
        }
    }
    finish_scores(s, acc, rows, nv, m_new, qpos, kpos, masked);
}

/* pv_block with bfloat16 products: p [pairs][rows] pairs of keys, vt [pairs][D] pairs. */
ALWAYS_INLINE void pv_block_bf16(float *ot, const float *alpha, const uint32_t *p, int64_t rows,
                                 const uint32_t *vt, int64_t dim, int64_t pairs, int64_t D,
                                 int nd, int nv)
{
    vf acc[PV_DIMS][ROW_VECS];
    scaled_outputs(acc, ot, alpha, rows, nd, nv);
    #pragma GCC unroll 1
    for (int64_t j = 0; j < pairs; j++, p += rows) {
        __m512bh pv[ROW_VECS];
        #pragma GCC unroll 16
        for (int c = 0; c < nv; c++) pv[c] = load_pairs(p + c * VL);
        #pragma GCC unroll 16
        for (int i = 0; i < nd; i++) {
            const __m512bh vd = broadcast_pair(vt[j * D + dim + i]);
            #pragma GCC unroll 16
            for (int c = 0; c < nv; c++) acc[i][c] = dot_pairs(acc[i][c], pv[c], vd);
        }
    }
    store_outputs_block(ot, acc, rows, nd, nv);
}

/* The 16 lanes of a and b as 16 pairs (a[i], b[i]). */
ALWAYS_INLINE __m512i pair_up(vf a, vf b)
{
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a));
}

/* softmax_tile, writing P as pairs of keys over s (pair j over score row j, already read). */
static void softmax_tile_bf16(Scratch *sc, const Tile *t, int64_t nk)
{
    uint32_t *p = (uint32_t *)sc->s;
    for (int64_t c = 0; c < t->row_vecs; c++) {
        const float *s = sc->s + c * VL;
        const vf mx = load(sc->m_new + c * VL), base = softmax_base(sc->m_new + c * VL);
        vf sum = splat(0.f);
        for (int64_t j = 0; j < nk; j += 2) {
            const vf e0 = exp2_v(load(s + j * t->rows) - base);
            const vf e1 = exp2_v(load(s + (j + 1) * t->rows) - base);
            _mm512_storeu_si512((void *)(p + j / 2 * t->rows + c * VL), pair_up(e0, e1));
            sum += e0 + e1;
        }
        const vf a = exp2_v(load(sc->m + c * VL) - base);
        store(sc->alpha + c * VL, a);
        store(sc->l + c * VL, fma_v(load(sc->l + c * VL), a, sum));
        store(sc->m + c * VL, mx);
    }
}

/* out [D] = pairs (a[d], b[d]) of two value rows (NULL: zeros). */
static void interleave_values(uint32_t *out, const kv_t *a, const kv_t *b, int64_t D)
{
    int64_t d = 0;
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                        8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56,
                                        24, 55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17,
                                        48, 16);
    for (; d + 32 <= D; d += 32) {
        const __m512i x = a ? _mm512_loadu_si512((const void *)(a + d)) : _mm512_setzero_si512();
        const __m512i y = b ? _mm512_loadu_si512((const void *)(b + d)) : _mm512_setzero_si512();
        _mm512_storeu_si512((void *)(out + d), _mm512_permutex2var_epi16(x, lo, y));
        _mm512_storeu_si512((void *)(out + d + 16), _mm512_permutex2var_epi16(x, hi, y));
    }
    for (; d < D; d++) out[d] = (a ? a[d] : 0u) | (uint32_t)(b ? b[d] : 0u) << 16;
}

/* load_keys for bfloat16 products: kb at the groups of K rows (in place when a whole group lies
 * in one block, else copied to kt, zeros past the last key), and vt the tile's value pairs. */
ALWAYS_INLINE int64_t load_keys_bf16(Scratch *sc, const Problem *pr, const Tile *t, int64_t k0,
                                     int64_t nk, int64_t D)
{
    const int64_t padded = (nk + QK_KEYS - 1) / QK_KEYS * QK_KEYS;
    for (int64_t j = 0; j < padded; j += QK_KEYS) {
        const int64_t g = j / QK_KEYS;
        if (pr->block_size % QK_KEYS == 0 && j + QK_KEYS <= nk) {
            sc->kb[g] = pr->k_cache + pool_offset(pr, t, k0 + j);
            continue;
        }
        kv_t *kt = (kv_t *)sc->kt + g * QK_KEYS * pr->pool_row;
        for (int64_t i = 0; i < QK_KEYS; i++) {
            kv_t *row = kt + i * pr->pool_row;
            if (j + i < nk)
                memcpy(row, pr->k_cache + pool_offset(pr, t, k0 + j + i), sizeof(kv_t) * D);
            else
                memset(row, 0, sizeof(kv_t) * D);
        }
        sc->kb[g] = kt;
    }
    uint32_t *vt = (uint32_t *)sc->vt;
    for (int64_t j = 0; j < padded; j += 2) {
        const kv_t *a = j < nk ? pr->v_cache + pool_offset(pr, t, k0 + j) : NULL;
        const kv_t *b = j + 1 < nk ? pr->v_cache + pool_offset(pr, t, k0 + j + 1) : NULL;
        interleave_values(vt + j / 2 * D, a, b, D);
    }
    return padded;
}

/* load_queries for bfloat16 products: qt [D / 2][rows] pairs of the scaled queries. */
ALWAYS_INLINE void load_queries_bf16(Scratch *sc, const Problem *pr, const Tile *t, int64_t D)
{
    uint32_t *qt = (uint32_t *)sc->qt;
    for (int64_t g = 0; g < pr->group; g++) {
        const int64_t head = t->kv_head * pr->group + g;
        for (int64_t p = 0; p < t->tile_pos; p++) {
            const int64_t r = g * t->tile_pos + p;
            const float *qr = pr->q + (t->q_start + t->p0 + p) * pr->q_stride + head * D;
            for (int64_t i = 0; i < D / 2; i++) {
                uint32_t pair = 0;
                if (p < t->n)
                    pair = bf16_round(qr[2 * i] * pr->q_scale)
                           | (uint32_t)bf16_round(qr[2 * i + 1] * pr->q_scale) << 16;
                qt[i * t->rows + r] = pair;
            }
            sc->qpos[r] = (int32_t)(t->ctx_start + t->p0 + p);
            sc->m[r] = -INFINITY;
            sc->l[r] = 0.f;
        }
    }
    memset(sc->ot, 0, sizeof(float) * D * t->rows);
}

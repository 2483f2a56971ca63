/* Prefill attention over a paged KV cache (flash attention), for CPUs: float32 queries and
 * outputs, pools of kv_t (float32, float16 or bfloat16; see kv_element.h).
 *
 * The query rows of each prefill chunk attend causally to their request's whole context, read
 * straight from the block pools through the block table: no gathered copy of the context, no
 * mask tensor. Work items are (request, kv head, query tile) triples, handed out dynamically to
 * the OpenMP threads request by request and kv head by kv head (so that the threads share one
 * head's K/V in cache), biggest tiles first (so that the causal triangle balances).
 *
 * One work item takes a tile of query positions times the G = num_heads / num_kv_heads query
 * heads of its kv head as its rows, and walks the context in tiles of KEY_TILE keys up to the
 * causal limit. Rows lie along the vector lanes throughout (row = g * tile positions + position):
 *   - Q is packed once per work item, transposed and pre-scaled, into qt [D][rows];
 *   - each key tile's K and V rows are read in place from float32 pools, in groups of QK_KEYS
 *     rows that lie in one block (only groups that do not are copied out); rows of 16-bit pools
 *     are all converted into float32 scratch first (a few percent of the arithmetic);
 *   - s [keys][rows] = K Qt, a register-blocked micro-kernel that broadcasts K elements;
 *   - the online softmax (running max m and sum l per row) is then purely vertical: one
 *     vector per VL rows, no horizontal reductions;
 *   - ot [D][rows] = alpha * ot + V^T P, again register-blocked, broadcasting V elements.
 * Only key tiles that cross the diagonal are masked. With a sliding window of W, each row sees
 * its last W positions: the walk starts at the key tile holding the first row's window start,
 * and tiles below a row's window start are masked too. Soft-capped scores (Gemma 2) become
 * cap * tanh(score / cap) in a pass over each key tile. Scores are kept in base 2 (Q is scaled
 * by scale * log2 e) so that the softmax needs exp2, written below to vectorise.
 *
 * Portable C11 with GCC vector extensions, no intrinsics: the vector width and the register
 * blocking follow the target (AVX-512 and aarch64: 32 vector registers; otherwise 16).
 *
 * bfloat16 products (a bfloat16 pool's build on a CPU with AVX512-BF16, when the caller asks,
 * for a model whose matmuls run in bfloat16): Q and P are rounded to bfloat16 and both products
 * run VDPBF16PS, two multiply-adds per lane per instruction, over pairs of head dims (Q K^T) and
 * of keys (P V); see prefill_bf16_products.h. Scores, softmax and sums stay float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kv_element.h"
#include "vector_width.h"

/* Accumulator blocks: QK_KEYS keys x ROW_VECS row vectors for s, PV_DIMS head dims x ROW_VECS
 * row vectors for ot; three quarters of the vector registers, the rest for the operands. */
#define ROW_VECS 3
#if MANY_VECTOR_REGISTERS
#define QK_KEYS 8
#define PV_DIMS 8
#else
#define QK_KEYS 4
#define PV_DIMS 4
#endif

#define KEY_TILE 64       /* keys per tile; s is [KEY_TILE][rows] */
#define WIDE_ROW_VECS 6   /* rows per work item, in vectors, that wide tiles aim for */
#define WIDE_CONTEXT 1024 /* context length from which a request's tiles are wide */

_Static_assert(KEY_TILE % QK_KEYS == 0, "key tiles are padded to whole micro-kernel blocks");

typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* c + a * b, one rounding, whenever the target has a fused multiply-add: the project builds with
 * -std=c11, which turns off GCC's contraction of a * b + c, but fmaf per lane vectorises. */
ALWAYS_INLINE vf fma_v(vf a, vf b, vf c)
{
#ifdef __FP_FAST_FMAF
    vf r;
    for (int i = 0; i < VL; i++) r[i] = fmaf(a[i], b[i], c[i]);
    return r;
#else
    return a * b + c;
#endif
}

ALWAYS_INLINE vf splat(float x) { return x - (vf){0}; }

ALWAYS_INLINE vf load(const float *p) { return *(const vf *)p; }

ALWAYS_INLINE void store(float *p, vf x) { *(vf *)p = x; }

ALWAYS_INLINE vf select_v(vi keep, vf a, vf b) { return (vf)(((vi)a & keep) | ((vi)b & ~keep)); }

ALWAYS_INLINE vf max_v(vf a, vf b) { return select_v(a > b, a, b); }

/* max(x, -127) for x <= 0 (-0 included), as the unsigned minimum of the bits: negative floats
 * order by their magnitude bits. GCC makes one instruction of it (a float maximum it would not,
 * for the sake of NaNs and signed zeros). */
ALWAYS_INLINE vf clamp_v(vf x)
{
    const vu b = (vu)x, lo = (vu)splat(-127.f);
    vu r;
    for (int i = 0; i < VL; i++) r[i] = b[i] < lo[i] ? b[i] : lo[i];
    return (vf)r;
}

/* 2^x for x <= 0 (NaN-free), to about 2 ulp; exactly 0 below -127. x = n + f with n an integer
 * and |f| <= 1/2: adding 1.5 * 2^23 + 127 rounds x to n (exact in round-to-nearest) and leaves
 * n + 127 in the low mantissa bits of the sum, so shifting its bits up by 23 puts the biased
 * exponent of 2^n in place (the rest of the constant's bits shift out): no conversion needed.
 * 2^f by a degree-5 polynomial with constant term 1 (so that 2^0 is exact), fitted for the least
 * maximum relative error on [-1/2, 1/2] (9e-8). */
ALWAYS_INLINE vf exp2_v(vf x)
{
    const vf magic = splat(12583039.f);
    x = clamp_v(x);
    const vf t = x + magic;
    const vf f = x - (t - magic);
    vf p = splat(1.3264727213682555e-03f);
    p = fma_v(p, f, splat(9.671512812494284e-03f));
    p = fma_v(p, f, splat(5.550733744824732e-02f));
    p = fma_v(p, f, splat(2.402224208267751e-01f));
    p = fma_v(p, f, splat(6.931469775973308e-01f));
    p = fma_v(p, f, splat(1.f));
    return p * (vf)((vu)t << 23);
}

/* The row maxima to subtract: a row that has seen only masked keys (-inf, in a window's first
 * tiles) subtracts 0, so that its terms are exp2(-inf), not exp2(-inf - -inf). */
ALWAYS_INLINE vf softmax_base(const float *m_new)
{
    const vf mx = load(m_new);
    return select_v(mx > splat(-INFINITY), mx, splat(0.f));
}

typedef struct {
    float *out;
    const float *q;
    const kv_t *k_cache, *v_cache;
    const int32_t *block_tables, *query_start_loc, *seq_lens;
    int64_t group, head_dim, block_size, max_blocks;
    int64_t q_stride, out_stride, pool_row; /* floats between tokens of q, of out; pool rows */
    float q_scale;                          /* scale * log2(e) */
    int bf16;                               /* bfloat16 products */
    int window;                             /* positions each row sees; 0: all before it */
    float cap;                              /* the soft cap in base-2 score units; 0: none */
} Problem;

typedef struct {
    int32_t req, kv_head, tile;
    int64_t req_cost, cost; /* context lengths: of the request, of the tile's last row */
} WorkItem;

/* One work item's geometry: query positions [p0, p0 + n) of request req, tile_pos positions
 * (a multiple of VL, >= n) per head in the rows. */
typedef struct {
    int64_t req, kv_head, q_start, ctx_start, p0, n, tile_pos, rows, row_vecs;
} Tile;

/* Per-thread scratch, rows = up to max_rows. */
typedef struct {
    float *qt, *kt, *vt, *s, *ot, *m, *m_new, *l, *alpha;
    int32_t *qpos;
    const float *kg[KEY_TILE / QK_KEYS], *vg[KEY_TILE / QK_KEYS]; /* the key tile's groups */
    const kv_t *kb[KEY_TILE / QK_KEYS]; /* bfloat16 products: the groups' K rows as stored */
} Scratch;

/* Query positions per head in a tile of a request with qlen new tokens and seq_len positions in
 * all, whole vectors per head (fewer for short chunks). Wide tiles, about WIDE_ROW_VECS vectors
 * of rows, share the work done per key tile (its pointers, the softmax's set-up, the copy of m)
 * among more rows: that pays on long contexts. Narrow tiles, the fewest vectors per head whose
 * rows (of all the group's heads) fill whole register blocks, waste less on the masked part of
 * the causal diagonal: that pays on short ones. */
static int64_t tile_positions(int64_t qlen, int64_t seq_len, int64_t group)
{
    int64_t vecs = 1;
    while (group * vecs % ROW_VECS != 0) vecs++;
    if (seq_len >= WIDE_CONTEXT || group * vecs > WIDE_ROW_VECS)
        vecs = WIDE_ROW_VECS / group > 1 ? WIDE_ROW_VECS / group : 1;
    const int64_t needed = (qlen + VL - 1) / VL;
    return VL * (needed < vecs ? needed : vecs);
}

/* Stores acc (QK_KEYS keys x nv row vectors of scores) into s; scores of key positions kpos + j
 * after a row's position become -inf when `masked`; m_new[c] takes the maximum over them. */
ALWAYS_INLINE void finish_scores(float *s, vf (*acc)[ROW_VECS], int64_t rows, int nv,
                                 float *m_new, const int32_t *qpos, int64_t kpos, int masked)
{
    #pragma GCC unroll 16
    for (int c = 0; c < nv; c++) {
        if (masked) {
            const vi q = *(const vi *)(qpos + c * VL);
            #pragma GCC unroll 16
            for (int j = 0; j < QK_KEYS; j++)
                acc[j][c] = select_v(q >= (int32_t)(kpos + j), acc[j][c], splat(-INFINITY));
        }
        vf mx = load(m_new + c * VL);
        #pragma GCC unroll 16
        for (int j = 0; j < QK_KEYS; j++) {
            store(s + j * rows + c * VL, acc[j][c]);
            mx = max_v(mx, acc[j][c]);
        }
        store(m_new + c * VL, mx);
    }
}

/* s[j][c] = qt[:, c] . k[j] for QK_KEYS keys (rows of k, k_stride apart) and nv <= ROW_VECS
 * row vectors, finished by finish_scores. k_stride is a run-time value (the pools' row length):
 * with a constant one GCC loads whole unaligned vectors to broadcast their first lane. */
ALWAYS_INLINE void qk_block(float *s, const float *qt, int64_t rows, const float *k, int64_t D,
                            int64_t k_stride, int nv, float *m_new, const int32_t *qpos,
                            int64_t kpos, int masked)
{
    vf acc[QK_KEYS][ROW_VECS];
    #pragma GCC unroll 16
    for (int j = 0; j < QK_KEYS; j++)
        #pragma GCC unroll 16
        for (int c = 0; c < nv; c++) acc[j][c] = splat(0.f);
    #pragma GCC unroll 1
    for (int64_t d = 0; d < D; d++) {
        vf qv[ROW_VECS];
        #pragma GCC unroll 16
        for (int c = 0; c < nv; c++) qv[c] = load(qt + d * rows + c * VL);
        #pragma GCC unroll 16
        for (int j = 0; j < QK_KEYS; j++) {
            const vf kd = splat(k[j * k_stride + d]);
            #pragma GCC unroll 16
            for (int c = 0; c < nv; c++) acc[j][c] = fma_v(qv[c], kd, acc[j][c]);
        }
    }
    finish_scores(s, acc, rows, nv, m_new, qpos, kpos, masked);
}

/* acc = ot * alpha for nd <= PV_DIMS dims (rows of ot) and nv <= ROW_VECS row vectors: what
 * a P V block adds the tile's products to. */
ALWAYS_INLINE void scaled_outputs(vf (*acc)[ROW_VECS], const float *ot, const float *alpha,
                                  int64_t rows, int nd, int nv)
{
    #pragma GCC unroll 16
    for (int c = 0; c < nv; c++) {
        const vf a = load(alpha + c * VL);
        #pragma GCC unroll 16
        for (int i = 0; i < nd; i++) acc[i][c] = load(ot + i * rows + c * VL) * a;
    }
}

/* ot = acc, the block scaled_outputs began. */
ALWAYS_INLINE void store_outputs_block(float *ot, vf (*acc)[ROW_VECS], int64_t rows, int nd,
                                       int nv)
{
    #pragma GCC unroll 16
    for (int i = 0; i < nd; i++)
        #pragma GCC unroll 16
        for (int c = 0; c < nv; c++) store(ot + i * rows + c * VL, acc[i][c]);
}

/* ot[i][c] = ot[i][c] * alpha[c] + sum_j v[j][i] * p[j][c] for nd <= PV_DIMS dims (rows of ot,
 * elements of the rows of v) and nv <= ROW_VECS row vectors. The keys come in groups of
 * QK_KEYS rows, v_stride apart, group g starting at v[g] + dim. */
ALWAYS_INLINE void pv_block(float *ot, const float *alpha, const float *p, int64_t rows,
                            const float *const *v, int64_t dim, int64_t groups, int64_t v_stride,
                            int nd, int nv)
{
    vf acc[PV_DIMS][ROW_VECS];
    scaled_outputs(acc, ot, alpha, rows, nd, nv);
    #pragma GCC unroll 1
    for (int64_t g = 0; g < groups; g++) {
        const float *vr = v[g] + dim;
        #pragma GCC unroll 1
        for (int j = 0; j < QK_KEYS; j++, vr += v_stride, p += rows) {
            vf pv[ROW_VECS];
            #pragma GCC unroll 16
            for (int c = 0; c < nv; c++) pv[c] = load(p + c * VL);
            #pragma GCC unroll 16
            for (int i = 0; i < nd; i++) {
                const vf vd = splat(vr[i]);
                #pragma GCC unroll 16
                for (int c = 0; c < nv; c++) acc[i][c] = fma_v(pv[c], vd, acc[i][c]);
            }
        }
    }
    store_outputs_block(ot, acc, rows, nd, nv);
}

/* Where the K/V row of this head at context position pos starts, in elements from a pool's base. */
static inline int64_t pool_offset(const Problem *pr, const Tile *t, int64_t pos)
{
    const int32_t block = pr->block_tables[t->req * pr->max_blocks + pos / pr->block_size];
    return ((int64_t)block * pr->block_size + pos % pr->block_size) * pr->pool_row
           + t->kv_head * pr->head_dim;
}

#if defined(KV_BFLOAT16) && defined(__AVX512BF16__) && VL == 16
#define PREFILL_BF16 1
#include <immintrin.h>

#include "prefill_bf16_products.h"
#else
#define PREFILL_BF16 0
#endif

/* The scores of nv row vectors from c on against key positions k0 .. k0 + nk - 1. */
ALWAYS_INLINE void qk_columns(Scratch *sc, const Tile *t, int64_t c, int nv, int64_t k0,
                              int64_t nk, int masked, int64_t D, int64_t k_stride, int bf16)
{
    const int64_t at = c * VL;
    for (int64_t j = 0; j < nk; j += QK_KEYS) {
#if PREFILL_BF16
        if (bf16) {
            qk_block_bf16(sc->s + j * t->rows + at, (const uint32_t *)sc->qt + at, t->rows,
                          sc->kb[j / QK_KEYS], D, k_stride, nv, sc->m_new + at, sc->qpos + at,
                          k0 + j, masked);
            continue;
        }
#endif
        qk_block(sc->s + j * t->rows + at, sc->qt + at, t->rows, sc->kg[j / QK_KEYS], D,
                 k_stride, nv, sc->m_new + at, sc->qpos + at, k0 + j, masked);
    }
}

/* s = scores of the tile's rows against key positions k0 .. k0 + nk - 1 (groups at kg), masked
 * where `masked`; m_new = max(m, their maxima). */
ALWAYS_INLINE void qk_tile(Scratch *sc, const Problem *pr, const Tile *t, int64_t k0, int64_t nk,
                           int masked, int64_t D, int bf16)
{
    memcpy(sc->m_new, sc->m, sizeof(float) * t->rows);
    const int64_t stride = pr->pool_row;
    int64_t c = 0;
    for (; c + ROW_VECS <= t->row_vecs; c += ROW_VECS)
        qk_columns(sc, t, c, ROW_VECS, k0, nk, masked, D, stride, bf16);
    for (; c + 2 <= t->row_vecs; c += 2) qk_columns(sc, t, c, 2, k0, nk, masked, D, stride, bf16);
    for (; c < t->row_vecs; c++) qk_columns(sc, t, c, 1, k0, nk, masked, D, stride, bf16);
}

/* ot = alpha * ot + V^T P for nv row vectors from c on. */
ALWAYS_INLINE void pv_columns(Scratch *sc, const Tile *t, int64_t c, int nv, int64_t nk,
                              int64_t D, int64_t v_stride, int bf16)
{
    const int64_t at = c * VL, rows = t->rows, groups = nk / QK_KEYS;
    int64_t d = 0;
#if PREFILL_BF16
    if (bf16) {
        const uint32_t *p = (const uint32_t *)sc->s + at, *vt = (const uint32_t *)sc->vt;
        for (; d + PV_DIMS <= D; d += PV_DIMS)
            pv_block_bf16(sc->ot + d * rows + at, sc->alpha + at, p, rows, vt, d, nk / 2, D,
                          PV_DIMS, nv);
        for (; d < D; d++)
            pv_block_bf16(sc->ot + d * rows + at, sc->alpha + at, p, rows, vt, d, nk / 2, D, 1,
                          nv);
        return;
    }
#endif
    for (; d + PV_DIMS <= D; d += PV_DIMS)
        pv_block(sc->ot + d * rows + at, sc->alpha + at, sc->s + at, rows, sc->vg, d, groups,
                 v_stride, PV_DIMS, nv);
    for (; d < D; d++)
        pv_block(sc->ot + d * rows + at, sc->alpha + at, sc->s + at, rows, sc->vg, d, groups,
                 v_stride, 1, nv);
}

/* ot = alpha * ot + V^T P over the nk keys of the tile (value groups at vg, P in s). */
ALWAYS_INLINE void pv_tile(Scratch *sc, const Problem *pr, const Tile *t, int64_t nk, int64_t D,
                           int bf16)
{
    int64_t c = 0;
    for (; c + ROW_VECS <= t->row_vecs; c += ROW_VECS)
        pv_columns(sc, t, c, ROW_VECS, nk, D, pr->pool_row, bf16);
    for (; c + 2 <= t->row_vecs; c += 2) pv_columns(sc, t, c, 2, nk, D, pr->pool_row, bf16);
    for (; c < t->row_vecs; c++) pv_columns(sc, t, c, 1, nk, D, pr->pool_row, bf16);
}

/* Online softmax over one key tile: s becomes exp2(s - m_new), alpha = exp2(m - m_new) the
 * factor for what was accumulated before, l is updated and m becomes m_new. */
static void softmax_tile(Scratch *sc, const Tile *t, int64_t nk)
{
    for (int64_t c = 0; c < t->row_vecs; c++) {
        float *s = sc->s + c * VL;
        const vf mx = load(sc->m_new + c * VL), base = softmax_base(sc->m_new + c * VL);
        vf sum = splat(0.f);
        for (int64_t j = 0; j < nk; j++) {
            const vf e = exp2_v(load(s + j * t->rows) - base);
            store(s + j * t->rows, e);
            sum += e;
        }
        const vf a = exp2_v(load(sc->m + c * VL) - base);
        store(sc->alpha + c * VL, a);
        store(sc->l + c * VL, fma_v(load(sc->l + c * VL), a, sum));
        store(sc->m + c * VL, mx);
    }
}

/* Points kg and vg at the groups of QK_KEYS keys and values of positions k0 .. k0 + nk - 1 of
 * this head: rows pool_row apart. In a float32 pool a whole group lies in one block when
 * block_size is a multiple of QK_KEYS and is read in place; other groups (a block boundary
 * inside, past the last key, or a 16-bit pool) are copied to kt and vt as float32, with zeros
 * for the padding past the last key (its scores are masked, but its values still meet p = 0 in
 * the products). Returns the padded key count. */
ALWAYS_INLINE int64_t load_keys(Scratch *sc, const Problem *pr, const Tile *t, int64_t k0,
                                int64_t nk, int64_t D)
{
    const int in_place = KV_IS_FLOAT32 && pr->block_size % QK_KEYS == 0;
    const int64_t padded = (nk + QK_KEYS - 1) / QK_KEYS * QK_KEYS;
    for (int64_t j = 0; j < padded; j += QK_KEYS) {
        const int64_t g = j / QK_KEYS;
        if (in_place && j + QK_KEYS <= nk) {
            const int64_t at = pool_offset(pr, t, k0 + j);
            sc->kg[g] = (const float *)(pr->k_cache + at);
            sc->vg[g] = (const float *)(pr->v_cache + at);
            continue;
        }
        float *kt = sc->kt + g * QK_KEYS * pr->pool_row, *vt = sc->vt + g * QK_KEYS * pr->pool_row;
        for (int64_t i = 0; i < QK_KEYS; i++) {
            float *kr = kt + i * pr->pool_row, *vr = vt + i * pr->pool_row;
            if (j + i < nk) {
                const int64_t at = pool_offset(pr, t, k0 + j + i);
                kv_to_float(kr, pr->k_cache + at, D);
                kv_to_float(vr, pr->v_cache + at, D);
            } else {
                memset(kr, 0, sizeof(float) * D);
                memset(vr, 0, sizeof(float) * D);
            }
        }
        sc->kg[g] = kt;
        sc->vg[g] = vt;
    }
    return padded;
}

static Tile make_tile(const Problem *pr, const WorkItem *w)
{
    Tile t;
    t.req = w->req;
    t.kv_head = w->kv_head;
    t.q_start = pr->query_start_loc[w->req];
    const int64_t qlen = pr->query_start_loc[w->req + 1] - t.q_start;
    t.ctx_start = pr->seq_lens[w->req] - qlen;
    t.tile_pos = tile_positions(qlen, pr->seq_lens[w->req], pr->group);
    t.p0 = (int64_t)w->tile * t.tile_pos;
    t.n = qlen - t.p0 < t.tile_pos ? qlen - t.p0 : t.tile_pos;
    t.rows = pr->group * t.tile_pos;
    t.row_vecs = t.rows / VL;
    return t;
}

/* qt [D][rows] = the tile's queries, scaled; rows past the chunk's end are zeros. Also their
 * positions, and the starting softmax state. */
ALWAYS_INLINE void load_queries(Scratch *sc, const Problem *pr, const Tile *t, int64_t D)
{
    for (int64_t g = 0; g < pr->group; g++) {
        const int64_t head = t->kv_head * pr->group + g;
        for (int64_t p = 0; p < t->tile_pos; p++) {
            const int64_t r = g * t->tile_pos + p;
            const float *qr = pr->q + (t->q_start + t->p0 + p) * pr->q_stride + head * D;
            if (p < t->n)
                for (int64_t d = 0; d < D; d++) sc->qt[d * t->rows + r] = qr[d] * pr->q_scale;
            else
                for (int64_t d = 0; d < D; d++) sc->qt[d * t->rows + r] = 0.f;
            sc->qpos[r] = (int32_t)(t->ctx_start + t->p0 + p);
            sc->m[r] = -INFINITY;
            sc->l[r] = 0.f;
        }
    }
    memset(sc->ot, 0, sizeof(float) * D * t->rows);
}

ALWAYS_INLINE void store_outputs(const Scratch *sc, const Problem *pr, const Tile *t, int64_t D)
{
    for (int64_t g = 0; g < pr->group; g++) {
        const int64_t head = t->kv_head * pr->group + g;
        for (int64_t p = 0; p < t->n; p++) {
            const int64_t r = g * t->tile_pos + p;
            float *o = pr->out + (t->q_start + t->p0 + p) * pr->out_stride + head * D;
            const float inv = 1.f / sc->l[r];
            for (int64_t d = 0; d < D; d++) o[d] = sc->ot[d * t->rows + r] * inv;
        }
    }
}

/* tanh(x), from exp2_v (about 1e-7 absolute). */
ALWAYS_INLINE vf tanh_v(vf x)
{
    const vi negative = x < splat(0.f);
    const vf e = exp2_v(splat(-2.8853900817779268f) * select_v(negative, -x, x)); /* e^-2|x| */
    const vf y = (splat(1.f) - e) / (splat(1.f) + e);
    return select_v(negative, -y, y);
}

/* One key tile's scores adjusted after qk_tile, and the row maxima taken again: soft-capped to
 * cap * tanh(score / cap) (cap in base-2 units; 0: none) and, with a window, those of keys
 * `window` or more positions behind their row masked. Masked scores stay -inf. A separate pass,
 * so that the causal mask of every tile stays one comparison (a window folded into
 * finish_scores, a second one, cost prefill 7%). */
static void adjust_scores(Scratch *sc, const Tile *t, int64_t k0, int64_t nk, int64_t window,
                          float cap)
{
    const vf inv = splat(cap > 0.f ? 1.f / cap : 0.f);
    for (int64_t c = 0; c < t->row_vecs; c++) {
        const vi q = *(const vi *)(sc->qpos + c * VL);
        vf mx = load(sc->m + c * VL);
        for (int64_t j = 0; j < nk; j++) {
            float *s = sc->s + j * t->rows + c * VL;
            vf v = load(s);
            if (cap > 0.f) v = select_v(v > splat(-INFINITY), splat(cap) * tanh_v(v * inv), v);
            if (window) v = select_v(q - (int32_t)(k0 + j) < (int32_t)window, v, splat(-INFINITY));
            store(s, v);
            mx = max_v(mx, v);
        }
        store(sc->m_new + c * VL, mx);
    }
}

/* One work item; bf16 (a constant wherever this is inlined): with bfloat16 products. */
ALWAYS_INLINE void attend_tile(Scratch *sc, const Problem *pr, const WorkItem *w, int64_t D,
                               int bf16)
{
    const Tile t = make_tile(pr, w);
#if PREFILL_BF16
    if (bf16)
        load_queries_bf16(sc, pr, &t, D);
    else
#endif
        load_queries(sc, pr, &t, D);
    /* keys [begin, end) are needed: from the first row's window start to the last row */
    const int64_t first = t.ctx_start + t.p0, end = first + t.n, win = pr->window;
    const int64_t seen = win ? first - win + 1 : 0; /* the first row's first position seen */
    const int64_t begin = seen > 0 ? seen / KEY_TILE * KEY_TILE : 0;
    for (int64_t k0 = begin; k0 < end; k0 += KEY_TILE) {
        const int64_t nk = end - k0 < KEY_TILE ? end - k0 : KEY_TILE;
        const int edge = win && k0 < end - win; /* before the last row's window start */
        int64_t padded;
#if PREFILL_BF16
        if (bf16) {
            padded = load_keys_bf16(sc, pr, &t, k0, nk, D);
            qk_tile(sc, pr, &t, k0, padded, k0 + padded - 1 > first, D, 1);
            if (edge || pr->cap > 0.f) adjust_scores(sc, &t, k0, padded, edge ? win : 0, pr->cap);
            softmax_tile_bf16(sc, &t, padded);
            pv_tile(sc, pr, &t, padded, D, 1);
            continue;
        }
#endif
        padded = load_keys(sc, pr, &t, k0, nk, D);
        qk_tile(sc, pr, &t, k0, padded, k0 + padded - 1 > first, D, 0);
        if (edge || pr->cap > 0.f) adjust_scores(sc, &t, k0, padded, edge ? win : 0, pr->cap);
        softmax_tile(sc, &t, padded);
        pv_tile(sc, pr, &t, padded, D, 0);
    }
    store_outputs(sc, pr, &t, D);
}

static void attend_64(Scratch *sc, const Problem *pr, const WorkItem *w)
{
    if (PREFILL_BF16 && pr->bf16)
        attend_tile(sc, pr, w, 64, 1);
    else
        attend_tile(sc, pr, w, 64, 0);
}

static void attend_128(Scratch *sc, const Problem *pr, const WorkItem *w)
{
    if (PREFILL_BF16 && pr->bf16)
        attend_tile(sc, pr, w, 128, 1);
    else
        attend_tile(sc, pr, w, 128, 0);
}

static void attend_any(Scratch *sc, const Problem *pr, const WorkItem *w)
{
    attend_tile(sc, pr, w, pr->head_dim, 0);
}

/* Biggest requests first; within one, kv head by kv head (so that both threads share a head's
 * K/V, which then stays in their caches), biggest tiles first. */
static int schedule_order(const void *a, const void *b)
{
    const WorkItem *x = a, *y = b;
    if (x->req_cost != y->req_cost) return x->req_cost < y->req_cost ? 1 : -1;
    if (x->req != y->req) return x->req < y->req ? -1 : 1;
    if (x->kv_head != y->kv_head) return x->kv_head < y->kv_head ? -1 : 1;
    return (x->cost < y->cost) - (x->cost > y->cost);
}

/* All work items of the listed requests, in schedule_order; their count in *count. */
static WorkItem *plan(const Problem *pr, const int32_t *reqs, int64_t num_reqs,
                      int64_t num_kv_heads, int64_t *count, int64_t *max_rows)
{
    int64_t n = 0;
    *max_rows = VL;
    for (int64_t i = 0; i < num_reqs; i++) {
        const int64_t qlen = pr->query_start_loc[reqs[i] + 1] - pr->query_start_loc[reqs[i]];
        const int64_t tp = tile_positions(qlen, pr->seq_lens[reqs[i]], pr->group);
        n += (qlen + tp - 1) / tp * num_kv_heads;
        if (pr->group * tp > *max_rows) *max_rows = pr->group * tp;
    }
    WorkItem *items = malloc(sizeof(WorkItem) * (n > 0 ? n : 1));
    if (items == NULL) return NULL;
    int64_t k = 0;
    for (int64_t i = 0; i < num_reqs; i++) {
        const int32_t b = reqs[i];
        const int64_t qlen = pr->query_start_loc[b + 1] - pr->query_start_loc[b];
        const int64_t ctx_start = pr->seq_lens[b] - qlen;
        const int64_t tp = tile_positions(qlen, pr->seq_lens[b], pr->group);
        for (int64_t tile = 0; tile * tp < qlen; tile++) {
            const int64_t last = tile * tp + tp < qlen ? tile * tp + tp : qlen;
            for (int64_t h = 0; h < num_kv_heads; h++)
                items[k++] = (WorkItem){b, (int32_t)h, (int32_t)tile, pr->seq_lens[b],
                                        ctx_start + last};
        }
    }
    qsort(items, (size_t)n, sizeof(WorkItem), schedule_order);
    *count = n;
    return items;
}

/* n 4-byte elements (floats or int32), 64-byte aligned for the vector loads. */
static void *alloc_words(int64_t n) { return aligned_alloc(64, (size_t)(n * 4 + 63) / 64 * 64); }

static int scratch_init(Scratch *sc, int64_t max_rows, int64_t D, int64_t pool_row)
{
    sc->qt = alloc_words(D * max_rows);
    sc->ot = alloc_words(D * max_rows);
    sc->kt = alloc_words(KEY_TILE * pool_row);
    sc->vt = alloc_words(KEY_TILE * pool_row);
    sc->s = alloc_words(KEY_TILE * max_rows);
    sc->m = alloc_words(max_rows);
    sc->m_new = alloc_words(max_rows);
    sc->l = alloc_words(max_rows);
    sc->alpha = alloc_words(max_rows);
    sc->qpos = alloc_words(max_rows);
    return sc->qt && sc->kt && sc->vt && sc->ot && sc->s && sc->m && sc->m_new && sc->l
           && sc->alpha && sc->qpos;
}

static void scratch_free(Scratch *sc)
{
    free(sc->qt);
    free(sc->ot);
    free(sc->kt);
    free(sc->vt);
    free(sc->s);
    free(sc->m);
    free(sc->m_new);
    free(sc->l);
    free(sc->alpha);
    free(sc->qpos);
}

/* Whether this build can take bfloat16 products (a bfloat16 pool's, with AVX512-BF16). */
int64_t prefill_attention_bf16_products(void) { return PREFILL_BF16; }

/* Returns 0, or -1 if out of memory (then out is not fully written). */
int prefill_attention(
    float *out,                   /* [T, Hq, D], only the listed requests' rows are written */
    const float *q,               /* [T, Hq, D], tokens q_stride floats apart */
    const kv_t *k_cache,          /* [num_blocks, block_size, Hkv, D] */
    const kv_t *v_cache,          /* [num_blocks, block_size, Hkv, D] */
    const int32_t *block_tables,  /* [B, max_blocks] */
    const int32_t *query_start_loc, /* [B + 1] */
    const int32_t *seq_lens,      /* [B] */
    const int32_t *reqs,          /* [num_reqs] indices of the requests to compute */
    int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t max_blocks, int64_t q_stride, float scale,
    int64_t bf16_products,       /* 1: bfloat16 products, where this build has them and D is 64
                                  * or 128 */
    int64_t window,              /* each row sees its last `window` positions; 0: all */
    float softcap)               /* scores become softcap * tanh(score / softcap); 0: none */
{
    const Problem pr = {
        out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        num_heads / num_kv_heads, head_dim, block_size, max_blocks,
        q_stride, num_heads * head_dim, num_kv_heads * head_dim, scale * 1.4426950408889634f,
        bf16_products && prefill_attention_bf16_products() && (head_dim == 64 || head_dim == 128),
        (int)window, softcap * 1.4426950408889634f,
    };
    int64_t count, max_rows;
    WorkItem *items = plan(&pr, reqs, num_reqs, num_kv_heads, &count, &max_rows);
    if (items == NULL) return -1;
    int failed = 0;

    #pragma omp parallel if(count > 1)
    {
        Scratch sc;
        const int ok = scratch_init(&sc, max_rows, head_dim, pr.pool_row);
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < count; i++) {
            if (!ok) continue;
            if (head_dim == 64)
                attend_64(&sc, &pr, &items[i]);
            else if (head_dim == 128)
                attend_128(&sc, &pr, &items[i]);
            else
                attend_any(&sc, &pr, &items[i]);
        }
        scratch_free(&sc);
    }
    free(items);
    return failed ? -1 : 0;
}

/* Decode attention over a paged KV cache, float32, for CPUs.
 *
 * One query token per sequence attends to its whole context, read straight from the block pools
 * through the block table (no gathered copy). Work is split over (sequence, kv head) pairs. A
 * pair's context is streamed from memory once, 16 keys at a time: the G = num_heads / num_kv_heads
 * query heads that share the kv head score the keys and fold its values into their
 * accumulators with an online softmax, while the next 16 are prefetched. Decode attention is
 * bound by memory bandwidth (every step reads the whole KV cache of the batch), so reading each
 * K/V row once, with the next block's loads already in flight, is what matters; the head size is
 * a compile-time constant so that the accumulators live in registers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

/* Query heads per kv head handled in one pass; larger groups take several passes. */
#define MAX_GROUP 8
/* Keys scored together (one vector of scores); larger blocks are split into chunks of this. */
#define CHUNK 16

typedef struct {
    const float *k_cache, *v_cache;
    const int32_t *table;
    int64_t len, block_size, row, block_stride, head_offset;
} Context;

/* Rows from position start on that lie in one block, at most CHUNK. */
static inline int64_t chunk_rows(int64_t start, int64_t len, int64_t bs)
{
    int64_t n = bs - start % bs;
    n = n < CHUNK ? n : CHUNK;
    return len - start < n ? len - start : n;
}

/* Offset in the pools of this head's row at context position pos. */
static inline int64_t row_offset(const Context *c, int64_t pos)
{
    return (int64_t)c->table[pos / c->block_size] * c->block_stride
           + (pos % c->block_size) * c->row + c->head_offset;
}

/* Ask for one K row and one V row of the next chunk while this one is scored: blocks are
 * scattered over the pool, so the hardware prefetcher cannot guess them, and one row per key
 * scored spreads the requests out instead of stalling on a burst of them. Non-temporal: each
 * row is read once per step. */
static inline void prefetch_row(const Context *c, int64_t off, int64_t vectors)
{
    for (int64_t j = 0; j < vectors; j++) {
        __builtin_prefetch(c->k_cache + off + j * 16, 0, 0);
        __builtin_prefetch(c->v_cache + off + j * 16, 0, 0);
    }
}

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p)
{
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Pairwise step of a 16 x 16 transpose-and-add: halves the number of vectors of partial sums. */
static inline v16 fold(v16 a, v16 b, i16 lo, i16 hi)
{
    return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

/* The 16 lane-sums of t[0..15], in order: a shuffle tree instead of 16 horizontal adds. */
static inline v16 sum_lanes_16(const v16 *t)
{
    const i16 lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const i16 hi1 = lo1 + 8;
    const i16 lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const i16 hi2 = lo2 + 4;
    const i16 lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const i16 hi3 = lo3 + 2;
    const i16 lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const i16 hi4 = lo4 + 1;
    v16 u[8], w[4], x[2];
    for (int j = 0; j < 8; j++) u[j] = fold(t[2 * j], t[2 * j + 1], lo1, hi1);
    for (int j = 0; j < 4; j++) w[j] = fold(u[2 * j], u[2 * j + 1], lo2, hi2);
    for (int j = 0; j < 2; j++) x[j] = fold(w[2 * j], w[2 * j + 1], lo3, hi3);
    return fold(x[0], x[1], lo4, hi4);
}

/* One (sequence, kv head) pair for a head size of NV * 16. q holds the group's pre-scaled
 * queries; m, l and acc each head's running max, sum and weighted values. */
#define DEFINE_ATTEND(NAME, NV)                                                               \
    static void NAME(float *out, const float *q, const Context *c, int64_t group)             \
    {                                                                                          \
        const int64_t len = c->len, bs = c->block_size, row = c->row;                          \
        float m[MAX_GROUP], l[MAX_GROUP];                                                      \
        v16 acc[MAX_GROUP][NV], qv[MAX_GROUP][NV], t[MAX_GROUP][CHUNK];                        \
        for (int64_t g = 0; g < group; g++) {                                                  \
            m[g] = -INFINITY;                                                                  \
            l[g] = 0.f;                                                                        \
            for (int j = 0; j < NV; j++) {                                                     \
                acc[g][j] = (v16){0};                                                          \
                qv[g][j] = load16(q + g * NV * 16 + j * 16);                                   \
            }                                                                                  \
        }                                                                                      \
        for (int64_t start = 0, n; start < len; start += n) {                                  \
            n = chunk_rows(start, len, bs);                                                    \
            const int64_t off = row_offset(c, start);                                          \
            const float *kb = c->k_cache + off, *vb = c->v_cache + off;                        \
            const int64_t ahead_n = start + n < len ? chunk_rows(start + n, len, bs) : 0;      \
            const int64_t ahead_off = ahead_n ? row_offset(c, start + n) : 0;                  \
            for (int64_t i = 0; i < CHUNK; i++) {                                              \
                if (i < ahead_n) prefetch_row(c, ahead_off + i * row, NV);                     \
                v16 k[NV];                                                                     \
                for (int j = 0; j < NV; j++) k[j] = i < n ? load16(kb + i * row + j * 16)      \
                                                          : (v16){0};                          \
                for (int64_t g = 0; g < group; g++) {                                          \
                    v16 dot = qv[g][0] * k[0];                                                 \
                    for (int j = 1; j < NV; j++) dot += qv[g][j] * k[j];                       \
                    t[g][i] = dot;                                                             \
                }                                                                              \
            }                                                                                  \
            for (int64_t g = 0; g < group; g++) {                                              \
                float s[CHUNK];                                                                \
                const v16 sv = sum_lanes_16(t[g]);                                             \
                memcpy(s, &sv, sizeof s);                                                      \
                float bm = m[g];                                                               \
                for (int64_t i = 0; i < n; i++) bm = s[i] > bm ? s[i] : bm;                    \
                const float alpha = exp_f32(m[g] - bm);                                        \
                float sum = 0.f;                                                               \
                _Pragma("omp simd reduction(+:sum)")                                           \
                for (int64_t i = 0; i < CHUNK; i++) {                                          \
                    s[i] = i < n ? exp_f32(s[i] - bm) : 0.f;                                   \
                    sum += s[i];                                                               \
                }                                                                              \
                l[g] = l[g] * alpha + sum;                                                     \
                m[g] = bm;                                                                     \
                v16 a[NV];                                                                     \
                for (int j = 0; j < NV; j++) a[j] = acc[g][j] * alpha;                         \
                for (int64_t i = 0; i < n; i++) {                                              \
                    const float *v = vb + i * row;                                             \
                    for (int j = 0; j < NV; j++) a[j] += s[i] * load16(v + j * 16);            \
                }                                                                              \
                for (int j = 0; j < NV; j++) acc[g][j] = a[j];                                 \
            }                                                                                  \
        }                                                                                      \
        for (int64_t g = 0; g < group; g++) {                                                  \
            const float inv = 1.f / l[g];                                                      \
            for (int j = 0; j < NV; j++) {                                                     \
                const v16 o = acc[g][j] * inv;                                                 \
                memcpy(out + g * NV * 16 + j * 16, &o, sizeof o);                              \
            }                                                                                  \
        }                                                                                      \
    }

DEFINE_ATTEND(attend_16, 1)
DEFINE_ATTEND(attend_32, 2)
DEFINE_ATTEND(attend_48, 3)
DEFINE_ATTEND(attend_64, 4)
DEFINE_ATTEND(attend_80, 5)
DEFINE_ATTEND(attend_96, 6)
DEFINE_ATTEND(attend_112, 7)
DEFINE_ATTEND(attend_128, 8)

typedef void (*attend_fn)(float *, const float *, const Context *, int64_t);

/* The kernel for a head size, or NULL: only multiples of 16 up to 128 are built. */
static attend_fn attend_for(int64_t head_dim)
{
    static const attend_fn by_vectors[] = {
        NULL, attend_16, attend_32, attend_48, attend_64, attend_80, attend_96, attend_112,
        attend_128,
    };
    return head_dim % 16 == 0 && head_dim <= 128 ? by_vectors[head_dim / 16] : NULL;
}

/* 1 if paged_decode_attention_f32 handles this head size. */
int paged_decode_attention_supports(int64_t head_dim)
{
    return attend_for(head_dim) != NULL;
}

void paged_decode_attention_f32(
    float *out,                 /* [B, Hq, D] */
    const float *q,             /* [B, Hq, D] */
    const float *k_cache,       /* [num_blocks, block_size, Hkv, D] */
    const float *v_cache,       /* [num_blocks, block_size, Hkv, D] */
    const int32_t *block_tables,/* [B, max_blocks] */
    const int32_t *seq_lens,    /* [B] */
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t max_blocks, float scale)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row = num_kv_heads * head_dim;
    const int64_t passes = (group + MAX_GROUP - 1) / MAX_GROUP;
    const attend_fn attend = attend_for(head_dim);
    if (attend == NULL) return;

    #pragma omp parallel
    {
        float *qs = malloc(sizeof(float) * MAX_GROUP * head_dim);

        #pragma omp for schedule(dynamic, num_kv_heads * passes)
        for (int64_t work = 0; work < num_seqs * num_kv_heads * passes; work++) {
            const int64_t b = work / (num_kv_heads * passes);
            const int64_t h = work / passes % num_kv_heads, pass = work % passes;
            const int64_t first = pass * MAX_GROUP;
            const int64_t heads = group - first < MAX_GROUP ? group - first : MAX_GROUP;
            const Context c = {
                k_cache, v_cache, block_tables + b * max_blocks, seq_lens[b], block_size, row,
                block_size * row, h * head_dim,
            };
            const int64_t offset = (b * num_heads + h * group + first) * head_dim;
            for (int64_t i = 0; i < heads * head_dim; i++) qs[i] = q[offset + i] * scale;
            attend(out + offset, qs, &c, heads);
        }
        free(qs);
    }
}

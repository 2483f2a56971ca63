/* Decode attention over a paged KV cache, float32, for CPUs.
 *
 * One query token per sequence attends to its whole context, read straight from the block pools
 * through the block table (no gathered copy). Work is split over (sequence, kv head) pairs. For
 * each of the G = num_heads / num_kv_heads query heads of a pair, one pass over K gives the
 * scores and one pass over V the weighted sum; the pair's K/V (tens of KiB) stay in L2 between
 * heads, and with the head size a compile-time constant the accumulators live in registers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *k_cache, *v_cache;
    const int32_t *table;
    int64_t len, block_size, row, block_stride, head_offset;
    float scale;
} Context;

/* Ask for the next block's rows of this head while the current block is processed: blocks are
 * scattered over the pool, so the hardware prefetcher cannot guess them. */
static inline void prefetch_block(const Context *c, const float *cache, int64_t block, int64_t D)
{
    const float *base = cache + (int64_t)c->table[block] * c->block_stride + c->head_offset;
    for (int64_t i = 0; i < c->block_size; i++)
        for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(base + i * c->row + d, 0, 1);
}

#define DEFINE_ATTEND(NAME, D_EXPR)                                                           \
    static void NAME(float *out, const float *q, const Context *c, int64_t group,              \
                     int64_t head_dim_arg, float *scores)                                      \
    {                                                                                          \
        const int64_t D = (D_EXPR);                                                            \
        const int64_t len = c->len, bs = c->block_size;                                        \
        for (int64_t g = 0; g < group; g++) {                                                  \
            const float *qg = q + g * D;                                                       \
            float *s = scores;                                                                 \
            float m = -INFINITY;                                                               \
            for (int64_t start = 0; start < len; start += bs) {                                \
                const float *base = c->k_cache + (int64_t)c->table[start / bs] * c->block_stride \
                                    + c->head_offset;                                          \
                const int64_t n = len - start < bs ? len - start : bs;                         \
                if (g == 0 && start + bs < len) prefetch_block(c, c->k_cache, start / bs + 1, D); \
                for (int64_t i = 0; i < n; i++) {                                              \
                    const float *k = base + i * c->row;                                        \
                    float dot = 0.f;                                                           \
                    _Pragma("omp simd reduction(+:dot)")                                       \
                    for (int64_t d = 0; d < D; d++) dot += qg[d] * k[d];                       \
                    dot *= c->scale;                                                           \
                    s[start + i] = dot;                                                        \
                    m = dot > m ? dot : m;                                                     \
                }                                                                              \
            }                                                                                  \
            float sum = 0.f;                                                                   \
            for (int64_t t = 0; t < len; t++) { s[t] = expf(s[t] - m); sum += s[t]; }          \
            const float inv = 1.f / sum;                                                       \
            float acc[D];                                                                      \
            for (int64_t d = 0; d < D; d++) acc[d] = 0.f;                                      \
            for (int64_t start = 0; start < len; start += bs) {                                \
                const float *base = c->v_cache + (int64_t)c->table[start / bs] * c->block_stride \
                                    + c->head_offset;                                          \
                const int64_t n = len - start < bs ? len - start : bs;                         \
                if (g == 0 && start + bs < len) prefetch_block(c, c->v_cache, start / bs + 1, D); \
                for (int64_t i = 0; i < n; i++) {                                              \
                    const float *v = base + i * c->row;                                        \
                    const float w = s[start + i];                                              \
                    _Pragma("omp simd")                                                        \
                    for (int64_t d = 0; d < D; d++) acc[d] += w * v[d];                        \
                }                                                                              \
            }                                                                                  \
            for (int64_t d = 0; d < D; d++) out[g * D + d] = acc[d] * inv;                     \
        }                                                                                      \
    }

DEFINE_ATTEND(attend_64, 64)
DEFINE_ATTEND(attend_128, 128)
DEFINE_ATTEND(attend_any, head_dim_arg)

void paged_decode_attention_f32(
    float *out,                 /* [B, Hq, D] */
    const float *q,             /* [B, Hq, D] */
    const float *k_cache,       /* [num_blocks, block_size, Hkv, D] */
    const float *v_cache,       /* [num_blocks, block_size, Hkv, D] */
    const int32_t *block_tables,/* [B, max_blocks] */
    const int32_t *seq_lens,    /* [B] */
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t max_blocks, int64_t max_seq_len, float scale)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row = num_kv_heads * head_dim;

    #pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (max_seq_len > 0 ? max_seq_len : 1));

        #pragma omp for schedule(dynamic, 4)
        for (int64_t work = 0; work < num_seqs * num_kv_heads; work++) {
            const int64_t b = work / num_kv_heads, h = work % num_kv_heads;
            const Context c = {
                k_cache, v_cache, block_tables + b * max_blocks, seq_lens[b], block_size, row,
                block_size * row, h * head_dim, scale,
            };
            const int64_t offset = (b * num_heads + h * group) * head_dim;
            if (head_dim == 64)
                attend_64(out + offset, q + offset, &c, group, head_dim, scores);
            else if (head_dim == 128)
                attend_128(out + offset, q + offset, &c, group, head_dim, scores);
            else
                attend_any(out + offset, q + offset, &c, group, head_dim, scores);
        }
        free(scores);
    }
}

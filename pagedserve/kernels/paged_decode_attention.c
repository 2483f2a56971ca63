/* Decode attention over a paged KV cache, float32, for CPUs.
 *
 * One query token per sequence attends to its whole context, read straight from the block pools
 * through the block table (no gathered copy). Work is split over (sequence, kv head) pairs; the
 * G = num_heads / num_kv_heads query heads of a pair share each K/V row they read.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    const int64_t row = num_kv_heads * head_dim;          /* floats between tokens */
    const int64_t block_stride = block_size * row;

    #pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * group * (max_seq_len > 0 ? max_seq_len : 1));
        float *acc = malloc(sizeof(float) * group * head_dim);

        #pragma omp for schedule(dynamic, 1)
        for (int64_t work = 0; work < num_seqs * num_kv_heads; work++) {
            const int64_t b = work / num_kv_heads, h = work % num_kv_heads;
            const int64_t len = seq_lens[b];
            const int32_t *table = block_tables + b * max_blocks;
            const float *qb = q + (b * num_heads + h * group) * head_dim;

            for (int64_t t = 0; t < len; t++) {
                const float *k = k_cache + table[t / block_size] * block_stride
                                 + (t % block_size) * row + h * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float *qg = qb + g * head_dim;
                    float dot = 0.f;
                    #pragma omp simd reduction(+:dot)
                    for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * k[d];
                    scores[g * len + t] = dot * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *s = scores + g * len, m = -INFINITY, sum = 0.f;
                for (int64_t t = 0; t < len; t++) m = s[t] > m ? s[t] : m;
                for (int64_t t = 0; t < len; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
                const float inv = 1.f / sum;
                for (int64_t t = 0; t < len; t++) s[t] *= inv;
            }
            memset(acc, 0, sizeof(float) * group * head_dim);
            for (int64_t t = 0; t < len; t++) {
                const float *v = v_cache + table[t / block_size] * block_stride
                                 + (t % block_size) * row + h * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float w = scores[g * len + t];
                    float *a = acc + g * head_dim;
                    #pragma omp simd
                    for (int64_t d = 0; d < head_dim; d++) a[d] += w * v[d];
                }
            }
            memcpy(out + (b * num_heads + h * group) * head_dim, acc,
                   sizeof(float) * group * head_dim);
        }
        free(scores);
        free(acc);
    }
}

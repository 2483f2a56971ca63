/* Decode attention over a paged KV cache, for CPUs: float32 queries and outputs, pools of
 * kv_t (float32, float16 or bfloat16; see kv_element.h).
 *
 * One query token per sequence attends to its whole context (or, with a sliding window of W, to
 * its last W positions), read straight from the block pools through the block table (no
 * gathered copy). Work is split over (sequence, kv head) pairs. A
 * pair's context is streamed from memory once, 16 keys at a time: the G = num_heads / num_kv_heads
 * query heads that share the kv head score the keys and fold its values into their
 * accumulators with an online softmax, while rows further on are prefetched. Decode attention
 * is bound by memory (every step reads the whole KV cache of the batch), so reading each K/V row
 * once, with later loads already in flight, matters most; after that the arithmetic, which does
 * not overlap the loads much: head size and group size are compile-time constants so that the
 * accumulators live in registers and the loops unroll. Soft-capped scores (Gemma 2's
 * cap * tanh(score / cap)) have kernels of their own, so that the others carry no branch for it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "fast_exp.h"
#include "kv_element.h"

/* Query heads per kv head handled in one pass (each group size 1..MAX_GROUP has its own
 * compiled kernel, so that every per-head array is a register); larger groups take several
 * passes. */
#define MAX_GROUP 8
/* Keys scored together (one vector of scores); larger blocks are split into chunks of this. */
#define CHUNK 16

typedef struct {
    const kv_t *k_cache, *v_cache;
    const int32_t *table;
    int64_t len, block_size, row, block_stride, head_offset;
    int64_t first; /* the first position attended: 0, or len - window past a sliding window */
    float cap;     /* the soft cap of the kernels built with one */
} Context;

/* The first position a query at the end of a len-position context sees (window 0: none). */
static inline int64_t window_start(int64_t len, int64_t window)
{
    return window > 0 && len > window ? len - window : 0;
}

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

/* The position in the next work item's context that a look-ahead to position pos of a context
 * of len positions falls on: the start of the chunk as far past that item's start. */
static inline int64_t first_chunk_past(int64_t pos, int64_t len)
{
    return (pos - len + CHUNK - 1) / CHUNK * CHUNK;
}

/* Ask for one row of a chunk two chunks ahead: blocks are scattered over the pool, so the
 * hardware prefetcher cannot guess them. K rows are requested while keys are scored and V rows
 * while values are summed, one row per key handled, which spreads the requests over the whole
 * chunk instead of stalling on a burst of them. Two chunks ahead measured as good as or a little
 * better than one or four (a 30-layer step at 64 sequences x 192 tokens: 17.0 ms; with no
 * prefetch 23 ms). */
#define PREFETCH_CHUNKS 2

static inline void prefetch_row(const kv_t *pool, int64_t off, int64_t vectors)
{
    const int64_t per_line = 64 / sizeof(kv_t);
    for (int64_t j = 0; j < vectors * 16; j += per_line) __builtin_prefetch(pool + off + j, 0, 3);
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
static inline __attribute__((always_inline)) v16 sum_lanes_16(const v16 *t)
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

/* One (sequence, kv head) pair for a head size of NV * 16 and G query heads per kv head (CAP 1:
 * scores soft-capped by c->cap); q holds the group's pre-scaled queries. Per chunk of keys: every head's scores (a shuffle-tree lane
 * sum), an online-softmax update of its running max m, sum lv and weighted values acc, then each
 * V row is loaded once and folded into all G accumulators. The running sum is kept per lane and
 * added up once at the end (a horizontal sum per chunk cost 15% of the arithmetic). Past the
 * end of a short chunk the last real K row is re-read (its scores are masked), so the loop has
 * no branches on loads. */
#define DEFINE_ATTEND(NAME, NV, G, CAP)                                                       \
    static void NAME(float *out, const float *q, const Context *c, const Context *next)       \
    {                                                                                          \
        const int64_t len = c->len, bs = c->block_size, row = c->row;                          \
        float m[G];                                                                            \
        v16 lv[G];                                                                             \
        v16 acc[G][NV], qv[G][NV];                                                             \
        for (int g = 0; g < G; g++) {                                                          \
            m[g] = -INFINITY;                                                                  \
            lv[g] = (v16){0};                                                                  \
            for (int j = 0; j < NV; j++) {                                                     \
                acc[g][j] = (v16){0};                                                          \
                qv[g][j] = load16(q + g * NV * 16 + j * 16);                                   \
            }                                                                                  \
        }                                                                                      \
        for (int64_t start = c->first, n; start < len; start += n) {                           \
            n = chunk_rows(start, len, bs);                                                    \
            const int64_t off = row_offset(c, start);                                          \
            const kv_t *kb = c->k_cache + off, *vb = c->v_cache + off;                         \
            const int64_t ahead_pos = start + n + (PREFETCH_CHUNKS - 1) * CHUNK;               \
            const Context *ahead = ahead_pos < len ? c : next;                                 \
            const int64_t past = first_chunk_past(ahead_pos, len);                             \
            const int64_t ahead_at = ahead == c ? ahead_pos : ahead ? ahead->first + past : 0; \
            const int64_t ahead_n = ahead && ahead_at < ahead->len                             \
                                        ? chunk_rows(ahead_at, ahead->len, ahead->block_size)  \
                                        : 0;                                                   \
            const int64_t ahead_off = ahead_n ? row_offset(ahead, ahead_at) : 0;               \
            v16 t[G][CHUNK];                                                                   \
            for (int i = 0; i < CHUNK; i++) {                                                  \
                if (i < ahead_n) prefetch_row(c->k_cache, ahead_off + i * row, NV);            \
                const kv_t *kr = kb + (i < n ? i : n - 1) * row;                               \
                v16 k[NV];                                                                     \
                for (int j = 0; j < NV; j++) k[j] = kv_load16(kr + j * 16);                    \
                for (int g = 0; g < G; g++) {                                                  \
                    v16 dot = qv[g][0] * k[0];                                                 \
                    for (int j = 1; j < NV; j++) dot += qv[g][j] * k[j];                       \
                    t[g][i] = dot;                                                             \
                }                                                                              \
            }                                                                                  \
            float p[G][CHUNK];                                                                 \
            for (int g = 0; g < G; g++) {                                                      \
                const v16 sv = sum_lanes_16(t[g]);                                             \
                float *s = p[g];                                                               \
                memcpy(s, &sv, sizeof sv);                                                     \
                if (CAP) {                                                                     \
                    const float cap = c->cap, inv = 1.f / cap;                                 \
                    _Pragma("omp simd")                                                        \
                    for (int i = 0; i < CHUNK; i++) s[i] = cap * tanh_f32(s[i] * inv);         \
                }                                                                              \
                float bm = m[g];                                                               \
                _Pragma("omp simd reduction(max:bm)")                                          \
                for (int i = 0; i < CHUNK; i++) bm = (i < n && s[i] > bm) ? s[i] : bm;         \
                const float alpha = exp_f32(m[g] - bm);                                        \
                _Pragma("omp simd")                                                            \
                for (int i = 0; i < CHUNK; i++) s[i] = i < n ? exp_f32(s[i] - bm) : 0.f;       \
                lv[g] = lv[g] * alpha + load16(s);                                             \
                m[g] = bm;                                                                     \
                for (int j = 0; j < NV; j++) acc[g][j] *= alpha;                               \
            }                                                                                  \
            for (int64_t i = 0; i < n; i++) {                                                  \
                if (i < ahead_n) prefetch_row(c->v_cache, ahead_off + i * row, NV);            \
                v16 v[NV];                                                                     \
                for (int j = 0; j < NV; j++) v[j] = kv_load16(vb + i * row + j * 16);          \
                for (int g = 0; g < G; g++)                                                    \
                    for (int j = 0; j < NV; j++) acc[g][j] += p[g][i] * v[j];                  \
            }                                                                                  \
        }                                                                                      \
        for (int g = 0; g < G; g++) {                                                          \
            float ls[16], sum = 0.f;                                                           \
            memcpy(ls, &lv[g], sizeof ls);                                                     \
            for (int i = 0; i < 16; i++) sum += ls[i];                                         \
            const float inv = 1.f / sum;                                                       \
            for (int j = 0; j < NV; j++) {                                                     \
                const v16 o = acc[g][j] * inv;                                                 \
                memcpy(out + g * NV * 16 + j * 16, &o, sizeof o);                              \
            }                                                                                  \
        }                                                                                      \
    }

typedef void (*attend_fn)(float *, const float *, const Context *, const Context *);

#define DEFINE_FOR_GROUPS(NV, CAP, SUFFIX)                                                    \
    DEFINE_ATTEND(attend_##NV##SUFFIX##_1, NV, 1, CAP)                                        \
    DEFINE_ATTEND(attend_##NV##SUFFIX##_2, NV, 2, CAP)                                        \
    DEFINE_ATTEND(attend_##NV##SUFFIX##_3, NV, 3, CAP)                                        \
    DEFINE_ATTEND(attend_##NV##SUFFIX##_4, NV, 4, CAP)                                        \
    DEFINE_ATTEND(attend_##NV##SUFFIX##_5, NV, 5, CAP)                                        \
    DEFINE_ATTEND(attend_##NV##SUFFIX##_6, NV, 6, CAP)                                        \
    DEFINE_ATTEND(attend_##NV##SUFFIX##_7, NV, 7, CAP)                                        \
    DEFINE_ATTEND(attend_##NV##SUFFIX##_8, NV, 8, CAP)
#define GROUPS(NAME)                                                                          \
    {NAME##_1, NAME##_2, NAME##_3, NAME##_4, NAME##_5, NAME##_6, NAME##_7, NAME##_8}
#define NONE {NULL}

DEFINE_FOR_GROUPS(1, 0, )
DEFINE_FOR_GROUPS(2, 0, )
DEFINE_FOR_GROUPS(3, 0, )
DEFINE_FOR_GROUPS(4, 0, )
DEFINE_FOR_GROUPS(5, 0, )
DEFINE_FOR_GROUPS(6, 0, )
DEFINE_FOR_GROUPS(7, 0, )
DEFINE_FOR_GROUPS(8, 0, )
DEFINE_FOR_GROUPS(16, 0, )
/* Soft caps: Gemma 2's head sizes, 128 (27B) and 256 (2B, 9B). */
DEFINE_FOR_GROUPS(8, 1, _capped)
DEFINE_FOR_GROUPS(16, 1, _capped)

/* The kernel for a head size, group size (1..MAX_GROUP) and soft cap or none, or NULL: built are
 * the multiples of 16 up to 128 and 256, with a cap 128 and 256. */
static attend_fn attend_for(int64_t head_dim, int64_t group, int capped)
{
    static const attend_fn plain[16][MAX_GROUP] = {
        GROUPS(attend_1), GROUPS(attend_2), GROUPS(attend_3), GROUPS(attend_4),
        GROUPS(attend_5), GROUPS(attend_6), GROUPS(attend_7), GROUPS(attend_8),
        NONE, NONE, NONE, NONE, NONE, NONE, NONE, GROUPS(attend_16),
    };
    static const attend_fn with_cap[16][MAX_GROUP] = {
        NONE, NONE, NONE, NONE, NONE, NONE, NONE, GROUPS(attend_8_capped),
        NONE, NONE, NONE, NONE, NONE, NONE, NONE, GROUPS(attend_16_capped),
    };
    if (head_dim % 16 != 0 || head_dim < 16 || head_dim > 256 || group < 1) return NULL;
    const attend_fn(*table)[MAX_GROUP] = capped ? with_cap : plain;
    return table[head_dim / 16 - 1][(group < MAX_GROUP ? group : MAX_GROUP) - 1];
}

/* 1 if paged_decode_attention handles this head size, with a soft cap or without. */
int paged_decode_attention_supports(int64_t head_dim, int64_t capped)
{
    return attend_for(head_dim, 1, capped != 0) != NULL;
}

typedef struct {
    const kv_t *k_cache, *v_cache;
    const int32_t *block_tables, *seq_lens;
    int64_t num_seqs, max_blocks, block_size, row, head_dim, per_seq, passes, window;
    float cap;
} Problem;

/* The keys sequence b's query attends. */
static inline int64_t keys_of(const Problem *p, int64_t b)
{
    return p->seq_lens[b] - window_start(p->seq_lens[b], p->window);
}

/* Work item w is (sequence, kv head, pass): per_seq = num_kv_heads * passes items a sequence. */
static Context context_of(const Problem *p, int64_t w)
{
    const int64_t b = w / p->per_seq, h = w % p->per_seq / p->passes;
    const Context c = {
        p->k_cache, p->v_cache, p->block_tables + b * p->max_blocks, p->seq_lens[b],
        p->block_size, p->row, p->block_size * p->row, h * p->head_dim,
        window_start(p->seq_lens[b], p->window), p->cap,
    };
    return c;
}

/* The first work item whose keys start at or after `target` in the running count of keys over
 * all items (items in order, each sequence's items weighing its length). */
static int64_t item_at(const Problem *p, const int64_t *before, int64_t target)
{
    int64_t lo = 0, hi = p->num_seqs * p->per_seq;
    while (lo < hi) {
        const int64_t w = (lo + hi) / 2, b = w / p->per_seq;
        const int64_t start = before[b] * p->per_seq + w % p->per_seq * keys_of(p, b);
        if (start < target) lo = w + 1;
        else hi = w;
    }
    return lo;
}

void paged_decode_attention(
    float *out,                 /* [B, Hq, D] */
    const float *q,             /* [B, Hq, D], sequences q_stride floats apart */
    const kv_t *k_cache,        /* [num_blocks, block_size, Hkv, D] */
    const kv_t *v_cache,        /* [num_blocks, block_size, Hkv, D] */
    const int32_t *block_tables,/* [B, max_blocks] */
    const int32_t *seq_lens,    /* [B] */
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    int64_t block_size, int64_t max_blocks, float scale, int64_t q_stride,
    int64_t window,             /* each query sees its last `window` positions; 0: all */
    float softcap               /* scores become softcap * tanh(score / softcap); 0: none */)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t passes = (group + MAX_GROUP - 1) / MAX_GROUP;
    const int capped = softcap > 0.f;
    if (attend_for(head_dim, 1, capped) == NULL || num_seqs == 0) return;
    const Problem p = {
        k_cache, v_cache, block_tables, seq_lens, num_seqs, max_blocks, block_size,
        num_kv_heads * head_dim, head_dim, num_kv_heads * passes, passes, window, softcap,
    };
    /* Keys of the sequences before each one. */
    int64_t *before = malloc(sizeof(int64_t) * (num_seqs + 1));
    before[0] = 0;
    for (int64_t b = 0; b < num_seqs; b++) before[b + 1] = before[b] + keys_of(&p, b);
    const int64_t total = before[num_seqs] * p.per_seq;

    /* Each thread takes one contiguous run of work items holding an equal share of the keys,
     * rather than items handed out one at a time, so that it knows its next item: the
     * look-ahead crosses into it instead of starting each item cold (30 layers x 64 sequences
     * x 192 tokens, three alternating runs: 17.7-18.8 ms handed out, 17.1-18.2 ms in runs). */
    #pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t end = item_at(&p, before, total * (me + 1) / threads);
        float *qs = malloc(sizeof(float) * MAX_GROUP * head_dim);
        for (int64_t w = item_at(&p, before, total * me / threads); w < end; w++) {
            const int64_t b = w / p.per_seq, pass = w % passes;
            const int64_t first = pass * MAX_GROUP;
            const int64_t heads = group - first < MAX_GROUP ? group - first : MAX_GROUP;
            const int64_t head = (w % p.per_seq / passes * group + first) * head_dim;
            const float *qh = q + b * q_stride + head;
            for (int64_t i = 0; i < heads * head_dim; i++) qs[i] = qh[i] * scale;
            const Context c = context_of(&p, w), next = context_of(&p, w + 1 < end ? w + 1 : w);
            attend_for(head_dim, heads, capped)(out + b * num_heads * head_dim + head, qs, &c,
                                        w + 1 < end ? &next : NULL);
        }
        free(qs);
    }
    free(before);
}

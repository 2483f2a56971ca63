/* y = x W^T (+ b) for the model's projections, float32, for CPUs, with W packed once at load.
 *
 * W [n, k] (the checkpoint's [out, in]) is repacked into panels of NR output columns, each
 * panel [k][NR] contiguous (the last one zero-padded), so that the micro-kernel streams one
 * panel front to back: per k, NR weights (two vectors) times MR rows of x (broadcast scalars)
 * into MR x 2 vector accumulators that stay in registers for the whole k loop. Each panel is
 * reused from cache by every tile of rows, and while the first tile runs, the next panel is
 * prefetched. Rows go in tiles of at most MR, balanced (64 rows with MR = 14: five tiles of 13
 * or 12, not four of 14 and one of 8). How the threads share the work depends on the rows:
 *   - few rows (decode steps): the threads split the panels, so that the weights stream from
 *     memory once per step, with their loads in flight while the arithmetic runs;
 *   - many rows (prefill chunks, SPLIT_ROWS_MIN per thread and more): each thread takes its own
 *     rows, in slices small enough to stay in its L2 while it walks all the panels (which come
 *     from the shared L3 for the slices after the first). When the threads split the panels
 *     instead, every thread reads every row of x, half of it just written by the other core,
 *     and streams it from L3 panel after panel: at 1024 rows that measured 3-5% slower.
 *   Either way each output is the same sum in the same order, so results do not depend on it.
 *
 * A gated weight (the stacked gate and up projections of a SwiGLU MLP, [2d, k]) is packed so
 * that a panel's first vector of columns holds gate features and its second the up features
 * of the same indices; the tile then stores silu(gate) * up, [m, d], and the [m, 2d] product
 * is never written out.
 *
 * Measured on this project's 2-core AVX-512 machine against oneDNN's prepacked fp32 matmul
 * (torch.ops.mkldnn._linear_pointwise), SmolLM2-135M shapes, weights cold: at 64 rows (a decode
 * step of 64 sequences) 1.2-1.45x the GFLOP/s, which took that step from 74-78 to 66 ms; at
 * 1024 rows (a prefill chunk) 1.0-1.03x; at 1 row both stream the weights at memory speed.
 *
 * Portable C11 with GCC vector extensions: the vector width and the tile height follow the
 * target (AVX-512 and aarch64 have 32 vector registers, others 16).
 */
/* a * b + c as one fused multiply-add: the project builds with -std=c11, which turns GCC's
 * contraction off; with it the micro-kernel is one instruction per multiply-add. */
#pragma GCC optimize("fp-contract=fast")

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"
#include "vector_width.h"

#if MANY_VECTOR_REGISTERS
#define MR 14
#else
#define MR 6
#endif
#define NR (2 * VL)
/* Rows of x per pass over the panels: bounds the slice of x that the tiles re-read. */
#define ROW_BLOCK 512
/* Rows per thread from which the threads split the rows instead of the panels. */
#define SPLIT_ROWS_MIN 128
/* Bytes of x per pass over the panels when the threads split the rows: a quarter of a 1 MiB
 * L2, so that a thread's slice stays there beside the panel it streams. */
#define ROW_SLICE_BYTES (256 * 1024)

static inline vf load_v(const float *p)
{
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Output columns per panel, NR (a gated panel: VL). A panel is k rows of NR floats, so packed
 * weights hold ceil(n / NR) * k * NR floats (gated, [2d, k]: ceil(d / VL) * k * NR). */
int64_t packed_gemm_panel_width(int64_t gated)
{
    return gated ? VL : NR;
}

/* packed [panels][k][NR] <- w [n, k], padded with zero columns. Gated (n = 2d): panel p holds
 * gate rows p * VL ... in its first VL columns and the up rows d + p * VL ... in the rest. */
void packed_gemm_pack_f32(float *packed, const float *w, int64_t n, int64_t k, int64_t gated)
{
    const int64_t width = gated ? VL : NR, outputs = gated ? n / 2 : n;
    const int64_t panels = (outputs + width - 1) / width;
    #pragma omp parallel for
    for (int64_t p = 0; p < panels; p++) {
        float *panel = packed + p * k * NR;
        for (int64_t j = 0; j < NR; j++) {
            const int64_t feature = gated ? p * VL + j % VL : p * NR + j;
            const int64_t row = gated ? j / VL * outputs + feature : feature;
            for (int64_t kk = 0; kk < k; kk++)
                panel[kk * NR + j] = feature < outputs ? w[row * k + kk] : 0.f;
        }
    }
}

/* The first `cols` of a tile row: the two accumulator vectors side by side, or, gated,
 * silu(gate) * up of the pair (the same expression as elementwise.c's silu_and_mul). */
static inline void store_row(float *y, vf a0, vf a1, int64_t cols, int64_t gated)
{
    float out[NR];
    memcpy(out, &a0, sizeof a0);
    memcpy(out + VL, &a1, sizeof a1);
    if (gated) {
        #pragma omp simd
        for (int i = 0; i < VL; i++) out[i] = out[i] / (1.f + exp_f32(-out[i])) * out[VL + i];
    }
    memcpy(y, out, sizeof(float) * cols);
}

/* One tile: ROWS rows of x (k apart) times one panel into y (n apart), cols of them stored.
 * bias0 / bias1, if not NULL, are the biases of the panel's two column vectors (cols real
 * entries each when gated); next, if not NULL, is the panel to prefetch meanwhile. */
#define DEFINE_TILE(ROWS)                                                                      \
    static void tile_##ROWS(float *y, int64_t n, const float *x, const float *panel,          \
                            const float *bias0, const float *bias1, int64_t k, int64_t cols,   \
                            int64_t gated, const float *next)                                  \
    {                                                                                          \
        vf acc[ROWS][2];                                                                       \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = (vf){0};                        \
        for (int64_t kk = 0; kk < k; kk++) {                                                   \
            if (next) {                                                                        \
                __builtin_prefetch(next + kk * NR, 0, 3);                                      \
                __builtin_prefetch(next + kk * NR + VL, 0, 3);                                 \
            }                                                                                  \
            const vf w0 = load_v(panel + kk * NR), w1 = load_v(panel + kk * NR + VL);          \
            for (int r = 0; r < ROWS; r++) {                                                   \
                const float a = x[r * k + kk];                                                 \
                acc[r][0] += a * w0;                                                           \
                acc[r][1] += a * w1;                                                           \
            }                                                                                  \
        }                                                                                      \
        if (bias0) {                                                                           \
            float padded[NR] = {0};                                                            \
            const int64_t first = gated ? cols : (cols < VL ? cols : VL);                       \
            memcpy(padded, bias0, sizeof(float) * first);                                      \
            memcpy(padded + VL, bias1, sizeof(float) * (gated ? cols : cols - first));          \
            const vf b0 = load_v(padded), b1 = load_v(padded + VL);                            \
            for (int r = 0; r < ROWS; r++) {                                                   \
                acc[r][0] += b0;                                                               \
                acc[r][1] += b1;                                                               \
            }                                                                                  \
        }                                                                                      \
        for (int r = 0; r < ROWS; r++) store_row(y + r * n, acc[r][0], acc[r][1], cols, gated); \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)
#if MR > 6
DEFINE_TILE(7)
DEFINE_TILE(8)
DEFINE_TILE(9)
DEFINE_TILE(10)
DEFINE_TILE(11)
DEFINE_TILE(12)
DEFINE_TILE(13)
DEFINE_TILE(14)
#endif

typedef void (*tile_fn)(float *, int64_t, const float *, const float *, const float *,
                        const float *, int64_t, int64_t, int64_t, const float *);

static const tile_fn tiles[MR + 1] = {
    NULL, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
#if MR > 6
    tile_7, tile_8, tile_9, tile_10, tile_11, tile_12, tile_13, tile_14,
#endif
};

/* Rows first .. first + rows of y (n apart) = those of x (k apart) times panel p, in balanced
 * tiles of at most MR rows; the first tile prefetches panel p + 1. */
static void rows_times_panel(float *y, const float *x, const float *packed, const float *bias,
                             int64_t n, int64_t k, int64_t gated, int64_t p, int64_t first,
                             int64_t rows)
{
    const int64_t width = gated ? VL : NR, panels = (n + width - 1) / width;
    const float *panel = packed + p * k * NR;
    const float *next = p + 1 < panels ? panel + k * NR : NULL;
    const int64_t cols = n - p * width < width ? n - p * width : width;
    const float *b0 = bias ? bias + p * width : NULL;
    const float *b1 = bias ? (gated ? b0 + n : b0 + VL) : NULL;
    const int64_t ntiles = (rows + MR - 1) / MR;
    for (int64_t t = 0, i = first; t < ntiles; t++) {
        const int64_t left = first + rows - i, tiles_left = ntiles - t;
        const int64_t here = (left + tiles_left - 1) / tiles_left;
        tiles[here](y + i * n + p * width, n, x + i * k, panel, b0, b1, k, cols, gated,
                    t == 0 ? next : NULL);
        i += here;
    }
}

/* y [m, n] = x [m, k] W^T (+ bias [n]), W packed by packed_gemm_pack_f32; x and y contiguous.
 * Gated: W was [2n, k], bias [2n], and y = silu(x Wg^T + bg) * (x Wu^T + bu). */
void packed_gemm_f32(float *y, const float *x, const float *packed, const float *bias, int64_t m,
                     int64_t n, int64_t k, int64_t gated)
{
    const int64_t panels = (n + (gated ? VL : NR) - 1) / (gated ? VL : NR);
    #pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads();
        if (m >= SPLIT_ROWS_MIN * threads) {
            const int64_t thread = omp_get_thread_num();
            const int64_t mine = m * (thread + 1) / threads;
            int64_t slice = ROW_SLICE_BYTES / (k * (int64_t)sizeof(float)) / MR * MR;
            if (slice < MR) slice = MR;
            for (int64_t first = m * thread / threads; first < mine; first += slice) {
                const int64_t rows = mine - first < slice ? mine - first : slice;
                for (int64_t p = 0; p < panels; p++)
                    rows_times_panel(y, x, packed, bias, n, k, gated, p, first, rows);
            }
        } else {
            for (int64_t first = 0; first < m; first += ROW_BLOCK) {
                const int64_t rows = m - first < ROW_BLOCK ? m - first : ROW_BLOCK;
                #pragma omp for schedule(static)
                for (int64_t p = 0; p < panels; p++)
                    rows_times_panel(y, x, packed, bias, n, k, gated, p, first, rows);
            }
        }
    }
}

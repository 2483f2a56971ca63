/* y = x W^T (+ b) for the model's projections, float32, for CPUs, with W packed once at load.
 *
 * W [n, k] (the checkpoint's [out, in]) is repacked into panels of NR output columns, each
 * panel [k][NR] contiguous (the last one zero-padded), so that the micro-kernel streams one
 * panel front to back: per k, NR weights (two vectors) times MR rows of x (broadcast scalars)
 * into MR x 2 vector accumulators that stay in registers for the whole k loop. Each panel is
 * reused from cache by every tile of rows, and while the tiles run, each prefetches its share
 * of the next panel. Rows go in tiles of at most MR, balanced (64 rows with MR = 14: five
 * tiles of 13 or 12, not four of 14 and one of 8). How the threads share the work depends on
 * the rows:
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
 *
 * On a CPU with AVX512-BF16 the weights can be packed in bfloat16 instead (the bfloat16
 * section below): the same panels and tiles, at twice the multiply-adds per instruction.
 */
/* a * b + c as one fused multiply-add: the project builds with -std=c11, which turns GCC's
 * contraction off; with it the micro-kernel is one instruction per multiply-add. */
#pragma GCC optimize("fp-contract=fast")

#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "bfloat16.h"
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

/* Panels of `outputs` output columns (gated: of d = outputs gate/up pairs). */
static inline int64_t panel_count(int64_t outputs, int64_t gated)
{
    const int64_t width = packed_gemm_panel_width(gated);
    return (outputs + width - 1) / width;
}

/* The row of W [n, k] that column j of panel p holds, or -1 for a padding column. Gated
 * (n = 2 * outputs): panel p holds gate rows p * VL ... in its first VL columns and the up rows
 * outputs + p * VL ... in the rest. */
static inline int64_t panel_row(int64_t p, int64_t j, int64_t outputs, int64_t gated)
{
    const int64_t feature = gated ? p * VL + j % VL : p * NR + j;
    if (feature >= outputs) return -1;
    return gated ? j / VL * outputs + feature : feature;
}

/* packed [panels][k][NR] <- w [n, k], padded with zero columns. */
void packed_gemm_pack_f32(float *packed, const float *w, int64_t n, int64_t k, int64_t gated)
{
    const int64_t outputs = gated ? n / 2 : n, panels = panel_count(outputs, gated);
    #pragma omp parallel for
    for (int64_t p = 0; p < panels; p++) {
        float *panel = packed + p * k * NR;
        for (int64_t j = 0; j < NR; j++) {
            const int64_t row = panel_row(p, j, outputs, gated);
            for (int64_t kk = 0; kk < k; kk++)
                panel[kk * NR + j] = row >= 0 ? w[row * k + kk] : 0.f;
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

/* A finished tile's rows into y (n apart): the bias added (bias0 / bias1: the panel's two column
 * vectors' biases, cols real entries each when gated; NULL: none), then stored by store_row. */
static inline __attribute__((always_inline)) void store_tile(float *y, int64_t n, vf (*acc)[2],
                                                              int rows, const float *bias0,
                                                              const float *bias1, int64_t cols,
                                                              int64_t gated)
{
    if (bias0) {
        float padded[NR] = {0};
        const int64_t first = gated ? cols : (cols < VL ? cols : VL);
        memcpy(padded, bias0, sizeof(float) * first);
        memcpy(padded + VL, bias1, sizeof(float) * (gated ? cols : cols - first));
        const vf b0 = load_v(padded), b1 = load_v(padded + VL);
        for (int r = 0; r < rows; r++) {
            acc[r][0] += b0;
            acc[r][1] += b1;
        }
    }
    for (int r = 0; r < rows; r++) store_row(y + r * n, acc[r][0], acc[r][1], cols, gated);
}

/* One tile: ROWS rows of x (k apart) times one panel into y (n apart), cols of them stored.
 * bias0 / bias1, if not NULL, are the biases of the panel's two column vectors (cols real
 * entries each when gated); next, if not NULL, is this tile's share of the panel to prefetch
 * meanwhile, `step` bytes of it per k (two lines a k when a step is longer than one). */
#define TILE_ARGS                                                                              \
    float *y, int64_t n, const void *xs, const void *panel_, const float *bias0,               \
        const float *bias1, int64_t k, int64_t cols, int64_t gated, const char *next,           \
        int64_t step
#define PREFETCH_STEP(kk)                                                                      \
    if (next) {                                                                                \
        __builtin_prefetch(next + (kk) * step, 0, 3);                                          \
        if (step > 64) __builtin_prefetch(next + (kk) * step + 64, 0, 3);                      \
    }
#define DEFINE_TILE(ROWS)                                                                      \
    static void tile_##ROWS(TILE_ARGS)                                                         \
    {                                                                                          \
        const float *x = xs, *panel = panel_;                                                  \
        vf acc[ROWS][2];                                                                       \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = (vf){0};                        \
        for (int64_t kk = 0; kk < k; kk++) {                                                   \
            PREFETCH_STEP(kk)                                                                  \
            const vf w0 = load_v(panel + kk * NR), w1 = load_v(panel + kk * NR + VL);          \
            for (int r = 0; r < ROWS; r++) {                                                   \
                const float a = x[r * k + kk];                                                 \
                acc[r][0] += a * w0;                                                           \
                acc[r][1] += a * w1;                                                           \
            }                                                                                  \
        }                                                                                      \
        store_tile(y, n, acc, ROWS, bias0, bias1, cols, gated);                                \
    }

/* The tile of each height 1 .. MR, DEFINE(ROWS) defining tile ROWS. */
#define DEFINE_TILES_UP_TO_6(DEFINE)                                                           \
    DEFINE(1) DEFINE(2) DEFINE(3) DEFINE(4) DEFINE(5) DEFINE(6)
#define DEFINE_TILES_7_TO_14(DEFINE)                                                           \
    DEFINE(7) DEFINE(8) DEFINE(9) DEFINE(10) DEFINE(11) DEFINE(12) DEFINE(13) DEFINE(14)

DEFINE_TILES_UP_TO_6(DEFINE_TILE)
#if MR > 6
DEFINE_TILES_7_TO_14(DEFINE_TILE)
#endif

typedef void (*tile_fn)(TILE_ARGS);

#if MR > 6
#define TILE_TABLE(P)                                                                          \
    {NULL,     P##_1,  P##_2,  P##_3,  P##_4,  P##_5,  P##_6, P##_7,                            \
     P##_8,    P##_9,  P##_10, P##_11, P##_12, P##_13, P##_14}
#else
#define TILE_TABLE(P) {NULL, P##_1, P##_2, P##_3, P##_4, P##_5, P##_6}
#endif

/* How one panel format is laid out: its tiles, its depth (the tiles' k: inputs, or pairs of
 * inputs for bfloat16), the bytes of one panel and of one row of x as the tiles read it. */
typedef struct {
    const tile_fn *tiles;
    int64_t depth, panel_bytes, x_row_bytes;
} Format;

static const tile_fn f32_tiles[MR + 1] = TILE_TABLE(tile);

/* Panel p's place in y: its first output column, how many of its columns are real (the last
 * panel may be short) and the biases of its two column vectors (NULL without a bias). */
typedef struct {
    int64_t first, cols;
    const float *bias0, *bias1;
} PanelOut;

static inline PanelOut panel_out(const float *bias, int64_t n, int64_t gated, int64_t p)
{
    const int64_t width = packed_gemm_panel_width(gated), first = p * width;
    const float *b0 = bias ? bias + first : NULL;
    return (PanelOut){first, n - first < width ? n - first : width, b0,
                      bias ? (gated ? b0 + n : b0 + VL) : NULL};
}

/* Rows in the next of tiles_left balanced tiles when `left` rows remain. */
static inline int64_t tile_height(int64_t left, int64_t tiles_left)
{
    return (left + tiles_left - 1) / tiles_left;
}

/* Rows first .. first + rows of y (n apart) = those of x times panel p of `packed`, in
 * balanced tiles of at most MR rows, which prefetch panel p + 1 (if any) between them, each its
 * own share, one line every few k. (The first tile alone asking for the whole next panel, as
 * before, wanted it at up to twice the rate one core draws from memory: at 64 rows 430-458
 * against 454-469 GFLOP/s, SmolLM2's projections, 30 layers; at 128 rows 451-462 against
 * 463-479; at 1055 within noise.) */
static void rows_times_panel(float *y, const char *x, const char *packed, const float *bias,
                             int64_t n, int64_t gated, int64_t p, int64_t first, int64_t rows,
                             const Format *f)
{
    const PanelOut out = panel_out(bias, n, gated, p);
    const char *panel = packed + p * f->panel_bytes;
    const char *next = p + 1 < panel_count(n, gated) ? panel + f->panel_bytes : NULL;
    const int64_t ntiles = (rows + MR - 1) / MR;
    const int64_t share = (f->panel_bytes / ntiles + 63) / 64 * 64;
    const int64_t step = (share + f->depth - 1) / f->depth;
    for (int64_t t = 0, i = first; t < ntiles; t++) {
        const int64_t here = tile_height(first + rows - i, ntiles - t);
        f->tiles[here](y + i * n + out.first, n, x + i * f->x_row_bytes, panel, out.bias0,
                       out.bias1, f->depth, out.cols, gated, next ? next + t * share : NULL,
                       step);
        i += here;
    }
}

/* y [m, n] = x W^T (+ bias [n]) with W packed in format f, x [m] rows of f->x_row_bytes. */
static void gemm(float *y, const void *x, const void *packed, const float *bias, int64_t m,
                 int64_t n, int64_t gated, const Format *f)
{
    const int64_t panels = panel_count(n, gated);
    #pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads();
        if (m >= SPLIT_ROWS_MIN * threads) {
            const int64_t thread = omp_get_thread_num();
            const int64_t mine = m * (thread + 1) / threads;
            int64_t slice = ROW_SLICE_BYTES / f->x_row_bytes / MR * MR;
            if (slice < MR) slice = MR;
            for (int64_t first = m * thread / threads; first < mine; first += slice) {
                const int64_t rows = mine - first < slice ? mine - first : slice;
                for (int64_t p = 0; p < panels; p++)
                    rows_times_panel(y, x, packed, bias, n, gated, p, first, rows, f);
            }
        } else {
            for (int64_t first = 0; first < m; first += ROW_BLOCK) {
                const int64_t rows = m - first < ROW_BLOCK ? m - first : ROW_BLOCK;
                #pragma omp for schedule(static)
                for (int64_t p = 0; p < panels; p++)
                    rows_times_panel(y, x, packed, bias, n, gated, p, first, rows, f);
            }
        }
    }
}

/* y [m, n] = x [m, k] W^T (+ bias [n]), W packed by packed_gemm_pack_f32; x and y contiguous.
 * Gated: W was [2n, k], bias [2n], and y = silu(x Wg^T + bg) * (x Wu^T + bu). */
void packed_gemm_f32(float *y, const float *x, const float *packed, const float *bias, int64_t m,
                     int64_t n, int64_t k, int64_t gated)
{
    const int64_t bytes = (int64_t)sizeof(float);
    const Format f = {f32_tiles, k, k * NR * bytes, k * bytes};
    gemm(y, x, packed, bias, m, n, gated, &f);
}

/* ---- bfloat16 weights (CPUs with AVX512-BF16) ----
 *
 * VDPBF16PS multiplies 16 pairs of bfloat16 values and adds both products to 16 float32 sums:
 * twice the multiply-adds of an FMA. A bfloat16 panel holds, per pair of inputs, the NR columns'
 * two weights side by side ([k / 2][NR][2], k padded to even with zeros); x is rounded to
 * bfloat16 once per call, so that one 32-bit broadcast gives a row's pair. Sums stay float32.
 * Rounding is to nearest even, as PyTorch's .bfloat16() rounds, so each output is x.bfloat16()
 * times W.bfloat16() summed in float32 (in another order than PyTorch's).
 * SmolLM2-135M's projections at 2048 rows, 2 threads on this project's AVX-512 machine: 850-930
 * GFLOP/s with the rounding of x, against 480-500 for the float32 panels.
 */
int64_t packed_gemm_bf16_available(void)
{
#if defined(__AVX512BF16__) && VL == 16
    return 1;
#else
    return 0;
#endif
}

/* Elements of a bfloat16-packed W [n, k] (gated: [2n, k]). */
int64_t packed_gemm_bf16_elements(int64_t n, int64_t k, int64_t gated)
{
    return panel_count(n, gated) * (k + 1) / 2 * 2 * NR;
}

#if defined(__AVX512BF16__) && VL == 16

/* packed [panels][k / 2][NR][2] <- w [n, k] in bfloat16, padded with zeros. */
void packed_gemm_pack_bf16(uint16_t *packed, const float *w, int64_t n, int64_t k, int64_t gated)
{
    const int64_t outputs = gated ? n / 2 : n, panels = panel_count(outputs, gated);
    const int64_t pairs = (k + 1) / 2;
    #pragma omp parallel for
    for (int64_t p = 0; p < panels; p++) {
        uint16_t *panel = packed + p * pairs * 2 * NR;
        for (int64_t j = 0; j < NR; j++) {
            const int64_t row = panel_row(p, j, outputs, gated);
            for (int64_t kk = 0; kk < 2 * pairs; kk++)
                panel[(kk / 2 * NR + j) * 2 + kk % 2] =
                    row >= 0 && kk < k ? bf16_round(w[row * k + kk]) : 0;
        }
    }
}

/* xb [m][2 * pairs] <- x [m, k] in bfloat16 (the padding input zero). */
static void round_rows(uint16_t *xb, const float *x, int64_t m, int64_t k, int64_t pairs)
{
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < m; r++) {
        uint16_t *out = xb + r * 2 * pairs;
        for (int64_t c = 0; c < k; c += VL) {
            const __mmask16 mask = k - c >= VL ? 0xffff : (__mmask16)((1u << (k - c)) - 1);
            const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + r * k + c));
            _mm256_mask_storeu_epi16(out + c, mask, (__m256i)v);
        }
        if (k % 2) out[k] = 0;
    }
}

#define DEFINE_BF16_TILE(ROWS)                                                                 \
    static void bf16_tile_##ROWS(TILE_ARGS)                                                    \
    {                                                                                          \
        const uint32_t *x = xs;                                                                \
        const char *panel = panel_;                                                            \
        __m512 acc[ROWS][2];                                                                   \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();            \
        for (int64_t kk = 0; kk < k; kk++) {                                                   \
            PREFETCH_STEP(kk)                                                                  \
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + kk * 4 * NR);             \
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + kk * 4 * NR + 64);        \
            for (int r = 0; r < ROWS; r++) {                                                   \
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)x[r * k + kk]);            \
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);                                \
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);                                \
            }                                                                                  \
        }                                                                                      \
        vf sums[ROWS][2];                                                                      \
        memcpy(sums, acc, sizeof sums);                                                        \
        store_tile(y, n, sums, ROWS, bias0, bias1, cols, gated);                               \
    }

DEFINE_TILES_UP_TO_6(DEFINE_BF16_TILE)
DEFINE_TILES_7_TO_14(DEFINE_BF16_TILE)

static const tile_fn bf16_tiles[MR + 1] = TILE_TABLE(bf16_tile);

/* packed_gemm_f32 with W packed by packed_gemm_pack_bf16. */
void packed_gemm_bf16(float *y, const float *x, const uint16_t *packed, const float *bias,
                      int64_t m, int64_t n, int64_t k, int64_t gated)
{
    const int64_t pairs = (k + 1) / 2;
    uint16_t *xb = aligned_alloc(64, ((size_t)m * pairs * 4 + 63) / 64 * 64);
    if (xb == NULL) { /* x's size in bfloat16; without it no product can be computed */
        fputs("packed_gemm_bf16: out of memory for the rounded input\n", stderr);
        abort();
    }
    round_rows(xb, x, m, k, pairs);
    const Format f = {bf16_tiles, pairs, pairs * 4 * NR, pairs * 4};
    gemm(y, xb, packed, bias, m, n, gated, &f);
    free(xb);
}

#else

/* Without AVX512-BF16 nothing packs bfloat16 panels (packed_gemm_bf16_available says so), so
 * these are never called; they exist so that every build exports the same functions. */
void packed_gemm_pack_bf16(uint16_t *packed, const float *w, int64_t n, int64_t k, int64_t gated)
{
    (void)packed, (void)w, (void)n, (void)k, (void)gated;
    abort();
}

void packed_gemm_bf16(float *y, const float *x, const uint16_t *packed, const float *bias,
                      int64_t m, int64_t n, int64_t k, int64_t gated)
{
    (void)y, (void)x, (void)packed, (void)bias, (void)m, (void)n, (void)k, (void)gated;
    abort();
}

#endif

/* ---- Quantized weights (GGUF Q4_1 and Q8_0), for steps of few rows ----
 *
 * llama.cpp's types store each output's inputs in blocks of 32 with a float16 scale d: Q4_1
 * adds a minimum m and holds 4-bit values q (w = d * q + m), Q8_0 holds 8-bit signed q
 * (w = d * q). Decode steps stream every weight from memory once per step, so these panels
 * (0.75 and 1.125 bytes a weight with their scales, against 4) take most of that time away.
 * They are packed in the float32 panels' column order, per block of 32 inputs:
 *   - Q4_1: NR scales and NR minimums (float32), then per input VL bytes, each holding column
 *     i's value (low nibble) and column VL + i's (high);
 *   - Q8_0: NR scales (float32), then per input NR bytes, one per column;
 *   - Q8_0 with a scale per 16 inputs (for Q6_K): NR scales for the first 16 inputs and NR
 *     for the last 16, then the bytes as in Q8_0.
 * (The loader carries Q4_K in the first layout, Q4_0 in the second and Q6_K in the third,
 * exactly.)
 * The tiles multiply straight from the quantized panels, dequantizing each weight in registers
 * as they go (expanding a panel into a float32 buffer first and running the float32 tiles over
 * it measured slower below 24 rows, as fast at 24-32: SmolLM2's 30 layers of projections, one
 * row, 3.2 against 5.4 ms). Each weight is the float32 value the loader dequantized (as gguf's
 * numpy code computes it: d * q rounded, then + m rounded), and each output the same sum in the
 * same order as the float32 tile's, so results equal the float32 path's bit for bit.
 */
#define QBLOCK 32
#define Q41_BLOCK_BYTES (2 * NR * (int64_t)sizeof(float) + QBLOCK * VL)
#define Q80_BLOCK_BYTES (NR * (int64_t)sizeof(float) + QBLOCK * NR)
#define Q816_BLOCK_BYTES (2 * NR * (int64_t)sizeof(float) + QBLOCK * NR)
/* Blocks ahead that a quantized tile prefetches: it outruns the hardware prefetcher otherwise. */
#define QUANT_PREFETCH 8

enum { Q41 = 0, Q80 = 1, Q816 = 2 };

typedef uint8_t vu8 __attribute__((vector_size(VL)));
typedef int32_t vi32 __attribute__((vector_size(VL * sizeof(int32_t))));

static int64_t block_bytes(int64_t type)
{
    return type == Q41 ? Q41_BLOCK_BYTES : type == Q80 ? Q80_BLOCK_BYTES : Q816_BLOCK_BYTES;
}

/* Bytes of quantized weights [n, k] of `type` packed (gated: [2n, k]). */
int64_t packed_gemm_quant_bytes(int64_t n, int64_t k, int64_t gated, int64_t type)
{
    return panel_count(n, gated) * (k / QBLOCK) * block_bytes(type);
}

/* packed <- the blocks of w [n, k] of `type`: scale [n, k / 32] (per 16 inputs: [n, k / 16]) and,
 * Q4_1, minimum [n, k / 32], as float32; quants [n, k / 32, bytes] in gguf's byte layout (Q4_1:
 * 16 bytes, input j of a block in byte j % 16, low nibble for j < 16; else 32 signed bytes).
 * Columns map to panels as in packed_gemm_pack_f32; padding columns are zero. */
void packed_gemm_pack_quant(uint8_t *packed, const float *scale, const float *minimum,
                            const uint8_t *quants, int64_t n, int64_t k, int64_t gated,
                            int64_t type)
{
    const int64_t outputs = gated ? n / 2 : n, panels = panel_count(outputs, gated);
    const int64_t blocks = k / QBLOCK;
    const int64_t bytes = block_bytes(type), qbytes = type == Q41 ? QBLOCK / 2 : QBLOCK;
    #pragma omp parallel for
    for (int64_t p = 0; p < panels; p++) {
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t *block = packed + (p * blocks + b) * bytes;
            /* m: Q4_1's minimums, or the scales of the last 16 inputs */
            float d[NR] = {0}, m[NR] = {0};
            uint8_t *q = block + (type == Q80 ? 1 : 2) * NR * sizeof(float);
            memset(q, 0, QBLOCK * (type == Q41 ? VL : NR));
            for (int64_t j = 0; j < NR; j++) {
                const int64_t row = panel_row(p, j, outputs, gated);
                if (row < 0) continue;
                const uint8_t *qs = quants + (row * blocks + b) * qbytes;
                if (type == Q816) {
                    d[j] = scale[(row * blocks + b) * 2];
                    m[j] = scale[(row * blocks + b) * 2 + 1];
                } else {
                    d[j] = scale[row * blocks + b];
                }
                if (type != Q41) {
                    for (int64_t i = 0; i < QBLOCK; i++) q[i * NR + j] = qs[i];
                    continue;
                }
                m[j] = minimum[row * blocks + b];
                for (int64_t i = 0; i < QBLOCK; i++) {
                    const uint8_t v = i < QBLOCK / 2 ? qs[i] & 15 : qs[i - QBLOCK / 2] >> 4;
                    q[i * VL + j % VL] |= j < VL ? v : (uint8_t)(v << 4);
                }
            }
            memcpy(block, d, sizeof d);
            if (type != Q80) memcpy(block + sizeof d, m, sizeof m);
        }
    }
}

/* v as computed: GCC cannot see through an empty asm, so a product kept this way is rounded
 * before anything is added to it (gguf's dequantization has no fused multiply-add) while the
 * rest of this file contracts a * b + c into one. */
#if defined(__x86_64__)
#define ROUNDED(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__)
#define ROUNDED(v) __asm__("" : "+w"(v))
#else
#define ROUNDED(v)                                                                             \
    do {                                                                                       \
        volatile vf rounded_ = (v);                                                            \
        (v) = rounded_;                                                                        \
    } while (0)
#endif

/* Input i of a packed block of `type`: its NR float32 weights, as gguf dequantizes them. */
static inline __attribute__((always_inline)) void block_weights(vf *w0, vf *w1,
                                                                 const uint8_t *block,
                                                                 int64_t type, int64_t i)
{
    const float *d = (const float *)block;
    if (type == Q41) {
        vu8 bytes8;
        memcpy(&bytes8, block + 2 * NR * sizeof(float) + i * VL, sizeof bytes8);
        const vi32 q0 = __builtin_convertvector(bytes8 & 15, vi32);
        const vi32 q1 = __builtin_convertvector(bytes8 >> 4, vi32);
        vf lo = load_v(d) * __builtin_convertvector(q0, vf);
        vf hi = load_v(d + VL) * __builtin_convertvector(q1, vf);
        ROUNDED(lo);
        ROUNDED(hi);
        *w0 = lo + load_v(d + NR);
        *w1 = hi + load_v(d + NR + VL);
        return;
    }
    const float *scale = type == Q816 && i >= QBLOCK / 2 ? d + NR : d;  /* Q816: per 16 inputs */
    const uint8_t *q = block + (type == Q80 ? 1 : 2) * NR * sizeof(float) + i * NR;
    vu8 q0, q1;
    memcpy(&q0, q, sizeof q0);
    memcpy(&q1, q + VL, sizeof q1);
    /* signed bytes, offset to unsigned (b ^ 128 = b + 128), widened, offset back: GCC widens a
     * vector of signed bytes element by element */
    const vi32 s0 = __builtin_convertvector(q0 ^ 128, vi32) - 128;
    const vi32 s1 = __builtin_convertvector(q1 ^ 128, vi32) - 128;
    *w0 = load_v(scale) * __builtin_convertvector(s0, vf);
    *w1 = load_v(scale + VL) * __builtin_convertvector(s1, vf);
}

/* Asks for the lines of the block QUANT_PREFETCH blocks on (reading past the end only
 * prefetches). */
static inline void prefetch_ahead(const uint8_t *block, int64_t bytes)
{
    for (int64_t line = 0; line < bytes; line += 64)
        __builtin_prefetch(block + QUANT_PREFETCH * bytes + line, 0, 0);
}

/* Rows of x a quantized tile takes at most (its accumulators and the weights it dequantizes
 * stay in registers). */
#define QUANT_MR 8

/* A tile of `rows` rows (x k apart, y n apart) over one quantized panel of `type`: the same
 * multiply-adds in the same order as the float32 tile of as many rows over the float32 panel. */
static inline __attribute__((always_inline)) void quant_tile(
    float *y, int64_t n, const float *x, const uint8_t *panel, int64_t blocks, int64_t type,
    const float *bias0, const float *bias1, int64_t cols, int64_t gated, int rows)
{
    const int64_t bytes = block_bytes(type), k = blocks * QBLOCK;
    vf acc[QUANT_MR][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = (vf){0};
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = panel + b * bytes;
        prefetch_ahead(block, bytes);
        for (int64_t i = 0; i < QBLOCK; i++) {
            vf w0, w1;
            block_weights(&w0, &w1, block, type, i);
            for (int r = 0; r < rows; r++) {
                const float a = x[r * k + b * QBLOCK + i];
                acc[r][0] += a * w0;
                acc[r][1] += a * w1;
            }
        }
    }
    store_tile(y, n, acc, rows, bias0, bias1, cols, gated);
}

#define QUANT_TILE_ARGS                                                                        \
    float *y, int64_t n, const float *x, const uint8_t *panel, int64_t blocks,                 \
        const float *bias0, const float *bias1, int64_t cols, int64_t gated
#define DEFINE_QUANT_TILE(ROWS, TYPE)                                                          \
    static void quant_tile_##ROWS##_##TYPE(QUANT_TILE_ARGS)                                    \
    {                                                                                          \
        quant_tile(y, n, x, panel, blocks, TYPE, bias0, bias1, cols, gated, ROWS);             \
    }
#define DEFINE_QUANT_TILES(TYPE)                                                               \
    DEFINE_QUANT_TILE(1, TYPE)                                                                 \
    DEFINE_QUANT_TILE(2, TYPE)                                                                 \
    DEFINE_QUANT_TILE(3, TYPE)                                                                 \
    DEFINE_QUANT_TILE(4, TYPE)                                                                 \
    DEFINE_QUANT_TILE(5, TYPE)                                                                 \
    DEFINE_QUANT_TILE(6, TYPE)                                                                 \
    DEFINE_QUANT_TILE(7, TYPE)                                                                 \
    DEFINE_QUANT_TILE(8, TYPE)
DEFINE_QUANT_TILES(Q41)
DEFINE_QUANT_TILES(Q80)
DEFINE_QUANT_TILES(Q816)

typedef void (*quant_tile_fn)(QUANT_TILE_ARGS);
#define QUANT_TILES(TYPE)                                                                      \
    {NULL, quant_tile_1_##TYPE, quant_tile_2_##TYPE, quant_tile_3_##TYPE, quant_tile_4_##TYPE,   \
     quant_tile_5_##TYPE, quant_tile_6_##TYPE, quant_tile_7_##TYPE, quant_tile_8_##TYPE}
static const quant_tile_fn quant_tiles[3][QUANT_MR + 1] = {
    QUANT_TILES(Q41), QUANT_TILES(Q80), QUANT_TILES(Q816),
};

/* packed_gemm_f32 with W packed by packed_gemm_pack_quant (k a multiple of 32); the threads
 * split the panels, and each multiplies its rows, in balanced tiles of at most
 * QUANT_MR, straight from the quantized panel (from cache after the first tile). */
void packed_gemm_quant(float *y, const float *x, const uint8_t *packed, const float *bias,
                       int64_t m, int64_t n, int64_t k, int64_t gated, int64_t type)
{
    const int64_t blocks = k / QBLOCK, panels = panel_count(n, gated);
    const int64_t ntiles = (m + QUANT_MR - 1) / QUANT_MR;
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const PanelOut out = panel_out(bias, n, gated, p);
        const uint8_t *panel = packed + p * blocks * block_bytes(type);
        for (int64_t t = 0, i = 0; t < ntiles; t++) {
            const int64_t here = tile_height(m - i, ntiles - t);
            quant_tiles[type][here](y + i * n + out.first, n, x + i * k, panel, blocks,
                                    out.bias0, out.bias1, out.cols, gated);
            i += here;
        }
    }
}

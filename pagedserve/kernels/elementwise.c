/* The per-layer elementwise ops of a Llama decoder layer, float32, for CPUs.
 *
 * Each op is one pass over its rows instead of the several aten ops (and temporaries) of the
 * PyTorch code: RMSNorm (optionally fused with the residual add before it), SiLU-and-mul (and
 * Gemma's GELU-and-mul) over the fused gate/up output, and the "rotate half" rotary embedding of the q/k heads. Rows are
 * split over OpenMP threads only when there is enough work to pay for waking them. Built with
 * the project's default flags (no -ffast-math): the exp below is written to vectorise as is.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

/* Below this many input elements (1 MiB) an op runs on the calling thread alone. Waking the
 * OpenMP workers costs microseconds when they are idle, and up to a scheduler time slice when
 * another process holds the cores; a decode step's ops (a few 10K elements, a few microseconds)
 * gain too little from threads to risk that, a long prefill's gain about 2x. */
#define PARALLEL_MIN_ELEMENTS (1 << 18)

static inline float rms_scale(const float *x, int64_t cols, float eps)
{
    float sum = 0.f;
    #pragma omp simd reduction(+:sum)
    for (int64_t j = 0; j < cols; j++) sum = fmaf(x[j], x[j], sum);
    return 1.f / sqrtf(sum / (float)cols + eps);
}

static inline void scale_row(float *out, const float *x, const float *weight, int64_t cols,
                             float scale)
{
    #pragma omp simd
    for (int64_t j = 0; j < cols; j++) out[j] = x[j] * scale * weight[j];
}

/* out[i] = x[i] / rms(x[i]) * weight, rows of x contiguous. */
void rms_norm_f32(float *out, const float *x, const float *weight, int64_t rows, int64_t cols,
                  float eps)
{
    #pragma omp parallel for if(rows * cols > PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * cols;
        scale_row(out + i * cols, xi, weight, cols, rms_scale(xi, cols, eps));
    }
}

/* sum[i] = x[i] + residual[i]; out[i] = rms_norm(sum[i]). `sum` may be `residual` itself. */
void add_rms_norm_f32(float *out, float *sum, const float *x, const float *residual,
                      const float *weight, int64_t rows, int64_t cols, float eps)
{
    #pragma omp parallel for if(rows * cols > PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * cols, *ri = residual + i * cols;
        float *si = sum + i * cols;
        #pragma omp simd
        for (int64_t j = 0; j < cols; j++) si[j] = xi[j] + ri[j];
        scale_row(out + i * cols, si, weight, cols, rms_scale(si, cols, eps));
    }
}

/* x [rows, 2 * d] = (gate, up) side by side -> out [rows, d] = silu(gate) * up. */
void silu_and_mul_f32(float *out, const float *x, int64_t rows, int64_t d)
{
    #pragma omp parallel for if(rows * 2 * d > PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const float *gate = x + i * 2 * d, *up = gate + d;
        float *o = out + i * d;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) o[j] = gate[j] / (1.f + exp_f32(-gate[j])) * up[j];
    }
}

/* x [rows, 2 * d] = (gate, up) side by side -> out [rows, d] = gelu_tanh(gate) * up (Gemma's
 * GeGLU). gelu_tanh(g) = g / 2 (1 + tanh(u)), u = sqrt(2 / pi) (g + 0.044715 g^3), computed as
 * g sigmoid(2u) = g / (1 + e^-2u): the same value without the cancellation of 1 + tanh(u) for
 * negative g. */
void gelu_tanh_and_mul_f32(float *out, const float *x, int64_t rows, int64_t d)
{
    #pragma omp parallel for if(rows * 2 * d > PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < rows; i++) {
        const float *gate = x + i * 2 * d, *up = gate + d;
        float *o = out + i * d;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) {
            const float g = gate[j], u2 = 1.5957691216057308f * (g + 0.044715f * g * g * g);
            o[j] = g / (1.f + exp_f32(-u2)) * up[j];
        }
    }
}

/* Rotates the halves layout per head: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
 * x is [tokens, heads, head_dim] with any token and head strides (usually a view of the fused
 * qkv output), out the same shape, contiguous. cos and sin are [tokens, head_dim / 2] rows,
 * table_stride apart. */
void rotary_f32(float *out, const float *x, const float *cos, const float *sin,
                int64_t tokens, int64_t heads, int64_t head_dim,
                int64_t x_token_stride, int64_t x_head_stride, int64_t table_stride)
{
    const int64_t half = head_dim / 2;
    #pragma omp parallel for if(tokens * heads * head_dim > PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * table_stride, *s = sin + t * table_stride;
        for (int64_t h = 0; h < heads; h++) {
            const float *x1 = x + t * x_token_stride + h * x_head_stride, *x2 = x1 + half;
            float *o1 = out + (t * heads + h) * head_dim, *o2 = o1 + half;
            #pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                const float a = x1[j], b = x2[j];
                o1[j] = a * c[j] - b * s[j];
                o2[j] = b * c[j] + a * s[j];
            }
        }
    }
}

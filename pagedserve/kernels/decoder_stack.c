/* A decode step through all the decoder layers of a Llama-family, Granite, Gemma or OLMo 2 model
 * in one call, on the CPU.
 *
 * Through the modules, a decode step makes nine kernel calls per layer from Python, each with
 * its views, checks and ctypes conversions; at one sequence that is as long as the layers'
 * arithmetic (SmolLM2-135M: a step of 7.1 ms through the modules, 3.7 ms through this driver).
 * This driver makes the same kernel calls, in the same order on the same buffers, from C: the
 * caller hands it each kernel's entry point (from the kernels' own builds, one per K/V pool
 * type), the layers' packed weights and pools, and one step's inputs. Every kernel sees what it
 * would have seen from the modules, so the hidden states equal theirs bit for bit.
 *
 * Per layer (H hidden, q = Hq * D, kv = Hkv * D, I intermediate; rows m, one per sequence):
 *   normed, residual = add_rms_norm(x, residual)      (the first layer: rms_norm(embeddings))
 *   qkv [m, q + 2 kv] = normed Wqkv^T                 (Qwen3: each q and k head rms-normed)
 *   rotated q|k [m, q + kv] = rotary(qkv)
 *   k, v -> the pools at slots                        attn [m, q] = paged decode attention
 *   x = attn Wo^T; normed, residual = add_rms_norm(x, residual)
 *   act [m, I] = silu(normed Wg^T) * (normed Wu^T);   x = act Wd^T
 * and at the end, out = add_rms_norm(x, residual) with the final norm's weight. Granite's
 * (Stack.residual_scale) multiplies each block's output x by its residual multiplier before the
 * add_rms_norm that adds it, as GraniteDecoderLayer does.
 *
 * Gemma's and OLMo 2's layers (Stack.plain_adds) run the kernels their modules run, in their
 * order (rms_norm and a plain add, not add_rms_norm). Gemma 2 and 3 and OLMo 2 (their Layer has
 * attn_out_norm and mlp_out_norm) norm the attention's and the MLP's outputs before adding them
 * to the residual stream, Gemma 1 adds them as they are; Gemma's (Stack.geglu: GeGLU) MLP reads
 * the residual stream normed, OLMo 2's (no input or MLP-input norms: its Layer's input_norm and
 * post_norm are NULL) reads it as it is, and so does its next layer's q/k/v projection:
 *   x = attn Wo^T; residual += [rms_norm](x); mlp_in = [rms_norm](residual)
 *   act [m, I] = gelu_tanh or silu(mlp_in Wg^T) * (mlp_in Wu^T);  residual += [rms_norm](act Wd^T)
 *   the next layer's normed = [rms_norm](residual); out = rms_norm(residual)
 * Gemma's scores may be soft-capped (Gemma 2), and a sliding layer of Gemma 3 rotates with the
 * local RoPE table (Layer.rope_table). OLMo 2's q and k norms (Stack.whole_qk_norm) norm each
 * row's whole q and k projections, not each head as Qwen3's and Gemma 3's do.
 *
 * A step whose sequences run with LoRA adapters (row_slot: each row's adapter, an index into
 * the projections' adapter tables, or -1 for none) adds each row's term (x A^T) B^T to each
 * projection its adapter targets, right after that projection's GEMM; the gate/up GEMM then runs
 * as a plain one over its gated panels (their columns: VL gate features, then the VL up features
 * of the same indices), the terms are added in that column order, and silu(gate) * up follows,
 * the very expression the gated GEMM applies. (The modules add the terms with PyTorch's
 * matmuls: equal up to rounding, not to the bit.)
 */
#include <omp.h>
#include <stdint.h>

#include "fast_exp.h"

typedef void (*gemm_f32_fn)(float *, const float *, const void *, const float *, int64_t,
                            int64_t, int64_t, int64_t);
typedef void (*gemm_quant_fn)(float *, const float *, const void *, const float *, int64_t,
                              int64_t, int64_t, int64_t, int64_t);
typedef void (*rms_norm_fn)(float *, const float *, const float *, int64_t, int64_t, float);
typedef void (*add_rms_norm_fn)(float *, float *, const float *, const float *, const float *,
                                int64_t, int64_t, float);
typedef void (*gelu_and_mul_fn)(float *, const float *, int64_t, int64_t);
typedef void (*rotary_fn)(float *, const float *, const float *, const float *, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t);
typedef void (*write_kv_fn)(void *, void *, const float *, const float *, const int64_t *,
                            int64_t, int64_t, int64_t, int64_t);
typedef void (*attention_fn)(float *, const float *, const void *, const void *, const int32_t *,
                             const int32_t *, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, float, int64_t, int64_t, float);

/* The kernels' entry points and the model's shapes (mirrored by decoder_stack.py). */
typedef struct {
    gemm_f32_fn gemm_f32, gemm_bf16; /* gemm_bf16: for bfloat16 panels */
    gemm_quant_fn gemm_quant;
    rms_norm_fn rms_norm;
    add_rms_norm_fn add_rms_norm;
    gelu_and_mul_fn gelu_and_mul; /* Gemma's GeGLU activation */
    rotary_fn rotary;
    write_kv_fn write_kv;
    attention_fn attention;
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    int64_t quant_max_rows; /* steps of at most this many rows use the quantized panels */
    int64_t gate_width;     /* gate (and up) features in a gated panel: the vector width */
    int64_t plain_adds;     /* Gemma's and OLMo 2's layers (see the top of this file); 0: Llama's */
    int64_t geglu;          /* Gemma's GeGLU MLP; 0: SwiGLU (through the gated GEMM) */
    int64_t whole_qk_norm;  /* q/k norms over the whole projections (OLMo 2); 0: per head */
    float eps, scale;
    float softcap; /* scores become softcap * tanh(score / softcap) (Gemma 2); 0: none */
    float residual_scale; /* Granite's residual multiplier; 0: none */
    const float *final_norm;
} Stack;

/* One projection's packed weights: float32 panels (bfloat16 if bf16_panels), and quantized
 * ones (NULL: none) of quant_type; its bias (NULL: none); per adapter of the step (tables
 * indexed by row_slot's values; NULL: no adapter of the step targets it), A [r, k], B
 * transposed [r, n] (gate/up: n in the gated panels' column order; NULL: this adapter does
 * not target it) and r. */
typedef struct {
    const void *panels, *quantized;
    int64_t quant_type, bf16_panels;
    const float *bias;
    const float *const *lora_a, *const *lora_bt;
    const int64_t *lora_rank;
} Projection;

/* post_norm: the norm before the MLP (Gemma 2's pre_feedforward_layernorm); OLMo 2 has neither
 * it nor input_norm (NULL). A Gemma 2 or 3 or an OLMo 2 layer also has the norms of its
 * attention's and its MLP's outputs (NULL: none). */
typedef struct {
    const float *input_norm, *post_norm;
    const float *q_norm, *k_norm; /* norms' weights, [D] per head or [q] and [kv]; NULL: none */
    Projection qkv, o, gate_up, down;
    void *k_cache, *v_cache;
    int64_t window;     /* the layer's sliding window; 0: none */
    int64_t rope_table; /* which of the step's RoPE tables rotates its heads */
    const float *attn_out_norm, *mlp_out_norm;
} Layer;

/* y [m, n] = x [m, k] W^T (+ b), through the panels Linear.forward would pick. */
static void project(const Stack *s, const Projection *w, float *y, const float *x, int64_t m,
                    int64_t n, int64_t k, int64_t gated)
{
    if (w->quantized && m <= s->quant_max_rows)
        s->gemm_quant(y, x, w->quantized, w->bias, m, n, k, gated, w->quant_type);
    else
        (w->bf16_panels ? s->gemm_bf16 : s->gemm_f32)(y, x, w->panels, w->bias, m, n, k, gated);
}

/* y [m, n] += (x [m, k] A^T) B^T for each row whose adapter targets the projection. */
static void add_lora(const Projection *w, const int32_t *row_slot, float *y, const float *x,
                     int64_t m, int64_t n, int64_t k)
{
    if (!w->lora_a) return;
    #pragma omp parallel for if (m > 1)
    for (int64_t i = 0; i < m; i++) {
        const int32_t slot = row_slot[i];
        if (slot < 0 || !w->lora_a[slot]) continue;
        const float *xi = x + i * k, *A = w->lora_a[slot], *Bt = w->lora_bt[slot];
        float *yi = y + i * n;
        for (int64_t j = 0; j < w->lora_rank[slot]; j++) {
            const float *a = A + j * k, *bt = Bt + j * n;
            float t = 0.f;
            #pragma omp simd reduction(+ : t)
            for (int64_t c = 0; c < k; c++) t += xi[c] * a[c];
            #pragma omp simd
            for (int64_t c = 0; c < n; c++) yi[c] += t * bt[c];
        }
    }
}

/* act [m, I] = silu(gate) * up with the rows' adapters' terms in the gate and up products
 * (pre [m, 2 I]: scratch for them, in the gated panels' column order). */
static void gate_up_with_lora(const Stack *s, const Projection *w, const int32_t *row_slot,
                              float *act, float *pre, const float *x, int64_t m)
{
    const int64_t I = s->intermediate, vl = s->gate_width;
    Projection plain = *w;
    plain.bias = NULL; /* a biased gate/up never takes this path (decoder_stack.py) */
    project(s, &plain, pre, x, m, 2 * I, s->hidden, 0);
    add_lora(w, row_slot, pre, x, m, 2 * I, s->hidden);
    #pragma omp parallel for if (m > 1)
    for (int64_t i = 0; i < m; i++)
        for (int64_t p = 0; p < I / vl; p++) {
            const float *g = pre + i * 2 * I + p * 2 * vl, *u = g + vl;
            float *o = act + i * I + p * vl;
            #pragma omp simd
            for (int64_t t = 0; t < vl; t++) o[t] = g[t] / (1.f + exp_f32(-g[t])) * u[t];
        }
}

/* residual [n] += x [n], as torch's add does it (one rounding per element). */
static void add_to(float *residual, const float *x, int64_t n)
{
    #pragma omp simd
    for (int64_t j = 0; j < n; j++) residual[j] += x[j];
}

/* x [n] *= factor, as torch's multiply by a float32 scalar does it (one rounding each). */
static void scale_by(float *x, float factor, int64_t n)
{
    #pragma omp simd
    for (int64_t j = 0; j < n; j++) x[j] *= factor;
}

/* A Llama-family layer from its attention's output projection x [m, H] on, ending with the
 * next layer's input norm (the last layer: the final norm) of the residual stream in next. */
static void llama_tail(const Stack *s, const Layer *L, const int32_t *row_slot, float *next,
                       const float *next_norm, float *normed, float *residual, float *x,
                       float *act, float *pre, int64_t m)
{
    const int64_t H = s->hidden, I = s->intermediate;
    if (s->residual_scale) scale_by(x, s->residual_scale, m * H);
    s->add_rms_norm(normed, residual, x, residual, L->post_norm, m, H, s->eps);
    if (row_slot && L->gate_up.lora_a)
        gate_up_with_lora(s, &L->gate_up, row_slot, act, pre, normed, m);
    else
        project(s, &L->gate_up, act, normed, m, I, H, 1);
    project(s, &L->down, x, act, m, H, I, 0);
    if (row_slot) add_lora(&L->down, row_slot, x, act, m, H, I);
    if (s->residual_scale) scale_by(x, s->residual_scale, m * H);
    s->add_rms_norm(next, residual, x, residual, next_norm, m, H, s->eps);
}

/* residual [m, H] += y, normed first by norm (NULL: as it is; tmp [m, H]: the norm's output). */
static void add_block(const Stack *s, float *residual, const float *y, const float *norm,
                      float *tmp, int64_t m)
{
    if (norm) {
        s->rms_norm(tmp, y, norm, m, s->hidden, s->eps);
        y = tmp;
    }
    add_to(residual, y, m * s->hidden);
}

/* The same for a Gemma or OLMo 2 layer (see the top of this file); next_norm NULL: the next
 * layer reads the residual stream as it is. Adapters: OLMo 2's only (GeGLU: decoder_stack.py). */
static void plain_add_tail(const Stack *s, const Layer *L, const int32_t *row_slot, float *next,
                           const float *next_norm, float *normed, float *residual, float *x,
                           float *act, float *pre, int64_t m)
{
    const int64_t H = s->hidden, I = s->intermediate;
    add_block(s, residual, x, L->attn_out_norm, normed, m);
    const float *mlp_in = residual;
    if (L->post_norm) {
        s->rms_norm(x, residual, L->post_norm, m, H, s->eps);
        mlp_in = x;
    }
    if (s->geglu) {
        project(s, &L->gate_up, pre, mlp_in, m, 2 * I, H, 0);
        s->gelu_and_mul(act, pre, m, I);
    } else if (row_slot && L->gate_up.lora_a)
        gate_up_with_lora(s, &L->gate_up, row_slot, act, pre, mlp_in, m);
    else
        project(s, &L->gate_up, act, mlp_in, m, I, H, 1);
    project(s, &L->down, normed, act, m, H, I, 0);
    if (row_slot) add_lora(&L->down, row_slot, normed, act, m, H, I);
    add_block(s, residual, normed, L->mlp_out_norm, x, m);
    if (next_norm) s->rms_norm(next, residual, next_norm, m, H, s->eps);
}

/* Floats of scratch that decoder_stack_decode needs for m rows. */
int64_t decoder_stack_scratch(const Stack *s, int64_t m)
{
    const int64_t q = s->num_heads * s->head_dim, kv = s->num_kv_heads * s->head_dim;
    return m * (2 * s->hidden + (q + 2 * kv) + (q + kv) + q + 3 * s->intermediate);
}

/* The step's m sequences (one new token each) through every layer: hidden [m, H] holds their
 * embeddings and is overwritten by the residual stream; out [m, H] = the final norm's output.
 * rope [tables, m, D]: per RoPE table (Layer.rope_table), each row's cos (first D / 2) and sin
 * (last D / 2); slots [m]: where each new K/V goes; block_tables [m, max_blocks] and seq_lens
 * [m] as for paged_decode_attention; row_slot [m]: each row's adapter (see Projection; -1:
 * none), NULL: no row has one. */
void decoder_stack_decode(const Stack *s, const Layer *layers, int64_t num_layers, int64_t m,
                          float *hidden, float *out, const float *rope, const int64_t *slots,
                          const int32_t *block_tables, int64_t max_blocks,
                          const int32_t *seq_lens, const int32_t *row_slot, float *scratch)
{
    const int64_t H = s->hidden, D = s->head_dim, heads = s->num_heads + s->num_kv_heads;
    const int64_t q = s->num_heads * D, kv = s->num_kv_heads * D;
    float *normed = scratch, *x = normed + m * H, *qkv = x + m * H;
    float *qk = qkv + m * (q + 2 * kv), *attn = qk + m * (q + kv), *act = attn + m * q;
    float *pre = act + m * s->intermediate; /* the gate/up products (adapters; Gemma) */
    float *residual = hidden;
    /* What each layer's q/k/v projection reads: the normed residual stream (OLMo 2: as it is). */
    const float *in = normed;
    if (layers[0].input_norm)
        s->rms_norm(normed, hidden, layers[0].input_norm, m, H, s->eps);
    else
        in = residual;
    /* The q and k norms' rows per token and their width: each head, or the whole projections. */
    const int64_t q_rows = s->whole_qk_norm ? 1 : s->num_heads, q_cols = q / q_rows;
    const int64_t k_rows = s->whole_qk_norm ? 1 : s->num_kv_heads, k_cols = kv / k_rows;
    for (int64_t l = 0; l < num_layers; l++) {
        const Layer *L = layers + l;
        const float *table = rope + L->rope_table * m * D;
        project(s, &L->qkv, qkv, in, m, q + 2 * kv, H, 0);
        if (row_slot) add_lora(&L->qkv, row_slot, qkv, in, m, q + 2 * kv, H);
        if (L->q_norm)
            for (int64_t i = 0; i < m; i++) {
                float *row = qkv + i * (q + 2 * kv);
                s->rms_norm(row, row, L->q_norm, q_rows, q_cols, s->eps);
                s->rms_norm(row + q, row + q, L->k_norm, k_rows, k_cols, s->eps);
            }
        s->rotary(qk, qkv, table, table + D / 2, m, heads, D, q + 2 * kv, D, D);
        s->write_kv(L->k_cache, L->v_cache, qk + q, qkv + q + kv, slots, m, kv, q + kv,
                    q + 2 * kv);
        s->attention(attn, qk, L->k_cache, L->v_cache, block_tables, seq_lens, m,
                     s->num_heads, s->num_kv_heads, D, s->block_size, max_blocks, s->scale,
                     q + kv, L->window, s->softcap);
        project(s, &L->o, x, attn, m, H, q, 0);
        if (row_slot) add_lora(&L->o, row_slot, x, attn, m, H, q);
        const int last = l == num_layers - 1;
        float *next = last ? out : normed;
        const float *next_norm = last ? s->final_norm : L[1].input_norm;
        if (s->plain_adds)
            plain_add_tail(s, L, row_slot, next, next_norm, normed, residual, x, act, pre, m);
        else
            llama_tail(s, L, row_slot, next, next_norm, normed, residual, x, act, pre, m);
    }
}

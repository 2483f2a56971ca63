/* The element type of the K/V pools an attention kernel is built for: float32 by default,
 * float16 with -DKV_FLOAT16, bfloat16 with -DKV_BFLOAT16 (one build per type). The kernels
 * compute in float32 and convert as they load: a 16-bit pool halves the bytes that decode
 * attention streams from memory, and the conversion is one instruction per vector where the CPU
 * has it (AVX-512 or F16C for float16; a shift for bfloat16).
 */
#ifndef PAGEDSERVE_KV_ELEMENT_H
#define PAGEDSERVE_KV_ELEMENT_H

#include <stdint.h>
#include <string.h>

#include "bfloat16.h"

#if defined(KV_FLOAT16) || defined(KV_BFLOAT16)
typedef uint16_t kv_t;
#define KV_IS_FLOAT32 0
#else
typedef float kv_t;
#define KV_IS_FLOAT32 1
#endif

#if (defined(KV_FLOAT16) && defined(__F16C__)) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float kv_f32x16 __attribute__((vector_size(64)));
typedef uint16_t kv_u16x16 __attribute__((vector_size(32)));
typedef uint32_t kv_u32x16 __attribute__((vector_size(64)));

/* One element as float32. */
static inline float kv_scalar(const kv_t *p)
{
#if defined(KV_FLOAT16)
    _Float16 h;
    memcpy(&h, p, sizeof h);
    return (float)h;
#elif defined(KV_BFLOAT16)
    const uint32_t bits = (uint32_t)*p << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
#else
    return *p;
#endif
}

/* Elements p[0 .. 15] as float32. */
static inline kv_f32x16 kv_load16(const kv_t *p)
{
#if defined(KV_FLOAT16) && defined(__AVX512F__)
    return (kv_f32x16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(KV_FLOAT16) && defined(__F16C__)
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    kv_f32x16 x;
    memcpy(&x, &lo, sizeof lo);
    memcpy((char *)&x + sizeof lo, &hi, sizeof hi);
    return x;
#elif defined(KV_FLOAT16)
    kv_f32x16 x;
    for (int i = 0; i < 16; i++) x[i] = kv_scalar(p + i);
    return x;
#elif defined(KV_BFLOAT16) && defined(__AVX512F__)
    const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (kv_f32x16)_mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
#elif defined(KV_BFLOAT16)
    kv_u16x16 h;
    memcpy(&h, p, sizeof h);
    return (kv_f32x16)(__builtin_convertvector(h, kv_u32x16) << 16);
#else
    kv_f32x16 x;
    memcpy(&x, p, sizeof x);
    return x;
#endif
}

/* out[0 .. n - 1] = p[0 .. n - 1] as float32. */
static inline void kv_to_float(float *out, const kv_t *p, int64_t n)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const kv_f32x16 x = kv_load16(p + i);
        memcpy(out + i, &x, sizeof x);
    }
    for (; i < n; i++) out[i] = kv_scalar(p + i);
}

/* x rounded to the pool type: to nearest, ties to even, as torch's .to() rounds. */
static inline kv_t kv_from_scalar(float x)
{
#if defined(KV_FLOAT16)
    const _Float16 h = (_Float16)x;
    kv_t bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
#elif defined(KV_BFLOAT16)
    return bf16_round(x);
#else
    return x;
#endif
}

/* p[0 .. n - 1] = x[0 .. n - 1] rounded to the pool type. */
static inline void kv_from_float(kv_t *p, const float *x, int64_t n)
{
    int64_t i = 0;
#if defined(KV_FLOAT16) && defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(p + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(KV_FLOAT16) && defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(p + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#elif !defined(KV_FLOAT16) && !defined(KV_BFLOAT16)
    memcpy(p, x, sizeof(float) * n);
    i = n;
#endif
    for (; i < n; i++) p[i] = kv_from_scalar(x[i]);
}

#endif

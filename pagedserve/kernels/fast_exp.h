/* A vectorisable float32 e^x shared by the C kernels. */
#ifndef PAGEDSERVE_FAST_EXP_H
#define PAGEDSERVE_FAST_EXP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x to about 2 ulp, in plain C that the compiler vectorises (libm's expf is not, without
 * -ffast-math): x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Chebyshev fit,
 * 3e-9 relative), times 2^n built in the exponent bits. The coefficients are doubled and the
 * exponent built as 2^(n - 1) so that n = 128 stays a finite float: e^x above FLT_MAX rounds to
 * inf, as expf does. Inputs below -86 are clamped there (e^-86 ~ 4e-38): only right for callers
 * that add e^x to something of order 1, as the sigmoid does. */
static inline __attribute__((always_inline)) float exp_f32(float x)
{
    x = x < -86.f ? -86.f : (x > 89.f ? 89.f : x);
    const float n = rintf(x * 1.44269504088896341f);
    /* Cody-Waite: ln 2 = C1 - C2, with n * C1 exact. */
    const float r = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, x));
    float p = 2.f * 1.3941108481958508e-3f;
    p = fmaf(p, r, 2.f * 8.37512593716383e-3f);
    p = fmaf(p, r, 2.f * 4.166635125875473e-2f);
    p = fmaf(p, r, 2.f * 1.6666415333747864e-1f);
    p = fmaf(p, r, 2.f * 0.5f);
    p = fmaf(p, r, 2.f);
    p = fmaf(p, r, 2.f);
    const int32_t bits = ((int32_t)n + 126) << 23;
    float half_scale;
    memcpy(&half_scale, &bits, sizeof half_scale);
    return p * half_scale;
}

/* tanh(x) from exp_f32 (about 1e-7 absolute), vectorisable as exp_f32 is. */
static inline __attribute__((always_inline)) float tanh_f32(float x)
{
    const float e = exp_f32(-2.f * fabsf(x));
    return copysignf((1.f - e) / (1.f + e), x);
}

#endif

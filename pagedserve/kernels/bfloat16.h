/* Rounding float32 to bfloat16, as PyTorch's .bfloat16() rounds: to nearest, ties to even; NaN
 * stays a (quiet) NaN. Shared by the bfloat16 K/V pools, panels and products. */
#ifndef PAGEDSERVE_BFLOAT16_H
#define PAGEDSERVE_BFLOAT16_H

#include <stdint.h>
#include <string.h>

/* x's bfloat16 bits. */
static inline uint16_t bf16_round(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#endif

/* The vector width the C kernels are built for (VL floats, from the target: AVX-512 16, AVX 8,
 * otherwise 4) and whether the target has 32 vector registers (AVX-512, aarch64) rather than 16,
 * which decides how big a register tile a micro-kernel can keep. */
#ifndef PAGEDSERVE_VECTOR_WIDTH_H
#define PAGEDSERVE_VECTOR_WIDTH_H

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif

#if defined(__AVX512F__) || defined(__aarch64__)
#define MANY_VECTOR_REGISTERS 1
#else
#define MANY_VECTOR_REGISTERS 0
#endif

typedef float vf __attribute__((vector_size(VL * sizeof(float))));

#endif

/* Stores a step's new keys and values (float32) at their cache slots in pools of kv_t (float32,
 * float16 or bfloat16; see kv_element.h), rounding as torch's .to() does: row t of k goes to row
 * slots[t] of the K pool (a row is Hkv * D elements, `row` here), likewise v. The k and v rows
 * are read k_stride and v_stride floats apart (views of the fused qkv output).
 */
#include <stdint.h>

#include "kv_element.h"

/* Below this many elements the stores run on the calling thread alone (a decode step's few
 * rows gain nothing from waking the OpenMP workers). */
#define PARALLEL_MIN_ELEMENTS (1 << 18)

void write_kv(kv_t *k_cache, kv_t *v_cache, const float *k, const float *v, const int64_t *slots,
              int64_t tokens, int64_t row, int64_t k_stride, int64_t v_stride)
{
    #pragma omp parallel for if(tokens * row > PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < tokens; t++) {
        kv_from_float(k_cache + slots[t] * row, k + t * k_stride, row);
        kv_from_float(v_cache + slots[t] * row, v + t * v_stride, row);
    }
}

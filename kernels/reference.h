// Slow exact reference attention, double-precision accumulation. For tests only.
// Same layout and contract as AttentionForward (kernels/attention.h).
#pragma once

#include <vector>

#include "kernels/attention.h"

namespace ringtree {

// k and v in kv_dtype (float32 or bfloat16). o and lse are float32 outputs
// (lse may be null). Materialises one score row at a time (O(Tk) memory).
void ReferenceAttention(const float* q, const void* k, const void* v, DType kv_dtype,
                        const AttentionShape& shape, const AttentionOptions& options, float* o,
                        float* lse);

// Brute force for AttentionOptions::band: materialises each query head's full
// probability row (double precision, normalised over every visible key of
// the call, and prior_lse when given) and copies the band entries out.
// options.band must be set; o/lse are not produced.
void ReferenceAttentionBand(const float* q, const void* k, DType kv_dtype,
                            const AttentionShape& shape, const AttentionOptions& options);

}  // namespace ringtree

// The partial merge (DESIGN.md): two partials (o, lse) over disjoint key sets
// combine exactly:
//   m = max(lse1, lse2); w1 = exp(lse1 - m); w2 = exp(lse2 - m)
//   o = (w1*o1 + w2*o2) / (w1 + w2);  lse = m + log(w1 + w2)
// The empty partial (o = 0, lse = -inf) is the identity. Associative and
// commutative up to float rounding.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ringtree {

// Merges one row in place: (o_acc, *lse_acc) <- merge((o_acc, *lse_acc), (o, lse)).
// `head_dim` floats per o row.
void MergePartialRow(float* o_acc, float* lse_acc, const float* o, float lse, int head_dim);

// Merges `rows` partial rows in place (rows = tokens * heads in the usual
// layout: o [rows, head_dim], lse [rows]).
void MergePartials(float* o_acc, float* lse_acc, const float* o, const float* lse, int64_t rows,
                   int head_dim);

// Packed record layout used on the wire (MPI tree reduction, span retrieval):
// per row, [lse, o[0..head_dim)] as head_dim + 1 floats.
inline constexpr int PackedRowFloats(int head_dim) { return head_dim + 1; }
void PackPartials(const float* o, const float* lse, int64_t rows, int head_dim, float* packed);
void UnpackPartials(const float* packed, int64_t rows, int head_dim, float* o, float* lse);
// packed_acc <- merge(packed_acc, packed), row by row.
void MergePackedPartials(float* packed_acc, const float* packed, int64_t rows, int head_dim);

}  // namespace ringtree

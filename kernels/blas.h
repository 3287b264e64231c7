// Thin wrappers over OpenBLAS so no other file includes cblas.h.
#pragma once

namespace ringtree {

// Row-major SGEMM: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
// trans_a / trans_b select A^T / B^T. lda/ldb/ldc are row strides in floats.
void Sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* c, int ldc);

// Sets OpenBLAS' own thread count. Kernels call BLAS from inside oneTBB tasks
// and must see 1; benchmarks of plain SGEMM set it to the core count.
void SetBlasThreads(int threads);
int GetBlasThreads();

}  // namespace ringtree

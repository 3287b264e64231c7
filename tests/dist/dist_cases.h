// Inputs and float64-exact references shared by the dist/ tests: the MPI
// ones (dist_test.cc, under mpirun) and the in-process ones
// (in_process_test.cc, ranks as threads).
#pragma once

#include <cstdint>
#include <vector>

#include "dist/ring_attention.h"
#include "dist/tree_decode.h"
#include "kernels/reference.h"
#include "kernels/test_util.h"

namespace ringtree::testing {

// Storage bytes of rows [begin, end) of a [T, heads, D] tensor.
struct Tensor {
  std::vector<uint8_t> bytes;
  int64_t row_bytes = 0;
  const uint8_t* Row(int64_t i) const { return bytes.data() + i * row_bytes; }
};

inline Tensor MakeKv(const std::vector<float>& x, int64_t row_elems, DType dtype) {
  Tensor t;
  t.bytes = ToStorage(x, dtype);
  t.row_bytes = row_elems * static_cast<int64_t>(DTypeSize(dtype));
  return t;
}

// Reference result for queries at positions [q_begin, q_begin + q_tokens) over
// keys [0, kv_tokens) of the full tensors.
inline void Reference(const std::vector<float>& q, const Tensor& k, const Tensor& v,
                      const HeadConfig& hc, int64_t q_tokens, int64_t kv_tokens, int64_t q_offset,
                      bool causal, std::vector<float>* o, std::vector<float>* lse,
                      float scale = 0.0f) {
  AttentionShape shape{q_tokens, kv_tokens, hc.heads, hc.kv_heads, hc.head_dim};
  AttentionOptions ao;
  ao.causal = causal;
  ao.scale = scale;
  ao.q_position_offset = q_offset;
  o->assign(static_cast<size_t>(q_tokens * hc.heads * hc.head_dim), 0.0f);
  lse->assign(static_cast<size_t>(q_tokens * hc.heads), 0.0f);
  ReferenceAttention(q.data(), k.bytes.data(), v.bytes.data(), hc.kv_dtype, shape, ao, o->data(),
                     lse->data());
}

// A decode session for the tree tests: context tokens dealt to P ranks in
// spans of `span_tokens`, in a skewed order so some rank may hold nothing.
struct Session {
  HeadConfig hc;
  int64_t context = 0;   // cached tokens [0, context)
  int64_t q_tokens = 0;  // decode queries at positions [context - q_tokens, context)
  std::vector<float> q;
  Tensor k, v;
  std::vector<KvBlock> local_kv;
  std::vector<float> o_ref, lse_ref;
};

inline Session MakeSession(const HeadConfig& hc, int64_t context, int64_t q_tokens,
                           int64_t span_tokens, uint64_t seed, int rank, int P) {
  Session s;
  s.hc = hc;
  s.context = context;
  s.q_tokens = q_tokens;
  const int64_t q_row = int64_t{hc.heads} * hc.head_dim,
                kv_row = int64_t{hc.kv_heads} * hc.head_dim;
  s.q = RandomVector(q_tokens * q_row, seed);
  s.k = MakeKv(RandomVector(context * kv_row, seed + 1), kv_row, hc.kv_dtype);
  s.v = MakeKv(RandomVector(context * kv_row, seed + 2), kv_row, hc.kv_dtype);
  for (int64_t p = 0, i = 0; p < context; p += span_tokens, ++i)
    if ((i * 7 + 3) % (P + 1) % P == rank)
      s.local_kv.push_back({s.k.Row(p), s.v.Row(p), std::min(span_tokens, context - p), p});
  Reference(s.q, s.k, s.v, hc, q_tokens, context, context - q_tokens, true, &s.o_ref, &s.lse_ref);
  return s;
}

// The causal decode group of a session's queries over this rank's KV, into o/lse.
inline DecodeGroup GroupOf(const Session& s, float* o, float* lse) {
  DecodeGroup g;
  g.heads = s.hc;
  g.q = s.q.data();
  g.q_tokens = s.q_tokens;
  g.q_position_offset = s.context - s.q_tokens;
  g.causal = true;
  g.local_kv = s.local_kv;
  g.o = o;
  g.lse = lse;
  return g;
}

// Three sessions of different shapes and dtypes (one has a single span, so
// most ranks hold none of it).
inline std::vector<Session> MakeDecodeSessions(int rank, int P) {
  std::vector<Session> sessions;
  sessions.push_back(MakeSession({4, 2, 64, DType::kFloat32}, 300, 1, 32, 31, rank, P));
  sessions.push_back(MakeSession({8, 1, 64, DType::kFloat32}, 129, 3, 16, 41, rank, P));
  sessions.push_back(MakeSession({2, 2, 64, DType::kBFloat16}, 57, 2, 64, 51, rank, P));
  return sessions;
}

}  // namespace ringtree::testing

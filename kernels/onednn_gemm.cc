#include "kernels/onednn_gemm.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "kernels/cpu.h"
#include "kernels/dtype.h"

namespace ringtree::internal {
namespace {

using dnnl::memory;

dnnl::engine& Engine() {
  static dnnl::engine* e =
      new dnnl::engine(dnnl::engine::kind::cpu, 0);  // never destroyed: used until exit
  return *e;
}

// Debian's oneDNN runs its parallel regions on OpenMP; called from a oneTBB
// worker it would start a team of all cores in every worker. One thread per
// call: the caller's OpenMP team size is set to one around each matmul and
// restored after (a Python caller's PyTorch keeps its own setting), through
// the libgomp that libdnnl loaded, without linking an OpenMP runtime here.
class OneOmpThread {
 public:
  OneOmpThread() {
    if (Api().set) {
      prev_ = Api().get();
      if (prev_ != 1) Api().set(1);
    }
  }
  ~OneOmpThread() {
    if (Api().set && prev_ != 1) Api().set(prev_);
  }

 private:
  struct Functions {
    void (*set)(int) = nullptr;
    int (*get)() = nullptr;
  };
  static const Functions& Api() {
    static const Functions f = [] {
      Functions r;
      // RTLD_NOLOAD: the copy libdnnl already loaded (in Python it is not in
      // the global scope RTLD_DEFAULT searches).
      void* gomp = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
      void* scope = gomp ? gomp : RTLD_DEFAULT;
      r.set = reinterpret_cast<void (*)(int)>(dlsym(scope, "omp_set_num_threads"));
      r.get = reinterpret_cast<int (*)()>(dlsym(scope, "omp_get_max_threads"));
      if (!r.get) r.set = nullptr;
      return r;
    }();
    return f;
  }
  int prev_ = 1;
};

struct Gemm {
  int m, n, k;
  bool accumulate, bf16;
  dnnl::matmul prim;
  memory a, b, c, scratch;  // scratch: the thread's shared scratchpad bytes
};

dnnl::matmul::primitive_desc Describe(int m, int n, int k, bool accumulate, bool bf16 = true) {
  const auto in = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  const memory::desc a({m, k}, in, memory::format_tag::ab);
  const memory::desc b({k, n}, in, memory::format_tag::ab);
  const memory::desc c({m, n}, memory::data_type::f32, memory::format_tag::ab);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per thread: safe to run concurrently
  if (accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), attr, Engine());
}

// The product without oneDNN, for when oneDNN fails (say, out of memory
// for a primitive): slow, exact, and the caller's work is not lost.
template <typename T>
void PlainGemm(const T* a, const T* b, float* c, int m, int n, int k, bool accumulate) {
  auto value = [](T x) {
    if constexpr (std::is_same_v<T, float>)
      return x;
    else
      return BFloat16ToFloat(x);
  };
  std::vector<float> row(static_cast<size_t>(n));
  for (int i = 0; i < m; ++i) {
    std::fill(row.begin(), row.end(), 0.0f);
    for (int p = 0; p < k; ++p) {
      const float x = value(a[static_cast<size_t>(i) * k + p]);
      const T* bp = b + static_cast<size_t>(p) * n;
      for (int j = 0; j < n; ++j) row[j] += x * value(bp[j]);
    }
    float* ci = c + static_cast<size_t>(i) * n;
    for (int j = 0; j < n; ++j) ci[j] = accumulate ? ci[j] + row[j] : row[j];
  }
}

void ReportFailure(const char* what, int m, int n, int k) {
  static std::atomic<int> reported{0};
  if (reported.fetch_add(1) < 5)
    std::fprintf(stderr,
                 "[kernels] oneDNN matmul %dx%dx%d failed (%s): computed without oneDNN, slowly\n",
                 m, n, k, what);
}

std::string ProbeImpl() {
  // Detection asks Linux for the AMX tile state (arch_prctl) before oneDNN's
  // first call, so oneDNN finds AMX usable wherever the CPU and OS allow it.
  (void)DetectCpu();
  try {
    return Describe(128, 128, 128, true).impl_info_str();
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace

const std::string& OneDnnBf16Impl() {
  static const std::string impl = ProbeImpl();
  return impl;
}

bool OneDnnBf16Usable() {
  // Reference (non-JIT) implementations are far slower than widening to fp32.
  const std::string& impl = OneDnnBf16Impl();
  return !impl.empty() && impl.find("ref") == std::string::npos &&
         (impl.find("bf16") != std::string::npos || impl.find("amx") != std::string::npos);
}

bool OneDnnUsesAmx() { return OneDnnBf16Impl().find("amx") != std::string::npos; }

namespace {

// Primitives kept per thread, most recently used first. A tile's last key
// block has its own length, so masks and offsets bring new shapes; the full
// blocks' primitives stay at the front. (oneDNN also caches the generated
// code of a shape process-wide, so a re-created primitive is cheap.)
constexpr size_t kMaxPrimitives = 32;

std::atomic<bool> g_fail_for_test{false};

void Run(const void* a, const void* b, float* c, int m, int n, int k, bool accumulate, bool bf16) {
  thread_local std::vector<std::unique_ptr<Gemm>> cache;
  thread_local std::unique_ptr<dnnl::stream> stream;
  thread_local std::unique_ptr<uint8_t[]> scratch;  // shared by the thread's primitives
  thread_local size_t scratch_size = 0;
  const OneOmpThread one_thread;
  try {
    if (g_fail_for_test.load(std::memory_order_relaxed))
      throw std::runtime_error("failure injected by a test");
    if (!stream) stream = std::make_unique<dnnl::stream>(Engine());
    size_t at = cache.size();
    for (size_t i = 0; i < cache.size() && at == cache.size(); ++i) {
      const Gemm& e = *cache[i];
      if (e.m == m && e.n == n && e.k == k && e.accumulate == accumulate && e.bf16 == bf16) at = i;
    }
    if (at == cache.size()) {
      if (cache.size() >= kMaxPrimitives) cache.pop_back();  // the least recently used
      const auto pd = Describe(m, n, k, accumulate, bf16);
      cache.push_back(std::make_unique<Gemm>(Gemm{
          m, n, k, accumulate, bf16, dnnl::matmul(pd), memory(pd.src_desc(), Engine(), nullptr),
          memory(pd.weights_desc(), Engine(), nullptr), memory(pd.dst_desc(), Engine(), nullptr),
          memory(pd.scratchpad_desc(), Engine(), nullptr)}));
      at = cache.size() - 1;
    }
    std::rotate(cache.begin(), cache.begin() + static_cast<std::ptrdiff_t>(at),
                cache.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    Gemm* g = cache.front().get();
    const size_t scratch_bytes = g->scratch.get_desc().get_size();
    if (scratch_bytes > scratch_size) {
      scratch.reset(new uint8_t[scratch_bytes]);
      scratch_size = scratch_bytes;
    }
    g->scratch.set_data_handle(scratch.get());
    g->a.set_data_handle(const_cast<void*>(a));
    g->b.set_data_handle(const_cast<void*>(b));
    g->c.set_data_handle(c);
    // The C entry point with the arguments on the stack: the C++ one takes
    // them as an std::unordered_map, built and freed on every call (a
    // 16 x 16 x 128 product: median 1.74 -> 1.52 us over 8 alternating runs).
    const dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, g->a.get()},
                                    {DNNL_ARG_WEIGHTS, g->b.get()},
                                    {DNNL_ARG_DST, g->c.get()},
                                    {DNNL_ARG_SCRATCHPAD, g->scratch.get()}};
    dnnl::error::wrap_c_api(dnnl_primitive_execute(g->prim.get(), stream->get(), 4, args),
                            "could not execute a matmul");
    stream->wait();
  } catch (const std::exception& e) {
    ReportFailure(e.what(), m, n, k);
    if (bf16)
      PlainGemm(static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), c, m, n, k,
                accumulate);
    else
      PlainGemm(static_cast<const float*>(a), static_cast<const float*>(b), c, m, n, k, accumulate);
  }
}

}  // namespace

void FailOneDnnForTest(bool fail) { g_fail_for_test.store(fail); }

void OneDnnGemmBf16(const uint16_t* a, const uint16_t* b, float* c, int m, int n, int k,
                    bool accumulate) {
  Run(a, b, c, m, n, k, accumulate, true);
}

void OneDnnGemmFloat32(const float* a, const float* b, float* c, int m, int n, int k,
                       bool accumulate) {
  Run(a, b, c, m, n, k, accumulate, false);
}

}  // namespace ringtree::internal

#include "kernels/onednn_gemm.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <vector>

#include "kernels/cpu.h"

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
  memory a, b, c, scratch;
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

[[noreturn]] void Fail(const char* what, int m, int n, int k) {
  std::fprintf(stderr, "[kernels] oneDNN bf16 matmul %dx%dx%d failed: %s\n", m, n, k, what);
  std::abort();
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

void Run(const void* a, const void* b, float* c, int m, int n, int k, bool accumulate, bool bf16) {
  thread_local std::vector<std::unique_ptr<Gemm>> cache;
  thread_local std::unique_ptr<dnnl::stream> stream;
  const OneOmpThread one_thread;
  try {
    if (!stream) stream = std::make_unique<dnnl::stream>(Engine());
    Gemm* g = nullptr;
    for (auto& e : cache)
      if (e->m == m && e->n == n && e->k == k && e->accumulate == accumulate && e->bf16 == bf16)
        g = e.get();
    if (!g) {
      if (cache.size() >= 64)
        cache.clear();  // shapes vary only with the last key block and tile height
      const auto pd = Describe(m, n, k, accumulate, bf16);
      cache.push_back(std::make_unique<Gemm>(Gemm{
          m, n, k, accumulate, bf16, dnnl::matmul(pd), memory(pd.src_desc(), Engine(), nullptr),
          memory(pd.weights_desc(), Engine(), nullptr), memory(pd.dst_desc(), Engine(), nullptr),
          memory(pd.scratchpad_desc(), Engine())}));
      g = cache.back().get();
    }
    g->a.set_data_handle(const_cast<void*>(a));
    g->b.set_data_handle(const_cast<void*>(b));
    g->c.set_data_handle(c);
    g->prim.execute(*stream, {{DNNL_ARG_SRC, g->a},
                              {DNNL_ARG_WEIGHTS, g->b},
                              {DNNL_ARG_DST, g->c},
                              {DNNL_ARG_SCRATCHPAD, g->scratch}});
    stream->wait();
  } catch (const std::exception& e) {
    Fail(e.what(), m, n, k);
  }
}

}  // namespace

void OneDnnGemmBf16(const uint16_t* a, const uint16_t* b, float* c, int m, int n, int k,
                    bool accumulate) {
  Run(a, b, c, m, n, k, accumulate, true);
}

void OneDnnGemmFloat32(const float* a, const float* b, float* c, int m, int n, int k,
                       bool accumulate) {
  Run(a, b, c, m, n, k, accumulate, false);
}

}  // namespace ringtree::internal

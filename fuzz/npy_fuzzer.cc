// Fuzzes every .npy parser on arbitrary file contents: the client's whole-file
// reader (rpc/npy.cc ParseNpy), the job mode's header parser (dist/npy.cc
// ParseNpyHeader) and its integer reader (ParseNpyIntegers). A parse that
// succeeds must describe exactly the bytes it was given.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "dist/npy.h"
#include "rpc/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string contents(reinterpret_cast<const char*>(data), size);

  auto tensor = ringtree::ParseNpy("fuzz.npy", contents);
  if (tensor.ok()) {
    const ringtree::HostTensor& t = tensor.value();
    if (t.data.size() != static_cast<size_t>(t.elements()) * ringtree::DTypeSize(t.dtype))
      std::abort();
    if (!t.data.empty()) (void)t.ToFloat32();
  }

  auto header = ringtree::ParseNpyHeader("fuzz.npy", data, size, static_cast<int64_t>(size));
  if (header.ok()) {
    const ringtree::NpyHeader& h = header.value();
    if (h.data_offset < 0 || h.data_offset > static_cast<int64_t>(size)) std::abort();
    (void)h.elements();
    (void)h.row_elements();
    (void)h.ShapeString();
  }

  auto integers = ringtree::ParseNpyIntegers("fuzz.npy", std::vector<uint8_t>(data, data + size));
  (void)integers;
  return 0;
}

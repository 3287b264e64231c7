// Fuzzes the decoding of ringtree.v1.Tensor into host tensors
// (rpc/tensor_codec.cc FromProto), as the service does for every request.
// Input: 1 mode byte, then either a serialized Tensor message (mode even) or
// a structured tensor (mode odd): dtype byte, rank byte (0..8), rank
// little-endian int64 dimensions, data bytes -- so shapes whose byte count
// overflows, negative dimensions and short data all get reached quickly.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "rpc/tensor_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  ++data;
  --size;
  ringtree::v1::Tensor tensor;
  if (mode % 2 == 0) {
    if (!tensor.ParseFromArray(data, static_cast<int>(size))) return 0;
  } else {
    if (size < 2) return 0;
    tensor.set_dtype(static_cast<ringtree::v1::DataType>(data[0] % 5));
    const size_t rank = data[1] % 9;
    data += 2;
    size -= 2;
    for (size_t i = 0; i < rank && size >= 8; ++i, data += 8, size -= 8) {
      int64_t d;
      std::memcpy(&d, data, 8);
      tensor.add_shape(d);
    }
    tensor.set_data(reinterpret_cast<const char*>(data), size);
  }
  auto host = ringtree::FromProto(tensor, "Fuzz", "tensor");
  if (!host.ok()) return 0;
  const ringtree::HostTensor& t = host.value();
  if (t.data.size() != static_cast<size_t>(t.elements()) * ringtree::DTypeSize(t.dtype))
    std::abort();
  const std::vector<float> values = t.ToFloat32();
  ringtree::v1::Tensor again;
  ringtree::ToProto(values.data(), t.shape, t.dtype, &again);
  if (!ringtree::FromProto(again, "Fuzz", "again").ok()) std::abort();
  return 0;
}

// Conversions between ringtree.v1.Tensor (raw little-endian bytes + dtype +
// shape) and host arrays. Shared by the C++ client and the coordinator.
// Thread-safe (no shared state).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "kernels/dtype.h"
#include "ringtree/v1/attention.pb.h"

namespace ringtree {

// A dense row-major host tensor in any wire dtype. Owns its bytes.
struct HostTensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::string data;  // product(shape) * DTypeSize(dtype) bytes

  int64_t elements() const;
  // Copies `values` (product(shape) floats) converted to `dtype`.
  static HostTensor FromFloat32(const float* values, std::vector<int64_t> shape,
                                DType dtype = DType::kFloat32);
  // All elements converted to float32.
  std::vector<float> ToFloat32() const;
};

// Wire enum <-> kernel dtype. FromProtoDType fails on UNSPECIFIED/unknown
// values with "[<op>] <dtype_field>: ..." (INVALID_ARGUMENT), dtype_field
// being the enum field's path ("q.dtype", "options.output_dtype").
Result<DType> FromProtoDType(v1::DataType dtype, std::string_view op, std::string_view field);
v1::DataType ToProtoDType(DType dtype);

// Fills `out` from a host tensor (copies the bytes).
void ToProto(const HostTensor& tensor, v1::Tensor* out);
// Same, from float32 values converted to `dtype`.
void ToProto(const float* values, const std::vector<int64_t>& shape, DType dtype, v1::Tensor* out);
// Checks dtype and that data holds exactly product(shape) elements; copies.
Result<HostTensor> FromProto(const v1::Tensor& tensor, std::string_view op, std::string_view field);

// "[2, 4, 64]"
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace ringtree

#include "rpc/tensor_codec.h"

#include <cstring>

namespace ringtree {

int64_t HostTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

HostTensor HostTensor::FromFloat32(const float* values, std::vector<int64_t> shape, DType dtype) {
  HostTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  const int64_t n = t.elements();
  t.data.resize(static_cast<size_t>(n) * DTypeSize(dtype));
  ConvertFromFloat32(values, dtype, t.data.data(), static_cast<size_t>(n));
  return t;
}

std::vector<float> HostTensor::ToFloat32() const {
  std::vector<float> out(static_cast<size_t>(elements()));
  ConvertToFloat32(dtype, data.data(), out.data(), out.size());
  return out;
}

Result<DType> FromProtoDType(v1::DataType dtype, std::string_view op, std::string_view field) {
  switch (dtype) {
    case v1::FLOAT32: return DType::kFloat32;
    case v1::FLOAT16: return DType::kFloat16;
    case v1::BFLOAT16: return DType::kBFloat16;
    default:
      return Status::InvalidArgument("[" + std::string(op) + "] " + std::string(field) +
                                     ": must be FLOAT32, FLOAT16 or BFLOAT16 (got " +
                                     std::to_string(static_cast<int>(dtype)) + ")");
  }
}

v1::DataType ToProtoDType(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return v1::FLOAT32;
    case DType::kFloat16: return v1::FLOAT16;
    case DType::kBFloat16: return v1::BFLOAT16;
  }
  return v1::DATA_TYPE_UNSPECIFIED;
}

void ToProto(const HostTensor& tensor, v1::Tensor* out) {
  out->set_dtype(ToProtoDType(tensor.dtype));
  out->clear_shape();
  for (int64_t d : tensor.shape) out->add_shape(d);
  out->set_data(tensor.data);
}

void ToProto(const float* values, const std::vector<int64_t>& shape, DType dtype, v1::Tensor* out) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  out->set_dtype(ToProtoDType(dtype));
  out->clear_shape();
  for (int64_t d : shape) out->add_shape(d);
  std::string* data = out->mutable_data();
  data->resize(static_cast<size_t>(n) * DTypeSize(dtype));
  ConvertFromFloat32(values, dtype, data->data(), static_cast<size_t>(n));
}

Result<HostTensor> FromProto(const v1::Tensor& tensor, std::string_view op, std::string_view field) {
  RINGTREE_ASSIGN_OR_RETURN(DType dtype,
                            FromProtoDType(tensor.dtype(), op, std::string(field) + ".dtype"));
  HostTensor t;
  t.dtype = dtype;
  // Checked: a wrapped-around product would let a huge shape pass with little data.
  int64_t expected = static_cast<int64_t>(DTypeSize(dtype));
  for (int64_t d : tensor.shape()) {
    if (d < 0) {
      return Status::InvalidArgument("[" + std::string(op) + "] " + std::string(field) +
                                     ".shape: negative dimension");
    }
    t.shape.push_back(d);
  }
  for (int64_t d : t.shape) {
    if (__builtin_mul_overflow(expected, d, &expected)) {
      return Status::InvalidArgument("[" + std::string(op) + "] " + std::string(field) + ".shape: " +
                                     ShapeString(t.shape) + " is too large (its byte count overflows 64 bits)");
    }
  }
  if (tensor.data().size() != static_cast<uint64_t>(expected)) {
    return Status::InvalidArgument("[" + std::string(op) + "] " + std::string(field) + ".data: " +
                                   std::to_string(tensor.data().size()) + " bytes, shape " +
                                   ShapeString(t.shape) + " " + DTypeName(dtype) + " needs " +
                                   std::to_string(expected));
  }
  t.data = tensor.data();
  return t;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace ringtree
